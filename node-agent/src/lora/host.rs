//! Loading a PEFT LoRA adapter from disk into host memory, refusing — with the reason and the
//! file named — everything the engine cannot serve exactly: DoRA, `modules_to_save`, pickle
//! weights, keys that match no base module, shapes that disagree with the base model, ranks
//! above the configured maximum, non-finite values, values or scales beyond
//! [`MAX_WEIGHT_MAGNITUDE`] / [`MAX_SCALE_MAGNITUDE`], oversized files. A refused adapter touches
//! nothing else.

use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::dtype::to_f32;
use crate::lora::BaseShapes;
use crate::lora::Module;
use crate::lora::ids::Digest;
use crate::lora::peft::{self, AdapterConfig};

/// Largest magnitude of a `lora_A` or `lora_B` value. Trained LoRA factors are small (PEFT
/// initialises A at about `1/sqrt(fan_in)` and B at zero; trained values stay well below 1);
/// an adapter with values in the thousands is broken or hostile, and huge finite values (1e30)
/// overflow the forward pass to NaN. Bounding the factors and the scale keeps an adapter's
/// contribution far from the f32 range for the supported model sizes, so a loaded adapter
/// cannot turn its requests' logits into NaN.
pub const MAX_WEIGHT_MAGNITUDE: f32 = 1e3;
/// Largest magnitude of a module's scale (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
pub const MAX_SCALE_MAGNITUDE: f32 = 1e3;

/// Why an adapter was refused. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: {size} bytes exceeds the adapter size limit of {limit} bytes")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
}

impl AdapterError {
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterError::Io { .. } => "io",
            AdapterError::Unsupported { .. } => "unsupported",
            AdapterError::Invalid { .. } => "invalid",
            AdapterError::TooLarge { .. } => "too_large",
        }
    }
}

/// Bounds on what an adapter may be.
#[derive(Debug, Clone, Copy)]
pub struct AdapterLimits {
    pub max_rank: usize,
    /// Largest `adapter_model.safetensors` accepted.
    pub max_bytes: u64,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        AdapterLimits {
            max_rank: 64,
            max_bytes: 1 << 30,
        }
    }
}

/// One module's factors: A `[rank, in]` and Bᵀ `[rank, out]` (B transposed so each of the
/// `rank` rows is contiguous, as the pool stores them).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleWeights {
    pub rank: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub bt: Vec<f32>,
}

/// An adapter's weights in host memory.
#[derive(Debug, Clone)]
pub struct HostAdapter {
    pub digest: Digest,
    pub config: AdapterConfig,
    /// `layers[l][module.index()]`.
    pub layers: Vec<[Option<ModuleWeights>; 7]>,
    /// Host memory the weights take.
    pub bytes: usize,
    pub max_rank: usize,
    pub target_modules: Vec<Module>,
}

