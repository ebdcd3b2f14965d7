//! The admin surfaces: the `loraplane.v1.Admin` gRPC service (LoadAdapter, UnloadAdapter,
//! ListAdapters, SetTenants, GetStats, Drain) and the vLLM-compatible HTTP routes
//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.
//!
//! Both transports (`admin/grpc.rs`, `admin/vllm.rs`) call the same [`AdminState`]
//! operations, which are generic over the small [`AdminEngine`] trait (implemented by
//! [`EngineHandle`]), so they translate wire formats only and the operations are testable
//! against any engine.
//!
//! Credentials: every call needs `authorization: Bearer <admin token>` (gRPC metadata or HTTP
//! header). The token's SHA-256 is compared in constant time with the configured hash.
//! - no credential, a malformed header, or a token that is neither the admin token nor a tenant
//!   key: `UNAUTHENTICATED` / HTTP 401 (we do not know who is calling);
//! - a tenant's API key: `PERMISSION_DENIED` / HTTP 403 (a known caller that may not administer);
//! - an agent with no admin credential configured refuses every admin call with
//!   `UNAUTHENTICATED`.
//!
//! Input is validated at the edge into `INVALID_ARGUMENT`: tenant ids and adapter names are
//! DNS-label-like (1–63 of `[A-Za-z0-9._-]`, starting and ending with a letter or digit), a
//! source URI is non-empty and at most 4 KiB, an expected digest is 64 hex digits (optionally
//! `sha256:`-prefixed). Errors map to statuses in [`AdminError::reply`]: engine errors through
//! the API's one mapping ([`ApiError::reply`]), source and tenant-table errors through the
//! exhaustive matches here.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Status;

use crate::api::auth::{AdminAuth, AuthError, TenantSpec, Tenants};
use crate::api::error::{ApiError, ErrorReply};
use crate::api::lifecycle::Lifecycle;
use crate::disagg::config::Role;
use crate::engine::actor::EngineHandle;
use crate::engine::{EngineError, EngineStats, Loaded};
use crate::lora::ids::{AdapterKey, Digest};
use crate::lora::registry::AdapterSummary;
use crate::sources::{self, SourceError, SourceOptions};

mod grpc;
mod vllm;

pub use grpc::AdminService;
pub use vllm::admin_routes;

/// Longest accepted source URI, bytes.
pub const MAX_SOURCE_URI_BYTES: usize = 4096;
/// The HTTP admin routes' body limit unless [`AdminState::with_max_request_bytes`] sets one
/// (the agent sets `--max-request-bytes`, the limit of every route).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;
/// Longest accepted drain timeout.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a drain re-reads the engine's queue.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// What the admin API needs from the engine.
pub trait AdminEngine: Send + Sync + 'static {
    fn load_adapter(
        &self,
        key: AdapterKey,
        dir: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> impl Future<Output = Result<Loaded, EngineError>> + Send;
    fn unload_adapter(
        &self,
        key: AdapterKey,
    ) -> impl Future<Output = Result<bool, EngineError>> + Send;
    fn adapters(&self) -> impl Future<Output = Result<Vec<AdapterSummary>, EngineError>> + Send;
    fn stats(&self) -> impl Future<Output = Result<EngineStats, EngineError>> + Send;
}

