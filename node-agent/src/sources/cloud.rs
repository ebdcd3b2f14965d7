//! Object-store sources: `s3://bucket/prefix`, `gs://bucket/prefix` and
//! `az://container/prefix`, all through the `object_store` crate (its `aws`, `gcp` and `azure`
//! stores). What differs per cloud — naming rules, settings, credentials — lives in
//! [`super::s3`], [`super::gcs`] and [`super::azure`]; this module holds what they share.
//!
//! The prefix is a "directory": `prefix/adapter_config.json`, `prefix/adapter_model.safetensors`
//! (for models the same files as `https://`), or one archive key `prefix/name.tar[.gz]` unpacked
//! by [`super::tarball`]. Files land in the digest-keyed download cache under
//! `cache_dir/<scheme>` ([`super::download`]), within the same size cap and timeout as
//! `https://`.
//!
//! The endpoint and credentials are trusted configuration (the agent's environment, a mounted
//! file), like the Hub endpoint, so a configured endpoint is not subject to the private-address
//! rule of `https://`; the bucket and key are user input and are validated strictly. The store
//! is built anew for every fetch, so a rotated credentials file takes effect without a restart.
//! Error messages never carry a credential: they are built from the error's kind and the
//! server's error code, and any configured secret that might still appear is scrubbed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::download::{self, Body, Remote};
use super::{Artifact, Ctx, SourceError, SourceOptions, azure, gcs, s3, tarball};
use crate::lora::ids::Digest;

/// `object_store` settings of one cloud (`google_service_account`, `azure_storage_account_name`,
/// …), from the agent's environment through that cloud's `ENVIRONMENT` table. Shown without
/// their values: several are secrets.
#[derive(Clone, Default)]
pub struct StoreSettings {
    pub settings: Vec<(String, String)>,
}

impl StoreSettings {
    /// The settings whose variables `env` has, in table order (a later variable for the same
    /// setting wins).
    pub fn from_env(table: &[(&str, &str)], env: impl Fn(&str) -> Option<String>) -> Self {
        let settings = table
            .iter()
            .filter_map(|&(var, key)| {
                env(var)
                    .filter(|v| !v.is_empty())
                    .map(|v| (key.to_owned(), v))
            })
            .collect();
        StoreSettings { settings }
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.settings.iter().map(|(k, _)| k))
            .finish()
    }
}

/// The object stores a source URI can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cloud {
    /// `s3://`: AWS S3 and S3-compatible servers (MinIO, Ceph RGW, R2).
    S3,
    /// `gs://`: Google Cloud Storage.
    Gcs,
    /// `az://`: Azure Blob Storage (the account comes from the configuration).
    Azure,
}

impl Cloud {
    /// The URI scheme, also the name of the download cache's subdirectory.
    pub fn scheme(self) -> &'static str {
        match self {
            Cloud::S3 => "s3",
            Cloud::Gcs => "gs",
            Cloud::Azure => "az",
        }
    }

    /// What the first URI component is called.
    fn bucket_word(self) -> &'static str {
        match self {
            Cloud::S3 | Cloud::Gcs => "bucket",
            Cloud::Azure => "container",
        }
    }

    /// The provider's naming rule for buckets (containers), which also keeps the name from
    /// reshaping the endpoint's URL; `Err` says the rule.
    fn check_bucket(self, name: &str) -> Result<(), &'static str> {
        let b = name.as_bytes();
        let ends_ok = b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric);
        let chars = |extra: &[u8]| {
            b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(c))
        };
        let (ok, rule) = match self {
            Cloud::S3 => (
                chars(b"-.") && !name.contains(".."),
                "3 to 63 lower-case letters, digits, '.' and '-'",
            ),
            Cloud::Gcs => (
                chars(b"-._") && !name.contains(".."),
                "3 to 63 lower-case letters, digits, '.', '_' and '-'",
            ),
            Cloud::Azure => (
                chars(b"-") && !name.contains("--"),
                "3 to 63 lower-case letters, digits and single '-'",
            ),
        };
        if (3..=63).contains(&b.len()) && ends_ok && ok {
            Ok(())
        } else {
            Err(rule)
        }
    }

    /// The server error codes that mean the bucket (container) itself is missing.
    fn missing_bucket_codes(self) -> &'static [&'static str] {
        match self {
            Cloud::S3 | Cloud::Gcs => &["NoSuchBucket"],
            Cloud::Azure => &["ContainerNotFound"],
        }
    }

    /// Where refused credentials come from, for the error message.
    fn credentials_hint(self) -> &'static str {
        match self {
            Cloud::S3 => "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the credentials file",
            Cloud::Gcs => "check GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT",
            Cloud::Azure => {
                "check AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, \
                 AZURE_STORAGE_SAS_TOKEN or the workload identity"
            }
        }
    }
}

