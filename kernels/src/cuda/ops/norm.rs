//! Launches of `rms_norm.cu` and `rope.cu`, and the device copy of a [`RopeTable`].

use cudarc::driver::PushKernelArg;

use super::launch_err;
use crate::KernelError;
use crate::cpu::RopeTable;
use crate::cpu::check;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::plan::to_u32;
use crate::cuda::plan::{rms_norm_plan, rope_plan};
use crate::cuda::{RMS_NORM, ROPE};

/// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) · weight` (reference: [`crate::cpu::rms_norm`]).
///
/// # Errors
/// `weight` empty, `x` not a whole number of rows of `weight.len()`, `out` not the length of
/// `x`; a launch failure.
pub fn rms_norm(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    weight: &DeviceBuffer<f32>,
    eps: f32,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "rms_norm";
    let d = weight.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(KernelError::RaggedRows {
            kernel: KERNEL,
            what: "x",
            len: x.len(),
            width: d,
        });
    }
    check::len(KERNEL, "out", x.len(), out.len())?;
    let (plan, params) = rms_norm_plan(x.len() / d, d, eps)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&RMS_NORM, "rms_norm_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&x.slice)
        .arg(&weight.slice)
        .arg(&mut out.slice)
        .arg(&params);
    // SAFETY: matches `rms_norm_f32(const float*, const float*, float*, RmsNormParams)`; `x`
    // and `out` hold `rows · dim` floats and `weight` `dim` (checked above); the plan gives
    // whole warps and the one float per warp of shared memory the kernel uses.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// A [`RopeTable`] in device memory.
#[derive(Debug)]
pub struct DeviceRopeTable {
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
    half_dim: usize,
    max_positions: usize,
}

impl DeviceRopeTable {
    /// Uploads `table`.
    ///
    /// # Errors
    /// A table whose vectors are not `[max_positions, half_dim]`; an upload failure.
    pub fn upload(dev: &CudaDevice, table: &RopeTable) -> Result<Self, KernelError> {
        const KERNEL: &str = "rope";
        let len =
            table
                .max_positions
                .checked_mul(table.half_dim)
                .ok_or(KernelError::SizeOverflow {
                    kernel: KERNEL,
                    what: "table",
                })?;
        check::len(KERNEL, "table.cos", len, table.cos.len())?;
        check::len(KERNEL, "table.sin", len, table.sin.len())?;
        Ok(Self {
            cos: dev.upload(&table.cos)?,
            sin: dev.upload(&table.sin)?,
            half_dim: table.half_dim,
            max_positions: table.max_positions,
        })
    }

    pub fn half_dim(&self) -> usize {
        self.half_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// In-place rotary embedding of `x`: `[positions.len(), num_heads, head_dim]` (reference:
/// [`crate::cpu::rope`]).
///
/// # Errors
/// As the reference: zero sizes, `head_dim` odd or not twice the table's `half_dim`, `x` of
/// the wrong length, a position `>= max_positions`; a launch or upload failure. `x` is
/// untouched on a validation error.
pub fn rope(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<f32>,
    num_heads: usize,
    head_dim: usize,
    positions: &[usize],
    table: &DeviceRopeTable,
) -> Result<(), KernelError> {
    const KERNEL: &str = "rope";
    if num_heads == 0 || head_dim == 0 {
        return Err(KernelError::invalid(
            KERNEL,
            "num_heads",
            "must be at least 1",
        ));
    }
    if !head_dim.is_multiple_of(2) || head_dim / 2 != table.half_dim {
        return Err(KernelError::invalid(
            KERNEL,
            "head_dim",
            format!(
                "{head_dim} is not even and twice the table's half_dim {}",
                table.half_dim
            ),
        ));
    }
    let expected = positions
        .len()
        .checked_mul(num_heads)
        .and_then(|n| n.checked_mul(head_dim))
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "x",
        })?;
    check::len(KERNEL, "x", expected, x.len())?;
    let positions = positions
        .iter()
        .map(|&p| {
            if p < table.max_positions {
                to_u32(KERNEL, "position", p)
            } else {
                Err(KernelError::PositionOutOfRange {
                    kernel: KERNEL,
                    position: p,
                    max_positions: table.max_positions,
                })
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let (plan, params) = rope_plan(positions.len(), num_heads, head_dim)?;
    if plan.is_empty() {
        return Ok(());
    }
    let positions = dev.upload(&positions)?;
    let f = dev.function(&ROPE, "rope_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&mut x.slice)
        .arg(&positions.slice)
        .arg(&table.cos.slice)
        .arg(&table.sin.slice)
        .arg(&params);
    // SAFETY: matches `rope_f32(float*, const unsigned int*, const float*, const float*,
    // RopeParams)`; `x` is `[tokens, num_heads, head_dim]`, every position is below the
    // table's `max_positions` rows of `half_dim` (checked above).
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}
