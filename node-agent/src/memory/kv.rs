//! A sequence's KV cache as pages of the unified pool: one page per (block of `block_size`
//! tokens, layer), so a layer's pages can be streamed as soon as that layer is computed.

use crate::memory::pool::{PageAllocator, PageKind, Pages};

/// Shape of the KV cache, shared by every sequence of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_layers: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Elements per pool page (at least `2 * block_size * kv_dim`).
    pub page_elems: usize,
}

impl KvGeometry {
    /// Pages needed to hold `tokens` tokens of every layer.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size) * self.num_layers
    }

    /// Elements of one page that KV uses: keys then values of `block_size` tokens.
    pub fn kv_elems_per_page(&self) -> usize {
        2 * self.block_size * self.num_kv_heads * self.head_dim
    }

    pub fn kernel_layout(&self) -> loraplane_kernels::cpu::KvLayout {
        loraplane_kernels::cpu::KvLayout {
            page_elems: self.page_elems,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The KV pages of one sequence. Page `block * num_layers + layer` holds `block`'s tokens of
/// `layer`. Dropping it returns every page to the pool.
#[derive(Debug)]
pub struct SeqKv {
    pages: Pages,
    geometry: KvGeometry,
}

impl SeqKv {
    /// An empty cache (no pages yet).
    pub fn new(pool: &PageAllocator, geometry: KvGeometry) -> Self {
        SeqKv {
            pages: pool.empty(PageKind::Kv),
            geometry,
        }
    }

    pub fn blocks(&self) -> usize {
        self.pages.len() / self.geometry.num_layers
    }

    /// Tokens the allocated blocks can hold.
    pub fn capacity(&self) -> usize {
        self.blocks() * self.geometry.block_size
    }

    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Pages that growing to `tokens` would take.
    pub fn pages_to_hold(&self, tokens: usize) -> usize {
        self.geometry
            .pages_for(tokens)
            .saturating_sub(self.pages.len())
    }

    /// Grows the cache to hold `tokens` tokens, all or nothing.
    ///
    /// Errors: `false` when the pool lacks the pages; the cache is unchanged then.
    pub fn reserve(&mut self, tokens: usize) -> bool {
        let need = self.pages_to_hold(tokens);
        need == 0 || self.pages.grow(need)
    }

    /// Page ids of `layer`, block by block.
    pub fn block_table(&self, layer: usize) -> Vec<u32> {
        let l = self.geometry.num_layers;
        self.pages
            .ids()
            .iter()
            .skip(layer)
            .step_by(l)
            .copied()
            .collect()
    }

    /// The kernel slot (`page * block_size + offset`) of position `pos` in `layer`.
    ///
    /// Guarantees: `pos < capacity()` (callers reserve first); a position beyond it is a bug in
    /// the scheduler and yields `None`.
    pub fn slot(&self, layer: usize, pos: usize) -> Option<usize> {
        let bs = self.geometry.block_size;
        let page = self
            .pages
            .ids()
            .get((pos / bs) * self.geometry.num_layers + layer)?;
        Some(*page as usize * bs + pos % bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> KvGeometry {
        KvGeometry {
            num_layers: 3,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
            page_elems: 128,
        }
    }

    #[test]
    fn grows_by_blocks_of_all_layers() {
        let pool = PageAllocator::new(12);
        let mut kv = SeqKv::new(&pool, geometry());
        assert_eq!(kv.capacity(), 0);
        assert!(kv.reserve(5));
        assert_eq!((kv.blocks(), kv.pages(), pool.free_pages()), (2, 6, 6));
        assert!(kv.reserve(8), "already held");
        assert_eq!(pool.free_pages(), 6);
        assert!(!kv.reserve(17), "needs 15 pages, only 12 exist");
        assert_eq!(kv.pages(), 6);
        let t1 = kv.block_table(1);
        assert_eq!(t1.len(), 2);
        assert_eq!(kv.slot(1, 5), Some(t1[1] as usize * 4 + 1));
        assert_eq!(kv.slot(0, 8), None);
        drop(kv);
        assert_eq!(pool.free_pages(), 12);
    }
}
