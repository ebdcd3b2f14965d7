//! Tenants and credentials: API keys map to tenants, the admin credential guards the admin
//! surfaces, and per-tenant limits (concurrent requests, tokens per minute) are enforced here.
//!
//! - Only SHA-256 hashes of keys are ever held; a presented key is hashed and looked up, and the
//!   admin check compares hashes in constant time.
//! - With no tenants configured the agent is *open*: every caller is tenant `default` (the agent
//!   says so at start-up). Configuring tenants (a keys file or `Admin/SetTenants`) closes it.
//! - [`Tenants`] is cheap to clone and shared by every surface; [`Tenants::replace`] swaps the
//!   table at run time while the limit state (in-flight counts, token buckets) of tenants that
//!   stay is kept.
//! - Token limits are a bucket of `max_tokens_per_minute` refilled continuously; a request is
//!   admitted while the bucket is positive and charged its prompt at admission and its
//!   completion as it streams, so a burst may overdraw it and then waits it back. Time is passed
//!   in, so the arithmetic is unit-tested without a clock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::api::error::ApiError;
use crate::credential::{TokenHash, bearer_token, sha256};
use crate::lora::ids::TenantId;

/// Per-tenant limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    pub max_concurrent_requests: u32,
    /// Prompt plus completion tokens per minute.
    pub max_tokens_per_minute: u64,
    /// Adapters the tenant may have loaded at once (enforced by the admin API).
    pub max_adapters: u32,
}

/// One tenant: its id, the hex SHA-256 of each of its API keys, its limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub id: String,
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    #[serde(default)]
    pub limits: TenantLimits,
}

impl From<&loraplane_proto::v1::TenantSpec> for TenantSpec {
    fn from(p: &loraplane_proto::v1::TenantSpec) -> Self {
        let l = p.limits.unwrap_or_default();
        TenantSpec {
            id: p.id.clone(),
            api_key_sha256: p.api_key_sha256.clone(),
            limits: TenantLimits {
                max_concurrent_requests: l.max_concurrent_requests,
                max_tokens_per_minute: l.max_tokens_per_minute,
                max_adapters: l.max_adapters,
            },
        }
    }
}

/// The keys file (`--api-keys-file`), JSON or TOML: `{"tenants": [TenantSpec, …]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenants: Vec<TenantSpec>,
}

/// Why a tenant table or credential was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("tenant id {0:?} is invalid: use 1-63 characters of [A-Za-z0-9._-]")]
    InvalidTenantId(String),
    #[error("tenant {tenant:?}: key hash {index} is not 64 hex digits (a SHA-256)")]
    InvalidKeyHash { tenant: String, index: usize },
    #[error("tenant {0:?} appears twice")]
    DuplicateTenant(String),
    #[error("one API key hash belongs to tenants {0:?} and {1:?}")]
    DuplicateKey(String, String),
    #[error("the admin credential is invalid: {0}")]
    InvalidAdminCredential(String),
    #[error("tenant {0:?} has the admin token as an API key: one key per role")]
    AdminKeyReuse(String),
}

impl AuthError {
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Io { .. } => "io",
            AuthError::Parse { .. } => "parse",
            AuthError::InvalidTenantId(_) => "invalid_tenant_id",
            AuthError::InvalidKeyHash { .. } => "invalid_key_hash",
            AuthError::DuplicateTenant(_) => "duplicate_tenant",
            AuthError::DuplicateKey(..) => "duplicate_key",
            AuthError::InvalidAdminCredential(_) => "invalid_admin_credential",
            AuthError::AdminKeyReuse(_) => "admin_key_reuse",
        }
    }
}

/// Reads a keys file; `.toml` files are TOML, everything else JSON.
pub fn load_tenants_file(path: &Path) -> Result<Vec<TenantSpec>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
        path: path.to_owned(),
        source,
    })?;
    let parse = |reason: String| AuthError::Parse {
        path: path.to_owned(),
        reason,
    };
    let file: TenantsFile = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| parse(e.to_string()))?
    } else {
        serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?
    };
    Ok(file.tenants)
}

fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_str.trim()).ok()?;
    bytes.try_into().ok()
}

/// Tenant ids and adapter names, one rule for every surface (the keys file, `SetTenants`,
/// `LoadAdapter`): 1–63 of `[A-Za-z0-9._-]`, first and last a letter or digit.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn valid_tenant_id(id: &str) -> bool {
    valid_name(id)
}

