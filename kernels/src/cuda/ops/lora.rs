//! Launches of `lora.cu`: the heterogeneous LoRA shrink and expand of one projection, reading
//! A and Bᵀ rows from the unified pool through the batch's segment table.

use cudarc::driver::PushKernelArg;

use super::launch_err;
use crate::KernelError;
use crate::cpu::LoraSegment;
use crate::cpu::check;
use crate::cuda::LORA;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::plan::{LoraSegmentParams, lora_expand_plan, lora_shrink_plan, lora_table};

/// One projection's segments on the device, validated for a batch shape and pool size; one
/// upload serves both the shrink and the expand.
#[derive(Debug)]
pub struct DeviceLoraTable {
    row_segment: DeviceBuffer<i32>,
    segments: DeviceBuffer<LoraSegmentParams>,
    a_offsets: DeviceBuffer<u64>,
    b_offsets: DeviceBuffer<u64>,
    rows: usize,
    max_rank: usize,
    in_dim: usize,
    out_dim: usize,
    pool_len: usize,
}

impl DeviceLoraTable {
    /// Validates `segs` for a batch of `rows` rows (every A row `in_dim` and Bᵀ row `out_dim`
    /// inside a pool of `pool_len` elements, ranks `<= max_rank`, rows disjoint) and uploads
    /// them.
    ///
    /// # Errors
    /// As [`crate::cpu::lora_shrink`] / [`crate::cpu::lora_expand`]; an upload failure.
    pub fn upload(
        dev: &CudaDevice,
        segs: &[LoraSegment<'_>],
        rows: usize,
        max_rank: usize,
        pool_len: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self, KernelError> {
        let table = lora_table(segs, rows, max_rank, pool_len, in_dim, out_dim)?;
        Ok(Self {
            row_segment: dev.upload(&table.row_segment)?,
            segments: dev.upload(&table.segments)?,
            a_offsets: dev.upload(&table.a_offsets)?,
            b_offsets: dev.upload(&table.b_offsets)?,
            rows,
            max_rank,
            in_dim,
            out_dim,
            pool_len,
        })
    }

    fn check_pool(
        &self,
        kernel: &'static str,
        pool: &DeviceBuffer<f32>,
    ) -> Result<(), KernelError> {
        check::len(kernel, "pool", self.pool_len, pool.len())
    }
}

/// Shrink: `v[t, j] = x[t] · A_j` for `j < rank(seg)`, `0` up to `max_rank`, rows of no
/// segment untouched (reference: [`crate::cpu::lora_shrink`]). `x`: `[rows, in_dim]`, `v`:
/// `[rows, max_rank]`, with the table's shape.
///
/// # Errors
/// `x`, `v` or `pool` not of the table's shape; a launch failure.
pub fn lora_shrink(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    pool: &DeviceBuffer<f32>,
    table: &DeviceLoraTable,
    v: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora_shrink";
    check::len(KERNEL, "x", table.rows * table.in_dim, x.len())?;
    check::len(KERNEL, "v", table.rows * table.max_rank, v.len())?;
    table.check_pool(KERNEL, pool)?;
    let (plan, params) = lora_shrink_plan(table.rows, table.in_dim, table.max_rank)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&LORA, "lora_shrink_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&x.slice)
        .arg(&pool.slice)
        .arg(&table.row_segment.slice)
        .arg(&table.segments.slice)
        .arg(&table.a_offsets.slice)
        .arg(&mut v.slice)
        .arg(&params);
    // SAFETY: matches `lora_shrink_f32(const float*, const float*, const int*, const
    // LoraSegmentParams*, const unsigned long long*, float*, LoraShrinkParams)`. The table was
    // validated for this shape and pool: each row's segment index is -1 or a segment, each
    // segment's A offsets are in the offsets list and `offset + in_dim <= pool_len`; `x` and
    // `v` have the table's rows (checked above). Shared memory holds `in_dim` floats when the
    // plan stages `x`.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// Expand: `y[t] += scale · Σ_{j < rank} v[t, j] · Bᵀ_j` (reference:
/// [`crate::cpu::lora_expand`]). `v`: `[rows, max_rank]`, `y`: `[rows, out_dim]`.
///
/// # Errors
/// `v`, `y` or `pool` not of the table's shape; a launch failure.
pub fn lora_expand(
    dev: &CudaDevice,
    v: &DeviceBuffer<f32>,
    pool: &DeviceBuffer<f32>,
    table: &DeviceLoraTable,
    y: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora_expand";
    check::len(KERNEL, "v", table.rows * table.max_rank, v.len())?;
    check::len(KERNEL, "y", table.rows * table.out_dim, y.len())?;
    table.check_pool(KERNEL, pool)?;
    let (plan, params) = lora_expand_plan(table.rows, table.out_dim, table.max_rank)?;
    if plan.is_empty() {
        return Ok(());
    }
    let f = dev.function(&LORA, "lora_expand_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&v.slice)
        .arg(&pool.slice)
        .arg(&table.row_segment.slice)
        .arg(&table.segments.slice)
        .arg(&table.b_offsets.slice)
        .arg(&mut y.slice)
        .arg(&params);
    // SAFETY: matches `lora_expand_f32(const float*, const float*, const int*, const
    // LoraSegmentParams*, const unsigned long long*, float*, LoraExpandParams)`; as for the
    // shrink, with Bᵀ rows of `out_dim` inside the pool, and shared memory for `max_rank >=
    // rank` floats of `v`.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// The LoRA path of one projection: `y[rows of seg] += seg.scale · (x·A)·Bᵀ` for every
/// segment (shrink into a scratch `v`, then expand). `x`: `[T, in_dim]`, `y`: `[T, out_dim]`.
///
/// # Errors
/// As [`DeviceLoraTable::upload`], [`lora_shrink`] and [`lora_expand`]. `y` is untouched on a
/// validation error.
pub fn lora(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    in_dim: usize,
    y: &mut DeviceBuffer<f32>,
    out_dim: usize,
    pool: &DeviceBuffer<f32>,
    segs: &[LoraSegment<'_>],
    max_rank: usize,
) -> Result<(), KernelError> {
    const KERNEL: &str = "lora";
    if in_dim == 0 || out_dim == 0 {
        return Err(KernelError::invalid(
            KERNEL,
            "dims",
            "in_dim and out_dim must be at least 1",
        ));
    }
    if !x.len().is_multiple_of(in_dim) {
        return Err(KernelError::RaggedRows {
            kernel: KERNEL,
            what: "x",
            len: x.len(),
            width: in_dim,
        });
    }
    let rows = x.len() / in_dim;
    check::len(KERNEL, "y", rows * out_dim, y.len())?;
    if segs.is_empty() || max_rank == 0 {
        return Ok(());
    }
    let table = DeviceLoraTable::upload(dev, segs, rows, max_rank, pool.len(), in_dim, out_dim)?;
    let mut v = dev.zeros::<f32>(rows * max_rank)?;
    lora_shrink(dev, x, pool, &table, &mut v)?;
    lora_expand(dev, &v, pool, &table, y)
}
