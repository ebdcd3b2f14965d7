//! Every metric the agent exports, in one place, with the conventions: prefix `loraplane_`,
//! `_total` on counters, unit suffixes (`_seconds`, `_bytes`, `_pages`), and bounded labels only
//! (an API surface, an error kind, a page kind, a configured tenant id — never prompt text,
//! never an error message).
//!
//! Two kinds of series:
//! - request-path series (latency histograms, token and error counters) are recorded by the
//!   API layer as requests flow;
//! - engine mirrors (queue sizes, pool pages, adapter cache counters) are refreshed from
//!   [`EngineStats`] on every scrape, so they are exact at scrape time and cost nothing between.
//!
//! The Kubernetes Gateway API Inference Extension's endpoint picker reads vLLM's names (its
//! "model server protocol"): `vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc` (KV-cache
//! utilisation, 0..1) and the `vllm:lora_requests_info` gauge, whose value is the update time
//! and whose labels `running_lora_adapters` / `waiting_lora_adapters` (comma-separated adapter
//! names) and `max_lora` describe adapter residency. They are exported alongside ours.
//!
//! The router signals llm-d's `lora-load-state-scorer` reads (`vllm:lora_adapter_loaded` and
//! its companions) are in [`router`], with their bound.
//!
//! Adapter names are tenants' data: the agent serves metrics on their own listener
//! (`--metrics-addr`, loopback by default), never on the API port, and
//! `--metrics-adapter-identity id` replaces the names in `vllm:lora_requests_info` with opaque
//! per-adapter ids ([`AdapterIdentity`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::{AdapterTransition, EngineStats, StepObserver};
use crate::lora::ids::TenantId;
use crate::lora::registry::AdapterSummary;

pub mod router;

/// Registers `c` with `r` and hands it back.
fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: C,
) -> Result<C, MetricsError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A count as a gauge value, saturating at `i64::MAX`.
fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Metric names (one place, so dashboards and tests can refer to them).
pub mod names {
    pub const TIME_TO_FIRST_TOKEN: &str = "loraplane_time_to_first_token_seconds";
    pub const INTER_TOKEN_LATENCY: &str = "loraplane_inter_token_latency_seconds";
    pub const REQUEST_DURATION: &str = "loraplane_request_duration_seconds";
    pub const REQUESTS: &str = "loraplane_requests_total";
    pub const ERRORS: &str = "loraplane_errors_total";
    pub const PROMPT_TOKENS: &str = "loraplane_prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "loraplane_generation_tokens_total";
    pub const REQUESTS_IN_FLIGHT: &str = "loraplane_requests_in_flight";
    pub const REQUESTS_RUNNING: &str = "loraplane_requests_running";
    pub const REQUESTS_WAITING: &str = "loraplane_requests_waiting";
    pub const BATCH_TOKENS: &str = "loraplane_batch_tokens";
    pub const STEP_DURATION: &str = "loraplane_step_duration_seconds";
    pub const STEPS: &str = "loraplane_engine_steps_total";
    pub const PREEMPTIONS: &str = "loraplane_preemptions_total";
    pub const POOL_CAPACITY: &str = "loraplane_pool_capacity_pages";
    pub const POOL_FREE: &str = "loraplane_pool_free_pages";
    pub const POOL_USED: &str = "loraplane_pool_used_pages";
    pub const POOL_PAGE_BYTES: &str = "loraplane_pool_page_bytes";
    pub const ADAPTERS: &str = "loraplane_adapters";
    pub const ADAPTERS_RESIDENT: &str = "loraplane_adapters_resident";
    pub const ADAPTER_LOADS: &str = "loraplane_adapter_loads_total";
    pub const ADAPTER_EVICTIONS: &str = "loraplane_adapter_evictions_total";
    pub const ADAPTER_HOST_HITS: &str = "loraplane_adapter_host_cache_hits_total";
    pub const ADAPTER_HOST_MISSES: &str = "loraplane_adapter_host_cache_misses_total";
    pub const HOST_CACHE_USED: &str = "loraplane_adapter_host_cache_used_bytes";
    pub const HOST_CACHE_CAPACITY: &str = "loraplane_adapter_host_cache_capacity_bytes";
    pub const DRAINING: &str = "loraplane_draining";
    pub const RATE_LIMITED: &str = "loraplane_rate_limited_total";
    /// Prefix cache, in prompt tokens (counted at each request's first admission).
    pub const PREFIX_QUERIES: &str = "loraplane_prefix_cache_queried_tokens_total";
    pub const PREFIX_HITS: &str = "loraplane_prefix_cache_hit_tokens_total";
    /// The same counters under vLLM's names (`vllm:prefix_cache_queries` / `_hits`, tokens).
    pub const VLLM_PREFIX_QUERIES: &str = "vllm:prefix_cache_queries_total";
    pub const VLLM_PREFIX_HITS: &str = "vllm:prefix_cache_hits_total";
    /// Gateway API Inference Extension model-server protocol (vLLM names).
    pub const VLLM_WAITING: &str = "vllm:num_requests_waiting";
    pub const VLLM_RUNNING: &str = "vllm:num_requests_running";
    pub const VLLM_KV_USAGE: &str = "vllm:gpu_cache_usage_perc";
    pub const VLLM_LORA_INFO: &str = "vllm:lora_requests_info";

