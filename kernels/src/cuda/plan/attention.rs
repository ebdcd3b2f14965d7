//! The launch plan of paged attention (`attention.cu`): which block computes which query heads
//! over which keys, built on the host from the batch's sequences and validated exactly as the
//! CPU reference validates them.
//!
//! The unit of work is a *pair* (query row, query head of a KV-head group). A block takes up to
//! [`ATTN_MAX_WARPS`] consecutive pairs of one sequence and one KV head — one warp each — and
//! streams the keys they can see through shared memory once for all of them (GQA rows share
//! their K/V tile). Prefill chunks get many pairs per sequence and so many blocks; a decode row
//! gets one block per KV head, which leaves a GPU idle on long contexts: there, the key range is
//! split (flash-decoding) into chunks computed by separate blocks as partial softmax states
//! `(m, l, acc)`, merged by `attention_reduce_f32`.

use super::{DEFAULT_SHARED_MEM_BYTES, LaunchPlan, MAX_GRID_X, WARP_SIZE, grid_dim, to_u32};
use crate::KernelError;
use crate::cpu::check;
use crate::cpu::{AttnSeq, KvLayout};

const KERNEL: &str = "paged_attention";
/// Largest head dimension: a lane keeps `head_dim / 32 <= 8` query and accumulator values in
/// registers.
pub const ATTN_MAX_HEAD_DIM: usize = 256;
/// Most pairs (warps) per block.
pub const ATTN_MAX_WARPS: usize = 16;
/// Keys per split when a long key range is divided among blocks.
pub const ATTN_SPLIT_KEYS: usize = 512;
/// Keys staged in shared memory at once, at most.
const ATTN_MAX_TILE_KEYS: usize = 64;
/// Warps of the reduce kernel; each merges one pair's splits.
const REDUCE_WARPS: usize = 4;

/// Parameters of `paged_attention_f32` and `attention_reduce_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub num_heads: u32,
    /// Query heads per KV head.
    pub group: u32,
    pub head_dim: u32,
    pub kv_dim: u32,
    pub block_size: u32,
    /// Sliding window in positions; 0 when unlimited.
    pub window: u32,
    /// Keys per shared-memory tile.
    pub tile_keys: u32,
    /// Entries of the reduce list.
    pub num_reduce: u32,
    pub page_elems: u64,
    pub values_offset: u64,
    pub scale: f32,
    pub _pad: [u32; 3],
}
const _: () = assert!(size_of::<AttnParams>() == 64);
// SAFETY: `#[repr(C)]` of 8 u32, 2 u64 (at offset 32, aligned), f32 and 3 u32: no padding, no
// pointers; laid out as `struct AttnParams` in attention.cu.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// One sequence as the kernel sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnSeqParams {
    pub q_start: u32,
    pub q_len: u32,
    pub pos_start: u32,
    /// Index of the sequence's first block-table entry in the concatenated tables.
    pub table_start: u32,
}
const _: () = assert!(size_of::<AttnSeqParams>() == 16);
// SAFETY: `#[repr(C)]` four u32, as `struct AttnSeqParams` in attention.cu.
unsafe impl cudarc::driver::DeviceRepr for AttnSeqParams {}

/// One block of the main kernel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnWorkItem {
    pub seq: u32,
    pub kv_head: u32,
    /// First pair: row `pair / group` of the sequence, query head `kv_head·group + pair % group`.
    pub pair_start: u32,
    pub pair_count: u32,
    /// Absolute key positions `[key_start, key_end)` this block reads.
    pub key_start: u32,
    pub key_end: u32,
    /// `-1`: the block covers every key its pairs see and writes `out`. Otherwise the partial
    /// slot of its first pair (its pair `i` uses slot `partial + i`).
    pub partial: i32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AttnWorkItem>() == 32);
// SAFETY: `#[repr(C)]` of six u32, an i32 and a u32, as `struct AttnWorkItem` in attention.cu.
unsafe impl cudarc::driver::DeviceRepr for AttnWorkItem {}

