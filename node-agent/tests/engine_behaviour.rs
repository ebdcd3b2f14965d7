//! Engine behaviour beyond numerics: adapter loading that never stalls running requests, the
//! host cache's byte bound, sampling (seeds, stop strings, stop tokens, lengths), cancellation,
//! request validation, and refusing unsupported model configurations by name.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{
    AdapterUse, Engine, EngineConfig, EngineError, Event, FinishReason, Request, SamplingParams,
};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::{self, AdapterLimits};
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::config::{Arch, HfConfig};
use loraplane_agent::model::tokenizer::{ChatMessage, TokenizerBundle};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn model(dir: &Path, arch: Arch) -> PathBuf {
    let out = dir.join(format!("model-{arch}"));
    let spec = ModelSpec {
        arch,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 21,
        shards: 1,
    };
    model::write(&spec, &out).unwrap();
    out
}

fn adapter(model: &Path, out: &Path, seed: u64) -> PathBuf {
    let spec = AdapterSpec {
        rank: 8,
        alpha: 16.0,
        targets: Module::ALL.to_vec(),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        rslora: false,
        dtype: FixtureDtype::F32,
        seed,
    };
    adapter::write(&spec, model, out).unwrap();
    out.to_owned()
}

fn request(id: &str, adapter: Option<&str>, params: SamplingParams) -> Request {
    Request {
        id: id.to_owned(),
        tenant: TenantId::default_tenant(),
        adapters: adapter.into_iter().map(AdapterUse::plain).collect(),
        prompt: vec![12, 250, 31, 77, 5, 300],
        params,
        cache_salt: None,
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn load(e: &mut Engine<CpuBackend>, name: &str, dir: &Path) {
    let key = AdapterKey::new("default", name);
    if e.begin_adapter_load(key.clone(), dir.to_owned(), None, false)
        .unwrap()
        == loraplane_agent::engine::LoadWait::Load
    {
        let (_, source) = e.take_pending_loads().pop().unwrap();
        let model = e.model_config().clone();
        e.finish_adapter_load(&key, host::load(&source, &model, &AdapterLimits::default()))
            .unwrap();
    }
}

/// Runs the engine to completion and collects each stream: (tokens, text, finish reason).
fn drain(
    e: &mut Engine<CpuBackend>,
    streams: Vec<UnboundedReceiver<Event>>,
) -> Vec<(Vec<u32>, String, FinishReason)> {
    // Reloads of evicted adapters: do them inline (the actor does them on loader threads).
    for _ in 0..100_000 {
        e.request_reloads();
        for (key, source) in e.take_pending_loads() {
            let model = e.model_config().clone();
            e.finish_adapter_load(&key, host::load(&source, &model, &AdapterLimits::default()))
                .unwrap();
        }
        assert!(
            e.stats().host_cache_used <= e.stats().host_cache_capacity,
            "host cache bound"
        );
        if !e.has_work() {
            break;
        }
        e.step().unwrap();
    }
    streams.into_iter().map(collect).collect()
}

fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, String, FinishReason) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, text: t, .. } => {
                tokens.push(id);
                text.push_str(&t);
            }
            Event::Finished {
                reason, text: t, ..
            } => {
                text.push_str(&t);
                return (tokens, text, reason);
            }
        }
    }
    panic!("stream ended without a Finished event");
}

fn submit(e: &mut Engine<CpuBackend>, req: Request) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    e.submit(req, tx).unwrap();
    rx
}

