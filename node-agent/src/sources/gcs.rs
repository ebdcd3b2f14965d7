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

use super::cloud::{BuildFailure, apply_settings, finish, setting};
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

/// The variables that name credentials files (checked at start-up, read at every fetch).
pub const CREDENTIAL_FILES: &[&str] = &[
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_APPLICATION_CREDENTIALS",
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
    let account = account_file(settings);
    secrets.extend(account.secrets);
    if account.base_url.is_some_and(|u| u.starts_with("http://")) {
        builder = builder.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
    }
    finish(builder.build(), secrets)
}

/// What the agent reads of the configured credentials files itself.
#[derive(Debug, Default, PartialEq)]
struct AccountFile {
    /// The service account's `gcs_base_url`, if it names one.
    base_url: Option<String>,
    /// The files' secret values, scrubbed from messages like the inline key.
    secrets: Vec<String>,
}

/// The secret fields of service-account and authorized-user JSON files.
const SECRET_FIELDS: &[&str] = &["private_key", "client_secret", "refresh_token"];

/// Reads the configured service-account and application-default-credentials JSON (files or
/// the inline key). Unreadable or malformed ones are left to `object_store`, which reports them.
fn account_file(settings: &[(String, String)]) -> AccountFile {
    let parse = |json: &str| serde_json::from_str::<serde_json::Value>(json).ok();
    let account = match setting(settings, "google_service_account") {
        Some(path) => std::fs::read_to_string(path).ok().and_then(|j| parse(&j)),
        None => setting(settings, "google_service_account_key").and_then(parse),
    };
    let application = setting(settings, "google_application_credentials")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|j| parse(&j));
    let field = |v: &serde_json::Value, k: &str| v.get(k)?.as_str().map(str::to_owned);
    AccountFile {
        base_url: account.as_ref().and_then(|a| field(a, "gcs_base_url")),
        secrets: [account, application]
            .iter()
            .flatten()
            .flat_map(|v| SECRET_FIELDS.iter().filter_map(|k| field(v, k)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulators_base_url_and_the_files_secrets_are_read() {
        let key = r#"{"gcs_base_url":"http://127.0.0.1:4443","disable_oauth":true}"#;
        let settings = vec![("google_service_account_key".to_owned(), key.to_owned())];
        assert_eq!(
            account_file(&settings).base_url.as_deref(),
            Some("http://127.0.0.1:4443")
        );
        assert_eq!(account_file(&[]), AccountFile::default());
        let broken = vec![("google_service_account_key".to_owned(), "{".to_owned())];
        assert_eq!(account_file(&broken), AccountFile::default());

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sa = dir.path().join("sa.json");
        let adc = dir.path().join("adc.json");
        std::fs::write(
            &sa,
            r#"{"type":"service_account","private_key":"PEM-SECRET"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            &adc,
            r#"{"type":"authorized_user","client_secret":"CS","refresh_token":"RT"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let settings = vec![
            (
                "google_service_account".to_owned(),
                sa.display().to_string(),
            ),
            (
                "google_application_credentials".to_owned(),
                adc.display().to_string(),
            ),
        ];
        assert_eq!(account_file(&settings).secrets, ["PEM-SECRET", "CS", "RT"]);
    }

    #[test]
    fn every_variable_names_a_setting_object_store_knows() {
        super::super::cloud::check_environment::<GoogleConfigKey>(ENVIRONMENT, SECRET_SETTINGS);
    }
}
