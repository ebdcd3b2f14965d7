//! The roofline of a serving workload: the output tokens/s no server can beat on this machine,
//! from the model's arithmetic and bytes and the GEMM peak and memory bandwidth measured in the
//! same run (issue 13's "serving tok/s ≥ 50 % of the workload's roofline").
//!
//! Arithmetic (2 flops per multiply-add): every token a forward pass processes (the prompt,
//! then each output token but the last) goes through every linear layer, its adapter's LoRA
//! shrink and expand on the target modules, and attention over its context; the LM head runs
//! once per output token. Bytes: the best batching the client allows — requests in arrival
//! order, `concurrency` at a time, each group's prefill reading the weights once and each
//! decode step reading the base weights, the LoRA weights of the group's distinct adapters and
//! every sequence's KV cache (f32). Roofline time = max(flops / peak, bytes / bandwidth);
//! roofline tokens/s = output tokens / roofline time. Norms, RoPE and sampling are left out,
//! so the bound is optimistic, as a roofline should be.

use loraplane_agent::lora::Module;
use loraplane_agent::model::config::ModelConfig;

use crate::suites::roofline::weight_bytes;
use crate::suites::serving::workload::{Planned, Workload};

/// The workload's bound and how it was reached.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Bound {
    pub flops: f64,
    pub bytes: f64,
    pub output_tokens: f64,
    /// flops / peak.
    pub compute_s: f64,
    /// bytes / bandwidth.
    pub memory_s: f64,
    pub tok_s: f64,
}

impl Bound {
    pub fn limit(&self) -> &'static str {
        if self.compute_s >= self.memory_s {
            "compute"
        } else {
            "memory bandwidth"
        }
    }
}

/// LoRA parameters of one adapter of `rank` on `targets`, over every layer.
fn lora_params(c: &ModelConfig, rank: usize, targets: &[Module]) -> f64 {
    let per_layer: usize = targets
        .iter()
        .map(|m| {
            let (i, o) = c.module_shape(*m);
            rank * (i + o)
        })
        .sum();
    (per_layer * c.num_layers) as f64
}

/// The roofline of `plan` (from `w`) on a machine of `peak_gflops` and `gbps`.
pub fn bound(
    c: &ModelConfig,
    w: &Workload,
    plan: &[Planned],
    peak_gflops: f64,
    gbps: f64,
) -> Bound {
    let linear_per_token: f64 = Module::ALL
        .iter()
        .map(|m| {
            let (i, o) = c.module_shape(*m);
            (i * o) as f64
        })
        .sum::<f64>()
        * c.num_layers as f64;
    let head = (c.vocab_size * c.hidden_size) as f64;
    let attn_per_pair = 4.0 * (c.num_layers * c.num_heads * c.head_dim) as f64;
    let kv_bytes_per_pos = 2.0 * (c.num_layers * c.kv_dim() * 4) as f64;
    let lora = |p: &Planned| {
        p.adapter
            .map_or(0.0, |a| lora_params(c, w.rank(a), &w.adapters.targets))
    };

    let mut flops = 0.0;
    let mut output_tokens = 0.0;
    for p in plan {
        let (prompt, out) = (p.prompt.len() as f64, p.max_tokens as f64);
        let forward = prompt + out - 1.0;
        flops += 2.0 * (linear_per_token + lora(p)) * forward + 2.0 * head * out;
        // Token t attends over t + 1 positions.
        flops += attn_per_pair * forward * (forward + 1.0) / 2.0;
        output_tokens += out;
    }

    let mut order: Vec<&Planned> = plan.iter().collect();
    order.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    let weights = weight_bytes(c) as f64;
    let mut bytes = 0.0;
    for group in order.chunks(w.concurrency.max(1)) {
        let mut adapters: Vec<usize> = group.iter().filter_map(|p| p.adapter).collect();
        adapters.sort_unstable();
        adapters.dedup();
        let lora_bytes: f64 = adapters
            .iter()
            .map(|a| 4.0 * lora_params(c, w.rank(*a), &w.adapters.targets))
            .sum();
        // One prefill pass and (longest output - 1) decode steps, each reading every weight.
        let steps = group.iter().map(|p| p.max_tokens).max().unwrap_or(0) as f64;
        bytes += steps * (weights + lora_bytes);
        for p in group {
            let (prompt, out) = (p.prompt.len() as f64, p.max_tokens as f64);
            // Decode step k reads the KV of prompt + k positions.
            let positions = (out - 1.0) * prompt + (out - 1.0) * out / 2.0;
            bytes += kv_bytes_per_pos * positions;
        }
    }
    let compute_s = flops / (peak_gflops * 1e9);
    let memory_s = bytes / (gbps * 1e9);
    let time = compute_s.max(memory_s);
    Bound {
        flops,
        bytes,
        output_tokens,
        compute_s,
        memory_s,
        tok_s: if time > 0.0 {
            output_tokens / time
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suites::serving::workload::{Adapters, Arrival, Length, Popularity, PromptFormat};
    use loraplane_agent::model::config::HfConfig;

    fn small() -> ModelConfig {
        let spec = loraplane_agent::fixtures::model::ModelSpec {
            arch: loraplane_agent::model::config::Arch::Llama,
            preset: loraplane_agent::fixtures::model::Preset::Small,
            dtype: loraplane_agent::fixtures::tensor::FixtureDtype::F32,
            seed: 0,
            shards: 1,
        };
        let hf: HfConfig = loraplane_agent::fixtures::model::hf_config(&spec);
        hf.validate(std::path::Path::new("config.json")).unwrap()
    }

    fn workload(adapters: usize) -> Workload {
        Workload {
            name: "t".into(),
            description: String::new(),
            requests: 64,
            concurrency: 64,
            prompt_tokens: Length::Fixed(64),
            output_tokens: Length::Fixed(32),
            arrival: Arrival::AllAtOnce,
            adapters: Adapters {
                count: adapters,
                names: Vec::new(),
                ranks: vec![8, 16, 32, 64],
                targets: Module::ALL.to_vec(),
                popularity: Popularity::Uniform,
            },
            seed: 0,
            temperature: 0.0,
            ignore_eos: true,
            logprobs: false,
            prompt_format: PromptFormat::TokenIds,
            base_model: "model".into(),
            vocab_size: None,
            shared_prefix_tokens: 0,
        }
    }

    #[test]
    fn the_canonical_workload_is_compute_bound_on_a_cpu() {
        let c = small();
        let w = workload(16);
        let plan = w.expand(c.vocab_size);
        let b = bound(&c, &w, &plan, 190.0, 10.0);
        assert_eq!(b.output_tokens, 64.0 * 32.0);
        // About 2 × (linear + head) parameters per token: 64 × 95 forward tokens.
        let per_token = b.flops / (64.0 * 95.0);
        assert!(
            (1.0e8..4.0e8).contains(&per_token),
            "{per_token:e} flops per token"
        );
        assert_eq!(b.limit(), "compute");
        assert!((b.tok_s - b.output_tokens / b.compute_s).abs() < 1e-6);
        // Adapters add arithmetic and bytes; a smaller concurrency adds weight reads.
        let base = bound(
            &c,
            &workload(0),
            &workload(0).expand(c.vocab_size),
            190.0,
            10.0,
        );
        assert!(base.flops < b.flops && base.bytes < b.bytes);
        let mut narrow = w.clone();
        narrow.concurrency = 8;
        let n = bound(&c, &narrow, &plan, 190.0, 10.0);
        assert!(n.bytes > 4.0 * b.bytes && n.flops == b.flops);
    }
}
