//! Every metric the operator exports, in one place, with the project's conventions: prefix
//! `loraplane_operator_`, `_total` on counters, `_seconds` on durations, and bounded labels
//! only (a controller name, an error kind, an Admin method, an outcome, a phase — never an
//! object name or an error message).

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Metric names.
pub mod names {
    pub const RECONCILES: &str = "loraplane_operator_reconciles_total";
    pub const RECONCILE_ERRORS: &str = "loraplane_operator_reconcile_errors_total";
    pub const RECONCILE_DURATION: &str = "loraplane_operator_reconcile_duration_seconds";
    pub const AGENT_CALLS: &str = "loraplane_operator_agent_calls_total";
    pub const AGENT_CALL_DURATION: &str = "loraplane_operator_agent_call_duration_seconds";
    pub const WRITES: &str = "loraplane_operator_kube_writes_total";
    pub const ADAPTERS: &str = "loraplane_operator_adapters";
    pub const LEADER: &str = "loraplane_operator_leader";
}

/// The controllers, as the `controller` label names them.
pub mod controllers {
    pub const BASE_MODEL: &str = "basemodel";
    pub const LORA_ADAPTER: &str = "loraadapter";
}

/// The operator's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    reconciles: IntCounterVec,
    reconcile_errors: IntCounterVec,
    reconcile_duration: HistogramVec,
    agent_calls: IntCounterVec,
    agent_call_duration: HistogramVec,
    writes: IntCounterVec,
    adapters: IntGaugeVec,
    leader: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("metric {name} is well formed: {e}"));
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|e| unreachable!("metric {name} is well formed: {e}"));
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        let reconciles = counter(names::RECONCILES, "Reconciles run.", &["controller"]);
        let reconcile_errors = counter(
            names::RECONCILE_ERRORS,
            "Reconciles that failed, by error kind.",
            &["controller", "kind"],
        );
        let reconcile_duration = histogram(
            names::RECONCILE_DURATION,
            "Reconcile wall time.",
            &["controller"],
            vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
            ],
        );
        let agent_calls = counter(
            names::AGENT_CALLS,
            "Admin API calls to agents, by method and outcome (ok or an error kind).",
            &["method", "outcome"],
        );
        let agent_call_duration = histogram(
            names::AGENT_CALL_DURATION,
            "Admin API call wall time.",
            &["method"],
            vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
            ],
        );
        let writes = counter(
            names::WRITES,
            "Writes to the Kubernetes API, by kind of write.",
            &["verb"],
        );
        let adapters = IntGaugeVec::new(
            Opts::new(
                names::ADAPTERS,
                "LoraAdapters by phase, as last reconciled.",
            ),
            &["phase"],
        )
        .unwrap_or_else(|e| unreachable!("metric is well formed: {e}"));
        let _ = registry.register(Box::new(adapters.clone()));
        let leader = IntGauge::new(
            names::LEADER,
            "1 while this replica holds the leader Lease.",
        )
        .unwrap_or_else(|e| unreachable!("metric is well formed: {e}"));
        let _ = registry.register(Box::new(leader.clone()));
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            agent_calls,
            agent_call_duration,
            writes,
            adapters,
            leader,
        }
    }

    pub fn reconciled(&self, controller: &str, took: Duration) {
        self.reconciles.with_label_values(&[controller]).inc();
        self.reconcile_duration
            .with_label_values(&[controller])
            .observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self, controller: &str, kind: &str) {
        self.reconcile_errors
            .with_label_values(&[controller, kind])
            .inc();
    }

    pub fn agent_call(&self, method: &str, outcome: &str, took: Duration) {
        self.agent_calls.with_label_values(&[method, outcome]).inc();
        self.agent_call_duration
            .with_label_values(&[method])
            .observe(took.as_secs_f64());
    }

    /// A write to the Kubernetes API (`apply`, `create`, `delete`, `status`, `event`, `finalizer`).
    pub fn wrote(&self, verb: &str) {
        self.writes.with_label_values(&[verb]).inc();
    }

    pub fn set_adapters(&self, phase: &str, n: i64) {
        self.adapters.with_label_values(&[phase]).set(n);
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Writes of one verb so far (tests and the benchmark read it).
    pub fn writes(&self, verb: &str) -> u64 {
        self.writes.with_label_values(&[verb]).get()
    }

    /// Agent calls of one method and outcome so far.
    pub fn agent_calls(&self, method: &str, outcome: &str) -> u64 {
        self.agent_calls.with_label_values(&[method, outcome]).get()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
