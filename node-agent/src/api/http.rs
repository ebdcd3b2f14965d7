//! HTTP surface (axum): the OpenAI-compatible `/v1/completions`, `/v1/chat/completions`
//! (JSON or SSE streaming ending in `data: [DONE]`) and `/v1/models`, plus `/healthz` and
//! `/readyz` ([`app`]); `/metrics` on its own listener ([`metrics_router`]). Generic over the
//! [`Inference`] domain trait.
//!
//! Bodies are read as bytes under the configured size limit and decoded by hand, so every
//! refusal — oversized, not JSON, invalid UTF-8, a wrong type, an unknown route, a wrong
//! method, oversized headers — is an OpenAI error JSON with the right status rather than a
//! framework default. The API key is `Authorization: Bearer`.
//!
//! `model` names an adapter of the caller's tenant, or the base model by its served name,
//! `base`, or an empty string.

use std::convert::Infallible;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::api::auth::{Caller, bearer_from_headers};
use crate::api::error::ApiError;
use crate::api::openai::{self, Shape, TokenLogprobs};
use crate::api::service::{GenerateSpec, Generation, Inference};
use crate::api::tools::{self, ToolStream};
use crate::engine::{Event, FinishReason, Usage};
use crate::metrics::Surface;

/// The OpenAI routes, health and metrics over `service`, with the limits and error answers of
/// [`app`] (no extra routes).
pub fn router<S: Inference>(service: S) -> Router {
    app(service, Router::new())
}

/// Every HTTP route of the agent: the OpenAI routes, health and metrics over `service`, plus
/// `extra` (the admin routes). One body limit (`max_request_bytes`) covers every route, and
/// whatever goes wrong — an unknown route, a wrong method, oversized headers, an oversized body —
/// is answered with OpenAI error JSON, never a framework default.
pub fn app<S: Inference>(service: S, extra: Router) -> Router {
    let limit = service.bounds().max_request_bytes;
    Router::new()
        .route("/v1/completions", post(completions::<S>))
        .route("/v1/chat/completions", post(chat_completions::<S>))
        .route("/v1/models", get(models::<S>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .with_state(service)
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(header_limit))
}

/// The metrics listener's routes: `/metrics` (Prometheus text), `/healthz`; anything else is a
/// 404 in OpenAI error JSON. Served apart from [`app`] (`--metrics-addr`), because the series
/// name tenants and their adapters.
pub fn metrics_router<S: Inference>(service: S) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(healthz))
        .with_state(service)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(header_limit))
}

async fn not_found() -> Response {
    ApiError::RouteNotFound.into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
    }
    .into_response()
}

/// Most bytes of request headers (names, values and the request target) the agent reads.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Most header fields in one request.
pub const MAX_HEADER_COUNT: usize = 100;

/// Refuses requests whose headers exceed [`MAX_HEADER_BYTES`] or [`MAX_HEADER_COUNT`] with a 431
/// in OpenAI error JSON. (The listener lets hyper parse well beyond these limits, so that this
/// check, not hyper's bare 431, answers; see `api/listener.rs`.)
async fn header_limit(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = req.headers();
    let bytes = req.uri().to_string().len()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if bytes > MAX_HEADER_BYTES || headers.len() > MAX_HEADER_COUNT {
        return ApiError::HeadersTooLarge {
            limit_bytes: MAX_HEADER_BYTES,
            limit_count: MAX_HEADER_COUNT,
        }
        .into_response();
    }
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<S: Inference>(State(s): State<S>) -> Response {
    if s.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        ApiError::Draining {
            retry_after: std::time::Duration::from_secs(1),
        }
        .into_response()
    }
}

async fn metrics<S: Inference>(State(s): State<S>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics_text().await,
    )
        .into_response()
}

