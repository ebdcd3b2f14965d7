//! Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seeded RNG so a
//! seed reproduces the same tokens (also across preemption: the RNG only advances on sampling),
//! and, for structured outputs, the request's grammar: its token mask (computed by the step
//! beside the model's forward pass, [`Sampler::take_constraint`]) removes every token that would
//! leave the grammar before the token is drawn.

use loraplane_kernels::cpu::{SamplingSpec, sample};

use crate::engine::request::SamplingParams;
use crate::rng::SplitMix64;
use crate::structured::{Constraint, TokenMask};

#[derive(Debug, Clone)]
pub struct Sampler {
    spec: SamplingSpec,
    rng: SplitMix64,
    want_logprob: bool,
    constraint: Option<Constraint>,
    /// The mask for the next draw, computed while the step's forward pass ran.
    mask: Option<Result<TokenMask, String>>,
}

impl Sampler {
    /// `fallback_seed` seeds requests that did not ask for one; `constraint` is the request's
    /// grammar, if any.
    pub fn new(
        params: &SamplingParams,
        constraint: Option<Constraint>,
        fallback_seed: u64,
    ) -> Self {
        Sampler {
            spec: SamplingSpec {
                temperature: params.temperature,
                top_k: params.top_k.filter(|k| *k > 0),
                top_p: params.top_p.filter(|p| *p < 1.0),
            },
            rng: SplitMix64::new(params.seed.unwrap_or(fallback_seed)),
            want_logprob: params.logprobs,
            constraint,
            mask: None,
        }
    }

    /// Lends the grammar out so its next mask can be computed on another thread; give it back
    /// with the mask through [`Sampler::restore_constraint`].
    pub fn take_constraint(&mut self) -> Option<Constraint> {
        self.constraint.take()
    }

    pub fn restore_constraint(&mut self, constraint: Constraint, mask: Result<TokenMask, String>) {
        self.constraint = Some(constraint);
        self.mask = Some(mask);
    }

    /// Accounts for a token sampled elsewhere (a prefill agent drew the first token with the
    /// same seed), so a seeded request draws the same numbers as it would have on one agent.
    pub fn skip_draw(&mut self) {
        if self.spec.temperature > 0.0 {
            self.rng.next_f32();
        }
    }

    /// Picks the next token from a row of logits; returns it and its log-probability (when
    /// asked for). The log-probability is the token's under the raw logits, as without a
    /// grammar (the mask, like top-k and top-p, only narrows the choice).
    ///
    /// Errors: non-finite logits, an empty distribution, or a constrained request whose mask
    /// is missing or failed.
    pub fn sample(&mut self, logits: &[f32]) -> Result<(u32, Option<f32>), String> {
        let uniform = if self.spec.temperature > 0.0 {
            self.rng.next_f32()
        } else {
            0.0
        };
        if self.constraint.is_none() {
            let (token, logprob) =
                sample(logits, &self.spec, uniform).map_err(|e| e.to_string())?;
            return Ok((token as u32, self.want_logprob.then_some(logprob)));
        }
        let mask = match self.mask.take() {
            Some(Ok(mask)) => mask,
            Some(Err(e)) => return Err(format!("structured output: {e}")),
            None => return Err("structured output: no token mask was computed".into()),
        };
        let mut masked = logits.to_vec();
        mask.apply(&mut masked);
        let (token, _) = sample(&masked, &self.spec, uniform).map_err(|e| e.to_string())?;
        let logprob = self
            .want_logprob
            .then(|| raw_logprob(logits, token))
            .flatten();
        Ok((token as u32, logprob))
    }

    /// Advances the grammar by the token taken (sampled here, or received from a prefill
    /// agent). Returns `true` when the structured output is complete; always `false` without a
    /// grammar.
    ///
    /// Errors: a token the grammar does not allow.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        match &mut self.constraint {
            Some(c) => c.advance(token),
            None => Ok(false),
        }
    }
}

/// `log softmax(logits)[token]`, as the kernel computes it for an unmasked row.
fn raw_logprob(logits: &[f32], token: usize) -> Option<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let norm: f64 = logits
        .iter()
        .map(|&x| (f64::from(x) - f64::from(max)).exp())
        .sum();
    let x = *logits.get(token)?;
    Some((f64::from(x) - f64::from(max) - norm.ln()) as f32)
}