/// A FIFO stands in for a slow adapter download: the loader blocks reading it until the test
/// writes the file, so "loading" lasts exactly as long as the test decides — no timing luck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_an_adapter_for_a_queued_request_does_not_stall_running_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Llama);
    let real = adapter(&model_dir, &dir.path().join("real"), 4);
    let slow = dir.path().join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::copy(
        real.join("adapter_config.json"),
        slow.join("adapter_config.json"),
    )
    .unwrap();
    let fifo = slow.join("adapter_model.safetensors");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());

    let handle = EngineHandle::spawn(CpuBackend, &model_dir, EngineConfig::default()).unwrap();
    let running = handle
        .submit(request("running", None, greedy(200)))
        .await
        .unwrap();
    let mut running = running;
    // It is decoding.
    assert!(matches!(running.recv().await, Some(Event::Token { .. })));

    let loader = {
        let handle = handle.clone();
        let slow = slow.clone();
        tokio::spawn(async move {
            handle
                .load_adapter(AdapterKey::new("default", "slow"), slow, None, false)
                .await
        })
    };
    // Wait until the adapter is registered (loading), then queue a request on it.
    let queued = loop {
        match handle
            .submit(request("queued", Some("slow"), greedy(4)))
            .await
        {
            Ok(stream) => break stream,
            Err(EngineError::AdapterNotFound(_)) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    // While the load is blocked, the running request keeps producing tokens.
    let mut produced = 0;
    while produced < 20 {
        match running.recv().await {
            Some(Event::Token { .. }) => produced += 1,
            other => panic!("running request stopped: {other:?}"),
        }
    }
    let stats = handle.stats().await.unwrap();
    assert_eq!(stats.waiting, 1, "the queued request waits for its adapter");
    assert!(!loader.is_finished());

    // Finish the "download".
    let bytes = std::fs::read(real.join("adapter_model.safetensors")).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(&fifo, bytes))
        .await
        .unwrap()
        .unwrap();
    let summary = loader.await.unwrap().unwrap();
    assert_eq!(summary.rank, 8);
    let mut queued = queued;
    let mut tokens = 0;
    while let Some(ev) = queued.recv().await {
        match ev {
            Event::Token { .. } => tokens += 1,
            Event::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
        }
    }
    assert_eq!(tokens, 4);
    drop(running); // cancels it
    for _ in 0..200 {
        let s = handle.stats().await.unwrap();
        if s.running == 0 && s.pool.kv == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("dropping the stream did not cancel the request");
}

#[test]
fn the_host_cache_respects_its_bound_and_reloads_evicted_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Qwen2);
    let dirs: Vec<PathBuf> = (0..6)
        .map(|i| adapter(&model_dir, &dir.path().join(format!("a{i}")), 50 + i))
        .collect();
    let one = host::load(&dirs[0], &config(&model_dir), &AdapterLimits::default())
        .unwrap()
        .bytes;

    let run = |capacity: usize, pages: usize| {
        let mut e = Engine::new(
            CpuBackend,
            &model_dir,
            EngineConfig {
                host_cache_bytes: capacity,
                num_pages: pages,
                max_running: 2,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        for (i, d) in dirs.iter().enumerate() {
            load(&mut e, &format!("a{i}"), d);
        }
        let streams: Vec<_> = (0..12)
            .map(|i| {
                submit(
                    &mut e,
                    request(&format!("r{i}"), Some(&format!("a{}", i % 6)), greedy(5)),
                )
            })
            .collect();
        let out = drain(&mut e, streams);
        (out, e.stats())
    };
    let (roomy, _) = run(1 << 30, 4096);
    let (tight, stats) = run(2 * one + one / 2, 200);
    assert!(
        stats.adapter_host_misses > 0,
        "adapters were evicted from the host cache and reloaded"
    );
    assert!(stats.host_cache_used <= 2 * one + one / 2);
    assert_eq!(
        roomy, tight,
        "eviction and reload change nothing in the outputs"
    );
}

fn config(model_dir: &Path) -> loraplane_agent::model::config::ModelConfig {
    let p = model_dir.join("config.json");
    HfConfig::read(&p).unwrap().validate(&p).unwrap()
}

#[test]
fn sampling_seeds_stops_and_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Llama);
    let mut e = Engine::new(CpuBackend, &model_dir, EngineConfig::default()).unwrap();
    let sampled = |seed: u64| SamplingParams {
        temperature: 0.9,
        top_k: Some(50),
        top_p: Some(0.95),
        seed: Some(seed),
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let streams = vec![
        submit(&mut e, request("s1", None, sampled(7))),
        submit(&mut e, request("s2", None, sampled(7))),
        submit(&mut e, request("s3", None, sampled(8))),
        submit(&mut e, request("g", None, greedy(12))),
    ];
    let out = drain(&mut e, streams);
    assert_eq!(out[0], out[1], "the same seed reproduces the same tokens");
    assert_ne!(out[0].0, out[2].0, "another seed samples differently");
    assert_ne!(out[0].0, out[3].0, "sampling is not greedy");
    let (tokens, text, reason) = out[3].clone();
    assert_eq!((tokens.len(), reason), (12, FinishReason::Length));

    // A stop token ends generation after it, and is not part of the text.
    let stop_at = tokens[4];
    let first = tokens.iter().position(|t| *t == stop_at).unwrap();
    let params = SamplingParams {
        stop_token_ids: vec![stop_at],
        ..greedy(12)
    };
    let stream = submit(&mut e, request("t", None, params));
    let out = drain(&mut e, vec![stream]);
    assert_eq!(out[0].0, tokens[..=first]);
    assert_eq!(out[0].2, FinishReason::Stop);

    // A stop string cuts the text right before it.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = text.find(&stop).unwrap();
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(12)
    };
    let stream = submit(&mut e, request("u", None, params));
    let out = drain(&mut e, vec![stream]);
    assert_eq!(out[0].1, text[..cut], "stop string {stop:?} in {text:?}");
    assert_eq!(out[0].2, FinishReason::Stop);
}

