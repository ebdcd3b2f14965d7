//! The step plan: the scheduler's decisions for one step, in the order the engine applies them.

use crate::lora::ids::AdapterKey;
use crate::memory::prefix::BlockHash;
use crate::scheduler::state::SeqId;

/// One decision. The order matters: each one is taken in the pool state that the earlier
/// ones leave behind (an eviction frees the pages the next reservation takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Free the pool pages of this idle resident adapter (no running sequence uses it).
    Evict(AdapterKey),
    /// Free the pages of this idle prefix-cache block (no running sequence reads it).
    EvictBlock(BlockHash),
    /// Free a running sequence's pages and queue it first in line, to be recomputed.
    Preempt(SeqId),
    /// Compute `tokens` more tokens of a running sequence (its KV grows to hold them).
    Run { seq: SeqId, tokens: usize },
    /// End a waiting sequence that could not finish even alone in the pool: it needs
    /// `kv_pages` pages of KV at its longest plus `adapter_pages` for its adapter.
    Refuse {
        seq: SeqId,
        kv_pages: usize,
        adapter_pages: usize,
    },
    /// Copy this adapter's rows into pool pages (the next admission uses it).
    Place(AdapterKey),
    /// Admit a waiting sequence: reuse its first `cached` blocks from the prefix cache,
    /// reserve KV for `reserve` tokens (the reused ones included) and compute `tokens` of them
    /// this step, from the first one not reused. An importing sequence reserves its whole
    /// prompt plus one token and computes one token (its first decode).
    Admit {
        seq: SeqId,
        tokens: usize,
        reserve: usize,
        cached: usize,
    },
}

/// A step's decisions, to apply in order.
///
/// The plan holds as long as every decision goes as planned. Two outcomes it cannot foresee:
/// copying an adapter into the pool fails (the engine then stops admitting for this step), and
/// an imported sequence ends at admission (its first token finished it, or writing its KV
/// failed), which frees its pages; the engine then asks [`crate::scheduler::Scheduler::plan_admissions`]
/// for the rest of the step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub decisions: Vec<Decision>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    /// The sequences computed this step and their token counts, in batch order. An admission
    /// of zero tokens (a zero `max_prefill_chunk`) joins the running set but not the batch.
    pub fn batch(&self) -> Vec<(SeqId, usize)> {
        self.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Run { seq, tokens } => Some((*seq, *tokens)),
                Decision::Admit { seq, tokens, .. } if *tokens > 0 => Some((*seq, *tokens)),
                _ => None,
            })
            .collect()
    }

    /// Preempted sequences, in order.
    pub fn preempted(&self) -> Vec<SeqId> {
        self.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Preempt(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    /// Admitted sequences, in order.
    pub fn admitted(&self) -> Vec<SeqId> {
        self.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Admit { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    /// Evicted adapters, in order.
    pub fn evicted(&self) -> Vec<&AdapterKey> {
        self.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Evict(k) => Some(k),
                _ => None,
            })
            .collect()
    }

    /// Refused sequences, in order.
    pub fn refused(&self) -> Vec<SeqId> {
        self.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Refuse { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }
}
