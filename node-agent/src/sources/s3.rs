//! `s3://bucket/prefix` sources through the `object_store` crate (its `aws` store, which also
//! speaks to S3-compatible servers: MinIO, Ceph RGW, R2, moto). The prefix is a "directory":
//! `prefix/adapter_config.json`, `prefix/adapter_model.safetensors` (for models the same files
//! as `https://`), or one archive key `prefix/name.tar[.gz]` unpacked by [`super::tarball`].
//! Files land in the digest-keyed download cache under `cache_dir/s3` ([`super::download`]).
//!
//! The endpoint, region and credentials are trusted configuration, like the Hub endpoint:
//! [`S3Options::settings`] carries the `AWS_*` variables the serving layer read from the
//! agent's environment (see [`ENVIRONMENT`]; `AWS_ENDPOINT_URL` points at an S3-compatible
//! server, which is therefore not subject to the private-address rule of `https://`), and
//! [`S3Options::credentials_file`] names a mounted credentials file in the AWS shared-credentials
//! format, read again at every fetch so a rotated Secret takes effect without a restart. With
//! neither, `object_store` uses its usual chain (web identity, container or instance
//! credentials). The bucket and key are user input and are validated strictly. Error messages
//! never carry a credential: they are built from the error's kind and the server's error code,
//! and any configured secret that might still appear is scrubbed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::download::{self, Body, Remote};
use super::{Artifact, Ctx, SourceError, SourceOptions, tarball};
use crate::lora::ids::Digest;

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

/// The bucket and key prefix of an `s3://` URI (after the scheme), without trailing slashes.
pub(crate) fn parse(ctx: &Ctx, rest: &str) -> Result<(String, String), SourceError> {
    if rest.contains(['?', '#']) {
        return Err(ctx.unsupported("s3:// URIs take no query or fragment"));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket naming rules; they also keep the bucket from reshaping the endpoint's URL.
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric()
        && !bucket.contains("..");
    if !bucket_ok {
        return Err(ctx.unsupported(format!(
            "invalid bucket name {bucket:?}: 3 to 63 lower-case letters, digits, '.' and '-'"
        )));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Err(ctx.unsupported("expected s3://bucket/prefix (a key prefix is required)"));
    }
    let segments_ok = prefix.len() <= 1024
        && prefix
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && !s.chars().any(char::is_control));
    if !segments_ok {
        return Err(
            ctx.unsupported("invalid key prefix: '/'-separated names, none empty, '.' or '..'")
        );
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

pub(crate) async fn fetch(
    ctx: &Ctx,
    rest: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let (bucket, prefix) = parse(ctx, rest)?;
    let (prefix, archive) = match prefix.rsplit_once('/') {
        Some((dir, name)) if tarball::is_tarball(name) => (dir.to_owned(), Some(name.to_owned())),
        None if tarball::is_tarball(&prefix) => (String::new(), Some(prefix.clone())),
        _ => (prefix, None),
    };
    let (store, secrets) = store(ctx, &bucket, opts)?;
    let remote = S3Remote {
        ctx,
        store,
        prefix,
        secrets: Arc::new(secrets),
    };
    download::fetch(
        ctx,
        &remote,
        archive.as_deref(),
        artifact,
        expected,
        opts,
        "s3",
    )
    .await
}

/// Most objects an `--adapters` listing of a prefix reads.
const MAX_LISTED: usize = 100_000;

/// The adapter directories directly under an `s3://bucket/prefix` (the `--adapters` of a
/// bucket): every common prefix holding an `adapter_config.json`, as `(name, uri)`.
pub(crate) async fn list(
    ctx: &Ctx,
    rest: &str,
    opts: &SourceOptions,
) -> Result<Vec<(String, String)>, SourceError> {
    let (bucket, prefix) = parse(ctx, rest)?;
    let (store, secrets) = store(ctx, &bucket, opts)?;
    let location = object_store::path::Path::parse(&prefix)
        .map_err(|e| ctx.unsupported(format!("invalid key prefix: {e}")))?;
    // A flat listing of the prefix, rather than a delimited one: every adapter is a sub-prefix
    // with an `adapter_config.json` right under it, so the keys say it all.
    let mut listing = store.list(Some(&location));
    let mut out = Vec::new();
    let mut seen = 0usize;
    let depth = location.parts().count();
    while let Some(meta) = listing.next().await {
        let meta = match meta {
            Ok(m) => m,
            Err(e) => {
                classify(ctx, "listing", &e, &secrets)?;
                break;
            }
        };
        seen += 1;
        if seen > MAX_LISTED {
            return Err(ctx.unsupported(format!(
                "more than {MAX_LISTED} objects under the prefix; name a narrower one"
            )));
        }
        let parts: Vec<_> = meta.location.parts().collect();
        if let [name, file] = &parts[depth.min(parts.len())..]
            && file.as_ref() == super::ADAPTER_CONFIG
        {
            let name = name.as_ref().to_owned();
            out.push((name.clone(), format!("s3://{bucket}/{prefix}/{name}")));
        }
    }
    out.sort();
    Ok(out)
}

/// The store for one bucket, and the secrets its messages must not show.
fn store(
    ctx: &Ctx,
    bucket: &str,
    opts: &SourceOptions,
) -> Result<(AmazonS3, Vec<String>), SourceError> {
    let mut client = ClientOptions::new()
        .with_connect_timeout(opts.timeout.min(Duration::from_secs(30)))
        .with_timeout(opts.timeout);
    if let Some(ca) = &opts.ca {
        let certs = object_store::Certificate::from_pem_bundle(ca.pem())
            .map_err(|e| ctx.io("reading the CA bundle", e))?;
        for cert in certs {
            client = client.with_root_certificate(cert);
        }
    }
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: opts.timeout.min(Duration::from_secs(60)),
        ..RetryConfig::default()
    };
    // Client options first: settings such as `aws_allow_http` live inside them, and
    // `with_client_options` replaces them whole.
    let mut builder = AmazonS3Builder::new()
        .with_client_options(client)
        .with_retry(retry)
        .with_bucket_name(bucket);
    let mut secrets = Vec::new();
    let mut endpoint = None;
    for (key, value) in &opts.s3.settings {
        let parsed: AmazonS3ConfigKey = key.parse().map_err(|_| {
            ctx.io(
                "configuring the object store",
                format!("unknown setting {key}"),
            )
        })?;
        if SECRET_SETTINGS.contains(&key.as_str()) {
            secrets.push(value.clone());
        }
        if key == "aws_endpoint" {
            endpoint = Some(value.clone());
        }
        builder = builder.with_config(parsed, value);
    }
    if let Some(path) = &opts.s3.credentials_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ctx.io(
                "reading the S3 credentials file",
                format!("{}: {}", path.display(), e.kind()),
            )
        })?;
        let creds = parse_credentials(&text).map_err(|reason| {
            ctx.io(
                "reading the S3 credentials file",
                format!("{}: {reason}", path.display()),
            )
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
    if endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"))
    {
        builder = builder.with_allow_http(true);
    }
    let store = builder.build().map_err(|e| {
        ctx.unsupported(format!(
            "cannot configure the object store: {}",
            scrub(&e.to_string(), &secrets)
        ))
    })?;
    Ok((store, secrets))
}

/// The files under one key prefix of one bucket.
struct S3Remote<'a> {
    ctx: &'a Ctx,
    store: AmazonS3,
    /// The key prefix without a trailing slash; empty for the bucket's root.
    prefix: String,
    secrets: Arc<Vec<String>>,
}