/// The bucket (container) and key prefix of a URI (after the scheme), without trailing slashes.
pub(crate) fn parse(cloud: Cloud, ctx: &Ctx, rest: &str) -> Result<(String, String), SourceError> {
    let scheme = cloud.scheme();
    let word = cloud.bucket_word();
    if rest.contains(['?', '#']) {
        return Err(ctx.unsupported(format!("{scheme}:// URIs take no query or fragment")));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    cloud
        .check_bucket(bucket)
        .map_err(|rule| ctx.unsupported(format!("invalid {word} name {bucket:?}: {rule}")))?;
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Err(ctx.unsupported(format!(
            "expected {scheme}://{word}/prefix (a key prefix is required)"
        )));
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

/// Downloads an artifact from `rest` (`bucket/prefix` or `bucket/prefix/name.tar.gz`).
pub(crate) async fn fetch(
    cloud: Cloud,
    ctx: &Ctx,
    rest: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let (bucket, prefix) = parse(cloud, ctx, rest)?;
    let (prefix, archive) = match prefix.rsplit_once('/') {
        Some((dir, name)) if tarball::is_tarball(name) => (dir.to_owned(), Some(name.to_owned())),
        None if tarball::is_tarball(&prefix) => (String::new(), Some(prefix.clone())),
        _ => (prefix, None),
    };
    let (store, secrets) = store(cloud, ctx, &bucket, opts)?;
    let remote = StoreRemote {
        cloud,
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
        cloud.scheme(),
    )
    .await
}

/// Most objects an `--adapters` listing of a prefix reads.
const MAX_LISTED: usize = 100_000;

/// The adapter directories directly under a `bucket/prefix` (the `--adapters` of a bucket):
/// every common prefix holding an `adapter_config.json`, as `(name, uri)`.
pub(crate) async fn list(
    cloud: Cloud,
    ctx: &Ctx,
    rest: &str,
    opts: &SourceOptions,
) -> Result<Vec<(String, String)>, SourceError> {
    let (bucket, prefix) = parse(cloud, ctx, rest)?;
    let (store, secrets) = store(cloud, ctx, &bucket, opts)?;
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
                // `Ok` only for a not-found answer to the listing itself: nothing to list.
                classify(cloud, ctx, "listing", &e, &secrets)?;
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
            let scheme = cloud.scheme();
            out.push((name.clone(), format!("{scheme}://{bucket}/{prefix}/{name}")));
        }
    }
    out.sort();
    Ok(out)
}

/// The store for one bucket, and the secrets its messages must not show.
fn store(
    cloud: Cloud,
    ctx: &Ctx,
    bucket: &str,
    opts: &SourceOptions,
) -> Result<(Arc<dyn ObjectStore>, Vec<String>), SourceError> {
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
    let built = match cloud {
        Cloud::S3 => s3::build(ctx, bucket, opts, client, retry),
        Cloud::Gcs => gcs::build(ctx, bucket, opts, client, retry),
        Cloud::Azure => azure::build(ctx, bucket, opts, client, retry),
    };
    built.map_err(|failure| match failure {
        BuildFailure::Config(e) => e,
        BuildFailure::Store(e, secrets) => ctx.unsupported(format!(
            "cannot configure the object store: {}",
            scrub(&e.to_string(), &secrets)
        )),
    })
}

/// Why a cloud's store could not be built.
pub(crate) enum BuildFailure {
    /// The agent's configuration is wrong (an unknown setting, an unreadable file).
    Config(SourceError),
    /// `object_store` refused the settings; the secrets to scrub from its message.
    Store(object_store::Error, Vec<String>),
}

/// Applies `settings` (`object_store` keys and values from the agent's environment) to a
/// builder, collecting the values of `secret_keys`. An unknown key is the agent's
/// configuration error.
pub(crate) fn apply_settings<B, K: std::str::FromStr>(
    ctx: &Ctx,
    mut builder: B,
    settings: &[(String, String)],
    secret_keys: &[&str],
    secrets: &mut Vec<String>,
    with: impl Fn(B, K, &str) -> B,
) -> Result<B, BuildFailure> {
    for (key, value) in settings {
        let parsed: K = key.parse().map_err(|_| {
            BuildFailure::Config(ctx.io(
                "configuring the object store",
                format!("unknown setting {key}"),
            ))
        })?;
        if secret_keys.contains(&key.as_str()) {
            secrets.push(value.clone());
        }
        builder = with(builder, parsed, value);
    }
    Ok(builder)
}

