//! One engine step: schedule (continuous batching, chunked prefill, memory admission,
//! preemption by recompute), make resident the adapters it needs, run the model once over the
//! mixed batch, then sample and stream.
//!
//! Order within a step (Sarathi-Serve's stall-free batching): running sequences first, oldest
//! first — decodes take one token each, unfinished prompts continue with a chunk — then waiting
//! sequences are admitted by tenant fairness while the token budget lasts. When the pool cannot
//! hold a running sequence's next token, idle adapters are evicted first, then the newest
//! running sequence is preempted (its pages freed, recomputed later); nothing ever fails for
//! lack of memory and nothing exceeds the pool.

use std::time::Instant;

use crate::backend::Backend;
use crate::engine::core::{Engine, EngineError};
use crate::engine::request::{FinishReason, KvLayer};
use crate::lora::batch::LoraBatch;
use crate::lora::ids::AdapterKey;
use crate::lora::registry::{DeviceAdapter, plan_placement};
use crate::memory::kv::SeqKv;
use crate::model::llama::{SeqRows, StepInput};

impl<B: Backend> Engine<B> {
    /// Runs one step. Returns the number of tokens computed (0 when there was nothing to do).
    ///
    /// Errors: a backend failure. The requests of the failed batch end with an error and their
    /// pages are freed; the engine itself stays usable.
    pub fn step(&mut self) -> Result<usize, EngineError> {
        let plan = self.schedule();
        if plan.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        for (id, _) in &plan {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.scheduled.get_or_insert(now);
            }
        }
        let (logits, sample_rows) = match self.run(&plan) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "step failed; failing its requests");
                for (id, _) in &plan {
                    self.finish(
                        *id,
                        FinishReason::Error,
                        Some(format!("engine step failed: {e}")),
                    );
                }
                return Err(e);
            }
        };
        self.steps += 1;
        let computed: usize = plan.iter().map(|(_, n)| n).sum();
        self.last_batch_tokens = computed;
        if let Some(observer) = &self.config.observer {
            observer.on_step(computed, now.elapsed());
        }

        let vocab = self.model.config.vocab_size;
        let max_context = self.model.config.max_position_embeddings;
        let mut row = 0;
        for (id, n) in plan {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.computed += n;
            let fresh = seq.computed.min(seq.prompt_len).saturating_sub(seq.charged);
            seq.charged += fresh;
            let tenant = seq.tenant.clone();
            self.vtc.charge(&tenant, fresh, 0);
            if !sample_rows.contains(&id) {
                continue;
            }
            let logits_row = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let finish = match seq.sampler.sample(logits_row) {
                Ok((token, logprob)) => {
                    self.tokens_generated += 1;
                    self.vtc.charge(&tenant, 0, 1);
                    let logits = seq.params.return_logits.then(|| logits_row.to_vec());
                    seq.push_token(token, logprob, logits, &self.tokenizer, max_context)
                        .map(|r| (r, None))
                }
                Err(e) => Some((FinishReason::Error, Some(format!("sampling failed: {e}")))),
            };
            if let Some((reason, error)) = finish {
                self.finish(id, reason, error);
            }
        }
        Ok(computed)
    }

    /// Decides this step's work: `(sequence, tokens to compute)`, running sequences first.
    fn schedule(&mut self) -> Vec<(u64, usize)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        self.running
            .sort_by_key(|id| self.seqs.get(id).map_or(u64::MAX, |s| s.admitted));
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let (computed, remaining) = (seq.computed, seq.remaining());
            let mut n = remaining.min(budget).min(self.config.max_prefill_chunk);
            let mut preempted_self = false;
            while !self.reserve(id, computed + n) {
                let fit = self.fits(id).saturating_sub(computed);
                if fit >= 1 && fit < n {
                    n = fit; // a shorter prefill chunk fits without taking anyone's pages
                    continue;
                }
                if self.registry.evict_idle_device() {
                    continue;
                }
                let newest = self.running.len() - 1;
                if newest == i {
                    self.preempt(id);
                    preempted_self = true;
                    break;
                }
                let victim = self.running[newest];
                self.preempt(victim);
            }
            if preempted_self {
                continue;
            }
            plan.push((id, n));
            budget -= n;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(id) = self.next_admissible() else {
                break;
            };
            let Some(n) = self.admit(id, budget) else {
                break;
            };
            if n == 0 {
                continue; // refused and finished
            }
            plan.push((id, n));
            budget -= n;
        }
        plan
    }

    /// Tokens sequence `id` could hold with its pages plus every free page.
    fn fits(&self, id: u64) -> usize {
        let held = self
            .seqs
            .get(&id)
            .and_then(|s| s.kv.as_ref())
            .map_or(0, SeqKv::capacity);
        let free_blocks = self.pages.free_pages() / self.geometry.num_layers;
        held + free_blocks * self.geometry.block_size
    }

    fn reserve(&mut self, id: u64, tokens: usize) -> bool {
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
    fn preempt(&mut self, id: u64) {
        if self.utilisation_at_first_preemption.is_none() {
            self.utilisation_at_first_preemption = Some(self.pages.stats().utilisation());
        }
        self.running.retain(|x| *x != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.kv = None;
            seq.computed = 0;
            seq.preemptions += 1;
            if let Some(key) = &seq.adapter
                && let Some(e) = self.registry.get_mut(key)
            {
                e.running = e.running.saturating_sub(1);
            }
        }
        self.preemptions += 1;
        self.waiting.push_front(id);
        tracing::debug!(seq = id, "preempted by recompute");
    }

    /// The waiting sequence to admit next: among those whose adapter is ready, the tenant with
    /// the smallest virtual token counter, first in line within it.
    fn next_admissible(&mut self) -> Option<u64> {
        let ready: Vec<u64> = self
            .waiting
            .iter()
            .copied()
            .filter(|id| self.is_ready(*id))
            .collect();
        let tenants: Vec<_> = ready
            .iter()
            .filter_map(|id| self.seqs.get(id).map(|s| &s.tenant))
            .collect();
        let tenant = self.vtc.pick(tenants.into_iter())?.clone();
        ready
            .into_iter()
            .find(|id| self.seqs.get(id).is_some_and(|s| s.tenant == tenant))
    }

    /// Admits a waiting sequence if the pool can hold its whole prompt (and its adapter);
    /// returns its first chunk's length.
    fn admit(&mut self, id: u64, budget: usize) -> Option<usize> {
        let seq = self.seqs.get(&id)?;
        let need_kv = self.geometry.pages_for(seq.tokens.len() + 1);
        let need_total = self
            .geometry
            .pages_for(seq.prompt_len + seq.params.max_tokens);
        let adapter = seq.adapter.clone();
        let importing = seq.import.is_some();
        // An imported prompt only needs its pages; its first decode is the step's one token.
        let (n, reserve_for) = if importing {
            (1, seq.prompt_len + 1)
        } else {
            let n = seq
                .remaining()
                .min(budget)
                .min(self.config.max_prefill_chunk);
            (n, n)
        };
        let adapter_pages = match &adapter {
            Some(key) => self.adapter_pages_needed(key)?,
            None => 0,
        };
        if need_total + adapter_pages > self.config.num_pages {
            // Alone in the pool it still could not finish: refuse rather than thrash.
            self.finish(
                id,
                FinishReason::Error,
                Some(format!(
                    "the request needs {need_total} KV pages plus {adapter_pages} adapter pages; \
                     the pool has {}",
                    self.config.num_pages
                )),
            );
            return Some(0);
        }
        let own_idle = adapter
            .as_ref()
            .and_then(|k| self.registry.get(k))
            .filter(|e| e.running == 0)
            .and_then(|e| e.device.as_ref())
            .map_or(0, |d| d.pages.len());
        let available =
            self.pages.free_pages() + self.registry.idle_device_pages().saturating_sub(own_idle);
        if available < need_kv + adapter_pages {
            return None;
        }
        if let Some(key) = &adapter {
            // Count it as running first so making room never evicts it.
            self.registry.get_mut(key)?.running += 1;
            if !self.make_resident(key) {
                if let Some(e) = self.registry.get_mut(key) {
                    e.running -= 1;
                }
                return None;
            }
            self.registry.touch(key);
        }
        while !self.reserve(id, reserve_for) {
            if !self.registry.evict_idle_device() {
                // Cannot happen after the availability check; undo rather than loop.
                if let Some(key) = &adapter
                    && let Some(e) = self.registry.get_mut(key)
                {
                    e.running -= 1;
                }
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.kv = None;
                }
                return None;
            }
        }
        self.waiting.retain(|x| *x != id);
        self.running.push(id);
        let seq = self.seqs.get_mut(&id)?;
        seq.admitted = self.next_admit;
        self.next_admit += 1;
        if importing {
            return self.import_kv(id).then_some(n).or(Some(0));
        }
        Some(n)
    }

    /// Writes a prefilled prompt's KV into the sequence's pages and emits the first token.
    /// Returns `false` when the sequence ended (an error, or the first token finished it).
    fn import_kv(&mut self, id: u64) -> bool {
        let layout = self.geometry.kernel_layout();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        let (Some(import), Some(kv)) = (seq.import.take(), seq.kv.as_ref()) else {
            return false;
        };
        for (l, data) in import.layers.iter().enumerate() {
            let table = kv.block_table(l);
            let blocks = seq.prompt_len.div_ceil(self.geometry.block_size);
            let pages = table.get(..blocks).unwrap_or(&table);
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
        let finish = seq.push_token(
            import.first_token,
            import.first_logprob,
            None,
            &self.tokenizer,
            max_context,
        );
        match finish {
            Some(reason) => {
                self.finish(id, reason, None);
                false
            }
            None => true,
        }
    }

    /// Pool pages an adapter still needs to become resident (`None`: not loaded in host memory).
    fn adapter_pages_needed(&self, key: &AdapterKey) -> Option<usize> {
        let e = self.registry.get(key)?;
        if e.device.is_some() {
            return Some(0);
        }
        let host = e.ready()?;
        plan_placement(host, self.geometry.page_elems)
            .ok()
            .map(|p| p.pages)
    }

    /// Copies an adapter's rows into pool pages, evicting idle adapters if needed.
    fn make_resident(&mut self, key: &AdapterKey) -> bool {
        let Some(e) = self.registry.get(key) else {
            return false;
        };
        if e.device.is_some() {
            return true;
        }
        let Some(host) = e.ready().cloned() else {
            return false;
        };
        let placement = match plan_placement(&host, self.geometry.page_elems) {
            Ok(p) => p,
            Err(err) => {
                tracing::error!(adapter = %key, error = %err, "adapter cannot be placed");
                return false;
            }
        };
        let allocated = loop {
            if let Some(a) = placement.allocate(
                &self.pages,
                self.geometry.page_elems,
                self.geometry.num_layers,
            ) {
                break a;
            }
            if !self.registry.evict_idle_device() {
                return false;
            }
        };
        let (pages, rows) = allocated;
        for (layer, module, w) in host.modules() {
            let Some(m) = rows.module(layer, module) else {
                return false;
            };
            let (in_dim, out_dim) = (w.a.len() / w.rank, w.bt.len() / w.rank);
            let a_rows = m.a.iter().zip(w.a.chunks_exact(in_dim));
            let b_rows = m.b.iter().zip(w.bt.chunks_exact(out_dim));
            for (&offset, row) in a_rows.chain(b_rows) {
                if let Err(err) = self.backend.pool_write(&mut self.pool, offset, row) {
                    tracing::error!(adapter = %key, error = %err, "copying an adapter into the pool failed");
                    return false;
                }
            }
        }
        self.registry.device_loads += 1;
        if let Some(e) = self.registry.get_mut(key) {
            e.device = Some(DeviceAdapter {
                pages,
                rows,
                digest: host.digest,
            });
        }
        true
    }

    /// Builds the step input and runs the model. Returns the logits and the sequences that
    /// sample this step (in plan order).
    fn run(&mut self, plan: &[(u64, usize)]) -> Result<(Vec<f32>, Vec<u64>), EngineError> {
        let num_layers = self.geometry.num_layers;
        let mut input = StepInput {
            slots: vec![Vec::new(); num_layers],
            ..StepInput::default()
        };
        let mut samplers = Vec::new();
        let mut lora = LoraBatch::default();
        for &(id, n) in plan {
            let seq = self
                .seqs
                .get(&id)
                .ok_or_else(|| broken("a planned sequence is gone"))?;
            let kv = seq
                .kv
                .as_ref()
                .ok_or_else(|| broken("a planned sequence has no KV"))?;
            let start = input.tokens.len();
            input
                .tokens
                .extend_from_slice(&seq.tokens[seq.computed..seq.computed + n]);
            input.positions.extend(seq.computed..seq.computed + n);
            for (l, slots) in input.slots.iter_mut().enumerate() {
                for pos in seq.computed..seq.computed + n {
                    slots.push(
                        kv.slot(l, pos)
                            .ok_or_else(|| broken("a KV slot is missing"))?,
                    );
                }
            }
            input.seqs.push(SeqRows {
                start,
                len: n,
                pos_start: seq.computed,
                block_tables: (0..num_layers).map(|l| kv.block_table(l)).collect(),
            });
            if let Some(key) = &seq.adapter {
                let rows = self
                    .registry
                    .get(key)
                    .and_then(|e| e.device.as_ref())
                    .map(|d| &d.rows)
                    .ok_or_else(|| broken("a planned adapter is not resident"))?;
                lora.runs.push((start..start + n, rows));
            }
            if seq.computed + n == seq.tokens.len() {
                input.logits_rows.push(start + n - 1);
                samplers.push(id);
            }
        }
        input.lora = lora;
        let layout = self.geometry.kernel_layout();
        // Prefill-role sequences whose prompt completes this step stream every layer's KV as
        // soon as the layer is computed.
        let exports: Vec<(
            Vec<Vec<u32>>,
            usize,
            tokio::sync::mpsc::UnboundedSender<KvLayer>,
        )> = plan
            .iter()
            .filter_map(|&(id, n)| {
                let seq = self.seqs.get(&id)?;
                let sink = seq.export.as_ref()?;
                if seq.computed + n != seq.prompt_len || seq.tokens.len() != seq.prompt_len {
                    return None; // not the prompt's last chunk
                }
                let kv = seq.kv.as_ref()?;
                let blocks = seq.prompt_len.div_ceil(self.geometry.block_size);
                let tables = (0..num_layers)
                    .map(|l| kv.block_table(l).get(..blocks).map(<[u32]>::to_vec))
                    .collect::<Option<Vec<_>>>()?;
                Some((tables, seq.prompt_len, sink.clone()))
            })
            .collect();
        let backend = &self.backend;
        let mut after_layer =
            |l: usize, pool: &B::Pool| -> Result<(), crate::backend::BackendError> {
                for (tables, num_tokens, sink) in &exports {
                    let data = backend.gather_kv(&layout, pool, &tables[l])?;
                    // A closed sink means the receiver left; the request is cancelled next step.
                    let _ = sink.send(KvLayer {
                        layer: l,
                        num_tokens: *num_tokens,
                        data,
                    });
                }
                Ok(())
            };
        let logits = self.model.forward(
            &self.backend,
            &mut self.pool,
            &layout,
            &input,
            &mut after_layer,
        )?;
        Ok((logits, samplers))
    }
}

/// A broken invariant of the step: the engine's bug, reported as such (never as "stopped").
fn broken(what: &str) -> EngineError {
    EngineError::Invariant(what.to_owned())
}
