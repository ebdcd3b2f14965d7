//! `bench hetero` on a GPU: the decode step against the device's memory bandwidth. A decode
//! step of the batch reads every base weight once, every request's keys and values, and (with
//! adapters) every request's own adapter rows from the pool; those bytes over the step's time,
//! against the device-to-device copy bandwidth measured in the same run (bytes read plus
//! written, the memory bus's ceiling), is the step's share of its memory roofline:
//! docs/performance-targets.md §2.4 for the base model, and the adapters' added time against
//! their bytes for §2.2's LoRA decode roofline.
//!
//! Not counted, because they are small next to the rest: activations (a few rows of hidden
//! size per layer), the KV rows a step writes, the logits, block tables and LoRA row tables.

use serde_json::{Value, json};

use loraplane_agent::backend::device::{ComputeDtype, CopyRate};
use loraplane_agent::lora::Module;
use loraplane_agent::model::config::ModelConfig;

use crate::suites::report::{Report, Table, Target, format_num};

/// Bytes one decode step reads from device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(super) struct StepBytes {
    /// Every linear layer and the LM head in the GEMM weights' dtype, the norms (f32), and the
    /// batch's rows of the embedding table.
    pub weights: usize,
    /// Every request's cached keys and values, every layer (the pool is f32).
    pub kv: usize,
    /// Every request's adapter: its LoRA A and B rows in the pool (f32); 0 without adapters.
    pub adapters: usize,
}

impl StepBytes {
    pub fn total(&self) -> usize {
        self.weights + self.kv + self.adapters
    }
}

/// Bytes per GEMM weight element on the device.
fn weight_elem_bytes(dtype: ComputeDtype) -> usize {
    match dtype {
        ComputeDtype::F32 => 4,
        ComputeDtype::Bf16 | ComputeDtype::F16 => 2,
    }
}

/// What a decode step of `batch` requests reads, averaged over `steps` decode steps that follow
/// a prefill of `prompt_len` tokens each (step `k` attends `prompt_len + k + 1` keys), plus
/// `adapter_bytes` of adapters. The fixture models are Llama: no attention biases.
pub(super) fn decode_step_bytes(
    config: &ModelConfig,
    dtype: ComputeDtype,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    adapter_bytes: usize,
) -> StepBytes {
    let elem = weight_elem_bytes(dtype);
    let (h, f32_bytes) = (config.hidden_size, size_of::<f32>());
    let linear: usize = Module::ALL
        .iter()
        .map(|m| {
            let (i, o) = config.module_shape(*m);
            i * o
        })
        .sum();
    let weights = config.num_layers * linear * elem
        + config.vocab_size * h * elem
        + batch * h * elem
        + (2 * config.num_layers + 1) * h * f32_bytes;
    let steps = steps.max(1);
    let keys: usize = (0..steps).map(|k| prompt_len + k + 1).sum();
    let kv = 2 * config.num_layers * config.kv_dim() * f32_bytes * batch * keys / steps;
    StepBytes {
        weights,
        kv,
        adapters: adapter_bytes,
    }
}

/// The decode steps of one run against the copy bandwidth.
pub(super) struct DecodeRoofline {
    pub base: StepBytes,
    pub with_adapters: StepBytes,
    /// Median decode step times, seconds.
    pub base_step: f64,
    pub adapter_step: f64,
    pub copy: CopyRate,
}

/// The share of the copy bandwidth `bytes` in `seconds` reach.
fn share(bytes: usize, seconds: f64, bandwidth: f64) -> f64 {
    bytes as f64 / seconds.max(1e-12) / bandwidth.max(1.0)
}

