//! The paged KV cache inside the unified pool (S-LoRA unified paging, vLLM PagedAttention block
//! layout): writing new keys/values into slots, and moving whole KV pages in and out for
//! disaggregated prefill → decode transfer.
//!
//! Layout of one KV page (one block of `block_size` tokens of one layer), starting at element
//! `page * page_elems` of the pool:
//!
//! ```text
//! keys   [block_size, num_kv_heads, head_dim]   at page start
//! values [block_size, num_kv_heads, head_dim]   at page start + block_size * kv_dim
//! unused up to page_elems (pages are sized for adapter rows too)
//! ```

use super::check;
use crate::KernelError;

/// Geometry of KV pages in the pool. Plain data; every kernel validates it on entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Elements per pool page (the pool's one page size).
    pub page_elems: usize,
    /// Tokens per KV page.
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// A validated [`KvLayout`] for one pool, with the derived sizes the kernels need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvGeometry {
    pub page_elems: usize,
    pub block_size: usize,
    pub head_dim: usize,
    /// `num_kv_heads * head_dim`: one token's keys (or values).
    pub kv_dim: usize,
    /// `block_size * kv_dim`: offset of the values inside a page.
    pub values_offset: usize,
    /// `2 * block_size * kv_dim`: KV elements of one page.
    pub page_kv_elems: usize,
    pub num_pages: usize,
}

impl KvLayout {
    /// `num_kv_heads * head_dim`, saturating (use [`KvLayout::validate`] to reject overflow).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }

    /// Elements of one page that hold KV data: `2 * block_size * kv_dim`, saturating. This is
    /// the unit [`gather_kv_pages`] and [`scatter_kv_pages`] move per page.
    pub fn page_kv_elems(&self) -> usize {
        self.kv_dim()
            .saturating_mul(self.block_size)
            .saturating_mul(2)
    }

    /// Checks the layout on its own: all sizes non-zero, no overflow, and a page large enough
    /// for one block of keys and values.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] or [`KernelError::SizeOverflow`].
    pub fn validate(&self) -> Result<(), KernelError> {
        self.geometry("kv_layout", 0).map(|_| ())
    }

    /// Number of pages in a pool of `pool_len` elements under this layout.
    ///
    /// # Errors
    /// As [`KvLayout::validate`], and [`KernelError::RaggedRows`] if `pool_len` is not a whole
    /// number of pages.
    pub fn num_pages(&self, pool_len: usize) -> Result<usize, KernelError> {
        self.geometry("kv_layout", pool_len).map(|g| g.num_pages)
    }

    pub(crate) fn geometry(
        &self,
        kernel: &'static str,
        pool_len: usize,
    ) -> Result<KvGeometry, KernelError> {
        check::nonzero(kernel, "page_elems", self.page_elems)?;
        check::nonzero(kernel, "block_size", self.block_size)?;
        check::nonzero(kernel, "num_kv_heads", self.num_kv_heads)?;
        check::nonzero(kernel, "head_dim", self.head_dim)?;
        let kv_dim = check::mul(kernel, "kv_dim", self.num_kv_heads, self.head_dim)?;
        let values_offset = check::mul(kernel, "block_size * kv_dim", self.block_size, kv_dim)?;
        let page_kv_elems = check::mul(kernel, "2 * block_size * kv_dim", values_offset, 2)?;
        if page_kv_elems > self.page_elems {
            return Err(KernelError::invalid(
                kernel,
                "page_elems",
                format!(
                    "{} elements cannot hold one KV block of {page_kv_elems}",
                    self.page_elems
                ),
            ));
        }
        let num_pages = check::rows(kernel, "pool", pool_len, self.page_elems)?;
        Ok(KvGeometry {
            page_elems: self.page_elems,
            block_size: self.block_size,
            head_dim: self.head_dim,
            kv_dim,
            values_offset,
            page_kv_elems,
            num_pages,
        })
    }
}

impl KvGeometry {
    /// Pool offset of the key row of `slot_in_page` in `page` (values are `values_offset` on).
    #[inline]
    pub(crate) fn slot_offset(&self, page: usize, slot_in_page: usize) -> usize {
        page * self.page_elems + slot_in_page * self.kv_dim
    }

    fn check_page(&self, kernel: &'static str, page: u32) -> Result<usize, KernelError> {
        let page = page as usize;
        if page < self.num_pages {
            Ok(page)
        } else {
            Err(KernelError::PageOutOfRange {
                kernel,
                page,
                num_pages: self.num_pages,
            })
        }
    }
}

