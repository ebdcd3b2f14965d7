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
use std::path::PathBuf;
use workload::{Case, Workload, request, workload};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::{Engine, EngineConfig, Event, FinishReason, KvImport, KvLayer};
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
    let Workload {
        dir,
        model,
        adapters,
        cases,
    } = workload(arch, dtype, ADAPTERS);
    let mut expected = HashMap::new();
    for case in &cases {
        let merged = dir.path().join(format!("merged-{}", case.id));
        let adapter_dir = case.adapter.map(|i| adapters[i].as_path());
        oracle::merge_adapter(&model, adapter_dir, &merged).unwrap();
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
        "every KV page is returned"
    );
    e.trim();
    assert_eq!(
        e.stats().pool,
        start,
        "the pool returns to where it started"
    );
    assert!(e.stats().host_cache_used <= e.stats().host_cache_capacity);
    out
}

/// Splitwise in-process: `p` computes every prompt and streams KV layer by layer; `d` imports
/// it and generates the rest.
fn run_disaggregated(
    p: &mut Engine<CpuBackend>,
    d: &mut Engine<CpuBackend>,
    w: &World,
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
    p.trim();
    assert_eq!(
        p.stats().pool,
        p_start,
        "and everything else once idle adapters go"
    );
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

fn suite(arch: Arch, dtype: FixtureDtype) {
    let w = world(arch, dtype);
    // Adapters must matter, or the comparison proves nothing about LoRA: every adapter moves
    // the logits, and most change the greedy tokens.
    let mut changed_tokens = 0;
    for case in w.cases.iter().filter(|c| c.adapter.is_some()) {
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
        let mut e = engine(&w, config(chunk, 2048));
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
    let got = run_disaggregated(&mut p, &mut d, &w);
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
