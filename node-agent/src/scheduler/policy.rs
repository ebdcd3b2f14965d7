//! The scheduling policy: from a [`Snapshot`] of the engine to the [`StepPlan`] of one step.
//!
//! Order within a step (Sarathi-Serve's stall-free batching):
//! 1. Running sequences, oldest admission first, while the token budget lasts: a decode takes
//!    one token, an unfinished prompt its next chunk (at most `max_prefill_chunk`). When the
//!    pool cannot hold the tokens, in this order: a shorter prefill chunk that fits without
//!    taking anyone's pages; evicting the least recently used idle adapter or idle cached
//!    block (one order, `sim.rs`); preempting the newest running sequence (itself, when it is
//!    the newest).
//! 2. Waiting sequences, while budget and `max_running` allow: among those whose adapter's
//!    weights are loaded, the tenant with the smallest virtual token counter
//!    ([`Vtc`]), first in line within it. A sequence that could not finish even alone in the
//!    pool is refused. One is admitted only when free pages plus idle adapters' and idle
//!    cached blocks' pages cover its whole prompt (plus one token) and its adapter, less the
//!    cached blocks it reuses (the longest cached prefix of its blocks, always leaving its
//!    last token to compute); otherwise admission stops for the step (no skipping ahead, so a
//!    large request is not starved by small ones).
//!
//! Nothing fails for lack of memory and nothing exceeds the pool. The policy is synchronous
//! and deterministic; it reads the fairness counters and changes nothing outside the plan.

use crate::lora::ids::{AdapterKey, TenantId};
use crate::scheduler::fairness::Vtc;
use crate::scheduler::plan::{Decision, StepPlan};
use crate::scheduler::sim::Sim;
use crate::scheduler::state::{Limits, Snapshot};

/// The scheduler: the engine's budgets and the tenants' fairness counters.
#[derive(Debug, Clone)]
pub struct Scheduler {
    limits: Limits,
    fairness: Vtc,
}

