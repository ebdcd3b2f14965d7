//! Structured outputs in the engine: a request constrained by a JSON schema shares its steps
//! with free requests (whose tokens do not change), stops when the grammar is complete, and
//! through disaggregation the prefill side samples the first token under the same grammar while
//! the decode side refuses a first token that breaks it.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::actor::grammars_for;
use loraplane_agent::engine::{
    Engine, EngineConfig, Event, FinishReason, KvImport, KvLayer, Request, SamplingParams,
};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::ids::TenantId;
use loraplane_agent::model::config::Arch;
use loraplane_agent::structured::{Constraint, ResponseFormat, SharedGrammars};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn engine(dir: &Path) -> Engine<CpuBackend> {
    let out = dir.join("model");
    if !out.exists() {
        let spec = ModelSpec {
            arch: Arch::Llama,
            preset: Preset::Tiny,
            dtype: FixtureDtype::F32,
            seed: 5,
            shards: 1,
        };
        model::write(&spec, &out).unwrap();
    }
    Engine::new(CpuBackend, &out, EngineConfig::default()).unwrap()
}

fn grammars(e: &Engine<CpuBackend>) -> SharedGrammars {
    grammars_for(e.tokenizer().clone(), e.model_config().vocab_size)
}

fn person() -> ResponseFormat {
    ResponseFormat::JsonSchema {
        name: "person".into(),
        schema: json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "ok": {"type": "boolean"},
            },
            "required": ["name", "age", "ok"],
            "additionalProperties": false,
        }),
        strict: true,
    }
}

fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 3, "{v}");
    let name = o["name"].as_str().unwrap();
    assert!((1..=8).contains(&name.chars().count()), "{v}");
    assert!(o["age"].as_u64().unwrap() <= 120, "{v}");
    assert!(o["ok"].is_boolean(), "{v}");
}

const PROMPT: [u32; 6] = [12, 250, 31, 77, 5, 300];

fn request(id: &str, max_tokens: usize, constraint: Option<Constraint>) -> Request {
    Request {
        id: id.to_owned(),
        tenant: TenantId::default_tenant(),
        adapters: Vec::new(),
        prompt: PROMPT.to_vec(),
        params: SamplingParams {
            max_tokens,
            ignore_eos: constraint.is_none(),
            constraint,
            ..SamplingParams::default()
        },
        cache_salt: None,
    }
}

fn submit(e: &mut Engine<CpuBackend>, req: Request) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    e.submit(req, tx).unwrap();
    rx
}

fn run(e: &mut Engine<CpuBackend>) {
    while e.has_work() {
        e.step().unwrap();
    }
}

/// (tokens, text, finish reason, error)
fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, String, FinishReason, Option<String>) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, text: t, .. } => {
                tokens.push(id);
                text.push_str(&t);
            }
            Event::Finished {
                reason,
                text: t,
                error,
                ..
            } => {
                text.push_str(&t);
                return (tokens, text, reason, error);
            }
        }
    }
    panic!("stream ended without a Finished event");
}

#[test]
fn constrained_and_free_requests_share_steps_and_free_tokens_do_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(dir.path());
    let g = grammars(&e);

    let solo = submit(&mut e, request("solo", 48, None));
    run(&mut e);
    let (solo_tokens, solo_text, _, _) = collect(solo);
    assert!(
        serde_json::from_str::<Value>(&solo_text).is_err(),
        "the model's own output is not JSON: {solo_text:?}"
    );

    // Submitted together: they are admitted into the same steps.
    let free = submit(&mut e, request("free", 48, None));
    let shaped = submit(
        &mut e,
        request("shaped", 96, Some(g.compile(&person()).unwrap())),
    );
    let object = submit(
        &mut e,
        request(
            "object",
            16,
            Some(g.compile(&ResponseFormat::JsonObject).unwrap()),
        ),
    );
    let short = submit(
        &mut e,
        request("short", 3, Some(g.compile(&person()).unwrap())),
    );
    let steps_before = e.stats().steps;
    run(&mut e);
    let (free_tokens, _, _, _) = collect(free);
    assert_eq!(
        free_tokens, solo_tokens,
        "a free row is unaffected by its neighbours"
    );
    let (tokens, text, reason, error) = collect(shaped);
    assert_eq!((reason, error), (FinishReason::Stop, None), "{text}");
    assert!(tokens.len() < 96);
    check_person(&text);
    assert_eq!(
        e.stats().steps - steps_before,
        tokens.len().max(48) as u64,
        "one step per token of the longest request: the rows ran in the same steps"
    );
    let (_, text, reason, _) = collect(object);
    assert_eq!(reason, FinishReason::Stop);
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text:?}"
    );
    // Cut short by max_tokens: `length`, and the beginning of an object.
    let (tokens, text, reason, _) = collect(short);
    assert_eq!((tokens.len(), reason), (3, FinishReason::Length));
    assert!(text.starts_with('{'), "{text:?}");
    assert!(serde_json::from_str::<Value>(&text).is_err());
    assert_eq!(e.stats().pool.kv, 0);
}

#[test]
fn the_prefill_side_samples_the_first_token_under_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = engine(dir.path());
    let mut d = engine(dir.path());
    let g = grammars(&d);

    let unified = submit(
        &mut d,
        request("unified", 96, Some(g.compile(&person()).unwrap())),
    );
    run(&mut d);
    let (unified_tokens, unified_text, _, _) = collect(unified);
    check_person(&unified_text);

    let prefill = |p: &mut Engine<CpuBackend>| {
        let (tx, mut rx) = unbounded_channel();
        let (kv_tx, mut kv_rx) = unbounded_channel();
        p.submit_prefill(
            request("prefill", 96, Some(g.compile(&person()).unwrap())),
            tx,
            kv_tx,
        )
        .unwrap();
        run(p);
        let mut layers: Vec<KvLayer> = Vec::new();
        while let Ok(l) = kv_rx.try_recv() {
            layers.push(l);
        }
        let Some(Event::Token { id, logprob, .. }) = rx.try_recv().ok() else {
            panic!("no first token")
        };
        KvImport {
            first_block: 0,
            layers: layers.into_iter().map(|l| l.data).collect(),
            first_token: id,
            first_logprob: logprob,
        }
    };
    let import = prefill(&mut p);
    assert_eq!(
        import.first_token, unified_tokens[0],
        "sampled under the grammar"
    );

    let (tx, rx) = unbounded_channel();
    let req = request("decode", 96, Some(g.compile(&person()).unwrap()));
    d.submit_prefilled(req, tx, import.clone()).unwrap();
    run(&mut d);
    let (tokens, text, reason, _) = collect(rx);
    assert_eq!((tokens, reason), (unified_tokens, FinishReason::Stop));
    assert_eq!(text, unified_text);

    // A peer that ignored the format: its first token breaks the grammar, and the decode side
    // fails the request instead of continuing from invalid output.
    let bad = d.tokenizer().encode("x", false).unwrap()[0];
    let (tx, rx) = unbounded_channel();
    let req = request("bad", 96, Some(g.compile(&person()).unwrap()));
    d.submit_prefilled(
        req,
        tx,
        KvImport {
            first_token: bad,
            ..import
        },
    )
    .unwrap();
    run(&mut d);
    let (_, _, reason, error) = collect(rx);
    assert_eq!(reason, FinishReason::Error);
    assert!(error.unwrap().contains("response format"));
    assert_eq!(d.stats().pool.kv, 0);
}
