//! `hf://org/repo[@revision]` through the `hf-hub` crate's tokio API, into the Hub cache layout
//! under `cache_dir/hf` (`models--org--repo/{blobs,refs,snapshots}`).
//!
//! The endpoint ([`SourceOptions::hf_endpoint`], the `HF_ENDPOINT` convention) and token
//! ([`SourceOptions::hf_token`], `HF_TOKEN`) are trusted configuration: requests to the endpoint
//! are not subject to the private-address rule of `https://` (an in-cluster mirror is a normal
//! deployment). The repository id and revision are user input and are validated strictly,
//! because `hf-hub` builds both URLs and cache paths from them.
//!
//! The first file fetched pins the revision to a commit (its snapshot directory is named after
//! the commit the Hub reported); every other file is fetched at that commit, so all files of
//! one resolve come from one commit and already-cached files are not fetched again. The size
//! cap is enforced on the size the Hub announces before each file's body is fetched (the
//! download is abandoned before it starts), and on the size received.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use tokio::sync::Notify;

use super::progress::ProgressLog;
use super::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, Ctx, MODEL_INDEX, MODEL_WEIGHTS, SourceError,
    SourceOptions,
};
use crate::lora::ids::Digest;

/// `org/repo` and the revision of an `hf://` URI (after the scheme).
pub(crate) fn parse(ctx: &Ctx, rest: &str) -> Result<(String, String), SourceError> {
    let (repo, revision) = match rest.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (rest, "main"),
    };
    let segments: Vec<&str> = repo.split('/').collect();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if segments.is_empty() || segments.len() > 2 || !segments.iter().all(|s| name_ok(s)) {
        return Err(ctx.unsupported("expected hf://org/repo[@revision]"));
    }
    let rev_ok = !revision.is_empty()
        && revision.len() <= 128
        && !revision.starts_with('/')
        && !revision.ends_with('/')
        && revision.split('/').all(name_ok);
    if !rev_ok {
        return Err(ctx.unsupported(format!(
            "invalid revision {revision:?}: a branch, tag or commit"
        )));
    }
    Ok((repo.to_owned(), revision.to_owned()))
}

pub(crate) async fn fetch(
    ctx: &Ctx,
    rest: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let (repo_id, revision) = parse(ctx, rest)?;
    let endpoint = opts.hf_endpoint.trim_end_matches('/').to_owned();
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.join("hf")))
        .with_endpoint(endpoint)
        .with_token(opts.hf_token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| ctx.io("building the Hub client", e))?;
    let mut budget = opts.max_bytes;
    let mut hub = Hub {
        ctx,
        api,
        repo_id,
        repo: None,
        revision,
        snapshot: None,
        budget: &mut budget,
        limit: opts.max_bytes,
    };
    match artifact {
        Artifact::Adapter => {
            hub.get(ADAPTER_CONFIG, true).await?;
            let weights = hub.get(ADAPTER_WEIGHTS, true).await?;
            if let (Some(expected), Some(path)) = (expected, weights) {
                let actual = sha256_file(ctx, &path).await?;
                if *expected != actual {
                    return Err(ctx.mismatch(expected, &actual));
                }
            }
        }
        Artifact::Model => {
            let (required, optional) = artifact.files();
            for f in required {
                hub.get(f, true).await?;
            }
            for f in optional {
                hub.get(f, false).await?;
            }
            match hub.get(MODEL_INDEX, false).await? {
                Some(index) => {
                    let bytes =
                        std::fs::read(&index).map_err(|e| ctx.io("reading the index", e))?;
                    for shard in super::index_shards(ctx, &bytes)? {
                        hub.get(&shard, true).await?;
                    }
                }
                None => {
                    hub.get(MODEL_WEIGHTS, true).await?;
                }
            }
        }
    }
    hub.snapshot
        .ok_or_else(|| ctx.not_found("the repository returned no files"))
}

struct Hub<'a> {
    ctx: &'a Ctx,
    api: hf_hub::api::tokio::Api,
    repo_id: String,
    /// The repository at its pinned commit, once the first file told us the commit.
    repo: Option<ApiRepo>,
    revision: String,
    snapshot: Option<PathBuf>,
    budget: &'a mut u64,
    limit: u64,
}

