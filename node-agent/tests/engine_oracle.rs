//! The engine against the oracle: paged, chunked, heterogeneous multi-LoRA batches on the CPU
//! must produce exactly the greedy tokens of candle-transformers' reference model run on
//! weights with each request's adapter merged in (`W + s·BA`), and logits within
//! [`LOGIT_TOL`].
//!
//! Tolerance: both sides compute in f32 but sum in different orders (paged attention, separate
//! LoRA path, GEMM blocking), so logits may differ by float rounding that grows with depth;
//! 2e-3 absolute on logits of magnitude ~10 is far below any real bug (a wrong scale, rank or
//! index moves logits by O(0.1–1)) and above accumulated rounding.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

#[path = "support/workload.rs"]
mod workload;

#[path = "support/oracle.rs"]
mod oracle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use workload::{Case, Workload, request, workload};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::{
    Engine, EngineConfig, Event, FinishReason, KvImport, KvLayer, PrefixCaching,
};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::model::config::Arch;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const LOGIT_TOL: f32 = 2e-3;
const MAX_NEW: usize = 8;
/// The small-pool run generates longer, so decodes outgrow their pages and must preempt.
const MAX_NEW_LONG: usize = 24;
const ADAPTERS: usize = 16;

struct World {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapters: Vec<PathBuf>,
    cases: Vec<Case>,
    expected: HashMap<String, oracle::OracleRun>,
    /// The base model's output on each adapter case's prompt.
    base_on_prompt: HashMap<String, oracle::OracleRun>,
}

fn world(arch: Arch, dtype: FixtureDtype) -> World {
    world_with_prefix(arch, dtype, &[])
}

/// The workload with `prefix` put before every case's prompt (a shared system prompt).
fn world_with_prefix(arch: Arch, dtype: FixtureDtype, prefix: &[u32]) -> World {
    let Workload {
        dir,
        model,
        adapters,
        mut cases,
    } = workload(arch, dtype, ADAPTERS);
    for case in &mut cases {
        case.prompt.splice(0..0, prefix.iter().copied());
    }
    let mut expected = HashMap::new();
    for case in &cases {
        let merged = dir.path().join(format!("merged-{}", case.id));
        let merge: Vec<(&Path, f32)> = case
            .adapters
            .iter()
            .map(|&(i, scale)| (adapters[i].as_path(), scale))
            .collect();
        oracle::merge_adapters(&model, &merge, &merged).unwrap();
        expected.insert(
            case.id.clone(),
            oracle::greedy(&merged, &case.prompt, MAX_NEW_LONG).unwrap(),
        );
    }
    let base = dir.path().join("merged-base");
    oracle::merge_adapter(&model, None, &base).unwrap();
    let base_on_prompt = cases
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                oracle::greedy(&base, &c.prompt, MAX_NEW).unwrap(),
            )
        })
        .collect();
    World {
        _dir: dir,
        model,
        adapters,
        cases,
        expected,
        base_on_prompt,
    }
}

/// Runs the workload: cases with `arrive_at[i] = s` are submitted before step `s`.
fn engine(w: &World, config: EngineConfig) -> Engine<CpuBackend> {
    workload::engine(CpuBackend, &w.model, &w.adapters, config)
}

fn run(
    e: &mut Engine<CpuBackend>,
    w: &World,
    arrive_at: &[usize],
    max_new: usize,
) -> HashMap<String, (Vec<u32>, Vec<Vec<f32>>)> {
    let start = e.stats().pool;
    let out = run_keeping_cache(e, w, arrive_at, max_new);
    e.trim();
    assert_eq!(
        e.stats().pool,
        start,
        "the pool returns to where it started"
    );
    assert!(e.stats().host_cache_used <= e.stats().host_cache_capacity);
    out
}

