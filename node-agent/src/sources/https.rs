//! `https://` sources: a directory URL whose files are fetched one by one
//! (`<url>/adapter_config.json`, `<url>/adapter_model.safetensors`; for models the config,
//! tokenizer files, and the shards a `model.safetensors.index.json` names or
//! `model.safetensors`).
//!
//! Every request goes through a client that resolves names with the guarded resolver (no
//! non-public address unless allowed), checks every redirect target (scheme, IP literal, at
//! most [`MAX_REDIRECTS`]), ignores proxy environment variables (a proxy would resolve names
//! on our behalf, unchecked), and does not decompress (the size cap counts bytes on the wire).
//!
//! Files stream into a fresh `.partial-*` directory under `cache_dir/https`, hashed on the way;
//! the size cap is checked against `Content-Length` before reading and against the bytes
//! received while streaming. When everything is in and verified, the directory is renamed to
//! `sha256-<key>`, where the key digests every file's name and sha256; a failure or
//! cancellation at any point removes the partial directory (and partial directories a crashed
//! process left are swept once older than any live download could be). With an expected digest, an adapter
//! already cached under the same config and weights is reused without fetching its weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use super::net::{self, Blocked, GuardedResolver};
use super::progress::ProgressLog;
use super::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, Ctx, MODEL_INDEX, MODEL_WEIGHTS, SourceError,
    SourceOptions,
};
use crate::lora::ids::Digest;

/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 5;

/// What may still be downloaded for this source.
struct Budget {
    left: u64,
    limit: u64,
}

pub(crate) async fn fetch(
    ctx: &Ctx,
    uri: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let mut base =
        reqwest::Url::parse(uri).map_err(|e| ctx.unsupported(format!("invalid URL: {e}")))?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err(ctx.unsupported("a directory URL takes no query or fragment"));
    }
    let policy = opts.address_policy();
    policy
        .check_url(&base, opts.allow_http)
        .map_err(|b| ctx.forbidden(b.to_string()))?;
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let client = client(opts, policy).map_err(|e| ctx.io("building the HTTP client", e))?;

    let root = opts.cache_dir.join("https");
    std::fs::create_dir_all(&root).map_err(|e| ctx.io("creating the cache directory", e))?;
    sweep_stale_partials(&root, opts.timeout);
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(&root)
        .map_err(|e| ctx.io("creating a download directory", e))?;
    let mut budget = Budget {
        left: opts.max_bytes,
        limit: opts.max_bytes,
    };
    let mut dl = Downloader {
        ctx,
        client: &client,
        base: &base,
        dir: partial.path(),
        budget: &mut budget,
        files: Vec::new(),
    };

    match artifact {
        Artifact::Adapter => {
            dl.get(ADAPTER_CONFIG, true).await?;
            if let Some(expected) = expected {
                let mut files = dl.files.clone();
                files.push((ADAPTER_WEIGHTS.to_owned(), *expected));
                let cached = root.join(cache_key(&files));
                if cached.is_dir() {
                    tracing::info!(source = %ctx.uri, dir = %cached.display(), "adapter already cached");
                    return Ok(cached);
                }
            }
            let weights = dl.get(ADAPTER_WEIGHTS, true).await?;
            if let (Some(expected), Some(actual)) = (expected, weights)
                && *expected != actual
            {
                return Err(ctx.mismatch(expected, &actual));
            }
        }
        Artifact::Model => {
            let (required, optional) = artifact.files();
            for f in required {
                dl.get(f, true).await?;
            }
            for f in optional {
                dl.get(f, false).await?;
            }
            if dl.get(MODEL_INDEX, false).await?.is_some() {
                let index = std::fs::read(partial.path().join(MODEL_INDEX))
                    .map_err(|e| ctx.io("reading the index", e))?;
                for shard in super::index_shards(ctx, &index)? {
                    dl.get(&shard, true).await?;
                }
            } else {
                dl.get(MODEL_WEIGHTS, true).await?;
            }
        }
    }
    let key = cache_key(&dl.files);
    commit(ctx, partial, &root.join(key))
}

/// The cache directory name for a set of files: `sha256-<hex>` over sorted `name\0sha256\n`.
fn cache_key(files: &[(String, Digest)]) -> String {
    let mut sorted: Vec<&(String, Digest)> = files.iter().collect();
    sorted.sort();
    let mut h = sha2::Sha256::new();
    for (name, digest) in sorted {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(digest.hex().as_bytes());
        h.update(b"\n");
    }
    format!("sha256-{}", hex::encode(h.finalize()))
}

