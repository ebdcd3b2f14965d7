//! Pure launch plans: grid, block and dynamic shared memory for each CUDA kernel, computed from
//! shapes alone, plus the `#[repr(C)]` parameter structs the kernels take by value. Nothing
//! here calls CUDA, so every rule is unit-tested on machines without a GPU.
//!
//! Each parameter struct has a compile-time size assert and a twin, field for field, in its
//! `.cu` source; changing one without the other breaks the build or the parity tests.

use crate::KernelError;

mod attention;
mod lora;
mod norm;
mod pointwise;

pub use attention::{
    ATTN_MAX_HEAD_DIM, ATTN_MAX_WARPS, ATTN_SPLIT_KEYS, AttentionPlan, AttnParams, AttnReduceItem,
    AttnSeqParams, AttnWorkItem, attention_plan,
};
pub use lora::{
    EXPAND_THREADS, LoraExpandParams, LoraSegmentParams, LoraShrinkParams, LoraTable,
    SHRINK_WARPS_PER_BLOCK, lora_expand_plan, lora_shrink_plan, lora_table,
};
pub use norm::{RMS_NORM_ELEMS_PER_THREAD, RmsNormParams, rms_norm_plan};
pub use pointwise::{
    CopyRowsParams, KvPagesParams, POINTWISE_THREADS, PointwiseParams, RopeParams, RowReduceParams,
    WriteKvParams, copy_rows_plan, kv_pages_plan, pointwise_plan, rope_plan, row_reduce_plan,
    write_kv_plan,
};

pub const WARP_SIZE: u32 = 32;
pub const MAX_BLOCK_THREADS: u32 = 1024;
/// Dynamic shared memory a block gets without opting in through a function attribute.
pub const DEFAULT_SHARED_MEM_BYTES: u32 = 48 * 1024;
pub(crate) const MAX_GRID_X: usize = (1 << 31) - 1;
pub(crate) const MAX_GRID_YZ: usize = 65_535;

/// One kernel launch's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchPlan {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchPlan {
    /// A plan with no blocks (empty batch): callers skip the launch, which CUDA would reject.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }
}

impl From<LaunchPlan> for cudarc::driver::LaunchConfig {
    fn from(plan: LaunchPlan) -> Self {
        Self {
            grid_dim: plan.grid,
            block_dim: plan.block,
            shared_mem_bytes: plan.shared_mem_bytes,
        }
    }
}

/// `value` as a kernel's `u32` field, or [`KernelError::InvalidArgument`].
pub(crate) fn to_u32(
    kernel: &'static str,
    what: &'static str,
    value: usize,
) -> Result<u32, KernelError> {
    u32::try_from(value)
        .map_err(|_| KernelError::invalid(kernel, what, format!("{value} exceeds u32")))
}

pub(crate) fn grid_dim(
    kernel: &'static str,
    what: &'static str,
    blocks: usize,
    max: usize,
) -> Result<u32, KernelError> {
    if blocks > max {
        return Err(KernelError::invalid(
            kernel,
            what,
            format!("{blocks} blocks exceed the grid limit {max}"),
        ));
    }
    to_u32(kernel, what, blocks)
}

pub(crate) fn shared_bytes(
    kernel: &'static str,
    what: &'static str,
    floats: usize,
) -> Result<u32, KernelError> {
    match floats.checked_mul(4) {
        Some(bytes) if bytes <= DEFAULT_SHARED_MEM_BYTES as usize => to_u32(kernel, what, bytes),
        _ => Err(KernelError::invalid(
            kernel,
            what,
            format!("{floats} floats exceed {DEFAULT_SHARED_MEM_BYTES} bytes of shared memory"),
        )),
    }
}

/// Threads for a loop over `n` elements with at least `per_thread` each: a whole number of
/// warps, between one warp and `max`.
pub(crate) fn warps_for(n: usize, per_thread: usize, max: u32) -> u32 {
    let threads = n.div_ceil(per_thread).div_ceil(WARP_SIZE as usize) * WARP_SIZE as usize;
    threads.clamp(WARP_SIZE as usize, max as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_config_conversion_keeps_the_geometry() {
        let (plan, _) = rms_norm_plan(5, 100, 1e-6).unwrap();
        let cfg = cudarc::driver::LaunchConfig::from(plan);
        assert_eq!(
            (cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes),
            (plan.grid, plan.block, plan.shared_mem_bytes)
        );
        assert_eq!(plan.threads_per_block(), 32);
    }
}
