//! Launches of `sampling.cu`: per-row argmax (greedy decoding on the device) and log-softmax
//! (log-probabilities) over `[rows, vocab]` logits.

use cudarc::driver::PushKernelArg;

use super::launch_err;
use crate::KernelError;
use crate::cpu::check;
use crate::cuda::SAMPLING;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::plan::row_reduce_plan;

const NO_INDEX: u32 = u32::MAX;

fn rows_of(
    kernel: &'static str,
    logits: &DeviceBuffer<f32>,
    vocab: usize,
) -> Result<usize, KernelError> {
    if vocab == 0 || !logits.len().is_multiple_of(vocab) {
        return Err(KernelError::RaggedRows {
            kernel,
            what: "logits",
            len: logits.len(),
            width: vocab,
        });
    }
    Ok(logits.len() / vocab)
}

/// The [`crate::cpu::argmax`] of every row of `logits` (`[rows, vocab]`): index and value of
/// the largest logit, lowest index on ties, NaN never winning; `None` for an all-NaN row.
///
/// # Errors
/// `logits` not a whole number of rows; a launch or copy failure.
pub fn argmax_rows(
    dev: &CudaDevice,
    logits: &DeviceBuffer<f32>,
    vocab: usize,
) -> Result<Vec<Option<(usize, f32)>>, KernelError> {
    const KERNEL: &str = "argmax";
    let rows = rows_of(KERNEL, logits, vocab)?;
    let (plan, params) = row_reduce_plan(rows, vocab)?;
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    let mut index = dev.zeros::<u32>(rows)?;
    let mut value = dev.zeros::<f32>(rows)?;
    let f = dev.function(&SAMPLING, "argmax_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&logits.slice)
        .arg(&mut index.slice)
        .arg(&mut value.slice)
        .arg(&params);
    // SAFETY: matches `argmax_f32(const float*, unsigned int*, float*, RowReduceParams)`;
    // `logits` holds `rows · vocab` floats, the outputs `rows` each; shared memory holds the
    // (value, index) pair per warp the kernel uses.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    let index = dev.download(&index)?;
    let value = dev.download(&value)?;
    Ok(index
        .into_iter()
        .zip(value)
        .map(|(i, v)| (i != NO_INDEX).then_some((i as usize, v)))
        .collect())
}

/// [`crate::cpu::log_softmax`] of every row of `logits` (`[rows, vocab]`) into `out`.
///
/// # Errors
/// `logits` not a whole number of rows, `out` of another length; a launch failure.
pub fn log_softmax_rows(
    dev: &CudaDevice,
    logits: &DeviceBuffer<f32>,
    vocab: usize,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "log_softmax";
    let rows = rows_of(KERNEL, logits, vocab)?;
    check::len(KERNEL, "out", logits.len(), out.len())?;
    let (plan, params) = row_reduce_plan(rows, vocab)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&SAMPLING, "log_softmax_f32")?;
    let mut launch = dev.launcher(&f);
    launch.arg(&logits.slice).arg(&mut out.slice).arg(&params);
    // SAFETY: matches `log_softmax_f32(const float*, float*, RowReduceParams)`; both buffers
    // hold `rows · vocab` floats; shared memory holds one float per warp.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}
