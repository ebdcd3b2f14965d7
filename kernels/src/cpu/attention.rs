//! Causal paged attention over the KV pages of the unified pool (vLLM PagedAttention), one
//! kernel for prefill chunks and decode rows alike (Sarathi-Serve mixes both in one batch).
//!
//! Each sequence contributes `q_len` consecutive query rows whose absolute positions start at
//! `pos_start`; a chunk that starts mid-sequence attends to the cached prefix plus the part of
//! itself up to each row (the chunk's own K/V must already be written with `write_kv`).
//!
//! Work is cut into items of (sequence, KV head, tile of up to 16 query rows): every key and
//! value row is read once per tile for all the query heads of its group, rather than once per
//! query head, which makes prefill compute-bound instead of memory-bound (~6x on a 4k context).

use rayon::prelude::*;

use super::kv::KvGeometry;
use super::{KvLayout, PAR_MIN_WORK, check, simd};
use crate::KernelError;

/// The query rows of one sequence in a batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First row of this sequence in `q` (and `out`).
    pub q_start: usize,
    /// Number of query rows (1 for decode, the chunk length for prefill).
    pub q_len: usize,
    /// Absolute position of the first query row.
    pub pos_start: usize,
    /// Page ids of this layer's KV blocks, in order: block `i` holds positions
    /// `i * block_size .. (i + 1) * block_size`.
    pub block_table: &'a [u32],
}

const KERNEL: &str = "paged_attention";