/// One pair whose keys were split: merge slots `first_slot + k·slot_stride`, `k < num_splits`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnReduceItem {
    /// Row of `q`/`out`.
    pub row: u32,
    pub head: u32,
    pub first_slot: u32,
    pub num_splits: u32,
    pub slot_stride: u32,
    pub _pad: [u32; 3],
}
const _: () = assert!(size_of::<AttnReduceItem>() == 32);
// SAFETY: `#[repr(C)]` eight u32, as `struct AttnReduceItem` in attention.cu.
unsafe impl cudarc::driver::DeviceRepr for AttnReduceItem {}

/// Everything one attention call uploads and launches.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    pub params: AttnParams,
    pub seqs: Vec<AttnSeqParams>,
    /// Every sequence's block table up to its last needed block, concatenated.
    pub block_tables: Vec<u32>,
    pub work: Vec<AttnWorkItem>,
    pub reduce: Vec<AttnReduceItem>,
    /// Partial softmax states the split blocks write (`acc`: `head_dim` floats each, plus `m`
    /// and `l`).
    pub partial_slots: usize,
    pub main: LaunchPlan,
    /// Empty when nothing was split.
    pub reduce_launch: LaunchPlan,
}

/// First position visible from a query at `pos` (as the CPU reference's `window_start`).
fn window_start(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| pos.saturating_sub(w.saturating_sub(1)))
}

/// Plans causal paged attention of `q` (`q_len` elements, `[T, num_heads·head_dim]`) over a
/// pool of `pool_len` elements.
///
/// `target_blocks` is how many blocks keep the device busy (a few per SM): when the unsplit
/// work has fewer blocks, key ranges longer than `2·ATTN_SPLIT_KEYS` are split.
///
/// # Errors
/// Exactly the CPU reference's ([`crate::cpu::paged_attention`]) for the same arguments, plus
/// `head_dim > ATTN_MAX_HEAD_DIM` and positions or counts beyond `u32`.
pub fn attention_plan(
    layout: &KvLayout,
    q_len: usize,
    num_heads: usize,
    pool_len: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    sliding_window: Option<usize>,
    target_blocks: usize,
) -> Result<AttentionPlan, KernelError> {
    let g = layout.geometry(KERNEL, pool_len)?;
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
    if g.head_dim > ATTN_MAX_HEAD_DIM {
        return Err(KernelError::invalid(
            KERNEL,
            "head_dim",
            format!("{} exceeds {ATTN_MAX_HEAD_DIM}", g.head_dim),
        ));
    }
    let q_width = check::mul(KERNEL, "num_heads * head_dim", num_heads, g.head_dim)?;
    let rows = check::rows(KERNEL, "q", q_len, q_width)?;
    check::row_owners(
        KERNEL,
        rows,
        seqs.iter()
            .map(|s| (s.q_start, s.q_start.saturating_add(s.q_len))),
    )?;
    let group = num_heads / layout.num_kv_heads;
    let tile_keys =
        (DEFAULT_SHARED_MEM_BYTES as usize / (2 * 4 * g.head_dim)).clamp(1, ATTN_MAX_TILE_KEYS);

    let mut plan_seqs = Vec::with_capacity(seqs.len());
    let mut block_tables = Vec::new();
    for (index, seq) in seqs.iter().enumerate() {
        let table_start = to_u32(KERNEL, "block_tables", block_tables.len())?;
        if seq.q_len > 0 {
            let last = check::add(KERNEL, "pos_start + q_len", seq.pos_start, seq.q_len - 1)?;
            to_u32(KERNEL, "position", last)?;
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
            // Entries before `first_block` are never read (they may name freed pages).
            block_tables.extend_from_slice(&seq.block_table[..=last_block]);
        }
        plan_seqs.push(AttnSeqParams {
            q_start: to_u32(KERNEL, "q_start", seq.q_start)?,
            q_len: to_u32(KERNEL, "q_len", seq.q_len)?,
            pos_start: to_u32(KERNEL, "pos_start", seq.pos_start)?,
            table_start,
        });
    }

    let max_pairs = seqs.iter().map(|s| s.q_len * group).max().unwrap_or(0);
    let warps = max_pairs.clamp(1, ATTN_MAX_WARPS);
    let mut base = Vec::new();
    for (index, seq) in seqs.iter().enumerate().filter(|(_, s)| s.q_len > 0) {
        let total = seq.q_len * group;
        for kv_head in 0..layout.num_kv_heads {
            for pair_start in (0..total).step_by(warps) {
                let pair_count = warps.min(total - pair_start);
                let first_pos = seq.pos_start + pair_start / group;
                let last_pos = seq.pos_start + (pair_start + pair_count - 1) / group;
                base.push(AttnWorkItem {
                    seq: index as u32,
                    kv_head: kv_head as u32,
                    pair_start: to_u32(KERNEL, "pairs", pair_start)?,
                    pair_count: pair_count as u32,
                    key_start: window_start(first_pos, sliding_window) as u32,
                    key_end: to_u32(KERNEL, "position", last_pos + 1)?,
                    partial: -1,
                    _pad: 0,
                });
            }
        }
    }

    let (work, reduce, partial_slots) =
        split_long_ranges(base, &plan_seqs, group, tile_keys, target_blocks)?;
    let main = LaunchPlan {
        grid: (grid_dim(KERNEL, "work", work.len(), MAX_GRID_X)?, 1, 1),
        block: (warps as u32 * WARP_SIZE, 1, 1),
        shared_mem_bytes: (2 * tile_keys * g.head_dim * 4) as u32,
    };
    let reduce_launch = LaunchPlan {
        grid: (
            grid_dim(
                KERNEL,
                "reduce",
                reduce.len().div_ceil(REDUCE_WARPS),
                MAX_GRID_X,
            )?,
            1,
            1,
        ),
        block: (REDUCE_WARPS as u32 * WARP_SIZE, 1, 1),
        shared_mem_bytes: 0,
    };
    let params = AttnParams {
        num_heads: to_u32(KERNEL, "num_heads", num_heads)?,
        group: group as u32,
        head_dim: g.head_dim as u32,
        kv_dim: to_u32(KERNEL, "kv_dim", g.kv_dim)?,
        block_size: to_u32(KERNEL, "block_size", g.block_size)?,
        // Positions fit in u32 (checked above), so a wider window never cuts anything.
        window: sliding_window.map_or(0, |w| u32::try_from(w).unwrap_or(0)),
        tile_keys: tile_keys as u32,
        num_reduce: to_u32(KERNEL, "reduce", reduce.len())?,
        page_elems: g.page_elems as u64,
        values_offset: g.values_offset as u64,
        scale,
        _pad: [0; 3],
    };
    Ok(AttentionPlan {
        params,
        seqs: plan_seqs,
        block_tables,
        work,
        reduce,
        partial_slots,
        main,
        reduce_launch,
    })
}

