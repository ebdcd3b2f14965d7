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

use super::gemm::{Contiguous, DOT_COLS, DOT_ROWS, Isa, MR, NR, axpy, dots, micro_axpy};
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
    /// `lora_alpha / r` (or `/ sqrt(r)` for rsLoRA), times the request's own scale for the
    /// adapter (composition), applied in `expand`.
    pub scale: f32,
}

/// Which of the segment's weight matrices a kernel reads.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    A,
    Bt,
}

/// Validates the segments for a batch of `rows` rows, and for each `(side, row length)` in
/// `sides` that the rows of that matrix lie in the pool. Returns each row's segment index
/// ([`check::NO_OWNER`] for base-model rows), plus the multiply-adds the kernel will do.
pub(crate) fn segment_owners(
    kernel: &'static str,
    segs: &[LoraSegment<'_>],
    rows: usize,
    max_rank: usize,
    pool_len: usize,
    sides: &[(Side, usize)],
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
        for &(side, row_len) in sides {
            let offsets = match side {
                Side::A => seg.a_rows,
                Side::Bt => seg.b_rows,
            };
            for &offset in offsets {
                check::pool_range(kernel, offset, row_len, pool_len)?;
            }
            work = work.saturating_add(seg.rows.len().saturating_mul(rank).saturating_mul(row_len));
        }
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
    let sides = [(Side::A, in_dim)];
    let (_, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), &sides)?;
    if max_rank == 0 {
        return Ok(()); // every segment has rank 0 and v is empty
    }
    let isa = Isa::detect();
    let chunks = segment_chunks(segs, v, max_rank);
    let per_chunk = |(seg, t0, v_rows): (&LoraSegment<'_>, usize, &mut [f32])| {
        let rank = seg.a_rows.len();
        let m = v_rows.len() / max_rank;
        shrink_rows(
            isa,
            &x[t0 * in_dim..(t0 + m) * in_dim],
            in_dim,
            pool,
            seg.a_rows,
            v_rows,
            max_rank,
            Lines::none(),
        );
        for v_row in v_rows.chunks_mut(max_rank) {
            v_row[rank..].fill(0.0);
        }
    };
    if work >= PAR_MIN_WORK {
        chunks.into_par_iter().for_each(per_chunk);
    } else {
        chunks.into_iter().for_each(per_chunk);
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
    let sides = [(Side::Bt, out_dim)];
    let (_, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), &sides)?;
    let isa = Isa::detect();
    let chunks = segment_chunks(segs, y, out_dim);
    let per_chunk = |acc: &mut Vec<f32>,
                     (seg, t0, y_rows): (&LoraSegment<'_>, usize, &mut [f32])| {
        let m = y_rows.len() / out_dim;
        let v = &v[t0 * max_rank..(t0 + m) * max_rank];
        expand_chunk(isa, v, max_rank, pool, seg, out_dim, y_rows, acc);
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

/// `y += scale · v · Bᵀ` for the rows of one chunk of a segment (`v`'s rows `ldv` apart).
#[allow(clippy::too_many_arguments)] // the expand's operands plus its scratch
fn expand_chunk(
    isa: Isa,
    v: &[f32],
    ldv: usize,
    pool: &[f32],
    seg: &LoraSegment<'_>,
    out_dim: usize,
    y_rows: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let rank = seg.b_rows.len();
    if rank == 0 {
        return;
    }
    let m = y_rows.len() / out_dim;
    if m >= PACK_MIN_ROWS {
        // Prefill: Bᵀ copied a block of columns at a time into the GEMM's panels.
        expand_tiles(isa, v, ldv, pool, seg, out_dim, y_rows, scratch);
    } else {
        // Decode: each Bᵀ row streamed once, in order, for every row of the segment; the
        // rows' sums stay in `scratch` (L1) until they are scaled into `y` once.
        scratch.clear();
        scratch.resize(m * out_dim, 0.0);
        for (j, &offset) in seg.b_rows.iter().enumerate() {
            let b = &pool[offset..offset + out_dim];
            for (acc, v) in scratch.chunks_mut(out_dim).zip(v.chunks(ldv)) {
                axpy(isa, acc, v[j], b);
            }
        }
        for (y, acc) in y_rows.chunks_mut(out_dim).zip(scratch.chunks(out_dim)) {
            axpy(isa, y, seg.scale, acc);
        }
    }
}

/// Shrink then expand, one chunk of a segment at a time: `y[t] += scale · (x[t]·Aᵀ)·Bᵀ` for
/// every row of every segment — the bits of [`lora_shrink`] followed by [`lora_expand`], with
/// the same arguments and guarantees (rows in no segment untouched), and the same errors
/// (`x` and `y` must hold the same rows; `y` is untouched on error).
///
/// Why fused: each task keeps its chunk's `x·Aᵀ` rows in a scratch buffer of its own (L1)
/// instead of a `[T, max_rank]` matrix written and read back through memory, and while the
/// chunk's shrink computes it asks for the first block of Bᵀ columns its expand reads first,
/// which adapters streaming from DRAM would otherwise stall on.
#[allow(clippy::too_many_arguments)] // both halves' operands
pub fn lora(
    x: &[f32],
    in_dim: usize,
    pool: &[f32],
    segs: &[LoraSegment<'_>],
    max_rank: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora";
    let rows = check::rows(KERNEL, "x", x.len(), in_dim)?;
    check::rows(KERNEL, "y", y.len(), out_dim)?;
    check::len(
        KERNEL,
        "y",
        check::mul(KERNEL, "y", rows, out_dim)?,
        y.len(),
    )?;
    let sides = [(Side::A, in_dim), (Side::Bt, out_dim)];
    let (_, work) = segment_owners(KERNEL, segs, rows, max_rank, pool.len(), &sides)?;
    let isa = Isa::detect();
    let chunks = segment_chunks(segs, y, out_dim);
    let per_chunk = |(seg, t0, y_rows): (&LoraSegment<'_>, usize, &mut [f32])| {
        let rank = seg.a_rows.len();
        if rank == 0 {
            return;
        }
        let m = y_rows.len() / out_dim;
        // Each thread's buffers live as long as it does: a task's would be allocated and
        // faulted in anew per task.
        SCRATCH.with_borrow_mut(|[v, acc]| {
            v.clear();
            v.resize(m * rank, 0.0);
            // What the expand reads first: the first block of every Bᵀ row (prefill), or the
            // start of each row (decode, which streams them in order).
            let first = EXPAND_COLS.min(out_dim);
            let warm = Lines::new(seg.b_rows, 0..first, Hint::L2);
            let x_rows = &x[t0 * in_dim..(t0 + m) * in_dim];
            if m == 1 {
                shrink_one(isa, x_rows, pool, seg.a_rows, v, warm);
            } else {
                shrink_rows(isa, x_rows, in_dim, pool, seg.a_rows, v, rank, warm);
            }
            expand_chunk(isa, v, rank, pool, seg, out_dim, y_rows, acc);
        });
    };
    if work >= PAR_MIN_WORK {
        chunks.into_par_iter().for_each(per_chunk);
    } else {
        chunks.into_iter().for_each(per_chunk);
    }
    Ok(())
}

thread_local! {
    /// [`lora`]'s per-thread buffers: a chunk's `x·Aᵀ` rows and the expand's panels.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new()])
    };
}

/// Segments of at least this many rows (prefill chunks) expand as GEMMs on packed panels;
/// shorter ones (decode) stream each adapter row once.
const PACK_MIN_ROWS: usize = 2 * MR;

/// `y += scale · v · Bᵀ` for a prefill segment: tiles of [`MR`] rows × [`NR`] columns; columns
/// past the last whole panel one by one.
///
/// Bᵀ's rows are `out_dim` apart in the pool (8 KiB for 2,048 outputs): read a panel at a time
/// in place, a rank-64 panel is 64 lines in one L1 set and 64 interleaved streams, too many
/// for the prefetchers. So [`EXPAND_COLS`] columns of every row are first copied, each row as
/// one sequential run, into panels laid out for the micro-kernel (`rank × NR` floats each, at
/// most 64 KiB in all); every row tile of the segment then reads them from cache and updates
/// its `y` rows as sequential runs too.
///
/// The sums are the decode path's: `Σ_j v_j · Bᵀ_j` in ascending `j` with FMA from zero, then
/// one FMA into `y` — so a row gets the same bits in a prefill and a decode segment.
#[allow(clippy::too_many_arguments)] // the expand's operands plus its scratch
fn expand_tiles(
    isa: Isa,
    v: &[f32],
    max_rank: usize,
    pool: &[f32],
    seg: &LoraSegment<'_>,
    out_dim: usize,
    y: &mut [f32],
    panels: &mut Vec<f32>,
) {
    let rank = seg.b_rows.len();
    let full = out_dim / NR * NR;
    for c0 in (0..full).step_by(EXPAND_COLS) {
        let cols = EXPAND_COLS.min(full - c0);
        // Every float of the panels is written below: grown once, never cleared.
        if panels.len() < cols * rank {
            panels.resize(cols * rank, 0.0);
        }
        let panels = &mut panels[..cols * rank];
        for (j, &offset) in seg.b_rows.iter().enumerate() {
            let row = &pool[offset + c0..offset + c0 + cols];
            for (p, src) in row.chunks_exact(NR).enumerate() {
                panels[(p * rank + j) * NR..][..NR].copy_from_slice(src);
            }
        }
        // The next block's columns of every Bᵀ row, asked for a slice per row tile while this
        // block computes: `rank` rows `out_dim` apart are too many streams for the hardware
        // prefetchers to follow.
        let mut next = Lines::new(
            seg.b_rows,
            c0 + cols..full.min(c0 + cols + EXPAND_COLS),
            Hint::L1,
        );
        let rows = v.len() / max_rank;
        let per_tile = next.len().div_ceil(rows.div_ceil(MR).max(1));
        for tile in balanced(rows, MR) {
            next.issue(pool, per_tile);
            let m = tile.len();
            let v_tile = &v[tile.start * max_rank..];
            let y_tile = &mut y[tile.start * out_dim..tile.end * out_dim];
            for (p, panel) in panels.chunks_exact(rank * NR).enumerate() {
                let y = &mut y_tile[c0 + p * NR..];
                micro_axpy(
                    isa,
                    m,
                    v_tile,
                    max_rank,
                    rank,
                    Contiguous(panel),
                    seg.scale,
                    y,
                    out_dim,
                );
            }
        }
    }
    for (v_row, y_row) in v.chunks(max_rank).zip(y.chunks_mut(out_dim)) {
        for o in full..out_dim {
            let sum = v_row[..rank]
                .iter()
                .zip(seg.b_rows)
                .fold(0.0f32, |sum, (vj, &offset)| {
                    vj.mul_add(pool[offset + o], sum)
                });
            y_row[o] = seg.scale.mul_add(sum, y_row[o]);
        }
    }
}

/// `0..rows` cut into the fewest tiles of at most `most` rows, as even as they come (32 rows
/// of at most 6: 6, 6, 5, 5, 5, 5): a last tile of one or two rows would leave the
/// micro-kernel too few independent accumulators to hide the FMA latency. Which tile a row is
/// in does not change its bits.
fn balanced(rows: usize, most: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let tiles = rows.div_ceil(most.max(1));
    let (base, extra) = (rows / tiles.max(1), rows % tiles.max(1));
    (0..tiles).scan(0, move |start, i| {
        let len = base + usize::from(i < extra);
        let tile = *start..*start + len;
        *start += len;
        Some(tile)
    })
}

/// Columns of Bᵀ a prefill expand packs at a time (see [`expand_tiles`]).
const EXPAND_COLS: usize = 16 * NR;

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

/// Which cache a prefetch fills.
#[derive(Clone, Copy)]
enum Hint {
    /// Needed within the next few thousand cycles.
    L1,
    /// Needed later: kept out of L1, where it would push out what is in use.
    L2,
}

/// Asks the CPU to bring the cache line holding `data[0]` closer (a hint; nothing on other
/// architectures or an empty slice).
#[inline]
fn prefetch(data: &[f32], hint: Hint) {
    #[cfg(target_arch = "x86_64")]
    if let Some(first) = data.first() {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let p = (first as *const f32).cast::<i8>();
        // SAFETY: SSE is part of x86-64; a prefetch never faults and `p` comes from a valid
        // reference.
        unsafe {
            match hint {
                Hint::L1 => _mm_prefetch::<_MM_HINT_T0>(p),
                Hint::L2 => _mm_prefetch::<_MM_HINT_T1>(p),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, hint);
}

/// The cache lines of columns `cols` of pool rows `rows` (offsets), to prefetch a few at a
/// time while other work runs: adapters stream from DRAM, in more streams (one per row) than
/// the hardware prefetchers follow.
struct Lines<'a> {
    rows: &'a [usize],
    cols: std::ops::Range<usize>,
    hint: Hint,
    /// The next line to ask for: its row, and its line within the row.
    row: usize,
    line: usize,
}

/// Floats per 64-byte cache line.
const LINE: usize = 16;

impl<'a> Lines<'a> {
    /// `cols` must lie inside every row (validated rows: `offset + row length <= pool`).
    fn new(rows: &'a [usize], cols: std::ops::Range<usize>, hint: Hint) -> Self {
        Lines {
            rows,
            cols,
            hint,
            row: 0,
            line: 0,
        }
    }

    fn none() -> Self {
        Lines::new(&[], 0..0, Hint::L1)
    }

    fn per_row(&self) -> usize {
        self.cols.len().div_ceil(LINE)
    }

    fn len(&self) -> usize {
        self.rows.len() * self.per_row()
    }

    /// Asks for the next `n` lines (fewer at the end).
    fn issue(&mut self, pool: &[f32], n: usize) {
        let per_row = self.per_row();
        for _ in 0..n {
            let Some(&offset) = self.rows.get(self.row) else {
                return;
            };
            let at = offset + self.cols.start + self.line * LINE;
            prefetch(pool.get(at..).unwrap_or_default(), self.hint);
            self.line += 1;
            if self.line == per_row {
                (self.row, self.line) = (self.row + 1, 0);
            }
        }
    }
}

/// `v[r][j] = x[r] · A_j` for every row `r` of `x` and every A row `j` of the segment, in tiles
/// of [`DOT_ROWS`] rows × [`DOT_COLS`] A rows read in place from their pages (no packing: a
/// segment's rows use A only `m` times, too few to repay a copy of it).
///
/// Over each block of [`SHRINK_K`] columns, A rows are the outer loop: a pair of them stays in
/// L1 while every row tile of the chunk streams past (from L2: the chunk's rows over one block),
/// so A is read from memory once per chunk, as two sequential streams the prefetchers follow.
/// Each dot is computed alone (see [`dots`]) and blocks are summed in order, so the order of
/// the loops does not change the bits.
#[allow(clippy::too_many_arguments)] // the shrink's operands plus what to prefetch
fn shrink_rows(
    isa: Isa,
    x: &[f32],
    in_dim: usize,
    pool: &[f32],
    a_rows: &[usize],
    v: &mut [f32],
    ldv: usize,
    mut warm: Lines<'_>,
) {
    let rows = x.len() / in_dim;
    let tiles = rows.div_ceil(DOT_ROWS).max(1);
    let pairs = a_rows.len().div_ceil(DOT_COLS);
    let blocks = in_dim.div_ceil(SHRINK_K);
    // `warm`'s lines (what the caller reads next), spread over every tile.
    let warm_per_tile = warm.len().div_ceil(tiles * pairs.max(1) * blocks);
    for k0 in (0..in_dim).step_by(SHRINK_K) {
        let k1 = in_dim.min(k0 + SHRINK_K);
        let mut j0 = 0;
        for (p, pair) in a_rows.chunks(DOT_COLS).enumerate() {
            let mut a: [&[f32]; DOT_COLS] = [&[]; DOT_COLS];
            for (a, &offset) in a.iter_mut().zip(pair) {
                *a = &pool[offset + k0..offset + k1];
            }
            // The next pair's block comes from memory (adapters stream from DRAM): ask for it
            // a slice per tile while this pair computes, so it is in cache when it starts.
            let following = a_rows.get((p + 1) * DOT_COLS..).unwrap_or_default();
            let mut next = Lines::new(
                &following[..following.len().min(DOT_COLS)],
                k0..k1,
                Hint::L1,
            );
            let per_tile = next.len().div_ceil(tiles);
            for t0 in (0..rows).step_by(DOT_ROWS) {
                next.issue(pool, per_tile);
                warm.issue(pool, warm_per_tile);
                let m = DOT_ROWS.min(rows - t0);
                let x = &x[t0 * in_dim + k0..(t0 + m - 1) * in_dim + k1];
                let sums = dots(isa, x, in_dim, m, &a[..pair.len()]);
                for (r, sums) in sums.iter().enumerate().take(m) {
                    let v_row = &mut v[(t0 + r) * ldv + j0..][..pair.len()];
                    for (v, &sum) in v_row.iter_mut().zip(sums) {
                        // Blocks are added in order, so the bits do not depend on the tile.
                        *v = if k0 == 0 { sum } else { *v + sum };
                    }
                }
            }
            j0 += pair.len();
        }
    }
}

/// [`shrink_rows`] for one row of `x` (a decode segment): `v[j] = x · A_j`, each A row read
/// whole, block after block, before the next. A's rows lie back to back in their pages, so the
/// shrink is one sequential read stream, the pattern the hardware prefetchers follow best;
/// pairs of rows read side by side are two interleaved streams, each too short to train on.
/// The blocks and their order are [`shrink_rows`]'s, and [`dots`] computes each dot alone, so
/// the bits are the same.
fn shrink_one(
    isa: Isa,
    x: &[f32],
    pool: &[f32],
    a_rows: &[usize],
    v: &mut [f32],
    mut warm: Lines<'_>,
) {
    let in_dim = x.len();
    let warm_per_row = warm.len().div_ceil(a_rows.len().max(1));
    for (v, &offset) in v.iter_mut().zip(a_rows) {
        warm.issue(pool, warm_per_row);
        let a = &pool[offset..offset + in_dim];
        for k0 in (0..in_dim).step_by(SHRINK_K) {
            let k1 = in_dim.min(k0 + SHRINK_K);
            let sum = dots(isa, &x[k0..k1], in_dim, 1, &[&a[k0..k1]])[0][0];
            *v = if k0 == 0 { sum } else { *v + sum };
        }
    }
}

/// Depth of a shrink block: a tile's rows of `x` over one block (3 × 4 KiB) and a pair of A
/// rows over it (8 KiB) stay in L1, and the chunk's rows over it in L2, however long the rows
/// (14,336 floats for a Llama-3-8B down projection). A dot over more is the sum of its
/// blocks' dots, in block order, prefill and decode alike.
const SHRINK_K: usize = 1024;
