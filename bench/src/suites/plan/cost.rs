//! Step-cost profiles: what one engine step costs on one device, as a linear model of the
//! step's composition, fitted by least squares to steps of the real engine measured on that
//! device.
//!
//! A step's features ([`StepShape`]): a fixed cost; prefill tokens; decoding sequences (one
//! token each: the weights are read once per step whatever the batch, so this term is small
//! and the fixed cost large on a bandwidth-bound device); attention work (query tokens ×
//! context they attend to); distinct adapters (each adapter's weights are read once per step);
//! and LoRA work (tokens × rank). The fit weighs relative errors, so short decode steps count as
//! much as long prefills; a coefficient the data drive negative is dropped and the rest refitted.
//!
//! The profile also carries the engine limits the agents were measured with (the simulated
//! agents use the same), the model's KV bytes per token and the KV channel's bandwidth.

use serde::{Deserialize, Serialize};

/// The composition of one step, as the cost model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Tokens of prompts (chunks) computed in the step.
    pub prefill_tokens: f64,
    /// Sequences computing one generated token.
    pub decode_seqs: f64,
    /// Σ over the batch of query tokens × the context each attends to.
    pub attention: f64,
    /// Distinct adapters in the step.
    pub adapters: f64,
    /// Σ over rows with an adapter of its rank.
    pub lora_rank_tokens: f64,
}

impl StepShape {
    /// One computed chunk of `n` tokens of a sequence that had `computed` tokens before it.
    pub fn add(&mut self, n: usize, computed: usize, prefill: bool, rank: Option<usize>) {
        if prefill {
            self.prefill_tokens += n as f64;
        } else {
            self.decode_seqs += 1.0;
        }
        // Token i of the chunk attends to computed + i + 1 positions.
        self.attention += n as f64 * (computed as f64 + (n as f64 + 1.0) / 2.0);
        if let Some(r) = rank {
            self.lora_rank_tokens += (n * r) as f64;
        }
    }

    fn features(&self) -> [f64; FEATURES] {
        [
            1.0,
            self.prefill_tokens,
            self.decode_seqs,
            self.attention / 1e3,
            self.adapters,
            self.lora_rank_tokens / 1e3,
        ]
    }
}

const FEATURES: usize = 6;
const FEATURE_NAMES: [&str; FEATURES] = [
    "step_s",
    "prefill_token_s",
    "decode_seq_s",
    "attention_kilo_s",
    "adapter_s",
    "lora_kilo_rank_token_s",
];

/// The engine limits an agent runs with (`serve` flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    pub max_batch_tokens: usize,
    pub max_prefill_chunk: usize,
    pub max_running: usize,
    /// KV block size (tokens per page).
    pub block_size: usize,
    /// Pages of the unified pool.
    pub pool_pages: usize,
}

/// A device's step-cost profile (a TOML file; `bench/profiles/` ships the measured ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCost {
    /// What was measured: device, cores, model.
    pub description: String,
    /// Decoder layers of the model (KV streams layer by layer).
    pub layers: usize,
    /// KV bytes of one token over all layers.
    pub kv_bytes_per_token: f64,
    /// Floats of one pool page (adapter rows are packed into pages of this size).
    pub page_floats: usize,
    /// Floats of one rank of an adapter over every layer and target module (A row + Bᵀ row).
    pub adapter_floats_per_rank: usize,
    /// KV channel bandwidth between a prefill and a decode agent, bytes/s.
    pub kv_bandwidth_bytes_per_s: f64,
    /// Fixed latency of a handoff (request, first chunk), seconds.
    pub kv_latency_s: f64,
    pub limits: AgentLimits,
    /// Seconds per step, whatever it computes.
    pub step_s: f64,
    pub prefill_token_s: f64,
    pub decode_seq_s: f64,
    /// Seconds per thousand (query token × context position) pairs.
    pub attention_kilo_s: f64,
    /// Seconds per distinct adapter in a step.
    pub adapter_s: f64,
    /// Seconds per thousand (token × rank) of LoRA rows.
    pub lora_kilo_rank_token_s: f64,
    /// Relative RMS error of the fit over the measured steps.
    pub fit_rel_rms: f64,
    /// Steps the fit was made from.
    pub fit_steps: usize,
}

