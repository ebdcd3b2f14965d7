//! Launch plans, parameters and the device-side segment table of the heterogeneous LoRA
//! kernels (`lora.cu`): shrink `v = x·A` and expand `y += s·v·Bᵀ` over pool row offsets
//! (S-LoRA MBGMV/MBGMM, Punica BGMV/SGMV).

use super::{
    DEFAULT_SHARED_MEM_BYTES, LaunchPlan, MAX_GRID_X, MAX_GRID_YZ, WARP_SIZE, grid_dim,
    shared_bytes, to_u32, warps_for,
};
use crate::KernelError;
use crate::cpu::LoraSegment;
use crate::cpu::check::NO_OWNER;
use crate::cpu::lora::{Side, segment_owners};

/// Parameters of `lora_shrink_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShrinkParams {
    pub rows: u32,
    pub in_dim: u32,
    pub max_rank: u32,
    /// 1 when the block stages its row of `x` in shared memory (it fits), else 0.
    pub stage_x: u32,
}
const _: () = assert!(size_of::<LoraShrinkParams>() == 16);
// SAFETY: `#[repr(C)]` four u32, as `struct LoraShrinkParams` in lora.cu.
unsafe impl cudarc::driver::DeviceRepr for LoraShrinkParams {}

/// Parameters of `lora_expand_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraExpandParams {
    pub rows: u32,
    pub out_dim: u32,
    pub max_rank: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LoraExpandParams>() == 16);
// SAFETY: `#[repr(C)]` four u32, as `struct LoraExpandParams` in lora.cu.
unsafe impl cudarc::driver::DeviceRepr for LoraExpandParams {}

/// One segment as the kernels see it; its A rows are `a_offsets[first..first + rank]`, its Bᵀ
/// rows `b_offsets[first..first + rank]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSegmentParams {
    pub rank: u32,
    pub scale: f32,
    pub first: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LoraSegmentParams>() == 16);
// SAFETY: `#[repr(C)]` u32, f32, u32, u32 (no padding, no pointers), as
// `struct LoraSegmentParams` in lora.cu; uploaded as an array, element by element.
unsafe impl cudarc::driver::DeviceRepr for LoraSegmentParams {}

/// Warps per shrink block: each warp computes one `v[t, j]`, a dot product over `in_dim`.
pub const SHRINK_WARPS_PER_BLOCK: u32 = 4;
/// Threads per expand block: each thread owns one output column `o`.
pub const EXPAND_THREADS: u32 = 256;

/// Shrink: grid `(rows, ceil(max_rank / warps))`, one warp per rank index; rows of no segment
/// and `j >= rank` exit early (after zeroing `v[t, j]` for `j >= rank` of a segment row, as the
/// CPU reference does). The row of `x` is staged in shared memory when it fits.
///
/// # Errors
/// `in_dim == 0`; sizes beyond the grid or `u32`.
pub fn lora_shrink_plan(
    rows: usize,
    in_dim: usize,
    max_rank: usize,
) -> Result<(LaunchPlan, LoraShrinkParams), KernelError> {
    const KERNEL: &str = "lora_shrink";
    if in_dim == 0 {
        return Err(KernelError::invalid(KERNEL, "in_dim", "must be at least 1"));
    }
    let warps = (max_rank.min(SHRINK_WARPS_PER_BLOCK as usize) as u32).max(1);
    let stage_x = in_dim
        .checked_mul(4)
        .is_some_and(|b| b <= DEFAULT_SHARED_MEM_BYTES as usize);
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "rows", rows, MAX_GRID_X)?,
            grid_dim(
                KERNEL,
                "max_rank",
                max_rank.div_ceil(warps as usize),
                MAX_GRID_YZ,
            )?,
            1,
        ),
        block: (warps * WARP_SIZE, 1, 1),
        shared_mem_bytes: if stage_x {
            shared_bytes(KERNEL, "in_dim", in_dim)?
        } else {
            0
        },
    };
    let params = LoraShrinkParams {
        rows: to_u32(KERNEL, "rows", rows)?,
        in_dim: to_u32(KERNEL, "in_dim", in_dim)?,
        max_rank: to_u32(KERNEL, "max_rank", max_rank)?,
        stage_x: u32::from(stage_x),
    };
    Ok((plan, params))
}