/// Flash-decoding: when `base` has fewer blocks than `target_blocks`, cuts each key range
/// longer than `2·ATTN_SPLIT_KEYS` into chunks (whole tiles) computed by separate blocks, and
/// lists the pairs whose partial states must be merged.
fn split_long_ranges(
    base: Vec<AttnWorkItem>,
    seqs: &[AttnSeqParams],
    group: usize,
    tile_keys: usize,
    target_blocks: usize,
) -> Result<(Vec<AttnWorkItem>, Vec<AttnReduceItem>, usize), KernelError> {
    if base.is_empty() || base.len() >= target_blocks {
        return Ok((base, Vec::new(), 0));
    }
    let per_item = target_blocks.div_ceil(base.len());
    let mut work = Vec::with_capacity(base.len());
    let mut reduce = Vec::new();
    let mut slots = 0usize;
    for item in base {
        let span = (item.key_end - item.key_start) as usize;
        let splits = span.div_ceil(ATTN_SPLIT_KEYS).min(per_item);
        if span <= 2 * ATTN_SPLIT_KEYS || splits < 2 {
            work.push(item);
            continue;
        }
        let chunk = span.div_ceil(splits).div_ceil(tile_keys) * tile_keys;
        let splits = span.div_ceil(chunk);
        let pairs = item.pair_count as usize;
        let first_slot = slots;
        for k in 0..splits {
            let start = item.key_start as usize + k * chunk;
            work.push(AttnWorkItem {
                key_start: start as u32,
                key_end: (start + chunk).min(item.key_end as usize) as u32,
                partial: i32::try_from(first_slot + k * pairs).map_err(|_| {
                    KernelError::invalid(KERNEL, "partial", "more than i32::MAX partial states")
                })?,
                ..item
            });
        }
        let seq = &seqs[item.seq as usize];
        for i in 0..pairs {
            let pair = item.pair_start as usize + i;
            reduce.push(AttnReduceItem {
                row: seq.q_start + (pair / group) as u32,
                head: item.kv_head * group as u32 + (pair % group) as u32,
                first_slot: (first_slot + i) as u32,
                num_splits: splits as u32,
                slot_stride: pairs as u32,
                _pad: [0; 3],
            });
        }
        slots += splits * pairs;
    }
    Ok((work, reduce, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(head_dim: usize) -> KvLayout {
        KvLayout {
            page_elems: 2 * 4 * 2 * head_dim + 3,
            block_size: 4,
            num_kv_heads: 2,
            head_dim,
        }
    }

    fn pool_len(l: &KvLayout, pages: usize) -> usize {
        l.page_elems * pages
    }

    #[test]
    fn prefill_chunk_pairs_rows_with_their_group_heads() {
        let l = layout(16);
        // 8 query heads over 2 KV heads: group 4. A chunk of 5 rows at positions 6..11.
        let table: Vec<u32> = vec![3, 1, 0];
        let seqs = [AttnSeq {
            q_start: 2,
            q_len: 5,
            pos_start: 6,
            block_table: &table,
        }];
        let p = attention_plan(&l, 8 * 16 * 7, 8, pool_len(&l, 4), &seqs, 0.25, None, 1).unwrap();
        assert_eq!(p.params.group, 4);
        assert_eq!(p.params.tile_keys, 64);
        // 20 pairs per KV head: blocks of 16 and 4 pairs, for both KV heads.
        assert_eq!(p.main.block, (16 * 32, 1, 1));
        assert_eq!(p.main.shared_mem_bytes, 2 * 64 * 16 * 4);
        let spans: Vec<_> = p
            .work
            .iter()
            .map(|w| {
                (
                    w.kv_head,
                    w.pair_start,
                    w.pair_count,
                    w.key_start,
                    w.key_end,
                    w.partial,
                )
            })
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 0, 16, 0, 10, -1),
                (0, 16, 4, 0, 11, -1),
                (1, 0, 16, 0, 10, -1),
                (1, 16, 4, 0, 11, -1)
            ]
        );
        assert_eq!(p.block_tables, table);
        assert_eq!(
            p.seqs,
            vec![AttnSeqParams {
                q_start: 2,
                q_len: 5,
                pos_start: 6,
                table_start: 0
            }]
        );
        assert!(p.reduce.is_empty() && p.reduce_launch.is_empty());
    }

    #[test]
    fn sliding_window_moves_the_first_key_and_skips_stale_blocks() {
        let l = layout(8);
        // Blocks 0 and 1 fell out of the window: their entries are never validated.
        let table: Vec<u32> = vec![999, 999, 2, 0];
        let seqs = [AttnSeq {
            q_start: 0,
            q_len: 1,
            pos_start: 13,
            block_table: &table,
        }];
        let p = attention_plan(&l, 4 * 8, 4, pool_len(&l, 3), &seqs, 1.0, Some(5), 1).unwrap();
        assert_eq!(p.params.window, 5);
        assert_eq!((p.work[0].key_start, p.work[0].key_end), (9, 14));
        assert_eq!(p.main.block, (64, 1, 1)); // group 2, one decode row: 2 warps
    }

    #[test]
    fn long_decodes_split_into_merged_chunks() {
        let l = layout(128);
        let pages = 1000;
        let table: Vec<u32> = (0..pages as u32).collect();
        // One decode row at position 2999: 3000 keys, 2 KV heads, group 1.
        let seqs = [AttnSeq {
            q_start: 0,
            q_len: 1,
            pos_start: 2999,
            block_table: &table[..750],
        }];
        let p = attention_plan(&l, 2 * 128, 2, pool_len(&l, pages), &seqs, 1.0, None, 264).unwrap();
        assert_eq!(p.params.tile_keys, 48);
        // 3000 keys in chunks of 528 (11 tiles of 48): 6 splits per KV head.
        assert_eq!(p.work.len(), 12);
        assert_eq!(p.partial_slots, 12);
        let h0: Vec<_> = p.work[..6]
            .iter()
            .map(|w| (w.key_start, w.key_end, w.partial))
            .collect();
        assert_eq!(
            h0,
            vec![
                (0, 528, 0),
                (528, 1056, 1),
                (1056, 1584, 2),
                (1584, 2112, 3),
                (2112, 2640, 4),
                (2640, 3000, 5)
            ]
        );
        assert_eq!(
            p.reduce,
            vec![
                AttnReduceItem {
                    row: 0,
                    head: 0,
                    first_slot: 0,
                    num_splits: 6,
                    slot_stride: 1,
                    _pad: [0; 3]
                },
                AttnReduceItem {
                    row: 0,
                    head: 1,
                    first_slot: 6,
                    num_splits: 6,
                    slot_stride: 1,
                    _pad: [0; 3]
                }
            ]
        );
        assert_eq!(p.params.num_reduce, 2);
        assert_eq!(p.reduce_launch.grid, (1, 1, 1));
        // A busy device (enough blocks already) or a short context: no split.
        let busy = attention_plan(&l, 2 * 128, 2, pool_len(&l, pages), &seqs, 1.0, None, 2);
        assert_eq!(busy.unwrap().work.len(), 2);
    }

    #[test]
    fn split_pairs_get_strided_slots() {
        let l = layout(32);
        let table: Vec<u32> = (0..400).collect();
        // Two rows of one sequence, group 4: 8 pairs in one block per KV head; 1500 keys.
        let seqs = [AttnSeq {
            q_start: 0,
            q_len: 2,
            pos_start: 1498,
            block_table: &table[..375],
        }];
        let p = attention_plan(&l, 2 * 8 * 32, 8, pool_len(&l, 400), &seqs, 1.0, None, 8).unwrap();
        // 4 blocks wanted per item, 1500 keys: 3 splits of 512 (whole 64-key tiles).
        assert_eq!(p.work.len(), 6);
        assert_eq!(p.partial_slots, 48);
        assert_eq!(
            p.work[..3].iter().map(|w| w.partial).collect::<Vec<_>>(),
            vec![0, 8, 16]
        );
        let r = p.reduce[5];
        assert_eq!(
            (r.row, r.head, r.first_slot, r.slot_stride, r.num_splits),
            (1, 1, 5, 8, 3)
        );
        assert_eq!(p.reduce[8].first_slot, 24); // second KV head starts after 3 × 8 slots
    }

    #[test]
    fn validation_matches_the_cpu_reference() {
        let l = layout(16);
        let table: Vec<u32> = vec![0, 1];
        let seq = |q_start, q_len, pos_start| AttnSeq {
            q_start,
            q_len,
            pos_start,
            block_table: &table,
        };
        let plan = |seqs: &[AttnSeq<'_>], heads: usize, window| {
            attention_plan(
                &l,
                3 * heads * 16,
                heads,
                pool_len(&l, 2),
                seqs,
                1.0,
                window,
                1,
            )
            .map(|_| ())
            .map_err(|e| e.kind())
        };
        assert_eq!(plan(&[seq(0, 3, 0)], 4, None), Ok(()));
        assert_eq!(plan(&[seq(0, 3, 0)], 3, None), Err("invalid_argument"));
        assert_eq!(plan(&[seq(0, 3, 0)], 4, Some(0)), Err("invalid_argument"));
        assert_eq!(plan(&[seq(1, 3, 0)], 4, None), Err("rows_out_of_range"));
        assert_eq!(
            plan(&[seq(0, 2, 0), seq(1, 1, 0)], 4, None),
            Err("rows_overlap")
        );
        assert_eq!(plan(&[seq(0, 1, 8)], 4, None), Err("block_table_too_short"));
        let far = [9u32];
        let bad_page = [AttnSeq {
            q_start: 0,
            q_len: 1,
            pos_start: 0,
            block_table: &far,
        }];
        assert_eq!(plan(&bad_page, 4, None), Err("page_out_of_range"));
        let wide = layout(512);
        assert_eq!(
            attention_plan(&wide, 2 * 512, 2, wide.page_elems, &[], 1.0, None, 1)
                .unwrap_err()
                .kind(),
            "invalid_argument"
        );
        // No sequences: nothing to launch.
        let p = attention_plan(&l, 3 * 4 * 16, 4, pool_len(&l, 2), &[], 1.0, None, 1).unwrap();
        assert!(p.main.is_empty() && p.reduce_launch.is_empty());
    }
}
