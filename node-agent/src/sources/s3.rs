//! What is particular to `s3://bucket/prefix` sources (the `object_store` crate's `aws` store,
//! which also speaks to S3-compatible servers: MinIO, Ceph RGW, R2, moto): the settings, the
//! credentials file and the store's construction. Fetching, listing and error mapping are shared
//! with the other object stores in [`super::cloud`].
//!
//! The endpoint, region and credentials are trusted configuration, like the Hub endpoint:
//! [`S3Options::settings`] carries the `AWS_*` variables the serving layer read from the
//! agent's environment (see [`ENVIRONMENT`]; `AWS_ENDPOINT_URL` points at an S3-compatible
//! server, which is therefore not subject to the private-address rule of `https://`), and
//! [`S3Options::credentials_file`] names a mounted credentials file in the AWS shared-credentials
//! format, read again at every fetch so a rotated Secret takes effect without a restart. With
//! neither, `object_store` uses its usual chain (web identity, container or instance
//! credentials).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::cloud::{BuildFailure, apply_settings, finish, setting};
use super::{Ctx, SourceOptions};

/// The environment variables the serving layer passes on, and the `object_store` setting each
/// one becomes. `AWS_ENDPOINT_URL_S3` (the service-specific form) wins over
/// `AWS_ENDPOINT_URL` because it comes later.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    ("AWS_SESSION_TOKEN", "aws_session_token"),
    ("AWS_DEFAULT_REGION", "aws_default_region"),
    ("AWS_REGION", "aws_region"),
    ("AWS_ENDPOINT_URL", "aws_endpoint"),
    ("AWS_ENDPOINT_URL_S3", "aws_endpoint"),
    ("AWS_ALLOW_HTTP", "aws_allow_http"),
    (
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
        "aws_virtual_hosted_style_request",
    ),
    ("AWS_SKIP_SIGNATURE", "aws_skip_signature"),
    ("AWS_WEB_IDENTITY_TOKEN_FILE", "aws_web_identity_token_file"),
    ("AWS_ROLE_ARN", "aws_role_arn"),
    ("AWS_ROLE_SESSION_NAME", "aws_role_session_name"),
    ("AWS_ENDPOINT_URL_STS", "aws_endpoint_url_sts"),
    (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "aws_container_credentials_relative_uri",
    ),
    (
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "aws_container_credentials_full_uri",
    ),
    (
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "aws_container_authorization_token_file",
    ),
];

/// Settings whose values are secrets (never shown, scrubbed from messages).
const SECRET_SETTINGS: &[&str] = &[
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
];

/// How `s3://` sources reach the object store. Empty: `object_store`'s defaults (AWS, region
/// `us-east-1`, credentials from the instance).
#[derive(Clone, Default)]
pub struct S3Options {
    /// `object_store` settings (`aws_endpoint`, `aws_region`, `aws_access_key_id`, …), from
    /// the agent's environment through [`ENVIRONMENT`].
    pub settings: Vec<(String, String)>,
    /// A mounted credentials file (`[default]` with `aws_access_key_id`,
    /// `aws_secret_access_key`, optionally `aws_session_token`); overrides the environment's keys.
    pub credentials_file: Option<PathBuf>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(k, v)| {
                let v = if SECRET_SETTINGS.contains(&k.as_str()) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("S3Options")
            .field("settings", &shown)
            .field("credentials_file", &self.credentials_file)
            .finish()
    }
}

/// Static credentials from a credentials file.
#[derive(Clone, PartialEq, Eq)]
pub struct FileCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Parses an AWS shared-credentials file: the `[default]` profile, or the keys before any
/// section header.
pub fn parse_credentials(text: &str) -> Result<FileCredentials, String> {
    let mut section: Option<&str> = None;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim());
            continue;
        }
        if !matches!(section, None | Some("default")) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err("a line is neither `[profile]` nor `key = value`".into());
        };
        let value = value.trim().to_owned();
        match key.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key))
            if !access_key_id.is_empty() && !secret_access_key.is_empty() =>
        {
            Ok(FileCredentials {
                access_key_id,
                secret_access_key,
                session_token: token.filter(|t| !t.is_empty()),
            })
        }
        _ => Err("no aws_access_key_id and aws_secret_access_key in the [default] profile".into()),
    }
}

/// The `s3://` store for one bucket, and the secrets its messages must not show.
pub(crate) fn build(
    ctx: &Ctx,
    bucket: &str,
    opts: &SourceOptions,
    client: ClientOptions,
    retry: RetryConfig,
) -> Result<(Arc<dyn ObjectStore>, Vec<String>), BuildFailure> {
    // Client options first: settings such as `aws_allow_http` live inside them, and
    // `with_client_options` replaces them whole.
    let builder = AmazonS3Builder::new()
        .with_client_options(client)
        .with_retry(retry)
        .with_bucket_name(bucket);
    let mut secrets = Vec::new();
    let settings = &opts.s3.settings;
    let mut builder = apply_settings(
        ctx,
        builder,
        settings,
        SECRET_SETTINGS,
        &mut secrets,
        |b: AmazonS3Builder, k: AmazonS3ConfigKey, v| b.with_config(k, v),
    )?;
    if let Some(path) = &opts.s3.credentials_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            BuildFailure::Config(ctx.io(
                "reading the S3 credentials file",
                format!("{}: {}", path.display(), e.kind()),
            ))
        })?;
        let creds = parse_credentials(&text).map_err(|reason| {
            BuildFailure::Config(ctx.io(
                "reading the S3 credentials file",
                format!("{}: {reason}", path.display()),
            ))
        })?;
        secrets.extend([creds.access_key_id.clone(), creds.secret_access_key.clone()]);
        builder = builder
            .with_access_key_id(creds.access_key_id)
            .with_secret_access_key(creds.secret_access_key);
        if let Some(token) = creds.session_token {
            secrets.push(token.clone());
            builder = builder.with_token(token);
        }
    }
    // A plain-http endpoint is configuration the operator of the agent wrote down on purpose
    // (an in-cluster MinIO, a test server); object_store refuses it unless told.
    if setting(settings, "aws_endpoint").is_some_and(|e| e.starts_with("http://")) {
        builder = builder.with_allow_http(true);
    }
    finish(builder.build(), secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_names_a_setting_object_store_knows() {
        super::super::cloud::check_environment::<AmazonS3ConfigKey>(ENVIRONMENT, SECRET_SETTINGS);
    }

    #[test]
    fn credentials_files() {
        let creds = parse_credentials(
            "# mounted\n[other]\naws_access_key_id = NO\n[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .ok();
        assert_eq!(
            creds.map(|c| (c.access_key_id, c.secret_access_key, c.session_token)),
            Some(("AK".into(), "SK".into(), None))
        );
        assert!(parse_credentials("aws_access_key_id = AK\n").is_err());
        assert!(
            parse_credentials("[other]\naws_access_key_id=a\naws_secret_access_key=b").is_err()
        );
    }
}
