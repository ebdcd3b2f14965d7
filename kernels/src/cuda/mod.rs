//! CUDA side of the kernels (feature `cuda`): the one NVRTC cache, pure launch plans, and the
//! `.cu` sources embedded with `include_str!`.
//!
//! Builds with no CUDA toolkit or driver: cudarc loads `libcuda`/`libnvrtc`/`libcublas` at run
//! time, and a missing library is a [`KernelError::CudaUnavailable`](crate::KernelError), not a
//! link error. Each kernel family has its CPU reference in [`crate::cpu`], a plan here, and a
//! parity test against the reference on GPU machines.

mod cache;
mod plan;

pub use cache::{CompileKey, KernelCache, KernelSource, NvrtcCache, arch_for, source_hash};
pub use plan::{
    DEFAULT_SHARED_MEM_BYTES, EXPAND_THREADS, LaunchPlan, LoraExpandParams, LoraSegmentParams,
    LoraShrinkParams, LoraTable, MAX_BLOCK_THREADS, RMS_NORM_ELEMS_PER_THREAD, RmsNormParams,
    SHRINK_WARPS_PER_BLOCK, WARP_SIZE, lora_expand_plan, lora_shrink_plan, lora_table,
    rms_norm_plan,
};

/// RMSNorm, one block per row (plan: [`rms_norm_plan`], reference: [`crate::cpu::rms_norm`]).
pub const RMS_NORM: KernelSource = KernelSource {
    name: "rms_norm",
    entries: &["rms_norm_f32"],
    source: include_str!("rms_norm.cu"),
};
