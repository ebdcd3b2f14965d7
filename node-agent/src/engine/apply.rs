//! Carrying out the scheduler's plan: the engine shows the scheduler a [`Snapshot`] of its
//! sequences, adapters and free pages, gets a [`StepPlan`] back and applies its decisions in
//! order — evicting adapters and idle prefix-cache blocks, preempting, growing KV, copying
//! adapters into the pool, moving sequences between the queues (reusing cached blocks at
//! admission), importing prefilled KV. The policy itself is in
//! `crate::scheduler`; nothing here decides anything.
//!
//! The plan is computed from exactly the state it is applied to, and the scheduler mirrors the
//! allocator's arithmetic, so every reservation it plans succeeds. Two outcomes it cannot
//! foresee are handled as the policy always did: a failed copy of an adapter into the pool
//! stops admissions for the step, and an imported sequence that ends at admission (its first
//! token finished it) frees its pages, so the rest of the step's admissions are planned again.

use crate::backend::Backend;
use crate::engine::core::{Engine, EngineError};
use crate::engine::prefix::PrefixCaching;
use crate::engine::request::FinishReason;
use crate::lora::ids::AdapterKey;
use crate::lora::registry::{DeviceAdapter, Entry, RegistryError, plan_placement};
use crate::memory::kv::SeqKv;
use crate::memory::prefix::BlockHash;
use crate::scheduler::{AdapterState, Decision, SeqId, Snapshot};

/// The plan disagreed with the engine's state: a bug, since the plan is computed from a
/// snapshot of that very state.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("{0} is not running")]
    NotRunning(SeqId),
    #[error("{0} is not waiting")]
    NotWaiting(SeqId),
    #[error("the pool cannot hold {tokens} tokens of {seq}")]
    NoPages { seq: SeqId, tokens: usize },
    #[error("adapter {0} cannot be placed in the pool")]
    NotPlaceable(AdapterKey),
    #[error("{0:?} is not an idle cached block")]
    NotEvictable(BlockHash),
    #[error("{seq}'s first {blocks} blocks are not cached")]
    NotCached { seq: SeqId, blocks: usize },
    #[error("the plan spends more than the step's token budget")]
    OverBudget,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl ApplyError {
    /// The sequence the failed decision concerned.
    fn seq(&self) -> Option<SeqId> {
        match self {
            ApplyError::NotRunning(s) | ApplyError::NotWaiting(s) => Some(*s),
            ApplyError::NoPages { seq, .. } | ApplyError::NotCached { seq, .. } => Some(*seq),
            ApplyError::NotPlaceable(_)
            | ApplyError::NotEvictable(_)
            | ApplyError::OverBudget
            | ApplyError::Registry(_) => None,
        }
    }
}

/// How applying one decision went.
enum Outcome {
    Applied,
    /// Copying an adapter into the pool failed: no more admissions this step.
    StopAdmitting,
    /// An admitted sequence ended at once: plan the remaining admissions again.
    Ended,
}

/// The step's batch as the plan is applied: `(sequence, tokens)` in order, and the budget left.
struct Batch {
    seqs: Vec<(SeqId, usize)>,
    budget: usize,
}

impl Batch {
    fn push(&mut self, seq: SeqId, tokens: usize) -> Result<(), ApplyError> {
        self.budget = self
            .budget
            .checked_sub(tokens)
            .ok_or(ApplyError::OverBudget)?;
        self.seqs.push((seq, tokens));
        Ok(())
    }
}

