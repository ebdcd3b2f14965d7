//! Adapter composition over the real binary: a request lists several adapters of its tenant,
//! each with a scale (`adapters`, over the base model), on `/v1/completions`, chat and gRPC.
//! Composed, single-at-a-scale, plain and base-model requests sent at once each give the
//! in-process engine's output for their own adapters (the engine's composition is checked
//! against candle on merged weights in `node-agent/tests/engine_oracle.rs`); malformed lists
//! are 400 / `INVALID_ARGUMENT` naming `adapters`; another tenant's adapter in a list looks
//! exactly like a missing one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loraplane_agent::engine::{AdapterUse, SamplingParams};
use loraplane_e2e::{
    Agent, Expected, Oracle, World, admin_load, post_json, two_tenant_agent, with_key,
};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-secret";
const PROMPT: &str = "Write a query that lists every order";
const MAX_TOKENS: usize = 8;

fn uses(list: &[(&str, f32)]) -> Vec<AdapterUse> {
    list.iter()
        .map(|&(name, scale)| AdapterUse {
            name: name.to_owned(),
            scale,
        })
        .collect()
}

fn field(list: &[(&str, f32)]) -> Value {
    list.iter()
        .map(|(name, scale)| json!({"name": name, "scale": scale}))
        .collect()
}

async fn start(world: &World) -> Agent {
    let agent = two_tenant_agent(world, ADMIN_TOKEN, &[]);
    for (tenant, name) in [("team-a", "sql"), ("team-a", "tone"), ("team-b", "secret")] {
        let dir = world.path(&format!("adapters/{name}"));
        admin_load(&agent, ADMIN_TOKEN, tenant, name, &dir).await;
    }
    agent
}

async fn complete(agent: &Agent, key: &str, body: Value) -> loraplane_e2e::HttpResponse {
    post_json(agent.http, "/v1/completions", Some(key), &body).await
}

fn text(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_adapters_serve_their_own_output_beside_plain_requests() {
    let world = World::tiny();
    for (name, seed) in [("sql", 11), ("tone", 12), ("secret", 13)] {
        world.adapter(&format!("adapters/{name}"), seed);
    }
    let agent = start(&world).await;
    let oracle = Oracle::new(&world.model);
    oracle.load("sql", &world.path("adapters/sql")).await;
    oracle.load("tone", &world.path("adapters/tone")).await;

    let params = || SamplingParams {
        max_tokens: MAX_TOKENS,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let prompt = oracle.encode_text(PROMPT);
    let cases: [(&str, &[(&str, f32)]); 5] = [
        ("composed", &[("sql", 0.7), ("tone", 0.3)]),
        ("negative", &[("tone", 1.0), ("sql", -0.5)]),
        ("half", &[("sql", 0.5)]),
        ("plain", &[("sql", 1.0)]),
        ("base", &[]),
    ];
    let mut expected: Vec<Expected> = Vec::new();
    for (_, list) in cases {
        expected.push(oracle.compose(uses(list), prompt.clone(), params()).await);
    }
    for (i, (name, _)) in cases.iter().enumerate().skip(1) {
        assert_ne!(
            expected[i].tokens, expected[0].tokens,
            "{name}: compositions must differ for this test to mean anything"
        );
    }

    // All at once, so composed and plain requests share the engine's steps.
    let bodies: Vec<Value> = cases
        .iter()
        .map(|(name, list)| {
            let mut body = json!({"model": "base", "prompt": PROMPT,
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true});
            match *name {
                "plain" => body["model"] = json!("sql"),
                "base" => {}
                _ => body["adapters"] = field(list),
            }
            body
        })
        .collect();
    let replies =
        futures::future::join_all(bodies.iter().map(|b| complete(&agent, "key-a", b.clone())))
            .await;
    for ((name, _), (reply, want)) in cases.iter().zip(replies.iter().zip(&expected)) {
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(text(&reply.json()), want.text, "{name}");
    }

    // Chat, composed.
    let messages = [("user", "Who are you?")];
    let chat = oracle
        .compose(uses(cases[0].1), oracle.encode_chat(&messages), params())
        .await;
    let body = json!({"model": "base", "messages": [{"role": "user", "content": "Who are you?"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true,
        "adapters": field(cases[0].1)});
    let r = post_json(agent.http, "/v1/chat/completions", Some("key-a"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], chat.text);

    // gRPC, composed: the tokens themselves.
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(PROMPT.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(MAX_TOKENS as u32),
            ignore_eos: true,
            ..Default::default()
        }),
        adapters: cases[0]
            .1
            .iter()
            .map(|&(name, scale)| pb::ScaledAdapter {
                name: name.into(),
                scale: Some(scale),
            })
            .collect(),
        ..Default::default()
    };
    let mut stream = client
        .generate(with_key(req.clone(), "key-a"))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        tokens.extend_from_slice(&msg.token_ids);
    }
    assert_eq!(tokens, expected[0].tokens, "gRPC tokens");
    // `adapter` beside `adapters` is refused.
    let both = pb::GenerateRequest {
        adapter: "sql".into(),
        ..req
    };
    let err = client.generate(with_key(both, "key-a")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("adapters"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_compositions_are_refused_and_other_tenants_adapters_are_not_found() {
    let world = World::tiny();
    for (name, seed) in [("sql", 11), ("tone", 12), ("secret", 13)] {
        world.adapter(&format!("adapters/{name}"), seed);
    }
    let agent = start(&world).await;
    let body = |model: &str, adapters: Value| json!({"model": model, "prompt": PROMPT, "max_tokens": 2, "adapters": adapters});
    let refused: [(&str, Value, &str); 7] = [
        (
            "sql",
            json!([{"name": "tone"}]),
            "model must name the base model",
        ),
        (
            "base",
            json!([{"name": "sql"}, {"name": "sql", "scale": 0.5}]),
            "listed twice",
        ),
        (
            "base",
            json!([{"name": "sql", "scale": "high"}]),
            "invalid JSON body",
        ),
        (
            "base",
            json!([{"name": "sql", "weight": 1}]),
            "invalid JSON body",
        ),
        ("base", json!([{"name": ""}]), "must not be empty"),
        (
            "base",
            json!([{"name": "sql", "scale": 1001}]),
            "at most 1000",
        ),
        (
            "base",
            json!(
                (0..9)
                    .map(|i| json!({"name": format!("a{i}")}))
                    .collect::<Vec<_>>()
            ),
            "at most 8 adapters",
        ),
    ];
    for (model, adapters, says) in refused {
        let r = complete(&agent, "key-a", body(model, adapters.clone())).await;
        assert_eq!(r.status, 400, "{adapters}: {}", r.text());
        assert!(r.text().contains(says), "{adapters}: {}", r.text());
    }

    // Team B's adapter in team A's list is answered exactly as an adapter nobody has.
    let theirs = complete(
        &agent,
        "key-a",
        body("base", json!([{"name": "sql"}, {"name": "secret"}])),
    )
    .await;
    let missing = complete(
        &agent,
        "key-a",
        body("base", json!([{"name": "sql"}, {"name": "nobody"}])),
    )
    .await;
    assert_eq!(theirs.status, 404, "{}", theirs.text());
    assert_eq!(
        (missing.status, missing.text().replace("nobody", "secret")),
        (theirs.status, theirs.text())
    );
    // An empty list is the base model.
    let base = complete(&agent, "key-a", body("base", json!([]))).await;
    assert_eq!(base.status, 200, "{}", base.text());
}