/// Adds the roofline's target, table and findings to `report`; returns its JSON.
pub(super) fn add(report: &mut Report, device: &str, r: &DecodeRoofline) -> Value {
    let bw = r.copy.best_bps;
    let base_share = share(r.base.total(), r.base_step, bw);
    let adapter_share = share(r.with_adapters.total(), r.adapter_step, bw);
    let mb = |b: usize| format_num(b as f64 / 1e6);
    report.targets.push(
        Target::at_least(
            "Decode step vs memory-bandwidth roofline (GPU, base model)",
            "≥ 75 % of the roofline",
            base_share,
            0.75,
            format!(
                "{:.0} % ({} MB in {:.2} ms = {} GB/s; copy bandwidth {} GB/s)",
                base_share * 100.0,
                mb(r.base.total()),
                r.base_step * 1e3,
                format_num(r.base.total() as f64 / r.base_step.max(1e-12) / 1e9),
                format_num(bw / 1e9)
            ),
        )
        .note(format!(
            "docs/performance-targets.md §2.4, on {device}: the bytes a decode step of the batch \
             reads (weights, KV) over its median time, against the device-to-device copy \
             bandwidth measured in the same run"
        )),
    );
    let mut table = Table::new(
        "Decode step against the device's copy bandwidth",
        &[
            "batch",
            "weights MB",
            "KV MB",
            "adapters MB",
            "step time",
            "bytes / step time",
            "share of copy bandwidth",
            "roofline time",
        ],
    );
    for (name, bytes, step, s) in [
        ("base model", r.base, r.base_step, base_share),
        (
            "64 adapters",
            r.with_adapters,
            r.adapter_step,
            adapter_share,
        ),
    ] {
        table.row(vec![
            name.to_owned(),
            mb(bytes.weights),
            mb(bytes.kv),
            mb(bytes.adapters),
            format!("{:.2} ms", step * 1e3),
            format!(
                "{} GB/s",
                format_num(bytes.total() as f64 / step.max(1e-12) / 1e9)
            ),
            format!("{:.0} %", s * 100.0),
            format!("{:.2} ms", bytes.total() as f64 / bw.max(1.0) * 1e3),
        ]);
    }
    report.tables.push(table);

    // The adapters' share: the time they add to the step against their bytes at the ceiling.
    let added = r.adapter_step - r.base_step;
    let bound = r.with_adapters.adapters as f64 / bw.max(1.0);
    let lora_share = if added > 0.0 { bound / added } else { 0.0 };
    report.findings.push(format!(
        "Copy bandwidth on {device}: {} GB/s best, {} GB/s median (two {} MiB buffers, bytes \
         read plus written). The adapters add {} MB of reads per decode step, {:.2} ms at that \
         bandwidth; the adapter step takes {:.2} ms longer than the base step, so the LoRA path \
         runs at {:.0} % of its own roofline (target ≥ 70 %, docs/performance-targets.md §2.2; \
         not judged here, as the difference of two step times also holds the LoRA launches).",
        format_num(bw / 1e9),
        format_num(r.copy.median_bps / 1e9),
        r.copy.buffer_bytes >> 20,
        mb(r.with_adapters.adapters),
        bound * 1e3,
        added * 1e3,
        lora_share * 100.0,
    ));
    json!({
        "copy_bandwidth": r.copy,
        "base": {
            "bytes": r.base,
            "step_s": r.base_step,
            "share_of_copy_bandwidth": base_share,
        },
        "adapters": {
            "bytes": r.with_adapters,
            "step_s": r.adapter_step,
            "share_of_copy_bandwidth": adapter_share,
            "lora_path_share_of_roofline": lora_share,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_agent::model::config::Arch;

    /// Llama-3-8B's shapes with `layers` layers.
    fn llama(layers: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: layers,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            vocab_size: 128_256,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_llama3: None,
            tie_word_embeddings: false,
            sliding_window: None,
            eos_token_ids: vec![],
            bos_token_id: None,
            torch_dtype: None,
        }
    }

    #[test]
    fn llama_3_8b_reads_its_parameter_count_in_bf16() {
        // 8.03e9 parameters, of which the embedding table (0.53e9) is read for 64 rows only.
        let b = decode_step_bytes(&llama(32), ComputeDtype::Bf16, 64, 32, 8, 0);
        let params = b.weights as f64 / 2.0;
        assert!((7.4e9..7.6e9).contains(&params), "{params:e}");
        let f32 = decode_step_bytes(&llama(32), ComputeDtype::F32, 64, 32, 8, 0);
        // f32 doubles everything but the norms, which are f32 either way.
        let norms = (2 * 32 + 1) * 4096 * 4;
        assert_eq!(f32.weights - norms, 2 * (b.weights - norms));
        // Keys 33..=40 over the eight steps: 36.5 on average; 2·32 layers·1024·4 bytes per key.
        assert_eq!(b.kv, 2 * 32 * 1024 * 4 * 64 * (33 + 40) * 8 / 2 / 8);
        assert_eq!(b.adapters, 0);
        let with = decode_step_bytes(&llama(32), ComputeDtype::Bf16, 64, 32, 8, 1000);
        assert_eq!(with.total(), b.total() + 1000);
    }

    #[test]
    fn layers_scale_the_per_layer_bytes_only() {
        let (one, eight) = (
            decode_step_bytes(&llama(1), ComputeDtype::Bf16, 64, 32, 8, 0),
            decode_step_bytes(&llama(8), ComputeDtype::Bf16, 64, 32, 8, 0),
        );
        assert_eq!(eight.kv, 8 * one.kv);
        let lm_head = 128_256 * 4096 * 2;
        assert!(eight.weights - lm_head > 7 * (one.weights - lm_head));
    }

    #[test]
    fn shares_and_report() {
        let r = DecodeRoofline {
            base: StepBytes {
                weights: 3_000_000_000,
                kv: 0,
                adapters: 0,
            },
            with_adapters: StepBytes {
                weights: 3_000_000_000,
                kv: 0,
                adapters: 1_000_000_000,
            },
            base_step: 2e-3,
            adapter_step: 4e-3,
            copy: CopyRate {
                buffer_bytes: 1 << 30,
                best_bps: 3e12,
                median_bps: 2.9e12,
            },
        };
        let mut report = Report::new("hetero", "test");
        let v = add(&mut report, "cuda:0", &r);
        // 3 GB in 2 ms = 1.5 TB/s of 3 TB/s.
        assert!((v["base"]["share_of_copy_bandwidth"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        // 1 GB at 3 TB/s = 0.333 ms against 2 ms added.
        let lora = v["adapters"]["lora_path_share_of_roofline"]
            .as_f64()
            .unwrap();
        assert!((lora - 1.0 / 6.0).abs() < 1e-9, "{lora}");
        assert_eq!(report.targets.len(), 1);
        assert_eq!(report.tables[0].rows.len(), 2);
        assert!(
            report.findings[0].contains("3000 GB/s best"),
            "{}",
            report.findings[0]
        );
    }
}
