//! `pvc://claim/path` sources: a directory on a PersistentVolumeClaim that the operator mounts
//! read-only into the agent pods at `<pvc mount dir>/<claim>` ([`SourceOptions::pvc_mount_dir`],
//! `--pvc-mount-dir`). The path is then a local path confined to that claim's mount, with every
//! rule of [`super::local`]: no `..`, no symlink (the directory, a parent or an entry) leading
//! out of the claim, and nothing outside it probed. A claim the pod does not have mounted is
//! "not found", like a missing directory.

use std::path::PathBuf;

use super::{Artifact, Ctx, SourceError, SourceOptions, local};

/// The claim and the path inside it of a `pvc://` URI (after the scheme).
pub(crate) fn parse(ctx: &Ctx, rest: &str) -> Result<(String, String), SourceError> {
    if rest.contains(['?', '#']) {
        return Err(ctx.unsupported("pvc:// URIs take no query or fragment"));
    }
    let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
    // A Kubernetes object name (DNS-1123 subdomain): it becomes a directory name here.
    let claim_ok = !claim.is_empty()
        && claim.len() <= 253
        && claim
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && claim.as_bytes()[0].is_ascii_alphanumeric()
        && claim.as_bytes()[claim.len() - 1].is_ascii_alphanumeric();
    if !claim_ok {
        return Err(ctx.unsupported(format!(
            "invalid claim name {claim:?}: expected pvc://<claim>/<path> with a Kubernetes object name"
        )));
    }
    let path = path.trim_matches('/');
    if path.is_empty() {
        return Err(ctx.unsupported("expected pvc://<claim>/<path> (a path inside the claim)"));
    }
    Ok((claim.to_owned(), path.to_owned()))
}

pub(crate) fn resolve(
    ctx: &Ctx,
    rest: &str,
    artifact: Artifact,
    opts: &SourceOptions,
) -> Result<PathBuf, SourceError> {
    let (claim, path) = parse(ctx, rest)?;
    let Some(mount_dir) = &opts.pvc_mount_dir else {
        return Err(ctx.unsupported(
            "pvc:// sources are disabled: no --pvc-mount-dir is configured (the operator sets it)",
        ));
    };
    let root = mount_dir.join(&claim);
    if !root.is_dir() {
        return Err(ctx.not_found(format!("the claim {claim:?} is not mounted on this agent")));
    }
    let confined = SourceOptions {
        local_roots: vec![root.clone()],
        ..opts.clone()
    };
    local::resolve(ctx, &root.join(path), artifact, &confined)
}

/// The adapter directories directly under a `pvc://claim/dir` (the `--adapters` of a claim):
/// every subdirectory holding an `adapter_config.json`, as `(name, uri)`. The directory itself
/// is confined like any `pvc://` path; each adapter is confined again when it is resolved.
pub(crate) fn list(
    ctx: &Ctx,
    rest: &str,
    opts: &SourceOptions,
) -> Result<Vec<(String, String)>, SourceError> {
    let (claim, path) = parse(ctx, rest)?;
    let Some(mount_dir) = &opts.pvc_mount_dir else {
        return Err(ctx.unsupported(
            "pvc:// sources are disabled: no --pvc-mount-dir is configured (the operator sets it)",
        ));
    };
    let root = mount_dir.join(&claim);
    let dir = local::confine(ctx, &root.join(&path), std::slice::from_ref(&root))?;
    let entries =
        std::fs::read_dir(&dir).map_err(|_| ctx.not_found("the directory cannot be listed"))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().join(super::ADAPTER_CONFIG).is_file() {
            out.push((name.clone(), format!("pvc://{claim}/{path}/{name}")));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_claim_and_path() {
        let ctx = Ctx::new("pvc://x");
        assert_eq!(
            parse(&ctx, "adapters/acme/sql/").ok(),
            Some(("adapters".into(), "acme/sql".into()))
        );
        for bad in [
            "", "/x", "Claim/x", "claim", "claim/", "-c/x", "c_1/x", "c/x?y",
        ] {
            assert!(parse(&ctx, bad).is_err(), "{bad:?}");
        }
    }
}
