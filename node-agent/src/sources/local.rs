//! Local sources: a bare absolute path or a `file://` URI, confined to the configured roots.
//!
//! The check is on canonical paths (every symlink resolved), so neither `..` nor a symlink —
//! the directory itself, a parent, or an entry inside it — can lead outside a root. Paths with
//! a `..` component are refused before any resolution, even when they would land back inside
//! a root: an admin request has no reason to contain one. Relative paths are refused (there is
//! no meaningful working directory for an API call).
//!
//! What this cannot prevent: a writer inside a root swapping files between this check and the
//! engine's read. Roots are directories the platform team controls.

use std::path::{Component, Path, PathBuf};

use super::{Artifact, Ctx, SourceError, SourceOptions};

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
/// Errors: [`SourceError::Forbidden`] for a relative path, a `..`, or anything outside the roots
/// (including through symlinks); [`SourceError::NotFound`] for a missing directory or missing
/// required files.
pub(crate) fn resolve(
    ctx: &Ctx,
    path: &Path,
    artifact: Artifact,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    if opts.local_roots.is_empty() {
        return Err(ctx.forbidden("local sources are disabled: no local roots are configured"));
    }
    if !path.is_absolute() {
        return Err(ctx.forbidden("local sources must be absolute paths"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ctx.forbidden("the path contains a '..' component"));
    }
    let roots: Vec<PathBuf> = opts
        .local_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Say "not found" only inside the roots: outside them, existence is not our business.
            return Err(if inside(path, &opts.local_roots) || inside(path, &roots) {
                ctx.not_found("no such directory")
            } else {
                ctx.forbidden("the path is outside the allowed roots")
            });
        }
        Err(e) => return Err(ctx.io("resolving the path", e)),
    };
    if !inside(&canonical, &roots) {
        return Err(ctx.forbidden("the path is outside the allowed roots"));
    }
    if !canonical.is_dir() {
        return Err(ctx.not_found("not a directory"));
    }
    let entries = std::fs::read_dir(&canonical).map_err(|e| ctx.io("listing the directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ctx.io("listing the directory", e))?;
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
    if let Some(missing) = required.iter().find(|f| !canonical.join(f).is_file()) {
        return Err(ctx.not_found(format!("the directory has no {missing}")));
    }
    Ok(canonical)
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
