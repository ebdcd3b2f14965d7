//! Adapter and model sources: turns a URI from the admin API or the command line into a local
//! directory holding the files the engine loads.
//!
//! | URI | where the files come from |
//! |---|---|
//! | `/abs/path`, `file:///abs/path` | a directory under one of [`SourceOptions::local_roots`] |
//! | `https://host/dir` | `dir/<file>` for each file, into [`SourceOptions::cache_dir`]`/https` |
//! | `https://host/dir/a.tar[.gz]` | one archive, unpacked safely ([`tarball`]) into the same cache |
//! | `s3://bucket/prefix` | `prefix/<file>` (or one archive key) via `object_store`, into `cache_dir/s3` |
//! | `gs://bucket/prefix` | the same from Google Cloud Storage, into `cache_dir/gs` |
//! | `az://container/prefix` | the same from Azure Blob Storage (the account is configuration), into `cache_dir/az` |
//! | `pvc://claim/path` | `path` on a claim mounted at [`SourceOptions::pvc_mount_dir`]`/claim`, confined to it |
//! | `hf://org/repo[@revision]` | the Hugging Face Hub at [`SourceOptions::hf_endpoint`], via `hf-hub` |
//!
//! Guarantees:
//! - A local path is canonicalised and must stay inside a configured root: `..` components are
//!   refused outright, and so is any path or directory entry whose symlinks lead outside the
//!   roots.
//! - `https://` never connects to a loopback, private, link-local or otherwise non-public
//!   address (checked on the resolved IPs of every hop, redirects included) unless
//!   [`SourceOptions::allow_private_networks`] or the host is in
//!   [`SourceOptions::allowed_private_hosts`]; the size cap is enforced while streaming; a
//!   download lands in a temporary directory renamed into place only when complete and verified,
//!   so a failed or cancelled download leaves nothing behind.
//! - `s3://`, `gs://` and `az://` talk to the configured endpoint (the provider's, or one named
//!   by the agent's configuration: `AWS_ENDPOINT_URL`, a service account's `gcs_base_url`,
//!   `AZURE_STORAGE_ENDPOINT`), trusted like the Hub endpoint ([`cloud`]); the bucket and key
//!   are validated, and the download goes through the same size cap and cache as `https://`.
//! - An archive is unpacked with no path escapes (`..`, absolute paths, links), within the size
//!   cap and [`tarball::MAX_ENTRIES`] entries.
//! - `hf://` talks to the configured Hub endpoint, which is trusted configuration (like the
//!   operator's own address): it is *not* subject to the private-address rule, so an in-cluster
//!   Hub mirror works and tests can use a loopback server. The size cap is checked against the
//!   size the Hub announces before a file is fetched, and again on the file received.
//! - Errors name the URI with credentials and query strings removed ([`redact`]) and a reason;
//!   tokens never appear in messages.

pub mod azure;
pub mod cloud;
mod download;
pub mod gcs;
mod hf;
mod https;
mod local;
pub mod net;
mod progress;
mod pvc;
pub mod s3;
pub mod tarball;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::lora::ids::Digest;

pub use cloud::StoreSettings;
pub use net::{AddressPolicy, HostResolver, StaticResolver, SystemResolver};
pub use s3::S3Options;

/// What a source holds: the files fetched differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// A PEFT LoRA adapter: `adapter_config.json` + `adapter_model.safetensors`.
    Adapter,
    /// A Hugging Face checkpoint: `config.json`, tokenizer files, `*.safetensors` (+ index).
    Model,
}

/// The PEFT adapter files.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// A sharded checkpoint's index (`weight_map` names the shards).
pub const MODEL_INDEX: &str = "model.safetensors.index.json";
pub const MODEL_WEIGHTS: &str = "model.safetensors";

impl Artifact {
    /// Files that must exist, and files fetched when present (weights of models excluded: they
    /// come from the index, or `model.safetensors`).
    pub fn files(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Artifact::Adapter => (&[ADAPTER_CONFIG, ADAPTER_WEIGHTS], &[]),
            Artifact::Model => (
                &["config.json", "tokenizer.json"],
                &[
                    "tokenizer_config.json",
                    "generation_config.json",
                    "special_tokens_map.json",
                ],
            ),
        }
    }
}

