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

use super::gemm::{Contiguous, Gathered, Isa, KC, MR, NR, axpy, dots, micro};
use super::{PAR_MIN_WORK, check};
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
    let (_, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), Side::A, in_dim)?;
    if max_rank == 0 {
        return Ok(()); // every segment has rank 0 and v is empty
    }
    let isa = Isa::detect();
    let chunks = segment_chunks(segs, v, max_rank);
    let per_chunk = |packed: &mut Vec<f32>,
                     (seg, t0, v_rows): (&LoraSegment<'_>, usize, &mut [f32])| {
        let rank = seg.a_rows.len();
        let m = v_rows.len() / max_rank;
        let x = &x[t0 * in_dim..(t0 + m) * in_dim];
        if m >= PACK_MIN_ROWS && rank > 0 {
            // Prefill: A packed once into GEMM panels, then the base GEMM's tiles.
            pack_rows(pool, seg.a_rows, in_dim, packed);
            gemm_rows(isa, x, in_dim, packed, rank, v_rows, max_rank);
        } else {
            // Decode: each A row read once for up to MR rows, no packing.
            for (x, v_tile) in x.chunks(MR * in_dim).zip(v_rows.chunks_mut(MR * max_rank)) {
                shrink_tile(isa, x, in_dim, pool, seg.a_rows, v_tile, max_rank);
            }
        }
        for v_row in v_rows.chunks_mut(max_rank) {
            v_row[rank..].fill(0.0);
        }
    };
    if work >= PAR_MIN_WORK {
        chunks.into_par_iter().for_each_init(Vec::new, per_chunk);
    } else {
        let mut packed = Vec::new();
        chunks
            .into_iter()
            .for_each(|chunk| per_chunk(&mut packed, chunk));
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
    let (_, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), Side::Bt, out_dim)?;
    let isa = Isa::detect();
    let chunks = segment_chunks(segs, y, out_dim);
    let per_chunk = |acc: &mut Vec<f32>,
                     (seg, t0, y_rows): (&LoraSegment<'_>, usize, &mut [f32])| {
        let rank = seg.b_rows.len();
        if rank == 0 {
            return;
        }
        let m = y_rows.len() / out_dim;
        let v = &v[t0 * max_rank..(t0 + m) * max_rank];
        if m >= PACK_MIN_ROWS {
            // Prefill: Bᵀ's rows are already the GEMM's panel rows; tiles read them in place.
            expand_tiles(isa, v, max_rank, pool, seg, out_dim, y_rows);
        } else {
            // Decode: each Bᵀ row streamed once, in order, for every row of the segment; the
            // rows' sums stay in `acc` (L1) until they are scaled into `y` once.
            acc.clear();
            acc.resize(m * out_dim, 0.0);
            for (j, &offset) in seg.b_rows.iter().enumerate() {
                let b = &pool[offset..offset + out_dim];
                for (acc, v) in acc.chunks_mut(out_dim).zip(v.chunks(max_rank)) {
                    axpy(isa, acc, v[j], b);
                }
            }
            for (y, acc) in y_rows.chunks_mut(out_dim).zip(acc.chunks(out_dim)) {
                axpy(isa, y, seg.scale, acc);
            }
        }
    };
    if work >= PAR_MIN_WORK {
        chunks.into_par_iter().for_each_init(Vec::new, per_chunk);
    } else {
        let mut acc = Vec::new();
        chunks
            .into_iter()
            .for_each(|chunk| per_chunk(&mut acc, chunk));
    }
    Ok(())
}

/// Segments of at least this many rows (prefill chunks) run as GEMMs on packed or in-place
/// panels; shorter ones (decode) stream each adapter row once.
const PACK_MIN_ROWS: usize = 2 * MR;

/// Packs the `rank` rows of A (each `in_dim` long, at pool offsets `a_rows`) into GEMM panels
/// of [`NR`] columns, `k`-major, the last panel zero-padded (see `gemm::PackedMatrix`).
fn pack_rows(pool: &[f32], a_rows: &[usize], in_dim: usize, packed: &mut Vec<f32>) {
    let panels = a_rows.len().div_ceil(NR);
    packed.clear();
    packed.resize(panels * in_dim * NR, 0.0);
    for (j, &offset) in a_rows.iter().enumerate() {
        let panel = &mut packed[j / NR * in_dim * NR..];
        for (k, &a) in pool[offset..offset + in_dim].iter().enumerate() {
            panel[k * NR + j % NR] = a;
        }
    }
}

