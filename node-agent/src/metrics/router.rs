//! Router signals: the series llm-d's `lora-load-state-scorer` (and vLLM-aware endpoint
//! pickers generally) read to route requests to agents that already hold an adapter, in vLLM's
//! names.
//!
//! - `vllm:lora_adapter_loaded{adapter_name, level, pinned}` = 1 per adapter in memory, at its
//!   highest level: `gpu` (its rows are in the unified device pool) or `cpu` (its weights are
//!   in the host cache only). `adapter_name` follows `--metrics-adapter-identity` (a name, or
//!   an opaque id), like `vllm:lora_requests_info`.
//! - `vllm:num_gpu_loaded_lora_adapters`, `vllm:num_cpu_loaded_lora_adapters`: the same counts,
//!   never capped; `vllm:max_gpu_lora_adapters`: distinct adapters one batch may hold (the
//!   `max_lora` of `vllm:lora_requests_info`; the pool itself has no adapter slots).
//! - `vllm:lora_adapter_load_seconds{transition}`: `source_to_cpu` (reading, validating and
//!   digesting the files into the host cache), `cpu_to_gpu` (copying the rows into the pool).
//! - `vllm:kv_cache_usage_perc` (vLLM's newer name of `vllm:gpu_cache_usage_perc`, 0..1) and
//!   `vllm:cache_config_info{block_size, num_gpu_blocks}` = 1 (a vLLM block holds every
//!   layer, so `num_gpu_blocks` is the pool's pages over the model's layers).
//!
//! Bounded: at most [`MAX_ADAPTER_SERIES`] `vllm:lora_adapter_loaded` series per scrape —
//! device-pool adapters first, then pinned ones, then in name order — so thousands of
//! host-cached adapters cannot blow up a scrape; `loraplane_lora_adapter_series_omitted` says
//! how many were left out.

use prometheus::{Gauge, GaugeVec, HistogramOpts, HistogramVec, IntGauge, Opts, Registry};

use super::{AdapterIdentity, MetricsError, clamp, reg};
use crate::engine::AdapterTransition;
use crate::lora::registry::{AdapterSummary, Residency};

/// Most `vllm:lora_adapter_loaded` series one scrape carries.
pub const MAX_ADAPTER_SERIES: usize = 256;

pub const LORA_ADAPTER_LOADED: &str = "vllm:lora_adapter_loaded";
pub const NUM_GPU_LOADED: &str = "vllm:num_gpu_loaded_lora_adapters";
pub const NUM_CPU_LOADED: &str = "vllm:num_cpu_loaded_lora_adapters";
pub const MAX_GPU_LORAS: &str = "vllm:max_gpu_lora_adapters";
pub const LORA_LOAD_SECONDS: &str = "vllm:lora_adapter_load_seconds";
pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";
pub const SERIES_OMITTED: &str = "loraplane_lora_adapter_series_omitted";

/// Every name above.
pub const ALL: &[&str] = &[
    LORA_ADAPTER_LOADED,
    NUM_GPU_LOADED,
    NUM_CPU_LOADED,
    MAX_GPU_LORAS,
    LORA_LOAD_SECONDS,
    KV_CACHE_USAGE,
    CACHE_CONFIG_INFO,
    SERIES_OMITTED,
];

/// Adapter loads take from milliseconds (a small adapter into the pool) to minutes (a large
/// one from a slow source).
const LOAD_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl AdapterTransition {
    /// The `transition` label.
    pub fn label(self) -> &'static str {
        match self {
            AdapterTransition::SourceToHost => "source_to_cpu",
            AdapterTransition::HostToDevice => "cpu_to_gpu",
        }
    }
}

/// The router series.
#[derive(Debug)]
pub(super) struct RouterMetrics {
    loaded: GaugeVec,
    num_gpu: IntGauge,
    num_cpu: IntGauge,
    max_gpu: IntGauge,
    load_seconds: HistogramVec,
    pub kv_usage: Gauge,
    cache_config: GaugeVec,
    omitted: IntGauge,
}

