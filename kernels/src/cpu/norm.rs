//! RMSNorm as Llama computes it (`LlamaRMSNorm`): `x · rsqrt(mean(x²) + eps) · weight`, in f32.

use rayon::prelude::*;

use super::{PAR_MIN_WORK, check, simd};
use crate::KernelError;

/// `out[t, i] = x[t, i] / sqrt(mean_i(x[t, i]²) + eps) · weight[i]`.
///
/// `x`, `out`: `[T, d]`; `weight`: `[d]` (`d = weight.len()`).
///
/// # Errors
/// `weight` empty, `x` not a whole number of rows of `d`, `out` not the length of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    const KERNEL: &str = "rms_norm";
    let d = weight.len();
    check::rows(KERNEL, "x", x.len(), d)?;
    check::len(KERNEL, "out", x.len(), out.len())?;
    let per_row = |(x, out): (&[f32], &mut [f32])| {
        // HF multiplies by rsqrt(variance + eps) and then by the weight, in that order.
        let inv = 1.0 / (simd::sum_squares(x) / d as f32 + eps).sqrt();
        for ((o, x), w) in out.iter_mut().zip(x).zip(weight) {
            *o = x * inv * w;
        }
    };
    if x.len() >= PAR_MIN_WORK {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(per_row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(per_row);
    }
    Ok(())
}
