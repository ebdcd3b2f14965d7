//! Launch of `attention.cu`: causal paged attention for prefill chunks and decode rows, with
//! the flash-decoding merge when the plan splits long key ranges.

use cudarc::driver::PushKernelArg;

use super::launch_err;
use crate::KernelError;
use crate::cpu::check;
use crate::cpu::{AttnSeq, KvLayout};
use crate::cuda::ATTENTION;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::plan::attention_plan;

/// Blocks per multiprocessor below which long key ranges are split.
const BLOCKS_PER_SM: usize = 4;

/// Causal grouped-query attention of `q` (`[T, num_heads · head_dim]`) against the paged KV
/// cache in `pool`, into `out` (same shape); reference: [`crate::cpu::paged_attention`].
///
/// # Guarantees
/// Rows of `out` not covered by any sequence are left untouched; only the blocks a sequence's
/// rows can see are looked up.
///
/// # Errors
/// Exactly the reference's for the same arguments (see
/// [`attention_plan`](crate::cuda::plan::attention_plan)), plus `head_dim > 256`; a launch or
/// upload failure. `out` is untouched on a validation error.
pub fn paged_attention(
    dev: &CudaDevice,
    layout: &KvLayout,
    q: &DeviceBuffer<f32>,
    num_heads: usize,
    pool: &DeviceBuffer<f32>,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    sliding_window: Option<usize>,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "paged_attention";
    let plan = attention_plan(
        layout,
        q.len(),
        num_heads,
        pool.len(),
        seqs,
        scale,
        sliding_window,
        BLOCKS_PER_SM * dev.multiprocessors(),
    )?;
    check::len(KERNEL, "out", q.len(), out.len())?;
    if plan.main.is_empty() {
        return Ok(());
    }
    let seq_table = dev.upload(&plan.seqs)?;
    let block_tables = dev.upload(&plan.block_tables)?;
    let work = dev.upload(&plan.work)?;
    let hd = layout.head_dim;
    let mut partial_acc = dev.zeros::<f32>(plan.partial_slots * hd)?;
    let mut partial_ml = dev.zeros::<f32>(plan.partial_slots * 2)?;

    let f = dev.function(&ATTENTION, "paged_attention_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&q.slice)
        .arg(&pool.slice)
        .arg(&block_tables.slice)
        .arg(&seq_table.slice)
        .arg(&work.slice)
        .arg(&mut out.slice)
        .arg(&mut partial_acc.slice)
        .arg(&mut partial_ml.slice)
        .arg(&plan.params);
    // SAFETY: matches `paged_attention_f32(const float* q, const float* pool, const unsigned
    // int* block_tables, const AttnSeqParams*, const AttnWorkItem*, float* out, float*
    // partial_acc, float* partial_ml, AttnParams)`. The plan validated every sequence as the
    // reference does: rows inside `q`/`out`, block tables covering every key a work item reads
    // with pages inside the pool; work items index `seqs`, and partial slots stay below
    // `partial_slots`, which the two scratch buffers hold. The block has `tile_keys · head_dim`
    // floats of K and of V in shared memory, as the plan sized it.
    unsafe { launch.launch(plan.main.into()) }.map_err(launch_err(KERNEL))?;

    if !plan.reduce_launch.is_empty() {
        let reduce = dev.upload(&plan.reduce)?;
        let f = dev.function(&ATTENTION, "attention_reduce_f32")?;
        let mut launch = dev.launcher(&f);
        launch
            .arg(&partial_acc.slice)
            .arg(&partial_ml.slice)
            .arg(&reduce.slice)
            .arg(&mut out.slice)
            .arg(&plan.params);
        // SAFETY: matches `attention_reduce_f32(const float*, const float*, const
        // AttnReduceItem*, float*, AttnParams)`; `params.num_reduce` items, each naming slots
        // below `partial_slots` and a (row, head) inside `out`, ordered after the main kernel
        // on the same stream.
        unsafe { launch.launch(plan.reduce_launch.into()) }.map_err(launch_err(KERNEL))?;
    }
    Ok(())
}
