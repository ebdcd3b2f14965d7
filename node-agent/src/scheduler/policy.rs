//! The scheduling policy: from a [`Snapshot`] of the engine to the [`StepPlan`] of one step.
//!
//! Order within a step (Sarathi-Serve's stall-free batching):
//! 1. Running sequences, oldest admission first, while the token budget lasts: a decode takes
//!    one token, an unfinished prompt its next chunk (at most `max_prefill_chunk`). When the
//!    pool cannot hold the tokens, in this order: a shorter prefill chunk that fits without
//!    taking anyone's pages; evicting the least recently used idle adapter; preempting the
//!    newest running sequence (itself, when it is the newest).
//! 2. Waiting sequences, while budget and `max_running` allow: among those whose adapter's
//!    weights are loaded, the tenant with the smallest virtual token counter
//!    ([`Vtc`]), first in line within it. A sequence that could not finish even alone in the
//!    pool is refused. One is admitted only when free pages plus idle adapters' pages cover
//!    its whole prompt (plus one token) and its adapter; otherwise admission stops for the
//!    step (no skipping ahead, so a large request is not starved by small ones).
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

/// Admits `waiting[pos]` if the pool can hold its whole prompt (and its adapter).
fn admit(sim: &mut Sim<'_>, pos: usize, budget: usize) -> Admission {
    let Some(mut seq) = sim.waiting.get(pos).cloned() else {
        return Admission::Blocked;
    };
    let limits = sim.limits;
    let need_kv = limits.pages_for(seq.tokens + 1);
    let need_total = limits.pages_for(seq.prompt_len + seq.max_tokens);
    // An imported prompt only needs its pages; its first decode is the step's one token.
    let (n, reserve) = if seq.importing {
        (1, seq.prompt_len + 1)
    } else {
        let n = seq.remaining().min(budget).min(limits.max_prefill_chunk);
        (n, n)
    };
    let adapter: Option<&AdapterKey> = seq.adapter;
    let adapter_pages = match adapter {
        Some(key) => match sim.pages_to_place(key) {
            Some(p) => p,
            None => return Admission::Blocked,
        },
        None => 0,
    };
    if need_total + adapter_pages > limits.pool_pages {
        // Alone in the pool it still could not finish: refuse rather than thrash.
        sim.waiting.remove(pos);
        sim.decisions.push(Decision::Refuse {
            seq: seq.id,
            kv_pages: need_total,
            adapter_pages,
        });
        sim.release(&seq);
        return Admission::Refused;
    }
    // Its own adapter's pages are not room for it: it is about to use them.
    let available = sim.free + sim.idle_pages_except(adapter);
    if available < need_kv + adapter_pages {
        return Admission::Blocked;
    }
    if let Some(key) = adapter {
        // Count it as running first so making room never evicts it.
        sim.pin(key);
        if !sim.place(key) {
            sim.unpin(key);
            return Admission::Blocked;
        }
    }
    while !sim.reserve(&mut seq, reserve) {
        if !sim.evict_lru() {
            // Cannot happen after the availability check; undo rather than loop.
            if let Some(key) = adapter {
                sim.unpin(key);
            }
            return Admission::Blocked;
        }
    }
    sim.waiting.remove(pos);
    sim.decisions.push(Decision::Admit {
        seq: seq.id,
        tokens: n,
        reserve,
    });
    sim.running.push(seq);
    Admission::Admitted(n)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::scheduler::state::{AdapterState, SeqId, SeqState};

    /// Tenants `t0..t2` and adapters `a0..a3`, which the snapshots borrow.
    struct World {
        tenants: Vec<TenantId>,
        keys: Vec<AdapterKey>,
    }

    fn world() -> World {
        World {
            tenants: (0..3).map(|i| TenantId(format!("t{i}"))).collect(),
            keys: (0..4)
                .map(|i| AdapterKey::new("t0", &format!("a{i}")))
                .collect(),
        }
    }

    /// One page per block of four tokens (a single layer), 32 tokens a step in chunks of 8.
    fn limits() -> Limits {
        Limits {
            max_batch_tokens: 32,
            max_prefill_chunk: 8,
            max_running: 4,
            pool_pages: 64,
            block_size: 4,
            num_layers: 1,
        }
    }

    fn waiting(w: &World, id: u64, tenant: usize, prompt: usize) -> SeqState<'_> {
        SeqState {
            id: SeqId(id),
            tenant: &w.tenants[tenant],
            adapter: None,
            tokens: prompt,
            prompt_len: prompt,
            max_tokens: 4,
            computed: 0,
            pages: 0,
            admitted: 0,
            importing: false,
        }
    }

    /// A running sequence of `tokens` tokens, `computed` of them in `pages` pages.
    fn running(w: &World, id: u64, admitted: u64, tokens: usize, computed: usize) -> SeqState<'_> {
        SeqState {
            computed,
            pages: computed.div_ceil(4),
            admitted,
            ..waiting(w, id, 0, tokens)
        }
    }

    fn on<'a>(mut s: SeqState<'a>, w: &'a World, adapter: usize) -> SeqState<'a> {
        s.adapter = Some(&w.keys[adapter]);
        s
    }

    fn host_only(placement: usize) -> AdapterState {
        AdapterState {
            resident: None,
            placement: Some(placement),
            ..AdapterState::resident(0, 0)
        }
    }

    fn snapshot<'a>(
        running: Vec<SeqState<'a>>,
        waiting: Vec<SeqState<'a>>,
        free_pages: usize,
    ) -> Snapshot<'a> {
        Snapshot {
            running,
            waiting,
            adapters: HashMap::new(),
            free_pages,
        }
    }

    fn run(id: u64, tokens: usize) -> Decision {
        Decision::Run {
            seq: SeqId(id),
            tokens,
        }
    }

    fn admit(id: u64, tokens: usize, reserve: usize) -> Decision {
        Decision::Admit {
            seq: SeqId(id),
            tokens,
            reserve,
        }
    }

    fn plan(s: &Scheduler, snapshot: Snapshot<'_>) -> Vec<Decision> {
        s.plan(snapshot).decisions
    }

    #[test]
    fn admission_needs_room_for_the_whole_prompt_and_never_skips_ahead() {
        let w = world();
        let s = Scheduler::new(limits());
        // 1 admits (needs 4 pages, reserves its first chunk's 2); 2 needs 8 pages of the 6
        // left; 3 would fit but waits behind 2, so a long prompt is not starved.
        let queue = vec![
            waiting(&w, 1, 0, 12),
            waiting(&w, 2, 0, 30),
            waiting(&w, 3, 0, 4),
        ];
        assert_eq!(
            plan(&s, snapshot(vec![], queue.clone(), 8)),
            [admit(1, 8, 8)]
        );
        // With room for both, the step's budget is shared in line order.
        assert_eq!(
            plan(&s, snapshot(vec![], queue, 14)),
            [admit(1, 8, 8), admit(2, 8, 8), admit(3, 4, 4)]
        );
    }

    #[test]
    fn running_sequences_go_first_oldest_first_and_prompts_are_chunked() {
        let w = world();
        let s = Scheduler::new(limits());
        // Given newest first: a decode admitted first, a long prompt 8 tokens in.
        let r = vec![running(&w, 2, 1, 40, 8), running(&w, 1, 0, 10, 9)];
        let q = vec![waiting(&w, 3, 0, 20)];
        assert_eq!(
            plan(&s, snapshot(r.clone(), q.clone(), 30)),
            [run(1, 1), run(2, 8), admit(3, 8, 8)]
        );
        // A smaller budget shortens the last chunk rather than skipping it.
        let tight = Scheduler::new(Limits {
            max_batch_tokens: 10,
            ..limits()
        });
        assert_eq!(
            plan(&tight, snapshot(r.clone(), q.clone(), 30)),
            [run(1, 1), run(2, 8), admit(3, 1, 1)]
        );
        // An exhausted budget stops even the running ones.
        let tiny = Scheduler::new(Limits {
            max_batch_tokens: 5,
            ..limits()
        });
        assert_eq!(plan(&tiny, snapshot(r, q, 30)), [run(1, 1), run(2, 4)]);
    }

    #[test]
    fn a_shorter_chunk_is_tried_before_taking_anyone_s_pages() {
        let w = world();
        let s = Scheduler::new(limits());
        // 8 more tokens need 2 pages; 1 free page holds 4 of them.
        let r = vec![running(&w, 1, 0, 40, 8), running(&w, 2, 1, 9, 8)];
        assert_eq!(
            plan(&s, snapshot(r, vec![], 1)),
            [run(1, 4), Decision::Preempt(SeqId(2))]
        );
    }

    #[test]
    fn under_pressure_idle_adapters_go_first_then_the_newest_sequences() {
        let w = world();
        let s = Scheduler::new(limits());
        // Three decodes each crossing into a new page; the pool is full.
        let r = || {
            vec![
                running(&w, 1, 0, 9, 8),
                running(&w, 2, 1, 9, 8),
                running(&w, 3, 2, 9, 8),
            ]
        };
        // No adapters: the newest is preempted to let the oldest grow.
        assert_eq!(
            plan(&s, snapshot(r(), vec![], 0)),
            [Decision::Preempt(SeqId(3)), run(1, 1), run(2, 1)]
        );
        // Two idle resident adapters of one page: evicted least recently used first, then the
        // newest sequence, being the one that needs a page, preempts itself.
        let mut snap = snapshot(r(), vec![], 0);
        snap.adapters = HashMap::from([
            (&w.keys[0], AdapterState::resident(1, 5)),
            (&w.keys[1], AdapterState::resident(1, 3)),
        ]);
        assert_eq!(
            plan(&s, snap),
            [
                Decision::Evict(w.keys[1].clone()),
                run(1, 1),
                Decision::Evict(w.keys[0].clone()),
                run(2, 1),
                Decision::Preempt(SeqId(3)),
            ]
        );
    }

    #[test]
    fn an_adapter_a_running_sequence_uses_is_never_evicted() {
        let w = world();
        let s = Scheduler::new(limits());
        let r = vec![on(running(&w, 1, 0, 9, 8), &w, 0), running(&w, 2, 1, 9, 8)];
        let mut snap = snapshot(r, vec![], 0);
        snap.adapters = HashMap::from([(&w.keys[0], AdapterState::resident(4, 1))]);
        assert_eq!(
            plan(&s, snap),
            [Decision::Preempt(SeqId(2)), run(1, 1)],
            "a0 is the least recently used but in use"
        );
    }

    #[test]
    fn preempted_sequences_return_first_in_line_newest_first() {
        let w = world();
        // Two layers: a block takes two pages. Sequence 1 needs a block; 2 and 3 must go.
        let limits = Limits {
            num_layers: 2,
            ..limits()
        };
        let mut r = vec![
            running(&w, 1, 0, 9, 8),
            running(&w, 2, 1, 9, 8),
            running(&w, 3, 2, 5, 4),
        ];
        for s in &mut r {
            s.pages *= 2;
        }
        let mut sim = Sim::new(snapshot(r, vec![waiting(&w, 9, 0, 4)], 0), limits);
        let mut budget = limits.max_batch_tokens;
        run_running(&mut sim, &mut budget);
        assert_eq!(
            sim.decisions,
            [
                Decision::Preempt(SeqId(3)),
                run(1, 1),
                Decision::Preempt(SeqId(2))
            ]
        );
        let line: Vec<SeqId> = sim.waiting.iter().map(|s| s.id).collect();
        assert_eq!(line, [SeqId(2), SeqId(3), SeqId(9)]);
        assert!(
            sim.waiting
                .iter()
                .take(2)
                .all(|s| s.computed == 0 && s.pages == 0)
        );
        assert_eq!(sim.free, 4);
    }

    #[test]
    fn the_least_served_tenant_is_admitted_first() {
        let w = world();
        let mut s = Scheduler::new(limits());
        s.charge(&w.tenants[0], 100, 0);
        s.charge(&w.tenants[1], 10, 0);
        let q = vec![
            waiting(&w, 1, 0, 4),
            waiting(&w, 2, 1, 4),
            waiting(&w, 3, 0, 4),
            waiting(&w, 4, 1, 4),
            waiting(&w, 5, 2, 4),
        ];
        // t2 (never served), then t1 in line order, then t0; max_running cuts the last.
        assert_eq!(
            plan(&s, snapshot(vec![], q.clone(), 64)),
            [
                admit(5, 4, 4),
                admit(2, 4, 4),
                admit(4, 4, 4),
                admit(1, 4, 4)
            ]
        );
        // Equal counters: the smaller tenant name first.
        let s = Scheduler::new(limits());
        assert_eq!(
            plan(&s, snapshot(vec![], q[1..3].to_vec(), 64)),
            [admit(3, 4, 4), admit(2, 4, 4)]
        );
    }

    #[test]
    fn a_returning_idle_tenant_is_lifted_but_a_backlogged_one_keeps_its_deficit() {
        let w = world();
        let mut s = Scheduler::new(limits());
        let (t0, t1) = (&w.tenants[0], &w.tenants[1]);
        s.charge(t0, 50, 0);
        s.on_arrival(t1, [t0].into_iter());
        assert_eq!(
            s.fairness().counter(t1),
            50.0,
            "idle: lifted to the active floor"
        );
        s.charge(t0, 50, 0);
        s.on_arrival(t1, [t0, t1].into_iter());
        assert_eq!(s.fairness().counter(t1), 50.0, "backlogged: not lifted");
    }

    #[test]
    fn sequences_whose_adapter_is_not_loaded_wait_without_blocking_others() {
        let w = world();
        let s = Scheduler::new(limits());
        let q = vec![on(waiting(&w, 1, 1, 4), &w, 0), waiting(&w, 2, 0, 4)];
        let mut snap = snapshot(vec![], q, 64);
        let loading = AdapterState {
            host_ready: false,
            ..host_only(2)
        };
        snap.adapters = HashMap::from([(&w.keys[0], loading)]);
        assert_eq!(plan(&s, snap), [admit(2, 4, 4)]);
    }

    #[test]
    fn admitting_places_the_adapter_and_makes_room_least_recently_used_first() {
        let w = world();
        let s = Scheduler::new(limits());
        // 3 pages of a0, then 2 of KV for the first chunk: the older idle adapter goes.
        let mut snap = snapshot(vec![], vec![on(waiting(&w, 1, 0, 8), &w, 0)], 3);
        snap.adapters = HashMap::from([
            (&w.keys[0], host_only(3)),
            (&w.keys[1], AdapterState::resident(2, 1)),
            (&w.keys[2], AdapterState::resident(2, 2)),
        ]);
        assert_eq!(
            plan(&s, snap),
            [
                Decision::Place(w.keys[0].clone()),
                Decision::Evict(w.keys[1].clone()),
                admit(1, 8, 8)
            ]
        );
        // Its own idle pages are no room for it: it will use them.
        let mut snap = snapshot(vec![], vec![on(waiting(&w, 1, 0, 8), &w, 1)], 2);
        snap.adapters = HashMap::from([(&w.keys[1], AdapterState::resident(2, 1))]);
        assert_eq!(plan(&s, snap), []);
    }

    #[test]
    fn a_request_that_could_never_fit_is_refused_and_the_next_admitted() {
        let w = world();
        let s = Scheduler::new(Limits {
            pool_pages: 16,
            ..limits()
        });
        let huge = SeqState {
            max_tokens: 100,
            ..waiting(&w, 1, 0, 10)
        };
        let refuse = Decision::Refuse {
            seq: SeqId(1),
            kv_pages: 28,
            adapter_pages: 0,
        };
        let q = vec![on(huge, &w, 0), waiting(&w, 2, 0, 8)];
        // a0 is resident and idle; the next admission's first chunk needs its pages.
        let adapters = |unloading| {
            HashMap::from([(
                &w.keys[0],
                AdapterState {
                    unloading,
                    ..AdapterState::resident(3, 1)
                },
            )])
        };
        let mut snap = snapshot(vec![], q.clone(), 1);
        snap.adapters = adapters(false);
        assert_eq!(
            plan(&s, snap),
            [
                refuse.clone(),
                Decision::Evict(w.keys[0].clone()),
                admit(2, 8, 8)
            ]
        );
        // Being unloaded, a0 goes with its last request: its pages are simply free.
        let mut snap = snapshot(vec![], q, 1);
        snap.adapters = adapters(true);
        assert_eq!(plan(&s, snap), [refuse, admit(2, 8, 8)]);
    }

    #[test]
    fn imported_prompts_reserve_their_pages_and_decode_one_token() {
        let w = world();
        let s = Scheduler::new(limits());
        let imported = SeqState {
            importing: true,
            ..waiting(&w, 1, 0, 12)
        };
        assert_eq!(
            plan(
                &s,
                snapshot(vec![], vec![imported, waiting(&w, 2, 0, 40)], 64)
            ),
            [admit(1, 1, 13), admit(2, 8, 8)]
        );
    }

    #[test]
    fn running_is_capped_and_admissions_can_resume_with_the_budget_left() {
        let w = world();
        let s = Scheduler::new(Limits {
            max_running: 2,
            ..limits()
        });
        let r = vec![running(&w, 1, 0, 9, 8)];
        let q = vec![waiting(&w, 2, 0, 20), waiting(&w, 3, 0, 4)];
        assert_eq!(
            plan(&s, snapshot(r.clone(), q.clone(), 64)),
            [run(1, 1), admit(2, 8, 8)]
        );
        assert_eq!(
            s.plan_admissions(snapshot(r, q, 64), 5).decisions,
            [admit(2, 5, 5)]
        );
    }
}
