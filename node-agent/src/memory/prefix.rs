//! The prefix cache's blocks: full KV blocks (one page per layer) that sequences computed, kept
//! in the unified pool under a hash of everything their contents depend on, so a later request
//! with the same prefix reuses them instead of recomputing (vLLM's automatic prefix caching,
//! after SGLang's radix cache; here inside S-LoRA's one pool).
//!
//! Keys are a hash chain ([`BlockHash`], SHA-256): the root hashes the partition (tenant, an
//! optional per-request salt) and the adapter's identity (its content digest, or the base
//! model); each block's key hashes the previous key and the block's tokens. A key therefore
//! names the whole prefix up to its block, and blocks of another tenant, salt or adapter
//! digest can never match (the engine builds the root, `engine/prefix.rs`).
//!
//! Invariants:
//! - a block is held by the sequences whose KV reads it (an `Arc` clone each) and by the cache
//!   (one more); it is *idle* when only the cache holds it, and only idle blocks are evicted;
//! - every idle block is in the LRU index exactly once, keyed by the stamp of its release
//!   (the engine's one clock, shared with adapters' last use), deeper blocks first at equal
//!   stamps (a prefix's tail goes before its head), then by key;
//! - pages only leave the cache by eviction, which drops the block's [`Pages`] guard and so
//!   returns them to the free list: clearing the cache restores the pool's free count.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::memory::pool::Pages;

/// The key of one cached block: SHA-256 over the key before it and the block's tokens (the
/// first block chains from a root over the partition and the adapter identity).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "block:{}…", hex::encode(&self.0[..6]))
    }
}

impl BlockHash {
    /// The root of a chain over `parts`, each length-prefixed so that no two different part
    /// lists hash the same bytes.
    pub fn root(parts: &[&[u8]]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(b"loraplane-prefix-v1");
        for part in parts {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        BlockHash(h.finalize().into())
    }

    /// The key of the block of `tokens` that follows the block keyed `self`.
    pub fn next(&self, tokens: &[u32]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(self.0);
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        BlockHash(h.finalize().into())
    }
}

/// One cached block: its key, its pages (layer `l`'s K/V in page `l`) and its index in the
/// prefix it ends.
#[derive(Debug)]
pub struct CachedBlock {
    hash: BlockHash,
    pages: Pages,
    depth: usize,
}

impl CachedBlock {
    pub fn hash(&self) -> BlockHash {
        self.hash
    }

    /// The page holding `layer`'s K/V of this block.
    pub fn page(&self, layer: usize) -> Option<u32> {
        self.pages.ids().get(layer).copied()
    }

    pub fn pages(&self) -> usize {
        self.pages.len()
    }
}

/// Where an idle block sits in eviction order: least recently released first, deeper first
/// at equal stamps, then by key.
type IdleKey = (u64, Reverse<usize>, BlockHash);

#[derive(Debug)]
struct Slot {
    block: Arc<CachedBlock>,
    /// The stamp of its release while idle; `None` while a sequence holds it.
    idle_since: Option<u64>,
}

/// Cached blocks by key, and the idle ones in eviction order.
#[derive(Debug, Default)]
pub struct PrefixCache {
    slots: HashMap<BlockHash, Slot>,
    idle: BTreeSet<IdleKey>,
    /// Pages of one block (the model's layers).
    pages_per_block: usize,
}

impl PrefixCache {
    pub fn new(pages_per_block: usize) -> Self {
        PrefixCache {
            slots: HashMap::new(),
            idle: BTreeSet::new(),
            pages_per_block,
        }
    }

    pub fn pages_per_block(&self) -> usize {
        self.pages_per_block
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.slots.contains_key(hash)
    }

    /// Whether `hash` is cached and no sequence holds it.
    pub fn is_idle(&self, hash: &BlockHash) -> bool {
        self.slots.get(hash).is_some_and(|s| s.idle_since.is_some())
    }

    /// Cached blocks, held or idle.
    pub fn blocks(&self) -> usize {
        self.slots.len()
    }

    pub fn idle_blocks(&self) -> usize {
        self.idle.len()
    }

    /// Idle blocks in eviction order, with the stamp of their release.
    pub fn idle_lru(&self) -> impl Iterator<Item = (u64, &BlockHash)> {
        self.idle.iter().map(|(stamp, _, hash)| (*stamp, hash))
    }

    /// Takes a hold on a cached block for a sequence that reuses it.
    pub fn acquire(&mut self, hash: &BlockHash) -> Option<Arc<CachedBlock>> {
        let slot = self.slots.get_mut(hash)?;
        if let Some(stamp) = slot.idle_since.take() {
            self.idle
                .remove(&(stamp, Reverse(slot.block.depth), slot.block.hash));
        }
        Some(slot.block.clone())
    }

    /// Caches a block a sequence just computed (`pages`, the block at index `depth` of its
    /// prefix) and returns the sequence's hold on it. When `hash` is cached already (another
    /// sequence computed the same prefix at the same time), the sequence holds that block
    /// instead and `pages` go back to the pool: their contents are the same.
    pub fn insert(&mut self, hash: BlockHash, pages: Pages, depth: usize) -> Arc<CachedBlock> {
        if let Some(block) = self.acquire(&hash) {
            return block;
        }
        let block = Arc::new(CachedBlock { hash, pages, depth });
        self.slots.insert(
            hash,
            Slot {
                block: block.clone(),
                idle_since: None,
            },
        );
        block
    }