/// The profile measured on the development machine (`bench/profiles/cpu-epyc-1core-small.toml`).
pub const DEFAULT_PROFILE: &str = include_str!("../../../profiles/cpu-epyc-1core-small.toml");

impl StepCost {
    pub fn parse(text: &str) -> anyhow::Result<StepCost> {
        let p: StepCost = toml::from_str(text)?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let coefficients = self.coefficients();
        anyhow::ensure!(
            coefficients.iter().all(|c| c.is_finite() && *c >= 0.0),
            "step-cost coefficients must be finite and non-negative: {coefficients:?}"
        );
        anyhow::ensure!(
            self.step_s > 0.0 || self.prefill_token_s > 0.0,
            "a step must cost something (step_s or prefill_token_s > 0)"
        );
        let l = &self.limits;
        anyhow::ensure!(
            l.max_batch_tokens > 0
                && l.max_prefill_chunk > 0
                && l.max_running > 0
                && l.block_size > 0
                && l.pool_pages > 0,
            "limits must be positive: {l:?}"
        );
        anyhow::ensure!(
            self.layers > 0 && self.kv_bytes_per_token > 0.0 && self.page_floats > 0,
            "layers, kv_bytes_per_token and page_floats must be positive"
        );
        anyhow::ensure!(
            self.kv_bandwidth_bytes_per_s > 0.0 && self.kv_latency_s >= 0.0,
            "kv_bandwidth_bytes_per_s must be positive and kv_latency_s non-negative"
        );
        Ok(())
    }

    fn coefficients(&self) -> [f64; FEATURES] {
        [
            self.step_s,
            self.prefill_token_s,
            self.decode_seq_s,
            self.attention_kilo_s,
            self.adapter_s,
            self.lora_kilo_rank_token_s,
        ]
    }

    fn set_coefficients(&mut self, c: [f64; FEATURES]) {
        [
            self.step_s,
            self.prefill_token_s,
            self.decode_seq_s,
            self.attention_kilo_s,
            self.adapter_s,
            self.lora_kilo_rank_token_s,
        ] = c;
    }

    /// Seconds one step of this shape takes.
    pub fn step(&self, shape: &StepShape) -> f64 {
        dot(&self.coefficients(), &shape.features())
    }

    /// Seconds between the end of a prompt's prefill and its KV being at the decode agent:
    /// the KV streams layer by layer while the prefill runs, so only the last layer's share is
    /// left when it ends.
    pub fn handoff_s(&self, prompt_tokens: usize) -> f64 {
        self.kv_latency_s
            + prompt_tokens as f64 * self.kv_bytes_per_token
                / self.layers as f64
                / self.kv_bandwidth_bytes_per_s
    }

    /// Pool pages an adapter of `rank` takes (its rows packed into pages).
    pub fn adapter_pages(&self, rank: usize) -> usize {
        (rank * self.adapter_floats_per_rank).div_ceil(self.page_floats)
    }

    /// Fits the coefficients to measured `(shape, seconds)` steps; returns the relative RMS
    /// error. Features the steps never exercise keep a zero coefficient.
    pub fn fit(&mut self, steps: &[(StepShape, f64)]) -> anyhow::Result<f64> {
        anyhow::ensure!(steps.len() >= FEATURES, "too few measured steps to fit");
        let rows: Vec<([f64; FEATURES], f64)> =
            steps.iter().map(|(s, t)| (s.features(), *t)).collect();
        let mut active = [true; FEATURES];
        for (i, used) in active.iter_mut().enumerate() {
            *used = rows.iter().any(|(f, _)| f[i] != 0.0);
        }
        let coefficients = loop {
            let c = weighted_least_squares(&rows, &active)
                .ok_or_else(|| anyhow::anyhow!("the measured steps do not determine a fit"))?;
            // Drop the most negative coefficient and refit (a cost is never negative).
            match (0..FEATURES)
                .filter(|&i| active[i] && c[i] < 0.0)
                .min_by(|&a, &b| c[a].total_cmp(&c[b]))
            {
                Some(i) => active[i] = false,
                None => break c,
            }
        };
        self.set_coefficients(coefficients);
        let rel: Vec<f64> = rows
            .iter()
            .map(|(f, t)| (dot(&coefficients, f) - t) / t)
            .collect();
        self.fit_rel_rms = (rel.iter().map(|e| e * e).sum::<f64>() / rel.len() as f64).sqrt();
        self.fit_steps = steps.len();
        Ok(self.fit_rel_rms)
    }

