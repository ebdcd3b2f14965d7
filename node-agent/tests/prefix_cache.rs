//! Prefix caching in the engine beyond numerics (which `engine_oracle.rs` checks): what a
//! cached block is keyed by (the adapter's weights, the tenant, the request's salt), what the
//! usage reports, and how cached blocks live in the unified pool — evicted before any running
//! request is preempted, and gone without a trace once cleared.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::{
    AdapterUse, Engine, EngineConfig, Event, FinishReason, PrefixCaching, Request, SamplingParams,
    Usage,
};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::{self, AdapterLimits};
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::config::Arch;
use tokio::sync::mpsc::unbounded_channel;

/// 40 tokens: two full blocks of 16 can be reused, the rest is always computed.
fn prompt() -> Vec<u32> {
    (0..40).map(|i| (i * 37 + 11) % 500).collect()
}

struct World {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapters: Vec<PathBuf>,
}

fn world(adapters: usize) -> World {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 3,
        shards: 1,
    };
    model::write(&spec, &model).unwrap();
    let adapters = (0..adapters)
        .map(|i| {
            let out = dir.path().join(format!("adapter-{i}"));
            let spec = AdapterSpec {
                rank: 8,
                alpha: 16.0,
                targets: Module::ALL.to_vec(),
                rank_pattern: BTreeMap::new(),
                alpha_pattern: BTreeMap::new(),
                rslora: false,
                dtype: FixtureDtype::F32,
                seed: 40 + i as u64,
            };
            adapter::write(&spec, &model, &out).unwrap();
            out
        })
        .collect();
    World {
        _dir: dir,
        model,
        adapters,
    }
}

fn engine(w: &World, config: EngineConfig) -> Engine<CpuBackend> {
    Engine::new(CpuBackend, &w.model, config).unwrap()
}

/// Loads (or re-points) `tenant`'s adapter `name` at `dir`, as the actor would.
fn load(e: &mut Engine<CpuBackend>, tenant: &str, name: &str, dir: &Path) {
    let key = AdapterKey::new(tenant, name);
    let model = e.model_config().clone();
    match e
        .begin_adapter_load(key.clone(), dir.to_owned(), None, false)
        .unwrap()
    {
        loraplane_agent::engine::LoadWait::Load => {
            let (_, source) = e.take_pending_loads().pop().unwrap();
            e.finish_adapter_load(&key, host::load(&source, &model, &AdapterLimits::default()))
                .unwrap();
        }
        // The same source again: re-read it, as the actor does (changed files replace).
        loraplane_agent::engine::LoadWait::Verify => {
            let read = host::load(dir, &model, &AdapterLimits::default());
            e.finish_adapter_verify(&key, dir, read).unwrap();
        }
    }
}

struct Ask<'a> {
    tenant: &'a str,
    /// Its adapters, `(name, scale)` (none: the base model).
    adapters: Vec<(&'a str, f32)>,
    salt: Option<&'a str>,
    prompt: Vec<u32>,
    max_tokens: usize,
}

fn ask<'a>(tenant: &'a str, adapter: Option<&'a str>) -> Ask<'a> {
    Ask {
        tenant,
        adapters: adapter.map(|name| (name, 1.0)).into_iter().collect(),
        salt: None,
        prompt: prompt(),
        max_tokens: 4,
    }
}

fn request(id: usize, a: &Ask<'_>) -> Request {
    Request {
        id: format!("r{id}"),
        tenant: TenantId(a.tenant.to_owned()),
        adapters: a
            .adapters
            .iter()
            .map(|&(name, scale)| AdapterUse {
                name: name.to_owned(),
                scale,
            })
            .collect(),
        prompt: a.prompt.clone(),
        params: SamplingParams {
            max_tokens: a.max_tokens,
            ignore_eos: true,
            logprobs: true,
            ..SamplingParams::default()
        },
        cache_salt: a.salt.map(str::to_owned),
    }
}

