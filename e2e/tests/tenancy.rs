//! Tenants over the real binary: API keys map to tenants, same-named adapters of two tenants
//! stay apart, a third tenant cannot tell another tenant's adapter from a missing one,
//! per-tenant limits answer 429 / RESOURCE_EXHAUSTED with a retry hint, and under contention
//! the scheduler's virtual token counters serve two tenants equally.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use loraplane_e2e::{Agent, Oracle, World, key_hash, post_json, with_key};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::admin_client::AdminClient;
use loraplane_proto::v1::inference_client::InferenceClient;
use serde_json::json;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "admin-secret";
const PROMPT: &str = "Tenants keep their own adapters";

fn keys_file(world: &World, tenants: serde_json::Value) -> String {
    let path = world.path("keys.json");
    std::fs::write(&path, json!({ "tenants": tenants }).to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

fn tenant(id: &str, key: &str, limits: serde_json::Value) -> serde_json::Value {
    json!({"id": id, "api_key_sha256": [key_hash(key)], "limits": limits})
}

async fn channel(agent: &Agent) -> Channel {
    tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn load(admin: &mut AdminClient<Channel>, tenant: &str, name: &str, dir: &std::path::Path) {
    let req = pb::LoadAdapterRequest {
        adapter: Some(pb::AdapterRef {
            tenant: tenant.into(),
            name: name.into(),
        }),
        source_uri: dir.to_str().unwrap().into(),
        expected_sha256: String::new(),
        pin: false,
    };
    admin
        .load_adapter(with_key(req, ADMIN_TOKEN))
        .await
        .unwrap();
}

fn completion(model: &str, max_tokens: usize) -> serde_json::Value {
    json!({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_adapters() {
    let world = World::tiny();
    let dir_a = world.adapter("adapters/a", 11);
    let dir_b = world.adapter("adapters/b", 22);
    let oracle = Oracle::new(&world.model);
    oracle.load("a", &dir_a).await;
    oracle.load("b", &dir_b).await;
    let prompt = oracle.encode_text(PROMPT);
    let want_a = oracle.greedy(Some("a"), prompt.clone(), 10).await;
    let want_b = oracle.greedy(Some("b"), prompt, 10).await;
    assert_ne!(
        want_a.tokens, want_b.tokens,
        "the two adapters must differ for this to prove anything"
    );

    let keys = keys_file(
        &world,
        json!([
            tenant("team-a", "key-a", json!({})),
            tenant("team-b", "key-b", json!({})),
            tenant("team-c", "key-c", json!({})),
        ]),
    );
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--api-keys-file",
            &keys,
            "--admin-token-sha256",
            &key_hash(ADMIN_TOKEN),
            "--adapter-roots",
            roots.to_str().unwrap(),
        ],
    );
    let ch = channel(&agent).await;
    let mut admin = AdminClient::new(ch.clone());

    // Before anyone has "shared": what team-c gets for a name nobody has.
    let missing_http = post_json(
        agent.http,
        "/v1/completions",
        Some("key-c"),
        &completion("shared", 4),
    )
    .await;
    let mut inference = InferenceClient::new(ch.clone());
    let grpc_req = || pb::GenerateRequest {
        adapter: "shared".into(),
        prompt: Some(pb::generate_request::Prompt::Text(PROMPT.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(10),
            ..Default::default()
        }),
        ..Default::default()
    };
    let missing_grpc = inference
        .generate(with_key(grpc_req(), "key-c"))
        .await
        .unwrap_err();

    load(&mut admin, "team-a", "shared", &dir_a).await;
    load(&mut admin, "team-b", "shared", &dir_b).await;

    // Each tenant gets its own adapter under the same name, over HTTP and gRPC.
    for (key, want) in [("key-a", &want_a), ("key-b", &want_b)] {
        let r = post_json(
            agent.http,
            "/v1/completions",
            Some(key),
            &completion("shared", 10),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], json!(want.text), "{key}");
        let mut stream = inference
            .generate(with_key(grpc_req(), key))
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while let Some(m) = stream.next().await {
            ids.extend(m.unwrap().token_ids);
        }
        assert_eq!(ids, want.tokens, "{key} over gRPC");
    }

    // A third tenant: exactly the answer of a missing adapter.
    let foreign_http = post_json(
        agent.http,
        "/v1/completions",
        Some("key-c"),
        &completion("shared", 4),
    )
    .await;
    assert_eq!(foreign_http.status, 404);
    assert_eq!(foreign_http.status, missing_http.status);
    assert_eq!(
        foreign_http.body, missing_http.body,
        "byte-identical bodies"
    );
    let strip = |r: &loraplane_e2e::HttpResponse| {
        let mut h: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("date"))
            .cloned()
            .collect();
        h.sort();
        h
    };
    assert_eq!(
        strip(&foreign_http),
        strip(&missing_http),
        "identical headers"
    );
    let foreign_grpc = inference
        .generate(with_key(grpc_req(), "key-c"))
        .await
        .unwrap_err();
    assert_eq!(foreign_grpc.code(), tonic::Code::NotFound);
    assert_eq!(
        (foreign_grpc.code(), foreign_grpc.message()),
        (missing_grpc.code(), missing_grpc.message())
    );
    let models = loraplane_e2e::http(
        agent.http,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer key-c")],
        b"",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(
        models["data"].as_array().unwrap().len(),
        1,
        "team-c sees only the base model: {models}"
    );
    let models = loraplane_e2e::http(
        agent.http,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer key-a")],
        b"",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(models["data"][1]["id"], "shared");

    // Keys: none or unknown is 401; a tenant key is not an admin credential.
    let r = post_json(agent.http, "/v1/completions", None, &completion("tiny", 2)).await;
    assert_eq!(r.status, 401);
    let r = post_json(
        agent.http,
        "/v1/completions",
        Some("nope"),
        &completion("tiny", 2),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let denied = admin
        .list_adapters(with_key(pb::ListAdaptersRequest::default(), "key-a"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let r = post_json(
        agent.http,
        "/v1/load_lora_adapter",
        Some("key-a"),
        &json!({"lora_name": "x", "lora_path": dir_a.to_str().unwrap()}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_answer_429_with_a_retry_hint() {
    let world = World::tiny();
    let keys = keys_file(
        &world,
        json!([
            tenant("solo", "key-solo", json!({"max_concurrent_requests": 1})),
            tenant(
                "thrifty",
                "key-thrifty",
                json!({"max_tokens_per_minute": 60})
            ),
        ]),
    );
    let agent = Agent::start(&world, &["--api-keys-file", &keys, "--max-running", "1"]);

    // Concurrency: one long streaming request holds the only slot.
    let long = json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 600, "ignore_eos": true, "stream": true});
    let mut slot = tokio::net::TcpStream::connect(agent.http).await.unwrap();
    let body = long.to_string();
    let head = loraplane_e2e::request_head(
        "POST",
        "/v1/completions",
        &[
            ("Authorization", "Bearer key-solo"),
            ("Content-Type", "application/json"),
        ],
        body.len(),
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slot.write_all(format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = slot.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let r = post_json(
        agent.http,
        "/v1/completions",
        Some("key-solo"),
        &completion("tiny", 2),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let mut client = InferenceClient::new(channel(&agent).await);
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(PROMPT.into())),
        ..Default::default()
    };
    let e = client
        .generate(with_key(req.clone(), "key-solo"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.metadata().get("retry-after").is_some());
    drop(slot);
    // The slot comes back once the server notices the client left.
    loraplane_e2e::eventually(Duration::from_secs(10), || async {
        let r = post_json(
            agent.http,
            "/v1/completions",
            Some("key-solo"),
            &completion("tiny", 2),
        )
        .await;
        Ok((r.status == 200).then_some(()))
    })
    .await
    .unwrap();

    // Tokens per minute: a 60-token bucket is spent after a few requests.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = post_json(
            agent.http,
            "/v1/completions",
            Some("key-thrifty"),
            &completion("tiny", 20),
        )
        .await;
        statuses.push(r.status);
        if r.status == 429 {
            assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&200));
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let e = client
        .generate(with_key(req, "key-thrifty"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
}

/// Keeps `clients` requests of one tenant outstanding until `stop`, counting served tokens.
async fn hammer(
    channel: Channel,
    key: &'static str,
    clients: usize,
    until: Instant,
    served: Arc<AtomicUsize>,
) {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (channel, served) = (channel.clone(), served.clone());
            tokio::spawn(async move {
                let mut client = InferenceClient::new(channel);
                while Instant::now() < until {
                    let req = pb::GenerateRequest {
                        prompt: Some(pb::generate_request::Prompt::Text(PROMPT.into())),
                        sampling: Some(pb::SamplingParams {
                            max_tokens: Some(16),
                            ignore_eos: true,
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    let mut stream = client
                        .generate(with_key(req, key))
                        .await
                        .unwrap()
                        .into_inner();
                    while let Some(m) = stream.next().await {
                        if Instant::now() >= until {
                            return;
                        }
                        served.fetch_add(m.unwrap().token_ids.len(), Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_tenants_get_equal_service() {
    let world = World::tiny();
    let keys = keys_file(
        &world,
        json!([
            tenant("greedy", "key-greedy", json!({})),
            tenant("modest", "key-modest", json!({}))
        ]),
    );
    // Two running slots and a queue: who is admitted next is the fairness policy's call.
    let agent = Agent::start(&world, &["--api-keys-file", &keys, "--max-running", "2"]);
    let ch = channel(&agent).await;
    let (greedy, modest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Warm up, then measure: the greedy tenant keeps three times as many requests queued.
    let until = Instant::now() + Duration::from_secs(4);
    tokio::join!(
        hammer(ch.clone(), "key-greedy", 12, until, greedy.clone()),
        hammer(ch.clone(), "key-modest", 4, until, modest.clone()),
    );
    let (g, m) = (
        greedy.load(Ordering::Relaxed),
        modest.load(Ordering::Relaxed),
    );
    let spread = g.abs_diff(m) as f64 / g.max(m) as f64;
    println!(
        "served tokens: greedy {g}, modest {m}, spread {:.1}%",
        spread * 100.0
    );
    assert!(g + m > 500, "too little traffic to judge: {g} + {m}");
    assert!(
        spread <= 0.10,
        "greedy {g} vs modest {m}: {:.1}% apart",
        spread * 100.0
    );
}