    /// Disaggregated serving (exported by `prefill` and `decode` agents only).
    pub const KV_BYTES: &str = "loraplane_kv_transfer_bytes_total";
    pub const KV_SECONDS: &str = "loraplane_kv_transfer_seconds_total";
    pub const KV_TRANSFERS: &str = "loraplane_kv_transfers_total";
    pub const KV_FAILURES: &str = "loraplane_kv_transfer_failures_total";
    pub const PREFILLS: &str = "loraplane_prefills_total";
    pub const QUEUED_PREFILL_TOKENS: &str = "loraplane_queued_prefill_tokens";
    pub const ROLE: &str = "loraplane_role_info";

    /// Every name above, for tests that check a scrape has them all.
    pub const ALL: &[&str] = &[
        TIME_TO_FIRST_TOKEN,
        INTER_TOKEN_LATENCY,
        REQUEST_DURATION,
        REQUESTS,
        ERRORS,
        PROMPT_TOKENS,
        GENERATION_TOKENS,
        REQUESTS_IN_FLIGHT,
        REQUESTS_RUNNING,
        REQUESTS_WAITING,
        BATCH_TOKENS,
        STEP_DURATION,
        STEPS,
        PREEMPTIONS,
        POOL_CAPACITY,
        POOL_FREE,
        POOL_USED,
        POOL_PAGE_BYTES,
        ADAPTERS,
        ADAPTERS_RESIDENT,
        ADAPTER_LOADS,
        ADAPTER_EVICTIONS,
        ADAPTER_HOST_HITS,
        ADAPTER_HOST_MISSES,
        HOST_CACHE_USED,
        HOST_CACHE_CAPACITY,
        DRAINING,
        RATE_LIMITED,
        PREFIX_QUERIES,
        PREFIX_HITS,
        VLLM_PREFIX_QUERIES,
        VLLM_PREFIX_HITS,
        VLLM_WAITING,
        VLLM_RUNNING,
        VLLM_KV_USAGE,
        VLLM_LORA_INFO,
    ];
}

/// Which API a request came through (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Grpc,
    Completions,
    ChatCompletions,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Grpc => "grpc",
            Surface::Completions => "completions",
            Surface::ChatCompletions => "chat_completions",
        }
    }
}

/// Cumulative engine counters at the previous refresh, to advance Prometheus counters by the
/// difference (the engine keeps totals; Prometheus counters only go up by increments).
#[derive(Debug, Default)]
struct Seen {
    steps: u64,
    preemptions: u64,
    loads: u64,
    evictions: u64,
    hits: u64,
    misses: u64,
    prefix_queries: u64,
    prefix_hits: u64,
}

/// The agent's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub duration: Histogram,
    requests: IntCounterVec,
    errors: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    pub in_flight: IntGauge,
    batch_tokens: Histogram,
    step_duration: Histogram,
    steps: IntCounter,
    preemptions: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    pool_capacity: IntGauge,
    pool_free: IntGauge,
    pool_used: IntGaugeVec,
    page_bytes: IntGauge,
    adapters: IntGauge,
    adapters_resident: IntGauge,
    adapter_loads: IntCounter,
    adapter_evictions: IntCounter,
    host_hits: IntCounter,
    host_misses: IntCounter,
    host_used: IntGauge,
    host_capacity: IntGauge,
    draining: IntGauge,
    rate_limited: IntCounterVec,
    prefix_queries: [IntCounter; 2],
    prefix_hits: [IntCounter; 2],
    vllm_waiting: IntGauge,
    vllm_running: IntGauge,
    vllm_kv_usage: Gauge,
    vllm_lora_info: GaugeVec,
    seen: Mutex<Seen>,
    adapter_identity: AdapterIdentity,
    router: router::RouterMetrics,
}

