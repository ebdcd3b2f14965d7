//! The pool as a plan unfolds: free pages, the sequences' KV pages, each adapter's residency
//! and use counts, and the prefix cache's idle blocks, changed decision by decision exactly as
//! the engine's allocator, KV caches, prefix cache and registry will change when the decisions
//! are applied. Each change that the engine will repeat is recorded as a [`Decision`].
//!
//! Invariants (by construction): an adapter's use counts are counted from the snapshot's
//! sequences and only decremented for a sequence that was counted; an adapter some running
//! sequence uses is never evicted, nor is a cached block a sequence reads; pages only move
//! between `free` and a sequence, an adapter or an idle cached block.
//!
//! Idle adapters and idle cached blocks are evicted under one least-recently-used order: the
//! smallest stamp goes first (adapters are stamped when admissions use them, blocks when their
//! last reader lets go, from one clock); at equal stamps a block goes before an adapter (a
//! block costs one prefill chunk to recompute, an adapter a copy of all its rows), blocks
//! deeper in a prefix before shallower ones, then the smaller key. Blocks that sequences let go
//! of during the plan (a preemption) count as neither free nor evictable until the next step,
//! which only makes the plan more careful.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::lora::ids::AdapterKey;
use crate::memory::prefix::{BlockHash, PrefixCache};
use crate::scheduler::plan::Decision;
use crate::scheduler::state::{AdapterState, Limits, SeqState, Snapshot};

/// An adapter and how many sequences of the plan use it.
#[derive(Debug, Clone, Copy)]
struct Adapter {
    state: AdapterState,
    /// Running sequences using it: while non-zero it is not evictable.
    running: usize,
    /// Queued or running sequences using it.
    uses: usize,
}

#[derive(Debug)]
pub(super) struct Sim<'a> {
    pub limits: Limits,
    pub free: usize,
    adapters: HashMap<&'a AdapterKey, Adapter>,
    pub running: Vec<SeqState<'a>>,
    pub waiting: VecDeque<SeqState<'a>>,
    pub decisions: Vec<Decision>,
    cache: Option<&'a PrefixCache>,
    /// Blocks of the cache this plan evicts.
    evicted: HashSet<BlockHash>,
    /// Blocks idle at the snapshot that this plan's admissions reuse (no longer evictable).
    taken: HashSet<BlockHash>,
    /// Pages of the blocks still idle and evictable.
    idle_cached: usize,
}