/// Runs requests to completion, all submitted at once; returns each one's tokens, log-probs
/// and usage.
fn run(e: &mut Engine<CpuBackend>, asks: &[Ask<'_>]) -> Vec<(Vec<u32>, Vec<f32>, Usage)> {
    let streams: Vec<_> = asks
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (tx, rx) = unbounded_channel();
            e.submit(request(i, a), tx).unwrap();
            rx
        })
        .collect();
    while e.has_work() {
        e.step().unwrap();
    }
    streams
        .into_iter()
        .map(|mut rx| {
            let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
            loop {
                match rx.try_recv().unwrap() {
                    Event::Token { id, logprob, .. } => {
                        tokens.push(id);
                        logprobs.push(logprob.unwrap());
                    }
                    Event::Finished { reason, usage, .. } => {
                        assert_eq!(reason, FinishReason::Length);
                        return (tokens, logprobs, usage);
                    }
                }
            }
        })
        .collect()
}

fn one(e: &mut Engine<CpuBackend>, a: Ask<'_>) -> (Vec<u32>, Vec<f32>, Usage) {
    run(e, &[a]).pop().unwrap()
}

#[test]
fn a_reloaded_adapter_never_reuses_the_blocks_of_its_old_weights() {
    let w = world(2);
    let mut e = engine(&w, EngineConfig::default());
    load(&mut e, "default", "x", &w.adapters[0]);
    let first = one(&mut e, ask("default", Some("x")));
    assert_eq!(first.2.cached_prompt_tokens, 0);
    let again = one(&mut e, ask("default", Some("x")));
    assert_eq!(again.2.cached_prompt_tokens, 32, "two blocks reused");
    assert_eq!((&again.0, &again.1), (&first.0, &first.1));

    // New weights under the same name: nothing of the old blocks is reused, and the output is
    // the new weights' own.
    load(&mut e, "default", "x", &w.adapters[1]);
    let reloaded = one(&mut e, ask("default", Some("x")));
    assert_eq!(reloaded.2.cached_prompt_tokens, 0);
    let mut fresh = engine(&w, EngineConfig::default());
    load(&mut fresh, "default", "x", &w.adapters[1]);
    let expected = one(&mut fresh, ask("default", Some("x")));
    assert_eq!((&reloaded.0, &reloaded.1), (&expected.0, &expected.1));
    assert_ne!(reloaded.0, first.0, "the two adapters differ");

    // Blocks are keyed by content: the first weights again find their blocks.
    load(&mut e, "default", "x", &w.adapters[0]);
    let back = one(&mut e, ask("default", Some("x")));
    assert_eq!(back.2.cached_prompt_tokens, 32);
    assert_eq!(back.0, first.0);
}

