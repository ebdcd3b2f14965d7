//! A sequence's KV cache as pages of the unified pool: one page per (block of `block_size`
//! tokens, layer), so a layer's pages can be streamed as soon as that layer is computed.
//!
//! Its first blocks may be shared through the prefix cache (`memory/prefix.rs`): reused from an
//! earlier request, or computed by this one and published. Shared blocks always form a prefix
//! (blocks are published in order, as soon as they are full); the rest are private pages.

use std::sync::Arc;

use crate::memory::pool::{PageAllocator, PageKind, Pages};
use crate::memory::prefix::CachedBlock;

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

/// The KV pages of one sequence: shared blocks of the prefix cache, then private pages, where
/// private page `block * num_layers + layer` holds the private `block`'s tokens of `layer`.
/// Dropping it returns every private page to the pool; shared blocks go back to the cache with
/// [`SeqKv::into_shared`].
#[derive(Debug)]
pub struct SeqKv {
    shared: Vec<Arc<CachedBlock>>,
    pages: Pages,
    geometry: KvGeometry,
}

impl SeqKv {
    /// An empty cache (no pages yet).
    pub fn new(pool: &PageAllocator, geometry: KvGeometry) -> Self {
        Self::with_shared(pool, geometry, Vec::new())
    }

    /// A cache whose first blocks are `shared` (a prefix-cache hit), with no private pages yet.
    pub fn with_shared(
        pool: &PageAllocator,
        geometry: KvGeometry,
        shared: Vec<Arc<CachedBlock>>,
    ) -> Self {
        SeqKv {
            shared,
            pages: pool.empty(PageKind::Kv),
            geometry,
        }
    }

    pub fn blocks(&self) -> usize {
        self.shared.len() + self.pages.len() / self.geometry.num_layers
    }

    /// Tokens the allocated blocks can hold.
    pub fn capacity(&self) -> usize {
        self.blocks() * self.geometry.block_size
    }

    /// Private pages (freed when the sequence lets go of its KV).
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Pages of the shared blocks it reads.
    pub fn shared_pages(&self) -> usize {
        self.shared.len() * self.geometry.num_layers
    }

    /// Shared blocks, in order from the first.
    pub fn shared(&self) -> &[Arc<CachedBlock>] {
        &self.shared
    }

    /// Pages that growing to `tokens` would take.
    pub fn pages_to_hold(&self, tokens: usize) -> usize {
        self.geometry
            .pages_for(tokens)
            .saturating_sub(self.pages.len() + self.shared_pages())
    }

    /// Grows the cache to hold `tokens` tokens, all or nothing.
    ///
    /// Errors: `false` when the pool lacks the pages; the cache is unchanged then.
    pub fn reserve(&mut self, tokens: usize) -> bool {
        let need = self.pages_to_hold(tokens);
        need == 0 || self.pages.grow(need)
    }

    /// Moves the first private block's pages out, to be published into the prefix cache; the
    /// caller hands the cached block back with [`SeqKv::push_shared`]. `None` without one.
    pub fn take_first_private(&mut self) -> Option<Pages> {
        let l = self.geometry.num_layers;
        (self.pages.len() >= l).then(|| self.pages.take_front(l))
    }

    /// Appends a shared block: the one [`SeqKv::take_first_private`] took out, as cached.
    pub fn push_shared(&mut self, block: Arc<CachedBlock>) {
        self.shared.push(block);
    }

    /// Frees the private pages and returns the holds on shared blocks (for the prefix cache
    /// to release).
    pub fn into_shared(self) -> Vec<Arc<CachedBlock>> {
        self.shared
    }

    /// Page ids of `layer`, block by block.
    pub fn block_table(&self, layer: usize) -> Vec<u32> {
        let l = self.geometry.num_layers;
        let mut table = Vec::with_capacity(self.blocks());
        table.extend(self.shared.iter().filter_map(|b| b.page(layer)));
        table.extend(self.pages.ids().iter().skip(layer).step_by(l).copied());
        table
    }

    /// The kernel slot (`page * block_size + offset`) of position `pos` in `layer`.
    ///
    /// Guarantees: `pos < capacity()` (callers reserve first); a position beyond it is a bug in
    /// the scheduler and yields `None`.
    pub fn slot(&self, layer: usize, pos: usize) -> Option<usize> {
        let bs = self.geometry.block_size;
        let block = pos / bs;
        let page = match self.shared.get(block) {
            Some(b) => b.page(layer)?,
            None => *self
                .pages
                .ids()
                .get((block - self.shared.len()) * self.geometry.num_layers + layer)?,
        };
        Some(page as usize * bs + pos % bs)
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

    #[test]
    fn shared_blocks_come_first_and_stay_in_the_cache() {
        use crate::memory::prefix::{BlockHash, PrefixCache};
        let pool = PageAllocator::new(12);
        let g = geometry();
        let mut cache = PrefixCache::new(g.num_layers);
        let mut kv = SeqKv::new(&pool, g);
        assert!(kv.reserve(9));
        let own = kv.block_table(2);
        // Publish the first block: its pages now belong to the cache.
        let pages = kv.take_first_private().unwrap();
        let key = BlockHash::root(&[b"t"]).next(&[1, 2, 3, 4]);
        kv.push_shared(cache.insert(key, pages, 0));
        assert_eq!((kv.blocks(), kv.pages(), kv.shared_pages()), (3, 6, 3));
        assert_eq!(kv.block_table(2), own, "the same pages, now shared");
        assert_eq!(kv.slot(2, 5), Some(own[1] as usize * 4 + 1));
        // Another sequence reuses it and grows beyond.
        let mut other = SeqKv::with_shared(&pool, g, vec![cache.acquire(&key).unwrap()]);
        assert_eq!((other.capacity(), other.pages_to_hold(6)), (4, 3));
        assert!(other.reserve(6));
        assert_eq!(other.block_table(2)[0], own[0]);
        assert_eq!(pool.free_pages(), 0);
        cache.release(kv.into_shared(), 1);
        assert_eq!((pool.free_pages(), cache.idle_blocks()), (6, 0));
        cache.release(other.into_shared(), 2);
        assert_eq!((pool.free_pages(), cache.idle_blocks()), (9, 1));
        assert_eq!(cache.clear_idle(), 1);
        assert_eq!(pool.free_pages(), 12);
    }
}
