//! Launches of `elementwise.cu`: SiLU·mul, residual add, bias add, dtype conversion for 16-bit
//! GEMMs, the embedding lookup and row selection.

use super::launch_err;
use crate::KernelError;
use crate::cpu::check;
use crate::cuda::ELEMENTWISE;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::gemm::{DeviceMatrix, MatrixData, WeightDtype};
use crate::cuda::plan::to_u32;
use crate::cuda::plan::{copy_rows_plan, pointwise_plan};
use cudarc::driver::PushKernelArg;

/// `out = silu(gate) · up` (reference: [`crate::cpu::silu_mul`]).
///
/// # Errors
/// `up` or `out` not the length of `gate`; a launch failure.
pub fn silu_mul(
    dev: &CudaDevice,
    gate: &DeviceBuffer<f32>,
    up: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "silu_mul";
    check::len(KERNEL, "up", gate.len(), up.len())?;
    check::len(KERNEL, "out", gate.len(), out.len())?;
    let (plan, params) = pointwise_plan(gate.len(), 1)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&ELEMENTWISE, "silu_mul_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&gate.slice)
        .arg(&up.slice)
        .arg(&mut out.slice)
        .arg(&params);
    // SAFETY: the argument list matches `silu_mul_f32(const float*, const float*, float*,
    // PointwiseParams)`; all three buffers hold `params.len` floats (checked above) and the
    // grid-stride loop stays below `params.len`.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// `x += y` (reference: [`crate::cpu::add_inplace`]).
///
/// # Errors
/// `y` not the length of `x`; a launch failure.
pub fn add(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<f32>,
    y: &DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "add_inplace";
    check::len(KERNEL, "y", x.len(), y.len())?;
    let (plan, params) = pointwise_plan(x.len(), 1)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&ELEMENTWISE, "add_f32")?;
    let mut launch = dev.launcher(&f);
    launch.arg(&mut x.slice).arg(&y.slice).arg(&params);
    // SAFETY: matches `add_f32(float*, const float*, PointwiseParams)`; both buffers hold
    // `params.len` floats.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// `x[r, c] += bias[c]` for every row of `x` (`bias.len()` columns).
///
/// # Errors
/// An empty `bias` or `x` not a whole number of rows; a launch failure.
pub fn add_bias(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<f32>,
    bias: &DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "add_bias";
    if bias.is_empty() || !x.len().is_multiple_of(bias.len()) {
        return Err(KernelError::RaggedRows {
            kernel: KERNEL,
            what: "x",
            len: x.len(),
            width: bias.len(),
        });
    }
    let (plan, params) = pointwise_plan(x.len(), bias.len())?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&ELEMENTWISE, "add_bias_f32")?;
    let mut launch = dev.launcher(&f);
    launch.arg(&mut x.slice).arg(&bias.slice).arg(&params);
    // SAFETY: matches `add_bias_f32(float*, const float*, PointwiseParams)`; `x` holds
    // `params.len` floats and `bias` `params.cols`, the only indices the kernel forms.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// `out = x` rounded to `dtype` (bf16 or f16 bit patterns), the input of a 16-bit GEMM.
pub(crate) fn convert_to_half(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    dtype: WeightDtype,
    out: &mut DeviceBuffer<u16>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "convert";
    check::len(KERNEL, "out", x.len(), out.len())?;
    let entry = match dtype {
        WeightDtype::Bf16 => "convert_f32_to_bf16",
        WeightDtype::F16 => "convert_f32_to_f16",
        WeightDtype::F32 => {
            return Err(KernelError::invalid(
                KERNEL,
                "dtype",
                "f32 is not a half type",
            ));
        }
    };
    let (plan, params) = pointwise_plan(x.len(), 1)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&ELEMENTWISE, entry)?;
    let mut launch = dev.launcher(&f);
    launch.arg(&x.slice).arg(&mut out.slice).arg(&params);
    // SAFETY: matches `convert_f32_to_*(const float*, unsigned short*, PointwiseParams)`;
    // both buffers hold `params.len` elements.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// `out[t] = table[ids[t]]` widened to f32: `table` is `[V, d]`, `out` `[ids.len(), d]`
/// (reference: [`crate::cpu::embedding`]).
///
/// # Errors
/// `out` of the wrong length; an id `>= V` ([`KernelError::TokenOutOfRange`]); a launch or
/// upload failure. `out` is untouched on a validation error.
pub fn embedding(
    dev: &CudaDevice,
    ids: &[u32],
    table: &DeviceMatrix,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "embedding";
    let (vocab, d) = (table.rows(), table.cols());
    let expected = ids.len().checked_mul(d).ok_or(KernelError::SizeOverflow {
        kernel: KERNEL,
        what: "out",
    })?;
    check::len(KERNEL, "out", expected, out.len())?;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(KernelError::TokenOutOfRange {
            kernel: KERNEL,
            id,
            vocab,
        });
    }
    let (plan, params) = copy_rows_plan(ids.len(), d)?;
    if plan.is_empty() {
        return Ok(());
    }
    let idx = dev.upload(ids)?;
    match table.data() {
        MatrixData::F32(data) => {
            let f = dev.function(&ELEMENTWISE, "copy_rows_f32")?;
            let mut launch = dev.launcher(&f);
            launch
                .arg(&data.slice)
                .arg(&idx.slice)
                .arg(&mut out.slice)
                .arg(&params);
            // SAFETY: matches `copy_rows_f32(const float*, const unsigned int*, float*,
            // CopyRowsParams)`; every id is below the table's rows (checked above), `idx` holds
            // `params.rows` ids and `out` `params.rows · params.cols` floats.
            unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
        }
        MatrixData::Half(data) => {
            let entry = if table.dtype() == WeightDtype::F16 {
                "copy_rows_f16"
            } else {
                "copy_rows_bf16"
            };
            let f = dev.function(&ELEMENTWISE, entry)?;
            let mut launch = dev.launcher(&f);
            launch
                .arg(&data.slice)
                .arg(&idx.slice)
                .arg(&mut out.slice)
                .arg(&params);
            // SAFETY: as for f32, with the table's 16-bit elements (`unsigned short*`).
            unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
        }
    }
    Ok(())
}

