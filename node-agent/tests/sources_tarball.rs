//! Archive sources (`.tar`, `.tar.gz`): real archives — well-formed ones written by the `tar`
//! crate and hostile ones written header by header — unpacked by `sources::tarball` and fetched
//! through `https://` from a loopback server. Path escapes (`..`, absolute paths), links,
//! devices, duplicate entries, oversized extension records, too many entries and decompression
//! bombs are refused, nothing is written outside the destination, and nothing is cached.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loraplane_agent::lora::ids::Digest;
use loraplane_agent::sources::tarball::{self, Limits};
use loraplane_agent::sources::{self, SourceError, SourceOptions, StaticResolver};

const CONFIG: &[u8] = br#"{"peft_type":"LORA","r":4}"#;

fn weights() -> Vec<u8> {
    (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

/// One raw tar entry: a ustar header written field by field (no path checks), the data, padding.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A good adapter archive: `adapter/` with both files, as `tar cf a.tar adapter` writes it.
fn good_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("adapter/adapter_config.json", CONFIG);
    add("adapter/adapter_model.safetensors", &weights());
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn limits() -> Limits {
    Limits {
        max_bytes: 1 << 20,
        max_entries: 100,
    }
}

/// Unpacks `archive` under a fresh directory; returns the result and that directory.
fn unpack(
    archive: &[u8],
    gz: bool,
    limits: Limits,
) -> (Result<(), SourceError>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("archive");
    std::fs::write(&file, archive).unwrap();
    let dest = dir.path().join("inner").join("tree");
    std::fs::create_dir(dir.path().join("inner")).unwrap();
    let r = tarball::unpack("test-archive", &file, gz, &dest, limits).map(|_| ());
    (r, dir)
}

/// Every path under `dir`, relative.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_archives_are_refused_and_write_nothing_outside() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "parent escape",
            finish({
                let mut v = Vec::new();
                raw_entry(&mut v, b"../escaped", tar::EntryType::Regular, b"", b"x");
                v
            }),
            "not a plain relative path",
        ),
        (
            "nested parent escape",
            finish({
                let mut v = Vec::new();
                raw_entry(
                    &mut v,
                    b"a/../../escaped",
                    tar::EntryType::Regular,
                    b"",
                    b"x",
                );
                v
            }),
            "not a plain relative path",
        ),
        (
            "absolute path",
            finish({
                let mut v = Vec::new();
                raw_entry(&mut v, b"/tmp/escaped", tar::EntryType::Regular, b"", b"x");
                v
            }),
            "not a plain relative path",
        ),
        (
            "symlink then write through it",
            finish({
                let mut v = Vec::new();
                raw_entry(&mut v, b"link", tar::EntryType::Symlink, b"/", b"");
                raw_entry(&mut v, b"link/escaped", tar::EntryType::Regular, b"", b"x");
                v
            }),
            "symbolic link",
        ),
        (
            "hard link to a file outside",
            finish({
                let mut v = Vec::new();
                raw_entry(&mut v, b"passwd", tar::EntryType::Link, b"/etc/passwd", b"");
                v
            }),
            "hard link",
        ),
        (
            "device",
            finish({
                let mut v = Vec::new();
                raw_entry(&mut v, b"null", tar::EntryType::Char, b"", b"");
                v
            }),
            "character device",
        ),
        (
            "duplicate entry overwriting a file",
            finish({
                let mut v = Vec::new();
                raw_entry(
                    &mut v,
                    b"adapter_config.json",
                    tar::EntryType::Regular,
                    b"",
                    CONFIG,
                );
                raw_entry(
                    &mut v,
                    b"adapter_config.json",
                    tar::EntryType::Regular,
                    b"",
                    b"{}",
                );
                v
            }),
            "collides",
        ),
        (
            "oversized long-name record",
            finish({
                let mut v = Vec::new();
                raw_entry(
                    &mut v,
                    b"././@LongLink",
                    tar::EntryType::GNULongName,
                    b"",
                    &vec![b'a'; 200 * 1024],
                );
                raw_entry(&mut v, b"x", tar::EntryType::Regular, b"", b"x");
                v
            }),
            "extension record",
        ),
    ];
    for (what, archive, expect) in cases {
        for gz in [false, true] {
            let bytes = if gz { gzip(&archive) } else { archive.clone() };
            let (r, dir) = unpack(&bytes, gz, limits());
            let err = r.expect_err(what);
            assert!(
                matches!(err, SourceError::Forbidden { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains(expect), "{what}: {err}");
            let outside: Vec<String> = listing(dir.path())
                .into_iter()
                .filter(|p| !p.starts_with("inner/tree"))
                .filter(|p| !["archive", "inner"].contains(&p.as_str()))
                .collect();
            assert!(outside.is_empty(), "{what}: wrote {outside:?} outside");
            assert!(!Path::new("/tmp/escaped").exists(), "{what}");
        }
    }
}

#[test]
fn size_entry_count_and_bomb_limits_hold() {
    // A gzip bomb: 64 MiB of zeros in one entry compress to about 64 KiB.
    let mut bomb = Vec::new();
    raw_entry(
        &mut bomb,
        b"zeros",
        tar::EntryType::Regular,
        b"",
        &vec![0u8; 64 << 20],
    );
    let bomb = gzip(&finish(bomb));
    assert!(bomb.len() < 1 << 20);
    let (r, dir) = unpack(&bomb, true, limits());
    assert!(matches!(r, Err(SourceError::TooLarge { .. })), "{r:?}");
    let written: u64 = listing(dir.path())
        .iter()
        .map(|p| std::fs::metadata(dir.path().join(p)).unwrap().len())
        .sum();
    assert!(
        written < 4 << 20,
        "{written} bytes written for a refused archive"
    );

    // Many small files, each under the cap, together over it.
    let mut many = Vec::new();
    for i in 0..8 {
        raw_entry(
            &mut many,
            format!("f{i}").as_bytes(),
            tar::EntryType::Regular,
            b"",
            &vec![1u8; 200 * 1024],
        );
    }
    let (r, _dir) = unpack(&finish(many), false, limits());
    assert!(matches!(r, Err(SourceError::TooLarge { .. })), "{r:?}");

    // More entries than allowed.
    let mut entries = Vec::new();
    for i in 0..101 {
        raw_entry(
            &mut entries,
            format!("e{i}").as_bytes(),
            tar::EntryType::Regular,
            b"",
            b"",
        );
    }
    let (r, _dir) = unpack(&finish(entries), false, limits());
    let err = r.unwrap_err();
    assert!(err.to_string().contains("more than 100 entries"), "{err}");

    // Not an archive at all.
    let (r, _dir) = unpack(b"definitely not a tarball, just text", true, limits());
    assert!(matches!(r, Err(SourceError::Unsupported { .. })), "{r:?}");
}

#[derive(Clone)]
struct Files(Arc<HashMap<String, Vec<u8>>>);

async fn serve(State(files): State<Files>, UrlPath(name): UrlPath<String>) -> Response {
    match files.0.get(&name) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn server(files: HashMap<String, Vec<u8>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/archives/{name}", get(serve))
        .with_state(Files(Arc::new(files)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn archives_over_https_unpack_into_the_digest_cache() {
    let mut hostile = Vec::new();
    raw_entry(
        &mut hostile,
        b"../../escaped",
        tar::EntryType::Regular,
        b"",
        b"x",
    );
    let addr = server(HashMap::from([
        ("adapter.tar".to_owned(), good_tar()),
        ("adapter.tar.gz".to_owned(), gzip(&good_tar())),
        ("adapter.tgz".to_owned(), gzip(&good_tar())),
        ("hostile.tar.gz".to_owned(), gzip(&finish(hostile))),
    ]))
    .await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = SourceOptions::new(cache.path());
    opts.allow_http = true;
    opts.allowed_private_hosts = vec!["archives.test".into()];
    opts.resolver = Arc::new(StaticResolver(HashMap::from([(
        "archives.test".to_owned(),
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )])));
    opts.timeout = Duration::from_secs(20);
    let base = format!("http://archives.test:{}/archives", addr.port());

    let digest = Digest::of(&weights());
    let mut dirs = Vec::new();
    for name in ["adapter.tar", "adapter.tar.gz", "adapter.tgz"] {
        let dir = sources::resolve_adapter(&format!("{base}/{name}"), Some(&digest), &opts)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.join("adapter_config.json")).unwrap(),
            CONFIG
        );
        assert_eq!(
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
            weights()
        );
        assert_eq!(
            listing(&dir),
            ["adapter_config.json", "adapter_model.safetensors"]
        );
        dirs.push(dir);
    }
    // The same files, whichever archive carried them: one cache entry, no partials left.
    assert!(dirs.windows(2).all(|w| w[0] == w[1]), "{dirs:?}");
    let entries: Vec<String> = listing(&cache.path().join("https"))
        .into_iter()
        .filter(|p| !p.contains('/'))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");

    // A pinned digest that does not match is refused.
    let wrong = Digest::of(b"other");
    let err = sources::resolve_adapter(&format!("{base}/adapter.tar"), Some(&wrong), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::DigestMismatch { .. }), "{err:?}");

    // A hostile archive: refused, nothing cached, nothing written outside.
    let err = sources::resolve(&format!("{base}/hostile.tar.gz"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Forbidden { .. }), "{err:?}");
    let after: Vec<String> = listing(&cache.path().join("https"))
        .into_iter()
        .filter(|p| !p.contains('/'))
        .collect();
    assert_eq!(after, entries);
    assert!(!cache.path().join("escaped").exists());
}