#[test]
fn every_adapter_and_scale_of_a_composition_keys_its_blocks() {
    let w = world(2);
    let mut e = engine(&w, EngineConfig::default());
    let mut uncached = engine(
        &w,
        EngineConfig {
            prefix_caching: PrefixCaching::Off,
            ..EngineConfig::default()
        },
    );
    for engine in [&mut e, &mut uncached] {
        load(engine, "default", "x", &w.adapters[0]);
        load(engine, "default", "y", &w.adapters[1]);
    }
    let with = |uses: &[(&'static str, f32)]| Ask {
        adapters: uses.to_vec(),
        ..ask("default", None)
    };
    let plain = one(&mut e, ask("default", Some("x")));
    assert_eq!(plain.2.cached_prompt_tokens, 0);
    // `x` listed at scale 1 is `x` itself: the same blocks, the same output.
    let listed = one(&mut e, with(&[("x", 1.0)]));
    assert_eq!(listed.2.cached_prompt_tokens, 32);
    assert_eq!((&listed.0, &listed.1), (&plain.0, &plain.1));
    // Any other scale, set of adapters or order is other KV: nothing is reused the first
    // time, everything the second, and the output is what an engine without a cache gives.
    let compositions: [&[(&str, f32)]; 4] = [
        &[("x", 0.5)],
        &[("x", 1.0), ("y", 1.0)],
        &[("y", 1.0), ("x", 1.0)],
        &[("x", 1.0), ("y", 0.5)],
    ];
    for uses in compositions {
        let first = one(&mut e, with(uses));
        assert_eq!(first.2.cached_prompt_tokens, 0, "{uses:?}");
        let again = one(&mut e, with(uses));
        assert_eq!(again.2.cached_prompt_tokens, 32, "{uses:?}");
        let expected = one(&mut uncached, with(uses));
        assert_eq!((&first.0, &first.1), (&expected.0, &expected.1), "{uses:?}");
        assert_eq!((&again.0, &again.1), (&expected.0, &expected.1), "{uses:?}");
        assert_ne!(
            first.1, plain.1,
            "{uses:?} computes something else than x alone"
        );
    }
}

#[test]
fn tenants_salts_and_adapters_partition_the_cache() {
    let w = world(1);
    let mut e = engine(&w, EngineConfig::default());
    // Both tenants load the very same weights under the same name.
    load(&mut e, "a", "x", &w.adapters[0]);
    load(&mut e, "b", "x", &w.adapters[0]);
    let cached = |e: &mut Engine<CpuBackend>, a: Ask<'_>| one(e, a).2.cached_prompt_tokens;
    assert_eq!(cached(&mut e, ask("a", None)), 0);
    assert_eq!(cached(&mut e, ask("a", None)), 32);
    assert_eq!(cached(&mut e, ask("b", None)), 0, "another tenant's blocks");
    assert_eq!(
        cached(&mut e, ask("a", Some("x"))),
        0,
        "the base model's blocks"
    );
    assert_eq!(
        cached(&mut e, ask("b", Some("x"))),
        0,
        "another tenant's adapter"
    );
    assert_eq!(cached(&mut e, ask("b", Some("x"))), 32);
    let salted = |salt| Ask {
        salt: Some(salt),
        ..ask("a", None)
    };
    assert_eq!(cached(&mut e, salted("s1")), 0, "a salt partitions further");
    assert_eq!(cached(&mut e, salted("s1")), 32);
    assert_eq!(cached(&mut e, salted("s2")), 0);
    let stats = e.stats();
    assert_eq!(stats.prefix.hit_tokens, 3 * 32);
    assert_eq!(stats.prefix.queried_tokens, 9 * 40);

    // Off: nothing is cached, nothing reused.
    let mut off = engine(
        &w,
        EngineConfig {
            prefix_caching: PrefixCaching::Off,
            ..EngineConfig::default()
        },
    );
    for _ in 0..2 {
        assert_eq!(cached(&mut off, ask("a", None)), 0);
    }
    assert_eq!(off.stats().prefix.blocks, 0);
    assert_eq!(off.stats().pool.cached, 0);
}

/// Idle cached blocks and idle adapters are room: a request that needs their pages evicts
/// them, and nothing running is preempted for it. Clearing the cache restores the pool.
#[test]
fn under_pressure_idle_blocks_and_adapters_go_before_any_preemption() {
    let w = world(1);
    let pages = 80;
    let mut e = engine(
        &w,
        EngineConfig {
            num_pages: pages,
            ..EngineConfig::default()
        },
    );
    load(&mut e, "default", "x", &w.adapters[0]);
    let start = e.stats().pool;
    // Fill the cache: distinct prompts of 64 tokens (4 blocks of 2 layers each), one of them
    // on the adapter, which stays resident and idle after.
    let distinct =
        |seed: u32| -> Vec<u32> { (0..64).map(|i| (i * 13 + seed * 101) % 500).collect() };
    for seed in 0..5 {
        let a = Ask {
            prompt: distinct(seed),
            max_tokens: 1,
            ..ask("default", (seed == 0).then_some("x"))
        };
        one(&mut e, a);
    }
    let full = e.stats();
    assert!(full.pool.cached >= 24, "{:?}", full.pool);
    assert_eq!(full.device_resident.len(), 1, "the adapter stays resident");
    assert!(full.pool.free < 30, "{:?}", full.pool);

    // Two base requests that together need most of the pool: they only fit once idle
    // blocks and the idle adapter are evicted, and neither is preempted for it.
    let long = |seed: u32| Ask {
        prompt: distinct(seed + 10).repeat(3)[..150].to_vec(),
        max_tokens: 40,
        ..ask("default", None)
    };
    let out = run(&mut e, &[long(0), long(1)]);
    assert!(out.iter().all(|(tokens, _, _)| tokens.len() == 40));
    let after = e.stats();
    assert_eq!(
        after.preemptions, 0,
        "idle cached blocks and adapters are evicted before any preemption"
    );
    assert_eq!(
        after.adapter_device_evictions, 1,
        "the idle adapter made room"
    );
    assert!(after.pool.is_consistent(), "{:?}", after.pool);
    assert_eq!(after.pool.kv, 0);
    // Least recently used first: the adapter, then the blocks of its request (the oldest);
    // the later prompts' blocks are all still there.
    let again = |e: &mut Engine<CpuBackend>, seed: u32, adapter| {
        let a = Ask {
            prompt: distinct(seed),
            max_tokens: 1,
            ..ask("default", adapter)
        };
        one(e, a).2.cached_prompt_tokens
    };
    assert_eq!(again(&mut e, 4, None), 48);
    assert_eq!(again(&mut e, 1, None), 48);
    assert_eq!(again(&mut e, 0, Some("x")), 0, "evicted");

    e.trim();
    assert_eq!(
        e.stats().pool,
        start,
        "the accounting returns to its baseline"
    );
    assert_eq!(e.stats().prefix.blocks, 0);
}

/// A decode agent's pin (before a remote prefill) holds the prompt's cached blocks: clearing
/// the cache leaves them, a submission hands them to the request, which reuses them at
/// admission, and unpinning lets go of what no request took.
#[test]
fn pinned_blocks_stay_until_the_request_takes_them_or_lets_go() {
    let w = world(1);
    let mut e = engine(&w, EngineConfig::default());
    load(&mut e, "default", "x", &w.adapters[0]);
    let start = e.stats().pool;
    one(&mut e, ask("default", Some("x")));
    assert_eq!(e.stats().prefix.blocks, 2);

    // Another tenant's request, or the base model, finds nothing of them to pin.
    assert_eq!(e.pin_prefix(&request(7, &ask("other", None))), 0);
    assert_eq!(e.pin_prefix(&request(8, &ask("default", None))), 0);
    // The same prompt and adapter: both full blocks (40 tokens leave the last one computed).
    let pinned = request(9, &ask("default", Some("x")));
    assert_eq!(e.pin_prefix(&pinned), 2);
    assert_eq!(e.clear_prefix_cache(), 0, "pinned blocks are not idle");
    e.unpin(&pinned.id);
    assert_eq!(e.clear_prefix_cache(), 2, "unpinned, they are idle again");

    // Cached again, pinned, then submitted: the request reuses them.
    one(&mut e, ask("default", Some("x")));
    assert_eq!(e.pin_prefix(&pinned), 2);
    let (tx, mut rx) = unbounded_channel();
    e.submit(pinned, tx).unwrap();
    e.unpin("r9"); // as the decode router does after a submission: nothing left to let go of
    assert_eq!(e.clear_prefix_cache(), 0, "the waiting request holds them");
    while e.has_work() {
        e.step().unwrap();
    }
    let usage = loop {
        if let Event::Finished { usage, .. } = rx.try_recv().unwrap() {
            break usage;
        }
    };
    assert_eq!(usage.cached_prompt_tokens, 32);

    e.trim();
    assert_eq!(
        e.stats().pool,
        start,
        "the accounting returns to its baseline"
    );
    assert_eq!(e.stats().prefix.blocks, 0);
}
