//! Greedy outputs through every surface equal the engine's direct output.
//!
//! The expected tokens and text come from running the engine in-process (`Oracle`, no serving
//! layer) on the same fixture files; the real `loraplane-agent serve` is then driven by
//! independent clients: raw HTTP/1.1 (completions and chat, JSON and SSE), a Rust tonic
//! client (text, token-id and chat prompts), and — through pytest — the official `openai`
//! Python package and a `grpcio` client generated from our protos at test time. Health and
//! server reflection are checked too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use loraplane_e2e::{Agent, Expected, Oracle, World, post_json, sse_data};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    /// `None` is the base model.
    adapter: Option<&'static str>,
    prompt: Prompt,
    max_tokens: usize,
    expected: Expected,
}

enum Prompt {
    Text(&'static str),
    Chat(Vec<(&'static str, &'static str)>),
}

async fn cases(world: &World) -> Vec<Case> {
    let oracle = Oracle::new(&world.model);
    oracle.load("sql", &world.path("adapters/sql")).await;
    let specs = vec![
        (
            "completion_base",
            None,
            Prompt::Text("The quick brown fox"),
            12,
        ),
        (
            "completion_adapter",
            Some("sql"),
            Prompt::Text("SELECT name FROM users"),
            12,
        ),
        (
            "chat_adapter",
            Some("sql"),
            Prompt::Chat(vec![("system", "You are terse."), ("user", "Say hi")]),
            10,
        ),
        (
            "chat_base",
            None,
            Prompt::Chat(vec![("user", "Hello there")]),
            10,
        ),
    ];
    let mut out = Vec::new();
    for (name, adapter, prompt, max_tokens) in specs {
        let ids = match &prompt {
            Prompt::Text(t) => oracle.encode_text(t),
            Prompt::Chat(m) => oracle.encode_chat(m),
        };
        let expected = oracle.greedy(adapter, ids, max_tokens).await;
        assert!(
            !expected.tokens.is_empty(),
            "{name}: the oracle generated nothing"
        );
        out.push(Case {
            name,
            adapter,
            prompt,
            max_tokens,
            expected,
        });
    }
    out
}

fn model_field(c: &Case) -> &'static str {
    c.adapter.unwrap_or("tiny")
}

fn http_body(c: &Case, stream: bool) -> (&'static str, Value) {
    let mut body = match &c.prompt {
        Prompt::Text(t) => json!({"prompt": t}),
        Prompt::Chat(m) => json!({
            "messages": m.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()
        }),
    };
    body["model"] = json!(model_field(c));
    body["max_tokens"] = json!(c.max_tokens);
    body["temperature"] = json!(0);
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let path = match c.prompt {
        Prompt::Text(_) => "/v1/completions",
        Prompt::Chat(_) => "/v1/chat/completions",
    };
    (path, body)
}

