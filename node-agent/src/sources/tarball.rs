//! Archive sources (`….tar`, `….tar.gz`, `….tgz` at any remote scheme): unpacked with the
//! `tar` crate (and `flate2` for gzip) into the download's partial directory, refusing anything
//! that could write outside it or exhaust the disk or memory.
//!
//! Two passes over the archive. The first reads raw headers only: it counts entries, sums the
//! sizes of regular files, refuses every entry type but regular files, directories and the
//! extension records that carry long names and PAX attributes (so symlinks, hard links,
//! devices, FIFOs and sparse files never reach the second pass), and caps those extension
//! records at [`MAX_EXTENSION_BYTES`], because the `tar` crate reads them into memory whole.
//! The second pass extracts: each path must be relative, made of plain components (no `..`, no
//! root, no drive prefix, no control characters) and at most [`MAX_DEPTH`] deep; files are
//! created fresh (a duplicate or a file over a directory is refused), never with the archive's
//! permission bits, and directories are only ever created by us, so no symlink can sit in a
//! path being written. Both passes read the decompressed stream through a counting reader, so a
//! gzip bomb stops at the size cap rather than at the end of the disk.
//!
//! The unpacked artifact is the archive's root, or its single top-level directory when that is
//! all the root holds (`tar czf a.tgz adapter/` is the common way to pack one).

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use super::{Ctx, SourceError};

/// Most entries (files and directories) one archive may hold.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest path inside an archive, in components.
pub const MAX_DEPTH: usize = 16;
/// Largest long-name or PAX extension record.
pub const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

/// Bounds for one archive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of file contents, over all entries.
    pub max_bytes: u64,
    pub max_entries: usize,
}

/// Whether a file name is an archive this module unpacks.
pub fn is_tarball(name: &str) -> bool {
    name.ends_with(".tar") || is_gzip(name)
}

/// Whether an archive name says gzip.
pub fn is_gzip(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Unpacks `archive` into `dest` (which must not exist) and returns the artifact's directory.
/// `label` names the source in errors (a URI, redacted here).
///
/// Errors: [`SourceError::Forbidden`] for an entry that escapes, links, or is of another type;
/// [`SourceError::TooLarge`] past `limits.max_bytes`; [`SourceError::Unsupported`] for a
/// malformed archive or too many entries.
pub fn unpack(
    label: &str,
    archive: &Path,
    gzip: bool,
    dest: &Path,
    limits: Limits,
) -> Result<PathBuf, SourceError> {
    let ctx = &Ctx::new(label);
    // Headers, padding and extension records ride on top of the contents; with the entry cap,
    // this bounds what the decompressor may produce.
    let stream_limit = limits
        .max_bytes
        .saturating_add((limits.max_entries as u64 + 2) * (2 * 512 + MAX_EXTENSION_BYTES));
    scan(ctx, open(ctx, archive, gzip, stream_limit)?, limits)?;
    std::fs::create_dir(dest).map_err(|e| ctx.io("creating the unpack directory", e))?;
    extract(ctx, open(ctx, archive, gzip, stream_limit)?, dest, limits)?;
    Ok(artifact_root(dest))
}

fn open(
    ctx: &Ctx,
    archive: &Path,
    gzip: bool,
    limit: u64,
) -> Result<tar::Archive<Box<dyn Read>>, SourceError> {
    let file = std::fs::File::open(archive).map_err(|e| ctx.io("opening the archive", e))?;
    let file = io::BufReader::new(file);
    let inner: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(tar::Archive::new(Box::new(Bounded { inner, left: limit })))
}

/// Fails the read once more than `left` bytes came through.
struct Bounded<R> {
    inner: R,
    left: u64,
}

/// The marker error of [`Bounded`], recognised in the error chain.
#[derive(Debug, thiserror::Error)]
#[error("the archive unpacks to more than the size limit")]
struct OverLimit;

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(OverLimit));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Maps an I/O error of the archive reader: the stream bound is [`SourceError::TooLarge`],
/// anything else is a malformed archive.
fn read_error(ctx: &Ctx, limits: Limits, e: &io::Error) -> SourceError {
    let over = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<OverLimit>().is_some())
        || e.to_string().contains("the archive unpacks to more than");
    if over {
        ctx.too_large(limits.max_bytes)
    } else {
        ctx.unsupported(format!("not a valid tar archive: {e}"))
    }
}

