//! Launches of `kv.cu`: writing new tokens' keys and values into their pool slots, and moving
//! whole KV pages out of and into the pool (disaggregated prefill → decode transfer).

use std::collections::HashSet;

use cudarc::driver::PushKernelArg;

use super::launch_err;
use crate::KernelError;
use crate::cpu::KvLayout;
use crate::cpu::check;
use crate::cuda::KV;
use crate::cuda::device::{CudaDevice, DeviceBuffer};
use crate::cuda::plan::{kv_pages_plan, write_kv_plan};

/// Indices `i` of `keys` whose key does not occur again later: the entries that win under the
/// reference's "later one wins" order, so that no two GPU threads write one location.
fn last_occurrences<K: std::hash::Hash + Eq + Copy>(keys: &[K]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(keys.len());
    let mut kept: Vec<usize> = (0..keys.len())
        .rev()
        .filter(|&i| seen.insert(keys[i]))
        .collect();
    kept.reverse();
    kept
}

/// Writes the keys and values of `T` new tokens into their slots (reference:
/// [`crate::cpu::write_kv`]): `k`, `v` are `[T, kv_dim]`, `slots[t] = page · block_size +
/// slot_in_page`.
///
/// # Errors
/// As the reference (invalid layout, shapes, a slot beyond the pool); a launch or upload
/// failure. Nothing is written on a validation error.
pub fn write_kv(
    dev: &CudaDevice,
    layout: &KvLayout,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    slots: &[usize],
    pool: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "write_kv";
    let g = layout.geometry(KERNEL, pool.len())?;
    let expected = slots
        .len()
        .checked_mul(g.kv_dim)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "k",
        })?;
    check::len(KERNEL, "k", expected, k.len())?;
    check::len(KERNEL, "v", expected, v.len())?;
    let num_slots = g.num_pages * g.block_size;
    if let Some(&slot) = slots.iter().find(|&&s| s >= num_slots) {
        return Err(KernelError::SlotOutOfRange {
            kernel: KERNEL,
            slot,
            num_slots,
        });
    }
    let entries: Vec<u64> = last_occurrences(slots)
        .into_iter()
        .flat_map(|t| [t as u64, slots[t] as u64])
        .collect();
    let (plan, params) = write_kv_plan(entries.len() / 2, g.kv_dim, g.block_size, g.page_elems)?;
    if plan.is_empty() {
        return Ok(());
    }
    let entries = dev.upload(&entries)?;
    let f = dev.function(&KV, "write_kv_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&k.slice)
        .arg(&v.slice)
        .arg(&entries.slice)
        .arg(&mut pool.slice)
        .arg(&params);
    // SAFETY: matches `write_kv_f32(const float*, const float*, const unsigned long long*,
    // float*, WriteKvParams)`; every token index is below T, every slot below
    // `num_pages · block_size` (checked above), so each write lands in a page of the pool;
    // slots are distinct, so no two threads write one element.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

fn check_pages(kernel: &'static str, pages: &[u32], num_pages: usize) -> Result<(), KernelError> {
    match pages.iter().find(|&&p| p as usize >= num_pages) {
        Some(&page) => Err(KernelError::PageOutOfRange {
            kernel,
            page: page as usize,
            num_pages,
        }),
        None => Ok(()),
    }
}

/// Copies the KV part of each page in `pages`, in order, into `out` (`[pages.len(),
/// page_kv_elems]`); reference: [`crate::cpu::gather_kv_pages`].
///
/// # Errors
/// Invalid layout, a page beyond the pool, `out` of the wrong length; a launch or upload
/// failure.
pub fn gather_kv_pages(
    dev: &CudaDevice,
    layout: &KvLayout,
    pool: &DeviceBuffer<f32>,
    pages: &[u32],
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "gather_kv_pages";
    let g = layout.geometry(KERNEL, pool.len())?;
    let total = pages
        .len()
        .checked_mul(g.page_kv_elems)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "out",
        })?;
    check::len(KERNEL, "out", total, out.len())?;
    check_pages(KERNEL, pages, g.num_pages)?;
    let (plan, params) = kv_pages_plan(pages.len(), g.page_kv_elems, g.page_elems)?;
    if plan.is_empty() {
        return Ok(());
    }
    let pages = dev.upload(pages)?;
    let f = dev.function(&KV, "gather_kv_pages_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&pool.slice)
        .arg(&pages.slice)
        .arg(&mut out.slice)
        .arg(&params);
    // SAFETY: matches `gather_kv_pages_f32(const float*, const unsigned int*, float*,
    // KvPagesParams)`; every page is in the pool (checked above) and `out` holds
    // `pages · page_kv_elems` floats.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

/// Writes chunk `i` of `data` (`[pages.len(), page_kv_elems]`) into the KV part of page
/// `pages[i]`, the rest of each page untouched; reference: [`crate::cpu::scatter_kv_pages`].
///
/// # Errors
/// Invalid layout, `data` of the wrong length, a page beyond the pool; a launch or upload
/// failure. Nothing is written on a validation error.
pub fn scatter_kv_pages(
    dev: &CudaDevice,
    layout: &KvLayout,
    data: &DeviceBuffer<f32>,
    pages: &[u32],
    pool: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "scatter_kv_pages";
    let g = layout.geometry(KERNEL, pool.len())?;
    let total = pages
        .len()
        .checked_mul(g.page_kv_elems)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "data",
        })?;
    check::len(KERNEL, "data", total, data.len())?;
    check_pages(KERNEL, pages, g.num_pages)?;
    let entries: Vec<u32> = last_occurrences(pages)
        .into_iter()
        .flat_map(|i| [i as u32, pages[i]])
        .collect();
    let (plan, params) = kv_pages_plan(entries.len() / 2, g.page_kv_elems, g.page_elems)?;
    if plan.is_empty() {
        return Ok(());
    }
    let entries = dev.upload(&entries)?;
    let f = dev.function(&KV, "scatter_kv_pages_f32")?;
    let mut launch = dev.launcher(&f);
    launch
        .arg(&data.slice)
        .arg(&entries.slice)
        .arg(&mut pool.slice)
        .arg(&params);
    // SAFETY: matches `scatter_kv_pages_f32(const float*, const unsigned int*, float*,
    // KvPagesParams)`; every chunk index is below `pages.len()` (so inside `data`), every page
    // in the pool, and pages are distinct, so no two blocks write one element.
    unsafe { launch.launch(plan.into()) }.map_err(launch_err(KERNEL))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::last_occurrences;

    #[test]
    fn later_entries_win() {
        assert_eq!(last_occurrences(&[5u32, 7, 5, 9, 7]), vec![2, 3, 4]);
        assert_eq!(last_occurrences::<u32>(&[]), Vec::<usize>::new());
        assert_eq!(last_occurrences(&[1usize, 2, 3]), vec![0, 1, 2]);
    }
}
