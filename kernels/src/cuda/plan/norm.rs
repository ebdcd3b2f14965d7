//! Launch plan and parameters of the RMSNorm kernel (`rms_norm.cu`).

use super::{LaunchPlan, MAX_BLOCK_THREADS, MAX_GRID_X, WARP_SIZE, grid_dim, to_u32, warps_for};
use crate::KernelError;

/// Parameters of `rms_norm_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNormParams {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RmsNormParams>() == 16);

// SAFETY: `#[repr(C)]` plain data of four 4-byte scalars (no padding, no pointers), laid out
// exactly as `struct RmsNormParams` in rms_norm.cu, so passing it by value as a kernel argument
// copies a valid value of the C type.
unsafe impl cudarc::driver::DeviceRepr for RmsNormParams {}

/// Elements each rms_norm thread handles at least, so short rows use few warps.
pub const RMS_NORM_ELEMS_PER_THREAD: usize = 4;

/// One block per row; threads stride over the row, reduce the sum of squares with warp
/// shuffles, then one float per warp in shared memory.
///
/// # Errors
/// `dim == 0`, or rows/dim beyond what the grid and `u32` fields can index.
pub fn rms_norm_plan(
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(LaunchPlan, RmsNormParams), KernelError> {
    const KERNEL: &str = "rms_norm";
    if dim == 0 {
        return Err(KernelError::invalid(KERNEL, "dim", "must be at least 1"));
    }
    let threads = warps_for(dim, RMS_NORM_ELEMS_PER_THREAD, MAX_BLOCK_THREADS);
    let plan = LaunchPlan {
        grid: (grid_dim(KERNEL, "rows", rows, MAX_GRID_X)?, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: threads / WARP_SIZE * 4,
    };
    let params = RmsNormParams {
        rows: to_u32(KERNEL, "rows", rows)?,
        dim: to_u32(KERNEL, "dim", dim)?,
        eps,
        _pad: 0,
    };
    Ok((plan, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_plan_uses_one_block_per_row_and_whole_warps() {
        let (plan, params) = rms_norm_plan(7, 4096, 1e-5).unwrap();
        assert_eq!(plan.grid, (7, 1, 1));
        assert_eq!(plan.block, (1024, 1, 1)); // 4 elements per thread
        assert_eq!(plan.shared_mem_bytes, 32 * 4); // one float per warp
        assert_eq!(
            params,
            RmsNormParams {
                rows: 7,
                dim: 4096,
                eps: 1e-5,
                _pad: 0
            }
        );
        // Short rows: one warp; odd sizes round up to whole warps; huge rows cap at 1024.
        assert_eq!(rms_norm_plan(3, 37, 1e-6).unwrap().0.block, (32, 1, 1));
        assert_eq!(
            rms_norm_plan(3, 129 * 4, 1e-6).unwrap().0.block,
            (160, 1, 1)
        );
        assert_eq!(
            rms_norm_plan(3, 1 << 20, 1e-6).unwrap().0.block,
            (1024, 1, 1)
        );
        assert!(rms_norm_plan(0, 64, 1e-6).unwrap().0.is_empty());
    }

    #[test]
    fn rms_norm_plan_errors() {
        assert_eq!(
            rms_norm_plan(1, 0, 1e-6).unwrap_err().kind(),
            "invalid_argument"
        );
        assert_eq!(
            rms_norm_plan(1 << 31, 64, 1e-6).unwrap_err().kind(),
            "invalid_argument"
        );
        assert_eq!(
            rms_norm_plan(1, 1 << 32, 1e-6).unwrap_err().kind(),
            "invalid_argument"
        );
    }
}