impl<'a> Sim<'a> {
    pub fn new(snapshot: Snapshot<'a>, limits: Limits) -> Self {
        let mut adapters: HashMap<&'a AdapterKey, Adapter> = snapshot
            .adapters
            .into_iter()
            .map(|(k, state)| {
                let a = Adapter {
                    state,
                    running: 0,
                    uses: 0,
                };
                (k, a)
            })
            .collect();
        let mut count = |s: &SeqState<'a>, running: bool| {
            for k in s.adapters {
                if let Some(a) = adapters.get_mut(k) {
                    a.uses += 1;
                    a.running += usize::from(running);
                }
            }
        };
        snapshot.running.iter().for_each(|s| count(s, true));
        snapshot.waiting.iter().for_each(|s| count(s, false));
        let idle_cached = snapshot
            .cache
            .map_or(0, |c| c.idle_blocks() * c.pages_per_block());
        Sim {
            limits,
            free: snapshot.free_pages,
            adapters,
            running: snapshot.running,
            waiting: snapshot.waiting.into(),
            decisions: Vec::new(),
            cache: snapshot.cache,
            evicted: HashSet::new(),
            taken: HashSet::new(),
            idle_cached,
        }
    }

    /// Grows `seq`'s KV to hold `tokens` tokens, all or nothing (`SeqKv::reserve`).
    pub fn reserve(&mut self, seq: &mut SeqState<'a>, tokens: usize) -> bool {
        let need = self
            .limits
            .pages_for(tokens)
            .saturating_sub(seq.pages + seq.shared_pages);
        if need > self.free {
            return false;
        }
        self.free -= need;
        seq.pages += need;
        true
    }

    /// Tokens `seq` could hold with its pages plus every free page.
    pub fn fits(&self, seq: &SeqState<'_>) -> usize {
        self.limits.tokens_in(seq.pages + seq.shared_pages) + self.limits.tokens_in(self.free)
    }

    /// The least recently released idle block still evictable in this plan.
    fn lru_block(&self) -> Option<(u64, BlockHash)> {
        self.cache?
            .idle_lru()
            .find(|(_, h)| !self.evicted.contains(*h) && !self.taken.contains(*h))
            .map(|(stamp, h)| (stamp, *h))
    }

    /// Evicts the least recently used idle thing: a resident adapter no running sequence uses,
    /// or a cached block no sequence reads (the order is in the module header); `false` when
    /// there is none.
    pub fn evict_lru(&mut self) -> bool {
        let adapter = self
            .adapters
            .iter()
            .filter(|(_, a)| a.running == 0 && a.state.resident.is_some())
            .min_by(|(ka, a), (kb, b)| {
                (a.state.last_used.cmp(&b.state.last_used)).then_with(|| ka.cmp(kb))
            })
            .map(|(k, a)| (a.state.last_used, *k));
        match (self.lru_block(), adapter) {
            (Some((stamp, block)), Some((used, _))) if stamp <= used => self.evict_block(block),
            (Some((_, block)), None) => self.evict_block(block),
            (_, Some((_, key))) => {
                if let Some(a) = self.adapters.get_mut(key) {
                    self.free += a.state.resident.take().unwrap_or(0);
                }
                self.decisions.push(Decision::Evict(key.clone()));
            }
            (None, None) => return false,
        }
        true
    }

    fn evict_block(&mut self, block: BlockHash) {
        let pages = self.cache.map_or(0, PrefixCache::pages_per_block);
        self.evicted.insert(block);
        self.idle_cached -= pages;
        self.free += pages;
        self.decisions.push(Decision::EvictBlock(block));
    }

    /// Pages of idle cached blocks that evictions could still free.
    pub fn idle_cached_pages(&self) -> usize {
        self.idle_cached
    }

    /// Cached blocks `seq` would reuse if admitted now: the longest run of its keys that is
    /// cached (and not evicted by this plan), leaving at least its last token to compute so
    /// that it has logits to sample from.
    pub fn prefix_hit(&self, seq: &SeqState<'_>) -> usize {
        let Some(cache) = self.cache else { return 0 };
        let most = if seq.importing {
            // Exactly the blocks its import leaves out (pinned for it, so cached): the import
            // is written over every later block.
            seq.import_cached
        } else {
            seq.tokens.saturating_sub(1) / self.limits.block_size
        };
        seq.prefix
            .iter()
            .take(most)
            .take_while(|h| cache.contains(h) && !self.evicted.contains(*h))
            .count()
    }

    /// Pages of `seq`'s first `hit` blocks that are idle now (reusing them makes them
    /// unevictable).
    pub fn idle_hit_pages(&self, seq: &SeqState<'_>, hit: usize) -> usize {
        let Some(cache) = self.cache else { return 0 };
        let idle = seq.prefix[..hit]
            .iter()
            .filter(|h| cache.is_idle(h) && !self.taken.contains(*h))
            .count();
        idle * cache.pages_per_block()
    }

    /// Reuses `seq`'s first `hit` blocks: the idle ones leave the evictable set. Returns the
    /// ones it took, for [`Sim::untake`].
    pub fn take(&mut self, seq: &SeqState<'a>, hit: usize) -> Vec<BlockHash> {
        let Some(cache) = self.cache else {
            return Vec::new();
        };
        let mut took = Vec::new();
        for h in &seq.prefix[..hit] {
            if cache.is_idle(h) && self.taken.insert(*h) {
                self.idle_cached -= cache.pages_per_block();
                took.push(*h);
            }
        }
        took
    }

    /// Undoes [`Sim::take`] for an admission that did not happen.
    pub fn untake(&mut self, took: Vec<BlockHash>) {
        let pages = self.cache.map_or(0, PrefixCache::pages_per_block);
        for h in took {
            if self.taken.remove(&h) {
                self.idle_cached += pages;
            }
        }
    }

    /// Preempts `running[i]`: frees its private pages, lets go of its shared blocks and
    /// queues it first in line, recomputed (less what the cache still holds) when admitted
    /// again.
    pub fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.free += seq.pages;
        seq.pages = 0;
        seq.shared_pages = 0;
        seq.computed = 0;
        for k in seq.adapters {
            if let Some(a) = self.adapters.get_mut(k) {
                // Counted when the plan started: `seq` was running then.
                a.running -= 1;
            }
        }
        self.decisions.push(Decision::Preempt(seq.id));
        self.waiting.push_front(seq);
    }

    /// Whether `seq` can be admitted at all: base model, or every adapter's weights are
    /// somewhere (`Engine::is_ready`).
    pub fn usable(&self, seq: &SeqState<'_>) -> bool {
        seq.adapters
            .iter()
            .all(|k| self.adapters.get(k).is_some_and(|a| a.state.usable()))
    }

    /// Pool pages `key` still needs to become resident (`None`: it cannot be placed now).
    pub fn pages_to_place(&self, key: &AdapterKey) -> Option<usize> {
        let a = self.adapters.get(key)?;
        if a.state.resident.is_some() {
            return Some(0);
        }
        if !a.state.host_ready {
            return None;
        }
        a.state.placement
    }

    /// Pool pages `key` takes when resident, whether it is now or not (`None`: unknown, its
    /// weights not loaded yet).
    pub fn footprint(&self, key: &AdapterKey) -> Option<usize> {
        let a = self.adapters.get(key)?;
        a.state.resident.or(a.state.placement)
    }

    /// Pages that evicting every idle resident adapter except those in `keep` would free.
    pub fn idle_pages_except(&self, keep: &[AdapterKey]) -> usize {
        self.adapters
            .iter()
            .filter(|(k, a)| a.running == 0 && !keep.contains(k))
            .filter_map(|(_, a)| a.state.resident)
            .sum()
    }

    /// Counts one more running sequence on `key`, so making room never evicts it.
    pub fn pin(&mut self, key: &AdapterKey) {
        if let Some(a) = self.adapters.get_mut(key) {
            a.running += 1;
        }
    }

    /// Undoes [`Sim::pin`] for an admission that did not happen.
    pub fn unpin(&mut self, key: &AdapterKey) {
        if let Some(a) = self.adapters.get_mut(key) {
            // Only called after `pin` on the same key.
            a.running -= 1;
        }
    }

    /// Places a (pinned, host-ready) adapter, evicting idle ones until its pages are free;
    /// `false` when even that cannot make room.
    pub fn place(&mut self, key: &'a AdapterKey) -> bool {
        let Some(pages) = self.pages_to_place(key) else {
            return false;
        };
        if self
            .adapters
            .get(key)
            .is_some_and(|a| a.state.resident.is_some())
        {
            return true;
        }
        while self.free < pages {
            if !self.evict_lru() {
                return false;
            }
        }
        self.free -= pages;
        if let Some(a) = self.adapters.get_mut(key) {
            a.state.resident = Some(pages);
        }
        self.decisions.push(Decision::Place(key.clone()));
        true
    }

    /// A refused waiting sequence ends: each of its adapters loses a use, and an adapter
    /// being unloaded goes with its last use (its pages are freed).
    pub fn release(&mut self, seq: &SeqState<'a>) {
        for key in seq.adapters {
            let Some(a) = self.adapters.get_mut(key) else {
                continue;
            };
            // Counted when the plan started: `seq` was waiting then.
            a.uses -= 1;
            if a.state.unloading && a.uses == 0 {
                self.free += a.state.resident.unwrap_or(0);
                self.adapters.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::ids::TenantId;
    use crate::scheduler::state::SeqId;

    fn limits() -> Limits {
        Limits {
            max_batch_tokens: 64,
            max_prefill_chunk: 16,
            max_running: 8,
            pool_pages: 100,
            block_size: 4,
            num_layers: 2,
        }
    }

    #[test]
    fn pages_match_the_kv_geometry() {
        let g = crate::memory::kv::KvGeometry {
            num_layers: 2,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 8,
            page_elems: 64,
        };
        let pool = crate::memory::pool::PageAllocator::new(64);
        for tokens in 0..40 {
            assert_eq!(limits().pages_for(tokens), g.pages_for(tokens));
            let mut kv = crate::memory::kv::SeqKv::new(&pool, g);
            assert!(kv.reserve(tokens));
            assert_eq!(limits().tokens_in(kv.pages()), kv.capacity());
        }
    }

    #[test]
    fn evicts_least_recently_used_idle_adapters_only() {
        let (a, b, c) = (
            AdapterKey::new("t", "a"),
            AdapterKey::new("t", "b"),
            AdapterKey::new("t", "c"),
        );
        let tenant = TenantId("t".into());
        let runner = SeqState {
            id: SeqId(1),
            tenant: &tenant,
            adapters: std::slice::from_ref(&a),
            tokens: 3,
            prompt_len: 3,
            max_tokens: 4,
            computed: 3,
            pages: 2,
            shared_pages: 0,
            prefix: &[],
            admitted: 0,
            importing: false,
            import_cached: 0,
        };
        let snapshot = Snapshot {
            running: vec![runner],
            waiting: Vec::new(),
            adapters: HashMap::from([
                (&a, AdapterState::resident(5, 1)),
                (&b, AdapterState::resident(3, 7)),
                (&c, AdapterState::resident(4, 2)),
            ]),
            free_pages: 10,
            cache: None,
        };
        let mut sim = Sim::new(snapshot, limits());
        assert_eq!(sim.idle_pages_except(&[]), 7, "a is running");
        assert_eq!(sim.idle_pages_except(std::slice::from_ref(&c)), 3);
        assert_eq!(sim.idle_pages_except(&[b.clone(), c.clone()]), 0);
        assert!(sim.evict_lru());
        assert!(sim.evict_lru());
        assert!(!sim.evict_lru(), "a is in use by a running sequence");
        assert_eq!(sim.free, 17);
        assert_eq!(
            sim.decisions,
            vec![Decision::Evict(c.clone()), Decision::Evict(b.clone())]
        );
        // Preempting its only runner makes `a` evictable.
        sim.preempt(0);
        assert_eq!(sim.free, 19);
        assert!(sim.evict_lru());
        assert_eq!(sim.free, 24);
        assert_eq!(sim.waiting.len(), 1);
        assert_eq!((sim.waiting[0].pages, sim.waiting[0].computed), (0, 0));
    }

    #[test]
    fn reservations_are_all_or_nothing_in_whole_blocks() {
        let tenant = TenantId("t".into());
        let mut seq = SeqState {
            id: SeqId(1),
            tenant: &tenant,
            adapters: &[],
            tokens: 9,
            prompt_len: 9,
            max_tokens: 1,
            computed: 0,
            pages: 0,
            shared_pages: 0,
            prefix: &[],
            admitted: 0,
            importing: false,
            import_cached: 0,
        };
        let snapshot = Snapshot {
            free_pages: 5,
            ..Snapshot::default()
        };
        let mut sim = Sim::new(snapshot, limits());
        assert!(sim.reserve(&mut seq, 8), "two blocks of two layers");
        assert_eq!((seq.pages, sim.free), (4, 1));
        assert!(sim.reserve(&mut seq, 5), "already held");
        assert!(!sim.reserve(&mut seq, 9), "a third block needs 2 pages");
        assert_eq!((seq.pages, sim.free), (4, 1));
        assert_eq!(sim.fits(&seq), 8);
    }
}