const PREFIX_QUERIES_HELP: &str = "Prompt tokens looked up in the prefix cache.";
const PREFIX_HITS_HELP: &str = "Prompt tokens whose KV came from the prefix cache.";

/// Latency buckets from 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// What identifies an adapter in the router series (`vllm:lora_requests_info`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterIdentity {
    /// The adapter's name, as clients send it in `model` (what the Gateway API Inference
    /// Extension's endpoint picker matches).
    #[default]
    Name,
    /// An opaque id per (tenant, adapter): `lora-` and the first 16 hex digits of
    /// SHA-256(`tenant/name`). Stable across agents, so a router can be configured with it;
    /// not a secret (a guessed name can be checked against it).
    Id,
}

impl AdapterIdentity {
    /// The label value for `key`.
    pub fn label(self, key: &crate::lora::ids::AdapterKey) -> String {
        match self {
            AdapterIdentity::Name => key.name.clone(),
            AdapterIdentity::Id => {
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(format!("{}/{}", key.tenant.0, key.name));
                format!("lora-{}", &hex::encode(digest)[..16])
            }
        }
    }
}

/// Why the registry could not be built (a duplicate or malformed name: a programming error
/// caught by the unit test below).
pub type MetricsError = prometheus::Error;

impl Metrics {
    /// The registry, naming adapters by name in the router series.
    pub fn new() -> Result<Arc<Self>, MetricsError> {
        Self::with_adapter_identity(AdapterIdentity::Name)
    }

