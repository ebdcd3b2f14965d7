//! Hostile input over real sockets: malformed JSON, wrong types, huge numbers, invalid UTF-8,
//! oversized bodies, out-of-bounds requests, garbage on the wire, path-traversal adapter paths
//! and redirecting URLs. Every one gets a clear 4xx (an OpenAI error JSON on the OpenAI
//! routes) or `INVALID_ARGUMENT`, and the agent stays healthy throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use loraplane_e2e::{Agent, HttpResponse, World, http, http_raw, key_hash, post_json};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "hostile-admin";

async fn healthy(addr: SocketAddr) {
    let r = http(addr, "GET", "/healthz", &[], b"").await.unwrap();
    assert_eq!(r.status, 200);
    let r = post_json(
        addr,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "a valid request after hostile input: {}",
        r.text()
    );
}

fn assert_openai_error(r: &HttpResponse, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {v}"
    );
}

async fn post_bytes(addr: SocketAddr, path: &str, body: &[u8]) -> HttpResponse {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .await
    .unwrap()
}

/// A one-shot HTTP server that redirects every request to `location`.
async fn redirector(location: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_4xx_and_the_agent_stays_healthy() {
    let world = World::tiny();
    world.adapter("adapters/good", 3);
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--max-request-bytes",
            "64KiB",
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--allow-http-sources",
            "--allowed-private-hosts",
            "localhost",
        ],
    );
    let a = agent.http;
    let completions: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "truncated JSON",
            br#"{"model":"tiny","prompt":"#.to_vec(),
            400,
        ),
        ("not an object", b"[1,2,3]".to_vec(), 400),
        ("empty body", b"".to_vec(), 400),
        ("missing prompt", br#"{"model":"tiny"}"#.to_vec(), 400),
        (
            "max_tokens as a string",
            br#"{"model":"tiny","prompt":"x","max_tokens":"ten"}"#.to_vec(),
            400,
        ),
        (
            "temperature as a string",
            br#"{"model":"tiny","prompt":"x","temperature":"hot"}"#.to_vec(),
            400,
        ),
        (
            "prompt as a number",
            br#"{"model":"tiny","prompt":42}"#.to_vec(),
            400,
        ),
        (
            "stop as a number",
            br#"{"model":"tiny","prompt":"x","stop":5}"#.to_vec(),
            400,
        ),
        (
            "model as an object",
            br#"{"model":{},"prompt":"x"}"#.to_vec(),
            400,
        ),
        (
            "max_tokens 1e30",
            br#"{"model":"tiny","prompt":"x","max_tokens":1e30}"#.to_vec(),
            400,
        ),
        (
            "max_tokens 2^64",
            br#"{"model":"tiny","prompt":"x","max_tokens":18446744073709551616}"#.to_vec(),
            400,
        ),
        (
            "max_tokens beyond the context",
            br#"{"model":"tiny","prompt":"x","max_tokens":1000000}"#.to_vec(),
            400,
        ),
        (
            "max_tokens zero",
            br#"{"model":"tiny","prompt":"x","max_tokens":0}"#.to_vec(),
            400,
        ),
        (
            "temperature 1e300",
            br#"{"model":"tiny","prompt":"x","temperature":1e300}"#.to_vec(),
            400,
        ),
        (
            "negative temperature",
            br#"{"model":"tiny","prompt":"x","temperature":-1}"#.to_vec(),
            400,
        ),
        (
            "top_p 5",
            br#"{"model":"tiny","prompt":"x","top_p":5}"#.to_vec(),
            400,
        ),
        (
            "negative seed",
            br#"{"model":"tiny","prompt":"x","seed":-1}"#.to_vec(),
            400,
        ),
        (
            "token id 2^32",
            br#"{"model":"tiny","prompt":[4294967296]}"#.to_vec(),
            400,
        ),
        (
            "token id outside the vocabulary",
            br#"{"model":"tiny","prompt":[1,99999]}"#.to_vec(),
            400,
        ),
        (
            "n = 5",
            br#"{"model":"tiny","prompt":"x","n":5}"#.to_vec(),
            400,
        ),
        (
            "two prompts",
            br#"{"model":"tiny","prompt":["a","b"]}"#.to_vec(),
            400,
        ),
        (
            "empty prompt",
            br#"{"model":"tiny","prompt":""}"#.to_vec(),
            400,
        ),
        (
            "echo",
            br#"{"model":"tiny","prompt":"x","echo":true}"#.to_vec(),
            400,
        ),
        (
            "invalid UTF-8",
            b"{\"model\":\"tiny\",\"prompt\":\"\xff\xfe\xc0\"}".to_vec(),
            400,
        ),
        (
            "a huge model name",
            format!(r#"{{"model":"{}","prompt":"x"}}"#, "m".repeat(5000)).into_bytes(),
            400,
        ),
        (
            "a path as the model",
            br#"{"model":"../../etc/passwd","prompt":"x"}"#.to_vec(),
            404,
        ),
    ];
    for (what, body, status) in &completions {
        let r = post_bytes(a, "/v1/completions", body).await;
        assert_openai_error(&r, *status, what);
    }
    let stops: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let r = post_json(
        a,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": "x", "stop": stops}),
    )
    .await;
    assert_openai_error(&r, 400, "too many stop strings");
    assert_eq!(r.json()["error"]["param"], "stop");
    let r = post_json(
        a,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": "x", "stop": ["y".repeat(1000)]}),
    )
    .await;
    assert_openai_error(&r, 400, "a stop string too long");
    let long_prompt = "word ".repeat(5000);
    let r = post_json(
        a,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": long_prompt}),
    )
    .await;
    assert_openai_error(&r, 400, "a prompt longer than the context");
    let big = json!({"model": "tiny", "prompt": "x".repeat(100 * 1024)}).to_string();
    let r = post_bytes(a, "/v1/completions", big.as_bytes()).await;
    assert_openai_error(&r, 413, "an oversized body");

    let chats: Vec<(&str, serde_json::Value)> = vec![
        ("no messages", json!({"model": "tiny", "messages": []})),
        (
            "messages as a string",
            json!({"model": "tiny", "messages": "hi"}),
        ),
        (
            "an unknown role",
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}),
        ),
        (
            "content as a number",
            json!({"model": "tiny", "messages": [{"role": "user", "content": 7}]}),
        ),
        (
            "tools",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
        ),
        (
            "image content",
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ),
    ];
    for (what, body) in &chats {
        let r = post_json(a, "/v1/chat/completions", None, body).await;
        assert_openai_error(&r, 400, what);
    }

    let r = http(a, "GET", "/v1/nope", &[], b"").await.unwrap();
    assert_openai_error(&r, 404, "an unknown route");
    let r = http(a, "GET", "/v1/completions", &[], b"").await.unwrap();
    assert_eq!(r.status, 405);
    // Garbage on the wire: the HTTP layer refuses it and the agent carries on.
    let r = http_raw(a, b"GARBAGE / NOT-HTTP\r\n\r\n").await;
    assert!(r.map(|r| (400..500).contains(&r.status)).unwrap_or(true));

    // Adapter sources: path traversal, a path outside the roots, a redirect to loopback.
    let admin_auth = format!("Bearer {ADMIN}");
    let load = |path: String| {
        let auth = admin_auth.clone();
        async move {
            let body = json!({"lora_name": "evil", "lora_path": path}).to_string();
            http(
                a,
                "POST",
                "/v1/load_lora_adapter",
                &[
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await
            .unwrap()
        }
    };
    let traversal = format!("{}/../../../../etc", roots.display());
    for (what, path) in [
        ("path traversal", traversal),
        ("outside the roots", "/etc".to_owned()),
        ("a relative path", "good/../../x".to_owned()),
    ] {
        let r = load(path).await;
        assert!(
            (400..500).contains(&r.status),
            "{what}: {} {}",
            r.status,
            r.text()
        );
        assert!(r.json()["error"]["message"].is_string(), "{what}");
    }
    let target = redirector("http://127.0.0.1:9/adapter".into()).await;
    let r = load(format!("http://localhost:{}/adapter", target.port())).await;
    assert!(
        (400..500).contains(&r.status),
        "a redirect to loopback: {} {}",
        r.status,
        r.text()
    );
    let r = load(roots.join("good").to_str().unwrap().to_owned()).await;
    assert_eq!(
        r.status,
        200,
        "a legitimate adapter still loads: {}",
        r.text()
    );

    // gRPC: every bad field is INVALID_ARGUMENT.
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let text = |t: &str| Some(pb::generate_request::Prompt::Text(t.into()));
    let bad = vec![
        ("no prompt", pb::GenerateRequest::default()),
        (
            "token id outside the vocabulary",
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: vec![1, 1 << 30],
                })),
                ..Default::default()
            },
        ),
        (
            "max_tokens 0",
            pb::GenerateRequest {
                prompt: text("x"),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        (
            "NaN temperature",
            pb::GenerateRequest {
                prompt: text("x"),
                sampling: Some(pb::SamplingParams {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        (
            "stop token outside the vocabulary",
            pb::GenerateRequest {
                prompt: text("x"),
                sampling: Some(pb::SamplingParams {
                    stop_token_ids: vec![u32::MAX],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        (
            "an unknown chat role",
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                    messages: vec![pb::ChatMessage {
                        role: "root".into(),
                        content: "x".into(),
                    }],
                    add_generation_prompt: true,
                })),
                ..Default::default()
            },
        ),
    ];
    for (what, req) in bad {
        let e = client.generate(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(!e.message().is_empty(), "{what}");
    }
    let huge = pb::GenerateRequest {
        prompt: text(&"x".repeat(100 * 1024)),
        ..Default::default()
    };
    let e = client.generate(huge).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok, "an oversized message");

    healthy(a).await;
    let r = http(a, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(r.status, 200);
}
