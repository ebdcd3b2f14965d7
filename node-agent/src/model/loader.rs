//! Reads a Hugging Face checkpoint directory: `config.json` and `model.safetensors` (or the
//! shards listed in `model.safetensors.index.json`), converting f16/bf16 to f32 and checking
//! every tensor's shape against the configuration.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::dtype::to_f32;
use crate::model::ModelError;

/// The raw weight files of a checkpoint, read into memory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.index.len())
            .finish()
    }
}

fn weights_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Weights {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Checkpoint {
    /// Reads the weight files of `dir`, following the shard index when there is one.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| weights_err(&index_path, format!("invalid index: {e}")))?;
            let map = index
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| weights_err(&index_path, "index lacks weight_map"))?;
            let mut files = BTreeSet::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| {
                    weights_err(&index_path, "weight_map values must be file names")
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(weights_err(
                        &index_path,
                        format!("shard name {file:?} escapes the directory"),
                    ));
                }
                files.insert(file.to_owned());
            }
            files.into_iter().collect()
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".to_owned()]
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(weights_err(
                &dir.join("pytorch_model.bin"),
                "pickle checkpoints are not supported; convert to safetensors",
            ));
        } else {
            return Err(weights_err(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };

        let mut files = Vec::with_capacity(names.len());
        let mut index = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| weights_err(&path, format!("invalid safetensors: {e}")))?;
            for tensor in st.names() {
                if index.insert(tensor.to_owned(), files.len()).is_some() {
                    return Err(weights_err(
                        &path,
                        format!("tensor {tensor} appears in two shards"),
                    ));
                }
            }
            files.push((path, bytes));
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            files,
            index,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads tensor `name` as f32, checking it has exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let file = *self
            .index
            .get(name)
            .ok_or_else(|| weights_err(&self.dir, format!("missing tensor {name}")))?;
        let (path, bytes) = &self.files[file];
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| weights_err(path, format!("invalid safetensors: {e}")))?;
        let view = st
            .tensor(name)
            .map_err(|e| weights_err(path, format!("{name}: {e}")))?;
        if view.shape() != shape {
            return Err(weights_err(
                path,
                format!(
                    "{name} has shape {:?}, the config implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            weights_err(
                path,
                format!("{name} has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(weights_err(
                path,
                format!("{name} has a non-finite value at index {bad}"),
            ));
        }
        Ok(values)
    }
}