/// `v[:, ..rank] = x · Aᵀ` for the rows of `x` against A packed by [`pack_rows`].
fn gemm_rows(
    isa: Isa,
    x: &[f32],
    in_dim: usize,
    packed: &[f32],
    rank: usize,
    v: &mut [f32],
    max_rank: usize,
) {
    let rows = x.len() / in_dim;
    for k0 in (0..in_dim).step_by(KC) {
        let kc = KC.min(in_dim - k0);
        for p in 0..rank.div_ceil(NR) {
            let cols = NR.min(rank - p * NR);
            let b = Contiguous(&packed[p * in_dim * NR + k0 * NR..][..kc * NR]);
            for (i, v_tile) in v.chunks_mut(MR * max_rank).enumerate() {
                let m = v_tile.len() / max_rank;
                let acc = micro(isa, m, &x[i * MR * in_dim + k0..], in_dim, kc, b);
                for (v_row, acc) in v_tile.chunks_mut(max_rank).zip(&acc) {
                    let v = &mut v_row[p * NR..p * NR + cols];
                    for (v, &a) in v.iter_mut().zip(acc) {
                        if k0 == 0 { *v = a } else { *v += a }
                    }
                }
            }
        }
    }
    debug_assert_eq!(rows * max_rank, v.len());
}

/// `y += scale · v · Bᵀ` for a prefill segment: tiles of [`MR`] rows × [`NR`] columns with Bᵀ's
/// rows read in place from their pages; columns past the last whole panel one by one.
///
/// Column panels are the outer loop: one panel of Bᵀ (rank × 16 floats, at most 4 KiB) stays in
/// L1 while every row tile of the segment uses it, so Bᵀ is read from memory once per segment.
/// Row tiles outside would stream all of Bᵀ once per tile — from DRAM when it outgrows L2 (rank
/// 64 × 2048 outputs is 512 KiB), with `rank` scattered rows too many for the prefetchers.
fn expand_tiles(
    isa: Isa,
    v: &[f32],
    max_rank: usize,
    pool: &[f32],
    seg: &LoraSegment<'_>,
    out_dim: usize,
    y: &mut [f32],
) {
    let rank = seg.b_rows.len();
    let full = out_dim / NR * NR;
    let b = Gathered::new(pool, seg.b_rows, out_dim);
    for col in (0..full).step_by(NR) {
        let panel = b.at(col);
        for (v_tile, y_tile) in v.chunks(MR * max_rank).zip(y.chunks_mut(MR * out_dim)) {
            let m = y_tile.len() / out_dim;
            let acc = micro(isa, m, v_tile, max_rank, rank, panel);
            for (y_row, acc) in y_tile.chunks_mut(out_dim).zip(&acc) {
                for (y, a) in y_row[col..col + NR].iter_mut().zip(acc) {
                    *y += seg.scale * a;
                }
            }
        }
    }
    for (v_tile, y_tile) in v.chunks(MR * max_rank).zip(y.chunks_mut(MR * out_dim)) {
        for o in full..out_dim {
            for (v_row, y_row) in v_tile.chunks(max_rank).zip(y_tile.chunks_mut(out_dim)) {
                let sum: f32 = v_row[..rank]
                    .iter()
                    .zip(seg.b_rows)
                    .map(|(vj, &offset)| vj * pool[offset + o])
                    .sum();
                y_row[o] += seg.scale * sum;
            }
        }
    }
}

/// Rows per parallel task: enough tiles to amortise a task, few enough that a long prefill
/// segment spreads over every thread.
const CHUNK_ROWS: usize = 8 * MR;

/// Cuts `out` (`[T, width]`) into the row chunks of every segment (at most [`CHUNK_ROWS`] rows
/// each), as `(segment, first row, rows)`, so tasks own disjoint rows. Segments were validated
/// as disjoint ranges inside `0..T`.
fn segment_chunks<'s, 'a, 'o>(
    segs: &'s [LoraSegment<'a>],
    out: &'o mut [f32],
    width: usize,
) -> Vec<(&'s LoraSegment<'a>, usize, &'o mut [f32])> {
    let mut order: Vec<&LoraSegment<'a>> = segs.iter().filter(|s| !s.rows.is_empty()).collect();
    order.sort_by_key(|s| s.rows.start);
    let mut chunks = Vec::new();
    let mut rest = out;
    let mut at = 0;
    for seg in order {
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut((seg.rows.start - at) * width);
        let (mine, tail) = tail.split_at_mut(seg.rows.len() * width);
        rest = tail;
        at = seg.rows.end;
        for (i, rows) in mine.chunks_mut(CHUNK_ROWS * width).enumerate() {
            chunks.push((seg, seg.rows.start + i * CHUNK_ROWS, rows));
        }
    }
    chunks
}

/// `v[r][j] = x[r] · A_j` for the `m = x.len() / in_dim` (≤ MR) rows of a tile and every A row
/// `j` of the segment: each A row is read once for all the tile's rows.
fn shrink_tile(
    isa: Isa,
    x: &[f32],
    in_dim: usize,
    pool: &[f32],
    a_rows: &[usize],
    v: &mut [f32],
    max_rank: usize,
) {
    for (j, &offset) in a_rows.iter().enumerate() {
        let a = &pool[offset..offset + in_dim];
        let sums = dots(isa, x, a);
        for (k, sum) in sums.iter().enumerate().take(x.len() / in_dim) {
            v[k * max_rank + j] = *sum;
        }
    }
}