async fn models<S: Inference>(State(s): State<S>, headers: HeaderMap) -> Response {
    let caller = match s.authenticate(bearer_from_headers(&headers)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match s.models(&caller).await {
        Ok(cards) => {
            let data: Vec<Value> = cards
                .into_iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "object": "model",
                        "created": 0,
                        "owned_by": c.owned_by,
                        "root": c.id,
                        "parent": c.parent,
                    })
                })
                .collect();
            axum::Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn surface(self) -> Surface {
        match self {
            Kind::Completion => Surface::Completions,
            Kind::Chat => Surface::ChatCompletions,
        }
    }
}

async fn completions<S: Inference>(
    State(s): State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(s, headers, body, Kind::Completion).await
}

async fn chat_completions<S: Inference>(
    State(s): State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(s, headers, body, Kind::Chat).await
}

/// Authenticates and decodes a request (errors here are the transport's to count).
fn decode<S: Inference>(
    s: &S,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<(Caller, GenerateSpec, Shape), ApiError> {
    let caller = s.authenticate(bearer_from_headers(headers))?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: s.bounds().max_request_bytes,
            }
        } else {
            ApiError::InvalidArgument {
                param: None,
                message: format!("could not read the request body: {e}"),
            }
        }
    })?;
    let (spec, shape) = match kind {
        Kind::Completion => openai::completion_spec(openai::parse(&body)?)?,
        Kind::Chat => openai::chat_spec(openai::parse(&body)?)?,
    };
    Ok((caller, spec, shape))
}

async fn serve<S: Inference>(
    s: S,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Response {
    let surface = kind.surface();
    let (caller, spec, shape) = match decode(&s, &headers, body, kind) {
        Ok(v) => v,
        Err(e) => {
            s.refused(surface, &e);
            return e.into_response();
        }
    };
    // `generate` counts its own refusals.
    let generation = match s.generate(&caller, spec, surface).await {
        Ok(g) => g,
        Err(e) => return tools::blame_tools(&shape.tools, e).into_response(),
    };
    if shape.stream {
        Sse::new(sse(s, generation, shape, kind)).into_response()
    } else {
        match collect(&s, generation, shape, kind).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(e) => {
                s.refused(surface, &e);
                e.into_response()
            }
        }
    }
}

fn object_id(kind: Kind, id: &str) -> String {
    match kind {
        Kind::Completion => format!("cmpl-{id}"),
        Kind::Chat => format!("chatcmpl-{id}"),
    }
}

/// Runs a request to the end and builds the JSON response.
async fn collect<S: Inference>(
    s: &S,
    mut g: Generation,
    shape: Shape,
    kind: Kind,
) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut logprobs: TokenLogprobs = Vec::new();
    let (reason, usage) = loop {
        match g.events.next().await {
            None => return Err(ApiError::Engine(crate::engine::EngineError::Stopped)),
            Some(Event::Token {
                id,
                text: t,
                logprob,
                ..
            }) => {
                text.push_str(&t);
                if shape.logprobs {
                    logprobs.push((s.token_text(id), logprob.unwrap_or(f32::NAN)));
                }
            }
            Some(Event::Finished {
                reason,
                text: t,
                usage,
                error,
                ..
            }) => {
                if reason == FinishReason::Error {
                    return Err(ApiError::GenerationFailed(
                        error.unwrap_or_else(|| "unknown error".into()),
                    ));
                }
                text.push_str(&t);
                break (reason, usage);
            }
        }
    };
    let id = object_id(kind, &g.id);
    Ok(match kind {
        Kind::Completion => json!({
            "id": id,
            "object": "text_completion",
            "created": g.created,
            "model": g.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": if shape.logprobs { openai::completion_logprobs(&logprobs, 0) } else { Value::Null },
                "finish_reason": openai::finish_reason(reason),
            }],
            "usage": openai::usage_json(usage),
        }),
        Kind::Chat => {
            let outcome = tools::outcome(&shape.tools, text, reason);
            json!({
                "id": id,
                "object": "chat.completion",
                "created": g.created,
                "model": g.model,
                "choices": [{
                    "index": 0,
                    "message": tools::message(&outcome, &g.id),
                    "logprobs": if shape.logprobs { openai::chat_logprobs(&logprobs) } else { Value::Null },
                    "finish_reason": outcome.finish,
                }],
                "usage": openai::usage_json(usage),
            })
        }
    })
}

