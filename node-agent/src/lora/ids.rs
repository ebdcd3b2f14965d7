//! Typed identities: a tenant, an adapter name inside it, and an adapter's content digest.
//! Every cache key that depends on adapter weights includes the digest, so a reloaded adapter
//! with new weights never reuses stale state.

use std::fmt;

/// A tenant (a Kubernetes namespace, or `default` on an agent without API keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub String);

impl TenantId {
    pub fn default_tenant() -> Self {
        TenantId("default".to_owned())
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An adapter's name within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    pub tenant: TenantId,
    pub name: String,
}

impl AdapterKey {
    pub fn new(tenant: &str, name: &str) -> Self {
        AdapterKey {
            tenant: TenantId(tenant.to_owned()),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// SHA-256 of `adapter_model.safetensors`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", &self.hex()[..12])
    }
}

/// An optional digest as logs and messages show it: the digest, or `none` before the weights
/// were read (never Rust's `Some(…)`).
pub fn digest_or_none(d: Option<Digest>) -> String {
    d.map_or_else(|| "none".to_owned(), |d| d.to_string())
}

/// An adapter's full identity: who, which name, which weights. The digest is `None` while the
/// adapter is registered but its weights have not been read yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdapterId {
    pub key: AdapterKey,
    pub digest: Option<Digest>,
}
