//! What the scheduler sees of the engine: plain data copied (or borrowed) from the engine's
//! sequences, adapter registry and page pool just before a step. No pages, channels or model.

use std::collections::HashMap;

use crate::lora::ids::{AdapterKey, TenantId};
use crate::memory::prefix::{BlockHash, PrefixCache};

/// A sequence's identity inside one engine (assigned at submission, never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}

/// One sequence as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqState<'a> {
    pub id: SeqId,
    pub tenant: &'a TenantId,
    /// The adapters it applies (empty: the base model); composed adapters all stay resident
    /// while it runs.
    pub adapters: &'a [AdapterKey],
    /// Prompt plus generated tokens.
    pub tokens: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Tokens whose KV is in the pool (0 for a waiting sequence).
    pub computed: usize,
    /// Private KV pages it holds (0 for a waiting sequence).
    pub pages: usize,
    /// Pages of prefix-cache blocks it reads (0 for a waiting sequence). They stay cached when
    /// it lets go of them.
    pub shared_pages: usize,
    /// Keys of its full blocks, first to last, when it may reuse cached blocks (empty
    /// otherwise). Only waiting sequences' keys are read.
    pub prefix: &'a [BlockHash],
    /// Admission order of a running sequence: the largest is the newest, preempted first.
    pub admitted: u64,
    /// Its prompt's KV was computed elsewhere and is written into the pool at admission.
    pub importing: bool,
    /// Of an importing sequence: its first blocks, which the import leaves out because the
    /// prefix cache holds them (pinned for it); exactly these are reused at admission.
    pub import_cached: usize,
}

impl SeqState<'_> {
    /// Tokens still to compute before its next sample.
    pub fn remaining(&self) -> usize {
        debug_assert!(self.computed <= self.tokens, "{self:?}");
        self.tokens.saturating_sub(self.computed)
    }
}

/// One adapter of the registry as the scheduler sees it. How many sequences use it, and how
/// many of those run, the scheduler counts from the sequences themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterState {
    /// Its weights are in host memory, so it can be placed in the pool.
    pub host_ready: bool,
    /// Pool pages it holds when resident.
    pub resident: Option<usize>,
    /// Pool pages placing its host weights takes (`None`: not loaded, or cannot be placed).
    pub placement: Option<usize>,
    /// Being unloaded: it is forgotten (and its pages freed) when its last sequence ends.
    pub unloading: bool,
    /// When an admission last used it; evictions take the smallest first.
    pub last_used: u64,
}

impl AdapterState {
    /// Test fixture: loaded and resident, holding `pages` pages.
    #[cfg(test)]
    pub(crate) fn resident(pages: usize, last_used: u64) -> AdapterState {
        AdapterState {
            host_ready: true,
            resident: Some(pages),
            placement: Some(pages),
            unloading: false,
            last_used,
        }
    }

    /// Whether a sequence on it can be admitted at all: its weights are somewhere.
    pub fn usable(&self) -> bool {
        self.host_ready || self.resident.is_some()
    }
}

/// Everything one step's plan depends on besides the fixed [`Limits`] and the fairness counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot<'a> {
    /// Running sequences (any order; the plan goes oldest admission first).
    pub running: Vec<SeqState<'a>>,
    /// Waiting sequences, first in line first.
    pub waiting: Vec<SeqState<'a>>,
    /// Every adapter the registry knows (resident idle ones are eviction candidates).
    pub adapters: HashMap<&'a AdapterKey, AdapterState>,
    /// Free pages of the unified pool.
    pub free_pages: usize,
    /// The prefix cache: its idle blocks are eviction candidates beside idle adapters, and
    /// waiting sequences reuse its blocks. `None` when caching is off.
    pub cache: Option<&'a PrefixCache>,
}

/// The engine's fixed budgets and page geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens computed per step, over all sequences.
    pub max_batch_tokens: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub max_prefill_chunk: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Pages of the whole pool.
    pub pool_pages: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// A block of KV takes one page per layer.
    pub num_layers: usize,
}

impl Limits {
    /// Pages holding `tokens` tokens of every layer (`KvGeometry::pages_for`).
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size) * self.num_layers
    }

    /// Tokens that `pages` KV pages hold (whole blocks of every layer: `SeqKv::capacity`).
    pub fn tokens_in(&self, pages: usize) -> usize {
        pages / self.num_layers * self.block_size
    }
}