/// `out[i] = x[rows[i]]` for `x` of rows of `cols`: the rows whose logits are wanted.
///
/// # Errors
/// `cols == 0` or `x` not a whole number of rows; `out` not `[rows.len(), cols]`; a row index
/// beyond `x` ([`KernelError::RowsOutOfRange`]); a launch or upload failure.
pub fn select_rows(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    cols: usize,
    rows: &[usize],
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "select_rows";
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(KernelError::RaggedRows {
            kernel: KERNEL,
            what: "x",
            len: x.len(),
            width: cols,
        });
    }
    let x_rows = x.len() / cols;
    let expected = rows
        .len()
        .checked_mul(cols)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "out",
        })?;
    check::len(KERNEL, "out", expected, out.len())?;
    let idx = rows
        .iter()
        .map(|&r| {
            if r < x_rows {
                to_u32(KERNEL, "rows", r)
            } else {
                Err(KernelError::RowsOutOfRange {
                    kernel: KERNEL,
                    start: r,
                    end: r + 1,
                    rows: x_rows,
                })
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let (plan, params) = copy_rows_plan(rows.len(), cols)?;
    if plan.is_empty() {
        return Ok(());
    }
    let idx = dev.upload(&idx)?;
    let f = dev.function(&ELEMENTWISE, "copy_rows_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&x.slice)
        .arg(&idx.slice)
        .arg(&mut out.slice)
        .arg(&params);
    // SAFETY: matches `copy_rows_f32`; every index is below `x`'s rows (checked above), `idx`
    // holds `params.rows` indices and `out` `params.rows · params.cols` floats.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}
