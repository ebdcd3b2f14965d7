//! What is particular to `gs://bucket/prefix` sources (the `object_store` crate's `gcp` store):
//! the settings and the store's construction. Fetching, listing and error mapping are shared
//! with the other object stores in [`super::cloud`].
//!
//! Credentials, in `object_store`'s order: a service-account JSON file
//! (`GOOGLE_SERVICE_ACCOUNT`, typically a mounted Secret) or the same JSON inline
//! (`GOOGLE_SERVICE_ACCOUNT_KEY`); application default credentials
//! (`GOOGLE_APPLICATION_CREDENTIALS`, a service-account or authorized-user file); otherwise the
//! metadata server (GKE Workload Identity, a VM's service account). Files are read again at every
//! fetch, so a rotated Secret takes effect without a restart. A service-account file may name
//! another endpoint (`gcs_base_url`, with `disable_oauth` for an emulator such as
//! fake-gcs-server); a plain-`http://` one is allowed because the file is trusted configuration.

use std::sync::Arc;

use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{ClientConfigKey, ClientOptions, ObjectStore, RetryConfig};

use super::cloud::{BuildFailure, apply_settings, setting};
use super::{Ctx, SourceOptions};

/// The environment variables the serving layer passes on, and the `object_store` setting each
/// one becomes.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "google_application_credentials",
    ),
    ("GOOGLE_SERVICE_ACCOUNT", "google_service_account"),
    ("GOOGLE_SERVICE_ACCOUNT_PATH", "google_service_account"),
    ("GOOGLE_SERVICE_ACCOUNT_KEY", "google_service_account_key"),
    ("GOOGLE_SKIP_SIGNATURE", "google_skip_signature"),
];

/// Settings whose values are secrets (scrubbed from messages).
const SECRET_SETTINGS: &[&str] = &["google_service_account_key"];

/// The `gs://` store for one bucket, and the secrets its messages must not show.
pub(crate) fn build(
    ctx: &Ctx,
    bucket: &str,
    opts: &SourceOptions,
    client: ClientOptions,
    retry: RetryConfig,
) -> Result<(Arc<dyn ObjectStore>, Vec<String>), BuildFailure> {
    let builder = GoogleCloudStorageBuilder::new()
        .with_client_options(client)
        .with_retry(retry)
        .with_bucket_name(bucket);
    let mut secrets = Vec::new();
    let settings = &opts.gcs.settings;
    let mut builder = apply_settings(
        ctx,
        builder,
        settings,
        SECRET_SETTINGS,
        &mut secrets,
        |b: GoogleCloudStorageBuilder, k: GoogleConfigKey, v| b.with_config(k, v),
    )?;
    if base_url(settings).is_some_and(|u| u.starts_with("http://")) {
        builder = builder.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
    }
    match builder.build() {
        Ok(store) => Ok((Arc::new(store), secrets)),
        Err(e) => Err(BuildFailure::Store(e, secrets)),
    }
}

/// The `gcs_base_url` of the configured service account, if it names one. Unreadable or
/// malformed credentials are left to `object_store`, which reports them.
fn base_url(settings: &[(String, String)]) -> Option<String> {
    let json = match setting(settings, "google_service_account") {
        Some(path) => std::fs::read_to_string(path).ok()?,
        None => setting(settings, "google_service_account_key")?.to_owned(),
    };
    let value: serde_json::Value = serde_json::from_str(&json).ok()?;
    value.get("gcs_base_url")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulators_base_url_is_read_from_the_service_account() {
        let key = r#"{"gcs_base_url":"http://127.0.0.1:4443","disable_oauth":true}"#;
        let settings = vec![("google_service_account_key".to_owned(), key.to_owned())];
        assert_eq!(
            base_url(&settings).as_deref(),
            Some("http://127.0.0.1:4443")
        );
        assert_eq!(base_url(&[]), None);
        let broken = vec![("google_service_account_key".to_owned(), "{".to_owned())];
        assert_eq!(base_url(&broken), None);
    }
}
