//! Structured outputs end to end: `e2e/clients/structured_outputs.py` (the official `openai`
//! package, a `grpcio` client and the `jsonschema` validator) against a unified agent, then
//! against a decode agent whose every prompt is prefilled by a separate prefill agent, which
//! samples the first token under the request's grammar. Free requests in the same batches must
//! still give the engine's direct greedy output, computed here in-process.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use loraplane_agent::engine::SamplingParams;
use loraplane_e2e::{Agent, Oracle, World, metric, run_pytest, scrape};
use serde_json::json;

/// Free chat requests (long, ignoring EOS, so constrained requests sent while they stream
/// share their steps) and the engine's direct greedy output for each.
async fn expected(world: &World) -> serde_json::Value {
    let oracle = Oracle::new(&world.model);
    oracle.load("sql", &world.path("adapters/sql")).await;
    type Case<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case<'_>; 2] = [
        (
            "free_base",
            None,
            vec![("user", "Describe a person as JSON")],
        ),
        (
            "free_adapter",
            Some("sql"),
            vec![("system", "You are terse."), ("user", "Who are you?")],
        ),
    ];
    let max_tokens = 600;
    let mut out = Vec::new();
    for (name, adapter, messages) in cases {
        let prompt = oracle.encode_chat(&messages);
        let params = SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let e = oracle.generate(adapter, prompt, params).await;
        assert_eq!(
            e.tokens.len(),
            max_tokens,
            "{name}: the free request must run long"
        );
        out.push(json!({
            "name": name,
            "model": adapter.unwrap_or("tiny"),
            "adapter": adapter.unwrap_or(""),
            "messages": messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
            "prompt": "Name, age and role:",
            "max_tokens": max_tokens,
            "text": e.text,
        }));
    }
    json!({"free": out})
}

const CLIENTS: &str = "e2e/clients/structured_outputs.py";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_unified_and_disaggregated() {
    let world = World::tiny();
    world.adapter("adapters/sql", 2);
    let expected_path = world.path("expected-structured.json");
    std::fs::write(&expected_path, expected(&world).await.to_string()).unwrap();
    let adapters = world.path("adapters");
    let dir = adapters.to_str().unwrap();

    let unified = Agent::start(&world, &["--adapters", dir]);
    run_pytest(CLIENTS, &unified, &expected_path, &world.path("py-unified"));
    drop(unified);

    let token = world.path("cluster-token");
    std::fs::write(&token, "e2e-cluster-secret\n").unwrap();
    let tok = token.to_str().unwrap();
    let common = ["--adapters", dir, "--adapter-roots", dir];
    let mut prefill_args = common.to_vec();
    prefill_args.extend([
        "--role",
        "prefill",
        "--kv-addr",
        "127.0.0.1:0",
        "--cluster-token-file",
        tok,
    ]);
    let prefill = Agent::start(&world, &prefill_args);
    let peer = prefill.kv.unwrap().to_string();
    let mut decode_args = common.to_vec();
    decode_args.extend([
        "--role",
        "decode",
        "--prefill-peers",
        &peer,
        "--cluster-token-file",
        tok,
        "--local-prefill-threshold",
        "1",
        "--disable-local-prefill",
    ]);
    let decode = Agent::start(&world, &decode_args);
    run_pytest(CLIENTS, &decode, &expected_path, &world.path("py-disagg"));
    let d = scrape(decode.metrics).await;
    assert_eq!(
        metric(&d, "loraplane_prefills_total{where=\"local\"}"),
        Some(0.0),
        "every prompt was prefilled by the prefill agent"
    );
    assert!(
        metric(&d, "loraplane_prefills_total{where=\"remote\"}").unwrap() >= 10.0,
        "{d}"
    );
}
