//! One engine step: the scheduler plans it (`crate::scheduler`: continuous batching, chunked
//! prefill, memory admission, preemption by recompute), the engine carries the plan out
//! (`apply.rs`: pages, adapter residency, queues), runs the model once over the mixed batch,
//! publishes the blocks it filled into the prefix cache (`prefix.rs`), then samples and
//! streams.

use std::time::Instant;

use crate::backend::Backend;
use crate::engine::core::{Engine, EngineError};
use crate::engine::request::{FinishReason, KvLayer};
use crate::lora::batch::{LoraBatch, LoraRun};
use crate::model::llama::{SeqRows, StepInput};
use crate::scheduler::SeqId;
use crate::structured::Constraint;

impl<B: Backend> Engine<B> {
    /// Runs one step. Returns the number of tokens computed (0 when there was nothing to do).
    ///
    /// Errors: a backend failure. The requests of the failed batch end with an error and their
    /// pages are freed; the engine itself stays usable.
    pub fn step(&mut self) -> Result<usize, EngineError> {
        let mut plan = self.schedule()?;
        if plan.is_empty() {
            return Ok(0);
        }
        // Rows of one adapter side by side: the LoRA kernels then read each adapter's factors
        // once per step for all its sequences (S-LoRA's MBGMV), not once per sequence. Rows
        // are independent, so their order changes no result.
        plan.sort_by(
            |(a, _), (b, _)| match (self.seqs.get(a), self.seqs.get(b)) {
                (Some(a), Some(b)) => a.cmp_adapters(b),
                (a, b) => a.is_some().cmp(&b.is_some()),
            },
        );
        let now = Instant::now();
        for (id, _) in &plan {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.scheduled.get_or_insert(now);
            }
        }
        let (logits, sample_rows) = match self.run_with_masks(&plan) {
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
        let elapsed = now.elapsed();
        if let Some(observer) = &self.config.observer {
            observer.on_step(computed, elapsed);
        }
        tracing::debug!(
            tokens = computed,
            seqs = plan.len(),
            sampled = sample_rows.len(),
            ms = elapsed.as_secs_f64() * 1e3,
            "step"
        );

        let vocab = self.model.config.vocab_size;
        let max_context = self.model.config.max_position_embeddings;
        let mut row = 0;
        for (id, n) in plan {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.computed += n;
            // Blocks this step filled join the prefix cache (hashed once each).
            self.publish(id);
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            let fresh = seq.computed.min(seq.prompt_len).saturating_sub(seq.charged);
            seq.charged += fresh;
            let tenant = seq.tenant.clone();
            self.scheduler.charge(&tenant, fresh, 0);
            if !sample_rows.contains(&id) {
                continue;
            }
            let logits_row = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let finish = match seq.sampler.sample(logits_row) {
                Ok((token, logprob)) => {
                    self.tokens_generated += 1;
                    self.scheduler.charge(&tenant, 0, 1);
                    let logits = seq.params.return_logits.then(|| logits_row.to_vec());
                    seq.take_token(token, logprob, logits, &self.tokenizer, max_context)
                }
                // Only this request fails (rows are independent); name its adapter, the
                // likely cause of non-finite logits.
                Err(e) => Some((
                    FinishReason::Error,
                    Some(match seq.adapter_keys.as_slice() {
                        [] => format!("sampling failed: {e}"),
                        keys => format!(
                            "sampling failed with adapter {}: {e}",
                            keys.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(" + ")
                        ),
                    }),
                )),
            };
            if let Some((reason, error)) = finish {
                self.finish(id, reason, error);
            }
        }
        Ok(computed)
    }

    /// [`Engine::run`], while another thread computes the token masks of the constrained
    /// sequences that sample this step: a mask depends only on the tokens already taken, so it
    /// is ready when the logits are, and a batch without constrained rows pays nothing.
    fn run_with_masks(
        &mut self,
        plan: &[(SeqId, usize)],
    ) -> Result<(Vec<f32>, Vec<SeqId>), EngineError> {
        let mut lent: Vec<(SeqId, Constraint)> = plan
            .iter()
            .filter_map(|&(id, n)| {
                let seq = self.seqs.get_mut(&id)?;
                let samples = seq.computed + n == seq.tokens.len();
                samples
                    .then(|| seq.sampler.take_constraint())
                    .flatten()
                    .map(|c| (id, c))
            })
            .collect();
        if lent.is_empty() {
            return self.run(plan);
        }
        let (out, masks) = std::thread::scope(|scope| {
            let masks = scope.spawn(|| lent.iter_mut().map(|(_, c)| c.mask()).collect::<Vec<_>>());
            let out = self.run(plan);
            (out, masks.join())
        });
        let masks = masks.unwrap_or_else(|_| {
            (0..lent.len())
                .map(|_| Err("computing the token mask panicked".to_owned()))
                .collect()
        });
        for ((id, constraint), mask) in lent.into_iter().zip(masks) {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.sampler.restore_constraint(constraint, mask);
            }
        }
        out
    }

    /// Builds the step input and runs the model. Returns the logits and the sequences that
    /// sample this step (in plan order).
    fn run(&mut self, plan: &[(SeqId, usize)]) -> Result<(Vec<f32>, Vec<SeqId>), EngineError> {
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
            for (pass, (key, &scale)) in seq.adapter_keys.iter().zip(&seq.scales).enumerate() {
                let adapter = self
                    .registry
                    .resident_rows(key)
                    .ok_or_else(|| broken("a planned adapter is not resident"))?;
                lora.runs.push(LoraRun {
                    rows: start..start + n,
                    adapter,
                    scale,
                    pass,
                });
            }
            if seq.computed + n == seq.tokens.len() {
                input.logits_rows.push(start + n - 1);
                samplers.push(id);
            }
        }
        input.lora = lora;
        let layout = self.geometry.kernel_layout();
        // Prefill-role sequences whose prompt completes this step stream every layer's KV as
        // soon as the layer's K/V are written.
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
