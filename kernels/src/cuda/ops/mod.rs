//! Safe launch wrappers: one function per operation of the backend contract, taking device
//! buffers where the CPU reference takes slices and host metadata (ids, positions, slots,
//! block tables, segments) as the reference does.
//!
//! Every wrapper validates its arguments on the host with the reference's rules (and the same
//! [`KernelError`](crate::KernelError)s) before it uploads or launches anything, so a kernel
//! only ever sees in-range indices; on `Err` no output has been written. Results are queued on
//! the device's stream: read them with [`CudaDevice::download`](super::CudaDevice::download).

mod attention;
mod kv;
mod lora;
mod norm;
mod pointwise;
mod sampling;

pub use attention::paged_attention;
pub use kv::{gather_kv_pages, scatter_kv_pages, write_kv};
pub use lora::{DeviceLoraTable, lora, lora_expand, lora_shrink};
pub use norm::{DeviceRopeTable, rms_norm, rope};
pub use pointwise::{add, add_bias, embedding, select_rows, silu_mul};
pub use sampling::{argmax_rows, log_softmax_rows};

pub(crate) use pointwise::convert_to_half;

use crate::KernelError;

/// Maps a launch failure of `kernel` to [`KernelError::Cuda`].
pub(crate) fn launch_err(
    kernel: &'static str,
) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        kernel,
        message: format!("launch: {e}"),
    }
}