/// As [`run`], leaving idle adapters and cached blocks in the pool for the next run.
fn run_keeping_cache(
    e: &mut Engine<CpuBackend>,
    w: &World,
    arrive_at: &[usize],
    max_new: usize,
) -> HashMap<String, (Vec<u32>, Vec<Vec<f32>>)> {
    let mut streams: Vec<(String, UnboundedReceiver<Event>)> = Vec::new();
    let mut step = 0;
    loop {
        for (case, _) in w.cases.iter().zip(arrive_at).filter(|(_, s)| **s == step) {
            let (tx, rx) = unbounded_channel();
            e.submit(request(case, max_new), tx).unwrap();
            streams.push((case.id.clone(), rx));
        }
        let pending = arrive_at.iter().any(|s| *s > step);
        if !e.has_work() && !pending {
            break;
        }
        e.step().unwrap();
        step += 1;
        assert!(step < 10_000, "the workload does not finish");
    }
    let mut out = HashMap::new();
    for (id, mut rx) in streams {
        let (mut tokens, mut logits) = (Vec::new(), Vec::new());
        let mut finished = false;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token { id, logits: l, .. } => {
                    tokens.push(id);
                    logits.push(l.unwrap());
                }
                Event::Finished { reason, usage, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    assert_eq!(usage.completion_tokens, max_new);
                    finished = true;
                }
            }
        }
        assert!(finished, "{id} never finished");
        out.insert(id, (tokens, logits));
    }
    let s = e.stats();
    assert_eq!(
        (s.running, s.waiting, s.pool.kv),
        (0, 0, 0),
        "every KV page is returned (or idle in the prefix cache)"
    );
    assert!(s.pool.is_consistent(), "{:?}", s.pool);
    out
}

/// Splitwise in-process: `p` computes every prompt and streams KV layer by layer; `d` imports
/// it and generates the rest.
fn run_disaggregated(
    p: &mut Engine<CpuBackend>,
    d: &mut Engine<CpuBackend>,
    w: &World,
    keep_prefill_cache: bool,
) -> HashMap<String, (Vec<u32>, Vec<Vec<f32>>)> {
    let (p_start, d_start) = (p.stats().pool, d.stats().pool);
    let mut pending = Vec::new();
    for case in &w.cases {
        let (tx, rx) = unbounded_channel();
        let (kv_tx, kv_rx) = unbounded_channel();
        p.submit_prefill(request(case, MAX_NEW), tx, kv_tx).unwrap();
        pending.push((case, rx, kv_rx));
    }
    while p.has_work() {
        p.step().unwrap();
    }
    let mut streams = Vec::new();
    for (case, mut rx, mut kv_rx) in pending {
        let mut layers: Vec<KvLayer> = Vec::new();
        while let Ok(l) = kv_rx.try_recv() {
            layers.push(l);
        }
        assert_eq!(
            layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            vec![0, 1],
            "layers in order"
        );
        let Some(Event::Token { id, logprob, .. }) = rx.try_recv().ok() else {
            panic!("no first token")
        };
        let import = KvImport {
            first_block: 0,
            layers: layers.into_iter().map(|l| l.data).collect(),
            first_token: id,
            first_logprob: logprob,
        };
        let (tx, rx) = unbounded_channel();
        d.submit_prefilled(request(case, MAX_NEW), tx, import)
            .unwrap();
        streams.push((case.id.clone(), rx));
    }
    assert_eq!(p.stats().pool.kv, 0, "the prefill side frees its KV");
    if !keep_prefill_cache {
        p.trim();
        assert_eq!(
            p.stats().pool,
            p_start,
            "and everything else once idle adapters and cached blocks go"
        );
    }
    while d.has_work() {
        d.step().unwrap();
    }
    let mut out = HashMap::new();
    for (id, mut rx) in streams {
        let mut tokens = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let Event::Token { id, .. } = ev {
                tokens.push(id);
            }
        }
        assert_eq!(tokens.len(), MAX_NEW);
        out.insert(id, (tokens, Vec::new()));
    }
    d.trim();
    assert_eq!(d.stats().pool, d_start, "the decode side frees everything");
    out
}