impl AdminEngine for EngineHandle {
    fn load_adapter(
        &self,
        key: AdapterKey,
        dir: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> impl Future<Output = Result<Loaded, EngineError>> + Send {
        EngineHandle::load(self, key, dir, expected, pin)
    }
    fn unload_adapter(
        &self,
        key: AdapterKey,
    ) -> impl Future<Output = Result<bool, EngineError>> + Send {
        EngineHandle::unload_adapter(self, key)
    }
    fn adapters(&self) -> impl Future<Output = Result<Vec<AdapterSummary>, EngineError>> + Send {
        EngineHandle::adapters(self)
    }
    fn stats(&self) -> impl Future<Output = Result<EngineStats, EngineError>> + Send {
        EngineHandle::stats(self)
    }
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Credentials, invalid arguments and engine errors: the API's own error type.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Source(#[from] SourceError),
    /// `SetTenants` refused the table.
    #[error(transparent)]
    Tenants(#[from] AuthError),
    #[error("tenant {tenant:?} already has {limit} adapters loaded, its limit")]
    AdapterQuota { tenant: String, limit: u32 },
    /// vLLM's unload of an unknown adapter (gRPC answers `unloaded: false` instead).
    #[error("The lora adapter '{0}' cannot be found.")]
    AdapterNotFound(String),
}

impl AdminError {
    /// The wire status of every admin error. Exhaustive on purpose: no wildcard arms.
    pub fn reply(&self) -> ErrorReply {
        use tonic::Code;
        let r = |http, grpc, kind, error_type| ErrorReply {
            http,
            grpc,
            kind,
            error_type,
            code: None,
            param: None,
            message: self.to_string(),
            retry_after: None,
        };
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        const INVALID: &str = "invalid_request_error";
        const SERVER: &str = "server_error";
        match self {
            AdminError::Api(e) => e.reply(),
            AdminError::Source(e) => match e {
                SourceError::Unsupported { .. } => {
                    r(BAD, Code::InvalidArgument, "source_unsupported", INVALID)
                }
                SourceError::Forbidden { .. } => {
                    r(BAD, Code::InvalidArgument, "source_forbidden", INVALID)
                }
                SourceError::NotFound { .. } => r(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    "source_not_found",
                    INVALID,
                ),
                SourceError::TooLarge { .. } => {
                    r(BAD, Code::InvalidArgument, "source_too_large", INVALID)
                }
                SourceError::DigestMismatch { .. } => {
                    r(BAD, Code::InvalidArgument, "digest_mismatch", INVALID)
                }
                SourceError::Timeout { .. } => r(
                    StatusCode::GATEWAY_TIMEOUT,
                    Code::DeadlineExceeded,
                    "source_timeout",
                    SERVER,
                ),
                SourceError::Fetch { .. } => r(
                    StatusCode::BAD_GATEWAY,
                    Code::Unavailable,
                    "source_fetch",
                    SERVER,
                ),
                SourceError::Io { .. } => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "source_io",
                    SERVER,
                ),
            },
            AdminError::Tenants(e) => match e {
                AuthError::Io { .. } => r(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "tenants_io",
                    SERVER,
                ),
                AuthError::Parse { .. }
                | AuthError::InvalidTenantId(_)
                | AuthError::InvalidKeyHash { .. }
                | AuthError::DuplicateTenant(_)
                | AuthError::DuplicateKey(..)
                | AuthError::InvalidAdminCredential(_)
                | AuthError::AdminKeyReuse(_) => {
                    r(BAD, Code::InvalidArgument, "invalid_tenants", INVALID)
                }
            },
            AdminError::AdapterQuota { .. } => r(
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
                "adapter_quota",
                INVALID,
            ),
            AdminError::AdapterNotFound(_) => ErrorReply {
                code: Some("model_not_found"),
                ..r(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    "adapter_not_found",
                    INVALID,
                )
            },
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        e.reply().into_status()
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        self.reply().into_http()
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::Api(ApiError::invalid(param, message))
}

/// Tenant ids and adapter names: 1–63 of `[A-Za-z0-9._-]`, first and last a letter or digit
/// (the one rule of [`crate::api::auth::valid_name`], which the tenant table uses too).
pub fn is_valid_name(s: &str) -> bool {
    crate::api::auth::valid_name(s)
}

fn check_name(param: &'static str, what: &str, s: &str) -> Result<(), AdminError> {
    if s.is_empty() {
        return Err(invalid(param, format!("{what} is required")));
    }
    if !is_valid_name(s) {
        return Err(invalid(
            param,
            format!(
                "{what} must be 1-63 characters of [A-Za-z0-9._-], starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// An expected digest: empty for none, else 64 hex digits, optionally `sha256:`-prefixed.
pub fn parse_expected_sha256(s: &str) -> Result<Option<Digest>, AdminError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let hex_str = s.strip_prefix("sha256:").unwrap_or(s);
    let bytes: Option<[u8; 32]> = hex::decode(hex_str).ok().and_then(|b| b.try_into().ok());
    bytes.map(|b| Some(Digest(b))).ok_or_else(|| {
        invalid(
            "expected_sha256",
            "expected_sha256 must be 64 hex digits (a SHA-256), optionally prefixed with sha256:",
        )
    })
}

fn check_uri(param: &'static str, uri: &str) -> Result<(), AdminError> {
    if uri.trim().is_empty() {
        return Err(invalid(param, "a source URI is required"));
    }
    if uri.len() > MAX_SOURCE_URI_BYTES {
        return Err(invalid(
            param,
            format!("the source URI exceeds {MAX_SOURCE_URI_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Everything the admin surfaces share. Build once, wrap in an `Arc`, and hand it to
/// [`AdminService::new`] and [`admin_routes`].
pub struct AdminState<E> {
    engine: E,
    tenants: Tenants,
    auth: AdminAuth,
    lifecycle: Lifecycle,
    sources: SourceOptions,
    role: Role,
    model: String,
    /// The URI each adapter was loaded from (redacted), for `ListAdapters`.
    uris: Mutex<HashMap<AdapterKey, String>>,
    /// The body limit of the HTTP admin routes (the agent's `--max-request-bytes`).
    max_request_bytes: usize,
}

impl<E> std::fmt::Debug for AdminState<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("role", &self.role)
            .field("model", &self.model)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl<E: AdminEngine> AdminState<E> {
    /// `role` and `model` (its served name) are reported by `GetStats`.
    pub fn new(
        engine: E,
        tenants: Tenants,
        auth: AdminAuth,
        lifecycle: Lifecycle,
        sources: SourceOptions,
        role: Role,
        model: &str,
    ) -> Self {
        AdminState {
            engine,
            tenants,
            auth,
            lifecycle,
            sources,
            role,
            model: model.to_owned(),
            uris: Mutex::new(HashMap::new()),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Sets the body limit of the HTTP admin routes (default [`DEFAULT_MAX_REQUEST_BYTES`]).
    pub fn with_max_request_bytes(mut self, limit: usize) -> Self {
        self.max_request_bytes = limit;
        self
    }

    /// The body limit of the HTTP admin routes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Checks an admin call's bearer token (see the module docs for the exact answers).
    pub fn authorize(&self, token: Option<&str>) -> Result<(), AdminError> {
        let Some(token) = token else {
            return Err(ApiError::Unauthenticated.into());
        };
        if self.auth.is_admin(token) {
            return Ok(());
        }
        let tenant_key = !self.tenants.is_open() && self.tenants.authenticate(Some(token)).is_ok();
        Err(if tenant_key {
            ApiError::PermissionDenied
        } else {
            ApiError::Unauthenticated
        }
        .into())
    }

    /// Resolves `uri` and loads the adapter. Loading it again from the same source re-reads
    /// and re-digests the files: the same digest changes nothing ([`LoadChange::Unchanged`]),
    /// a new one replaces the weights ([`LoadChange::Replaced`]).
    ///
    /// [`LoadChange::Unchanged`]: crate::engine::LoadChange::Unchanged
    /// [`LoadChange::Replaced`]: crate::engine::LoadChange::Replaced
    ///
    /// Errors: invalid arguments, the tenant's adapter quota, source refusals and failures, and
    /// engine refusals (invalid adapter, digest mismatch, adapter busy).
    pub async fn load(
        &self,
        tenant: &str,
        name: &str,
        uri: &str,
        expected_sha256: &str,
        pin: bool,
    ) -> Result<Loaded, AdminError> {
        check_name("tenant", "tenant", tenant)?;
        check_name("name", "adapter name", name)?;
        check_uri("source_uri", uri)?;
        let expected = parse_expected_sha256(expected_sha256)?;
        let key = AdapterKey::new(tenant, name);
        self.check_quota(&key).await?;
        let dir = sources::resolve_adapter(uri, expected.as_ref(), &self.sources)
            .await
            .inspect_err(|e| {
                tracing::warn!(adapter = %key, kind = e.kind(), error = %e, "adapter source refused");
            })?;
        let loaded = self
            .engine
            .load_adapter(key.clone(), dir, expected, pin)
            .await;
        let loaded = match loaded {
            Ok(loaded) => {
                self.uris
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), sources::redact(uri));
                loaded
            }
            Err(e) => {
                // A failed load forgets the adapter, except when it was busy and left as it
                // was, or when re-reading an adapter's own source failed (it keeps its
                // weights): the engine still lists it then.
                let kept = self
                    .engine
                    .adapters()
                    .await
                    .is_ok_and(|all| all.iter().any(|a| a.key == key));
                if !kept {
                    self.uris
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                return Err(ApiError::from(e).into());
            }
        };
        tracing::info!(
            adapter = %key,
            source = %sources::redact(uri),
            digest = %crate::lora::ids::digest_or_none(loaded.summary.digest),
            change = ?loaded.change,
            "adapter loaded"
        );
        Ok(loaded)
    }

    async fn check_quota(&self, key: &AdapterKey) -> Result<(), AdminError> {
        let limit = self
            .tenants
            .limits(&key.tenant)
            .map_or(0, |l| l.max_adapters);
        if limit == 0 {
            return Ok(());
        }
        let adapters = self.engine.adapters().await.map_err(ApiError::from)?;
        let others = adapters
            .iter()
            .filter(|a| a.key.tenant == key.tenant && a.key != *key)
            .count();
        if others >= limit as usize {
            return Err(AdminError::AdapterQuota {
                tenant: key.tenant.0.clone(),
                limit,
            });
        }
        Ok(())
    }

    /// Unloads an adapter (running requests on it finish first). `false` if it was unknown.
    pub async fn unload(&self, tenant: &str, name: &str) -> Result<bool, AdminError> {
        check_name("tenant", "tenant", tenant)?;
        check_name("name", "adapter name", name)?;
        let key = AdapterKey::new(tenant, name);
        let unloaded = self
            .engine
            .unload_adapter(key.clone())
            .await
            .map_err(ApiError::from)?;
        if unloaded {
            self.uris
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            tracing::info!(adapter = %key, "adapter unloaded");
        }
        Ok(unloaded)
    }

    /// Adapters of `tenant` (all when `None`), sorted by (tenant, name).
    pub async fn list(&self, tenant: Option<&str>) -> Result<Vec<AdapterSummary>, AdminError> {
        if let Some(t) = tenant {
            check_name("tenant", "tenant", t)?;
        }
        let mut adapters = self.engine.adapters().await.map_err(ApiError::from)?;
        if let Some(t) = tenant {
            adapters.retain(|a| a.key.tenant.0 == t);
        }
        Ok(adapters)
    }

    /// Replaces the tenant table (all or nothing), validated as the keys file is: tenant ids by
    /// the adapter-name rule, and no tenant key equal to the admin token. Returns the number of
    /// tenants.
    pub fn set_tenants(&self, specs: Vec<TenantSpec>) -> Result<usize, AdminError> {
        crate::api::auth::check_no_admin_key(&specs, &self.auth)?;
        let n = self.tenants.replace(specs)?;
        tracing::info!(tenants = n, "tenant table replaced");
        Ok(n)
    }

    pub async fn stats(&self) -> Result<EngineStats, AdminError> {
        Ok(self.engine.stats().await.map_err(ApiError::from)?)
    }

    /// Starts draining (readiness fails, new requests are refused as retryable) and waits up
    /// to `timeout` (the configured drain timeout when `None`) for in-flight requests, counted
    /// both at the surfaces and in the engine's queues. Returns how many remain.
    pub async fn drain(&self, timeout: Option<Duration>) -> Result<usize, AdminError> {
        let timeout = timeout.unwrap_or_else(|| self.lifecycle.drain_timeout());
        if timeout > MAX_DRAIN_TIMEOUT {
            return Err(invalid(
                "timeout_seconds",
                format!(
                    "timeout_seconds must be at most {}",
                    MAX_DRAIN_TIMEOUT.as_secs()
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        if self.lifecycle.start_drain() {
            tracing::info!(
                timeout_s = timeout.as_secs_f64(),
                "drain requested through the admin API"
            );
        }
        let surface = self.lifecycle.wait_idle(timeout).await;
        let mut engine = self.engine_in_flight().await?;
        while engine > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
            engine = self.engine_in_flight().await?;
        }
        Ok(surface.max(engine))
    }

    async fn engine_in_flight(&self) -> Result<usize, AdminError> {
        let s = self.engine.stats().await.map_err(ApiError::from)?;
        Ok(s.running + s.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "sql-expert",
            "team_a.v2",
            "A1",
            "x".repeat(63).as_str(),
        ] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".",
            "a/b",
            "a b",
            "é",
            "x".repeat(64).as_str(),
            "../x",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn expected_digests() {
        let hex = "ab".repeat(32);
        assert!(matches!(parse_expected_sha256(""), Ok(None)));
        assert!(matches!(parse_expected_sha256(&hex), Ok(Some(_))));
        assert!(matches!(
            parse_expected_sha256(&format!("sha256:{hex}")),
            Ok(Some(_))
        ));
        for bad in ["abc", "zz".repeat(32).as_str(), "ab".repeat(33).as_str()] {
            let e = parse_expected_sha256(bad).err().map(|e| e.reply().grpc);
            assert_eq!(e, Some(tonic::Code::InvalidArgument), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        let s = |e: AdminError| (e.reply().grpc, e.reply().http);
        use tonic::Code;
        assert_eq!(
            s(ApiError::Unauthenticated.into()),
            (Code::Unauthenticated, StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            s(ApiError::PermissionDenied.into()),
            (Code::PermissionDenied, StatusCode::FORBIDDEN)
        );
        let forbidden = SourceError::Forbidden {
            uri: "/x".into(),
            reason: "outside".into(),
        };
        assert_eq!(
            s(forbidden.into()),
            (Code::InvalidArgument, StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            s(AdminError::AdapterNotFound("x".into())),
            (Code::NotFound, StatusCode::NOT_FOUND)
        );
    }
}
