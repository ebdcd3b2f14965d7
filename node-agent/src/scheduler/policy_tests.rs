//! The policy's unit tests, with plain data (no model, no pages except where the prefix
//! cache needs real blocks).

use std::collections::HashMap;

use super::*;
use crate::memory::prefix::{BlockHash, PrefixCache};
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
        adapters: &[],
        tokens: prompt,
        prompt_len: prompt,
        max_tokens: 4,
        computed: 0,
        pages: 0,
        shared_pages: 0,
        prefix: &[],
        admitted: 0,
        importing: false,
        import_cached: 0,
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
    s.adapters = std::slice::from_ref(&w.keys[adapter]);
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
        cache: None,
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
        cached: 0,
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
    // Its adapter counts whole, resident or not.
    let refuse = Decision::Refuse {
        seq: SeqId(1),
        kv_pages: 28,
        adapter_pages: 3,
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
fn a_composition_counts_its_resident_adapters_when_judging_whether_it_can_ever_fit() {
    let w = world();
    let s = Scheduler::new(limits());
    // 28 KV pages at its longest, a0 resident (20 pages, idle), a1 loaded but not placed (20):
    // 68 pages in a pool of 64. Counting only the pages still to place (20) would admit it, and
    // it could then only thrash.
    let both = SeqState {
        adapters: &w.keys[..2],
        max_tokens: 100,
        ..waiting(&w, 1, 0, 10)
    };
    let mut snap = snapshot(vec![], vec![both], 44);
    snap.adapters = HashMap::from([
        (&w.keys[0], AdapterState::resident(20, 1)),
        (&w.keys[1], host_only(20)),
    ]);
    assert_eq!(
        plan(&s, snap),
        [Decision::Refuse {
            seq: SeqId(1),
            kv_pages: 28,
            adapter_pages: 40,
        }]
    );
}

#[test]
fn imported_prompts_reserve_their_pages_and_decode_one_token() {
    let w = world();
    let s = Scheduler::new(limits());
    let imported = SeqState {
        importing: true,
        import_cached: 0,
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

/// A cache of one-page blocks (one layer): `chain`'s first `held` blocks held by the
/// returned guards, the rest of its first `cached` idle, released at `stamp`.
fn cache_with(
    pool: &crate::memory::pool::PageAllocator,
    chain: &[BlockHash],
    cached: usize,
    stamp: u64,
) -> PrefixCache {
    let mut cache = PrefixCache::new(1);
    let blocks = chain
        .iter()
        .take(cached)
        .enumerate()
        .map(|(d, k)| {
            let p = pool.allocate(1, crate::memory::pool::PageKind::Kv).unwrap();
            cache.insert(*k, p, d)
        })
        .collect();
    cache.release(blocks, stamp);
    cache
}

fn chain(n: usize) -> Vec<BlockHash> {
    let mut key = BlockHash::root(&[b"t0"]);
    (0..n)
        .map(|b| {
            key = key.next(&[b as u32]);
            key
        })
        .collect()
}

#[test]
fn cached_prefixes_are_reused_and_the_last_token_is_always_computed() {
    let w = world();
    let s = Scheduler::new(limits());
    let pool = crate::memory::pool::PageAllocator::new(64);
    let keys = chain(4);
    let cache = cache_with(&pool, &keys, 3, 1);
    // 12 tokens: three full blocks are cached, but the last token must be computed, so two
    // are reused and the third block is recomputed.
    let mut a = waiting(&w, 1, 0, 12);
    a.prefix = &keys[..3];
    // 14 tokens: three reused, two computed.
    let mut b = waiting(&w, 2, 0, 14);
    b.prefix = &keys[..3];
    let mut snap = snapshot(vec![], vec![a, b], 61);
    snap.cache = Some(&cache);
    assert_eq!(
        plan(&s, snap),
        [
            Decision::Admit {
                seq: SeqId(1),
                tokens: 4,
                reserve: 12,
                cached: 2
            },
            Decision::Admit {
                seq: SeqId(2),
                tokens: 2,
                reserve: 14,
                cached: 3
            },
        ]
    );
    // A different prefix (another tenant, salt or adapter digest) shares no key.
    let mut other = waiting(&w, 3, 1, 12);
    let theirs: Vec<BlockHash> = chain(3).iter().map(|k| k.next(&[9])).collect();
    other.prefix = &theirs;
    let mut snap = snapshot(vec![], vec![other], 61);
    snap.cache = Some(&cache);
    assert_eq!(plan(&s, snap), [admit(3, 8, 8)]);
}

#[test]
fn idle_blocks_and_idle_adapters_are_evicted_in_one_lru_order() {
    let w = world();
    let s = Scheduler::new(limits());
    let pool = crate::memory::pool::PageAllocator::new(64);
    let keys = chain(2);
    // Two idle blocks released at stamp 4 (the deeper goes first), adapters used at 3 and
    // 5, and three decodes that each need a page of a full pool.
    let cache = cache_with(&pool, &keys, 2, 4);
    let r = vec![
        running(&w, 1, 0, 9, 8),
        running(&w, 2, 1, 9, 8),
        running(&w, 3, 2, 9, 8),
        running(&w, 4, 3, 9, 8),
    ];
    let mut snap = snapshot(r, vec![], 0);
    snap.adapters = HashMap::from([
        (&w.keys[0], AdapterState::resident(1, 5)),
        (&w.keys[1], AdapterState::resident(1, 3)),
    ]);
    snap.cache = Some(&cache);
    assert_eq!(
        plan(&s, snap),
        [
            Decision::Evict(w.keys[1].clone()),
            run(1, 1),
            Decision::EvictBlock(keys[1]),
            run(2, 1),
            Decision::EvictBlock(keys[0]),
            run(3, 1),
            Decision::Evict(w.keys[0].clone()),
            run(4, 1),
        ]
    );
}

#[test]
fn reused_idle_blocks_are_no_room_for_their_own_admission() {
    let w = world();
    let s = Scheduler::new(limits());
    let pool = crate::memory::pool::PageAllocator::new(64);
    let keys = chain(2);
    let cache = cache_with(&pool, &keys, 2, 1);
    // 12 tokens reusing two idle blocks: one more block and one for the next token. With
    // one free page the idle blocks it reuses cannot be evicted to make room.
    let mut a = waiting(&w, 1, 0, 12);
    a.prefix = &keys;
    let mut snap = snapshot(vec![], vec![a.clone()], 1);
    snap.cache = Some(&cache);
    assert_eq!(plan(&s, snap), []);
    // Someone else's idle blocks are room (the prefix's tail goes first).
    let mut snap = snapshot(vec![], vec![waiting(&w, 2, 0, 8)], 1);
    snap.cache = Some(&cache);
    assert_eq!(
        plan(&s, snap),
        [Decision::EvictBlock(keys[1]), admit(2, 8, 8)]
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