fn check(w: &World, got: &HashMap<String, (Vec<u32>, Vec<Vec<f32>>)>, label: &str) {
    for case in &w.cases {
        let want = &w.expected[&case.id];
        let (tokens, logits) = &got[&case.id];
        assert_eq!(
            tokens[..],
            want.tokens[..tokens.len()],
            "{label}: {} greedy tokens differ from the oracle",
            case.id
        );
        for (step, (a, b)) in logits.iter().zip(&want.logits).enumerate() {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= LOGIT_TOL,
                "{label}: {} step {step}: logits differ by {worst}",
                case.id
            );
        }
    }
}

fn config(chunk: usize, pages: usize) -> EngineConfig {
    EngineConfig {
        num_pages: pages,
        max_batch_tokens: 64.max(chunk),
        max_prefill_chunk: chunk,
        ..EngineConfig::default()
    }
}

fn config_without_prefix_cache(chunk: usize, pages: usize) -> EngineConfig {
    EngineConfig {
        prefix_caching: PrefixCaching::Off,
        ..config(chunk, pages)
    }
}

fn suite(arch: Arch, dtype: FixtureDtype) {
    let w = world(arch, dtype);
    // Adapters must matter, or the comparison proves nothing about LoRA: every adapter moves
    // the logits, and most change the greedy tokens.
    let mut changed_tokens = 0;
    for case in w.cases.iter().filter(|c| !c.adapters.is_empty()) {
        let (with, without) = (&w.expected[&case.id], &w.base_on_prompt[&case.id]);
        changed_tokens += usize::from(with.tokens[..MAX_NEW] != without.tokens[..]);
        let moved = with.logits[0]
            .iter()
            .zip(&without.logits[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            moved > 0.1,
            "{arch}: adapter of {} barely moves the logits ({moved})",
            case.id
        );
    }
    assert!(
        changed_tokens >= ADAPTERS / 2,
        "{arch}: only {changed_tokens} adapters change the tokens"
    );

    let together = vec![0; w.cases.len()];
    for chunk in [1, 7, 64] {
        let mut e = engine(&w, config_without_prefix_cache(chunk, 2048));
        let got = run(&mut e, &w, &together, MAX_NEW);
        check(&w, &got, &format!("{arch} chunk {chunk}"));
    }

    // Requests arriving while others decode.
    let staggered: Vec<usize> = (0..w.cases.len()).map(|i| (i % 6) * 3).collect();
    let mut e = engine(&w, config(16, 2048));
    let got = run(&mut e, &w, &staggered, MAX_NEW);
    check(&w, &got, &format!("{arch} staggered"));

    // Disaggregated: prompts on one engine, KV streamed layer by layer into another.
    let (mut p, mut d) = (engine(&w, config(7, 2048)), engine(&w, config(16, 2048)));
    let got = run_disaggregated(&mut p, &mut d, &w, false);
    check(&w, &got, &format!("{arch} disaggregated"));

    // A pool so small that decodes must preempt (and adapters be evicted).
    let mut e = engine(&w, config(16, 100));
    let got = run(&mut e, &w, &together, MAX_NEW_LONG);
    let stats = e.stats();
    assert!(
        stats.preemptions > 0,
        "{arch}: the small pool must force preemption"
    );
    assert!(
        stats.adapter_device_evictions > 0,
        "{arch}: and adapter evictions"
    );
    // docs/performance-targets.md §2.6: the unified pool is (nearly) full before anything is
    // preempted — idle adapters are evicted first, and no page is held back for either kind.
    let utilisation = stats.utilisation_at_first_preemption.unwrap();
    eprintln!("{arch}: pool utilisation at the first preemption {utilisation:.3}");
    assert!(
        utilisation >= 0.95,
        "{arch}: the first preemption came at {utilisation:.3} pool utilisation"
    );
    check(&w, &got, &format!("{arch} preempted"));
}

#[test]
fn llama_matches_the_oracle() {
    suite(Arch::Llama, FixtureDtype::F32);
}

#[test]
fn qwen2_matches_the_oracle() {
    suite(Arch::Qwen2, FixtureDtype::F32);
}

#[test]
fn mistral_matches_the_oracle() {
    suite(Arch::Mistral, FixtureDtype::F32);
}

/// bf16 and f16 checkpoints: both sides upcast the stored weights to f32, so the same
/// tolerances hold.
#[test]
fn low_precision_checkpoints_match_the_oracle() {
    suite(Arch::Llama, FixtureDtype::Bf16);
    suite(Arch::Qwen2, FixtureDtype::F16);
}

/// Prefix caching changes no result: with a shared system prompt before every case, runs that
/// reuse cached blocks (of the base model and of each adapter, alone and mixed, chunked,
/// staggered, preempted, prefilled elsewhere) give the oracle's greedy tokens and logits, and
/// the same tokens as the run without the cache.
fn prefix_suite(arch: Arch) {
    // Two and a half blocks of 16: the reused prefix ends inside a block, so every case
    // computes the rest of that block itself.
    let system = workload::prompt(7, 40, 512);
    let w = world_with_prefix(arch, FixtureDtype::F32, &system);
    let together = vec![0; w.cases.len()];
    let staggered: Vec<usize> = (0..w.cases.len()).map(|i| (i % 6) * 3).collect();

    let mut off = engine(&w, config_without_prefix_cache(7, 2048));
    let baseline = run(&mut off, &w, &together, MAX_NEW);
    check(&w, &baseline, &format!("{arch} prefix cache off"));
    assert_eq!(off.stats().prefix.hit_tokens, 0);

    for (chunk, arrivals, label) in [(7, &together, "together"), (16, &staggered, "staggered")] {
        let mut e = engine(&w, config(chunk, 2048));
        let start = e.stats().pool;
        // Cold: requests of the base model reuse each other's blocks once published.
        let cold = run_keeping_cache(&mut e, &w, arrivals, MAX_NEW);
        check(&w, &cold, &format!("{arch} {label} cold cache"));
        // Warm: every case finds its own prefix (and its adapter's) cached.
        let warm = run_keeping_cache(&mut e, &w, arrivals, MAX_NEW);
        check(&w, &warm, &format!("{arch} {label} warm cache"));
        let stats = e.stats();
        let each_case = (system.len() / 16 * 16) as u64;
        assert!(
            stats.prefix.hit_tokens >= each_case * w.cases.len() as u64,
            "{arch} {label}: {:?}",
            stats.prefix
        );
        assert!(stats.pool.cached > 0, "idle blocks stay in the pool");
        for (id, (tokens, _)) in &warm {
            assert_eq!(tokens, &baseline[id].0, "{arch} {label}: {id} differs");
        }
        e.trim();
        assert_eq!(
            e.stats().pool,
            start,
            "clearing the cache restores the pool"
        );
    }

    // A pool so small that decodes preempt and cached blocks are evicted (a preempted request
    // reuses whatever of its own blocks is still cached when it returns).
    let mut e = engine(&w, config(16, 100));
    let start = e.stats().pool;
    let first = run_keeping_cache(&mut e, &w, &together, MAX_NEW_LONG);
    let again = run_keeping_cache(&mut e, &w, &together, MAX_NEW_LONG);
    let stats = e.stats();
    e.trim();
    assert_eq!(
        e.stats().pool,
        start,
        "{arch}: the small pool returns to its baseline"
    );
    assert!(stats.preemptions > 0, "{arch}: the small pool must preempt");
    check(&w, &first, &format!("{arch} preempted with the cache"));
    check(&w, &again, &format!("{arch} preempted with a warm cache"));

    // Disaggregated: the prefill engine reuses its cache on the second pass.
    let mut p = engine(&w, config(7, 2048));
    let mut d = engine(&w, config(16, 2048));
    let p_start = p.stats().pool;
    for pass in ["cold", "warm"] {
        let got = run_disaggregated(&mut p, &mut d, &w, true);
        check(
            &w,
            &got,
            &format!("{arch} disaggregated, {pass} prefill cache"),
        );
    }
    assert!(p.stats().prefix.hit_tokens > 0, "{:?}", p.stats().prefix);
    p.trim();
    assert_eq!(p.stats().pool, p_start);
}

#[test]
fn prefix_caching_matches_the_oracle() {
    prefix_suite(Arch::Llama);
}
