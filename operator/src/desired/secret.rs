//! The admin-token Secret: the credential the operator presents to the model's agents
//! (`authorization: Bearer <token>` on every Admin call). The agents mount it and pass the file
//! to `--admin-token-file` (they keep only its SHA-256). It is generated once, when missing,
//! and never rewritten; deleting the Secret rotates it (new token, pods roll to pick it up).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{admin_secret_name, child_meta, common_labels};
use crate::crd::BaseModel;

/// The Secret data key holding the token.
pub const TOKEN_KEY: &str = "token";

/// The Secret `<model>-admin-token` holding `token`.
pub fn admin_token(model: &BaseModel, token: &str) -> Secret {
    Secret {
        metadata: child_meta(
            model,
            admin_secret_name(&kube::ResourceExt::name_any(model)),
            common_labels(model),
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The token stored in an admin-token Secret, if it holds a usable one.
pub fn token_of(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = std::str::from_utf8(&bytes.0).ok()?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// A fresh random token: 32 bytes from the OS, hex-encoded.
///
/// Errors: the OS random source failed (the reconcile retries).
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf)?;
    Ok(hex::encode(buf))
}
