//! Bearer credentials: reading `authorization: Bearer <token>`, and secrets held as their
//! SHA-256 and compared in constant time ([`TokenHash`]). Two secrets are built on it, with
//! different holders and powers: the admin credential (`api::auth::AdminAuth`, the operator's)
//! and the [`ClusterCredential`] the agents of one deployment share for the KV channel. Holding
//! one grants nothing the other guards.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a token's bytes.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A secret kept only as its SHA-256.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(…)")
    }
}

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> Self {
        TokenHash(sha256(token))
    }

    /// From 64 hex digits; `None` for anything else.
    pub fn from_hex(hex_str: &str) -> Option<Self> {
        let bytes = hex::decode(hex_str.trim()).ok()?;
        bytes.try_into().ok().map(TokenHash)
    }

    /// Whether `presented` is the secret (constant-time on the hashes).
    pub fn matches(&self, presented: &str) -> bool {
        bool::from(sha256(presented).ct_eq(&self.0))
    }

    /// Whether two hashes are of the same secret (constant-time).
    pub fn same_as(&self, other: &TokenHash) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

/// The token of an `Authorization: Bearer <token>` value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The bearer token of a gRPC call (`authorization` metadata).
pub fn bearer_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the cluster token is empty")]
    Empty,
}

/// The cluster credential (`--cluster-token-file`): the secret every agent of one deployment
/// shares. Prefill agents require it on the KV channel ([`ClusterCredential::verify`]); decode
/// agents present it ([`ClusterCredential::authorization`]), so unlike the admin credential the
/// token itself is kept, not only its hash. It opens no admin route.
#[derive(Clone)]
pub struct ClusterCredential {
    token: String,
    hash: TokenHash,
}

impl std::fmt::Debug for ClusterCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCredential(…)")
    }
}

impl ClusterCredential {
    /// The credential whose token is `token` (surrounding whitespace, such as a Secret file's
    /// trailing newline, is not part of it).
    ///
    /// # Errors
    /// [`CredentialError::Empty`] for an empty token.
    pub fn new(token: &str) -> Result<Self, CredentialError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(CredentialError::Empty);
        }
        Ok(ClusterCredential {
            token: token.to_owned(),
            hash: TokenHash::of(token),
        })
    }

    /// Whether a caller presented this credential (constant-time on the hashes).
    pub fn verify(&self, presented: &str) -> bool {
        self.hash.matches(presented)
    }

    /// The `authorization` value that presents it: `Bearer <token>`.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_compare_tokens() {
        let h = TokenHash::of("s3cret");
        assert!(h.matches("s3cret"));
        assert!(!h.matches("s3cret "));
        let same = TokenHash::from_hex(&hex::encode(sha256("s3cret"))).unwrap();
        assert!(same.matches("s3cret"));
        assert!(TokenHash::from_hex("abc").is_none());
        assert_eq!(format!("{h:?}"), "TokenHash(…)");
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token("Bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn the_cluster_credential_is_presented_and_verified() {
        let c = ClusterCredential::new("tok\n").unwrap();
        assert!(c.verify("tok"));
        assert!(!c.verify("other"));
        assert_eq!(c.authorization(), "Bearer tok");
        assert_eq!(bearer_token(&c.authorization()), Some("tok"));
        assert_eq!(format!("{c:?}"), "ClusterCredential(…)");
        assert_eq!(
            ClusterCredential::new(" \n").unwrap_err(),
            CredentialError::Empty
        );
    }
}
