//! The serving surfaces over a scripted [`Inference`] implementation: gRPC over a real
//! loopback socket and HTTP in-process (tower `oneshot`). Pins the wire formats — gRPC
//! message batching and final fields, SSE chunk shapes and `[DONE]`, OpenAI error bodies —
//! independently of the engine. The real binary is exercised end to end in `e2e/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use futures::StreamExt;
use http_body_util::BodyExt;
use loraplane_agent::api::auth::{Caller, Tenants};
use loraplane_agent::api::error::ApiError;
use loraplane_agent::api::service::{
    GenerateSpec, Generation, Inference, ModelCard, Prompt, RequestBounds,
};
use loraplane_agent::api::{grpc, http};
use loraplane_agent::engine::{Event, FinishReason, Timings, Usage};
use loraplane_agent::metrics::Surface;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use tower::ServiceExt;

/// Answers every request with the tokens 1..=3 ("a", "b", "c"); `missing` is not found.
#[derive(Clone)]
struct Scripted {
    tenants: Tenants,
    bounds: RequestBounds,
}

impl Scripted {
    fn new() -> Self {
        Scripted {
            tenants: Tenants::new(vec![]).unwrap(),
            bounds: RequestBounds::default(),
        }
    }
}

impl Inference for Scripted {
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        self.tenants.authenticate(token)
    }

    async fn generate(
        &self,
        _caller: &Caller,
        spec: GenerateSpec,
        _surface: Surface,
    ) -> Result<Generation, ApiError> {
        if spec.model == "missing" {
            return Err(ApiError::ModelNotFound { model: spec.model });
        }
        assert!(matches!(
            spec.prompt,
            Prompt::Text { .. } | Prompt::Chat { .. }
        ));
        let token = |id: u32, text: &str| Event::Token {
            id,
            text: text.into(),
            logprob: Some(-0.5),
            logits: None,
        };
        let events = vec![
            token(1, "a"),
            token(2, "b"),
            token(3, ""),
            Event::Finished {
                reason: FinishReason::Length,
                text: "c".into(),
                usage: Usage {
                    prompt_tokens: 4,
                    completion_tokens: 3,
                    cached_prompt_tokens: 0,
                },
                timings: Timings {
                    total: Duration::from_millis(2),
                    ..Timings::default()
                },
                error: None,
            },
        ];
        Ok(Generation {
            id: "r1".into(),
            model: spec.model,
            prompt_tokens: 4,
            created: 7,
            events: Box::pin(futures::stream::iter(events)),
        })
    }

    async fn models(&self, _caller: &Caller) -> Result<Vec<ModelCard>, ApiError> {
        Ok(vec![ModelCard {
            id: "base".into(),
            owned_by: "loraplane".into(),
            parent: None,
        }])
    }

    fn bounds(&self) -> &RequestBounds {
        &self.bounds
    }

    fn refused(&self, _surface: Surface, _error: &ApiError) {}

    fn token_text(&self, id: u32) -> String {
        format!("t{id}")
    }

    fn ready(&self) -> bool {
        true
    }

    async fn metrics_text(&self) -> String {
        "# empty\n".into()
    }
}

#[tokio::test]
async fn grpc_over_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc::inference_server(Scripted::new()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = pb::GenerateRequest {
        request_id: "mine".into(),
        prompt: Some(pb::generate_request::Prompt::Text("hi".into())),
        logprobs: true,
        ..Default::default()
    };
    let mut stream = client.generate(req.clone()).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.next().await {
        messages.push(m.unwrap());
    }
    // The scripted events are all ready at once: one message carries everything.
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.request_id, "mine");
    assert_eq!(m.token_ids, [1, 2, 3]);
    assert_eq!(m.text, "abc");
    assert_eq!(m.logprobs, [-0.5, -0.5, -0.5]);
    assert_eq!(m.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(m.usage.unwrap().completion_tokens, 3);
    assert_eq!(m.timings.unwrap().total_us, 2000);

    let missing = pb::GenerateRequest {
        adapter: "missing".into(),
        ..req.clone()
    };
    let e = client.generate(missing).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "The model `missing` does not exist.");
    let e = client
        .generate(pb::GenerateRequest {
            prompt: None,
            ..req
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

async fn call(body: &str, path: &str) -> (StatusCode, String) {
    let router = http::router(Scripted::new());
    let resp = router
        .oneshot(
            HttpRequest::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn http_wire_formats() {
    let (s, body) = call(
        r#"{"model":"m","prompt":"hi","logprobs":0}"#,
        "/v1/completions",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["id"], "cmpl-r1");
    assert_eq!(v["choices"][0]["text"], "abc");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"],
        serde_json::json!(["t1", "t2", "t3"])
    );
    assert_eq!(v["usage"]["total_tokens"], 7);

    let (s, body) = call(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        "/v1/chat/completions",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let data: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    // role chunk, "a", "b", final "c" + finish, usage, [DONE]
    assert_eq!(data.len(), 6, "{body}");
    let chunk = |i: usize| serde_json::from_str::<serde_json::Value>(data[i]).unwrap();
    assert_eq!(chunk(0)["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunk(1)["choices"][0]["delta"]["content"], "a");
    assert!(chunk(1)["usage"].is_null());
    assert_eq!(chunk(3)["choices"][0]["finish_reason"], "length");
    assert_eq!(chunk(3)["choices"][0]["delta"]["content"], "c");
    assert_eq!(chunk(4)["choices"], serde_json::json!([]));
    assert_eq!(chunk(4)["usage"]["completion_tokens"], 3);
    assert_eq!(data[5], "[DONE]");

    let (s, body) = call(r#"{"model":"missing","prompt":"x"}"#, "/v1/completions").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        r#"{"error":{"message":"The model `missing` does not exist.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
    );
    let (s, body) = call(r#"{"model":"m","prompt":"x","n":3}"#, "/v1/completions").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains(r#""param":"n""#), "{body}");
}