impl HostAdapter {
    /// Every (layer, module, weights) it carries.
    pub fn modules(&self) -> impl Iterator<Item = (usize, Module, &ModuleWeights)> {
        self.layers.iter().enumerate().flat_map(|(l, ms)| {
            Module::ALL
                .into_iter()
                .filter_map(move |m| ms[m.index()].as_ref().map(|w| (l, m, w)))
        })
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Unsupported {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads and validates the adapter in `dir` for the base model whose shapes `model` gives.
pub fn load(
    dir: &Path,
    model: &impl BaseShapes,
    limits: &AdapterLimits,
) -> Result<HostAdapter, AdapterError> {
    let config_path = dir.join(peft::CONFIG_FILE);
    let weights_path = dir.join(peft::WEIGHTS_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|source| AdapterError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| invalid(&config_path, format!("invalid adapter_config.json: {e}")))?;
    check_config(&config, &config_path)?;

    if !weights_path.exists() {
        let bin = dir.join(peft::PICKLE_WEIGHTS_FILE);
        if bin.exists() {
            return Err(unsupported(&bin, peft::PICKLE_REFUSED));
        }
    }
    let bytes = read_bounded(&weights_path, limits.max_bytes)?;
    let digest = Digest::of(&bytes);
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(&weights_path, format!("invalid safetensors: {e}")))?;

    let mut layers: Vec<[Option<ModuleWeights>; 7]> = vec![Default::default(); model.num_layers()];
    let mut a_seen = vec![[false; 7]; model.num_layers()];
    let mut total = 0usize;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    // Pair each lora_A with its lora_B.
    for name in names {
        let (layer, module, matrix) = parse_key(name)
            .filter(|(l, _, _)| *l < model.num_layers())
            .ok_or_else(|| {
                invalid(
                    &weights_path,
                    format!("key {name} matches no module of the base model"),
                )
            })?;
        if matrix == peft::Matrix::B {
            continue;
        }
        a_seen[layer][module.index()] = true;
        let b_name = name.replace(".lora_A.", ".lora_B.");
        let rank = config.rank_for(module, layer);
        if rank > limits.max_rank {
            return Err(unsupported(
                &weights_path,
                format!(
                    "{name}: rank {rank} is above the configured maximum {}",
                    limits.max_rank
                ),
            ));
        }
        let (fan_in, fan_out) = model.module_shape(module);
        let a = read_tensor(&st, name, &[rank, fan_in], &weights_path)?;
        let b = read_tensor(&st, &b_name, &[fan_out, rank], &weights_path)?;
        let mut bt = vec![0.0; rank * fan_out];
        for o in 0..fan_out {
            for j in 0..rank {
                bt[j * fan_out + o] = b[o * rank + j];
            }
        }
        total += (a.len() + bt.len()) * size_of::<f32>();
        let scale = config.scale_for(module, layer);
        if !scale.is_finite() || scale.abs() > MAX_SCALE_MAGNITUDE {
            return Err(invalid(
                &config_path,
                format!(
                    "{name}: the scale (lora_alpha / r) is {scale}, beyond the limit of \
                     {MAX_SCALE_MAGNITUDE}"
                ),
            ));
        }
        layers[layer][module.index()] = Some(ModuleWeights { rank, scale, a, bt });
    }
    // A lora_B without its lora_A.
    for name in st.names() {
        if let Some((layer, module, peft::Matrix::B)) = parse_key(name)
            && !a_seen[layer][module.index()]
        {
            return Err(invalid(
                &weights_path,
                format!("{name} has no matching lora_A"),
            ));
        }
    }
    let mut target_modules: Vec<Module> = Vec::new();
    let mut max_rank = 0;
    for ms in &layers {
        for m in Module::ALL {
            if let Some(w) = &ms[m.index()] {
                max_rank = max_rank.max(w.rank);
                if !target_modules.contains(&m) {
                    target_modules.push(m);
                }
            }
        }
    }
    if target_modules.is_empty() {
        return Err(invalid(&weights_path, "the adapter has no LoRA weights"));
    }
    target_modules.sort();
    Ok(HostAdapter {
        digest,
        config,
        layers,
        bytes: total,
        max_rank,
        target_modules,
    })
}

fn check_config(c: &AdapterConfig, path: &Path) -> Result<(), AdapterError> {
    if c.peft_type != "LORA" {
        return Err(unsupported(
            path,
            format!("peft_type {:?} is not supported (only LORA)", c.peft_type),
        ));
    }
    if c.use_dora {
        return Err(unsupported(path, "DoRA (use_dora: true) is not supported"));
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported(
            path,
            "modules_to_save is not supported: the adapter would replace whole base modules",
        ));
    }
    if c.bias != "none" {
        return Err(unsupported(
            path,
            format!("bias {:?} is not supported (only \"none\")", c.bias),
        ));
    }
    if c.fan_in_fan_out {
        return Err(unsupported(path, "fan_in_fan_out: true is not supported"));
    }
    if c.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(path, "layers_to_transform is not supported"));
    }
    if c.r == 0 || c.rank_pattern.values().any(|r| *r == 0) {
        return Err(invalid(path, "rank must be positive"));
    }
    if !c.lora_alpha.is_finite() || c.alpha_pattern.values().any(|a| !a.is_finite()) {
        return Err(invalid(path, "lora_alpha must be finite"));
    }
    Ok(())
}

/// Reads at most `limit` bytes; a longer file is refused before it is read whole. Works for
/// pipes and other files whose size is unknown up front.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, AdapterError> {
    let io = |source| AdapterError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > limit
    {
        return Err(AdapterError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(AdapterError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

fn read_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<Vec<f32>, AdapterError> {
    let view = st
        .tensor(name)
        .map_err(|_| invalid(path, format!("missing tensor {name}")))?;
    if view.shape() != shape {
        return Err(invalid(
            path,
            format!(
                "{name} has shape {:?} but the base model and adapter config imply {shape:?}",
                view.shape()
            ),
        ));
    }
    let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
        unsupported(
            path,
            format!("{name} has unsupported dtype {:?}", view.dtype()),
        )
    })?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            path,
            format!("{name} has a non-finite value at index {i}"),
        ));
    }
    if let Some(i) = values.iter().position(|v| v.abs() > MAX_WEIGHT_MAGNITUDE) {
        return Err(invalid(
            path,
            format!(
                "{name} has a value of magnitude {} at index {i}, beyond the limit of \
                 {MAX_WEIGHT_MAGNITUDE}",
                values[i].abs()
            ),
        ));
    }
    Ok(values)
}

/// Parses `base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight`.
fn parse_key(name: &str) -> Option<(usize, Module, peft::Matrix)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (parent, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let module = Module::from_name(module).filter(|m| m.parent() == parent)?;
    let matrix = match rest {
        "lora_A.weight" | "lora_A.default.weight" => peft::Matrix::A,
        "lora_B.weight" | "lora_B.default.weight" => peft::Matrix::B,
        _ => return None,
    };
    Some((layer, module, matrix))
}
