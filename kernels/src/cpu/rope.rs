//! Rotary position embedding in the rotate-half (GPT-NeoX / HF Llama) convention, with the
//! inverse frequencies computed the way Hugging Face transformers computes them (default and
//! `rope_type: "llama3"`), so that our cos/sin tables match HF's in f32.

use rayon::prelude::*;

use super::{PAR_MIN_WORK, check};
use crate::KernelError;

/// HF `rope_scaling` with `rope_type: "llama3"` (Llama 3.1+).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The `head_dim / 2` inverse frequencies of rotary pair `i`, as HF
/// `_compute_default_rope_parameters` (then `_compute_llama3_parameters` when `scaling` is
/// given) computes them: `1 / theta^(2i / head_dim)` in f32, then llama3's per-band rescaling.
///
/// Values come out as HF's do, including for nonsense configs (a zero `factor` gives `inf`);
/// rejecting those belongs to config parsing. An odd `head_dim` gives `ceil(head_dim / 2)`
/// entries like `torch.arange(0, dim, 2)`, which [`rope`] then refuses.
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    // torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
    let inv_freq = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32));
    let Some(s) = scaling else {
        return inv_freq.collect();
    };
    // Python-scalar arithmetic happens in f64 and meets the f32 tensor as an f32.
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = (old_context / f64::from(s.low_freq_factor)) as f32;
    let high_freq_wavelen = (old_context / f64::from(s.high_freq_factor)) as f32;
    let band = (f64::from(s.high_freq_factor) - f64::from(s.low_freq_factor)) as f32;
    let two_pi = std::f64::consts::TAU as f32;
    inv_freq
        .map(|f| {
            let wavelen = two_pi / f;
            // Same two `torch.where`s as HF, so even inverted bands behave identically.
            let scaled = if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                f
            };
            let medium = !(wavelen < high_freq_wavelen || wavelen > low_freq_wavelen);
            if medium {
                let smooth = (old_context as f32 / wavelen - s.low_freq_factor) / band;
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// Precomputed `cos`/`sin` of `position · inv_freq[i]`, `[max_positions, half_dim]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// `inv_freq.len()`, i.e. `head_dim / 2`.
    pub half_dim: usize,
    pub max_positions: usize,
}

impl RopeTable {
    /// Builds the table for positions `0..max_positions`. The angle is `(p as f32) · inv_freq`
    /// in f32, as HF's `inv_freq @ position_ids` (and candle's llama) forms it, so large positions
    /// round the same way.
    pub fn new(inv_freq: &[f32], max_positions: usize) -> Self {
        let half_dim = inv_freq.len();
        let len = half_dim.saturating_mul(max_positions);
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for p in 0..max_positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half_dim,
            max_positions,
        }
    }
}

/// In-place rotary embedding of `x`: `[T, num_heads, head_dim]`, token `t` at `positions[t]`.
///
/// For each head, with `half = head_dim / 2` and `i < half`: `x1 = x[i]`, `x2 = x[i + half]`,
/// `x[i] = x1·cos − x2·sin`, `x[i + half] = x2·cos + x1·sin`.
///
/// # Errors
/// `num_heads` or `head_dim` zero, `head_dim` odd or not `2 · table.half_dim`; a table whose
/// vectors are not `[max_positions, half_dim]`; `x` not `[positions.len(), num_heads,
/// head_dim]`; a position `>= max_positions` ([`KernelError::PositionOutOfRange`]). `x` is
/// untouched on error.
pub fn rope(
    x: &mut [f32],
    num_heads: usize,
    head_dim: usize,
    positions: &[usize],
    table: &RopeTable,
) -> Result<(), KernelError> {
    const KERNEL: &str = "rope";
    check::nonzero(KERNEL, "num_heads", num_heads)?;
    check::nonzero(KERNEL, "head_dim", head_dim)?;
    if !head_dim.is_multiple_of(2) || head_dim / 2 != table.half_dim {
        return Err(KernelError::invalid(
            KERNEL,
            "head_dim",
            format!(
                "{head_dim} is not even and twice the table's half_dim {}",
                table.half_dim
            ),
        ));
    }
    let table_len = check::mul(KERNEL, "table", table.max_positions, table.half_dim)?;
    check::len(KERNEL, "table.cos", table_len, table.cos.len())?;
    check::len(KERNEL, "table.sin", table_len, table.sin.len())?;
    let row = check::mul(KERNEL, "num_heads * head_dim", num_heads, head_dim)?;
    check::len(
        KERNEL,
        "x",
        check::mul(KERNEL, "x", positions.len(), row)?,
        x.len(),
    )?;
    if let Some(&position) = positions.iter().find(|&&p| p >= table.max_positions) {
        return Err(KernelError::PositionOutOfRange {
            kernel: KERNEL,
            position,
            max_positions: table.max_positions,
        });
    }
    let half = table.half_dim;
    let per_token = |(x, &pos): (&mut [f32], &usize)| {
        let cos = &table.cos[pos * half..(pos + 1) * half];
        let sin = &table.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x2 * c + x1 * s;
            }
        }
    };
    if x.len() >= PAR_MIN_WORK {
        x.par_chunks_mut(row)
            .zip(positions.par_iter())
            .for_each(per_token);
    } else {
        x.chunks_mut(row).zip(positions).for_each(per_token);
    }
    Ok(())
}