/// A built store and its secrets, or why `object_store` refused the settings.
pub(crate) fn finish<S: ObjectStore>(
    built: object_store::Result<S>,
    secrets: Vec<String>,
) -> Result<(Arc<dyn ObjectStore>, Vec<String>), BuildFailure> {
    match built {
        Ok(store) => Ok((Arc::new(store), secrets)),
        Err(e) => Err(BuildFailure::Store(e, secrets)),
    }
}

/// Checks a cloud's environment table: every setting parses as its `object_store` key `K`,
/// and every secret setting is one the table fills.
#[cfg(test)]
pub(crate) fn check_environment<K: std::str::FromStr>(
    environment: &[(&str, &str)],
    secret_settings: &[&str],
) {
    for (var, key) in environment {
        assert!(key.parse::<K>().is_ok(), "{var} → {key}");
    }
    for key in secret_settings {
        assert!(environment.iter().any(|(_, k)| k == key), "{key}");
    }
}

/// The value of `key` in `settings`, if set.
pub(crate) fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The files under one key prefix of one bucket.
struct StoreRemote<'a> {
    cloud: Cloud,
    ctx: &'a Ctx,
    store: Arc<dyn ObjectStore>,
    /// The key prefix without a trailing slash; empty for the bucket's root.
    prefix: String,
    secrets: Arc<Vec<String>>,
}

impl Remote for StoreRemote<'_> {
    async fn open(&self, name: &str) -> Result<Option<Body>, SourceError> {
        let (cloud, ctx) = (self.cloud, self.ctx);
        let key = if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        };
        let location = object_store::path::Path::parse(&key)
            .map_err(|e| ctx.unsupported(format!("invalid key {key:?}: {e}")))?;
        let result = match self.store.get(&location).await {
            Ok(r) => r,
            Err(e) => return classify(cloud, ctx, name, &e, &self.secrets).map(|()| None),
        };
        let size = Some(result.meta.size);
        let (ctx, name, secrets) = (ctx.clone(), name.to_owned(), self.secrets.clone());
        let chunks = result
            .into_stream()
            .map(move |chunk| {
                chunk.map_err(|e| match classify(cloud, &ctx, &name, &e, &secrets) {
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
    cloud: Cloud,
    ctx: &Ctx,
    file: &str,
    e: &object_store::Error,
    secrets: &[String],
) -> Result<(), SourceError> {
    let text = scrub(&full_text(e), secrets);
    let code = server_code(&text);
    // A listing's failures arrive as generic errors whatever the status, so the server's code
    // is read first.
    if code
        .as_deref()
        .is_some_and(|c| cloud.missing_bucket_codes().contains(&c))
    {
        return Err(ctx.not_found(format!("no such {}", cloud.bucket_word())));
    }
    match e {
        object_store::Error::NotFound { .. } => Ok(()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Err(ctx.forbidden(format!(
            "{file}: the object store refused the credentials{} ({})",
            code.map(|c| format!(" ({c})")).unwrap_or_default(),
            cloud.credentials_hint()
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

/// The `<Code>…</Code>` of an S3, GCS (XML API) or Azure error body, if the message carries one.
fn server_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    (code.len() <= 64 && code.chars().all(|c| c.is_ascii_alphanumeric())).then(|| code.to_owned())
}

/// `text` with every configured secret replaced.
pub(crate) fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 4)
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buckets_and_prefixes_by_each_clouds_rules() {
        let ctx = Ctx::new("x://y");
        for cloud in [Cloud::S3, Cloud::Gcs, Cloud::Azure] {
            assert_eq!(
                parse(cloud, &ctx, "adapters/acme/sql/").ok(),
                Some(("adapters".into(), "acme/sql".into())),
                "{cloud:?}"
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
                "bucket-/x",
            ] {
                assert!(parse(cloud, &ctx, bad).is_err(), "{cloud:?} {bad:?}");
            }
        }
        // Where the providers' rules differ.
        assert!(parse(Cloud::Gcs, &ctx, "my_bucket/x").is_ok());
        assert!(parse(Cloud::S3, &ctx, "my_bucket/x").is_err());
        assert!(parse(Cloud::Azure, &ctx, "my.container/x").is_err());
        assert!(parse(Cloud::Azure, &ctx, "my--container/x").is_err());
        assert!(parse(Cloud::Azure, &ctx, "my-container/x").is_ok());
    }

    #[test]
    fn codes_and_scrubbing() {
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
        let settings = vec![("a".to_owned(), "1".to_owned()), ("a".into(), "2".into())];
        assert_eq!(setting(&settings, "a"), Some("2"), "the later value wins");
        assert_eq!(setting(&settings, "b"), None);
    }
}
