//! The API layer's error type and its ONE mapping to wire statuses.
//!
//! [`ApiError::reply`] is the single exhaustive `match` (no wildcard arm) from every domain
//! error — the API's own and every [`EngineError`] variant — to an HTTP status with an OpenAI
//! error body and to a gRPC code. Both transports derive from it, so they can never disagree,
//! and a new error variant anywhere fails to compile until someone decides its status.
//!
//! A missing adapter and another tenant's adapter both become [`ApiError::ModelNotFound`] with
//! only the requested name in the message, so their answers are byte-identical.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::model::ModelError;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthenticated,
    #[error("this route requires the admin credential")]
    PermissionDenied,
    #[error("{message}")]
    InvalidArgument {
        /// The request field at fault, when there is one (OpenAI's `param`).
        param: Option<&'static str>,
        message: String,
    },
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("The model `{model}` does not exist.")]
    ModelNotFound { model: String },
    /// The message rounds the wait up to whole seconds, as the `Retry-After` header does.
    #[error("{reason}; retry after {} s", secs(*retry_after).max(1))]
    RateLimited {
        reason: &'static str,
        retry_after: Duration,
    },
    #[error("the agent is draining and accepts no new requests")]
    Draining { retry_after: Duration },
    #[error("generation failed: {0}")]
    GenerationFailed(String),
    #[error("not found")]
    RouteNotFound,
    #[error("this route does not accept the {method} method")]
    MethodNotAllowed { method: String },
    #[error("request headers exceed the limit of {limit_bytes} bytes or {limit_count} fields")]
    HeadersTooLarge {
        limit_bytes: usize,
        limit_count: usize,
    },
    /// A prefill agent asked for a generation: it computes prompts for decode agents over
    /// the KV channel only.
    #[error(
        "this is a prefill agent: it computes prompts for decode agents over the KV channel and \
         serves no generation requests; send them to a decode or unified agent"
    )]
    PrefillRole,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            param: Some(param),
            message: message.into(),
        }
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        self.reply().kind
    }
}

/// How an error goes on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub http: StatusCode,
    pub grpc: tonic::Code,
    /// Bounded metric label.
    pub kind: &'static str,
    /// OpenAI's `error.type`.
    pub error_type: &'static str,
    /// OpenAI's `error.code`.
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Whole seconds for `Retry-After`, when retrying later can succeed.
    pub retry_after: Option<u64>,
}

fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ApiError {
    /// The one mapping from errors to statuses. Exhaustive on purpose: no wildcard arms.
    pub fn reply(&self) -> ErrorReply {
        use tonic::Code;
        let r = |http, grpc, kind, error_type, code: Option<&'static str>| ErrorReply {
            http,
            grpc,
            kind,
            error_type,
            code,
            param: None,
            message: self.to_string(),
            retry_after: None,
        };
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        const INVALID: &str = "invalid_request_error";
        const SERVER: &str = "server_error";
        match self {
            ApiError::Unauthenticated => r(
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "unauthenticated",
                "authentication_error",
                Some("invalid_api_key"),
            ),
            ApiError::PermissionDenied => r(
                StatusCode::FORBIDDEN,
                Code::PermissionDenied,
                "permission_denied",
                "permission_error",
                None,
            ),
            ApiError::InvalidArgument { param, .. } => ErrorReply {
                param: *param,
                ..r(
                    BAD,
                    Code::InvalidArgument,
                    "invalid_argument",
                    INVALID,
                    None,
                )
            },
            ApiError::PayloadTooLarge { .. } => r(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
                "payload_too_large",
                INVALID,
                None,
            ),
            ApiError::ModelNotFound { .. } => ErrorReply {
                param: Some("model"),
                ..r(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    "model_not_found",
                    INVALID,
                    Some("model_not_found"),
                )
            },
            ApiError::RateLimited { retry_after, .. } => ErrorReply {
                retry_after: Some(secs(*retry_after).max(1)),
                ..r(
                    StatusCode::TOO_MANY_REQUESTS,
                    Code::ResourceExhausted,
                    "rate_limited",
                    "rate_limit_error",
                    Some("rate_limit_exceeded"),
                )
            },
            ApiError::Draining { retry_after } => ErrorReply {
                retry_after: Some(secs(*retry_after).max(1)),
                ..r(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "draining",
                    SERVER,
                    Some("draining"),
                )
            },
            ApiError::GenerationFailed(_) => r(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "generation_failed",
                SERVER,
                None,
            ),
            ApiError::RouteNotFound => r(
                StatusCode::NOT_FOUND,
                Code::Unimplemented,
                "route_not_found",
                INVALID,
                None,
            ),
            ApiError::MethodNotAllowed { .. } => r(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "method_not_allowed",
                INVALID,
                Some("method_not_allowed"),
            ),
            ApiError::HeadersTooLarge { .. } => r(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Code::InvalidArgument,
                "headers_too_large",
                INVALID,
                None,
            ),
            ApiError::PrefillRole => r(
                StatusCode::MISDIRECTED_REQUEST,
                Code::Unimplemented,
                "prefill_role",
                INVALID,
                Some("prefill_role"),
            ),
            ApiError::Engine(e) => match e {
                // Same reply as `ModelNotFound`: a missing adapter and another tenant's adapter
                // must be indistinguishable.
                EngineError::AdapterNotFound(name) => ApiError::ModelNotFound {
                    model: name.clone(),
                }
                .reply(),
                EngineError::InvalidRequest(_) => r(
                    BAD,
                    Code::InvalidArgument,
                    "invalid_argument",
                    INVALID,
                    None,
                ),
                EngineError::TooLarge(_) => ErrorReply {
                    param: Some("max_tokens"),
                    ..r(
                        BAD,
                        Code::InvalidArgument,
                        "too_large",
                        INVALID,
                        Some("context_length_exceeded"),
                    )
                },
                EngineError::AdapterLoad { .. } => r(
                    BAD,
                    Code::InvalidArgument,
                    "adapter_load",
                    INVALID,
                    Some("adapter_load_failed"),
                ),
                EngineError::AdapterBusy(_) => r(
                    StatusCode::CONFLICT,
                    Code::FailedPrecondition,
                    "adapter_busy",
                    INVALID,
                    Some("adapter_busy"),
                ),
                EngineError::DigestMismatch { .. } => r(
                    BAD,
                    Code::InvalidArgument,
                    "digest_mismatch",
                    INVALID,
                    Some("digest_mismatch"),
                ),
                EngineError::Model(
                    ModelError::Io { .. }
                    | ModelError::Config { .. }
                    | ModelError::Weights { .. }
                    | ModelError::Tokenizer { .. },
                ) => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "model",
                    SERVER,
                    None,
                ),
                // The device failed, not the model's files: reported as the backend errors of a
                // step are.
                EngineError::Model(ModelError::Backend(_)) | EngineError::Backend(_) => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "backend",
                    SERVER,
                    None,
                ),
                EngineError::ThreadSpawn(_) => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "thread_spawn",
                    SERVER,
                    None,
                ),
                EngineError::Invariant(_) => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "engine_invariant",
                    SERVER,
                    None,
                ),
                EngineError::Unavailable(_) => ErrorReply {
                    retry_after: Some(1),
                    ..r(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Code::Unavailable,
                        "unavailable",
                        SERVER,
                        None,
                    )
                },
                EngineError::Stopped => ErrorReply {
                    retry_after: Some(1),
                    ..r(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Code::Unavailable,
                        "engine_stopped",
                        SERVER,
                        None,
                    )
                },
            },
        }
    }
}

/// OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct OpenAiErrorBody<'a> {
    pub error: OpenAiError<'a>,
}

#[derive(Debug, Serialize)]
pub struct OpenAiError<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub error_type: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ErrorReply {
    /// The OpenAI error body as JSON bytes.
    pub fn openai_json(&self) -> String {
        let body = OpenAiErrorBody {
            error: OpenAiError {
                message: &self.message,
                error_type: self.error_type,
                param: self.param,
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }

    pub fn into_status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc, self.message);
        if let Some(s) = self.retry_after
            && let Ok(v) = s.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }

    pub fn into_http(self) -> Response {
        let mut resp = (
            self.http,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.openai_json(),
        )
            .into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.reply().into_status()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.reply().into_http()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_foreign_adapters_answer_identically() {
        let missing = ApiError::ModelNotFound { model: "x".into() }.reply();
        let foreign = ApiError::Engine(EngineError::AdapterNotFound("x".into())).reply();
        assert_eq!(missing, foreign);
        assert_eq!(missing.http, StatusCode::NOT_FOUND);
        assert_eq!(
            missing.openai_json(),
            r#"{"error":{"message":"The model `x` does not exist.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
        );
    }

    /// Every engine error through the one mapping: status, gRPC code, metric kind and retry
    /// hint, so a variant that starts answering as another (a failed thread spawn as the
    /// caller's "invalid request", a bug as "the engine has stopped") fails here.
    #[test]
    fn every_engine_error_has_its_own_answer() {
        use std::sync::Arc;

        use tonic::Code;

        use crate::backend::BackendError;
        use crate::lora::host::AdapterError;

        let adapter_error = AdapterError::Invalid {
            path: "/a/adapter_config.json".into(),
            reason: "bad".into(),
        };
        let cases: Vec<(EngineError, StatusCode, Code, &str, Option<u64>)> = vec![
            (
                EngineError::AdapterNotFound("x".into()),
                StatusCode::NOT_FOUND,
                Code::NotFound,
                "model_not_found",
                None,
            ),
            (
                EngineError::InvalidRequest("empty prompt".into()),
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "invalid_argument",
                None,
            ),
            (
                EngineError::TooLarge("prompt".into()),
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "too_large",
                None,
            ),
            (
                EngineError::AdapterLoad {
                    name: "x".into(),
                    source: Arc::new(adapter_error),
                },
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "adapter_load",
                None,
            ),
            (
                EngineError::AdapterBusy("x".into()),
                StatusCode::CONFLICT,
                Code::FailedPrecondition,
                "adapter_busy",
                None,
            ),
            (
                EngineError::DigestMismatch {
                    name: "x".into(),
                    expected: "sha256:aa".into(),
                    actual: "sha256:bb".into(),
                },
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "digest_mismatch",
                None,
            ),
            (
                EngineError::Model(ModelError::Config {
                    path: "/m/config.json".into(),
                    reason: "bad".into(),
                }),
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "model",
                None,
            ),
            (
                EngineError::Model(ModelError::Backend(BackendError::Gemm("oom".into()))),
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "backend",
                None,
            ),
            (
                EngineError::Backend(BackendError::Gemm("oom".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "backend",
                None,
            ),
            (
                EngineError::Stopped,
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "engine_stopped",
                Some(1),
            ),
            (
                EngineError::ThreadSpawn(std::io::Error::other("out of threads")),
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "thread_spawn",
                None,
            ),
            (
                EngineError::Invariant("a planned sequence is gone".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "engine_invariant",
                None,
            ),
            (
                EngineError::Unavailable("no prefill peer".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "unavailable",
                Some(1),
            ),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for (error, http, grpc, kind, retry_after) in cases {
            let name = format!("{error:?}");
            let r = ApiError::Engine(error).reply();
            assert_eq!((r.http, r.grpc, r.kind), (http, grpc, kind), "{name}");
            assert_eq!(r.retry_after, retry_after, "{name}");
            kinds.insert(kind);
        }
        // One kind per variant, except the two ways a device failure arrives.
        assert_eq!(kinds.len(), 12);
    }

    #[test]
    fn retryable_errors_carry_a_hint() {
        let r = ApiError::RateLimited {
            reason: "too many concurrent requests",
            retry_after: Duration::from_millis(1500),
        }
        .reply();
        assert_eq!(
            (r.http, r.grpc),
            (
                StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::ResourceExhausted
            )
        );
        assert_eq!(r.retry_after, Some(2));
        let s: tonic::Status = ApiError::Draining {
            retry_after: Duration::from_secs(1),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.metadata().get("retry-after").map(|v| v.to_str().ok()),
            Some(Some("1"))
        );
    }
}
