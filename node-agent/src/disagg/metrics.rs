//! Disaggregation metrics as a Prometheus collector that reads [`DisaggStats`]' atomics at
//! scrape time (names in [`crate::metrics::names`]): KV bytes and seconds transferred,
//! transfers, failures by kind, prefills by where they ran, queued prefill tokens, the role.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::disagg::config::Role;
use crate::disagg::stats::DisaggStats;
use crate::metrics::names;

/// The collector; `queued_prefill_tokens` is kept fresh by the caller (from engine stats).
#[derive(Debug)]
pub struct DisaggCollector {
    stats: Arc<DisaggStats>,
    role: Role,
    pub queued_prefill_tokens: Arc<AtomicU64>,
    descs: Vec<Desc>,
}

fn bytes_vec() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(names::KV_BYTES, "KV-cache bytes moved between agents."),
        &["direction"],
    )
}
fn seconds() -> prometheus::Result<Counter> {
    Counter::new(
        names::KV_SECONDS,
        "Seconds decode agents spent receiving KV streams.",
    )
}
fn transfers() -> prometheus::Result<IntCounter> {
    IntCounter::new(names::KV_TRANSFERS, "Complete KV transfers received.")
}
fn failures() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(names::KV_FAILURES, "Failed remote prefills, by kind."),
        &["kind"],
    )
}
fn prefills() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(
            names::PREFILLS,
            "Prompts prefilled, by where: remote, local, served.",
        ),
        &["where"],
    )
}
fn queued() -> prometheus::Result<IntGauge> {
    IntGauge::new(
        names::QUEUED_PREFILL_TOKENS,
        "Prompt tokens admitted or waiting but not yet computed.",
    )
}
fn role_info() -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(
        Opts::new(names::ROLE, "1, labelled with the agent's role."),
        &["role"],
    )
}

impl DisaggCollector {
    pub fn new(stats: Arc<DisaggStats>, role: Role) -> prometheus::Result<Self> {
        let mut descs = Vec::new();
        descs.extend(bytes_vec()?.desc().into_iter().cloned());
        descs.extend(seconds()?.desc().into_iter().cloned());
        descs.extend(transfers()?.desc().into_iter().cloned());
        descs.extend(failures()?.desc().into_iter().cloned());
        descs.extend(prefills()?.desc().into_iter().cloned());
        descs.extend(queued()?.desc().into_iter().cloned());
        descs.extend(role_info()?.desc().into_iter().cloned());
        Ok(DisaggCollector {
            stats,
            role,
            queued_prefill_tokens: Arc::new(AtomicU64::new(0)),
            descs,
        })
    }

    fn families(&self) -> prometheus::Result<Vec<MetricFamily>> {
        let s = &self.stats;
        let mut out = Vec::new();
        let b = bytes_vec()?;
        b.with_label_values(&["sent"])
            .inc_by(s.bytes_sent.load(Ordering::Relaxed));
        b.with_label_values(&["received"])
            .inc_by(s.bytes_received.load(Ordering::Relaxed));
        out.extend(b.collect());
        let sec = seconds()?;
        sec.inc_by(s.transfer_us.load(Ordering::Relaxed) as f64 / 1e6);
        out.extend(sec.collect());
        let t = transfers()?;
        t.inc_by(s.transfers.load(Ordering::Relaxed));
        out.extend(t.collect());
        let f = failures()?;
        // Every kind appears (at zero), so dashboards and alerts have the series.
        for kind in [
            "corrupt",
            "truncated",
            "layout",
            "chunk_limit",
            "unavailable",
            "status",
            "timeout",
            "tls",
            "connect",
        ] {
            f.with_label_values(&[kind]);
        }
        for (kind, n) in s.failures() {
            f.with_label_values(&[kind]).inc_by(n);
        }
        out.extend(f.collect());
        let p = prefills()?;
        p.with_label_values(&["remote"])
            .inc_by(s.remote_prefills.load(Ordering::Relaxed));
        p.with_label_values(&["local"])
            .inc_by(s.local_prefills.load(Ordering::Relaxed));
        p.with_label_values(&["served"])
            .inc_by(s.prefills_served.load(Ordering::Relaxed));
        out.extend(p.collect());
        let q = queued()?;
        q.set(
            i64::try_from(self.queued_prefill_tokens.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        );
        out.extend(q.collect());
        let r = role_info()?;
        r.with_label_values(&[self.role.as_str()]).set(1);
        out.extend(r.collect());
        Ok(out)
    }
}

impl Collector for DisaggCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families().unwrap_or_else(|e| {
            tracing::error!(error = %e, "collecting disaggregation metrics failed");
            Vec::new()
        })
    }
}