/// Expand: grid `(rows, ceil(out_dim / threads))`, one thread per output column, the row of
/// `v` (`max_rank` floats) staged in shared memory; each thread reads `Bᵀ_j[o]` coalesced.
///
/// # Errors
/// `out_dim == 0`; `max_rank` floats beyond the default shared memory; sizes beyond the grid.
pub fn lora_expand_plan(
    rows: usize,
    out_dim: usize,
    max_rank: usize,
) -> Result<(LaunchPlan, LoraExpandParams), KernelError> {
    const KERNEL: &str = "lora_expand";
    if out_dim == 0 {
        return Err(KernelError::invalid(
            KERNEL,
            "out_dim",
            "must be at least 1",
        ));
    }
    let threads = warps_for(out_dim, 1, EXPAND_THREADS);
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "rows", rows, MAX_GRID_X)?,
            grid_dim(
                KERNEL,
                "out_dim",
                out_dim.div_ceil(threads as usize),
                MAX_GRID_YZ,
            )?,
            1,
        ),
        block: (threads, 1, 1),
        shared_mem_bytes: shared_bytes(KERNEL, "max_rank", max_rank)?,
    };
    let params = LoraExpandParams {
        rows: to_u32(KERNEL, "rows", rows)?,
        out_dim: to_u32(KERNEL, "out_dim", out_dim)?,
        max_rank: to_u32(KERNEL, "max_rank", max_rank)?,
        _pad: 0,
    };
    Ok((plan, params))
}

/// The device-side description of a batch's segments, uploaded once per projection.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTable {
    /// Segment of each batch row, `-1` for base-model rows.
    pub row_segment: Vec<i32>,
    pub segments: Vec<LoraSegmentParams>,
    /// Pool offsets of every segment's A rows, concatenated.
    pub a_offsets: Vec<u64>,
    /// Pool offsets of every segment's Bᵀ rows, concatenated.
    pub b_offsets: Vec<u64>,
}

