//! Launch plans and parameters of the memory-bound kernels: pointwise maps (`silu_mul`, `add`,
//! bias add, dtype conversion), row copies (embedding lookup, row selection), RoPE, the paged
//! KV write, whole-page KV gather/scatter, and the per-row reductions of sampling (argmax,
//! log-softmax).

use super::{
    LaunchPlan, MAX_BLOCK_THREADS, MAX_GRID_X, MAX_GRID_YZ, WARP_SIZE, grid_dim, to_u32, warps_for,
};
use crate::KernelError;

/// Threads per block of the grid-stride pointwise kernels and of the row-tiled copies.
pub const POINTWISE_THREADS: u32 = 256;
/// Cap on pointwise blocks: enough to fill any current GPU many times over; larger tensors are
/// covered by the grid-stride loop.
const POINTWISE_MAX_BLOCKS: usize = 65_535;

/// Parameters of the grid-stride kernels in `elementwise.cu` (`silu_mul_f32`, `add_f32`,
/// `add_bias_f32`, `f32_to_bf16`, `f32_to_f16`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointwiseParams {
    /// Elements to process.
    pub len: u64,
    /// Row width, for the kernels that broadcast a row (`add_bias_f32`); 1 otherwise.
    pub cols: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PointwiseParams>() == 16);
// SAFETY: `#[repr(C)]` plain data (u64, u32, u32; no padding, no pointers), laid out exactly
// as `struct PointwiseParams` in prelude.cuh.
unsafe impl cudarc::driver::DeviceRepr for PointwiseParams {}

/// Grid-stride loop over `len` elements, `cols` being the broadcast row width (≥ 1).
///
/// # Errors
/// `cols == 0` or beyond `u32`.
pub fn pointwise_plan(
    len: usize,
    cols: usize,
) -> Result<(LaunchPlan, PointwiseParams), KernelError> {
    const KERNEL: &str = "pointwise";
    if cols == 0 {
        return Err(KernelError::invalid(KERNEL, "cols", "must be at least 1"));
    }
    let blocks = len
        .div_ceil(POINTWISE_THREADS as usize)
        .min(POINTWISE_MAX_BLOCKS);
    let plan = LaunchPlan {
        grid: (blocks as u32, 1, 1),
        block: (POINTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((
        plan,
        PointwiseParams {
            len: len as u64,
            cols: to_u32(KERNEL, "cols", cols)?,
            _pad: 0,
        },
    ))
}

/// Parameters of the row copies in `elementwise.cu` (`copy_rows_*`): `out[r] = src[idx[r]]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRowsParams {
    /// Rows of `out` (= entries of the index list).
    pub rows: u32,
    pub cols: u32,
}
const _: () = assert!(size_of::<CopyRowsParams>() == 8);
// SAFETY: `#[repr(C)]` pair of u32, as `struct CopyRowsParams` in prelude.cuh.
unsafe impl cudarc::driver::DeviceRepr for CopyRowsParams {}

/// Grid `(rows, ceil(cols / 256))`: one block row per output row, one thread per column.
///
/// # Errors
/// `cols == 0`; sizes beyond the grid or `u32`.
pub fn copy_rows_plan(
    rows: usize,
    cols: usize,
) -> Result<(LaunchPlan, CopyRowsParams), KernelError> {
    const KERNEL: &str = "copy_rows";
    if cols == 0 {
        return Err(KernelError::invalid(KERNEL, "cols", "must be at least 1"));
    }
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "rows", rows, MAX_GRID_X)?,
            grid_dim(
                KERNEL,
                "cols",
                cols.div_ceil(POINTWISE_THREADS as usize),
                MAX_GRID_YZ,
            )?,
            1,
        ),
        block: (POINTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((
        plan,
        CopyRowsParams {
            rows: to_u32(KERNEL, "rows", rows)?,
            cols: to_u32(KERNEL, "cols", cols)?,
        },
    ))
}

