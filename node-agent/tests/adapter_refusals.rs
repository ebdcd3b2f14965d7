//! Every adapter the engine cannot serve exactly is refused with a reason that names the
//! problem and the file — and a refused adapter leaves the engine serving everything else.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::{
    AdapterUse, Engine, EngineConfig, EngineError, Event, Request, SamplingParams,
};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::{self, AdapterError, AdapterLimits};
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::config::{Arch, HfConfig, ModelConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

struct Fixture {
    dir: tempfile::TempDir,
    model_dir: PathBuf,
    model: ModelConfig,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 3,
        shards: 1,
    };
    model::write(&spec, &model_dir).unwrap();
    let path = model_dir.join("config.json");
    let model = HfConfig::read(&path).unwrap().validate(&path).unwrap();
    Fixture {
        dir,
        model_dir,
        model,
    }
}

impl Fixture {
    /// A valid rank-8 adapter on q and down projections, in its own directory.
    fn adapter(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        let spec = AdapterSpec {
            rank: 8,
            alpha: 16.0,
            targets: vec![Module::Q, Module::Down],
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            rslora: false,
            dtype: FixtureDtype::F32,
            seed: 1,
        };
        adapter::write(&spec, &self.model_dir, &out).unwrap();
        out
    }

    fn load(&self, dir: &Path, limits: &AdapterLimits) -> AdapterError {
        host::load(dir, &self.model, limits).expect_err("the adapter must be refused")
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Rewrites the weights: `edit` gets (name, shape, f32 values) of every tensor and may change
/// or add tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    edit(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (shape, v))| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn assert_names(err: &AdapterError, reason: &str, file: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(reason),
        "{msg:?} should name the reason {reason:?}"
    );
    assert!(msg.contains(file), "{msg:?} should name the file {file:?}");
}

#[test]
fn refuses_dora() {
    let f = fixture();
    let dir = f.adapter("dora");
    edit_config(&dir, |c| c["use_dora"] = true.into());
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "DoRA",
        "adapter_config.json",
    );
}

#[test]
fn refuses_modules_to_save() {
    let f = fixture();
    let dir = f.adapter("mts");
    edit_config(&dir, |c| {
        c["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "modules_to_save",
        "adapter_config.json",
    );
}

#[test]
fn refuses_pickle_weights() {
    let f = fixture();
    let dir = f.adapter("pickle");
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "pickle",
        "adapter_model.bin",
    );
}

#[test]
fn refuses_keys_that_match_no_module() {
    let f = fixture();
    for bad in [
        "base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight",
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
        "base_model.model.lm_head.lora_A.weight",
    ] {
        let dir = f.adapter(&format!("key-{}", bad.len()));
        edit_weights(&dir, |t| {
            t.insert(bad.to_owned(), (vec![8, 64], vec![0.5; 8 * 64]));
        });
        let err = f.load(&dir, &AdapterLimits::default());
        assert_names(
            &err,
            "matches no module of the base model",
            "adapter_model.safetensors",
        );
        assert!(err.to_string().contains(bad));
    }
}

#[test]
fn refuses_shapes_that_disagree_with_the_base_model() {
    let f = fixture();
    let dir = f.adapter("shape");
    edit_weights(&dir, |t| {
        let name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
        t.insert(name.to_owned(), (vec![8, 64], vec![0.1; 8 * 64])); // down_proj's input is 176 wide
    });
    let err = f.load(&dir, &AdapterLimits::default());
    assert_names(&err, "has shape [8, 64]", "adapter_model.safetensors");
    assert!(err.to_string().contains("[8, 176]"));
}

#[test]
fn refuses_rank_above_the_maximum() {
    let f = fixture();
    let dir = f.adapter("rank");
    let err = f.load(
        &dir,
        &AdapterLimits {
            max_rank: 4,
            ..AdapterLimits::default()
        },
    );
    assert_names(
        &err,
        "rank 8 is above the configured maximum 4",
        "adapter_model.safetensors",
    );
}

#[test]
fn refuses_non_finite_values() {
    for bad in [f32::NAN, f32::INFINITY] {
        let f = fixture();
        let dir = f.adapter("nan");
        edit_weights(&dir, |t| {
            let b = t
                .get_mut("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
                .unwrap();
            b.1[17] = bad;
        });
        assert_names(
            &f.load(&dir, &AdapterLimits::default()),
            "non-finite value at index 17",
            "adapter_model.safetensors",
        );
    }
}

#[test]
fn refuses_oversized_files() {
    let f = fixture();
    let dir = f.adapter("big");
    let err = f.load(
        &dir,
        &AdapterLimits {
            max_bytes: 1000,
            ..AdapterLimits::default()
        },
    );
    assert_names(
        &err,
        "exceeds the adapter size limit of 1000 bytes",
        "adapter_model.safetensors",
    );
}

#[test]
fn refuses_other_peft_types_and_malformed_configs() {
    let f = fixture();
    let dir = f.adapter("ia3");
    edit_config(&dir, |c| c["peft_type"] = "IA3".into());
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "peft_type \"IA3\"",
        "adapter_config.json",
    );
    let dir = f.adapter("garbage");
    std::fs::write(dir.join("adapter_config.json"), b"{not json").unwrap();
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "invalid adapter_config.json",
        "adapter_config.json",
    );
    let dir = f.adapter("truncated");
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(
        &f.load(&dir, &AdapterLimits::default()),
        "invalid safetensors",
        "adapter_model.safetensors",
    );
}

#[test]
fn a_refused_adapter_affects_nothing_else() {
    let f = fixture();
    let good = f.adapter("good");
    let bad = f.adapter("bad");
    edit_config(&bad, |c| c["use_dora"] = true.into());
    let mut e = Engine::new(
        CpuBackend,
        &f.model_dir,
        EngineConfig {
            num_pages: 256,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let start = e.stats().pool;
    let load = |e: &mut Engine<CpuBackend>, name: &str, dir: &Path| {
        let key = AdapterKey::new("default", name);
        e.begin_adapter_load(key.clone(), dir.to_owned(), None, false)
            .unwrap();
        let (_, source) = e.take_pending_loads().pop().unwrap();
        let model = e.model_config().clone();
        e.finish_adapter_load(&key, host::load(&source, &model, &AdapterLimits::default()))
    };
    load(&mut e, "good", &good).unwrap();
    let err = load(&mut e, "bad", &bad).unwrap_err();
    assert!(matches!(err, EngineError::AdapterLoad { .. }), "{err}");
    assert_eq!(e.adapters().len(), 1, "only the good adapter is registered");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = |adapter: &str| Request {
        id: adapter.to_owned(),
        tenant: TenantId::default_tenant(),
        adapters: vec![AdapterUse::plain(adapter)],
        prompt: vec![1, 2, 3],
        params: SamplingParams {
            max_tokens: 3,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    };
    assert!(matches!(
        e.submit(request("bad"), tx.clone()),
        Err(EngineError::AdapterNotFound(_))
    ));
    e.submit(request("good"), tx).unwrap();
    while e.has_work() {
        e.step().unwrap();
    }
    let mut tokens = 0;
    while let Ok(ev) = rx.try_recv() {
        tokens += usize::from(matches!(ev, Event::Token { .. }));
    }
    assert_eq!(tokens, 3);
    e.trim();
    assert_eq!(e.stats().pool, start);
}
