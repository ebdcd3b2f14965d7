//! `pvc://claim/path` sources: a path on a claim mounted at `<--pvc-mount-dir>/<claim>` (as the
//! operator mounts them), confined to that claim's mount. `..`, symlinks leading out of the
//! claim (to another claim, or anywhere else) and malformed claims are refused; an unmounted
//! claim is "not found"; without `--pvc-mount-dir` the scheme is refused. `--adapters
//! pvc://claim/dir` lists the adapters in a directory of the claim.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use loraplane_agent::sources::{self, SourceError, SourceOptions};

fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), b"weights").unwrap();
}

struct World {
    _dir: tempfile::TempDir,
    mounts: PathBuf,
    opts: SourceOptions,
}

/// Two mounted claims (`adapters`, `other-team`) and a directory outside both.
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let mounts = dir.path().join("models");
    write_adapter(&mounts.join("adapters/team/sql"));
    write_adapter(&mounts.join("adapters/team/tone"));
    std::fs::create_dir_all(mounts.join("adapters/team/not-an-adapter")).unwrap();
    write_adapter(&mounts.join("other-team/secret"));
    write_adapter(&dir.path().join("outside/secret"));
    // Links inside the `adapters` claim: to another claim, out of the mounts, to a file out.
    symlink(
        mounts.join("other-team/secret"),
        mounts.join("adapters/to-other-claim"),
    )
    .unwrap();
    symlink(
        dir.path().join("outside"),
        mounts.join("adapters/to-outside"),
    )
    .unwrap();
    write_adapter(&mounts.join("adapters/leaky"));
    std::fs::remove_file(mounts.join("adapters/leaky/adapter_model.safetensors")).unwrap();
    symlink(
        dir.path().join("outside/secret/adapter_model.safetensors"),
        mounts.join("adapters/leaky/adapter_model.safetensors"),
    )
    .unwrap();
    let mut opts = SourceOptions::new(dir.path().join("cache"));
    opts.pvc_mount_dir = Some(mounts.clone());
    World {
        _dir: dir,
        mounts,
        opts,
    }
}

fn expect_forbidden(r: Result<PathBuf, SourceError>, what: &str) {
    match r {
        Err(SourceError::Forbidden { .. }) => {}
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn a_path_on_a_mounted_claim_resolves_inside_it() {
    let w = world();
    let got = sources::resolve("pvc://adapters/team/sql", &w.opts)
        .await
        .unwrap();
    assert_eq!(
        got,
        std::fs::canonicalize(w.mounts.join("adapters/team/sql")).unwrap()
    );
    // A trailing slash and repeated slashes at the ends are the same directory.
    assert_eq!(
        sources::resolve("pvc://adapters/team/sql/", &w.opts)
            .await
            .unwrap(),
        got
    );
}

#[tokio::test]
async fn escapes_from_the_claim_are_refused() {
    let w = world();
    for uri in [
        "pvc://adapters/team/../../other-team/secret",
        "pvc://adapters/../other-team/secret",
        "pvc://adapters/to-other-claim",
        "pvc://adapters/to-outside/secret",
        "pvc://adapters/leaky",
    ] {
        expect_forbidden(sources::resolve(uri, &w.opts).await, uri);
    }
    // The same directory through its own claim is fine: confinement is per claim.
    assert!(
        sources::resolve("pvc://other-team/secret", &w.opts)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn malformed_unmounted_and_disabled() {
    let w = world();
    for uri in [
        "pvc://",
        "pvc://adapters",
        "pvc://adapters/",
        "pvc://Adapters/team/sql",
        "pvc://../x",
        "pvc://adapters/team/sql?x=1",
    ] {
        let r = sources::resolve(uri, &w.opts).await;
        assert!(
            matches!(r, Err(SourceError::Unsupported { .. })),
            "{uri}: {r:?}"
        );
    }
    let r = sources::resolve("pvc://not-mounted/team/sql", &w.opts).await;
    assert!(matches!(r, Err(SourceError::NotFound { .. })), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("not mounted"));
    let r = sources::resolve("pvc://adapters/team/missing", &w.opts).await;
    assert!(matches!(r, Err(SourceError::NotFound { .. })), "{r:?}");

    let mut disabled = w.opts.clone();
    disabled.pvc_mount_dir = None;
    let r = sources::resolve("pvc://adapters/team/sql", &disabled).await;
    let err = r.unwrap_err();
    assert!(matches!(err, SourceError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("--pvc-mount-dir"), "{err}");
}

#[tokio::test]
async fn adapters_of_a_claim_directory_are_listed() {
    let w = world();
    let listed = sources::list_adapters("pvc://adapters/team", &w.opts)
        .await
        .unwrap();
    assert_eq!(
        listed,
        [
            ("sql".to_owned(), "pvc://adapters/team/sql".to_owned()),
            ("tone".to_owned(), "pvc://adapters/team/tone".to_owned()),
        ]
    );
    expect_forbidden(
        sources::list_adapters("pvc://adapters/to-outside", &w.opts)
            .await
            .map(|_| PathBuf::new()),
        "listing through a link out of the claim",
    );
    let r = sources::list_adapters("https://example.com/adapters", &w.opts).await;
    assert!(matches!(r, Err(SourceError::Unsupported { .. })), "{r:?}");
}