impl<B: Backend> Engine<B> {
    /// What the scheduler sees of the engine now.
    fn snapshot(&self) -> Snapshot<'_> {
        let state = |id: &SeqId| self.seqs.get(id).map(|s| s.sched_state(*id));
        Snapshot {
            running: self.running.iter().filter_map(state).collect(),
            waiting: self.waiting.iter().filter_map(state).collect(),
            adapters: self
                .registry
                .iter()
                .map(|e| (e.key(), adapter_state(e)))
                .collect(),
            free_pages: self.pages.free_pages(),
            cache: (self.config.prefix_caching != PrefixCaching::Off).then_some(&self.prefix),
        }
    }

    /// Plans this step and carries the plan out. Returns the batch: `(sequence, tokens to
    /// compute)`, running sequences first.
    ///
    /// Errors: the plan disagreed with the engine (a bug). The sequences it concerned end with
    /// an error, so a disagreement cannot stall the engine, and the step reports it like the
    /// model pass's own broken invariants.
    pub(super) fn schedule(&mut self) -> Result<Vec<(SeqId, usize)>, EngineError> {
        let mut batch = Batch {
            seqs: Vec::new(),
            budget: self.config.max_batch_tokens,
        };
        let Err(e) = self.apply_plan(&mut batch) else {
            return Ok(batch.seqs);
        };
        debug_assert!(false, "the step plan disagreed with the engine: {e}");
        tracing::error!(error = %e, "the step plan disagreed with the engine; failing its requests");
        let message = format!("engine step failed: {e}");
        for id in batch.seqs.iter().map(|(id, _)| *id).chain(e.seq()) {
            self.finish(id, FinishReason::Error, Some(message.clone()));
        }
        Err(EngineError::Invariant(format!(
            "the step plan disagreed with the engine: {e}"
        )))
    }

    fn apply_plan(&mut self, batch: &mut Batch) -> Result<(), ApplyError> {
        self.prepare_prefixes();
        let plan = self.scheduler.plan(self.snapshot());
        let mut decisions = plan.decisions.into_iter();
        loop {
            let Some(decision) = decisions.next() else {
                return Ok(());
            };
            match self.apply(decision, batch)? {
                Outcome::Applied => {}
                Outcome::StopAdmitting => return Ok(()),
                Outcome::Ended => {
                    let rest = self
                        .scheduler
                        .plan_admissions(self.snapshot(), batch.budget);
                    decisions = rest.decisions.into_iter();
                }
            }
        }
    }

    fn apply(&mut self, decision: Decision, batch: &mut Batch) -> Result<Outcome, ApplyError> {
        match decision {
            Decision::Evict(key) => self.registry.evict_resident(&key)?,
            Decision::EvictBlock(block) => {
                if !self.prefix.evict(&block) {
                    return Err(ApplyError::NotEvictable(block));
                }
            }
            Decision::Preempt(id) => self.preempt(id)?,
            Decision::Run { seq: id, tokens } => {
                let seq = self.seqs.get(&id).ok_or(ApplyError::NotRunning(id))?;
                let to = seq.computed + tokens;
                if !self.reserve(id, to) {
                    return Err(ApplyError::NoPages {
                        seq: id,
                        tokens: to,
                    });
                }
                batch.push(id, tokens)?;
            }
            Decision::Refuse {
                seq,
                kv_pages,
                adapter_pages,
            } => {
                if !self.waiting.contains(&seq) {
                    return Err(ApplyError::NotWaiting(seq));
                }
                let message = format!(
                    "the request needs {kv_pages} KV pages plus {adapter_pages} adapter pages; \
                     the pool has {}",
                    self.config.num_pages
                );
                self.finish(seq, FinishReason::Error, Some(message));
            }
            Decision::Place(key) => {
                if !self.make_resident(&key)? {
                    return Ok(Outcome::StopAdmitting);
                }
            }
            Decision::Admit {
                seq,
                tokens,
                reserve,
                cached,
            } => return self.admit(seq, tokens, reserve, cached, batch),
        }
        Ok(Outcome::Applied)
    }

    fn reserve(&mut self, id: SeqId, tokens: usize) -> bool {
        let (pages, geometry) = (&self.pages, self.geometry);
        match self.seqs.get_mut(&id) {
            Some(seq) => seq
                .kv
                .get_or_insert_with(|| SeqKv::new(pages, geometry))
                .reserve(tokens),
            None => false,
        }
    }

    /// Frees a running sequence's pages and queues it (first in line) for recomputation.
    fn preempt(&mut self, id: SeqId) -> Result<(), ApplyError> {
        if !self.running.contains(&id) {
            return Err(ApplyError::NotRunning(id));
        }
        if self.utilisation_at_first_preemption.is_none() {
            self.utilisation_at_first_preemption = Some(self.pages.stats().utilisation());
        }
        self.running.retain(|x| *x != id);
        let kv = self.seqs.get_mut(&id).and_then(|s| s.kv.take());
        self.release_kv(kv);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.resident.clear();
            seq.computed = 0;
            seq.preemptions += 1;
        }
        self.preemptions += 1;
        self.waiting.push_front(id);
        tracing::debug!(seq = %id, "preempted by recompute");
        Ok(())
    }

    /// Moves a waiting sequence to the running set: its adapter stays resident while it runs,
    /// its KV starts with its first `cached` blocks from the prefix cache and holds `reserve`
    /// tokens, and `tokens` of them join the batch.
    fn admit(
        &mut self,
        id: SeqId,
        tokens: usize,
        reserve: usize,
        cached: usize,
        batch: &mut Batch,
    ) -> Result<Outcome, ApplyError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .filter(|_| self.waiting.contains(&id))
            .ok_or(ApplyError::NotWaiting(id))?;
        let mut resident = Vec::with_capacity(seq.adapters.len());
        for lease in &seq.adapters {
            resident.push(self.registry.reserve_resident(lease)?);
            self.registry.touch(lease.key());
        }
        seq.resident = resident;
        let Some(kv) = self.reuse_prefix(id, cached) else {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.resident.clear();
            }
            return Err(ApplyError::NotCached {
                seq: id,
                blocks: cached,
            });
        };
        let done = cached * self.geometry.block_size;
        self.count_prefix_query(id, done);
        let Some(seq) = self.seqs.get_mut(&id) else {
            self.release_kv(Some(kv));
            return Err(ApplyError::NotWaiting(id));
        };
        let importing = seq.import.is_some();
        seq.kv = Some(kv);
        seq.computed = done;
        // Reused tokens cost no compute: they are not charged to the tenant again.
        seq.charged = seq.charged.max(done.min(seq.prompt_len));
        if !self.reserve(id, reserve) {
            let kv = self.seqs.get_mut(&id).and_then(|seq| {
                seq.resident.clear();
                seq.computed = 0;
                seq.kv.take()
            });
            self.release_kv(kv);
            return Err(ApplyError::NoPages {
                seq: id,
                tokens: reserve,
            });
        }
        self.waiting.retain(|x| *x != id);
        self.running.push(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.admitted = self.next_admit;
            // Its KV holds the reused blocks now: what was pinned for it before a remote
            // prefill is let go (not earlier: a failed admission keeps its pins).
            let pinned = std::mem::take(&mut seq.pinned);
            self.release_blocks(pinned);
        }
        self.next_admit += 1;
        if importing && !self.import_kv(id) {
            return Ok(Outcome::Ended);
        }
        // An admission of no tokens (a zero prefill chunk) runs from the next step on.
        if tokens > 0 {
            batch.push(id, tokens)?;
        }
        Ok(Outcome::Applied)
    }

    /// Writes a prefilled prompt's KV into the sequence's pages and emits the first token.
    /// Returns `false` when the sequence ended (an error, or the first token finished it).
    fn import_kv(&mut self, id: SeqId) -> bool {
        let layout = self.geometry.kernel_layout();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        let (Some(import), Some(kv)) = (seq.import.take(), seq.kv.as_ref()) else {
            return false;
        };
        // The blocks the import leaves out must be exactly those reused from the cache (they
        // were pinned; only a reload of the adapter under the request can change its keys).
        if kv.shared().len() != import.first_block {
            let reused = kv.shared().len();
            self.finish(
                id,
                FinishReason::Error,
                Some(format!(
                    "the received KV starts at block {}, but {reused} blocks of this agent's \
                     prefix cache were reused (was the adapter reloaded meanwhile?); retry",
                    import.first_block
                )),
            );
            return false;
        }
        for (l, data) in import.layers.iter().enumerate() {
            let table = kv.block_table(l);
            let blocks = seq.prompt_len.div_ceil(self.geometry.block_size);
            let pages = table.get(import.first_block..blocks).unwrap_or(&[]);
            if let Err(e) = self
                .backend
                .scatter_kv(&layout, data, pages, &mut self.pool)
            {
                self.finish(
                    id,
                    FinishReason::Error,
                    Some(format!("writing received KV failed: {e}")),
                );
                return false;
            }
        }
        seq.computed = seq.prompt_len;
        seq.charged = seq.prompt_len;
        seq.sampler.skip_draw();
        let max_context = self.model.config.max_position_embeddings;
        self.tokens_generated += 1;
        let finish = seq.take_token(
            import.first_token,
            import.first_logprob,
            None,
            &self.tokenizer,
            max_context,
        );
        match finish {
            Some((reason, error)) => {
                self.finish(id, reason, error);
                false
            }
            None => true,
        }
    }

    /// Copies an adapter's rows into pool pages (the plan freed them). Returns `false` when
    /// copying failed (the pages go back); admissions stop for the step then.
    fn make_resident(&mut self, key: &AdapterKey) -> Result<bool, ApplyError> {
        let started = std::time::Instant::now();
        let not_placeable = || ApplyError::NotPlaceable(key.clone());
        let host = self
            .registry
            .get(key)
            .and_then(Entry::ready)
            .cloned()
            .ok_or_else(not_placeable)?;
        let page_elems = self.geometry.page_elems;
        let placement = plan_placement(&host, page_elems).map_err(|_| not_placeable())?;
        let (pages, rows) = placement
            .allocate(&self.pages, page_elems, self.geometry.num_layers)
            .ok_or_else(not_placeable)?;
        for (layer, module, w) in host.modules() {
            let Some(m) = rows.module(layer, module) else {
                return Ok(false);
            };
            let (in_dim, out_dim) = (w.a.len() / w.rank, w.bt.len() / w.rank);
            let a_rows = m.a.iter().zip(w.a.chunks_exact(in_dim));
            let b_rows = m.b.iter().zip(w.bt.chunks_exact(out_dim));
            for (&offset, row) in a_rows.chain(b_rows) {
                if let Err(err) = self.backend.pool_write(&mut self.pool, offset, row) {
                    tracing::error!(adapter = %key, error = %err, "copying an adapter into the pool failed");
                    return Ok(false);
                }
            }
        }
        let device = DeviceAdapter {
            pages,
            rows,
            digest: host.digest,
        };
        self.registry.set_resident(key, device)?;
        self.registry.touch(key);
        if let Some(o) = &self.config.observer {
            o.on_adapter_load(
                crate::engine::AdapterTransition::HostToDevice,
                started.elapsed(),
            );
        }
        Ok(true)
    }
}

fn adapter_state(e: &Entry) -> AdapterState {
    AdapterState {
        host_ready: e.ready().is_some(),
        resident: e.resident().map(|d| d.pages.len()),
        placement: e.placement_pages(),
        unloading: e.is_unloading(),
        last_used: e.last_used(),
    }
}