/// The first pass: entry types, counts and sizes from raw headers, nothing written.
fn scan(
    ctx: &Ctx,
    mut archive: tar::Archive<Box<dyn Read>>,
    limits: Limits,
) -> Result<(), SourceError> {
    let entries = archive
        .entries()
        .map_err(|e| read_error(ctx, limits, &e))?
        .raw(true);
    let mut count = 0usize;
    let mut total = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| read_error(ctx, limits, &e))?;
        let header = entry.header();
        let kind = header.entry_type();
        let size = header
            .entry_size()
            .map_err(|e| read_error(ctx, limits, &e))?;
        let name = shown_name(&header.path_bytes());
        if kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
        {
            if size > MAX_EXTENSION_BYTES {
                return Err(ctx.forbidden(format!(
                    "the archive has an extension record of {size} bytes (at most {MAX_EXTENSION_BYTES})"
                )));
            }
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous() || kind.is_dir()) {
            return Err(special_entry(ctx, &name, kind));
        }
        count += 1;
        if count > limits.max_entries {
            return Err(ctx.unsupported(format!(
                "the archive has more than {} entries",
                limits.max_entries
            )));
        }
        total = total.saturating_add(size);
        if total > limits.max_bytes {
            return Err(ctx.too_large(limits.max_bytes));
        }
    }
    Ok(())
}

/// An entry's raw path as shown in messages: lossy UTF-8, control characters dropped, at most
/// 200 characters.
fn shown_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

/// The refusal of an entry that is neither a regular file nor a directory.
fn special_entry(ctx: &Ctx, name: &str, kind: tar::EntryType) -> SourceError {
    ctx.forbidden(format!(
        "the archive entry {name:?} is a {}; only regular files and directories are unpacked",
        kind_name(kind)
    ))
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

/// The second pass: every entry checked again (the scan saw raw headers; paths here include
/// long names) and written under `dest`.
fn extract(
    ctx: &Ctx,
    mut archive: tar::Archive<Box<dyn Read>>,
    dest: &Path,
    limits: Limits,
) -> Result<(), SourceError> {
    let entries = archive.entries().map_err(|e| read_error(ctx, limits, &e))?;
    let mut left = limits.max_bytes;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(ctx, limits, &e))?;
        let raw = entry.path_bytes().into_owned();
        let shown = shown_name(&raw);
        let rel = confined(&raw).ok_or_else(|| {
            ctx.forbidden(format!(
                "the archive entry {shown:?} is not a plain relative path inside the archive"
            ))
        })?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            // `./` itself.
            if kind.is_dir() {
                continue;
            }
            return Err(ctx.forbidden(format!("the archive entry {shown:?} has no name")));
        }
        let path = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&path).map_err(|e| conflict(ctx, &shown, e))?;
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            // The scan refuses these; a second look costs nothing.
            return Err(special_entry(ctx, &shown, kind));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| conflict(ctx, &shown, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| conflict(ctx, &shown, e))?;
        let mut limited = (&mut entry).take(left.saturating_add(1));
        let n = io::copy(&mut limited, &mut file).map_err(|e| read_error(ctx, limits, &e))?;
        if n > left {
            return Err(ctx.too_large(limits.max_bytes));
        }
        left -= n;
    }
    Ok(())
}

fn conflict(ctx: &Ctx, entry: &str, e: io::Error) -> SourceError {
    if e.kind() == io::ErrorKind::AlreadyExists || e.kind() == io::ErrorKind::NotADirectory {
        ctx.forbidden(format!(
            "the archive entry {entry:?} collides with an earlier entry"
        ))
    } else {
        ctx.io("writing an unpacked file", e)
    }
}

/// `raw` as a relative path of plain components (`.` components dropped), or `None`.
fn confined(raw: &[u8]) -> Option<PathBuf> {
    let text = std::str::from_utf8(raw).ok()?;
    if text.chars().any(char::is_control) || text.contains('\\') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in Path::new(text).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (out.components().count() <= MAX_DEPTH).then_some(out)
}

/// `dest`, or its single top-level directory when that is all it holds.
fn artifact_root(dest: &Path) -> PathBuf {
    let entries: Vec<_> = match std::fs::read_dir(dest) {
        Ok(rd) => rd.flatten().collect(),
        Err(_) => return dest.to_owned(),
    };
    match entries.as_slice() {
        [only] if only.file_type().is_ok_and(|t| t.is_dir()) => only.path(),
        _ => dest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_plain_and_relative() {
        assert_eq!(confined(b"a/b.json"), Some(PathBuf::from("a/b.json")));
        assert_eq!(confined(b"./a"), Some(PathBuf::from("a")));
        assert_eq!(confined(b"./"), Some(PathBuf::new()));
        for bad in [
            &b"../x"[..],
            b"a/../../x",
            b"/etc/passwd",
            b"a\\..\\x",
            b"a\nb",
            b"\xff",
        ] {
            assert_eq!(confined(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert_eq!(confined(deep.as_bytes()), None);
    }

    #[test]
    fn names() {
        assert!(is_tarball("a.tar") && is_tarball("a.tar.gz") && is_tarball("a.tgz"));
        assert!(!is_tarball("a.tar.bz2") && !is_tarball("adapter"));
        assert!(is_gzip("x.tgz") && !is_gzip("x.tar"));
    }
}
