//! The credentials Secret `<model>-agent-credentials`, generated once when missing and never
//! rewritten:
//! - `admin-token`: what the operator presents to the model's agents on every Admin call
//!   (`authorization: Bearer <token>`); agents get the file through `--admin-token-file` and
//!   keep only its SHA-256;
//! - `cluster-token`: the credential the model's agents share on the KV channel
//!   (`--cluster-token-file`: prefill agents require it, decode agents present it).
//!
//! Deleting the Secret rotates both: the next reconcile creates new tokens, and the pod
//! template's fingerprint of them changes, so the agents roll onto the new ones.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{child_meta, common_labels, credentials_secret_name};
use crate::crd::BaseModel;

/// The Secret data key holding the admin token.
pub const ADMIN_TOKEN_KEY: &str = "admin-token";
/// The Secret data key holding the cluster (KV channel) token.
pub const CLUSTER_TOKEN_KEY: &str = "cluster-token";

/// A model's agent credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub admin: String,
    pub cluster: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

/// The Secret `<model>-agent-credentials`.
pub fn credentials(model: &BaseModel, creds: &Credentials) -> Secret {
    Secret {
        metadata: child_meta(
            model,
            credentials_secret_name(&kube::ResourceExt::name_any(model)),
            common_labels(model),
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                ADMIN_TOKEN_KEY.to_owned(),
                ByteString(creds.admin.as_bytes().to_vec()),
            ),
            (
                CLUSTER_TOKEN_KEY.to_owned(),
                ByteString(creds.cluster.as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}

fn entry(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    let token = std::str::from_utf8(&bytes.0).ok()?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// The credentials a Secret holds, if it holds both.
pub fn credentials_of(secret: &Secret) -> Option<Credentials> {
    Some(Credentials {
        admin: entry(secret, ADMIN_TOKEN_KEY)?,
        cluster: entry(secret, CLUSTER_TOKEN_KEY)?,
    })
}

/// A fresh random token: 32 bytes from the OS, hex-encoded.
///
/// Errors: the OS random source failed (the reconcile retries).
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf)?;
    Ok(hex::encode(buf))
}

/// Fresh credentials.
///
/// Errors: the OS random source failed.
pub fn generate() -> Result<Credentials, getrandom::Error> {
    Ok(Credentials {
        admin: generate_token()?,
        cluster: generate_token()?,
    })
}

/// The fingerprint of the credentials that goes on the pod template: a truncated SHA-256 of
/// their SHA-256, which reveals nothing usable and changes when either token does.
pub fn fingerprint(creds: &Credentials) -> String {
    use sha2::{Digest, Sha256};
    let inner = Sha256::new()
        .chain_update(creds.admin.as_bytes())
        .chain_update([0])
        .chain_update(creds.cluster.as_bytes())
        .finalize();
    hex::encode(&Sha256::digest(inner)[..6])
}