/// Where sources may come from and how far a fetch may go. Built once from the agent's
/// configuration (the serving layer reads `HF_ENDPOINT` / `HF_TOKEN` into
/// [`SourceOptions::hf_endpoint`] / [`SourceOptions::hf_token`]; this module reads no
/// environment).
#[derive(Clone)]
pub struct SourceOptions {
    /// Directories local paths must stay inside. Empty: local paths are refused.
    pub local_roots: Vec<PathBuf>,
    /// Downloads land here (`https/`, `hf/`).
    pub cache_dir: PathBuf,
    /// Most bytes one source may download, over all its files.
    pub max_bytes: u64,
    /// Wall-clock budget for fetching one source, every file and redirect included.
    pub timeout: Duration,
    /// Let `https://` reach loopback, private and link-local addresses.
    pub allow_private_networks: bool,
    /// Host names (or IP literals) exempt from the private-address rule, e.g. an in-cluster
    /// mirror; exact, case-insensitive match. Other hosts reached by a redirect stay checked.
    pub allowed_private_hosts: Vec<String>,
    /// Accept plain `http://` sources (and redirects to them). Off in production: a network
    /// attacker could swap the files (the sha256 pin still protects the weights).
    pub allow_http: bool,
    /// The Hub's base URL, e.g. `https://huggingface.co` (the `HF_ENDPOINT` convention).
    pub hf_endpoint: String,
    /// Bearer token sent to the Hub (the `HF_TOKEN` convention).
    pub hf_token: Option<String>,
    /// Resolves host names for `https://`; [`SystemResolver`] in production, a static table in
    /// tests.
    pub resolver: Arc<dyn HostResolver>,
    /// Extra trust anchors for `https://` and object-store servers, beside the public roots.
    pub ca: Option<CaBundle>,
    /// The object store of `s3://` sources.
    pub s3: S3Options,
    /// The object store of `gs://` sources (from [`gcs::ENVIRONMENT`]).
    pub gcs: StoreSettings,
    /// The object store of `az://` sources (from [`azure::ENVIRONMENT`]).
    pub azure: StoreSettings,
    /// Where PersistentVolumeClaims are mounted (`<dir>/<claim>`), for `pvc://`. `None`:
    /// `pvc://` is refused.
    pub pvc_mount_dir: Option<PathBuf>,
}

/// A PEM bundle of CA certificates, checked when read.
#[derive(Clone)]
pub struct CaBundle {
    path: PathBuf,
    pem: Arc<[u8]>,
}

impl CaBundle {
    /// Reads and checks `path`: at least one certificate, every one usable as a trust anchor.
    pub fn read(path: &Path) -> Result<CaBundle, String> {
        let pem = std::fs::read(path).map_err(|e| e.to_string())?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err("no PEM certificates in the file".into());
        }
        let mut builder = reqwest::Client::builder();
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        builder
            .build()
            .map_err(|e| format!("unusable CA certificates: {e}"))?;
        Ok(CaBundle {
            path: path.to_owned(),
            pem: pem.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pem(&self) -> &[u8] {
        &self.pem
    }
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaBundle").field(&self.path).finish()
    }
}

impl std::fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOptions")
            .field("local_roots", &self.local_roots)
            .field("cache_dir", &self.cache_dir)
            .field("max_bytes", &self.max_bytes)
            .field("timeout", &self.timeout)
            .field("allow_private_networks", &self.allow_private_networks)
            .field("allowed_private_hosts", &self.allowed_private_hosts)
            .field("allow_http", &self.allow_http)
            .field("hf_endpoint", &self.hf_endpoint)
            .field("hf_token", &self.hf_token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("s3", &self.s3)
            .field("gcs", &self.gcs)
            .field("azure", &self.azure)
            .field("pvc_mount_dir", &self.pvc_mount_dir)
            .finish_non_exhaustive()
    }
}

impl SourceOptions {
    /// Safe defaults: no local roots, 4 GiB, 10 minutes, public networks only, https only,
    /// the public Hub without a token.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        SourceOptions {
            local_roots: Vec::new(),
            cache_dir: cache_dir.into(),
            max_bytes: 4 << 30,
            timeout: Duration::from_secs(600),
            allow_private_networks: false,
            allowed_private_hosts: Vec::new(),
            allow_http: false,
            hf_endpoint: "https://huggingface.co".to_owned(),
            hf_token: None,
            resolver: Arc::new(SystemResolver),
            ca: None,
            s3: S3Options::default(),
            gcs: StoreSettings::default(),
            azure: StoreSettings::default(),
            pvc_mount_dir: None,
        }
    }

    pub(crate) fn address_policy(&self) -> AddressPolicy {
        AddressPolicy {
            allow_private: self.allow_private_networks,
            allowed_hosts: self
                .allowed_private_hosts
                .iter()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
                .collect(),
        }
    }
}

