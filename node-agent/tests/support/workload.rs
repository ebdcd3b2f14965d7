//! The oracle workload's adapters and prompts, shared by `engine_oracle.rs` (CPU against
//! candle-transformers) and `cuda_oracle.rs` (CUDA against the CPU): both must run exactly the
//! same workload for their results to be comparable.
//!
//! Include with `#[path = "support/workload.rs"] mod workload;`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use loraplane_agent::fixtures::adapter::AdapterSpec;
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;

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
