//! Sampling primitives over one row of logits. The random draw is an argument (`uniform`), not
//! an RNG: the engine owns the seeded RNG, and a CUDA sampler given the same draw picks the same
//! token.
//!
//! Reductions over the vocabulary (the softmax normaliser, cumulative mass) run in f64: they sum
//! up to ~10⁵ terms, and the reference should be the accurate side of any parity test.

use std::cmp::Ordering;

use crate::KernelError;

const KERNEL: &str = "sample";

/// How to turn logits into a token (HF's temperature → top-k → top-p warper order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSpec {
    /// `<= 0` means greedy.
    pub temperature: f32,
    /// Keep the `k` most probable tokens; `None` keeps all. `Some(0)` is rejected: the engine
    /// maps the API's "disabled" spellings (0, -1) to `None`.
    pub top_k: Option<usize>,
    /// Keep the smallest most-probable set with mass `>= top_p`, in `(0, 1]`.
    pub top_p: Option<f32>,
}

/// Index and value of the largest logit. The lowest index wins ties; NaN never wins. `None`
/// when `logits` is empty or all NaN.
pub fn argmax(logits: &[f32]) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        match best {
            _ if x.is_nan() => {}
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best
}

/// `out[i] = logits[i] − log Σ_j exp(logits[j])`, stabilised by the maximum.
///
/// Non-finite input behaves as `torch.log_softmax`: a NaN, or no finite maximum (all `-inf`, or
/// a `+inf`), makes the affected outputs NaN. `-inf` entries give `-inf`.
///
/// # Errors
/// `out` not the length of `logits`.
pub fn log_softmax(logits: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    super::check::len("log_softmax", "out", logits.len(), out.len())?;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = f64::from(max) + sum_exp(logits, max).ln();
    for (o, &x) in out.iter_mut().zip(logits) {
        *o = (f64::from(x) - lse) as f32;
    }
    Ok(())
}

/// `Σ exp(x − max)` in f64 (NaN in, NaN out).
fn sum_exp(logits: &[f32], max: f32) -> f64 {
    logits
        .iter()
        .map(|&x| (f64::from(x) - f64::from(max)).exp())
        .sum()
}

/// Picks one token from `logits` with the draw `uniform ∈ [0, 1)`.
///
/// - `temperature <= 0`: greedy, the [`argmax`] (`uniform` is still validated, not used).
/// - Otherwise: scaled logits `s = (x − max) / temperature`; candidates are ordered by `s`
///   descending, then token id ascending (equal `s` ⇔ equal probability); keep the first
///   `top_k`; then the shortest prefix whose mass (renormalised over the kept top-k) is
///   `>= top_p`; renormalise and return the first token at which the cumulative probability
///   exceeds `uniform`. `-inf` logits are never candidates.
///
/// Returns `(token, logprob)`, the logprob being that of the token under the plain softmax of
/// the raw `logits` (no temperature or truncation), as the OpenAI `logprobs` field reports it.
///
/// # Guarantees
/// Deterministic: the same logits, spec and `uniform` give the same token. `top_k == Some(1)`
/// and a tiny `top_p` both give the argmax.
///
/// # Errors
/// A NaN or `+inf` logit ([`KernelError::InvalidLogit`]); no logits, or all `-inf`
/// ([`KernelError::EmptyDistribution`]); a NaN temperature, `top_k == Some(0)`, `top_p`
/// outside `(0, 1]`, `uniform` outside `[0, 1)` ([`KernelError::InvalidArgument`]).
pub fn sample(
    logits: &[f32],
    spec: &SamplingSpec,
    uniform: f32,
) -> Result<(usize, f32), KernelError> {
    validate_spec(spec, uniform)?;
    let mut max = f32::NEG_INFINITY;
    for (index, &value) in logits.iter().enumerate() {
        if value.is_nan() || value == f32::INFINITY {
            return Err(KernelError::InvalidLogit {
                kernel: KERNEL,
                index,
                value,
            });
        }
        max = max.max(value);
    }
    if max == f32::NEG_INFINITY {
        return Err(KernelError::EmptyDistribution {
            kernel: KERNEL,
            len: logits.len(),
        });
    }
    let log_norm = sum_exp(logits, max).ln();
    let logprob = |token: usize| (f64::from(logits[token]) - f64::from(max) - log_norm) as f32;

    let token = if spec.temperature <= 0.0 {
        match argmax(logits) {
            Some((token, _)) => token,
            None => {
                return Err(KernelError::EmptyDistribution {
                    kernel: KERNEL,
                    len: logits.len(),
                });
            }
        }
    } else {
        pick(logits, max, spec, uniform)
    };
    Ok((token, logprob(token)))
}

fn validate_spec(spec: &SamplingSpec, uniform: f32) -> Result<(), KernelError> {
    if spec.temperature.is_nan() {
        return Err(KernelError::invalid(KERNEL, "temperature", "is NaN"));
    }
    if spec.top_k == Some(0) {
        return Err(KernelError::invalid(
            KERNEL,
            "top_k",
            "must be at least 1 (use None to disable)",
        ));
    }
    if let Some(p) = spec.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(KernelError::invalid(
            KERNEL,
            "top_p",
            format!("{p} is not in (0, 1]"),
        ));
    }
    if !(0.0..1.0).contains(&uniform) {
        return Err(KernelError::invalid(
            KERNEL,
            "uniform",
            format!("{uniform} is not in [0, 1)"),
        ));
    }
    Ok(())
}

/// Probability descending (scaled logit descending), then token id ascending.
fn by_probability(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The non-greedy path of [`sample`]; `logits` are validated and `max` is finite.
fn pick(logits: &[f32], max: f32, spec: &SamplingSpec, uniform: f32) -> usize {
    // Subtracting the max before dividing keeps tiny temperatures from overflowing to inf.
    // `+ 0.0` turns -0.0 into 0.0 so that total_cmp sees equal probabilities as equal.
    let mut candidates: Vec<(f32, usize)> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x != f32::NEG_INFINITY)
        .map(|(id, &x)| ((x - max) / spec.temperature + 0.0, id))
        .collect();
    if let Some(k) = spec.top_k
        && k < candidates.len()
    {
        candidates.select_nth_unstable_by(k - 1, by_probability);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(by_probability);

    // The first candidate has s == 0: every weight is relative to the most probable token.
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&(s, _)| f64::from(s).exp())
        .collect();
    let mut keep = weights.len();
    if let Some(top_p) = spec.top_p
        && top_p < 1.0
    {
        let target = f64::from(top_p) * weights.iter().sum::<f64>();
        let mut mass = 0.0;
        for (i, w) in weights.iter().enumerate() {
            mass += w;
            if mass >= target {
                keep = i + 1;
                break;
            }
        }
    }
    let kept = &weights[..keep];
    let target = f64::from(uniform) * kept.iter().sum::<f64>();
    let mut mass = 0.0;
    for (i, w) in kept.iter().enumerate() {
        mass += w;
        if mass > target {
            return candidates[i].1;
        }
    }
    // Rounding left the total a hair under the draw: the last token that has any weight.
    let last = kept.iter().rposition(|&w| w > 0.0).unwrap_or(0);
    candidates[last].1
}