/// Removes `.partial-*` directories a crashed process left behind. Only ones much older than
/// any live download can be (twice the fetch timeout, at least an hour) are touched.
fn sweep_stale_partials(root: &Path, timeout: Duration) {
    let max_age = (timeout * 2).max(Duration::from_secs(3600));
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(".partial-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
        if stale && std::fs::remove_dir_all(entry.path()).is_ok() {
            tracing::info!(dir = %entry.path().display(), "removed an abandoned partial download");
        }
    }
}

/// Moves a finished download into place; a concurrent identical download may win the race.
fn commit(ctx: &Ctx, partial: tempfile::TempDir, dest: &Path) -> Result<PathBuf, SourceError> {
    if dest.is_dir() {
        return Ok(dest.to_owned());
    }
    let path = partial.keep();
    match std::fs::rename(&path, dest) {
        Ok(()) => Ok(dest.to_owned()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&path);
            if dest.is_dir() {
                Ok(dest.to_owned())
            } else {
                Err(ctx.io("moving the download into the cache", e))
            }
        }
    }
}

fn client(opts: &SourceOptions, policy: net::AddressPolicy) -> reqwest::Result<reqwest::Client> {
    let allow_http = opts.allow_http;
    let redirect_policy = policy.clone();
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver {
            inner: opts.resolver.clone(),
            policy,
        }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Blocked::TooManyRedirects(MAX_REDIRECTS));
            }
            match redirect_policy.check_url(attempt.url(), allow_http) {
                Ok(()) => attempt.follow(),
                Err(blocked) => attempt.error(blocked),
            }
        }))
        .connect_timeout(opts.timeout.min(Duration::from_secs(30)))
        .user_agent(concat!("loraplane-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

struct Downloader<'a> {
    ctx: &'a Ctx,
    client: &'a reqwest::Client,
    base: &'a reqwest::Url,
    dir: &'a Path,
    budget: &'a mut Budget,
    /// Files fetched so far, with their sha256.
    files: Vec<(String, Digest)>,
}

impl Downloader<'_> {
    /// Fetches `name` into the partial directory. `Ok(None)`: an optional file the server does
    /// not have (404 / 410).
    async fn get(&mut self, name: &str, required: bool) -> Result<Option<Digest>, SourceError> {
        let ctx = self.ctx;
        let url = self
            .base
            .join(name)
            .map_err(|e| ctx.unsupported(format!("cannot form the URL of {name}: {e}")))?;
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| classify(ctx, name, e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return if required {
                Err(ctx.not_found(format!("{name}: HTTP {status}")))
            } else {
                Ok(None)
            };
        }
        if !status.is_success() {
            return Err(ctx.fetch(format!("{name}: HTTP {status}")));
        }
        let total = response.content_length();
        if total.is_some_and(|n| n > self.budget.left) {
            return Err(ctx.too_large(self.budget.limit));
        }
        let path = self.dir.join(name);
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| ctx.io("creating a download file", e))?;
        let mut hasher = sha2::Sha256::new();
        let mut log = ProgressLog::start(&ctx.uri, name, total);
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(ctx, name, e))? {
            let n = chunk.len() as u64;
            if n > self.budget.left {
                return Err(ctx.too_large(self.budget.limit));
            }
            self.budget.left -= n;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ctx.io("writing a download file", e))?;
            log.advance(n);
        }
        file.sync_all()
            .await
            .map_err(|e| ctx.io("writing a download file", e))?;
        log.finish();
        let digest = Digest(hasher.finalize().into());
        self.files.push((name.to_owned(), digest));
        Ok(Some(digest))
    }
}

/// Maps a client error: a policy refusal anywhere in its chain is [`SourceError::Forbidden`];
/// everything else is a fetch failure, described without the URL (it may carry credentials).
fn classify(ctx: &Ctx, file: &str, e: reqwest::Error) -> SourceError {
    if let Some(blocked) = net::find_blocked(&e) {
        return ctx.forbidden(blocked.to_string());
    }
    let e = e.without_url();
    let mut reason = format!("{file}: {e}");
    let mut cur = std::error::Error::source(&e);
    while let Some(inner) = cur {
        reason.push_str(&format!(": {inner}"));
        cur = inner.source();
    }
    ctx.fetch(reason)
}