impl RouterMetrics {
    pub fn register(r: &Registry) -> Result<Self, MetricsError> {
        let m = Self::new(r)?;
        // Both transitions exist from the start (count 0), so a rate over the first load
        // sees it rise instead of a series appearing at 1.
        for t in [
            AdapterTransition::SourceToHost,
            AdapterTransition::HostToDevice,
        ] {
            m.load_seconds.with_label_values(&[t.label()]);
        }
        Ok(m)
    }

    fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(RouterMetrics {
            loaded: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        LORA_ADAPTER_LOADED,
                        "1 per adapter in memory, at its highest level (gpu: the device pool, \
                         cpu: the host cache); at most 256 series.",
                    ),
                    &["adapter_name", "level", "pinned"],
                )?,
            )?,
            num_gpu: reg(
                r,
                IntGauge::new(NUM_GPU_LOADED, "Adapters with rows in the device pool.")?,
            )?,
            num_cpu: reg(
                r,
                IntGauge::new(
                    NUM_CPU_LOADED,
                    "Adapters in the host cache and not in the device pool.",
                )?,
            )?,
            max_gpu: reg(
                r,
                IntGauge::new(MAX_GPU_LORAS, "Distinct adapters one batch may hold.")?,
            )?,
            load_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        LORA_LOAD_SECONDS,
                        "Adapter load time by transition (source_to_cpu, cpu_to_gpu).",
                    )
                    .buckets(LOAD_BUCKETS.to_vec()),
                    &["transition"],
                )?,
            )?,
            kv_usage: reg(
                r,
                Gauge::new(
                    KV_CACHE_USAGE,
                    "KV-cache utilisation, 0..1 (vllm:gpu_cache_usage_perc's newer name).",
                )?,
            )?,
            cache_config: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        CACHE_CONFIG_INFO,
                        "KV cache geometry: tokens per block and blocks of every layer.",
                    ),
                    &["block_size", "num_gpu_blocks"],
                )?,
            )?,
            omitted: reg(
                r,
                IntGauge::new(
                    SERIES_OMITTED,
                    "Adapters in memory left out of vllm:lora_adapter_loaded by its cap.",
                )?,
            )?,
        })
    }

    pub fn set_cache_config(&self, block_size: usize, num_gpu_blocks: usize, max_lora: usize) {
        self.cache_config.reset();
        self.cache_config
            .with_label_values(&[block_size.to_string(), num_gpu_blocks.to_string()])
            .set(1.0);
        self.max_gpu.set(clamp(max_lora));
    }

    pub fn observe_load(&self, transition: AdapterTransition, seconds: f64) {
        self.load_seconds
            .with_label_values(&[transition.label()])
            .observe(seconds);
    }

    /// Rebuilds the per-adapter series from the registry's summaries.
    pub fn refresh_adapters(&self, adapters: &[AdapterSummary], identity: AdapterIdentity) {
        let level = |a: &AdapterSummary| match a.residency {
            Residency::DevicePool => Some("gpu"),
            Residency::HostCache => Some("cpu"),
            Residency::Loading | Residency::Registered => None,
        };
        let mut in_memory: Vec<(&AdapterSummary, &'static str)> = adapters
            .iter()
            .filter_map(|a| level(a).map(|l| (a, l)))
            .collect();
        let gpu = in_memory.iter().filter(|(_, l)| *l == "gpu").count();
        self.num_gpu.set(clamp(gpu));
        self.num_cpu.set(clamp(in_memory.len() - gpu));
        // The cap keeps what a router needs most: device-pool residency, then pinned
        // adapters, then (in name order, a stable choice between scrapes) the rest.
        in_memory.sort_by(|(a, la), (b, lb)| {
            (*la != "gpu", !a.pinned, &a.key).cmp(&(*lb != "gpu", !b.pinned, &b.key))
        });
        self.omitted
            .set(clamp(in_memory.len().saturating_sub(MAX_ADAPTER_SERIES)));
        self.loaded.reset();
        for (a, level) in in_memory.into_iter().take(MAX_ADAPTER_SERIES) {
            self.loaded
                .with_label_values(&[
                    identity.label(&a.key).as_str(),
                    level,
                    if a.pinned { "true" } else { "false" },
                ])
                .set(1.0);
        }
    }
}
