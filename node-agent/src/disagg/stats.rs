//! Counters of disaggregated serving. The transfer paths bump atomics and never wait for a lock
//! (the failure counts alone sit behind a mutex, taken only when a transfer fails);
//! `disagg::metrics::DisaggCollector` reads them at scrape time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct DisaggStats {
    /// KV bytes streamed to decode agents (prefill side).
    pub bytes_sent: AtomicU64,
    /// KV bytes received from prefill agents (decode side).
    pub bytes_received: AtomicU64,
    /// Time spent receiving complete KV streams, in microseconds (decode side).
    pub transfer_us: AtomicU64,
    /// Complete KV streams received (decode side).
    pub transfers: AtomicU64,
    /// Prefills this agent started for decode agents (prefill side).
    pub prefills_served: AtomicU64,
    /// Requests prefilled by a peer / here (decode side).
    pub remote_prefills: AtomicU64,
    pub local_prefills: AtomicU64,
    /// Failed remote prefills by kind (a bounded set: `TransferError::kind` and the transport's
    /// kinds).
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
