//! The download cache shared by the remote sources (`https://` and the object stores): what an
//! artifact's files are, how they stream to disk under a size budget, and how a finished
//! download lands in a digest-keyed directory.
//!
//! A source implements [`Remote`] (open one file by name); [`download`] walks the artifact's
//! files through it and [`download_tarball`] fetches one archive and unpacks it
//! ([`super::tarball`]). Either way, files stream into a fresh `.partial-*` directory under
//! `cache_dir/<scheme>`, hashed on the way; the size cap is checked against the announced size
//! before reading and against the bytes received while streaming. When everything is in and
//! verified, the directory is renamed to `sha256-<key>`, where the key digests every file's
//! name and sha256; a failure or cancellation at any point removes the partial directory (and
//! partial directories a crashed process left are swept once older than any live download
//! could be). With an expected digest, an adapter already cached under the same config and
//! weights is reused without fetching its weights.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use super::progress::ProgressLog;
use super::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Artifact, Ctx, MODEL_INDEX, MODEL_WEIGHTS, SourceError,
    SourceOptions, tarball,
};
use crate::lora::ids::Digest;

/// One file being read from a remote: its announced size, if any, and its bytes.
pub(crate) struct Body {
    pub size: Option<u64>,
    pub chunks: BoxStream<'static, Result<Bytes, SourceError>>,
}

/// A remote directory of files.
pub(crate) trait Remote: Sync {
    /// Opens `name`, a plain file name inside the source. `Ok(None)`: the remote has no such
    /// file (a missing optional file is not an error; the caller decides).
    fn open(&self, name: &str) -> impl Future<Output = Result<Option<Body>, SourceError>> + Send;
}

/// What may still be downloaded for one source.
struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    fn charge(&mut self, ctx: &Ctx, n: u64) -> Result<(), SourceError> {
        if n > self.left {
            return Err(ctx.too_large(self.limit));
        }
        self.left -= n;
        Ok(())
    }
}

/// A download in progress: its partial directory and budget.
struct Staging<'a, R> {
    ctx: &'a Ctx,
    remote: &'a R,
    partial: tempfile::TempDir,
    budget: Budget,
    /// Files fetched so far, with their sha256.
    files: Vec<(String, Digest)>,
}

impl<'a, R: Remote> Staging<'a, R> {
    fn new(
        ctx: &'a Ctx,
        remote: &'a R,
        root: &Path,
        opts: &SourceOptions,
    ) -> Result<Self, SourceError> {
        std::fs::create_dir_all(root).map_err(|e| ctx.io("creating the cache directory", e))?;
        sweep_stale_partials(root, opts.timeout);
        let partial = tempfile::Builder::new()
            .prefix(".partial-")
            .tempdir_in(root)
            .map_err(|e| ctx.io("creating a download directory", e))?;
        Ok(Staging {
            ctx,
            remote,
            partial,
            budget: Budget {
                left: opts.max_bytes,
                limit: opts.max_bytes,
            },
            files: Vec::new(),
        })
    }

