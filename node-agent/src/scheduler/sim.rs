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