/// Parameters of `rope_f32` (`rope.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeParams {
    pub tokens: u32,
    pub num_heads: u32,
    pub head_dim: u32,
    /// `head_dim / 2`, the width of one row of the cos/sin tables.
    pub half_dim: u32,
}
const _: () = assert!(size_of::<RopeParams>() == 16);
// SAFETY: `#[repr(C)]` four u32, as `struct RopeParams` in rope.cu.
unsafe impl cudarc::driver::DeviceRepr for RopeParams {}

/// Grid `(tokens, ceil(num_heads·half_dim / threads))`: one thread per rotated pair.
///
/// # Errors
/// Zero or odd `head_dim`, zero `num_heads`; sizes beyond the grid or `u32`.
pub fn rope_plan(
    tokens: usize,
    num_heads: usize,
    head_dim: usize,
) -> Result<(LaunchPlan, RopeParams), KernelError> {
    const KERNEL: &str = "rope";
    if num_heads == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(KernelError::invalid(
            KERNEL,
            "head_dim",
            format!("{num_heads} heads of dim {head_dim}: need at least one head of even dim"),
        ));
    }
    let pairs = num_heads
        .checked_mul(head_dim / 2)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "num_heads * half_dim",
        })?;
    let threads = warps_for(pairs, 1, POINTWISE_THREADS);
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "tokens", tokens, MAX_GRID_X)?,
            grid_dim(
                KERNEL,
                "num_heads",
                pairs.div_ceil(threads as usize),
                MAX_GRID_YZ,
            )?,
            1,
        ),
        block: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((
        plan,
        RopeParams {
            tokens: to_u32(KERNEL, "tokens", tokens)?,
            num_heads: to_u32(KERNEL, "num_heads", num_heads)?,
            head_dim: to_u32(KERNEL, "head_dim", head_dim)?,
            half_dim: to_u32(KERNEL, "head_dim", head_dim / 2)?,
        },
    ))
}

/// Parameters of `write_kv_f32` (`kv.cu`). Offsets are 64-bit: a pool may exceed 2³² elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteKvParams {
    /// Entries of the (token, slot) list.
    pub entries: u32,
    pub kv_dim: u32,
    pub block_size: u32,
    pub _pad: u32,
    pub page_elems: u64,
    /// `block_size · kv_dim`: where the values start inside a page.
    pub values_offset: u64,
}
const _: () = assert!(size_of::<WriteKvParams>() == 32);
// SAFETY: `#[repr(C)]` of four u32 then two u64 (offset 16, aligned; no padding), as
// `struct WriteKvParams` in kv.cu.
unsafe impl cudarc::driver::DeviceRepr for WriteKvParams {}

/// Grid `(entries, ceil(kv_dim / threads))`: one thread per element of one token's K and V row.
///
/// # Errors
/// `kv_dim`/`block_size` zero; sizes beyond the grid or `u32`.
pub fn write_kv_plan(
    entries: usize,
    kv_dim: usize,
    block_size: usize,
    page_elems: usize,
) -> Result<(LaunchPlan, WriteKvParams), KernelError> {
    const KERNEL: &str = "write_kv";
    if kv_dim == 0 || block_size == 0 {
        return Err(KernelError::invalid(
            KERNEL,
            "layout",
            "kv_dim and block_size must be at least 1",
        ));
    }
    let threads = warps_for(kv_dim, 1, POINTWISE_THREADS);
    let values_offset = block_size
        .checked_mul(kv_dim)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "block_size * kv_dim",
        })?;
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "tokens", entries, MAX_GRID_X)?,
            grid_dim(
                KERNEL,
                "kv_dim",
                kv_dim.div_ceil(threads as usize),
                MAX_GRID_YZ,
            )?,
            1,
        ),
        block: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((
        plan,
        WriteKvParams {
            entries: to_u32(KERNEL, "tokens", entries)?,
            kv_dim: to_u32(KERNEL, "kv_dim", kv_dim)?,
            block_size: to_u32(KERNEL, "block_size", block_size)?,
            _pad: 0,
            page_elems: page_elems as u64,
            values_offset: values_offset as u64,
        },
    ))
}

