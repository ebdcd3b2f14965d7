//! CPU reference kernels, all f32: the contract every CUDA kernel is tested against.
//!
//! Conventions shared by every kernel here:
//! - Tensors are flat row-major slices; the doc comment of each kernel gives the shape.
//! - Every kernel checks all shapes, ids, offsets and arguments before it writes anything, and
//!   returns a [`KernelError`](crate::KernelError) instead of panicking. On `Err`, outputs are
//!   untouched.
//! - Work is split across rayon's pool only above [`PAR_MIN_WORK`] multiply-adds, so decode-sized
//!   calls do not pay the fork/join overhead.
//! - Inner loops are written as fixed-width lane loops (see `simd`) that the compiler vectorises
//!   without `unsafe` or target-specific intrinsics — except the base GEMM (`gemm`), whose
//!   register-blocked micro-kernel uses AVX2/FMA intrinsics where the CPU has them.

mod attention;
pub(crate) mod check;
mod elementwise;
mod gemm;
mod kv;
pub(crate) mod lora;
mod norm;
mod pool;
mod rope;
mod sampling;
mod simd;

pub use attention::{AttnSeq, paged_attention};
pub use elementwise::{add_inplace, embedding, silu_mul, stream_sum};
pub use gemm::{PackedMatrix, gemm_packed};
pub use kv::{KvLayout, gather_kv_pages, scatter_kv_pages, write_kv};
pub use lora::{LoraSegment, lora, lora_expand, lora_shrink};
pub use norm::rms_norm;
pub use pool::zeroed_pool;
pub use rope::{Llama3RopeScaling, RopeTable, rope, rope_inv_freq};
pub use sampling::{SamplingSpec, argmax, log_softmax, sample};

/// Below this many multiply-adds a kernel runs on the calling thread: rayon's fork/join costs a
/// few microseconds, which is more than a decode-sized call takes.
pub const PAR_MIN_WORK: usize = 1 << 16;