/// Flattens `segs` for the kernels, with the same validation as the CPU reference (rows in
/// range and disjoint, ranks, every A row `in_dim` and Bᵀ row `out_dim` inside the pool).
///
/// # Errors
/// As [`crate::cpu::lora_shrink`] / [`crate::cpu::lora_expand`], plus counts beyond `i32`/`u32`.
pub fn lora_table(
    segs: &[LoraSegment<'_>],
    rows: usize,
    max_rank: usize,
    pool_len: usize,
    in_dim: usize,
    out_dim: usize,
) -> Result<LoraTable, KernelError> {
    const KERNEL: &str = "lora_table";
    let sides = [(Side::A, in_dim), (Side::Bt, out_dim)];
    let (owners, _) = segment_owners(KERNEL, segs, rows, max_rank, pool_len, &sides)?;
    let row_segment = owners
        .iter()
        .map(|&o| match o {
            NO_OWNER => Ok(-1),
            o => i32::try_from(o)
                .map_err(|_| KernelError::invalid(KERNEL, "segs", "more than i32::MAX segments")),
        })
        .collect::<Result<_, _>>()?;
    let mut table = LoraTable {
        row_segment,
        segments: Vec::with_capacity(segs.len()),
        a_offsets: Vec::new(),
        b_offsets: Vec::new(),
    };
    for seg in segs {
        table.segments.push(LoraSegmentParams {
            rank: to_u32(KERNEL, "rank", seg.a_rows.len())?,
            scale: seg.scale,
            first: to_u32(KERNEL, "offsets", table.a_offsets.len())?,
            _pad: 0,
        });
        table.a_offsets.extend(seg.a_rows.iter().map(|&o| o as u64));
        table.b_offsets.extend(seg.b_rows.iter().map(|&o| o as u64));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrink_plan_covers_every_rank_with_one_warp_each() {
        let (plan, params) = lora_shrink_plan(11, 4096, 16).unwrap();
        assert_eq!(plan.grid, (11, 4, 1));
        assert_eq!(plan.block, (128, 1, 1));
        assert_eq!(plan.shared_mem_bytes, 4096 * 4);
        assert_eq!(
            params,
            LoraShrinkParams {
                rows: 11,
                in_dim: 4096,
                max_rank: 16,
                stage_x: 1
            }
        );
        assert!(plan.grid.1 * plan.block.0 / WARP_SIZE >= 16);
        // Rank 3: a 3-warp block; in_dim too large to stage: x read from global memory.
        let (plan, params) = lora_shrink_plan(2, 14_336, 3).unwrap();
        assert_eq!(
            (plan.grid, plan.block, plan.shared_mem_bytes),
            ((2, 1, 1), (96, 1, 1), 0)
        );
        assert_eq!(params.stage_x, 0);
        assert!(lora_shrink_plan(5, 64, 0).unwrap().0.is_empty());
        assert_eq!(
            lora_shrink_plan(5, 0, 4).unwrap_err().kind(),
            "invalid_argument"
        );
    }

    #[test]
    fn expand_plan_tiles_columns_and_stages_v() {
        let (plan, params) = lora_expand_plan(9, 4096, 64).unwrap();
        assert_eq!(plan.grid, (9, 16, 1));
        assert_eq!(plan.block, (256, 1, 1));
        assert_eq!(plan.shared_mem_bytes, 64 * 4);
        assert_eq!(
            params,
            LoraExpandParams {
                rows: 9,
                out_dim: 4096,
                max_rank: 64,
                _pad: 0
            }
        );
        let (plan, _) = lora_expand_plan(1, 100, 8).unwrap();
        assert_eq!((plan.grid, plan.block), ((1, 1, 1), (128, 1, 1)));
        assert!(u64::from(plan.grid.1) * u64::from(plan.block.0) >= 100);
        assert_eq!(
            lora_expand_plan(1, 100, 20_000).unwrap_err().kind(),
            "invalid_argument"
        );
        assert_eq!(
            lora_expand_plan(1, 0, 8).unwrap_err().kind(),
            "invalid_argument"
        );
    }

    #[test]
    fn lora_table_flattens_segments_and_marks_base_rows() {
        let (a0, b0) = ([10usize, 20], [30usize, 40]);
        let (a1, b1) = ([50usize], [60usize]);
        let segs = [
            LoraSegment {
                rows: 3..5,
                a_rows: &a1,
                b_rows: &b1,
                scale: 2.0,
            },
            LoraSegment {
                rows: 0..2,
                a_rows: &a0,
                b_rows: &b0,
                scale: 0.5,
            },
        ];
        let t = lora_table(&segs, 6, 4, 100, 8, 16).unwrap();
        assert_eq!(t.row_segment, vec![1, 1, -1, 0, 0, -1]);
        assert_eq!(
            t.segments,
            vec![
                LoraSegmentParams {
                    rank: 1,
                    scale: 2.0,
                    first: 0,
                    _pad: 0
                },
                LoraSegmentParams {
                    rank: 2,
                    scale: 0.5,
                    first: 1,
                    _pad: 0
                },
            ]
        );
        assert_eq!(
            (t.a_offsets, t.b_offsets),
            (vec![50, 10, 20], vec![60, 30, 40])
        );
        // Validation matches the CPU reference: a Bᵀ row past the pool, overlapping rows.
        assert_eq!(
            lora_table(&segs, 6, 4, 70, 8, 16).unwrap_err().kind(),
            "pool_offset_out_of_range"
        );
        assert_eq!(
            lora_table(&segs, 4, 4, 100, 8, 16).unwrap_err().kind(),
            "rows_out_of_range"
        );
        assert_eq!(
            lora_table(&segs, 6, 1, 100, 8, 16).unwrap_err().kind(),
            "bad_rank"
        );
    }
}