/// Parameters of `gather_kv_pages_f32` / `scatter_kv_pages_f32` (`kv.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPagesParams {
    pub pages: u32,
    pub _pad: u32,
    /// KV elements moved per page (`2 · block_size · kv_dim`).
    pub page_kv_elems: u64,
    pub page_elems: u64,
}
const _: () = assert!(size_of::<KvPagesParams>() == 24);
// SAFETY: `#[repr(C)]` u32, u32, u64, u64 (no padding), as `struct KvPagesParams` in kv.cu.
unsafe impl cudarc::driver::DeviceRepr for KvPagesParams {}

/// Grid `(pages, min(ceil(page_kv_elems / threads), 65535))` with a grid-stride loop along y.
///
/// # Errors
/// `page_kv_elems == 0`; more pages than the grid holds.
pub fn kv_pages_plan(
    pages: usize,
    page_kv_elems: usize,
    page_elems: usize,
) -> Result<(LaunchPlan, KvPagesParams), KernelError> {
    const KERNEL: &str = "kv_pages";
    if page_kv_elems == 0 || page_kv_elems > page_elems {
        return Err(KernelError::invalid(
            KERNEL,
            "page_kv_elems",
            format!("{page_kv_elems} KV elements in pages of {page_elems}"),
        ));
    }
    let plan = LaunchPlan {
        grid: (
            grid_dim(KERNEL, "pages", pages, MAX_GRID_X)?,
            page_kv_elems
                .div_ceil(POINTWISE_THREADS as usize)
                .min(MAX_GRID_YZ) as u32,
            1,
        ),
        block: (POINTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((
        plan,
        KvPagesParams {
            pages: to_u32(KERNEL, "pages", pages)?,
            _pad: 0,
            page_kv_elems: page_kv_elems as u64,
            page_elems: page_elems as u64,
        },
    ))
}

/// Parameters of the per-row reductions in `sampling.cu` (`argmax_f32`, `log_softmax_f32`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowReduceParams {
    pub rows: u32,
    pub cols: u32,
}
const _: () = assert!(size_of::<RowReduceParams>() == 8);
// SAFETY: `#[repr(C)]` pair of u32, as `struct RowReduceParams` in sampling.cu.
unsafe impl cudarc::driver::DeviceRepr for RowReduceParams {}

/// Elements each thread of a row reduction handles at least.
const ROW_REDUCE_ELEMS_PER_THREAD: usize = 8;

/// One block per row, whole warps striding over the columns; shared memory holds one
/// (value, index) pair — 8 bytes — per warp.
///
/// # Errors
/// `cols == 0`; sizes beyond the grid or `u32`.
pub fn row_reduce_plan(
    rows: usize,
    cols: usize,
) -> Result<(LaunchPlan, RowReduceParams), KernelError> {
    const KERNEL: &str = "row_reduce";
    if cols == 0 {
        return Err(KernelError::invalid(KERNEL, "cols", "must be at least 1"));
    }
    let threads = warps_for(cols, ROW_REDUCE_ELEMS_PER_THREAD, MAX_BLOCK_THREADS);
    let plan = LaunchPlan {
        grid: (grid_dim(KERNEL, "rows", rows, MAX_GRID_X)?, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: threads / WARP_SIZE * 8,
    };
    Ok((
        plan,
        RowReduceParams {
            rows: to_u32(KERNEL, "rows", rows)?,
            cols: to_u32(KERNEL, "cols", cols)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointwise_caps_blocks_and_strides() {
        let (plan, p) = pointwise_plan(1000, 1).unwrap();
        assert_eq!((plan.grid, plan.block), ((4, 1, 1), (256, 1, 1)));
        assert_eq!((p.len, p.cols), (1000, 1));
        let (plan, _) = pointwise_plan(1 << 30, 7).unwrap();
        assert_eq!(plan.grid.0, 65_535);
        // Every element is reached by the grid-stride loop.
        assert!(u64::from(plan.grid.0) * u64::from(plan.block.0) > 0);
        assert!(pointwise_plan(0, 1).unwrap().0.is_empty());
        assert_eq!(pointwise_plan(4, 0).unwrap_err().kind(), "invalid_argument");
    }

    #[test]
    fn copy_rows_tiles_columns() {
        let (plan, p) = copy_rows_plan(3, 4096).unwrap();
        assert_eq!((plan.grid, plan.block), ((3, 16, 1), (256, 1, 1)));
        assert_eq!(
            p,
            CopyRowsParams {
                rows: 3,
                cols: 4096
            }
        );
        let (plan, _) = copy_rows_plan(3, 257).unwrap();
        assert_eq!(plan.grid.1, 2);
        assert!(copy_rows_plan(0, 8).unwrap().0.is_empty());
        assert_eq!(copy_rows_plan(2, 0).unwrap_err().kind(), "invalid_argument");
    }

    #[test]
    fn rope_covers_every_pair_once() {
        // 32 heads of dim 128: 2048 pairs, 8 blocks of 256 threads per token.
        let (plan, p) = rope_plan(5, 32, 128).unwrap();
        assert_eq!((plan.grid, plan.block), ((5, 8, 1), (256, 1, 1)));
        assert_eq!((p.half_dim, p.num_heads, p.tokens), (64, 32, 5));
        // 3 heads of dim 6: 9 pairs, one warp.
        let (plan, _) = rope_plan(2, 3, 6).unwrap();
        assert_eq!((plan.grid, plan.block), ((2, 1, 1), (32, 1, 1)));
        assert_eq!(rope_plan(1, 2, 7).unwrap_err().kind(), "invalid_argument");
        assert_eq!(rope_plan(1, 0, 8).unwrap_err().kind(), "invalid_argument");
    }

    #[test]
    fn write_kv_and_page_plans() {
        let (plan, p) = write_kv_plan(7, 24, 5, 247).unwrap();
        assert_eq!((plan.grid, plan.block), ((7, 1, 1), (32, 1, 1)));
        assert_eq!((p.values_offset, p.page_elems, p.entries), (120, 247, 7));
        let (plan, _) = write_kv_plan(1, 1024, 16, 1 << 16).unwrap();
        assert_eq!((plan.grid.1, plan.block.0), (4, 256));
        assert_eq!(
            write_kv_plan(1, 0, 16, 64).unwrap_err().kind(),
            "invalid_argument"
        );

        let (plan, p) = kv_pages_plan(3, 240, 247).unwrap();
        assert_eq!((plan.grid, plan.block), ((3, 1, 1), (256, 1, 1)));
        assert_eq!((p.page_kv_elems, p.page_elems), (240, 247));
        assert_eq!(
            kv_pages_plan(1 << 30, 1 << 28, 1 << 28).unwrap().0.grid.1,
            65_535
        );
        assert_eq!(
            kv_pages_plan(1, 248, 247).unwrap_err().kind(),
            "invalid_argument"
        );
    }

    #[test]
    fn row_reduce_uses_whole_warps() {
        let (plan, p) = row_reduce_plan(4, 128_256).unwrap();
        assert_eq!(
            (plan.grid, plan.block, plan.shared_mem_bytes),
            ((4, 1, 1), (1024, 1, 1), 256)
        );
        assert_eq!(
            p,
            RowReduceParams {
                rows: 4,
                cols: 128_256
            }
        );
        let (plan, _) = row_reduce_plan(1, 100).unwrap();
        assert_eq!((plan.block, plan.shared_mem_bytes), ((32, 1, 1), 8));
        assert_eq!(
            row_reduce_plan(1, 0).unwrap_err().kind(),
            "invalid_argument"
        );
    }
}