/// Refuses a tenant table that gives the admin credential to a tenant: one key per role, or the
/// admin token would also authenticate as that tenant (and a tenant key would be an admin's).
///
/// Errors: [`AuthError::AdminKeyReuse`] naming the tenant.
pub fn check_no_admin_key(specs: &[TenantSpec], admin: &AdminAuth) -> Result<(), AuthError> {
    let Some(admin_hash) = admin.hash else {
        return Ok(());
    };
    for spec in specs {
        if spec
            .api_key_sha256
            .iter()
            .filter_map(|h| TokenHash::from_hex(h))
            .any(|h| h.same_as(&admin_hash))
        {
            return Err(AuthError::AdminKeyReuse(spec.id.clone()));
        }
    }
    Ok(())
}

/// A tokens-per-minute bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Live limit state of one tenant.
#[derive(Debug)]
struct TenantState {
    limits: RwLock<TenantLimits>,
    in_flight: AtomicU32,
    bucket: Mutex<Option<Bucket>>,
}

impl TenantState {
    fn new(limits: TenantLimits) -> Arc<Self> {
        Arc::new(TenantState {
            limits: RwLock::new(limits),
            in_flight: AtomicU32::new(0),
            bucket: Mutex::new(None),
        })
    }

    fn limits(&self) -> TenantLimits {
        *self.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Refills to `now` and returns the bucket's level (creating it full).
    fn level(bucket: &mut Option<Bucket>, per_minute: u64, now: Instant) -> &mut Bucket {
        let cap = per_minute as f64;
        let b = bucket.get_or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * cap / 60.0).min(cap);
        b.at = now;
        b
    }
}

#[derive(Debug)]
struct Table {
    by_key: HashMap<[u8; 32], TenantId>,
    tenants: HashMap<TenantId, Arc<TenantState>>,
    /// No tenants configured: everyone is `default`.
    open: bool,
}

/// The tenant table, shared by every surface and replaceable at run time.
#[derive(Debug, Clone)]
pub struct Tenants {
    inner: Arc<RwLock<Table>>,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantId,
    state: Arc<TenantState>,
}

impl Tenants {
    /// A table of `specs`; an empty list makes the agent open (single `default` tenant).
    pub fn new(specs: Vec<TenantSpec>) -> Result<Self, AuthError> {
        let t = Tenants {
            inner: Arc::new(RwLock::new(Table {
                by_key: HashMap::new(),
                tenants: HashMap::new(),
                open: true,
            })),
        };
        t.replace(specs)?;
        Ok(t)
    }

    /// Replaces the whole table (the admin API's `SetTenants`). All or nothing: an invalid
    /// spec leaves the current table in place. Returns the number of tenants.
    ///
    /// Errors: an invalid tenant id, a hash that is not 64 hex digits, a tenant listed twice,
    /// one key hash given to two tenants.
    pub fn replace(&self, specs: Vec<TenantSpec>) -> Result<usize, AuthError> {
        let mut by_key = HashMap::new();
        let mut seen: HashMap<TenantId, TenantLimits> = HashMap::new();
        for spec in &specs {
            if !valid_tenant_id(&spec.id) {
                return Err(AuthError::InvalidTenantId(spec.id.clone()));
            }
            let id = TenantId(spec.id.clone());
            if seen.insert(id.clone(), spec.limits).is_some() {
                return Err(AuthError::DuplicateTenant(spec.id.clone()));
            }
            for (index, h) in spec.api_key_sha256.iter().enumerate() {
                let hash = parse_hash(h).ok_or_else(|| AuthError::InvalidKeyHash {
                    tenant: spec.id.clone(),
                    index,
                })?;
                if let Some(other) = by_key.insert(hash, id.clone())
                    && other != id
                {
                    return Err(AuthError::DuplicateKey(other.0, spec.id.clone()));
                }
            }
        }
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut tenants = HashMap::new();
        for (id, limits) in seen {
            let state = match table.tenants.get(&id) {
                Some(s) => {
                    *s.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
                    s.clone()
                }
                None => TenantState::new(limits),
            };
            tenants.insert(id, state);
        }
        let open = tenants.is_empty();
        if open {
            let default = TenantId::default_tenant();
            let state = table
                .tenants
                .get(&default)
                .cloned()
                .unwrap_or_else(|| TenantState::new(TenantLimits::default()));
            tenants.insert(default, state);
        }
        if open && !table.open {
            tracing::warn!("tenant table emptied: every caller is now tenant `default`");
        }
        let count = if open { 0 } else { tenants.len() };
        *table = Table {
            by_key,
            tenants,
            open,
        };
        Ok(count)
    }

