//! The unified pool's memory on the CPU backend.

/// Bytes of an x86-64 / AArch64 transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed buffer of `len` floats for the unified pool (KV blocks and adapter rows), backed by
/// transparent huge pages where the operating system allows it.
///
/// Why: a decode step streams every request's adapter rows from the pool, each from a different
/// place. With 4 KiB pages each 4 KiB of those streams needs its own TLB entry, and a step of 64
/// rank-8–64 adapters on the `small` model walks about 300,000 of them; 2 MiB pages cut that
/// 512-fold. On Linux the buffer is advised `MADV_HUGEPAGE` before anything touches it, which
/// the kernel honours when transparent huge pages are `always` or `madvise` (the usual
/// default). Elsewhere, or where the advice is refused, the pool is ordinary memory: the advice
/// changes where the bytes live, never what they hold.
pub fn zeroed_pool(len: usize) -> Vec<f32> {
    // `vec!` of zeros takes fresh zero pages from the allocator (calloc → mmap for a buffer of
    // this size), so no page has been faulted in when the advice is given.
    let pool = vec![0.0f32; len];
    advise_huge_pages(&pool);
    pool
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(buf: &[f32]) {
    let (start, end) = (
        buf.as_ptr() as usize,
        buf.as_ptr() as usize + size_of_val(buf),
    );
    let (first, last) = (
        start.next_multiple_of(HUGE_PAGE),
        end / HUGE_PAGE * HUGE_PAGE,
    );
    if last > first {
        // SAFETY: `first..last` lies inside `buf`'s allocation, which outlives the call;
        // MADV_HUGEPAGE is advice about how to back those pages and never changes their
        // contents, so the Vec's invariants hold whatever the call returns.
        let _ = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_HUGEPAGE,
            )
        };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_buf: &[f32]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_zeroed_and_writable_whatever_backs_it() {
        // Three huge pages and a bit: at least one whole advised range, with ragged ends.
        let len = (3 * HUGE_PAGE + 12_345) / size_of::<f32>();
        let mut pool = zeroed_pool(len);
        assert_eq!(pool.len(), len);
        assert!(pool.iter().all(|&v| v == 0.0));
        for (i, v) in pool.iter_mut().enumerate().step_by(1021) {
            *v = i as f32;
        }
        assert!(
            pool.iter()
                .enumerate()
                .all(|(i, &v)| v == if i % 1021 == 0 { i as f32 } else { 0.0 })
        );
        assert!(zeroed_pool(0).is_empty());
    }
}