/// How one admission attempt ended.
enum Admission {
    /// Admitted, computing this many tokens this step.
    Admitted(usize),
    /// Refused for good (it could never fit); try the next one.
    Refused,
    /// Cannot be admitted now; admission stops for this step.
    Blocked,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Self {
        Scheduler {
            limits,
            fairness: Vtc::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn fairness(&self) -> &Vtc {
        &self.fairness
    }

    /// A request of `tenant` arrived; `active` are the tenants with queued or running work.
    /// Only a tenant that was idle is lifted: lifting one that is already backlogged would
    /// erase the deficit fairness owes it.
    pub fn on_arrival<'a>(
        &mut self,
        tenant: &TenantId,
        active: impl Iterator<Item = &'a TenantId> + Clone,
    ) {
        if !active.clone().any(|t| t == tenant) {
            self.fairness.on_arrival(tenant, active);
        }
    }

    /// Charges a step's service to a tenant (prompt tokens computed for the first time, and
    /// generated tokens).
    pub fn charge(&mut self, tenant: &TenantId, prompt_tokens: usize, output_tokens: usize) {
        self.fairness.charge(tenant, prompt_tokens, output_tokens);
    }

    /// Plans one step: running sequences first, then admissions.
    pub fn plan(&self, snapshot: Snapshot<'_>) -> StepPlan {
        let mut sim = Sim::new(snapshot, self.limits);
        let mut budget = self.limits.max_batch_tokens;
        run_running(&mut sim, &mut budget);
        self.admit_waiting(&mut sim, &mut budget);
        StepPlan {
            decisions: sim.decisions,
        }
    }

    /// Plans only admissions, with `budget` tokens left: the rest of a step after an
    /// admission ended differently than planned (see [`StepPlan`]).
    pub fn plan_admissions(&self, snapshot: Snapshot<'_>, budget: usize) -> StepPlan {
        let mut sim = Sim::new(snapshot, self.limits);
        let mut budget = budget;
        self.admit_waiting(&mut sim, &mut budget);
        StepPlan {
            decisions: sim.decisions,
        }
    }

    fn admit_waiting(&self, sim: &mut Sim<'_>, budget: &mut usize) {
        while *budget > 0 && sim.running.len() < self.limits.max_running {
            let Some(pos) = self.next_admissible(sim) else {
                break;
            };
            match admit(sim, pos, *budget) {
                Admission::Admitted(n) => *budget -= n,
                Admission::Refused => continue,
                Admission::Blocked => break,
            }
        }
    }

    /// The waiting sequence to admit next (its position in line): among those whose adapter
    /// is usable, the tenant with the smallest virtual token counter, first in line within it.
    fn next_admissible(&self, sim: &Sim<'_>) -> Option<usize> {
        let ready: Vec<usize> = (0..sim.waiting.len())
            .filter(|&i| sim.usable(&sim.waiting[i]))
            .collect();
        let tenant = self
            .fairness
            .pick(ready.iter().map(|&i| sim.waiting[i].tenant))?;
        ready.into_iter().find(|&i| sim.waiting[i].tenant == tenant)
    }
}

/// Plans the running sequences, oldest admission first, while the budget lasts.
fn run_running(sim: &mut Sim<'_>, budget: &mut usize) {
    sim.running.sort_by_key(|s| s.admitted);
    let chunk = sim.limits.max_prefill_chunk;
    let mut i = 0;
    while i < sim.running.len() && *budget > 0 {
        let mut seq = sim.running[i].clone();
        let computed = seq.computed;
        let mut n = seq.remaining().min(*budget).min(chunk);
        let mut preempted_self = false;
        while !sim.reserve(&mut seq, computed + n) {
            let fit = sim.fits(&seq).saturating_sub(computed);
            if fit >= 1 && fit < n {
                n = fit; // a shorter prefill chunk fits without taking anyone's pages
                continue;
            }
            if sim.evict_lru() {
                continue;
            }
            let newest = sim.running.len() - 1;
            if newest == i {
                sim.preempt(i);
                preempted_self = true;
                break;
            }
            sim.preempt(newest);
        }
        if preempted_self {
            continue;
        }
        sim.decisions.push(Decision::Run {
            seq: seq.id,
            tokens: n,
        });
        sim.running[i] = seq;
        *budget -= n;
        i += 1;
    }
}

/// Admits `waiting[pos]` if the pool can hold its whole prompt (and its adapter), reusing the
/// longest prefix of it that the prefix cache holds.
fn admit(sim: &mut Sim<'_>, pos: usize, budget: usize) -> Admission {
    let Some(mut seq) = sim.waiting.get(pos).cloned() else {
        return Admission::Blocked;
    };
    let limits = sim.limits;
    let hit = sim.prefix_hit(&seq);
    let hit_pages = hit * limits.num_layers;
    let need_kv = limits.pages_for(seq.tokens + 1) - hit_pages;
    let need_total = limits.pages_for(seq.prompt_len + seq.max_tokens);
    // An imported prompt only needs its pages; its first decode is the step's one token.
    let (n, reserve) = if seq.importing {
        (1, seq.prompt_len + 1)
    } else {
        let done = hit * limits.block_size;
        let n = (seq.tokens - done)
            .min(budget)
            .min(limits.max_prefill_chunk);
        (n, done + n)
    };
    let adapters: &[AdapterKey] = seq.adapters;
    let mut adapter_pages = 0;
    for key in adapters {
        match sim.pages_to_place(key) {
            Some(p) => adapter_pages += p,
            None => return Admission::Blocked,
        }
    }
    // What it needs alone in the pool counts its adapters whole, resident ones too: pages
    // still to place alone would let a request through that can only thrash.
    let footprint: usize = adapters.iter().filter_map(|k| sim.footprint(k)).sum();
    if need_total + footprint > limits.pool_pages {
        // Alone in the pool it still could not finish: refuse rather than thrash.
        sim.waiting.remove(pos);
        sim.decisions.push(Decision::Refuse {
            seq: seq.id,
            kv_pages: need_total,
            adapter_pages: footprint,
        });
        sim.release(&seq);
        return Admission::Refused;
    }
    // Its own adapters' pages are no room for it (it is about to use them), nor are the idle
    // cached blocks it reuses.
    let evictable =
        sim.idle_pages_except(adapters) + sim.idle_cached_pages() - sim.idle_hit_pages(&seq, hit);
    if sim.free + evictable < need_kv + adapter_pages {
        return Admission::Blocked;
    }
    let took = sim.take(&seq, hit);
    seq.shared_pages = hit_pages;
    seq.computed = hit * limits.block_size;
    // Count them all as running first so making room for one never evicts another.
    adapters.iter().for_each(|key| sim.pin(key));
    let unpin = |sim: &mut Sim<'_>| adapters.iter().for_each(|key| sim.unpin(key));
    if !adapters.iter().all(|key| sim.place(key)) {
        // Cannot happen after the availability check (what a failed placement already placed
        // stays resident and idle, as any placement); undo the rest rather than admit.
        unpin(sim);
        sim.untake(took);
        return Admission::Blocked;
    }
    while !sim.reserve(&mut seq, reserve) {
        if !sim.evict_lru() {
            // Cannot happen after the availability check; undo rather than loop.
            unpin(sim);
            sim.untake(took);
            return Admission::Blocked;
        }
    }
    sim.waiting.remove(pos);
    sim.decisions.push(Decision::Admit {
        seq: seq.id,
        tokens: n,
        reserve,
        cached: hit,
    });
    sim.running.push(seq);
    Admission::Admitted(n)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
