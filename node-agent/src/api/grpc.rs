//! gRPC surface: `loraplane.v1.Inference/Generate` (server streaming), generic over the
//! [`Inference`] domain trait, plus server reflection (v1 and v1alpha). Health (`grpc.health.v1`) is wired in
//! `serve`, which owns the serving status.
//!
//! Requests are validated here, at the edge, into `INVALID_ARGUMENT` before anything reaches
//! the engine. The API key travels as `authorization: Bearer <key>` metadata. Responses batch
//! the tokens that are ready when the client can take more (one message per engine step under
//! load, one per token when the client keeps up); the last message carries the finish reason,
//! usage and timings. A client that cancels the call drops the stream, which cancels the
//! request in the engine and frees its pages.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_server::{self, InferenceServer};
use tonic::{Request, Response, Status};

use crate::api::error::ApiError;
use crate::api::service::{GenerateSpec, Generation, Inference, Prompt, Sampling};
use crate::credential::bearer_from_metadata;
use crate::engine::{AdapterUse, Event, FinishReason};
use crate::metrics::Surface;
use crate::model::tokenizer::ChatMessage;
use crate::structured::ResponseFormat;

/// Longest caller-chosen request id echoed back.
const MAX_REQUEST_ID_BYTES: usize = 256;
/// Tokens per response message at most (keeps messages small under bursts).
const MAX_TOKENS_PER_MESSAGE: usize = 64;

/// The `Inference` service over any [`Inference`] implementation.
#[derive(Debug, Clone)]
pub struct InferenceGrpc<S> {
    service: S,
}

/// The tonic server for `loraplane.v1.Inference`, with the message size bound applied.
pub fn inference_server<S: Inference>(service: S) -> InferenceServer<InferenceGrpc<S>> {
    let limit = service.bounds().max_request_bytes;
    InferenceServer::new(InferenceGrpc { service })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit.max(4 << 20))
}

/// The services the client port serves, as reflection lists them. `KvTransfer` is in the
/// same descriptor set but served only on a prefill agent's KV port, so it is not listed here.
pub const CLIENT_PORT_SERVICES: &[&str] = &[
    "loraplane.v1.Inference",
    "loraplane.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    CLIENT_PORT_SERVICES.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(loraplane_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version's own descriptors, so either one resolves both services.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false),
        |b, name| b.with_service_name(*name),
    )
}

/// Server reflection, v1 and v1alpha (older clients such as grpcurl 1.8 speak only v1alpha),
/// over the loraplane protos and `grpc.health.v1`, listing [`CLIENT_PORT_SERVICES`].
///
/// Errors: a descriptor set that does not decode (a build problem).
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    Ok((
        reflection_builder().build_v1()?,
        reflection_builder().build_v1alpha()?,
    ))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        param: None,
        message: message.into(),
    }
}

/// Decodes and validates a `GenerateRequest` into the domain request.
///
/// Errors: a missing prompt, an unknown chat role, an over-long request id.
pub fn to_spec(req: pb::GenerateRequest) -> Result<(String, GenerateSpec), ApiError> {
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(invalid(format!(
            "request_id is at most {MAX_REQUEST_ID_BYTES} bytes"
        )));
    }
    let prompt = match req.prompt {
        None => return Err(invalid("a prompt (text, token_ids or chat) is required")),
        Some(pb::generate_request::Prompt::Text(text)) => Prompt::Text {
            text,
            add_special_tokens: !req.skip_special_tokens,
        },
        Some(pb::generate_request::Prompt::TokenIds(ids)) => Prompt::Tokens(ids.ids),
        Some(pb::generate_request::Prompt::Chat(chat)) => {
            if chat.messages.is_empty() {
                return Err(invalid("chat.messages must not be empty"));
            }
            let mut messages = Vec::with_capacity(chat.messages.len());
            for m in chat.messages {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                    return Err(invalid(
                        "chat message roles are system, user, assistant or tool",
                    ));
                }
                messages.push(ChatMessage::new(m.role, m.content));
            }
            Prompt::Chat {
                messages,
                add_generation_prompt: chat.add_generation_prompt,
                tools: None,
            }
        }
    };
    let response_format = req
        .response_format
        .and_then(|f| f.format)
        .map(response_format)
        .transpose()?;
    let s = req.sampling.unwrap_or_default();
    let sampling = Sampling {
        temperature: s.temperature,
        top_k: s.top_k.filter(|k| *k > 0),
        top_p: s.top_p.filter(|p| *p != 1.0),
        seed: s.seed,
        max_tokens: s.max_tokens.map(u64::from),
        stop: s.stop,
        stop_token_ids: s.stop_token_ids,
        ignore_eos: s.ignore_eos,
        logprobs: req.logprobs,
    };
    Ok((
        req.request_id,
        GenerateSpec {
            model: req.adapter,
            prompt,
            sampling,
            cache_salt: crate::api::service::cache_salt(req.cache_salt)?,
            response_format,
            // Empty: `adapter` alone says (a repeated field cannot tell unset from empty).
            adapters: (!req.adapters.is_empty()).then(|| {
                req.adapters
                    .into_iter()
                    .map(|a| AdapterUse {
                        name: a.name,
                        scale: a.scale.unwrap_or(1.0),
                    })
                    .collect()
            }),
        },
    ))
}