/// Why a source could not be resolved. Every variant carries the (redacted) URI.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Malformed URI, unknown scheme, or a scheme this agent does not accept.
    #[error("{uri}: unsupported source: {reason}")]
    Unsupported { uri: String, reason: String },
    /// Refused by policy: outside the local roots, a `..`, a symlink escape, a non-public
    /// address, a refused redirect.
    #[error("{uri}: refused: {reason}")]
    Forbidden { uri: String, reason: String },
    #[error("{uri}: not found: {reason}")]
    NotFound { uri: String, reason: String },
    #[error("{uri}: exceeds the download limit of {limit} bytes")]
    TooLarge { uri: String, limit: u64 },
    #[error("{uri}: sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        uri: String,
        expected: String,
        actual: String,
    },
    #[error("{uri}: timed out after {after:?}")]
    Timeout { uri: String, after: Duration },
    /// The remote end failed: connection refused, an HTTP error status, a broken stream.
    #[error("{uri}: fetch failed: {reason}")]
    Fetch { uri: String, reason: String },
    /// Local I/O (the cache directory).
    #[error("{uri}: {reason}")]
    Io { uri: String, reason: String },
}

impl SourceError {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Unsupported { .. } => "unsupported",
            SourceError::Forbidden { .. } => "forbidden",
            SourceError::NotFound { .. } => "not_found",
            SourceError::TooLarge { .. } => "too_large",
            SourceError::DigestMismatch { .. } => "digest_mismatch",
            SourceError::Timeout { .. } => "timeout",
            SourceError::Fetch { .. } => "fetch",
            SourceError::Io { .. } => "io",
        }
    }
}

/// Builds [`SourceError`]s for one URI.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub uri: String,
}