    /// Fetches `name` into the partial directory. `Ok(None)`: an optional file the remote does
    /// not have.
    async fn get(&mut self, name: &str, required: bool) -> Result<Option<Digest>, SourceError> {
        let ctx = self.ctx;
        let Some(mut body) = self.remote.open(name).await? else {
            return if required {
                Err(ctx.not_found(format!("{name}: no such file in the source")))
            } else {
                Ok(None)
            };
        };
        if body.size.is_some_and(|n| n > self.budget.left) {
            return Err(ctx.too_large(self.budget.limit));
        }
        let path = self.partial.path().join(name);
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| ctx.io("creating a download file", e))?;
        let mut hasher = sha2::Sha256::new();
        let mut log = ProgressLog::start(&ctx.uri, name, body.size);
        while let Some(chunk) = body.chunks.next().await {
            let chunk = chunk?;
            let n = chunk.len() as u64;
            self.budget.charge(ctx, n)?;
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

/// Fetches an artifact from `remote` into the cache's `scheme` directory: the archive
/// `archive` when the source names one ([`download_tarball`]), else the artifact's files
/// ([`download`]).
pub(crate) async fn fetch<R: Remote>(
    ctx: &Ctx,
    remote: &R,
    archive: Option<&str>,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
    scheme: &str,
) -> Result<PathBuf, SourceError> {
    let root = opts.cache_dir.join(scheme);
    match archive {
        Some(name) => download_tarball(ctx, remote, name, artifact, expected, opts, &root).await,
        None => download(ctx, remote, artifact, expected, opts, &root).await,
    }
}

/// Fetches an artifact's files one by one from `remote` into the cache under `root`.
pub(crate) async fn download<R: Remote>(
    ctx: &Ctx,
    remote: &R,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
    root: &Path,
) -> Result<PathBuf, SourceError> {
    let mut dl = Staging::new(ctx, remote, root, opts)?;
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
                let index = std::fs::read(dl.partial.path().join(MODEL_INDEX))
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
    commit(ctx, dl.partial.keep(), &root.join(key))
}

/// Fetches the archive `name` from `remote` and unpacks it ([`tarball::unpack`]) into the cache
/// under `root`. The archive's bytes count against the size cap, and so do the bytes it
/// unpacks to; the artifact is the archive's root directory or its single top-level directory.
pub(crate) async fn download_tarball<R: Remote>(
    ctx: &Ctx,
    remote: &R,
    name: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
    root: &Path,
) -> Result<PathBuf, SourceError> {
    let mut dl = Staging::new(ctx, remote, root, opts)?;
    dl.get(name, true).await?;
    let archive = dl.partial.path().join(name);
    let tree = dl.partial.path().join("tree");
    let limits = tarball::Limits {
        max_bytes: opts.max_bytes,
        max_entries: tarball::MAX_ENTRIES,
    };
    let gzip = tarball::is_gzip(name);
    let task_ctx = ctx.clone();
    let unpack_tree = tree.clone();
    let files = tokio::task::spawn_blocking(move || -> Result<_, SourceError> {
        let dir = tarball::unpack(&task_ctx.uri, &archive, gzip, &unpack_tree, limits)?;
        // The archive is not part of the artifact; remove it before the tree is kept.
        let _ = std::fs::remove_file(&archive);
        let files = hash_tree(&task_ctx, &dir)?;
        Ok((dir, files))
    })
    .await
    .map_err(|e| ctx.io("unpacking the archive", e))?;
    let (dir, files) = files?;
    let (required, _) = artifact.files();
    if let Some(missing) = required.iter().find(|f| !dir.join(f).is_file()) {
        return Err(ctx.not_found(format!("the archive has no {missing}")));
    }
    if artifact == Artifact::Model {
        if dir.join(MODEL_INDEX).is_file() {
            let index =
                std::fs::read(dir.join(MODEL_INDEX)).map_err(|e| ctx.io("reading the index", e))?;
            for shard in super::index_shards(ctx, &index)? {
                if !dir.join(&shard).is_file() {
                    return Err(ctx.not_found(format!("the archive has no {shard}")));
                }
            }
        } else if !dir.join(MODEL_WEIGHTS).is_file() {
            return Err(ctx.not_found(format!("the archive has no {MODEL_WEIGHTS}")));
        }
    }
    if artifact == Artifact::Adapter
        && let Some(expected) = expected
    {
        let actual = files
            .iter()
            .find(|(n, _)| n == ADAPTER_WEIGHTS)
            .map(|(_, d)| *d);
        if let Some(actual) = actual
            && actual != *expected
        {
            return Err(ctx.mismatch(expected, &actual));
        }
    }
    // `dir` lies inside the partial directory: moving it into place leaves the rest (the
    // tree's wrapper directory, if any) to be removed with the partial directory, when `dl`
    // drops after the move.
    commit(ctx, dir, &root.join(cache_key(&files)))
}

/// `(relative path, sha256)` of every regular file under `dir`, for the cache key.
fn hash_tree(ctx: &Ctx, dir: &Path) -> Result<Vec<(String, Digest)>, SourceError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| ctx.io("listing the unpacked files", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ctx.io("listing the unpacked files", e))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| ctx.io("listing the unpacked files", e))?;
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            let digest = sha256_path(&path).map_err(|e| ctx.io("hashing the unpacked files", e))?;
            let rel = path
                .strip_prefix(dir)
                .map_err(|e| ctx.io("hashing the unpacked files", e))?
                .to_string_lossy()
                .into_owned();
            out.push((rel, digest));
        }
    }
    Ok(out)
}

/// The sha256 of the file at `path`, read to its end.
pub(crate) fn sha256_path(path: &Path) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut file, &mut h)?;
    Ok(Digest(h.finalize().into()))
}

/// The cache directory name for a set of files: `sha256-<hex>` over sorted `name\0sha256\n`.
pub(crate) fn cache_key(files: &[(String, Digest)]) -> String {
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

/// Moves a finished download (`path`, which this call now owns) into place; a concurrent
/// identical download may win the race.
fn commit(ctx: &Ctx, path: PathBuf, dest: &Path) -> Result<PathBuf, SourceError> {
    if dest.is_dir() {
        let _ = std::fs::remove_dir_all(&path);
        return Ok(dest.to_owned());
    }
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
