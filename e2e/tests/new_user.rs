//! What trying the agent as a new user found (issue 15 point 5), each over real sockets
//! against real agent processes: reloading an adapter whose files changed, reflection for
//! older clients, `remote_prefill` in the timings, a pickle-only adapter, `n > 1`, the source
//! of preloaded adapters, 429s (their metric and message), digests in logs, `text_offset` in
//! characters, prefill agents refusing generation, and user errors printed once, without a
//! backtrace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use futures::StreamExt as _;
use loraplane_e2e::{
    Agent, HttpResponse, Oracle, World, agent_binary, http, key_hash, metric, post_json, scrape,
    sse_data,
};
use loraplane_proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Code;

const ADMIN: &str = "new-user-admin";

fn admin_request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    req
}

async fn admin_client(agent: &Agent) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
    pb::admin_client::AdminClient::connect(agent.grpc_url())
        .await
        .unwrap()
}

/// `POST /v1/load_lora_adapter` with the admin token.
async fn load_http(agent: &Agent, name: &str, path: &std::path::Path) -> HttpResponse {
    let auth = format!("Bearer {ADMIN}");
    let body = json!({"lora_name": name, "lora_path": path.display().to_string()});
    http(
        agent.http,
        "POST",
        "/v1/load_lora_adapter",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap()
}

/// The greedy completion text of `model` for a fixed prompt, through the HTTP API.
async fn completion_text(agent: &Agent, model: &str) -> String {
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &json!({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
}

const PROMPT: [u32; 5] = [5, 17, 99, 230, 41];

/// Loading an adapter again under the same name and path re-reads and re-digests its files:
/// unchanged files answer "unchanged"; rewritten files replace the weights (the output becomes
/// the new adapter's, exactly what a fresh engine computes with it), on both admin surfaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_an_adapter_rereads_its_files() {
    let world = World::tiny();
    let dir = world.adapter("adapters/sql", 2);
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--adapter-roots",
            roots.to_str().unwrap(),
        ],
    );
    let r = load_http(&agent, "sql", &dir).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("added successfully"), "{}", r.text());
    let before = completion_text(&agent, "sql").await;

    let r = load_http(&agent, "sql", &dir).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("unchanged (sha256:"), "{}", r.text());

    // Rewrite the files in place with another adapter (another seed).
    let other = world.adapter("other", 7);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(other.join(f), dir.join(f)).unwrap();
    }
    let r = load_http(&agent, "sql", &dir).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("replaced: its files changed"),
        "{}",
        r.text()
    );
    let after = completion_text(&agent, "sql").await;
    assert_ne!(after, before, "the new weights must serve");

    // Exactly what a fresh engine computes with the new files.
    let oracle = Oracle::new(&world.model);
    oracle.load("sql", &dir).await;
    let want = oracle.greedy(Some("sql"), PROMPT.to_vec(), 8).await;
    assert_eq!(after, want.text);

    // gRPC says the same, as an enum.
    let mut admin = admin_client(&agent).await;
    let load = |uri: String| pb::LoadAdapterRequest {
        adapter: Some(pb::AdapterRef {
            tenant: "default".into(),
            name: "sql".into(),
        }),
        source_uri: uri,
        ..Default::default()
    };
    let uri = dir.display().to_string();
    let r = admin
        .load_adapter(admin_request(load(uri.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome, pb::LoadOutcome::Unchanged as i32);
    std::fs::copy(
        world.adapter("third", 11).join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let r = admin
        .load_adapter(admin_request(load(uri)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome, pb::LoadOutcome::Replaced as i32);
    let digest = r.adapter.unwrap().digest;
    assert_eq!(
        digest,
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
            ))
        )
    );
    // The log shows digests, never Rust's `Some(…)`.
    let log = agent.log();
    assert!(log.contains("sha256:"), "{log}");
    assert!(!log.contains("Some(sha256"), "{log}");
}