/// The wire's response format as the domain's.
///
/// Errors: a schema that is not a JSON object.
pub fn response_format(f: pb::response_format::Format) -> Result<ResponseFormat, ApiError> {
    match f {
        pb::response_format::Format::JsonObject(_) => Ok(ResponseFormat::JsonObject),
        pb::response_format::Format::JsonSchema(js) => {
            ResponseFormat::json_schema_text(js.name, &js.schema, js.strict)
                .map_err(|e| invalid(e.to_string()))
        }
    }
}

fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::Error => pb::FinishReason::Error,
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Engine events as `GenerateResponse` messages.
pub struct ResponseStream {
    generation: Generation,
    request_id: String,
    finished: bool,
}

impl ResponseStream {
    fn message(&self) -> pb::GenerateResponse {
        pb::GenerateResponse {
            request_id: self.request_id.clone(),
            ..Default::default()
        }
    }
}

impl Stream for ResponseStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let mut out: Option<pb::GenerateResponse> = None;
        loop {
            let event = match self.generation.events.as_mut().poll_next(cx) {
                Poll::Pending => return out.map_or(Poll::Pending, |m| Poll::Ready(Some(Ok(m)))),
                Poll::Ready(e) => e,
            };
            match event {
                None => {
                    self.finished = true;
                    return Poll::Ready(Some(Err(Status::unavailable(
                        "the engine stopped before the request finished",
                    ))));
                }
                Some(Event::Token {
                    id, text, logprob, ..
                }) => {
                    let m = match out.as_mut() {
                        Some(m) => m,
                        None => out.insert(self.message()),
                    };
                    m.token_ids.push(id);
                    m.text.push_str(&text);
                    if let Some(lp) = logprob {
                        m.logprobs.push(lp);
                    }
                    if m.token_ids.len() >= MAX_TOKENS_PER_MESSAGE {
                        return Poll::Ready(out.map(Ok));
                    }
                }
                Some(Event::Finished {
                    reason,
                    text,
                    usage,
                    timings,
                    error,
                }) => {
                    let mut m = out.take().unwrap_or_else(|| self.message());
                    m.text.push_str(&text);
                    m.finish_reason = finish_reason(reason) as i32;
                    m.usage = Some(pb::Usage {
                        prompt_tokens: u32::try_from(usage.prompt_tokens).unwrap_or(u32::MAX),
                        completion_tokens: u32::try_from(usage.completion_tokens)
                            .unwrap_or(u32::MAX),
                        cached_prompt_tokens: u32::try_from(usage.cached_prompt_tokens)
                            .unwrap_or(u32::MAX),
                    });
                    m.timings = Some(pb::Timings {
                        queue_us: micros(timings.queue),
                        time_to_first_token_us: micros(timings.time_to_first_token),
                        total_us: micros(timings.total),
                        remote_prefill: timings.remote_prefill,
                    });
                    m.error = error.unwrap_or_default();
                    self.finished = true;
                    return Poll::Ready(Some(Ok(m)));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl<S: Inference> inference_server::Inference for InferenceGrpc<S> {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let refuse = |e: ApiError| {
            self.service.refused(Surface::Grpc, &e);
            Status::from(e)
        };
        let caller = self
            .service
            .authenticate(bearer_from_metadata(request.metadata()))
            .map_err(refuse)?;
        let (client_id, spec) = to_spec(request.into_inner()).map_err(refuse)?;
        // `generate` counts its own refusals.
        let generation = self
            .service
            .generate(&caller, spec, Surface::Grpc)
            .await
            .map_err(Status::from)?;
        let request_id = if client_id.is_empty() {
            generation.id.clone()
        } else {
            client_id
        };
        Ok(Response::new(ResponseStream {
            generation,
            request_id,
            finished: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_validation() {
        let req = |prompt| pb::GenerateRequest {
            prompt,
            ..Default::default()
        };
        assert!(matches!(
            to_spec(req(None)),
            Err(ApiError::InvalidArgument { .. })
        ));
        let chat = pb::ChatPrompt {
            messages: vec![pb::ChatMessage {
                role: "wizard".into(),
                content: "hi".into(),
            }],
            add_generation_prompt: true,
        };
        assert!(to_spec(req(Some(pb::generate_request::Prompt::Chat(chat)))).is_err());
        let (id, spec) = to_spec(pb::GenerateRequest {
            request_id: "r1".into(),
            adapter: "a".into(),
            prompt: Some(pb::generate_request::Prompt::Text("hi".into())),
            sampling: Some(pb::SamplingParams {
                top_k: Some(0),
                top_p: Some(1.0),
                max_tokens: Some(3),
                ..Default::default()
            }),
            logprobs: true,
            skip_special_tokens: true,
            cache_salt: Some("s".into()),
            response_format: None,
            adapters: Vec::new(),
        })
        .unwrap();
        assert_eq!(id, "r1");
        assert_eq!(spec.model, "a");
        assert_eq!(spec.adapters, None, "no list: `adapter` alone says");
        let (_, composed) = to_spec(pb::GenerateRequest {
            adapters: vec![
                pb::ScaledAdapter {
                    name: "b".into(),
                    scale: Some(0.25),
                },
                pb::ScaledAdapter {
                    name: "c".into(),
                    scale: None,
                },
            ],
            ..req(Some(pb::generate_request::Prompt::Text("hi".into())))
        })
        .unwrap();
        assert_eq!(
            composed.adapters,
            Some(vec![
                AdapterUse {
                    name: "b".into(),
                    scale: 0.25
                },
                AdapterUse::plain("c")
            ])
        );
        assert_eq!(spec.cache_salt.as_deref(), Some("s"));
        let salted = |salt: &str| {
            to_spec(pb::GenerateRequest {
                cache_salt: Some(salt.into()),
                ..req(Some(pb::generate_request::Prompt::Text("hi".into())))
            })
        };
        assert!(matches!(salted(""), Err(ApiError::InvalidArgument { .. })));
        assert!(salted(&"s".repeat(crate::engine::MAX_CACHE_SALT_BYTES + 1)).is_err());
        assert_eq!(
            spec.prompt,
            Prompt::Text {
                text: "hi".into(),
                add_special_tokens: false
            }
        );
        assert_eq!(
            (
                spec.sampling.top_k,
                spec.sampling.top_p,
                spec.sampling.max_tokens
            ),
            (None, None, Some(3))
        );
        assert!(spec.sampling.logprobs);
        assert_eq!(spec.response_format, None);
    }

    #[test]
    fn response_formats_at_the_edge() {
        let with = |format| pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("hi".into())),
            response_format: Some(pb::ResponseFormat {
                format: Some(format),
            }),
            ..Default::default()
        };
        let (_, spec) = to_spec(with(pb::response_format::Format::JsonObject(
            pb::JsonObject {},
        )))
        .unwrap();
        assert_eq!(spec.response_format, Some(ResponseFormat::JsonObject));
        let schema = |text: &str| {
            pb::response_format::Format::JsonSchema(pb::JsonSchema {
                name: "n".into(),
                schema: text.into(),
                strict: false,
            })
        };
        let (_, spec) = to_spec(with(schema(r#"{"type":"integer"}"#))).unwrap();
        assert!(matches!(
            spec.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        for bad in ["not json", "[1]", ""] {
            let e = to_spec(with(schema(bad))).unwrap_err();
            assert!(e.to_string().contains("schema"), "{bad}: {e}");
        }
    }
}
