//! Tool calling on the HTTP surface over a scripted [`Inference`] whose output is the request's
//! last message (split into tokens at `|`): pins how tool calls read out of the text reach the
//! wire, whole and streamed, independently of the engine and the chat template. The real model,
//! template and constraint are exercised end to end in `e2e/tests/tools.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use loraplane_agent::api::auth::{Caller, Tenants};
use loraplane_agent::api::error::ApiError;
use loraplane_agent::api::http;
use loraplane_agent::api::service::{
    GenerateSpec, Generation, Inference, ModelCard, Prompt, RequestBounds,
};
use loraplane_agent::engine::{Event, FinishReason, Timings, Usage};
use loraplane_agent::metrics::Surface;
use serde_json::{Value, json};
use tower::ServiceExt;

/// Generates the last message's content, one token per `|`-separated piece; a last message of
/// `!schema` fails as a schema that does not compile does.
#[derive(Clone)]
struct Echo {
    tenants: Tenants,
    bounds: RequestBounds,
}

impl Inference for Echo {
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        self.tenants.authenticate(token)
    }

    async fn generate(
        &self,
        _caller: &Caller,
        spec: GenerateSpec,
        _surface: Surface,
    ) -> Result<Generation, ApiError> {
        let Prompt::Chat { messages, .. } = spec.prompt else {
            panic!("a chat prompt");
        };
        let script = messages.last().unwrap().content.clone();
        if script == "!schema" {
            return Err(ApiError::invalid(
                "response_format",
                "invalid JSON schema: Unknown type: objekt",
            ));
        }
        let pieces: Vec<&str> = script.split('|').collect();
        let mut events: Vec<Event> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| Event::Token {
                id: i as u32,
                text: (*p).to_owned(),
                logprob: None,
                logits: None,
            })
            .collect();
        events.push(Event::Finished {
            reason: FinishReason::Stop,
            text: String::new(),
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: pieces.len(),
                cached_prompt_tokens: 0,
            },
            timings: Timings {
                total: Duration::from_millis(1),
                ..Timings::default()
            },
            error: None,
        });
        Ok(Generation {
            id: "r1".into(),
            model: spec.model,
            prompt_tokens: 4,
            created: 7,
            events: Box::pin(futures::stream::iter(events)),
        })
    }

    async fn models(&self, _caller: &Caller) -> Result<Vec<ModelCard>, ApiError> {
        Ok(Vec::new())
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
        String::new()
    }
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn body(script: &str, tool_choice: Value, stream: bool) -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": script}],
        "tools": [weather()],
        "tool_choice": tool_choice,
        "stream": stream,
    })
}

async fn call(body: &Value) -> (StatusCode, String) {
    let router = http::router(Echo {
        tenants: Tenants::new(vec![]).unwrap(),
        bounds: RequestBounds::default(),
    });
    let resp = router
        .oneshot(
            HttpRequest::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The non-streamed choice.
async fn whole(script: &str, tool_choice: Value) -> Value {
    let (s, text) = call(&body(script, tool_choice, false)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["choices"][0].clone()
}

/// The streamed chunks' choices (after the role chunk, before `[DONE]`).
async fn streamed(script: &str, tool_choice: Value) -> Vec<Value> {
    let (s, text) = call(&body(script, tool_choice, true)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[1..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0].clone())
        .collect()
}

fn content_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect()
}

const CALL: &str = r#"Checking.|
<tool|_call>
{"name": "get_weather", |"arguments": {"city": "Lima"}}
</tool_call>"#;

#[tokio::test]
async fn auto_reads_hermes_calls_out_of_the_text() {
    let choice = whole(CALL, json!("auto")).await;
    assert_eq!(choice["finish_reason"], "tool_calls");
    let m = &choice["message"];
    assert_eq!(m["content"], "Checking.\n");
    assert_eq!(
        m["tool_calls"],
        json!([{"id": "call_r1_0", "type": "function",
                "function": {"name": "get_weather", "arguments": r#"{"city":"Lima"}"#}}])
    );

    // Streamed: the text before the block as it comes, the call whole at the end.
    let chunks = streamed(CALL, json!("auto")).await;
    let last = chunks.last().unwrap();
    assert_eq!(last["finish_reason"], "tool_calls");
    assert_eq!(last["delta"]["tool_calls"][0]["index"], 0);
    assert_eq!(last["delta"]["tool_calls"][0]["id"], "call_r1_0");
    assert_eq!(
        last["delta"]["tool_calls"][0]["function"],
        m["tool_calls"][0]["function"]
    );
    assert_eq!(content_of(&chunks), "Checking.\n");
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["delta"].get("tool_calls").is_none())
    );
}

#[tokio::test]
async fn malformed_calls_and_tool_choice_none_stay_content() {
    let broken = r#"<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>"#;
    for (script, tool_choice) in [(broken, json!("auto")), (CALL, json!("none"))] {
        let choice = whole(script, tool_choice.clone()).await;
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["content"], script.replace('|', ""));
        assert!(choice["message"].get("tool_calls").is_none(), "{choice}");
        let chunks = streamed(script, tool_choice).await;
        assert_eq!(content_of(&chunks), script.replace('|', ""));
        assert_eq!(chunks.last().unwrap()["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn a_forced_call_is_the_whole_output() {
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let choice = whole(r#"{"city":|"Oslo"}"#, named.clone()).await;
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"],
        json!({"name": "get_weather", "arguments": r#"{"city":"Oslo"}"#})
    );
    let chunks = streamed(r#"{"city":|"Oslo"}"#, named).await;
    assert_eq!(content_of(&chunks), "", "nothing is sent as content");
    assert_eq!(
        chunks.last().unwrap()["delta"]["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Oslo"}"#
    );

    let choice = whole(
        r#"[{"name":"get_weather","arguments":{"city":"Rome"}}]"#,
        json!("required"),
    )
    .await;
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Rome"}"#
    );
}

#[tokio::test]
async fn refusals_name_the_tools() {
    // A parameters schema that does not compile is the tools' fault, not response_format's.
    let (s, text) = call(&body("!schema", json!("required"), false)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["param"], "tools", "{text}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("objekt"),
        "{text}"
    );
    let (s, text) = call(&body(
        "x",
        json!({"type": "function", "function": {"name": "nope"}}),
        false,
    ))
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(text.contains(r#""param":"tool_choice""#), "{text}");
}