/// Reflection answers v1 and v1alpha (grpcurl 1.8 speaks only v1alpha), and lists the client
/// port's services without `KvTransfer`, which only a prefill agent's KV port serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_and_only_served_services() {
    let world = World::tiny();
    let agent = Agent::start(&world, &[]);
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();

    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
    let mut alpha = ServerReflectionClient::new(channel.clone());
    let ask = |m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let answers: Vec<ServerReflectionResponse> = alpha
        .server_reflection_info(futures::stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "loraplane.v1.Inference".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner()
        .map(Result::unwrap)
        .collect()
        .await;
    let Some(MessageResponse::ListServicesResponse(list)) = &answers[0].message_response else {
        panic!("v1alpha list: {:?}", answers[0]);
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "loraplane.v1.Admin",
            "loraplane.v1.Inference",
        ]
    );
    assert!(
        matches!(
            &answers[1].message_response,
            Some(MessageResponse::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty()
        ),
        "{:?}",
        answers[1]
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Request;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Response;
    let first = V1::new(channel.clone())
        .server_reflection_info(futures::stream::iter([
            tonic_reflection::pb::v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(V1Request::ListServices(String::new())),
            },
        ]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    let Some(V1Response::ListServicesResponse(list)) = first.message_response else {
        panic!("v1 list: {first:?}");
    };
    assert!(!list.service.iter().any(|s| s.name.contains("KvTransfer")));
    assert_eq!(list.service.len(), 5, "{list:?}");

    // And KvTransfer, not listed, indeed answers UNIMPLEMENTED here.
    let mut kv = pb::kv_transfer_client::KvTransferClient::new(channel);
    let s = kv
        .prefill(pb::PrefillRequest::default())
        .await
        .expect_err("no KvTransfer on the client port");
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
}

async fn grpc_final(agent: &Agent, prompt: Vec<u32>) -> pb::GenerateResponse {
    let mut client = pb::inference_client::InferenceClient::connect(agent.grpc_url())
        .await
        .unwrap();
    let mut stream = client
        .generate(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                ids: prompt,
            })),
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    last.unwrap()
}

/// In disaggregated mode `Timings.remote_prefill` says whether a prefill agent computed the
/// prompt; the prefill agent itself refuses generation requests on both public surfaces with
/// one clear error (421 / `UNIMPLEMENTED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prefill_is_reported_and_prefill_agents_refuse_clients() {
    let world = World::tiny();
    let token = world.path("cluster-token");
    std::fs::write(&token, "new-user-cluster\n").unwrap();
    let tok = token.to_str().unwrap();
    let prefill = Agent::start(
        &world,
        &[
            "--role",
            "prefill",
            "--kv-addr",
            "127.0.0.1:0",
            "--cluster-token-file",
            tok,
        ],
    );
    let peers = prefill.kv.unwrap().to_string();
    let decode = Agent::start(
        &world,
        &[
            "--role",
            "decode",
            "--prefill-peers",
            &peers,
            "--cluster-token-file",
            tok,
            "--local-prefill-threshold",
            "8",
        ],
    );
    let long = grpc_final(&decode, (1..40).collect()).await;
    assert!(long.timings.unwrap().remote_prefill, "{long:?}");
    let short = grpc_final(&decode, vec![1, 2, 3]).await;
    assert!(!short.timings.unwrap().remote_prefill, "{short:?}");
    let d = scrape(decode.metrics).await;
    assert_eq!(
        metric(&d, "loraplane_prefills_total{where=\"remote\"}"),
        Some(1.0)
    );

    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path.contains("chat") {
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        } else {
            json!({"model": "tiny", "prompt": "hi"})
        };
        let r = post_json(prefill.http, path, None, &body).await;
        assert_eq!(r.status, 421, "{path}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], "prefill_role", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("send them to a decode or unified agent"),
            "{e}"
        );
    }
    let mut client = pb::inference_client::InferenceClient::connect(prefill.grpc_url())
        .await
        .unwrap();
    let s = client
        .generate(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("hi".into())),
            ..Default::default()
        })
        .await
        .expect_err("a prefill agent refuses generation");
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
}

