//! Pointwise kernels and the embedding lookup: SwiGLU's `silu(gate) · up`, residual add,
//! gathering token rows of the embedding table, and a streaming sum (the memory-bandwidth probe
//! of `loraplane-bench roofline`).

use rayon::prelude::*;

use super::{PAR_MIN_WORK, check};
use crate::KernelError;

/// Elements per rayon task for pointwise work: large enough to amortise the task, small enough
/// to balance across cores.
const CHUNK: usize = 1 << 14;

/// `out[i] = gate[i] · sigmoid(gate[i]) · up[i]` (SiLU-gated MLP, `act_fn(gate) * up`).
///
/// # Errors
/// `up` or `out` not the length of `gate`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    const KERNEL: &str = "silu_mul";
    check::len(KERNEL, "up", gate.len(), up.len())?;
    check::len(KERNEL, "out", gate.len(), out.len())?;
    let run = |((out, gate), up): ((&mut [f32], &[f32]), &[f32])| {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    };
    if gate.len() >= PAR_MIN_WORK {
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK))
            .for_each(run);
    } else {
        run(((out, gate), up));
    }
    Ok(())
}

/// `x[i] += y[i]` (residual connection).
///
/// # Errors
/// `y` not the length of `x`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) -> Result<(), KernelError> {
    check::len("add_inplace", "y", x.len(), y.len())?;
    let run = |(x, y): (&mut [f32], &[f32])| {
        for (x, y) in x.iter_mut().zip(y) {
            *x += y;
        }
    };
    if x.len() >= PAR_MIN_WORK {
        x.par_chunks_mut(CHUNK)
            .zip(y.par_chunks(CHUNK))
            .for_each(run);
    } else {
        run((x, y));
    }
    Ok(())
}

/// `out[t] = table[ids[t]]`: `table` is `[V, d]`, `out` is `[ids.len(), d]`.
///
/// # Errors
/// `d == 0` or `table` not a whole number of rows; `out` of the wrong length; an id `>= V`
/// ([`KernelError::TokenOutOfRange`]). `out` is untouched on error.
pub fn embedding(ids: &[u32], table: &[f32], d: usize, out: &mut [f32]) -> Result<(), KernelError> {
    const KERNEL: &str = "embedding";
    let vocab = check::rows(KERNEL, "table", table.len(), d)?;
    check::len(
        KERNEL,
        "out",
        check::mul(KERNEL, "out", ids.len(), d)?,
        out.len(),
    )?;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(KernelError::TokenOutOfRange {
            kernel: KERNEL,
            id,
            vocab,
        });
    }
    let copy = |(&id, out): (&u32, &mut [f32])| {
        let at = id as usize * d;
        out.copy_from_slice(&table[at..at + d]);
    };
    if out.len() >= PAR_MIN_WORK {
        ids.par_iter().zip(out.par_chunks_mut(d)).for_each(copy);
    } else {
        ids.iter().zip(out.chunks_mut(d)).for_each(copy);
    }
    Ok(())
}

/// `Σ x[i]`, reading `x` once with every core: the read stream `bench roofline` measures memory
/// bandwidth with. Lane accumulators keep it bandwidth-bound rather than bound by the latency
/// of one add chain (the summation order is therefore not left-to-right).
pub fn stream_sum(x: &[f32]) -> f32 {
    let lanes = |c: &[f32]| {
        let (chunks, tail) = c.as_chunks::<16>();
        let mut acc = [0.0f32; 16];
        for ch in chunks {
            for (a, v) in acc.iter_mut().zip(ch) {
                *a += v;
            }
        }
        acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
    };
    if x.len() >= PAR_MIN_WORK {
        x.par_chunks(CHUNK).map(lanes).sum()
    } else {
        lanes(x)
    }
}