    /// Gives back a sequence's holds; each block no other sequence holds becomes idle,
    /// released at `stamp`.
    pub fn release(&mut self, blocks: Vec<Arc<CachedBlock>>, stamp: u64) {
        for block in blocks {
            let hash = block.hash;
            drop(block);
            let Some(slot) = self.slots.get_mut(&hash) else {
                continue;
            };
            // The cache's own clone is the one left when nobody else holds it.
            if slot.idle_since.is_none() && Arc::strong_count(&slot.block) == 1 {
                slot.idle_since = Some(stamp);
                self.idle.insert((stamp, Reverse(slot.block.depth), hash));
            }
        }
    }

    /// Evicts an idle block (its pages return to the pool). `false` when it is not cached or
    /// a sequence holds it; nothing changes then.
    pub fn evict(&mut self, hash: &BlockHash) -> bool {
        let Some(stamp) = self.slots.get(hash).and_then(|s| s.idle_since) else {
            return false;
        };
        let Some(slot) = self.slots.remove(hash) else {
            return false;
        };
        self.idle.remove(&(stamp, Reverse(slot.block.depth), *hash));
        true
    }

    /// Evicts every idle block; returns how many.
    pub fn clear_idle(&mut self) -> usize {
        let victims: Vec<BlockHash> = self.idle.iter().map(|(_, _, h)| *h).collect();
        victims.iter().filter(|h| self.evict(h)).count()
    }

    /// Whether the idle index agrees with the holds (for tests and debug checks): a block is
    /// indexed as idle exactly when only the cache holds it.
    pub fn is_consistent(&self) -> bool {
        self.slots.values().all(|s| {
            let only_cache = Arc::strong_count(&s.block) == 1;
            only_cache == s.idle_since.is_some()
        }) && self.idle.len()
            == self
                .slots
                .values()
                .filter(|s| s.idle_since.is_some())
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::pool::{PageAllocator, PageKind};

    fn chain(root: &BlockHash, blocks: &[&[u32]]) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::new();
        for b in blocks {
            let prev = out.last().unwrap_or(root);
            out.push(prev.next(b));
        }
        out
    }

    #[test]
    fn keys_depend_on_the_root_the_tokens_and_everything_before() {
        let a = BlockHash::root(&[b"t1", b"", b"digest"]);
        assert_ne!(a, BlockHash::root(&[b"t2", b"", b"digest"]));
        assert_ne!(a, BlockHash::root(&[b"t1", b"salt", b"digest"]));
        // Length prefixes: moving bytes between parts changes the root.
        assert_ne!(
            BlockHash::root(&[b"ab", b"c"]),
            BlockHash::root(&[b"a", b"bc"])
        );
        let x = chain(&a, &[&[1, 2], &[3, 4]]);
        let y = chain(&a, &[&[1, 2], &[3, 5]]);
        let z = chain(&a, &[&[1, 3], &[3, 4]]);
        assert_eq!(x[0], y[0]);
        assert_ne!(x[1], y[1]);
        assert_ne!(x[1], z[1], "a block's key names its whole prefix");
        assert_eq!(x, chain(&a, &[&[1, 2], &[3, 4]]));
    }

    #[test]
    fn holds_idle_blocks_and_eviction_order() {
        let pool = PageAllocator::new(16);
        let mut cache = PrefixCache::new(2);
        let root = BlockHash::root(&[b"t"]);
        let keys = chain(&root, &[&[1], &[2], &[3]]);
        let mut held: Vec<Arc<CachedBlock>> = keys
            .iter()
            .enumerate()
            .map(|(d, k)| cache.insert(*k, pool.allocate(2, PageKind::Kv).unwrap(), d))
            .collect();
        assert_eq!((cache.blocks(), cache.idle_blocks()), (3, 0));
        assert!(!cache.evict(&keys[0]), "held blocks stay");
        // A second sequence computed the same first block: it gets the cached one and its own
        // pages go back.
        let dup = cache.insert(keys[0], pool.allocate(2, PageKind::Kv).unwrap(), 0);
        assert!(Arc::ptr_eq(&dup, &held[0]));
        assert_eq!(pool.free_pages(), 10);
        cache.release(std::mem::take(&mut held), 7);
        assert_eq!(cache.idle_blocks(), 2, "the first block is still held");
        cache.release(vec![dup], 9);
        assert!(cache.is_consistent());
        // Tail first at equal stamps; the block released later goes last.
        let order: Vec<BlockHash> = cache.idle_lru().map(|(_, h)| *h).collect();
        assert_eq!(order, [keys[2], keys[1], keys[0]]);
        let again = cache.acquire(&keys[1]).unwrap();
        assert!(!cache.is_idle(&keys[1]));
        assert_eq!(cache.clear_idle(), 2);
        assert_eq!(pool.free_pages(), 14);
        cache.release(vec![again], 11);
        assert!(cache.evict(&keys[1]));
        assert_eq!((cache.blocks(), pool.free_pages()), (0, 16));
        assert!(cache.is_consistent());
    }
}
