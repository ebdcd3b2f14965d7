//! Local adapter sources stay inside the configured roots: `..`, symlink escapes (of the
//! directory, a parent, or a file inside it), absolute paths elsewhere and relative paths are
//! refused, for bare paths and `file://` alike.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use loraplane_agent::sources::{self, SourceError, SourceOptions};

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    opts: SourceOptions,
}

fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), b"weights").unwrap();
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    write_adapter(&root.join("good"));
    write_adapter(&outside.join("secret"));
    let mut opts = SourceOptions::new(dir.path().join("cache"));
    opts.local_roots = vec![root.clone()];
    World {
        _dir: dir,
        root,
        outside,
        opts,
    }
}

async fn resolve(w: &World, uri: &str) -> Result<PathBuf, SourceError> {
    sources::resolve(uri, &w.opts).await
}

fn assert_forbidden(r: Result<PathBuf, SourceError>, what: &str) {
    match r {
        Err(SourceError::Forbidden { .. }) => {}
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn a_directory_inside_a_root_resolves_to_its_canonical_path() {
    let w = world();
    let good = w.root.join("good");
    let got = resolve(&w, good.to_str().unwrap()).await.unwrap();
    assert_eq!(got, std::fs::canonicalize(&good).unwrap());
    let uri = format!("file://{}", good.display());
    assert_eq!(resolve(&w, &uri).await.unwrap(), got);
    let uri = format!("file://localhost{}", good.display());
    assert_eq!(resolve(&w, &uri).await.unwrap(), got);
}

#[tokio::test]
async fn dot_dot_is_refused_even_when_it_stays_inside() {
    let w = world();
    let escape = format!("{}/good/../../outside/secret", w.root.display());
    assert_forbidden(resolve(&w, &escape).await, "escape");
    let inside = format!("{}/good/../good", w.root.display());
    assert_forbidden(resolve(&w, &inside).await, "inside");
    let encoded = format!("file://{}/%2e%2e/outside/secret", w.root.display());
    assert_forbidden(resolve(&w, &encoded).await, "encoded");
    assert_forbidden(resolve(&w, "../outside/secret").await, "relative");
    assert_forbidden(resolve(&w, "good").await, "relative name");
}

#[tokio::test]
async fn absolute_paths_outside_the_roots_are_refused() {
    let w = world();
    let secret = w.outside.join("secret");
    assert_forbidden(resolve(&w, secret.to_str().unwrap()).await, "outside");
    assert_forbidden(
        resolve(&w, &format!("file://{}", secret.display())).await,
        "file outside",
    );
    assert_forbidden(resolve(&w, "/etc").await, "/etc");
    // A missing path outside the roots does not reveal whether it exists.
    assert_forbidden(resolve(&w, "/definitely/not/here").await, "missing outside");
    // A sibling whose name merely starts with the root's is not inside it.
    let sibling = PathBuf::from(format!("{}-evil", w.root.display()));
    write_adapter(&sibling);
    assert_forbidden(
        resolve(&w, sibling.to_str().unwrap()).await,
        "prefix sibling",
    );
}

#[tokio::test]
async fn symlinks_that_leave_the_roots_are_refused() {
    let w = world();
    // The directory itself is a link out.
    let link = w.root.join("link");
    std::os::unix::fs::symlink(w.outside.join("secret"), &link).unwrap();
    assert_forbidden(resolve(&w, link.to_str().unwrap()).await, "dir link");
    // A parent is a link out.
    let parent = w.root.join("parent");
    std::os::unix::fs::symlink(&w.outside, &parent).unwrap();
    assert_forbidden(
        resolve(&w, parent.join("secret").to_str().unwrap()).await,
        "parent link",
    );
    // A file inside an in-root directory links out.
    let sneaky = w.root.join("sneaky");
    std::fs::create_dir_all(&sneaky).unwrap();
    std::fs::write(sneaky.join("adapter_config.json"), "{}").unwrap();
    std::os::unix::fs::symlink(
        w.outside.join("secret/adapter_model.safetensors"),
        sneaky.join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_forbidden(resolve(&w, sneaky.to_str().unwrap()).await, "file link");
    // Links that stay inside the roots are fine.
    let inner = w.root.join("inner");
    std::os::unix::fs::symlink(w.root.join("good"), &inner).unwrap();
    assert!(resolve(&w, inner.to_str().unwrap()).await.is_ok());
}

#[tokio::test]
async fn missing_directories_and_files_are_not_found() {
    let w = world();
    let missing = w.root.join("nope");
    assert!(matches!(
        resolve(&w, missing.to_str().unwrap()).await,
        Err(SourceError::NotFound { .. })
    ));
    let empty = w.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = resolve(&w, empty.to_str().unwrap()).await.unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
}

#[tokio::test]
async fn no_roots_means_no_local_sources() {
    let mut w = world();
    w.opts.local_roots.clear();
    let good = w.root.join("good");
    assert_forbidden(resolve(&w, good.to_str().unwrap()).await, "no roots");
}