    /// Whether no tenants are configured (every caller is `default`).
    pub fn is_open(&self) -> bool {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).open
    }

    /// Configured tenant ids, sorted (just `default` when open).
    pub fn ids(&self) -> Vec<TenantId> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<TenantId> = table.tenants.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A tenant's limits, or `None` for an unknown tenant.
    pub fn limits(&self, tenant: &TenantId) -> Option<TenantLimits> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        table.tenants.get(tenant).map(|s| s.limits())
    }

    /// Resolves a presented API key (the bearer token) to its tenant.
    ///
    /// Errors: [`ApiError::Unauthenticated`] for a missing or unknown key (the same answer for
    /// both) unless the agent is open.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let tenant = if table.open {
            TenantId::default_tenant()
        } else {
            let hash = sha256(token.ok_or(ApiError::Unauthenticated)?);
            table
                .by_key
                .get(&hash)
                .cloned()
                .ok_or(ApiError::Unauthenticated)?
        };
        let state = table
            .tenants
            .get(&tenant)
            .cloned()
            .ok_or(ApiError::Unauthenticated)?;
        Ok(Caller { tenant, state })
    }
}

/// A request's hold on its tenant's limits: one concurrency slot until dropped, and a token
/// bucket that its completion tokens are charged to as they stream.
#[derive(Debug)]
pub struct Admission {
    state: Arc<TenantState>,
}

impl Caller {
    /// Admits one request with `prompt_tokens` at `now`, or says when to retry.
    ///
    /// Errors: [`ApiError::RateLimited`] when the tenant is at its concurrency limit or its
    /// token bucket is empty; nothing is charged then.
    pub fn admit(&self, prompt_tokens: usize, now: Instant) -> Result<Admission, ApiError> {
        let limits = self.state.limits();
        let max = limits.max_concurrent_requests;
        let slot = self
            .state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        if slot.is_err() {
            return Err(ApiError::RateLimited {
                reason: "too many concurrent requests for this tenant",
                retry_after: Duration::from_secs(1),
            });
        }
        let admission = Admission {
            state: self.state.clone(),
        };
        if limits.max_tokens_per_minute > 0 {
            let per_minute = limits.max_tokens_per_minute;
            let mut bucket = self.state.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let b = TenantState::level(&mut bucket, per_minute, now);
            if b.tokens <= 0.0 {
                let per_second = per_minute as f64 / 60.0;
                let wait = (1.0 - b.tokens) / per_second;
                return Err(ApiError::RateLimited {
                    reason: "tokens-per-minute limit reached for this tenant",
                    retry_after: Duration::from_secs_f64(wait.clamp(0.0, 3600.0)),
                });
            }
            b.tokens -= prompt_tokens as f64;
        }
        Ok(admission)
    }

    /// Requests of this tenant in flight now.
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.load(Ordering::Acquire)
    }
}

impl Admission {
    /// Charges generated tokens to the tenant's token bucket.
    pub fn charge(&self, tokens: usize, now: Instant) {
        let per_minute = self.state.limits().max_tokens_per_minute;
        if per_minute == 0 || tokens == 0 {
            return;
        }
        let mut bucket = self.state.bucket.lock().unwrap_or_else(|e| e.into_inner());
        TenantState::level(&mut bucket, per_minute, now).tokens -= tokens as f64;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The admin credential: the SHA-256 of the admin token. Without one, every admin call is
/// refused.
#[derive(Debug, Clone, Default)]
pub struct AdminAuth {
    hash: Option<TokenHash>,
}

impl AdminAuth {
    /// No admin credential: the admin surfaces refuse everyone.
    pub fn disabled() -> Self {
        AdminAuth { hash: None }
    }

    /// From the hex SHA-256 of the token (`--admin-token-sha256`).
    pub fn from_sha256_hex(hex_str: &str) -> Result<Self, AuthError> {
        let hash = TokenHash::from_hex(hex_str).ok_or_else(|| {
            AuthError::InvalidAdminCredential("expected 64 hex digits (a SHA-256)".into())
        })?;
        Ok(AdminAuth { hash: Some(hash) })
    }

    /// From the token itself (`--admin-token-file`: a mounted Secret); only its hash is kept.
    pub fn from_token(token: &str) -> Result<Self, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::InvalidAdminCredential(
                "the admin token is empty".into(),
            ));
        }
        Ok(AdminAuth {
            hash: Some(TokenHash::of(token)),
        })
    }

    pub fn is_configured(&self) -> bool {
        self.hash.is_some()
    }

    /// Whether `presented_token` is the admin credential (constant-time on the hashes).
    /// Tenant API keys are never admin credentials.
    pub fn is_admin(&self, presented_token: &str) -> bool {
        self.hash.is_some_and(|h| h.matches(presented_token))
    }

    /// Checks the bearer token of an admin call.
    ///
    /// Errors: [`ApiError::Unauthenticated`] without a token, [`ApiError::PermissionDenied`]
    /// for any other token (tenant keys included).
    pub fn require(&self, token: Option<&str>) -> Result<(), ApiError> {
        match token {
            None => Err(ApiError::Unauthenticated),
            Some(t) if self.is_admin(t) => Ok(()),
            Some(_) => Err(ApiError::PermissionDenied),
        }
    }
}