    /// The coefficients by name, for reports.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        FEATURE_NAMES.into_iter().zip(self.coefficients()).collect()
    }
}

fn dot(a: &[f64; FEATURES], b: &[f64; FEATURES]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises Σ ((f·c − t) / t)² over the active features (normal equations, Gaussian
/// elimination with partial pivoting). `None` when they are singular.
fn weighted_least_squares(
    rows: &[([f64; FEATURES], f64)],
    active: &[bool; FEATURES],
) -> Option<[f64; FEATURES]> {
    let idx: Vec<usize> = (0..FEATURES).filter(|&i| active[i]).collect();
    let n = idx.len();
    if n == 0 {
        return None;
    }
    // Scale each feature so the system is well conditioned.
    let scale: Vec<f64> = idx
        .iter()
        .map(|&i| {
            rows.iter()
                .map(|(f, t)| (f[i] / t).abs())
                .fold(0.0, f64::max)
                .max(1e-30)
        })
        .collect();
    let mut m = vec![vec![0.0; n + 1]; n];
    for (f, t) in rows {
        let x: Vec<f64> = idx.iter().zip(&scale).map(|(&i, s)| f[i] / t / s).collect();
        for r in 0..n {
            for c in 0..n {
                m[r][c] += x[r] * x[c];
            }
            m[r][n] += x[r]; // target t / t = 1
        }
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let k = row[col] / pivot_row[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= k * p;
                }
            }
        }
    }
    let mut out = [0.0; FEATURES];
    for (r, &i) in idx.iter().enumerate() {
        out[i] = m[r][n] / m[r][r] / scale[r];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> StepCost {
        StepCost::parse(DEFAULT_PROFILE).expect("the shipped profile parses")
    }

    #[test]
    fn the_fit_recovers_a_known_linear_cost() {
        let mut truth = profile();
        truth.set_coefficients([0.01, 2e-4, 1e-4, 3e-5, 5e-4, 2e-5]);
        let mut steps = Vec::new();
        for p in [0usize, 16, 64, 256] {
            for d in [0usize, 1, 8, 32] {
                for a in [0usize, 1, 4] {
                    let mut s = StepShape::default();
                    if p > 0 {
                        s.add(p, 0, true, (a > 0).then_some(16));
                    }
                    for i in 0..d {
                        s.add(1, 40 + i, false, (a > 1).then_some(8));
                    }
                    s.adapters = a as f64;
                    if p + d > 0 {
                        steps.push((s, truth.step(&s)));
                    }
                }
            }
        }
        let mut fitted = profile();
        let err = fitted.fit(&steps).unwrap();
        assert!(err < 1e-9, "relative RMS {err}");
        for ((name, a), (_, b)) in fitted.named().into_iter().zip(truth.named()) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1e-6),
                "{name}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn a_negative_coefficient_is_dropped_not_kept() {
        // Decode steps that cost less with more sequences: a fit would go negative there.
        let steps: Vec<(StepShape, f64)> = (1..=8)
            .map(|d| {
                let mut s = StepShape::default();
                for _ in 0..d {
                    s.add(1, 10, false, None);
                }
                (s, 0.02 - 0.0001 * d as f64)
            })
            .chain((1..=4).map(|k| {
                let mut s = StepShape::default();
                s.add(64 * k, 0, true, None);
                (s, 0.02 + 0.001 * (64 * k) as f64)
            }))
            .collect();
        let mut p = profile();
        p.fit(&steps).unwrap();
        assert!(p.named().iter().all(|(_, c)| *c >= 0.0), "{:?}", p.named());
        p.validate().unwrap();
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let text = DEFAULT_PROFILE.replace("step_s = ", "step_s = -");
        let err = StepCost::parse(&text).unwrap_err().to_string();
        assert!(err.contains("non-negative"), "{err}");
        let err = StepCost::parse("layers = 2").unwrap_err().to_string();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn handoff_is_the_last_layers_share_of_the_prompt_kv() {
        let p = profile();
        let t = p.handoff_s(1000) - p.kv_latency_s;
        let expect = 1000.0 * p.kv_bytes_per_token / p.layers as f64 / p.kv_bandwidth_bytes_per_s;
        assert!((t - expect).abs() < 1e-12);
    }
}
