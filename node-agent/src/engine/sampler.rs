//! Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seeded RNG so a
//! seed reproduces the same tokens (also across preemption: the RNG only advances on sampling).

use loraplane_kernels::cpu::{SamplingSpec, sample};

use crate::engine::request::SamplingParams;
use crate::rng::SplitMix64;

#[derive(Debug, Clone)]
pub struct Sampler {
    spec: SamplingSpec,
    rng: SplitMix64,
    want_logprob: bool,
}

impl Sampler {
    /// `fallback_seed` seeds requests that did not ask for one.
    pub fn new(params: &SamplingParams, fallback_seed: u64) -> Self {
        Sampler {
            spec: SamplingSpec {
                temperature: params.temperature,
                top_k: params.top_k.filter(|k| *k > 0),
                top_p: params.top_p.filter(|p| *p < 1.0),
            },
            rng: SplitMix64::new(params.seed.unwrap_or(fallback_seed)),
            want_logprob: params.logprobs,
        }
    }

    /// Accounts for a token sampled elsewhere (a prefill agent drew the first token with the
    /// same seed), so a seeded request draws the same numbers as it would have on one agent.
    pub fn skip_draw(&mut self) {
        if self.spec.temperature > 0.0 {
            self.rng.next_f32();
        }
    }

    /// Picks the next token from a row of logits; returns it and its log-probability (when
    /// asked for).
    pub fn sample(&mut self, logits: &[f32]) -> Result<(u32, Option<f32>), String> {
        let uniform = if self.spec.temperature > 0.0 {
            self.rng.next_f32()
        } else {
            0.0
        };
        let (token, logprob) = sample(logits, &self.spec, uniform).map_err(|e| e.to_string())?;
        Ok((token as u32, self.want_logprob.then_some(logprob)))
    }
}