/// Writes the keys and values of `T` new tokens into their cache slots.
///
/// `k` and `v` are `[T, kv_dim]`; `slots[t] = page_id * block_size + slot_in_page` is where
/// token `t` goes. If two tokens name the same slot, the later one wins.
///
/// # Errors
/// Invalid layout, `k`/`v` not `[slots.len(), kv_dim]`, or a slot beyond the pool
/// ([`KernelError::SlotOutOfRange`]). Nothing is written on error.
pub fn write_kv(
    layout: &KvLayout,
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    pool: &mut [f32],
) -> Result<(), KernelError> {
    const KERNEL: &str = "write_kv";
    let g = layout.geometry(KERNEL, pool.len())?;
    let expected = check::mul(KERNEL, "k", slots.len(), g.kv_dim)?;
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
    // A memcpy per token: memory bound, and token rows may share pages, so stay serial.
    for ((&slot, k), v) in slots
        .iter()
        .zip(k.chunks_exact(g.kv_dim))
        .zip(v.chunks_exact(g.kv_dim))
    {
        let at = g.slot_offset(slot / g.block_size, slot % g.block_size);
        pool[at..at + g.kv_dim].copy_from_slice(k);
        let at = at + g.values_offset;
        pool[at..at + g.kv_dim].copy_from_slice(v);
    }
    Ok(())
}

/// Copies the KV part (`layout.page_kv_elems()` elements) of each page in `pages`, in order,
/// into `out`, which is cleared first: `out.len() == pages.len() * page_kv_elems` afterwards.
///
/// # Errors
/// Invalid layout or a page id beyond the pool; `out` is untouched on error.
pub fn gather_kv_pages(
    layout: &KvLayout,
    pool: &[f32],
    pages: &[u32],
    out: &mut Vec<f32>,
) -> Result<(), KernelError> {
    const KERNEL: &str = "gather_kv_pages";
    let g = layout.geometry(KERNEL, pool.len())?;
    let total = check::mul(KERNEL, "out", pages.len(), g.page_kv_elems)?;
    for &page in pages {
        g.check_page(KERNEL, page)?;
    }
    out.clear();
    out.reserve(total);
    for &page in pages {
        let at = page as usize * g.page_elems;
        out.extend_from_slice(&pool[at..at + g.page_kv_elems]);
    }
    Ok(())
}

/// The inverse of [`gather_kv_pages`]: `data` is `[pages.len(), page_kv_elems]` and chunk `i`
/// is written into the KV part of page `pages[i]`. The rest of each page is left untouched.
///
/// # Errors
/// Invalid layout, `data` of the wrong length, or a page id beyond the pool. Nothing is
/// written on error.
pub fn scatter_kv_pages(
    layout: &KvLayout,
    data: &[f32],
    pages: &[u32],
    pool: &mut [f32],
) -> Result<(), KernelError> {
    const KERNEL: &str = "scatter_kv_pages";
    let g = layout.geometry(KERNEL, pool.len())?;
    let total = check::mul(KERNEL, "data", pages.len(), g.page_kv_elems)?;
    check::len(KERNEL, "data", total, data.len())?;
    for &page in pages {
        g.check_page(KERNEL, page)?;
    }
    for (&page, chunk) in pages.iter().zip(data.chunks_exact(g.page_kv_elems)) {
        let at = page as usize * g.page_elems;
        pool[at..at + g.page_kv_elems].copy_from_slice(chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            page_elems: 40,
            block_size: 3,
            num_kv_heads: 2,
            head_dim: 3,
        }
    }

    #[test]
    fn layout_validation() {
        assert_eq!(layout().kv_dim(), 6);
        assert_eq!(layout().page_kv_elems(), 36);
        assert_eq!(layout().num_pages(120), Ok(3));
        assert_eq!(
            layout().num_pages(121).map_err(|e| e.kind()),
            Err("ragged_rows")
        );
        let small = KvLayout {
            page_elems: 35,
            ..layout()
        };
        assert_eq!(
            small.validate().map_err(|e| e.kind()),
            Err("invalid_argument")
        );
        let zero = KvLayout {
            head_dim: 0,
            ..layout()
        };
        assert_eq!(
            zero.validate().map_err(|e| e.kind()),
            Err("invalid_argument")
        );
        let huge = KvLayout {
            num_kv_heads: usize::MAX,
            head_dim: 2,
            ..layout()
        };
        assert_eq!(huge.validate().map_err(|e| e.kind()), Err("size_overflow"));
    }

    #[test]
    fn write_then_gather_finds_keys_and_values_at_their_offsets() {
        let l = layout();
        let mut pool = vec![0.0; 120];
        let k: Vec<f32> = (0..6).map(|i| i as f32 + 1.0).collect();
        let v: Vec<f32> = (0..6).map(|i| -(i as f32) - 1.0).collect();
        // page 2, slot 1
        write_kv(&l, &k, &v, &[7], &mut pool).unwrap();
        assert_eq!(&pool[80 + 6..80 + 12], &k[..]);
        assert_eq!(&pool[80 + 18 + 6..80 + 18 + 12], &v[..]);
        let mut out = vec![9.0];
        gather_kv_pages(&l, &pool, &[2], &mut out).unwrap();
        assert_eq!(out.len(), 36);
        assert_eq!(&out[6..12], &k[..]);
    }
}
