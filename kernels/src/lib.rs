//! Compute kernels for loraplane: one contract, a CPU reference (always built) and CUDA
//! (feature `cuda`).
//!
//! [`cpu`] is the reference every CUDA kernel is tested against: plain f32 over flat slices,
//! validating every shape up front. [`cuda`] holds the NVRTC kernel cache, pure launch plans
//! and the `.cu` sources; it builds without a CUDA toolkit (libraries are loaded at run time).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;

pub use error::KernelError;