/// A pickle-only adapter gets one message and one status whichever way it is loaded: the
/// admin API (HTTP 400, gRPC `INVALID_ARGUMENT`) and `--adapters` (the same words, logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickle_only_adapter_is_refused_the_same_way_everywhere() {
    let world = World::tiny();
    let dir = world.adapter("adapters/pickled", 2);
    std::fs::rename(
        dir.join("adapter_model.safetensors"),
        dir.join("adapter_model.bin"),
    )
    .unwrap();
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--adapters",
            roots.to_str().unwrap(),
        ],
    );
    const WORDS: &str = "pickle .bin weights are not supported; save the adapter with safetensors";
    assert!(agent.log().contains(WORDS), "{}", agent.log());
    let r = load_http(&agent, "pickled", &dir).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(WORDS),
        "{}",
        r.text()
    );
    let s = admin_client(&agent)
        .await
        .load_adapter(admin_request(pb::LoadAdapterRequest {
            adapter: Some(pb::AdapterRef {
                tenant: "default".into(),
                name: "pickled".into(),
            }),
            source_uri: dir.display().to_string(),
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains(WORDS), "{s:?}");
}

/// `n > 1` is a clear 400 naming `n` (one choice per request), and `--max-n` is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_above_one_is_a_clear_400_and_max_n_is_gone() {
    let world = World::tiny();
    let agent = Agent::start(&world, &[]);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = if path.contains("chat") {
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        } else {
            json!({"model": "tiny", "prompt": "hi"})
        };
        body["n"] = json!(2);
        let r = post_json(agent.http, path, None, &body).await;
        assert_eq!(r.status, 400, "{}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["param"], "n", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("n > 1 is not supported"),
            "{e}"
        );
    }
    let out = Command::new(agent_binary())
        .args(["serve", "--max-n", "2", "--model"])
        .arg(&world.model)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--max-n'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adapters preloaded by `--adapters` report where they came from in `ListAdapters`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_adapters_list_their_source() {
    let world = World::tiny();
    let dir = world.adapter("adapters/sql", 2);
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--adapters",
            roots.to_str().unwrap(),
        ],
    );
    let list = admin_client(&agent)
        .await
        .list_adapters(admin_request(pb::ListAdaptersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let sql = list
        .adapters
        .iter()
        .find(|a| a.adapter.as_ref().unwrap().name == "sql")
        .unwrap();
    assert_eq!(sql.source_uri, dir.display().to_string(), "{sql:?}");
}

/// A tenant over its token budget gets a 429 whose message rounds the wait to whole seconds
/// (as `Retry-After` does), and the refusal is counted per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_counted_and_say_whole_seconds() {
    let world = World::tiny();
    let keys = world.path("keys.json");
    std::fs::write(
        &keys,
        json!({"tenants": [{"id": "team-a", "api_key_sha256": [key_hash("key-a")],
                            "limits": {"max_tokens_per_minute": 6}}]})
        .to_string(),
    )
    .unwrap();
    let agent = Agent::start(&world, &["--api-keys-file", keys.to_str().unwrap()]);
    let body = json!({"model": "tiny", "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "max_tokens": 2});
    let first = post_json(agent.http, "/v1/completions", Some("key-a"), &body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = post_json(agent.http, "/v1/completions", Some("key-a"), &body).await;
    assert_eq!(second.status, 429, "{}", second.text());
    let message = second.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    let secs = second.header("retry-after").unwrap();
    assert!(
        message.ends_with(&format!("retry after {secs} s")),
        "{message} (Retry-After: {secs})"
    );
    let m = scrape(agent.metrics).await;
    assert_eq!(
        metric(&m, "loraplane_rate_limited_total{tenant=\"team-a\"}"),
        Some(1.0),
        "{m}"
    );
}

/// Completions' `text_offset` counts characters, not bytes, in JSON and in SSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_offset_counts_characters() {
    let world = World::tiny();
    let agent = Agent::start(&world, &[]);
    // A sampled output with non-ASCII text (the byte-level fixture vocabulary has many).
    let mut found = false;
    for seed in 0..40 {
        let body = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 24, "logprobs": 0,
                          "temperature": 1.0, "seed": seed});
        let r = post_json(agent.http, "/v1/completions", None, &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let lp = &v["choices"][0]["logprobs"];
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if tokens.iter().all(|t| t.is_ascii()) {
            continue;
        }
        found = true;
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        let mut at = 0;
        for (t, o) in tokens.iter().zip(&offsets) {
            assert_eq!(*o, at, "{tokens:?} {offsets:?}");
            at += t.chars().count() as u64;
        }
        // Streamed: each chunk's offset is the characters streamed before it.
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        let r = post_json(agent.http, "/v1/completions", None, &stream_body).await;
        let mut sent = 0u64;
        for d in sse_data(&r.body) {
            if d == "[DONE]" {
                break;
            }
            let c: Value = serde_json::from_str(&d).unwrap();
            let choice = &c["choices"][0];
            if let Some(o) = choice["logprobs"]["text_offset"][0].as_u64() {
                assert_eq!(o, sent, "{d}");
            }
            sent += choice["text"].as_str().unwrap_or("").chars().count() as u64;
        }
        break;
    }
    assert!(found, "no sampled output had non-ASCII text");
}

/// User errors print one clean line, once, even with `RUST_BACKTRACE` set: a missing `--model`
/// directory (after the logger is up) and an invalid flag value (before).
#[test]
fn user_errors_print_one_line_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let run = |args: &[&str]| {
        let out = Command::new(agent_binary())
            .arg("serve")
            .args(args)
            .args(["--log-format", "text"])
            .env("RUST_BACKTRACE", "full")
            .env("RUST_LIB_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&["--model", missing.to_str().unwrap()]);
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(
        stderr.matches("no-such-model").count(),
        1,
        "the error once:\n{stderr}"
    );
    let stderr = run(&["--model", missing.to_str().unwrap(), "--pool-pages", "0"]);
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}
