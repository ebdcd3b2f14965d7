//! CUDA side of the kernels (feature `cuda`): the one NVRTC cache, pure launch plans, the
//! `.cu` sources embedded with `include_str!`, and safe launch wrappers over device buffers;
//! plus the device's measured copy bandwidth ([`copy_bandwidth`]), the ceiling the benchmarks
//! read memory-bound steps against.
//!
//! Builds with no CUDA toolkit or driver: cudarc loads `libcuda`/`libnvrtc`/`libcublas` at run
//! time, and a missing library is a [`KernelError::CudaUnavailable`](crate::KernelError), not a
//! link error. Each kernel family has its CPU reference in [`crate::cpu`], a plan in [`plan`],
//! a launch in [`ops`], and a parity test against the reference on GPU machines
//! (`tests/cuda_parity.rs`).
//!
//! Every `unsafe` block of the CUDA path lives in this module tree (the agent crate forbids
//! `unsafe`): the launch wrappers validate shapes, ids and offsets on the host exactly as the
//! CPU reference does, so a kernel never indexes outside the buffers it is given.

mod bandwidth;
mod cache;
mod device;
mod gemm;
pub mod ops;
pub mod plan;

pub use bandwidth::{CopyBandwidth, copy_bandwidth};
pub use cache::{CompileKey, KernelCache, KernelSource, NvrtcCache, arch_for, source_hash};
pub use cudarc::driver::CudaSlice;
pub use device::{CudaDevice, DeviceBuffer, driver_device_count};
pub use gemm::{DeviceMatrix, WeightDtype, linear};
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

/// Pointwise maps and row copies (references: [`crate::cpu::silu_mul`],
/// [`crate::cpu::add_inplace`], [`crate::cpu::embedding`]).
pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    entries: &[
        "silu_mul_f32",
        "add_f32",
        "add_bias_f32",
        "convert_f32_to_bf16",
        "convert_f32_to_f16",
        "copy_rows_f32",
        "copy_rows_bf16",
        "copy_rows_f16",
    ],
    source: concat!(include_str!("prelude.cuh"), include_str!("elementwise.cu")),
};

/// Rotary embedding over the `RopeTable` layout (reference: [`crate::cpu::rope`]).
pub const ROPE: KernelSource = KernelSource {
    name: "rope",
    entries: &["rope_f32"],
    source: concat!(include_str!("prelude.cuh"), include_str!("rope.cu")),
};

/// Paged KV write and whole-page gather/scatter (references: [`crate::cpu::write_kv`],
/// [`crate::cpu::gather_kv_pages`], [`crate::cpu::scatter_kv_pages`]).
pub const KV: KernelSource = KernelSource {
    name: "kv",
    entries: &[
        "write_kv_f32",
        "gather_kv_pages_f32",
        "scatter_kv_pages_f32",
    ],
    source: concat!(include_str!("prelude.cuh"), include_str!("kv.cu")),
};

/// Paged attention with its flash-decoding merge (reference: [`crate::cpu::paged_attention`]).
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    entries: &["paged_attention_f32", "attention_reduce_f32"],
    source: concat!(include_str!("prelude.cuh"), include_str!("attention.cu")),
};

/// LoRA shrink and expand over pool rows (references: [`crate::cpu::lora_shrink`],
/// [`crate::cpu::lora_expand`]).
pub const LORA: KernelSource = KernelSource {
    name: "lora",
    entries: &["lora_shrink_f32", "lora_expand_f32"],
    source: concat!(include_str!("prelude.cuh"), include_str!("lora.cu")),
};

/// Per-row argmax and log-softmax (references: [`crate::cpu::argmax`],
/// [`crate::cpu::log_softmax`]).
pub const SAMPLING: KernelSource = KernelSource {
    name: "sampling",
    entries: &["argmax_f32", "log_softmax_f32"],
    source: concat!(include_str!("prelude.cuh"), include_str!("sampling.cu")),
};

/// Every kernel source, for compile-all checks.
pub const ALL_SOURCES: &[KernelSource] =
    &[RMS_NORM, ELEMENTWISE, ROPE, KV, ATTENTION, LORA, SAMPLING];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_distinct_and_name_their_entries() {
        let mut names: Vec<_> = ALL_SOURCES.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL_SOURCES.len());
        for s in ALL_SOURCES {
            for entry in s.entries {
                assert!(
                    s.source.contains(entry),
                    "{}: no entry point {entry}",
                    s.name
                );
            }
        }
    }

    /// Compiles every source with the machine's NVRTC (no GPU needed) for the architectures
    /// the project targets, and checks each entry point is in the PTX. Without NVRTC it says
    /// so and passes: CI machines have no CUDA at all.
    #[test]
    fn every_source_compiles_with_nvrtc() {
        let cache = NvrtcCache::new();
        for arch in ["compute_80", "compute_90"] {
            for s in ALL_SOURCES {
                match cache.ptx(s, &[], arch) {
                    Ok(ptx) => {
                        let text = ptx.to_src();
                        for entry in s.entries {
                            assert!(
                                text.contains(&format!(".entry {entry}(")),
                                "{}: {entry} missing from the PTX for {arch}",
                                s.name
                            );
                        }
                    }
                    Err(e) if e.kind() == "cuda_unavailable" => {
                        println!("SKIPPED: no NVRTC library on this machine ({e})");
                        return;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(cache.len(), 2 * ALL_SOURCES.len());
    }
}
