//! The LoRA path of a heterogeneous batch, computed apart from the base GEMM:
//! `y[t] += scale · Σ_j (x[t] · A_j) Bᵀ_j`, where `A_j` are the rows of PEFT's `lora_A.weight`
//! `[r, in_dim]` and `Bᵀ_j` the columns of `lora_B.weight` `[out_dim, r]`, gathered from pages.
//!
//! This is S-LoRA's MBGMV (decode) / MBGMM (prefill), Punica's BGMV/SGMV: the batch is cut into
//! segments of consecutive rows that share one adapter, each with its own rank — adapters are
//! never padded to the maximum rank, and rows in no segment (the base model) cost nothing.
//!
//! `shrink` computes `v = x A` (`[T, max_rank]`), `expand` adds `scale · v Bᵀ` into `y`. A and Bᵀ
//! are given row by row as pool offsets, because an adapter's rows are scattered over pages.

use rayon::prelude::*;

use super::{PAR_MIN_WORK, check, simd};
use crate::KernelError;

/// One adapter's rows in a batch.
#[derive(Debug, Clone)]
pub struct LoraSegment<'a> {
    /// Batch rows that use this adapter.
    pub rows: std::ops::Range<usize>,
    /// Pool offsets of the `r` rows of A (each `in_dim` long); `r` is the segment's rank.
    pub a_rows: &'a [usize],
    /// Pool offsets of the `r` rows of Bᵀ (each `out_dim` long).
    pub b_rows: &'a [usize],
    /// `lora_alpha / r` (or `/ sqrt(r)` for rsLoRA), applied in `expand`.
    pub scale: f32,
}

/// Which of the segment's weight matrices a kernel reads.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    A,
    Bt,
}