    /// The registry, identifying adapters in the router series as `identity` says.
    pub fn with_adapter_identity(
        adapter_identity: AdapterIdentity,
    ) -> Result<Arc<Self>, MetricsError> {
        use names::*;
        let r = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        };
        let int_gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let m = Metrics {
            ttft: reg(
                &r,
                hist(
                    TIME_TO_FIRST_TOKEN,
                    "Time from a request's arrival to its first generated token.",
                    LATENCY_BUCKETS,
                )?,
            )?,
            inter_token: reg(
                &r,
                hist(
                    INTER_TOKEN_LATENCY,
                    "Time between consecutive generated tokens of a request.",
                    LATENCY_BUCKETS,
                )?,
            )?,
            duration: reg(
                &r,
                hist(
                    REQUEST_DURATION,
                    "End-to-end time of a generation request, arrival to last token.",
                    DURATION_BUCKETS,
                )?,
            )?,
            requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(REQUESTS, "Generation requests accepted, by API and tenant."),
                    &["api", "tenant"],
                )?,
            )?,
            errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(ERRORS, "Requests refused or failed, by API and error kind."),
                    &["api", "kind"],
                )?,
            )?,
            prompt_tokens: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        PROMPT_TOKENS,
                        "Prompt tokens of accepted requests, by tenant.",
                    ),
                    &["tenant"],
                )?,
            )?,
            generation_tokens: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(GENERATION_TOKENS, "Tokens generated, by tenant."),
                    &["tenant"],
                )?,
            )?,
            in_flight: reg(
                &r,
                int_gauge(
                    REQUESTS_IN_FLIGHT,
                    "Generation requests between acceptance and their last byte.",
                )?,
            )?,
            batch_tokens: reg(
                &r,
                hist(
                    BATCH_TOKENS,
                    "Tokens computed per engine step (prefill chunks plus decodes).",
                    BATCH_BUCKETS,
                )?,
            )?,
            step_duration: reg(
                &r,
                hist(
                    STEP_DURATION,
                    "Wall time of one engine step.",
                    LATENCY_BUCKETS,
                )?,
            )?,
            steps: reg(&r, counter(STEPS, "Engine steps run.")?)?,
            preemptions: reg(
                &r,
                counter(PREEMPTIONS, "Sequences preempted (recomputed) for memory.")?,
            )?,
            running: reg(
                &r,
                int_gauge(REQUESTS_RUNNING, "Sequences in the running batch.")?,
            )?,
            waiting: reg(
                &r,
                int_gauge(REQUESTS_WAITING, "Sequences queued for admission.")?,
            )?,
            pool_capacity: reg(
                &r,
                int_gauge(POOL_CAPACITY, "Pages in the unified memory pool.")?,
            )?,
            pool_free: reg(&r, int_gauge(POOL_FREE, "Free pages of the unified pool.")?)?,
            pool_used: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        POOL_USED,
                        "Used pages of the unified pool, by what they hold.",
                    ),
                    &["kind"],
                )?,
            )?,
            page_bytes: reg(
                &r,
                int_gauge(POOL_PAGE_BYTES, "Bytes per page of the unified pool.")?,
            )?,
            adapters: reg(
                &r,
                int_gauge(ADAPTERS, "Adapters registered on this agent.")?,
            )?,
            adapters_resident: reg(
                &r,
                int_gauge(
                    ADAPTERS_RESIDENT,
                    "Adapters with weights in the device pool.",
                )?,
            )?,
            adapter_loads: reg(
                &r,
                counter(ADAPTER_LOADS, "Adapter copies into the device pool.")?,
            )?,
            adapter_evictions: reg(
                &r,
                counter(ADAPTER_EVICTIONS, "Adapters evicted from the device pool.")?,
            )?,
            host_hits: reg(
                &r,
                counter(
                    ADAPTER_HOST_HITS,
                    "Requests whose adapter was already in the host cache or the pool.",
                )?,
            )?,
            host_misses: reg(
                &r,
                counter(
                    ADAPTER_HOST_MISSES,
                    "Requests whose adapter had to be reloaded from its source.",
                )?,
            )?,
            prefix_queries: [
                reg(&r, counter(PREFIX_QUERIES, PREFIX_QUERIES_HELP)?)?,
                reg(&r, counter(VLLM_PREFIX_QUERIES, PREFIX_QUERIES_HELP)?)?,
            ],
            prefix_hits: [
                reg(&r, counter(PREFIX_HITS, PREFIX_HITS_HELP)?)?,
                reg(&r, counter(VLLM_PREFIX_HITS, PREFIX_HITS_HELP)?)?,
            ],
            host_used: reg(
                &r,
                int_gauge(
                    HOST_CACHE_USED,
                    "Bytes of adapter weights in the host cache.",
                )?,
            )?,
            host_capacity: reg(
                &r,
                int_gauge(HOST_CACHE_CAPACITY, "Bound of the host adapter cache.")?,
            )?,
            draining: reg(
                &r,
                int_gauge(DRAINING, "1 while the agent drains before shutting down.")?,
            )?,
            rate_limited: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        RATE_LIMITED,
                        "Requests refused with 429 / RESOURCE_EXHAUSTED by a tenant limit, by tenant.",
                    ),
                    &["tenant"],
                )?,
            )?,
            vllm_waiting: reg(
                &r,
                int_gauge(VLLM_WAITING, "Requests waiting (model-server protocol).")?,
            )?,
            vllm_running: reg(
                &r,
                int_gauge(VLLM_RUNNING, "Requests running (model-server protocol).")?,
            )?,
            vllm_kv_usage: reg(
                &r,
                Gauge::new(
                    VLLM_KV_USAGE,
                    "KV-cache utilisation, 0..1: pool pages holding KV over all pages.",
                )?,
            )?,
            vllm_lora_info: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        VLLM_LORA_INFO,
                        "LoRA residency (model-server protocol); the value is the update time.",
                    ),
                    &["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                )?,
            )?,
            router: router::RouterMetrics::register(&r)?,
            registry: r,
            seen: Mutex::new(Seen::default()),
            adapter_identity,
        };
        Ok(Arc::new(m))
    }

    pub fn request(&self, surface: Surface, tenant: &str) {
        self.requests
            .with_label_values(&[surface.as_str(), tenant])
            .inc();
    }

    /// Counts a refused or failed request; `kind` must be a bounded error kind.
    pub fn error(&self, surface: Surface, kind: &'static str) {
        self.errors
            .with_label_values(&[surface.as_str(), kind])
            .inc();
    }

    pub fn prompt_tokens(&self, tenant: &str, n: usize) {
        self.prompt_tokens
            .with_label_values(&[tenant])
            .inc_by(n as u64);
    }

    pub fn generated_tokens(&self, tenant: &str, n: usize) {
        self.generation_tokens
            .with_label_values(&[tenant])
            .inc_by(n as u64);
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// Exports each tenant's rate-limit count at 0 before its first refusal, so dashboards and
    /// alerts read 0 rather than no data.
    pub fn tenants_known(&self, tenants: &[TenantId]) {
        for t in tenants {
            let _ = self.rate_limited.with_label_values(&[t.0.as_str()]);
        }
    }

    /// Counts a request a tenant limit refused (429 / `RESOURCE_EXHAUSTED`).
    pub fn rate_limited(&self, tenant: &str) {
        self.rate_limited.with_label_values(&[tenant]).inc();
    }

    /// The KV cache's fixed geometry (`vllm:cache_config_info`) and the distinct adapters one
    /// batch may hold (`vllm:max_gpu_lora_adapters`); set once at start-up.
    pub fn set_cache_config(&self, block_size: usize, num_gpu_blocks: usize, max_lora: usize) {
        self.router
            .set_cache_config(block_size, num_gpu_blocks, max_lora);
    }

    /// Rebuilds the per-adapter router series (bounded by [`router::MAX_ADAPTER_SERIES`]).
    pub fn refresh_adapters(&self, adapters: &[AdapterSummary]) {
        self.router
            .refresh_adapters(adapters, self.adapter_identity);
    }

    /// Mirrors engine statistics into the gauges and advances the mirrored counters.
    /// `max_lora` is the number of distinct adapters a batch may hold.
    pub fn refresh(&self, s: &EngineStats, max_lora: usize) {
        self.running.set(clamp(s.running));
        self.waiting.set(clamp(s.waiting));
        self.vllm_running.set(clamp(s.running));
        self.vllm_waiting.set(clamp(s.waiting));
        self.pool_capacity.set(i64::from(s.pool.total));
        self.pool_free.set(i64::from(s.pool.free));
        self.pool_used
            .with_label_values(&["kv"])
            .set(i64::from(s.pool.kv));
        self.pool_used
            .with_label_values(&["adapter"])
            .set(i64::from(s.pool.adapter));
        self.pool_used
            .with_label_values(&["prefix_cache"])
            .set(i64::from(s.pool.cached));
        self.page_bytes.set(clamp(s.page_bytes));
        self.adapters.set(clamp(s.adapters));
        self.adapters_resident.set(clamp(s.device_resident.len()));
        self.host_used.set(clamp(s.host_cache_used));
        self.host_capacity.set(clamp(s.host_cache_capacity));
        let kv_usage = if s.pool.total == 0 {
            0.0
        } else {
            f64::from(s.pool.kv) / f64::from(s.pool.total)
        };
        self.vllm_kv_usage.set(kv_usage);
        self.router.kv_usage.set(kv_usage);

        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Advances `last` to `now` and returns by how much the counters mirroring it grow.
        let advance = |last: &mut u64, now: u64| {
            let delta = now.saturating_sub(*last);
            *last = now.max(*last);
            delta
        };
        self.steps.inc_by(advance(&mut seen.steps, s.steps));
        self.preemptions
            .inc_by(advance(&mut seen.preemptions, s.preemptions));
        self.adapter_loads
            .inc_by(advance(&mut seen.loads, s.adapter_device_loads));
        self.adapter_evictions
            .inc_by(advance(&mut seen.evictions, s.adapter_device_evictions));
        self.host_hits
            .inc_by(advance(&mut seen.hits, s.adapter_host_hits));
        self.host_misses
            .inc_by(advance(&mut seen.misses, s.adapter_host_misses));
        let queried = advance(&mut seen.prefix_queries, s.prefix.queried_tokens);
        for c in &self.prefix_queries {
            c.inc_by(queried);
        }
        let hit = advance(&mut seen.prefix_hits, s.prefix.hit_tokens);
        for c in &self.prefix_hits {
            c.inc_by(hit);
        }
        drop(seen);

        // One series only: the label values change with residency, so drop the old one.
        let names = |keys: &[crate::lora::ids::AdapterKey]| {
            let mut v: Vec<String> = keys
                .iter()
                .map(|k| self.adapter_identity.label(k))
                .collect();
            v.sort_unstable();
            v.dedup();
            v.join(",")
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        self.vllm_lora_info.reset();
        self.vllm_lora_info
            .with_label_values(&[
                names(&s.running_adapters).as_str(),
                names(&s.waiting_adapters).as_str(),
                max_lora.to_string().as_str(),
            ])
            .set(now);
    }

    /// Adds a collector to the registry (e.g. the disaggregation counters of a prefill or
    /// decode agent).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> Result<(), MetricsError> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Feeds the engine's per-step facts into the metrics (runs on the engine thread).
#[derive(Debug)]
pub struct StepMetrics(pub Arc<Metrics>);

impl StepObserver for StepMetrics {
    fn on_step(&self, batch_tokens: usize, elapsed: Duration) {
        self.0.batch_tokens.observe(batch_tokens as f64);
        self.0.step_duration.observe(elapsed.as_secs_f64());
    }

    fn on_adapter_load(&self, transition: AdapterTransition, elapsed: Duration) {
        self.0
            .router
            .observe_load(transition, elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_registered_and_rendered() {
        let m = Metrics::new().expect("valid registry");
        m.request(Surface::Grpc, "default");
        m.error(Surface::Completions, "invalid_argument");
        m.prompt_tokens("default", 3);
        m.generated_tokens("default", 2);
        m.ttft.observe(0.01);
        m.inter_token.observe(0.01);
        m.duration.observe(0.1);
        StepMetrics(m.clone()).on_step(4, Duration::from_millis(2));
        let stats = EngineStats {
            pool: crate::memory::pool::PoolStats {
                total: 10,
                free: 7,
                kv: 2,
                adapter: 1,
                cached: 0,
            },
            prefix: crate::engine::PrefixStats {
                queried_tokens: 40,
                hit_tokens: 16,
                blocks: 1,
            },
            page_bytes: 4096,
            waiting: 1,
            running: 2,
            queued_prefill_tokens: 0,
            steps: 5,
            preemptions: 0,
            utilisation_at_first_preemption: None,
            tokens_generated: 9,
            last_batch_tokens: 4,
            host_cache_used: 1,
            host_cache_capacity: 2,
            adapter_host_hits: 1,
            adapter_host_misses: 0,
            adapter_device_loads: 1,
            adapter_device_evictions: 0,
            adapters: 1,
            device_resident: vec![],
            running_adapters: vec![crate::lora::ids::AdapterKey::new("t", "b")],
            waiting_adapters: vec![],
            adapter_requests: vec![],
        };
        m.refresh(&stats, 8);
        m.refresh(&stats, 8);
        m.rate_limited("default");
        m.set_cache_config(16, 5, 8);
        StepMetrics(m.clone())
            .on_adapter_load(AdapterTransition::HostToDevice, Duration::from_millis(3));
        let text = m.render();
        for name in names::ALL.iter().chain(router::ALL) {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            text.contains(r#"vllm:cache_config_info{block_size="16",num_gpu_blocks="5"} 1"#),
            "{text}"
        );
        assert!(text.contains("loraplane_engine_steps_total 5"), "{text}");
        assert!(
            text.contains("loraplane_prefix_cache_hit_tokens_total 16")
                && text.contains("vllm:prefix_cache_queries_total 40"),
            "{text}"
        );
        assert!(text.contains("vllm:gpu_cache_usage_perc 0.2"), "{text}");
        assert!(
            text.contains(r#"running_lora_adapters="b""#) && text.contains(r#"max_lora="8""#),
            "{text}"
        );
    }

    #[test]
    fn opaque_adapter_ids_hide_names() {
        let key = crate::lora::ids::AdapterKey::new("team-a", "secret-sauce");
        let id = AdapterIdentity::Id.label(&key);
        assert_eq!(id.len(), "lora-".len() + 16);
        assert!(!id.contains("secret") && !id.contains("team"), "{id}");
        assert_eq!(id, AdapterIdentity::Id.label(&key.clone()));
        let other = crate::lora::ids::AdapterKey::new("team-b", "secret-sauce");
        assert_ne!(id, AdapterIdentity::Id.label(&other));
        assert_eq!(AdapterIdentity::Name.label(&key), "secret-sauce");
    }
}
