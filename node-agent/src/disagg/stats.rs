//! Counters of disaggregated serving, kept with atomics so the transfer paths stay lock-free;
//! the metrics module reads them on scrape.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct DisaggStats {
    /// KV bytes sent (prefill side) or received (decode side).
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Total seconds spent receiving KV streams, in microseconds.
    pub transfer_us: AtomicU64,
    pub transfers: AtomicU64,
    pub prefills_served: AtomicU64,
    pub remote_prefills: AtomicU64,
    pub local_prefills: AtomicU64,
    /// Failures by kind (bounded set of labels from `TransferError::kind` and transport kinds).
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

impl DisaggStats {
    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn prefill_started(&self) {
        self.prefills_served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn received(&self, bytes: u64, micros: u64) {
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.transfer_us.fetch_add(micros, Ordering::Relaxed);
        self.transfers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&self, kind: &'static str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *f.entry(kind).or_default() += 1;
    }

    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
