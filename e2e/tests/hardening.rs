//! What a hostile or unlucky caller found (issue 16), each over real sockets against a real
//! agent process: malformed gRPC messages, the admin routes' body limit, error bodies of
//! every status, and the other points, one test each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loraplane_e2e::{Agent, HttpResponse, World, http, key_hash};
use loraplane_proto::v1 as pb;
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

const ADMIN: &str = "hardening-admin";

/// A codec that sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Sends `body` as the one request message of `method`; the status the agent answers.
async fn raw_call(agent: &Agent, method: &'static str, body: Vec<u8>, streaming: bool) -> Status {
    let channel = tonic::transport::Channel::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let path = PathAndQuery::from_static(method);
    let result = if streaming {
        match grpc.server_streaming(req, path, RawCodec).await {
            Ok(resp) => resp.into_inner().message().await.map(|_| ()),
            Err(s) => Err(s),
        }
    } else {
        grpc.unary(req, path, RawCodec).await.map(|_| ())
    };
    result.expect_err("a malformed message must be refused")
}

/// Point 3: garbage bytes and invalid UTF-8 in a string field are `INVALID_ARGUMENT`, on the
/// inference and the admin service, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_messages_are_invalid_argument() {
    let world = World::tiny();
    let agent = Agent::start(&world, &["--admin-token-sha256", &key_hash(ADMIN)]);
    let valid = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("AB".into())),
        ..Default::default()
    }
    .encode_to_vec();
    let mut bad_utf8 = valid.clone();
    let at = bad_utf8.windows(2).position(|w| w == b"AB").unwrap();
    bad_utf8[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    let garbage = vec![0xff; 7];
    // A length prefix pointing past the end of the message.
    let truncated = vec![0x1a, 0x7f, b'x'];
    for (what, body) in [
        ("garbage", garbage.clone()),
        ("invalid UTF-8", bad_utf8),
        ("truncated", truncated),
    ] {
        let s = raw_call(&agent, "/loraplane.v1.Inference/Generate", body, true).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    }
    let s = raw_call(&agent, "/loraplane.v1.Admin/LoadAdapter", garbage, false).await;
    assert_eq!(s.code(), Code::InvalidArgument, "admin: {s:?}");
    // The agent still answers a valid request.
    let mut client = pb::inference_client::InferenceClient::connect(agent.grpc_url())
        .await
        .unwrap();
    let mut stream = client
        .generate(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("ok".into())),
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
}

/// Asserts an OpenAI error JSON body with `status`.
fn assert_openai_error(r: &HttpResponse, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {}",
        r.text()
    );
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

/// Point 5: the admin routes honour `--max-request-bytes` like every other route, after the
/// credential, and answer in OpenAI error JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_share_the_body_limit() {
    let world = World::tiny();
    let agent = Agent::start(
        &world,
        &[
            "--max-request-bytes",
            "64KiB",
            "--admin-token-sha256",
            &key_hash(ADMIN),
        ],
    );
    let auth = format!("Bearer {ADMIN}");
    // Valid JSON (unknown fields are ignored), 200 KiB: over the limit, within socket buffers.
    let body = serde_json::json!({
        "lora_name": "x",
        "lora_path": "/nowhere",
        "padding": "p".repeat(200 << 10),
    })
    .to_string();
    for route in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let post = |headers: Vec<(&'static str, String)>| {
            let body = body.clone();
            async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                http(agent.http, "POST", route, &h, body.as_bytes())
                    .await
                    .unwrap()
            }
        };
        let r = post(vec![("Content-Type", "application/json".into())]).await;
        assert_openai_error(&r, 401, &format!("{route} without a credential"));
        let r = post(vec![
            ("Content-Type", "application/json".into()),
            ("Authorization", auth.clone()),
        ])
        .await;
        assert_openai_error(&r, 413, &format!("{route} over the limit"));
        assert!(r.text().contains("65536"), "{}", r.text());
    }
}

/// Point 6: wrong methods (405) and oversized headers (431) answer OpenAI error JSON, like
/// every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_answers_openai_json() {
    let world = World::tiny();
    let agent = Agent::start(&world, &["--admin-token-sha256", &key_hash(ADMIN)]);
    let a = agent.http;
    for (method, path) in [
        ("GET", "/v1/completions"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/models"),
        ("GET", "/v1/load_lora_adapter"),
        ("DELETE", "/v1/unload_lora_adapter"),
        ("POST", "/healthz"),
    ] {
        let r = http(a, method, path, &[], b"").await.unwrap();
        assert_openai_error(&r, 405, &format!("{method} {path}"));
    }
    // One header beyond hyper's own default buffer (400 KiB), and many small ones.
    let huge = "h".repeat(500 << 10);
    let r = http(a, "GET", "/v1/models", &[("X-Huge", huge.as_str())], b"")
        .await
        .unwrap();
    assert_openai_error(&r, 431, "a 500 KiB header");
    let names: Vec<String> = (0..150).map(|i| format!("X-H{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = http(a, "GET", "/v1/models", &many, b"").await.unwrap();
    assert_openai_error(&r, 431, "150 headers");
    let r = http(a, "GET", "/v1/models", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}
