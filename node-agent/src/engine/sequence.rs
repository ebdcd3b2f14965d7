//! One request inside the engine: its tokens, how many have KV in the pool, its KV pages, its
//! sampler and its output stream.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::prefix::WeightsId;
use crate::engine::request::{
    Event, FinishReason, KvImport, KvLayer, SamplingParams, Timings, Usage,
};
use crate::engine::sampler::Sampler;
use crate::lora::ids::{AdapterKey, TenantId};
use crate::lora::registry::{AdapterLease, ResidentReservation};
use crate::memory::kv::SeqKv;
use crate::memory::prefix::{BlockHash, CachedBlock};
use crate::model::tokenizer::{Detokenizer, TokenizerBundle};
use crate::scheduler::{SeqId, SeqState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopKind {
    String,
    Token,
}

#[derive(Debug)]
pub(crate) struct Sequence {
    pub request_id: String,
    pub tenant: TenantId,
    /// Its use of each of its adapters, from submission to its end (empty: the base model).
    pub adapters: Vec<AdapterLease>,
    /// The adapters' keys (in the leases' order, for the scheduler) and their scales.
    pub adapter_keys: Vec<AdapterKey>,
    pub scales: Vec<f32>,
    /// Keeps its adapters in the pool while it runs (admitted and not preempted).
    pub resident: Vec<ResidentReservation>,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the pool (0 after a preemption: recomputed from scratch).
    pub computed: usize,
    /// Prompt tokens already charged to the tenant's fairness counter (recompute is free).
    pub charged: usize,
    pub kv: Option<SeqKv>,
    pub params: SamplingParams,
    pub sampler: Sampler,
    pub detok: Detokenizer,
    /// Generated text so far, and how much of it has been streamed.
    pub text: String,
    pub sent: usize,
    /// Generation ended on a stop string (text already cut) or a stop token (not part of the text).
    pub stopped_on: Option<StopKind>,
    pub events: UnboundedSender<Event>,
    /// Prefill role: stream each layer's KV here when the prompt's last chunk computes it.
    pub export: Option<UnboundedSender<KvLayer>>,
    /// Decode role: KV computed by a prefill agent, written into the pool at admission.
    pub import: Option<KvImport>,
    /// Its prompt was prefilled by a prefill agent (`import` is consumed at admission).
    pub remote_prefill: bool,
    pub arrival: Instant,
    pub scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub preemptions: u32,
    /// Admission order; the largest running value is the newest (preempted first).
    pub admitted: u64,
    /// The request's prefix-cache salt.
    pub cache_salt: Option<String>,
    /// The weights its prefix keys were computed for (`None`: no keys, it does not cache).
    pub prefix_identity: Option<WeightsId>,
    /// The root of its key chain, and the keys of its full blocks computed so far.
    pub prefix_root: Option<BlockHash>,
    pub block_keys: Vec<BlockHash>,
    /// Its prompt was looked up in the prefix cache (at its first admission), and how many of
    /// its tokens were found.
    pub queried: bool,
    pub cached_prompt_tokens: usize,
    /// Decode role: cached blocks its import leaves out, held for it from before the remote
    /// prefill until its admission reuses them (`Engine::pin_prefix`).
    pub pinned: Vec<Arc<CachedBlock>>,
}

impl Sequence {
    /// Whether it applies `key` (alone or among others).
    pub fn uses(&self, key: &AdapterKey) -> bool {
        self.adapter_keys.contains(key)
    }

    /// Orders sequences by their adapters, then their scales, so that rows of one composition
    /// sit side by side in a step (compared in place: a sort calls this per comparison).
    pub fn cmp_adapters(&self, other: &Sequence) -> std::cmp::Ordering {
        self.adapter_keys.cmp(&other.adapter_keys).then_with(|| {
            let theirs = other.scales.iter().map(|x| x.to_bits());
            self.scales.iter().map(|x| x.to_bits()).cmp(theirs)
        })
    }

    /// What the scheduler sees of it.
    pub fn sched_state(&self, id: SeqId) -> SeqState<'_> {
        SeqState {
            id,
            tenant: &self.tenant,
            adapters: &self.adapter_keys,
            tokens: self.tokens.len(),
            prompt_len: self.prompt_len,
            max_tokens: self.params.max_tokens,
            computed: self.computed,
            pages: self.kv.as_ref().map_or(0, SeqKv::pages),
            shared_pages: self.kv.as_ref().map_or(0, SeqKv::shared_pages),
            prefix: if self.prefix_root.is_some() {
                &self.block_keys
            } else {
                &[]
            },
            admitted: self.admitted,
            importing: self.import.is_some(),
            import_cached: self.import.as_ref().map_or(0, |i| i.first_block),
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn holdback(&self) -> usize {
        self.params
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
    }

    /// Takes a sampled (or received) token: advances the request's grammar, if it has one,
    /// then appends the token ([`Sequence::push_token`]). Returns why generation ends, if it
    /// does: a grammar that is complete ends it with `Stop`; a token the grammar refuses (a
    /// prefill peer that ignored the constraint) fails the request with the reason.
    pub fn take_token(
        &mut self,
        token: u32,
        logprob: Option<f32>,
        logits: Option<Vec<f32>>,
        tok: &TokenizerBundle,
        max_context: usize,
    ) -> Option<(FinishReason, Option<String>)> {
        let complete = match self.sampler.advance(token) {
            Ok(complete) => complete,
            Err(e) => {
                return Some((
                    FinishReason::Error,
                    Some(format!("token {token} breaks the response format: {e}")),
                ));
            }
        };
        match self.push_token(token, logprob, logits, tok, max_context) {
            Some(reason) => Some((reason, None)),
            None if complete => Some((FinishReason::Stop, None)),
            None => None,
        }
    }

    /// Appends a sampled token; returns the reason generation ends, if it does.
    fn push_token(
        &mut self,
        token: u32,
        logprob: Option<f32>,
        logits: Option<Vec<f32>>,
        tok: &TokenizerBundle,
        max_context: usize,
    ) -> Option<FinishReason> {
        self.tokens.push(token);
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        let is_stop_token = self.params.stop_token_ids.contains(&token)
            || (!self.params.ignore_eos && tok.eos_ids.contains(&token));
        if !is_stop_token {
            let delta = self.detok.next(tok, &self.tokens[self.prompt_len..]);
            self.text.push_str(&delta);
        }
        let mut finish = None;
        if is_stop_token {
            self.stopped_on = Some(StopKind::Token);
            finish = Some(FinishReason::Stop);
        } else if let Some(cut) = self.stop_string_at() {
            self.text.truncate(cut);
            self.stopped_on = Some(StopKind::String);
            finish = Some(FinishReason::Stop);
        } else if self.generated() >= self.params.max_tokens || self.tokens.len() >= max_context {
            finish = Some(FinishReason::Length);
        }
        // Stream what can no longer turn into a stop string.
        let safe = if finish.is_some() {
            self.sent
        } else {
            let mut end = self
                .text
                .len()
                .saturating_sub(self.holdback())
                .max(self.sent);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            end
        };
        let text = self.text[self.sent..safe].to_owned();
        self.sent = safe;
        let ok = self
            .events
            .send(Event::Token {
                id: token,
                text,
                logprob,
                logits,
            })
            .is_ok();
        if !ok && finish.is_none() {
            return Some(FinishReason::Cancelled);
        }
        finish
    }

    /// Byte offset where the first stop string starts, if any occurs.
    fn stop_string_at(&self) -> Option<usize> {
        let from = self.sent.saturating_sub(self.holdback());
        let mut from = from.min(self.text.len());
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Sends the final event (the held-back text and usage).
    pub fn finish(&mut self, reason: FinishReason, error: Option<String>, tok: &TokenizerBundle) {
        if self.stopped_on != Some(StopKind::String) {
            let end = self.tokens.len() - usize::from(self.stopped_on == Some(StopKind::Token));
            let rest = self.detok.flush(tok, &self.tokens[self.prompt_len..end]);
            self.text.push_str(&rest);
            if let Some(cut) = self.stop_string_at() {
                self.text.truncate(cut);
            }
        }
        let text = self.text.get(self.sent..).unwrap_or_default().to_owned();
        self.sent = self.text.len();
        let now = Instant::now();
        let timings = Timings {
            queue: self.scheduled.unwrap_or(now) - self.arrival,
            time_to_first_token: self.first_token.unwrap_or(now) - self.arrival,
            total: now - self.arrival,
            preemptions: self.preemptions,
            remote_prefill: self.remote_prefill,
        };
        let usage = Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_prompt_tokens: self.cached_prompt_tokens,
        };
        let _ = self.events.send(Event::Finished {
            reason,
            text,
            usage,
            timings,
            error,
        });
    }
}