/// The bearer token of an HTTP request.
pub fn bearer_from_headers(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, key: &str, limits: TenantLimits) -> TenantSpec {
        TenantSpec {
            id: id.into(),
            api_key_sha256: vec![hex::encode(sha256(key))],
            limits,
        }
    }

    #[test]
    fn open_until_tenants_are_configured() {
        let t = Tenants::new(vec![]).unwrap();
        assert!(t.is_open());
        assert_eq!(t.authenticate(None).unwrap().tenant.0, "default");
        t.replace(vec![spec("a", "ka", TenantLimits::default())])
            .unwrap();
        assert!(!t.is_open());
        assert!(matches!(
            t.authenticate(None),
            Err(ApiError::Unauthenticated)
        ));
        assert!(matches!(
            t.authenticate(Some("nope")),
            Err(ApiError::Unauthenticated)
        ));
        assert_eq!(t.authenticate(Some("ka")).unwrap().tenant.0, "a");
    }

    #[test]
    fn replace_is_all_or_nothing_and_validates() {
        let t = Tenants::new(vec![spec("a", "ka", TenantLimits::default())]).unwrap();
        let bad = vec![
            spec("b", "kb", TenantLimits::default()),
            spec("c", "kb", TenantLimits::default()),
        ];
        assert!(matches!(t.replace(bad), Err(AuthError::DuplicateKey(..))));
        assert_eq!(t.authenticate(Some("ka")).unwrap().tenant.0, "a");
        let mut odd = spec("d", "kd", TenantLimits::default());
        odd.api_key_sha256 = vec!["abc".into()];
        assert!(matches!(
            t.replace(vec![odd]),
            Err(AuthError::InvalidKeyHash { .. })
        ));
        assert!(matches!(
            t.replace(vec![spec("bad id", "k", TenantLimits::default())]),
            Err(AuthError::InvalidTenantId(_))
        ));
    }

    #[test]
    fn concurrency_limit_holds_and_survives_replace() {
        let limits = TenantLimits {
            max_concurrent_requests: 1,
            ..Default::default()
        };
        let t = Tenants::new(vec![spec("a", "ka", limits)]).unwrap();
        let caller = t.authenticate(Some("ka")).unwrap();
        let now = Instant::now();
        let first = caller.admit(1, now).unwrap();
        t.replace(vec![spec("a", "ka2", limits)]).unwrap();
        let again = t.authenticate(Some("ka2")).unwrap();
        assert!(matches!(
            again.admit(1, now),
            Err(ApiError::RateLimited { .. })
        ));
        drop(first);
        assert!(again.admit(1, now).is_ok());
    }

    #[test]
    fn token_bucket_refills_over_time() {
        let limits = TenantLimits {
            max_tokens_per_minute: 60,
            ..Default::default()
        };
        let t = Tenants::new(vec![spec("a", "ka", limits)]).unwrap();
        let c = t.authenticate(Some("ka")).unwrap();
        let t0 = Instant::now();
        let a = c.admit(50, t0).unwrap();
        a.charge(20, t0);
        drop(a);
        // 60 - 70 = -10: refused, and told to wait 11 s (one token per second).
        match c.admit(1, t0) {
            Err(ApiError::RateLimited { retry_after, .. }) => {
                assert_eq!(retry_after.as_secs(), 11)
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        assert!(c.admit(1, t0 + Duration::from_secs(12)).is_ok());
    }

    #[test]
    fn admin_check_refuses_other_tokens() {
        let admin = AdminAuth::from_token("s3cret\n").unwrap();
        assert!(admin.is_admin("s3cret"));
        assert!(!admin.is_admin("tenant-key"));
        assert!(matches!(
            admin.require(None),
            Err(ApiError::Unauthenticated)
        ));
        assert!(matches!(
            admin.require(Some("x")),
            Err(ApiError::PermissionDenied)
        ));
        assert!(!AdminAuth::disabled().is_admin(""));
        let same = AdminAuth::from_sha256_hex(&hex::encode(sha256("s3cret"))).unwrap();
        assert!(same.is_admin("s3cret"));
    }
}