#[test]
fn cancellation_frees_pages_and_finishes_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Llama);
    let mut e = Engine::new(CpuBackend, &model_dir, EngineConfig::default()).unwrap();
    let start = e.stats().pool;
    let mut kept = submit(&mut e, request("kept", None, greedy(50)));
    let dropped = submit(&mut e, request("dropped", None, greedy(50)));
    for _ in 0..3 {
        e.step().unwrap();
    }
    assert!(e.stats().pool.kv > 0);
    e.cancel("kept");
    drop(dropped);
    e.drop_disconnected();
    assert_eq!(e.stats().pool, start);
    assert!(!e.has_work());
    let mut last = None;
    while let Ok(ev) = kept.try_recv() {
        last = Some(ev);
    }
    assert!(matches!(
        last,
        Some(Event::Finished {
            reason: FinishReason::Cancelled,
            ..
        })
    ));
}

#[test]
fn invalid_requests_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Llama);
    let mut e = Engine::new(
        CpuBackend,
        &model_dir,
        EngineConfig {
            num_pages: 16,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let (tx, _rx) = unbounded_channel();
    let mut try_submit = |req: Request| e.submit(req, tx.clone()).unwrap_err().to_string();
    let mut r = request("x", None, greedy(4));
    r.prompt.clear();
    assert!(try_submit(r).contains("the prompt is empty"));
    let mut r = request("x", None, greedy(4));
    r.prompt.push(100_000);
    assert!(try_submit(r).contains("outside the vocabulary"));
    assert!(try_submit(request("x", None, greedy(5000))).contains("exceeds the context length"));
    assert!(try_submit(request("x", None, greedy(200))).contains("more KV pages than the pool"));
    assert!(try_submit(request("x", Some("nope"), greedy(4))).contains("not found"));
    assert!(try_submit(request("x", None, greedy(0))).contains("max_tokens"));
}

#[test]
fn unsupported_configurations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model(dir.path(), Arch::Llama);
    let path = model_dir.join("config.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value, expect) in [
        (
            "model_type",
            serde_json::json!("gpt2"),
            "unsupported model_type \"gpt2\"",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "unsupported rope_scaling type \"yarn\"",
        ),
        (
            "hidden_act",
            serde_json::json!("gelu"),
            "unsupported hidden_act \"gelu\"",
        ),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "not a multiple of num_key_value_heads 3",
        ),
    ] {
        let mut c = original.clone();
        c[field] = value;
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
        let err = Engine::new(CpuBackend, &model_dir, EngineConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect) && err.contains("config.json"), "{err}");
    }
}

#[test]
fn chat_templates_render_for_each_family() {
    let dir = tempfile::tempdir().unwrap();
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello!"),
    ];
    let llama = TokenizerBundle::load(&model(dir.path(), Arch::Llama), &[]).unwrap();
    let text = llama.render_chat(&messages, true).unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let ids = llama.encode(&text, false).unwrap();
    assert_eq!(
        ids.iter()
            .filter(|id| llama.tokenizer.id_to_token(**id).as_deref() == Some("<|eot_id|>"))
            .count(),
        2
    );
    let qwen = TokenizerBundle::load(&model(dir.path(), Arch::Qwen2), &[]).unwrap();
    assert_eq!(
        qwen.render_chat(&messages, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(
        qwen.eos_ids
            .contains(&qwen.tokenizer.token_to_id("<|im_end|>").unwrap())
    );
    // The default templates never read `tools`: requests with tools are refused.
    assert!(!llama.supports_tools() && !qwen.supports_tools());
}