impl Hub<'_> {
    /// Fetches `file` (or finds it in the pinned snapshot). `Ok(None)`: an optional file the
    /// repository does not have.
    async fn get(&mut self, file: &str, required: bool) -> Result<Option<PathBuf>, SourceError> {
        let ctx = self.ctx;
        if let Some(snapshot) = &self.snapshot {
            let cached = snapshot.join(file);
            if cached.is_file() {
                self.charge(&cached)?;
                return Ok(Some(cached));
            }
        }
        let repo = match &self.repo {
            Some(r) => r,
            None => &self.api.repo(Repo::with_revision(
                self.repo_id.clone(),
                RepoType::Model,
                self.revision.clone(),
            )),
        };
        let progress = HubProgress {
            state: Arc::new(Mutex::new(None)),
            uri: ctx.uri.clone(),
            limit: *self.budget,
            over: Arc::new(Notify::new()),
        };
        let over = progress.over.clone();
        let result = tokio::select! {
            r = repo.download_with_progress(file, progress) => r,
            () = over.notified() => return Err(ctx.too_large(self.limit)),
        };
        let path = match result {
            Ok(p) => p,
            Err(e) => {
                return match status_of(&e) {
                    Some(404) if !required => Ok(None),
                    Some(404) => Err(ctx.not_found(format!("{file}: not in the repository"))),
                    Some(401 | 403) => {
                        Err(ctx
                            .forbidden(format!("{file}: the Hub refused access (check the token)")))
                    }
                    _ => Err(ctx.fetch(format!("{file}: {}", describe(&e)))),
                };
            }
        };
        self.charge(&path)?;
        if self.snapshot.is_none() {
            let snapshot = path
                .parent()
                .ok_or_else(|| ctx.io("locating the snapshot", "no parent directory"))?
                .to_owned();
            // hf-hub names the snapshot directory after the commit the Hub reported.
            if let Some(commit) = snapshot.file_name().and_then(|c| c.to_str()) {
                self.repo = Some(self.api.repo(Repo::with_revision(
                    self.repo_id.clone(),
                    RepoType::Model,
                    commit.to_owned(),
                )));
            }
            self.snapshot = Some(snapshot);
        }
        Ok(Some(path))
    }

    /// Counts a fetched file against the budget.
    fn charge(&mut self, path: &Path) -> Result<(), SourceError> {
        let size = std::fs::metadata(path)
            .map_err(|e| self.ctx.io("reading a downloaded file", e))?
            .len();
        if size > *self.budget {
            return Err(self.ctx.too_large(self.limit));
        }
        *self.budget -= size;
        Ok(())
    }
}

fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(r) => r.status().map(|s| s.as_u16()),
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

/// An `hf-hub` error without URLs (they are not secret here, but may be long) or tokens.
fn describe(e: &ApiError) -> String {
    match e {
        ApiError::RequestError(r) => {
            let mut s = r.to_string();
            if let Some(url) = r.url() {
                s = s.replace(url.as_str(), "…");
            }
            s
        }
        other => other.to_string(),
    }
}

async fn sha256_file(ctx: &Ctx, path: &Path) -> Result<Digest, SourceError> {
    let path = path.to_owned();
    let hashed = tokio::task::spawn_blocking(move || super::download::sha256_path(&path))
        .await
        .map_err(|e| ctx.io("hashing the weights", e))?;
    hashed.map_err(|e| ctx.io("hashing the weights", e))
}

/// Logs progress, and stops a download whose announced size exceeds the budget before its
/// body is requested: `init` signals `over` and never returns, and the caller drops the
/// download future.
#[derive(Clone)]
struct HubProgress {
    state: Arc<Mutex<Option<ProgressLog>>>,
    uri: String,
    limit: u64,
    over: Arc<Notify>,
}

impl hf_hub::api::tokio::Progress for HubProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        if size as u64 > self.limit {
            self.over.notify_one();
            std::future::pending::<()>().await;
        }
        if let Ok(mut s) = self.state.lock() {
            *s = Some(ProgressLog::start(&self.uri, filename, Some(size as u64)));
        }
    }

    async fn update(&mut self, size: usize) {
        if let Ok(mut s) = self.state.lock()
            && let Some(log) = s.as_mut()
        {
            log.advance(size as u64);
        }
    }

    async fn finish(&mut self) {
        if let Ok(s) = self.state.lock()
            && let Some(log) = s.as_ref()
        {
            log.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_and_revision() {
        let ctx = Ctx::new("hf://x");
        assert_eq!(
            parse(&ctx, "org/repo").ok(),
            Some(("org/repo".into(), "main".into()))
        );
        assert_eq!(
            parse(&ctx, "org/repo@v1.0").ok(),
            Some(("org/repo".into(), "v1.0".into()))
        );
        assert_eq!(
            parse(&ctx, "gpt2@refs/pr/1").ok(),
            Some(("gpt2".into(), "refs/pr/1".into()))
        );
        for bad in [
            "",
            "a/b/c",
            "../x",
            "org/..",
            "org/repo@",
            "org/repo@../../etc",
            "org/repo@/abs",
            "org/re po",
        ] {
            assert!(parse(&ctx, bad).is_err(), "{bad:?}");
        }
    }
}
