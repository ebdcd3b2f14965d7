//! The oracle workload (its model, adapters, prompts, engine and requests), shared by `engine_oracle.rs` (CPU against
//! candle-transformers) and `cuda_oracle.rs` (CUDA against the CPU): both must run exactly the
//! same workload for their results to be comparable.
//!
//! Include with `#[path = "support/workload.rs"] mod workload;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loraplane_agent::backend::Backend;
use loraplane_agent::engine::{AdapterUse, Engine, EngineConfig, Request, SamplingParams};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::config::Arch;

/// One request of the workload: on the base model (no adapters), adapter `lora-{i}`, or
/// several composed, each `(i, scale)`.
pub struct Case {
    pub id: String,
    pub adapters: Vec<(usize, f32)>,
    pub prompt: Vec<u32>,
}

/// Compositions the workload adds when it has at least 7 adapters: two and three adapters
/// (one scale negative), and one adapter at half strength.
pub const COMPOSED: [&[(usize, f32)]; 3] = [
    &[(0, 0.7), (1, 0.3)],
    &[(2, 1.0), (4, -0.5), (6, 0.25)],
    &[(1, 0.5)],
];

/// The tiny fixture model of `arch` in `dtype`, `adapters` adapters cycling through
/// [`adapter_spec`], and one case per adapter plus two on the base model, plus the
/// [`COMPOSED`] cases.
pub struct Workload {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub adapters: Vec<PathBuf>,
    pub cases: Vec<Case>,
}

pub fn workload(arch: Arch, dtype: FixtureDtype, adapters: usize) -> Workload {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = ModelSpec {
        arch,
        preset: Preset::Tiny,
        dtype,
        seed: 7,
        shards: 2,
    };
    model::write(&spec, &model).unwrap();
    let adapter_dirs = (0..adapters)
        .map(|i| {
            let out = dir.path().join(format!("adapter-{i}"));
            adapter::write(&adapter_spec(i), &model, &out).unwrap();
            out
        })
        .collect();
    let mut cases: Vec<Case> = (0..adapters)
        .map(|i| Case {
            id: format!("a{i}"),
            adapters: vec![(i, 1.0)],
            prompt: prompt(i, 5 + (i * 11) % 37, 512),
        })
        .collect();
    for b in 0..2 {
        cases.push(Case {
            id: format!("base{b}"),
            adapters: Vec::new(),
            prompt: prompt(100 + b, 9 + b * 20, 512),
        });
    }
    if adapters >= 7 {
        for (c, uses) in COMPOSED.iter().enumerate() {
            cases.push(Case {
                id: format!("mix{c}"),
                adapters: uses.to_vec(),
                prompt: prompt(200 + c, 7 + c * 13, 512),
            });
        }
    }
    Workload {
        dir,
        model,
        adapters: adapter_dirs,
        cases,
    }
}

/// An engine on `backend` with every adapter loaded as `lora-{i}` of tenant `default`.
pub fn engine<B: Backend>(
    backend: B,
    model: &Path,
    adapters: &[PathBuf],
    config: EngineConfig,
) -> Engine<B> {
    let mut e = Engine::new(backend, model, config).unwrap();
    for (i, dir) in adapters.iter().enumerate() {
        let key = AdapterKey::new("default", &format!("lora-{i}"));
        assert_eq!(
            e.begin_adapter_load(key.clone(), dir.clone(), None, false)
                .unwrap(),
            loraplane_agent::engine::LoadWait::Load
        );
        let (k, source) = e.take_pending_loads().pop().unwrap();
        assert_eq!(k, key);
        let model_config = e.model_config().clone();
        let host = loraplane_agent::lora::host::load(&source, &model_config, &Default::default());
        e.finish_adapter_load(&key, host).unwrap();
    }
    e
}

/// The greedy request of `case` for `max_new` tokens, with logits.
pub fn request(case: &Case, max_new: usize) -> Request {
    Request {
        id: case.id.clone(),
        tenant: TenantId::default_tenant(),
        adapters: case
            .adapters
            .iter()
            .map(|&(i, scale)| AdapterUse {
                name: format!("lora-{i}"),
                scale,
            })
            .collect(),
        prompt: case.prompt.clone(),
        params: SamplingParams {
            max_tokens: max_new,
            ignore_eos: true,
            return_logits: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    }
}

/// Eight adapter shapes (ranks 4–32, different targets, one rank_pattern, one rsLoRA); the 16
/// adapters of the workload cycle through them with different seeds.
pub fn adapter_spec(i: usize) -> AdapterSpec {
    use Module::*;
    let base = |rank: usize, targets: Vec<Module>| AdapterSpec {
        rank,
        alpha: 2.0 * rank as f64,
        targets,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        rslora: false,
        dtype: FixtureDtype::F32,
        seed: 100 + i as u64,
    };
    match i % 8 {
        0 => base(4, vec![Q, V]),
        1 => base(8, Module::ALL.to_vec()),
        2 => base(16, vec![Q, K, V, O]),
        3 => base(32, vec![Gate, Up, Down]),
        4 => AdapterSpec {
            rank_pattern: BTreeMap::from([
                ("model.layers.1.self_attn.q_proj".to_owned(), 16),
                ("down_proj".to_owned(), 4),
            ]),
            ..base(8, Module::ALL.to_vec())
        },
        5 => AdapterSpec {
            rslora: true,
            alpha: 8.0,
            ..base(16, Module::ALL.to_vec())
        },
        6 => base(4, vec![K, O, Down]),
        _ => AdapterSpec {
            alpha_pattern: BTreeMap::from([("up_proj".to_owned(), 3.0)]),
            ..base(32, vec![V, Up])
        },
    }
}

pub fn prompt(seed: usize, len: usize, vocab: u32) -> Vec<u32> {
    (0..len)
        .map(|j| ((seed * 7919 + j * 104_729 + 13) as u32) % (vocab - 8))
        .collect()
}