/// Streaming state: the generation and what has been sent.
struct SseState<S> {
    s: S,
    g: Generation,
    shape: Shape,
    kind: Kind,
    id: String,
    started: bool,
    /// Characters of text sent so far (completions' `text_offset`).
    sent: usize,
    done: bool,
    /// A chat output whose tool calls are read at the end.
    tools: Option<ToolStream>,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl<S: Inference> SseState<S> {
    /// One chunk carrying `text` (and the token's log-probability) and maybe a finish reason.
    fn chunk(&self, text: &str, lp: Option<(String, f32)>, finish: Option<&str>) -> Value {
        let logprobs = lp.map(|lp| match self.kind {
            Kind::Completion => openai::completion_logprobs(&vec![lp], self.sent),
            Kind::Chat => openai::chat_logprobs(&vec![lp]),
        });
        match self.kind {
            Kind::Completion => self.wrap(vec![json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
            })]),
            Kind::Chat => {
                let delta = if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                self.chat_chunk(delta, logprobs, finish)
            }
        }
    }

    fn chat_chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        self.wrap(vec![json!({
            "index": 0,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        })])
    }

    fn wrap(&self, choices: Vec<Value>) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.g.created,
            "model": self.g.model,
            "choices": choices,
        });
        if self.shape.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.wrap(Vec::new());
        v["usage"] = openai::usage_json(usage);
        v
    }

    /// The SSE events for the next engine event; `None` once everything was sent.
    async fn next_events(&mut self) -> Option<Vec<SseEvent>> {
        if self.done {
            return None;
        }
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if self.kind == Kind::Chat {
                let choice = json!({
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                });
                out.push(data(&self.wrap(vec![choice])));
                return Some(out);
            }
        }
        match self.g.events.next().await {
            None => {
                self.done = true;
                let e = ApiError::Engine(crate::engine::EngineError::Stopped).reply();
                out.push(SseEvent::default().data(e.openai_json()));
                out.push(SseEvent::default().data("[DONE]"));
            }
            Some(Event::Token {
                id, text, logprob, ..
            }) => {
                let text = match &mut self.tools {
                    Some(t) => t.push(&text),
                    None => text,
                };
                let lp = self
                    .shape
                    .logprobs
                    .then(|| (self.s.token_text(id), logprob.unwrap_or(f32::NAN)));
                if !text.is_empty() || lp.is_some() {
                    out.push(data(&self.chunk(&text, lp, None)));
                    self.sent += text.chars().count();
                }
            }
            Some(Event::Finished {
                reason,
                text,
                usage,
                error,
                ..
            }) => {
                self.done = true;
                if reason == FinishReason::Error {
                    let e = ApiError::GenerationFailed(error.unwrap_or_default()).reply();
                    out.push(SseEvent::default().data(e.openai_json()));
                } else {
                    let last = match self.tools.take() {
                        Some(t) => {
                            let (delta, finish) = t.finish(&text, reason, &self.g.id);
                            self.chat_chunk(delta, None, Some(finish))
                        }
                        None => self.chunk(&text, None, Some(openai::finish_reason(reason))),
                    };
                    out.push(data(&last));
                    if self.shape.include_usage {
                        out.push(data(&self.usage_chunk(usage)));
                    }
                }
                out.push(SseEvent::default().data("[DONE]"));
            }
        }
        Some(out)
    }
}

/// The SSE body. Dropping it (the client went away) drops the generation, which cancels the
/// request in the engine.
fn sse<S: Inference>(
    s: S,
    g: Generation,
    shape: Shape,
    kind: Kind,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let state = SseState {
        id: object_id(kind, &g.id),
        tools: ToolStream::new(&shape.tools),
        s,
        g,
        shape,
        kind,
        started: false,
        sent: 0,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        let events = st.next_events().await?;
        Some((futures::stream::iter(events.into_iter().map(Ok)), st))
    })
    .flatten()
}