async fn check_http(agent: &Agent, c: &Case) {
    let (path, body) = http_body(c, false);
    let r = post_json(agent.http, path, None, &body).await;
    assert_eq!(r.status, 200, "{}: {}", c.name, r.text());
    let v = r.json();
    let text = match c.prompt {
        Prompt::Text(_) => v["choices"][0]["text"].as_str().unwrap().to_owned(),
        Prompt::Chat(_) => v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
    };
    assert_eq!(text, c.expected.text, "{}: HTTP text", c.name);
    assert_eq!(
        v["usage"]["completion_tokens"],
        json!(c.expected.tokens.len()),
        "{}",
        c.name
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        json!(c.expected.prompt.len()),
        "{}",
        c.name
    );

    let (path, body) = http_body(c, true);
    let r = post_json(agent.http, path, None, &body).await;
    assert_eq!(r.status, 200, "{}: {}", c.name, r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_data(&r.body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        c.name
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = String::new();
    for ch in &chunks {
        for choice in ch["choices"].as_array().unwrap() {
            let piece = match c.prompt {
                Prompt::Text(_) => choice["text"].as_str(),
                Prompt::Chat(_) => choice["delta"]["content"].as_str(),
            };
            text.push_str(piece.unwrap_or(""));
        }
    }
    assert_eq!(text, c.expected.text, "{}: SSE text", c.name);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"],
        json!(c.expected.tokens.len()),
        "{}",
        c.name
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .flat_map(|ch| ch["choices"].as_array().unwrap())
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1, "{}: one finish reason", c.name);
}

async fn grpc_generate(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> (Vec<u32>, String, pb::GenerateResponse) {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let (mut ids, mut text, mut last) = (Vec::new(), String::new(), None);
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        ids.extend_from_slice(&msg.token_ids);
        text.push_str(&msg.text);
        last = Some(msg);
    }
    (ids, text, last.unwrap())
}

async fn check_grpc(agent: &Agent, c: &Case) {
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let prompt = match &c.prompt {
        Prompt::Text(t) => pb::generate_request::Prompt::Text((*t).to_owned()),
        Prompt::Chat(m) => pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages: m
                .iter()
                .map(|(r, c)| pb::ChatMessage {
                    role: (*r).into(),
                    content: (*c).into(),
                })
                .collect(),
            add_generation_prompt: true,
        }),
    };
    let sampling = Some(pb::SamplingParams {
        max_tokens: Some(c.max_tokens as u32),
        ..Default::default()
    });
    let req = pb::GenerateRequest {
        request_id: format!("e2e-{}", c.name),
        adapter: c.adapter.unwrap_or_default().to_owned(),
        prompt: Some(prompt),
        sampling,
        logprobs: true,
        skip_special_tokens: false,
        cache_salt: None,
        response_format: None,
        adapters: Vec::new(),
    };
    let (ids, text, last) = grpc_generate(&mut client, req.clone()).await;
    assert_eq!(ids, c.expected.tokens, "{}: gRPC tokens", c.name);
    assert_eq!(text, c.expected.text, "{}: gRPC text", c.name);
    assert_eq!(last.request_id, format!("e2e-{}", c.name));
    assert_ne!(last.finish_reason, pb::FinishReason::Unspecified as i32);
    let usage = last.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, c.expected.prompt.len());
    assert_eq!(usage.completion_tokens as usize, c.expected.tokens.len());
    assert!(last.timings.unwrap().total_us > 0);

    // The same prompt as token ids gives the same tokens.
    let by_ids = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: c.expected.prompt.clone(),
        })),
        ..req
    };
    let (ids, _, _) = grpc_generate(&mut client, by_ids).await;
    assert_eq!(ids, c.expected.tokens, "{}: gRPC token-id prompt", c.name);
}

async fn check_health_and_reflection(agent: &Agent) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "loraplane.v1.Inference"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection answer: {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "loraplane.v1.Inference",
        "loraplane.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

/// Runs the Python clients (pytest) against the agent with the expected outputs.
fn run_python_clients(agent: &Agent, world: &World, cases: &[Case]) {
    let expected = json!({
        "base_model": "tiny",
        "cases": cases.iter().map(|c| json!({
            "name": c.name,
            "model": model_field(c),
            "adapter": c.adapter.unwrap_or(""),
            "prompt": match &c.prompt { Prompt::Text(t) => json!(t), Prompt::Chat(_) => Value::Null },
            "messages": match &c.prompt {
                Prompt::Chat(m) => json!(m.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()),
                Prompt::Text(_) => Value::Null,
            },
            "max_tokens": c.max_tokens,
            "prompt_tokens": c.expected.prompt.len(),
            "token_ids": c.expected.tokens,
            "text": c.expected.text,
        })).collect::<Vec<_>>(),
    });
    let path = world.path("expected.json");
    std::fs::write(&path, expected.to_string()).unwrap();
    loraplane_e2e::run_pytest("e2e/clients", agent, &path, &world.path("python"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_surface_reproduces_the_engine() {
    let world = World::tiny();
    world.adapter("adapters/sql", 2);
    let cases = cases(&world).await;
    let adapters = world.path("adapters");
    let agent = Agent::start(&world, &["--adapters", adapters.to_str().unwrap()]);
    for c in &cases {
        check_http(&agent, c).await;
        check_grpc(&agent, c).await;
    }
    check_health_and_reflection(&agent).await;

    let models = loraplane_e2e::http(agent.http, "GET", "/v1/models", &[], b"")
        .await
        .unwrap()
        .json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "sql"]);

    run_python_clients(&agent, &world, &cases);
}