/// Causal grouped-query attention of `q` against the paged KV cache.
///
/// - `q`: `[T, num_heads * head_dim]`; `out`: `[T, num_heads, head_dim]` (same length).
/// - Query row at absolute position `p` attends to cached positions
///   `max(0, p + 1 - window) ..= p`, `window = sliding_window` (unlimited when `None`).
/// - Query head `h` reads KV head `h / (num_heads / num_kv_heads)`.
/// - Softmax subtracts the row maximum; scores, weights and the weighted sum are f32.
///
/// # Guarantees
/// Rows of `out` not covered by any sequence are left untouched. Only the blocks a sequence
/// actually reads are looked up, so with a sliding window the entries of blocks that fell out
/// of every row's window may hold any value (e.g. a freed page).
///
/// # Errors
/// Invalid layout; `num_heads` zero or not a multiple of `num_kv_heads`; `q`/`out` shapes;
/// `sliding_window == Some(0)`; a sequence outside `0..T` or overlapping another
/// ([`KernelError::RowsOutOfRange`], [`KernelError::RowsOverlap`]); a block table too short for
/// the last position ([`KernelError::BlockTableTooShort`]) or naming a page beyond the pool.
/// `out` is untouched on error.
pub fn paged_attention(
    layout: &KvLayout,
    q: &[f32],
    num_heads: usize,
    pool: &[f32],
    seqs: &[AttnSeq<'_>],
    scale: f32,
    sliding_window: Option<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let g = layout.geometry(KERNEL, pool.len())?;
    check::nonzero(KERNEL, "num_heads", num_heads)?;
    if !num_heads.is_multiple_of(layout.num_kv_heads) {
        return Err(KernelError::invalid(
            KERNEL,
            "num_heads",
            format!(
                "{num_heads} query heads are not a multiple of {} KV heads",
                layout.num_kv_heads
            ),
        ));
    }
    if sliding_window == Some(0) {
        return Err(KernelError::invalid(
            KERNEL,
            "sliding_window",
            "must be at least 1",
        ));
    }
    let q_width = check::mul(KERNEL, "num_heads * head_dim", num_heads, g.head_dim)?;
    let rows = check::rows(KERNEL, "q", q.len(), q_width)?;
    check::len(KERNEL, "out", q.len(), out.len())?;
    // Rows are computed from their sequence directly; the map only proves the rows disjoint.
    check::row_owners(
        KERNEL,
        rows,
        seqs.iter()
            .map(|s| (s.q_start, s.q_start.saturating_add(s.q_len))),
    )?;
    let mut work = 0usize;
    for (index, seq) in seqs.iter().enumerate() {
        if seq.q_len == 0 {
            continue;
        }
        let last = check::add(KERNEL, "pos_start + q_len", seq.pos_start, seq.q_len - 1)?;
        let first = window_start(seq.pos_start, sliding_window);
        let (first_block, last_block) = (first / g.block_size, last / g.block_size);
        let Some(blocks) = seq.block_table.get(first_block..=last_block) else {
            return Err(KernelError::BlockTableTooShort {
                kernel: KERNEL,
                seq: index,
                blocks: seq.block_table.len(),
                needed: last_block + 1,
            });
        };
        if let Some(&page) = blocks.iter().find(|&&p| p as usize >= g.num_pages) {
            return Err(KernelError::PageOutOfRange {
                kernel: KERNEL,
                page: page as usize,
                num_pages: g.num_pages,
            });
        }
        // Keys read per row are bounded by the last row's context; a cheap upper bound suffices.
        let context = last - window_start(last, sliding_window) + 1;
        work = work.saturating_add(
            seq.q_len
                .saturating_mul(context)
                .saturating_mul(q_width)
                .saturating_mul(2),
        );
    }

    let ctx = Ctx {
        g,
        q,
        pool,
        num_heads,
        group: num_heads / layout.num_kv_heads,
        scale,
        sliding_window,
    };
    let items = ctx.items(seqs);
    let run = |item: &Item<'_>| ctx.run(item);
    let results: Vec<Vec<f32>> = if work >= PAR_MIN_WORK {
        items.par_iter().map(run).collect()
    } else {
        items.iter().map(run).collect()
    };
    // Scatter serially: each item owns a [rows, group, head_dim] block that is strided in `out`.
    let (hd, group_width) = (g.head_dim, ctx.group * g.head_dim);
    for (item, result) in items.iter().zip(&results) {
        for (r, block) in result.chunks_exact(group_width).enumerate() {
            let at = ((item.seq.q_start + item.first_row + r) * num_heads
                + item.kv_head * ctx.group)
                * hd;
            out[at..at + group_width].copy_from_slice(block);
        }
    }
    Ok(())
}

/// First position visible from a query at `pos`.
#[inline]
fn window_start(pos: usize, sliding_window: Option<usize>) -> usize {
    // max(0, pos + 1 - w), without overflowing at pos == usize::MAX (w >= 1 is validated).
    sliding_window.map_or(0, |w| pos.saturating_sub(w.saturating_sub(1)))
}

/// Query rows handled together by one work item: every key and value row is loaded once per
/// tile and used for `TILE_ROWS * group` query heads, instead of once per query head.
const TILE_ROWS: usize = 16;
/// Upper bound on one work item's score buffer (floats); long contexts get shorter tiles.
const SCORE_BUDGET: usize = 1 << 20;

/// One work item: a tile of consecutive query rows of one sequence, all query heads that share
/// one KV head.
struct Item<'a> {
    seq: &'a AttnSeq<'a>,
    kv_head: usize,
    /// First row of the tile, relative to the sequence.
    first_row: usize,
    rows: usize,
}

/// The validated inputs every work item reads.
struct Ctx<'a> {
    g: KvGeometry,
    q: &'a [f32],
    pool: &'a [f32],
    num_heads: usize,
    group: usize,
    scale: f32,
    sliding_window: Option<usize>,
}

