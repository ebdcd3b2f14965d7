//! The pool as a plan unfolds: free pages, the sequences' KV pages, and each adapter's
//! residency and use counts, changed decision by decision exactly as the engine's allocator,
//! KV caches and registry will change when the decisions are applied. Each change that the
//! engine will repeat is recorded as a [`Decision`].
//!
//! Invariants (by construction): an adapter's use counts are counted from the snapshot's
//! sequences and only decremented for a sequence that was counted; an adapter some running
//! sequence uses is never evicted; pages only move between `free` and a sequence or adapter.

use std::collections::{HashMap, VecDeque};

use crate::lora::ids::AdapterKey;
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
            if let Some(a) = s.adapter.and_then(|k| adapters.get_mut(k)) {
                a.uses += 1;
                a.running += usize::from(running);
            }
        };
        snapshot.running.iter().for_each(|s| count(s, true));
        snapshot.waiting.iter().for_each(|s| count(s, false));
        Sim {
            limits,
            free: snapshot.free_pages,
            adapters,
            running: snapshot.running,
            waiting: snapshot.waiting.into(),
            decisions: Vec::new(),
        }
    }

    /// Grows `seq`'s KV to hold `tokens` tokens, all or nothing (`SeqKv::reserve`).
    pub fn reserve(&mut self, seq: &mut SeqState<'a>, tokens: usize) -> bool {
        let need = self.limits.pages_for(tokens).saturating_sub(seq.pages);
        if need > self.free {
            return false;
        }
        self.free -= need;
        seq.pages += need;
        true
    }

    /// Tokens `seq` could hold with its pages plus every free page.
    pub fn fits(&self, seq: &SeqState<'_>) -> usize {
        self.limits.tokens_in(seq.pages) + self.limits.tokens_in(self.free)
    }

    /// Evicts the least recently used resident adapter that no running sequence uses;
    /// `false` when there is none. Ties (never two resident adapters with one `last_used` in
    /// the engine, whose admissions stamp distinct ticks) go to the smaller key.
    pub fn evict_lru(&mut self) -> bool {
        let victim = self
            .adapters
            .iter()
            .filter(|(_, a)| a.running == 0 && a.state.resident.is_some())
            .min_by(|(ka, a), (kb, b)| {
                (a.state.last_used.cmp(&b.state.last_used)).then_with(|| ka.cmp(kb))
            })
            .map(|(k, _)| *k);
        let Some(key) = victim else {
            return false;
        };
        if let Some(a) = self.adapters.get_mut(key) {
            self.free += a.state.resident.take().unwrap_or(0);
        }
        self.decisions.push(Decision::Evict(key.clone()));
        true
    }

    /// Preempts `running[i]`: frees its pages and queues it first in line, recomputed from
    /// scratch.
    pub fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.free += seq.pages;
        seq.pages = 0;
        seq.computed = 0;
        if let Some(a) = seq.adapter.and_then(|k| self.adapters.get_mut(k)) {
            // Counted when the plan started: `seq` was running then.
            a.running -= 1;
        }
        self.decisions.push(Decision::Preempt(seq.id));
        self.waiting.push_front(seq);
    }

    /// Whether `seq` can be admitted at all: base model, or its adapter's weights are
    /// somewhere (`Engine::is_ready`).
    pub fn usable(&self, seq: &SeqState<'_>) -> bool {
        match seq.adapter {
            None => true,
            Some(k) => self.adapters.get(k).is_some_and(|a| a.state.usable()),
        }
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

    /// Pages that evicting every idle resident adapter except `keep` would free.
    pub fn idle_pages_except(&self, keep: Option<&AdapterKey>) -> usize {
        self.adapters
            .iter()
            .filter(|(k, a)| a.running == 0 && Some(**k) != keep)
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

    /// A refused waiting sequence ends: its adapter loses a use, and an adapter being unloaded
    /// goes with its last use (its pages are freed).
    pub fn release(&mut self, seq: &SeqState<'a>) {
        let Some(key) = seq.adapter else { return };
        let Some(a) = self.adapters.get_mut(key) else {
            return;
        };
        // Counted when the plan started: `seq` was waiting then.
        a.uses -= 1;
        if a.state.unloading && a.uses == 0 {
            self.free += a.state.resident.unwrap_or(0);
            self.adapters.remove(key);
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
            adapter: Some(&a),
            tokens: 3,
            prompt_len: 3,
            max_tokens: 4,
            computed: 3,
            pages: 2,
            admitted: 0,
            importing: false,
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
        };
        let mut sim = Sim::new(snapshot, limits());
        assert_eq!(sim.idle_pages_except(None), 7, "a is running");
        assert_eq!(sim.idle_pages_except(Some(&c)), 3);
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
            adapter: None,
            tokens: 9,
            prompt_len: 9,
            max_tokens: 1,
            computed: 0,
            pages: 0,
            admitted: 0,
            importing: false,
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

    /// Random states, planned, then applied to a real pool: every reservation, placement and
    /// eviction the plan makes must succeed exactly as the plan's arithmetic said, and the plan
    /// must keep the step's budgets.
    #[test]
    fn plans_hold_on_the_real_allocator() {
        use crate::memory::kv::{KvGeometry, SeqKv};
        use crate::memory::pool::{PageAllocator, PageKind, Pages};
        use crate::scheduler::Scheduler;

        let geometry = KvGeometry {
            num_layers: 2,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 8,
            page_elems: 64,
        };
        let tenants: Vec<TenantId> = (0..3).map(|i| TenantId(format!("t{i}"))).collect();
        let keys: Vec<AdapterKey> = (0..4)
            .map(|i| AdapterKey::new("t", &format!("a{i}")))
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut preemptions, mut admissions, mut evictions) = (0, 0, 0);
        for _ in 0..2_000 {
            let total = 10 + rand(30);
            let limits = Limits {
                max_batch_tokens: 1 + rand(40),
                max_prefill_chunk: 1 + rand(12),
                max_running: 1 + rand(6),
                pool_pages: total,
                block_size: 4,
                num_layers: 2,
            };
            let pool = PageAllocator::new(total as u32);
            let mut scheduler = Scheduler::new(limits);
            for t in &tenants {
                scheduler.charge(t, rand(50), rand(5));
            }
            let mut adapter_pages: HashMap<&AdapterKey, Pages> = HashMap::new();
            let mut adapters = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                let placement = 1 + rand(4);
                let mut state = AdapterState {
                    host_ready: rand(4) > 0,
                    resident: None,
                    placement: Some(placement),
                    unloading: false,
                    last_used: i as u64 * 3 + rand(3) as u64,
                };
                if rand(2) == 0
                    && let Some(p) = pool.allocate(placement, PageKind::Adapter)
                {
                    state.resident = Some(p.len());
                    adapter_pages.insert(k, p);
                }
                adapters.insert(k, state);
            }
            let mut kv: HashMap<SeqId, SeqKv> = HashMap::new();
            let mut running = Vec::new();
            for i in 0..rand(6) {
                let tokens = 1 + rand(30);
                let computed = tokens - 1 - rand(tokens.min(8));
                let mut seq_kv = SeqKv::new(&pool, geometry);
                if !seq_kv.reserve(computed) {
                    continue;
                }
                let resident: Vec<&AdapterKey> = adapter_pages.keys().copied().collect();
                let adapter =
                    (rand(2) == 0 && !resident.is_empty()).then(|| resident[rand(resident.len())]);
                let id = SeqId(i as u64);
                running.push(SeqState {
                    id,
                    tenant: &tenants[rand(3)],
                    adapter,
                    tokens,
                    prompt_len: tokens - rand(tokens),
                    max_tokens: 1 + rand(20),
                    computed,
                    pages: seq_kv.pages(),
                    admitted: i as u64,
                    importing: false,
                });
                kv.insert(id, seq_kv);
            }
            let waiting: Vec<SeqState<'_>> = (0..rand(7))
                .map(|i| {
                    let tokens = 1 + rand(30);
                    SeqState {
                        id: SeqId(100 + i as u64),
                        tenant: &tenants[rand(3)],
                        adapter: (rand(2) == 0).then(|| &keys[rand(keys.len())]),
                        tokens,
                        prompt_len: tokens,
                        max_tokens: 1 + rand(40),
                        computed: 0,
                        pages: 0,
                        admitted: 0,
                        importing: rand(5) == 0,
                    }
                })
                .collect();
            let snapshot = Snapshot {
                running: running.clone(),
                waiting: waiting.clone(),
                adapters: adapters.clone(),
                free_pages: pool.free_pages(),
            };
            let plan = scheduler.plan(snapshot);

            // Apply it to the real pool.
            let seq = |id: SeqId| {
                running
                    .iter()
                    .chain(&waiting)
                    .find(|s| s.id == id)
                    .unwrap()
                    .clone()
            };
            let mut live: Vec<SeqId> = running.iter().map(|s| s.id).collect();
            let mut spent = 0;
            for d in &plan.decisions {
                match d {
                    Decision::Evict(k) => {
                        let uses = live.iter().filter(|id| seq(**id).adapter == Some(k));
                        assert_eq!(uses.count(), 0, "evicted {k} while in use");
                        assert!(adapter_pages.remove(k).is_some());
                        evictions += 1;
                    }
                    Decision::Preempt(id) => {
                        assert!(kv.remove(id).is_some());
                        live.retain(|s| s != id);
                        preemptions += 1;
                    }
                    Decision::Run { seq: id, tokens } => {
                        let to = seq(*id).computed + tokens;
                        assert!(kv.get_mut(id).unwrap().reserve(to), "{d:?}");
                        spent += tokens;
                    }
                    Decision::Refuse { seq: id, .. } => assert!(!live.contains(id)),
                    Decision::Place(k) => {
                        let placement = adapters[k].placement.unwrap();
                        let pages = pool.allocate(placement, PageKind::Adapter);
                        assert!(pages.is_some(), "{d:?}");
                        assert!(adapter_pages.insert(k, pages.unwrap()).is_none());
                    }
                    Decision::Admit {
                        seq: id,
                        tokens,
                        reserve,
                    } => {
                        let s = seq(*id);
                        if let Some(k) = s.adapter {
                            assert!(adapter_pages.contains_key(k), "{k} not resident");
                        }
                        let mut seq_kv = SeqKv::new(&pool, geometry);
                        assert!(seq_kv.reserve(*reserve), "{d:?}");
                        kv.insert(*id, seq_kv);
                        live.push(*id);
                        spent += tokens;
                        admissions += 1;
                    }
                }
            }
            assert!(spent <= limits.max_batch_tokens);
            let admitted = plan.admitted().len();
            assert!(admitted == 0 || live.len() <= limits.max_running);
            let batch = plan.batch();
            let mut ids: Vec<SeqId> = batch.iter().map(|(id, _)| *id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), batch.len(), "a sequence twice in one batch");
            assert!(pool.stats().is_consistent());
        }
        // The random states exercise every path.
        assert!(
            preemptions > 50 && admissions > 500 && evictions > 50,
            "{preemptions} preemptions, {admissions} admissions, {evictions} evictions"
        );
    }
}