/// Validates the segments for a batch of `rows` rows and returns each row's segment index
/// ([`check::NO_OWNER`] for base-model rows), plus the multiply-adds the kernel will do.
pub(crate) fn segment_owners(
    kernel: &'static str,
    segs: &[LoraSegment<'_>],
    rows: usize,
    max_rank: usize,
    pool_len: usize,
    side: Side,
    row_len: usize,
) -> Result<(Vec<usize>, usize), KernelError> {
    let owners = check::row_owners(
        kernel,
        rows,
        segs.iter().map(|s| (s.rows.start, s.rows.end)),
    )?;
    let mut work = 0usize;
    for (segment, seg) in segs.iter().enumerate() {
        let rank = seg.a_rows.len();
        if rank > max_rank || seg.b_rows.len() != rank {
            return Err(KernelError::BadRank {
                kernel,
                segment,
                rank,
                b_rank: seg.b_rows.len(),
                max_rank,
            });
        }
        let offsets = match side {
            Side::A => seg.a_rows,
            Side::Bt => seg.b_rows,
        };
        for &offset in offsets {
            check::pool_range(kernel, offset, row_len, pool_len)?;
        }
        work = work.saturating_add(seg.rows.len().saturating_mul(rank).saturating_mul(row_len));
    }
    Ok((owners, work))
}

/// Shrink: `v[t, j] = Σ_k x[t, k] · A_j[k]` for `j < rank(seg)`, and `0` for
/// `rank(seg) <= j < max_rank`, for every row `t` of every segment.
///
/// - `x`: `[T, in_dim]`; `v`: `[T, max_rank]`; `A_j` = `pool[a_rows[j] .. a_rows[j] + in_dim]`.
/// - The rank of a segment is `a_rows.len()`, which must equal `b_rows.len()`.
///
/// # Guarantees
/// Rows of `v` in no segment are left untouched (`expand` never reads them).
///
/// # Errors
/// `in_dim == 0`; `x`/`v` shapes; segments outside `0..T` or overlapping; a rank above
/// `max_rank` or differing between A and Bᵀ ([`KernelError::BadRank`]); an A row outside the
/// pool. `v` is untouched on error.
pub fn lora_shrink(
    x: &[f32],
    in_dim: usize,
    pool: &[f32],
    segs: &[LoraSegment<'_>],
    max_rank: usize,
    v: &mut [f32],
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora_shrink";
    let rows = check::rows(KERNEL, "x", x.len(), in_dim)?;
    check::len(
        KERNEL,
        "v",
        check::mul(KERNEL, "v", rows, max_rank)?,
        v.len(),
    )?;
    let (owners, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), Side::A, in_dim)?;
    if max_rank == 0 {
        return Ok(()); // every segment has rank 0 and v is empty
    }
    let per_row = |(t, v_row): (usize, &mut [f32])| {
        let Some(seg) = segs.get(owners[t]) else {
            return;
        };
        let x_row = &x[t * in_dim..(t + 1) * in_dim];
        let (active, padding) = v_row.split_at_mut(seg.a_rows.len());
        for (v, &offset) in active.iter_mut().zip(seg.a_rows) {
            *v = simd::dot(x_row, &pool[offset..offset + in_dim]);
        }
        padding.fill(0.0);
    };
    if work >= PAR_MIN_WORK {
        v.par_chunks_mut(max_rank).enumerate().for_each(per_row);
    } else {
        v.chunks_mut(max_rank).enumerate().for_each(per_row);
    }
    Ok(())
}

/// Expand: `y[t, o] += scale · Σ_{j < rank(seg)} v[t, j] · Bᵀ_j[o]` for every row `t` of every
/// segment.
///
/// - `v`: `[T, max_rank]` (columns `>= rank(seg)` are not read); `y`: `[T, out_dim]`;
///   `Bᵀ_j` = `pool[b_rows[j] .. b_rows[j] + out_dim]`.
/// - The sum over `j` is formed first and scaled once, as the formula reads.
///
/// # Guarantees
/// Rows of `y` in no segment, and rows of rank-0 segments, are left untouched.
///
/// # Errors
/// `out_dim == 0`; `v`/`y` shapes (`T` is taken from `y`); segments outside `0..T` or
/// overlapping; bad ranks; a Bᵀ row outside the pool. `y` is untouched on error.
pub fn lora_expand(
    v: &[f32],
    max_rank: usize,
    pool: &[f32],
    segs: &[LoraSegment<'_>],
    out_dim: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora_expand";
    let rows = check::rows(KERNEL, "y", y.len(), out_dim)?;
    check::len(
        KERNEL,
        "v",
        check::mul(KERNEL, "v", rows, max_rank)?,
        v.len(),
    )?;
    let (owners, work) =
        segment_owners(KERNEL, segs, rows, max_rank, pool.len(), Side::Bt, out_dim)?;
    // Tiles of TILE rows. Where a whole tile is one segment (prefill), the register-blocked
    // kernel reads each Bᵀ element once for the tile's rows; elsewhere (decode), row by row.
    let per_row = |acc: &mut Vec<f32>, t: usize, y_row: &mut [f32]| {
        let Some(seg) = segs.get(owners[t]) else {
            return;
        };
        if seg.b_rows.is_empty() {
            return;
        }
        acc.clear();
        acc.resize(out_dim, 0.0);
        let v_row = &v[t * max_rank..t * max_rank + seg.b_rows.len()];
        for (&vj, &offset) in v_row.iter().zip(seg.b_rows) {
            simd::axpy(acc, vj, &pool[offset..offset + out_dim]);
        }
        simd::axpy(y_row, seg.scale, acc);
    };
    let per_tile = |acc: &mut Vec<f32>, (tile, y_tile): (usize, &mut [f32])| {
        let t0 = tile * TILE;
        let owner = owners[t0];
        let whole = y_tile.len() == TILE * out_dim;
        if whole && owners[t0..t0 + TILE].iter().all(|&o| o == owner) {
            if let Some(seg) = segs.get(owner) {
                expand_tile(v, max_rank, t0, pool, seg, out_dim, y_tile);
            }
        } else {
            for (k, y_row) in y_tile.chunks_mut(out_dim).enumerate() {
                per_row(acc, t0 + k, y_row);
            }
        }
    };
    if work >= PAR_MIN_WORK {
        y.par_chunks_mut(out_dim * TILE)
            .enumerate()
            .for_each_init(Vec::new, per_tile);
    } else {
        let mut acc = Vec::new();
        y.chunks_mut(out_dim * TILE)
            .enumerate()
            .for_each(|item| per_tile(&mut acc, item));
    }
    Ok(())
}

/// Rows per tile of [`lora_expand`].
const TILE: usize = 4;
/// Output columns per register block of [`expand_tile`].
const COLS: usize = 8;

/// [`lora_expand`] for TILE consecutive rows `t0..` of one segment: for each block of COLS
/// output columns, TILE × COLS accumulators stay in registers while the segment's Bᵀ rows
/// stream past, so each Bᵀ element is loaded once for TILE rows (the row-by-row path loads it,
/// and loads and stores the accumulator, once per row).
fn expand_tile(
    v: &[f32],
    max_rank: usize,
    t0: usize,
    pool: &[f32],
    seg: &LoraSegment<'_>,
    out_dim: usize,
    y_tile: &mut [f32],
) {
    let rank = seg.b_rows.len();
    let v_rows: [&[f32]; TILE] =
        std::array::from_fn(|k| &v[(t0 + k) * max_rank..(t0 + k) * max_rank + rank]);
    let blocks = out_dim / COLS;
    for c in 0..blocks {
        let mut acc = [[0.0f32; COLS]; TILE];
        for (j, &offset) in seg.b_rows.iter().enumerate() {
            let b = &pool[offset + c * COLS..offset + (c + 1) * COLS];
            for (acc, v_row) in acc.iter_mut().zip(&v_rows) {
                let vj = v_row[j];
                for (acc, b) in acc.iter_mut().zip(b) {
                    *acc += vj * b;
                }
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            let y = &mut y_tile[k * out_dim + c * COLS..k * out_dim + (c + 1) * COLS];
            for (y, a) in y.iter_mut().zip(acc) {
                *y += seg.scale * a;
            }
        }
    }
    // Columns past the last whole block.
    for o in blocks * COLS..out_dim {
        for (k, v_row) in v_rows.iter().enumerate() {
            let sum: f32 = v_row
                .iter()
                .zip(seg.b_rows)
                .map(|(vj, &offset)| vj * pool[offset + o])
                .sum();
            y_tile[k * out_dim + o] += seg.scale * sum;
        }
    }
}