impl Ctx<'_> {
    fn items<'s>(&self, seqs: &'s [AttnSeq<'s>]) -> Vec<Item<'s>> {
        let mut items = Vec::new();
        for seq in seqs.iter().filter(|s| s.q_len > 0) {
            let last = seq.pos_start + seq.q_len - 1;
            let span = last - window_start(seq.pos_start, self.sliding_window) + 1;
            let tile = (SCORE_BUDGET / span.saturating_mul(self.group).max(1)).clamp(1, TILE_ROWS);
            for kv_head in 0..self.g.kv_dim / self.g.head_dim {
                for first_row in (0..seq.q_len).step_by(tile) {
                    let rows = tile.min(seq.q_len - first_row);
                    items.push(Item {
                        seq,
                        kv_head,
                        first_row,
                        rows,
                    });
                }
            }
        }
        items
    }

    /// Attention of one item's `rows * group` query heads: `[rows, group, head_dim]`.
    ///
    /// Per query head the arithmetic is the textbook two-pass softmax, in position order:
    /// `s = (q·k)·scale`, `m = max s`, `w = exp(s − m)`, `out = (Σ w·v) / Σ w`.
    fn run(&self, item: &Item<'_>) -> Vec<f32> {
        let (hd, group) = (self.g.head_dim, self.group);
        let first_pos = item.seq.pos_start + item.first_row;
        let last_pos = first_pos + item.rows - 1;
        // Positions any row of the tile can see, and the visible range of row r within it.
        let span_start = window_start(first_pos, self.sliding_window);
        let span = last_pos - span_start + 1;
        let visible = |r: usize| {
            let pos = first_pos + r;
            window_start(pos, self.sliding_window) - span_start..pos - span_start + 1
        };
        let head_at = item.kv_head * hd;
        let q_row = |r: usize, h: usize| {
            let at = ((item.seq.q_start + item.first_row + r) * self.num_heads
                + item.kv_head * group
                + h)
                * hd;
            &self.q[at..at + hd]
        };

        // Pass 1: scores[(r, h), position]; each key row is read once for the whole tile.
        let mut scores = vec![0.0f32; item.rows * group * span];
        self.for_each_slot(item.seq, span_start, last_pos, |i, slot| {
            let k = &self.pool[slot + head_at..slot + head_at + hd];
            for r in (0..item.rows).filter(|&r| visible(r).contains(&i)) {
                for h in 0..group {
                    scores[(r * group + h) * span + i] = simd::dot(q_row(r, h), k) * self.scale;
                }
            }
        });

        // Softmax weights per query head over its own visible range.
        let mut inv_sums = vec![0.0f32; item.rows * group];
        for (pair, row) in scores.chunks_exact_mut(span).enumerate() {
            let row = &mut row[visible(pair / group)];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            inv_sums[pair] = 1.0 / sum;
        }

        // Pass 2: weighted sum of values, each value row read once for the whole tile.
        let mut out = vec![0.0f32; item.rows * group * hd];
        self.for_each_slot(item.seq, span_start, last_pos, |i, slot| {
            let at = slot + self.g.values_offset + head_at;
            let v = &self.pool[at..at + hd];
            for r in (0..item.rows).filter(|&r| visible(r).contains(&i)) {
                for h in 0..group {
                    let pair = r * group + h;
                    simd::axpy(
                        &mut out[pair * hd..(pair + 1) * hd],
                        scores[pair * span + i],
                        v,
                    );
                }
            }
        });
        for (o, &inv) in out.chunks_exact_mut(hd).zip(&inv_sums) {
            simd::scale(o, inv);
        }
        out
    }

    /// Calls `f(i, offset)` for every position `first + i` in `first..=last`, in order, with
    /// the pool offset of its key row, walking the block table one page at a time.
    #[inline]
    fn for_each_slot(
        &self,
        seq: &AttnSeq<'_>,
        first: usize,
        last: usize,
        mut f: impl FnMut(usize, usize),
    ) {
        let bs = self.g.block_size;
        let mut pos = first;
        while pos <= last {
            let block = pos / bs;
            let page = seq.block_table[block] as usize;
            let end = last.min((block * bs).saturating_add(bs - 1));
            for slot in pos % bs..=end % bs {
                f(block * bs + slot - first, self.g.slot_offset(page, slot));
            }
            match end.checked_add(1) {
                Some(next) => pos = next,
                None => break,
            }
        }
    }
}