impl Remote for S3Remote<'_> {
    async fn open(&self, name: &str) -> Result<Option<Body>, SourceError> {
        let ctx = self.ctx;
        let key = if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        };
        let location = object_store::path::Path::parse(&key)
            .map_err(|e| ctx.unsupported(format!("invalid key {key:?}: {e}")))?;
        let result = match self.store.get(&location).await {
            Ok(r) => r,
            Err(e) => return classify(ctx, name, &e, &self.secrets).map(|()| None),
        };
        let size = Some(result.meta.size);
        let (ctx, name, secrets) = (ctx.clone(), name.to_owned(), self.secrets.clone());
        let chunks = result
            .into_stream()
            .map(move |chunk| {
                chunk.map_err(|e| match classify(&ctx, &name, &e, &secrets) {
                    Err(err) => err,
                    Ok(()) => ctx.fetch(format!("{name}: the object vanished while reading it")),
                })
            })
            .boxed();
        Ok(Some(Body { size, chunks }))
    }
}

/// Maps an `object_store` error. `Ok(())`: the key does not exist (the caller decides whether
/// that matters); a missing bucket, refused credentials and everything else are errors.
fn classify(
    ctx: &Ctx,
    file: &str,
    e: &object_store::Error,
    secrets: &[String],
) -> Result<(), SourceError> {
    let text = scrub(&full_text(e), secrets);
    let code = server_code(&text);
    match e {
        object_store::Error::NotFound { .. } if code.as_deref() == Some("NoSuchBucket") => {
            Err(ctx.not_found("no such bucket"))
        }
        object_store::Error::NotFound { .. } => Ok(()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Err(ctx.forbidden(format!(
            "{file}: the object store refused the credentials{} (check AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY or the credentials file)",
            code.map(|c| format!(" ({c})")).unwrap_or_default()
        ))),
        _ => Err(ctx.fetch(format!("{file}: {text}"))),
    }
}

/// An error and its sources, one line.
fn full_text(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        let more = inner.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        cur = inner.source();
    }
    s.chars().filter(|c| !c.is_control()).collect()
}

/// The `<Code>…</Code>` of an S3 error body, if the message carries one.
fn server_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    (code.len() <= 64 && code.chars().all(|c| c.is_ascii_alphanumeric())).then(|| code.to_owned())
}

/// `text` with every configured secret replaced.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 4)
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let ctx = Ctx::new("s3://x");
        assert_eq!(
            parse(&ctx, "adapters/acme/sql/").ok(),
            Some(("adapters".into(), "acme/sql".into()))
        );
        for bad in [
            "ab/x",
            "Upper/x",
            "-bucket/x",
            "bucket",
            "bucket/",
            "bucket/a//b",
            "bucket/../x",
            "bucket/a/./b",
            "bucket/x?versionId=1",
            "bu..cket/x",
        ] {
            assert!(parse(&ctx, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_files_and_codes() {
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
        assert_eq!(
            server_code("… <Error><Code>NoSuchBucket</Code><Message>x</Message>").as_deref(),
            Some("NoSuchBucket")
        );
        assert_eq!(
            scrub(
                "key AKIA1234 secret s3cr3t!",
                &["AKIA1234".into(), "s3cr3t!".into()]
            ),
            "key <redacted> secret <redacted>"
        );
    }
}
