//! The scheduler against the real allocator and prefix cache: random states are planned, and
//! the plans applied to a real [`PageAllocator`], real [`SeqKv`]s and a real [`PrefixCache`].
//! Every reservation, placement, eviction and reuse the plan makes must succeed exactly as the
//! plan's arithmetic said, and the plan must keep the step's budgets.

use std::collections::HashMap;

use crate::lora::ids::{AdapterKey, TenantId};
use crate::memory::kv::{KvGeometry, SeqKv};
use crate::memory::pool::{PageAllocator, PageKind, Pages};
use crate::memory::prefix::{BlockHash, PrefixCache};
use crate::scheduler::{AdapterState, Decision, Limits, Scheduler, SeqId, SeqState, Snapshot};

const BLOCK: usize = 4;
const CHAINS: usize = 3;
const CHAIN_BLOCKS: usize = 8;

#[test]
fn plans_hold_on_the_real_allocator_and_prefix_cache() {
    let geometry = KvGeometry {
        num_layers: 2,
        block_size: BLOCK,
        num_kv_heads: 1,
        head_dim: 8,
        page_elems: 64,
    };
    let tenants: Vec<TenantId> = (0..3).map(|i| TenantId(format!("t{i}"))).collect();
    let keys: Vec<AdapterKey> = (0..4)
        .map(|i| AdapterKey::new("t", &format!("a{i}")))
        .collect();
    // Block keys of a few prefixes the sequences share.
    let chains: Vec<Vec<BlockHash>> = (0..CHAINS)
        .map(|c| {
            let mut key = BlockHash::root(&[&[c as u8]]);
            (0..CHAIN_BLOCKS)
                .map(|b| {
                    key = key.next(&[b as u32]);
                    key
                })
                .collect()
        })
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let (mut preemptions, mut admissions, mut evictions) = (0, 0, 0);
    let (mut block_evictions, mut reused) = (0, 0);
    for _ in 0..2_000 {
        let total = 10 + rand(30);
        let limits = Limits {
            max_batch_tokens: 1 + rand(40),
            max_prefill_chunk: 1 + rand(12),
            max_running: 1 + rand(6),
            pool_pages: total,
            block_size: BLOCK,
            num_layers: 2,
        };
        let pool = PageAllocator::new(total as u32);
        let mut scheduler = Scheduler::new(limits);
        for t in &tenants {
            scheduler.charge(t, rand(50), rand(5));
        }
        let mut cache = PrefixCache::new(geometry.num_layers);
        let mut stamp = 0u64;
        // Some prefixes are cached, their blocks idle (stamped like adapters' last uses); in
        // half the states none are, so that memory runs out the old way too.
        let cached_chains = if rand(2) == 0 { CHAINS } else { 0 };
        for chain in &chains[..cached_chains] {
            let depth = rand(5);
            let mut blocks = Vec::new();
            for (d, key) in chain.iter().take(depth).enumerate() {
                let Some(p) = pool.allocate(geometry.num_layers, PageKind::Kv) else {
                    break;
                };
                blocks.push(cache.insert(*key, p, d));
            }
            stamp += 1 + rand(4) as u64;
            cache.release(blocks, stamp);
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
            // Some running sequences read cached blocks of a prefix.
            let chain = &chains[rand(CHAINS)];
            let shared: Vec<_> = chain
                .iter()
                .take(computed / BLOCK)
                .take(rand(3))
                .map_while(|k| cache.acquire(k))
                .collect();
            let mut seq_kv = SeqKv::with_shared(&pool, geometry, shared);
            if !seq_kv.reserve(computed) {
                stamp += 1;
                cache.release(seq_kv.into_shared(), stamp);
                continue;
            }
            // Base model, one adapter, or two or three composed (a window of `keys`), all
            // resident: it runs.
            let from = rand(keys.len());
            let window = &keys[from..(from + 1 + rand(3)).min(keys.len())];
            let adapters: &[AdapterKey] =
                if rand(2) == 0 && window.iter().all(|k| adapter_pages.contains_key(k)) {
                    window
                } else {
                    &[]
                };
            let id = SeqId(i as u64);
            running.push(SeqState {
                id,
                tenant: &tenants[rand(3)],
                adapters,
                tokens,
                prompt_len: tokens - rand(tokens),
                max_tokens: 1 + rand(20),
                computed,
                pages: seq_kv.pages(),
                shared_pages: seq_kv.shared_pages(),
                prefix: &chain[..(tokens / BLOCK).min(CHAIN_BLOCKS)],
                admitted: i as u64,
                importing: false,
                import_cached: 0,
            });
            kv.insert(id, seq_kv);
        }
        let waiting: Vec<SeqState<'_>> = (0..rand(7))
            .map(|i| {
                let tokens = 1 + rand(30);
                let chain = &chains[rand(CHAINS)];
                let from = rand(keys.len());
                let window = &keys[from..(from + 1 + rand(3)).min(keys.len())];
                SeqState {
                    id: SeqId(100 + i as u64),
                    tenant: &tenants[rand(3)],
                    adapters: if rand(2) == 0 { window } else { &[] },
                    tokens,
                    prompt_len: tokens,
                    max_tokens: 1 + rand(40),
                    computed: 0,
                    pages: 0,
                    shared_pages: 0,
                    prefix: &chain[..(tokens / BLOCK).min(CHAIN_BLOCKS)],
                    admitted: 0,
                    importing: rand(5) == 0,
                    import_cached: 0,
                }
            })
            .collect();
        let snapshot = Snapshot {
            running: running.clone(),
            waiting: waiting.clone(),
            adapters: adapters.clone(),
            free_pages: pool.free_pages(),
            cache: Some(&cache),
        };
        let plan = scheduler.plan(snapshot);

        // Apply it to the real pool and cache.
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
                    let uses = live.iter().filter(|id| seq(**id).adapters.contains(k));
                    assert_eq!(uses.count(), 0, "evicted {k} while in use");
                    assert!(adapter_pages.remove(k).is_some());
                    evictions += 1;
                }
                Decision::EvictBlock(h) => {
                    assert!(cache.evict(h), "{h:?} is not an idle cached block");
                    block_evictions += 1;
                }
                Decision::Preempt(id) => {
                    let gone = kv.remove(id).unwrap();
                    stamp += 1;
                    cache.release(gone.into_shared(), stamp);
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
                    cached,
                } => {
                    let s = seq(*id);
                    for k in s.adapters {
                        assert!(adapter_pages.contains_key(k), "{k} not resident");
                    }
                    assert!(
                        *cached * BLOCK < s.tokens,
                        "{d:?}: its last token must be computed"
                    );
                    let shared: Vec<_> = s.prefix[..*cached]
                        .iter()
                        .map(|k| cache.acquire(k).expect("a reused block is cached"))
                        .collect();
                    reused += cached;
                    let mut seq_kv = SeqKv::with_shared(&pool, geometry, shared);
                    assert!(seq_kv.reserve(*reserve), "{d:?}");
                    assert!(*reserve <= s.tokens + 1 && *reserve >= cached * BLOCK + tokens);
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
        // Everything lets go: the cache's blocks go idle, and clearing it restores the pool.
        for (_, k) in kv.drain() {
            stamp += 1;
            cache.release(k.into_shared(), stamp);
        }
        assert!(cache.is_consistent());
        cache.clear_idle();
        adapter_pages.clear();
        assert_eq!(pool.free_pages(), total, "the pool returns to its baseline");
    }
    // The random states exercise every path.
    assert!(
        preemptions > 30
            && admissions > 500
            && evictions > 50
            && block_evictions > 50
            && reused > 200,
        "{preemptions} preemptions, {admissions} admissions, {evictions} adapter evictions, \
         {block_evictions} block evictions, {reused} blocks reused"
    );
}