impl Ctx {
    pub fn new(uri: &str) -> Self {
        Ctx { uri: redact(uri) }
    }
    pub fn unsupported(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Unsupported {
            uri: self.uri.clone(),
            reason: reason.into(),
        }
    }
    pub fn forbidden(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Forbidden {
            uri: self.uri.clone(),
            reason: reason.into(),
        }
    }
    pub fn not_found(&self, reason: impl Into<String>) -> SourceError {
        SourceError::NotFound {
            uri: self.uri.clone(),
            reason: reason.into(),
        }
    }
    pub fn too_large(&self, limit: u64) -> SourceError {
        SourceError::TooLarge {
            uri: self.uri.clone(),
            limit,
        }
    }
    pub fn fetch(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Fetch {
            uri: self.uri.clone(),
            reason: reason.into(),
        }
    }
    pub fn io(&self, what: &str, e: impl std::fmt::Display) -> SourceError {
        SourceError::Io {
            uri: self.uri.clone(),
            reason: format!("{what}: {e}"),
        }
    }
    pub fn mismatch(&self, expected: &Digest, actual: &Digest) -> SourceError {
        SourceError::DigestMismatch {
            uri: self.uri.clone(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

/// A URI fit for logs and error messages: userinfo dropped, query and fragment elided.
pub fn redact(uri: &str) -> String {
    let cut = uri.find(['?', '#']);
    let (base, elided) = match cut {
        Some(i) => (&uri[..i], "?…"),
        None => (uri, ""),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => base.to_owned(),
    };
    // Control characters would forge log lines.
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    format!("{clean}{elided}")
}

/// Resolves an adapter source with no expected digest. See [`resolve_adapter`].
pub async fn resolve(uri: &str, opts: &SourceOptions) -> Result<PathBuf, SourceError> {
    resolve_adapter(uri, None, opts).await
}

/// Resolves an adapter source to a local directory holding `adapter_config.json` and
/// `adapter_model.safetensors`.
///
/// Errors: see [`SourceError`]. With `expected`, downloaded weights whose sha256 differs are
/// refused and not cached ([`SourceError::DigestMismatch`]); local files are verified by the
/// engine when it loads them.
pub async fn resolve_adapter(
    uri: &str,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    fetch(uri, Artifact::Adapter, expected, opts).await
}

/// Resolves a base model source to a local checkpoint directory.
pub async fn resolve_model(uri: &str, opts: &SourceOptions) -> Result<PathBuf, SourceError> {
    fetch(uri, Artifact::Model, None, opts).await
}

async fn fetch(
    uri: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let ctx = Ctx::new(uri);
    if uri.is_empty() {
        return Err(ctx.unsupported("the source URI is empty"));
    }
    if uri.chars().any(char::is_control) {
        return Err(ctx.unsupported("the source URI contains control characters"));
    }
    if let Some(rest) = uri.strip_prefix("hf://") {
        return with_timeout(&ctx, opts, hf::fetch(&ctx, rest, artifact, expected, opts)).await;
    }
    if uri.starts_with("https://") || uri.starts_with("http://") {
        return with_timeout(
            &ctx,
            opts,
            https::fetch(&ctx, uri, artifact, expected, opts),
        )
        .await;
    }
    if let Some((cloud, rest)) = object_store_uri(uri) {
        let work = cloud::fetch(cloud, &ctx, rest, artifact, expected, opts);
        return with_timeout(&ctx, opts, work).await;
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        let path = local::file_uri_path(&ctx, rest)?;
        return local::resolve(&ctx, &path, artifact, opts);
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        return pvc::resolve(&ctx, rest, artifact, opts);
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(ctx.unsupported(format!(
            "scheme {scheme:?} is not one of file://, https://, s3://, gs://, az://, pvc://, hf://"
        )));
    }
    local::resolve(&ctx, Path::new(uri), artifact, opts)
}

/// The adapters directly under a directory-like remote source, as `(name, uri)` pairs sorted by
/// name: what `--adapters` preloads when given a URI. `s3://bucket/prefix` (and `gs://`,
/// `az://`) lists the prefix's
/// sub-prefixes and `pvc://claim/dir` the directory's subdirectories, keeping those holding an
/// `adapter_config.json`; other schemes cannot be listed ([`SourceError::Unsupported`]).
pub async fn list_adapters(
    uri: &str,
    opts: &SourceOptions,
) -> Result<Vec<(String, String)>, SourceError> {
    let ctx = Ctx::new(uri);
    if uri.chars().any(char::is_control) {
        return Err(ctx.unsupported("the source URI contains control characters"));
    }
    if let Some((cloud, rest)) = object_store_uri(uri) {
        return with_timeout(&ctx, opts, cloud::list(cloud, &ctx, rest, opts)).await;
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        return pvc::list(&ctx, rest, opts);
    }
    Err(ctx.unsupported(
        "only s3://, gs://, az:// and pvc:// directories (and local directories) can be listed \
         for adapters",
    ))
}

/// The object store a URI names, and the URI after its scheme.
fn object_store_uri(uri: &str) -> Option<(cloud::Cloud, &str)> {
    [cloud::Cloud::S3, cloud::Cloud::Gcs, cloud::Cloud::Azure]
        .into_iter()
        .find_map(|c| Some((c, uri.strip_prefix(c.scheme())?.strip_prefix("://")?)))
}

async fn with_timeout<T>(
    ctx: &Ctx,
    opts: &SourceOptions,
    work: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    match tokio::time::timeout(opts.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(SourceError::Timeout {
            uri: ctx.uri.clone(),
            after: opts.timeout,
        }),
    }
}

/// The shard files a `model.safetensors.index.json` names, validated as plain file names.
pub(crate) fn index_shards(ctx: &Ctx, index: &[u8]) -> Result<Vec<String>, SourceError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index)
        .map_err(|e| ctx.fetch(format!("invalid {MODEL_INDEX}: {e}")))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        if !is_plain_file_name(s) || !s.ends_with(".safetensors") {
            return Err(ctx.forbidden(format!(
                "{MODEL_INDEX} names {s:?}, not a .safetensors file in the same directory"
            )));
        }
    }
    Ok(shards)
}

/// A single path component: no separators, no `.`/`..`, no control characters.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_drops_userinfo_and_query() {
        assert_eq!(
            redact("https://user:secret@example.com/a/b?X-Amz-Signature=abc"),
            "https://example.com/a/b?…"
        );
        assert_eq!(redact("hf://org/repo@main"), "hf://org/repo@main");
        assert_eq!(redact("/models/a\nforged"), "/models/aforged");
    }

    #[test]
    fn index_shards_are_plain_names() {
        let ctx = Ctx::new("x");
        let ok = br#"{"weight_map":{"a":"model-00001.safetensors","b":"model-00001.safetensors","c":"model-00002.safetensors"}}"#;
        assert_eq!(
            index_shards(&ctx, ok).unwrap_or_default(),
            vec!["model-00001.safetensors", "model-00002.safetensors"]
        );
        let bad = br#"{"weight_map":{"a":"../../etc/passwd.safetensors"}}"#;
        assert!(matches!(
            index_shards(&ctx, bad),
            Err(SourceError::Forbidden { .. })
        ));
    }

    #[tokio::test]
    async fn unknown_schemes_and_empty_uris_are_unsupported() {
        let opts = SourceOptions::new(std::env::temp_dir());
        for uri in [
            "",
            "gs://Bad_Bucket/key",
            "az://container",
            "abfs://x/y",
            "ftp://x/y",
            "hf\u{0}://x",
            "pvc://claim/x",
        ] {
            let err = resolve(uri, &opts).await.err();
            assert!(
                matches!(err, Some(SourceError::Unsupported { .. })),
                "{uri:?}: {err:?}"
            );
        }
    }
}
