//! Local sources: a bare absolute path or a `file://` URI, confined to the configured roots.
//!
//! The path must first lie lexically under a root; only then is the file system consulted, so
//! nothing outside the roots can be probed (existence, file type, permissions all answer the
//! same "outside the allowed roots"). Then the check is repeated on the canonical path (every
//! symlink resolved), so neither `..` nor a symlink — the directory itself, a parent, or an
//! entry inside it — can lead outside a root. Paths with
//! a `..` component are refused before any resolution, even when they would land back inside
//! a root: an admin request has no reason to contain one. Relative paths are refused (there is
//! no meaningful working directory for an API call).
//!
//! What this cannot prevent: a writer inside a root swapping files between this check and the
//! engine's read. Roots are directories the platform team controls.

use std::path::{Component, Path, PathBuf};

use super::{Artifact, Ctx, SourceError, SourceOptions};
use crate::lora::peft;

/// The local path of a `file://` URI (the part after `file://`): `/abs/path` or
/// `localhost/abs/path`, percent-decoded.
pub(crate) fn file_uri_path(ctx: &Ctx, rest: &str) -> Result<PathBuf, SourceError> {
    let path = match rest.strip_prefix("localhost") {
        Some(p) if p.starts_with('/') => p,
        _ if rest.starts_with('/') => rest,
        _ => {
            return Err(ctx.unsupported(
                "file:// URIs name a local absolute path (file:///path); remote hosts are not supported",
            ));
        }
    };
    if path.contains(['?', '#']) {
        return Err(ctx.unsupported("file:// URIs take no query or fragment"));
    }
    let decoded = percent_decode(path)
        .ok_or_else(|| ctx.unsupported("invalid percent-encoding in file:// URI"))?;
    Ok(PathBuf::from(decoded))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    // A decoded NUL or control character is never part of a real path.
    (!decoded.chars().any(char::is_control)).then_some(decoded)
}

/// Checks `path` against the roots and returns its canonical form.
///
/// Confinement is checked *before* the path is looked at: a path that does not lexically start
/// with a root is refused without touching the file system, so the answer for anything outside
/// the roots is the same whether it exists, is a file, or is unreadable. Inside a root, every
/// failure to resolve is a plain "not found" with no OS error text; a path that reaches outside
/// through a symlink is refused whether or not its target exists (the longest existing prefix
/// decides).
///
/// Errors: [`SourceError::Forbidden`] for a relative path, a `..`, or anything outside the roots
/// (including through symlinks); [`SourceError::NotFound`] for a missing or unreadable
/// directory or missing required files.
pub(crate) fn resolve(
    ctx: &Ctx,
    path: &Path,
    artifact: Artifact,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    if opts.local_roots.is_empty() {
        return Err(ctx.forbidden("local sources are disabled: no local roots are configured"));
    }
    let canonical = confine(ctx, path, &opts.local_roots)?;
    let roots = canonical_roots(&opts.local_roots);
    let unreadable = || ctx.not_found("the directory cannot be listed");
    let entries = std::fs::read_dir(&canonical).map_err(|_| unreadable())?;
    for entry in entries {
        let entry = entry.map_err(|_| unreadable())?;
        let target = match std::fs::canonicalize(entry.path()) {
            Ok(t) => t,
            // A dangling link points nowhere we would read; the engine reports it if needed.
            Err(_) => continue,
        };
        if !inside(&target, &roots) {
            return Err(ctx.forbidden(format!(
                "{} links outside the allowed roots",
                entry.file_name().to_string_lossy()
            )));
        }
    }
    let (required, _) = artifact.files();
    if artifact == Artifact::Adapter
        && !canonical.join(super::ADAPTER_WEIGHTS).is_file()
        && canonical.join(peft::PICKLE_WEIGHTS_FILE).is_file()
    {
        // The loader behind `--adapters` refuses the same directory with the same words.
        return Err(ctx.unsupported(format!(
            "{}: {}",
            peft::PICKLE_WEIGHTS_FILE,
            peft::PICKLE_REFUSED
        )));
    }
    if let Some(missing) = required.iter().find(|f| !canonical.join(f).is_file()) {
        return Err(ctx.not_found(format!("the directory has no {missing}")));
    }
    Ok(canonical)
}

/// The roots, canonicalised; the roots are trusted configuration, so resolving them reveals
/// nothing to the caller.
fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect()
}

/// The canonical form of the directory `path`, which must lie inside one of `roots` lexically
/// and after every symlink is resolved (see [`resolve`] for the order of the checks).
pub(crate) fn confine(ctx: &Ctx, path: &Path, roots: &[PathBuf]) -> Result<PathBuf, SourceError> {
    const OUTSIDE: &str = "the path is outside the allowed roots";
    if !path.is_absolute() {
        return Err(ctx.forbidden("local sources must be absolute paths"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ctx.forbidden("the path contains a '..' component"));
    }
    let canonical_roots = canonical_roots(roots);
    if !inside(path, roots) && !inside(path, &canonical_roots) {
        return Err(ctx.forbidden(OUTSIDE));
    }
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => {
            // Through a symlink out of the roots, the path is outside whether its target exists
            // or not; otherwise it is simply not there (or not a directory, or unreadable).
            return Err(if escapes_through_prefix(path, &canonical_roots) {
                ctx.forbidden(OUTSIDE)
            } else {
                ctx.not_found("no such directory under the allowed roots")
            });
        }
    };
    if !inside(&canonical, &canonical_roots) {
        return Err(ctx.forbidden(OUTSIDE));
    }
    if !canonical.is_dir() {
        return Err(ctx.not_found("not a directory"));
    }
    Ok(canonical)
}

/// Whether the longest prefix of `path` that resolves lies outside the canonical `roots` (a
/// symlink inside a root that leads out).
fn escapes_through_prefix(path: &Path, roots: &[PathBuf]) -> bool {
    path.ancestors()
        .skip(1)
        .find_map(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|c| !inside(&c, roots))
}

fn inside(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_decode_and_refuse_hosts() {
        let ctx = Ctx::new("file://x");
        let p = file_uri_path(&ctx, "/a%20b/c").ok();
        assert_eq!(p, Some(PathBuf::from("/a b/c")));
        assert_eq!(
            file_uri_path(&ctx, "localhost/a").ok(),
            Some(PathBuf::from("/a"))
        );
        assert!(file_uri_path(&ctx, "server/share").is_err());
        assert!(file_uri_path(&ctx, "/a%00b").is_err());
        assert!(file_uri_path(&ctx, "/a%zz").is_err());
        // Encoded dots decode to a `..` that `resolve` then refuses.
        assert_eq!(
            file_uri_path(&ctx, "/r/%2e%2e/x").ok(),
            Some(PathBuf::from("/r/../x"))
        );
    }
}
