//! `https://` sources against a loopback HTTP server (plain HTTP with `allow_http`; TLS is
//! rustls' business): downloads land atomically in a digest-keyed cache, digests are verified,
//! the size cap holds mid-stream, timeouts fire, and no request — first hop or redirect — goes
//! to a loopback, link-local or private address unless allowed. Names are resolved by a static
//! table, so `trusted.test` (exempted) and `evil.test` (not) both point at the loopback server;
//! refused destinations are refused before any connection, so nothing is ever sent to
//! 169.254.x or 10.x.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loraplane_agent::lora::ids::Digest;
use loraplane_agent::sources::{self, SourceError, SourceOptions, StaticResolver};

const CONFIG: &[u8] = br#"{"peft_type":"LORA","r":4}"#;

fn weights() -> Vec<u8> {
    (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

#[derive(Default)]
struct Hits(std::sync::Mutex<HashMap<String, usize>>);

impl Hits {
    fn add(&self, path: &str) {
        *self.0.lock().unwrap().entry(path.to_owned()).or_default() += 1;
    }
    fn get(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    fn with_prefix(&self, prefix: &str) -> usize {
        let m = self.0.lock().unwrap();
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

struct Server {
    addr: SocketAddr,
    hits: Arc<Hits>,
}

#[derive(Clone)]
struct AppState {
    port: u16,
    hits: Arc<Hits>,
    streamed: Arc<AtomicUsize>,
}

fn file(name: &str) -> Option<Vec<u8>> {
    match name {
        "adapter_config.json" => Some(CONFIG.to_vec()),
        "adapter_model.safetensors" => Some(weights()),
        _ => None,
    }
}

async fn serve_file(
    State(s): State<AppState>,
    UrlPath((dir, name)): UrlPath<(String, String)>,
) -> Response {
    s.hits.add(&format!("/{dir}/{name}"));
    let port = s.port;
    let redirect = |to: String| (StatusCode::FOUND, [(header::LOCATION, to)], "").into_response();
    match dir.as_str() {
        "a" | "target" => match file(&name) {
            Some(bytes) => bytes.into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        "to-loopback" => redirect(format!("http://127.0.0.1:{port}/target/{name}")),
        "to-loopback-v6" => redirect(format!("http://[::1]:{port}/target/{name}")),
        "to-metadata" => redirect(format!("http://169.254.169.254/latest/{name}")),
        "to-private" => redirect(format!("http://10.0.0.1/x/{name}")),
        "to-evil-name" => redirect(format!("http://evil.test:{port}/target/{name}")),
        "to-trusted" => redirect(format!("http://trusted.test:{port}/target/{name}")),
        "to-ftp" => redirect(format!("ftp://trusted.test/{name}")),
        "loop" => redirect(format!("http://trusted.test:{port}/loop/{name}")),
        "endless" => match name.as_str() {
            "adapter_config.json" => CONFIG.to_vec().into_response(),
            // No Content-Length: the cap must stop it while streaming.
            _ => {
                let streamed = s.streamed.clone();
                let chunks = futures::stream::repeat_with(move || {
                    streamed.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![7u8; 64 * 1024]))
                });
                Body::from_stream(chunks).into_response()
            }
        },
        "sized" => match name.as_str() {
            "adapter_config.json" => CONFIG.to_vec().into_response(),
            _ => vec![0u8; 3 << 20].into_response(),
        },
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::NOT_FOUND.into_response()
        }
        "broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn server() -> (Server, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Hits::default());
    let streamed = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/{dir}/{name}", get(serve_file))
        .with_state(AppState {
            port: addr.port(),
            hits: hits.clone(),
            streamed: streamed.clone(),
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (Server { addr, hits }, streamed)
}

fn options(cache: &Path) -> SourceOptions {
    let loopback = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let mut opts = SourceOptions::new(cache);
    opts.allow_http = true;
    opts.allowed_private_hosts = vec!["trusted.test".into()];
    opts.resolver = Arc::new(StaticResolver(HashMap::from([
        ("trusted.test".to_owned(), loopback.clone()),
        ("evil.test".to_owned(), loopback),
    ])));
    opts.timeout = Duration::from_secs(20);
    opts
}

/// Entries of the https cache: committed digests only, never a partial download.
fn cache_entries(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(cache.join("https")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn assert_forbidden(r: Result<PathBuf, SourceError>, what: &str) -> String {
    match r {
        Err(e @ SourceError::Forbidden { .. }) => e.to_string(),
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn downloads_verify_and_cache_by_digest() {
    // Download progress is logged; `--nocapture` shows it.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path());
    let port = srv.addr.port();
    let uri = format!("http://trusted.test:{port}/a");
    let digest = Digest::of(&weights());

    let dir = sources::resolve_adapter(&uri, Some(&digest), &opts)
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
    assert!(dir.starts_with(cache.path().join("https")));
    let entries = cache_entries(cache.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].starts_with("sha256-"), "{entries:?}");
    assert_eq!(srv.hits.get("/a/adapter_model.safetensors"), 1);

    // With the digest pinned, the cached weights are reused without another download.
    let again = sources::resolve_adapter(&uri, Some(&digest), &opts)
        .await
        .unwrap();
    assert_eq!(again, dir);
    assert_eq!(srv.hits.get("/a/adapter_model.safetensors"), 1);
    // Without a pin the weights are fetched again and land in the same entry.
    let unpinned = sources::resolve(&format!("{uri}/"), &opts).await.unwrap();
    assert_eq!(unpinned, dir);
    assert_eq!(cache_entries(cache.path()).len(), 1);

    // A redirect between allowed hosts is followed.
    let via = format!("http://trusted.test:{port}/to-trusted");
    assert_eq!(sources::resolve(&via, &opts).await.unwrap(), dir);
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_nothing_is_cached() {
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path());
    let uri = format!("http://trusted.test:{}/a", srv.addr.port());
    let wrong = Digest::of(b"something else");
    let err = sources::resolve_adapter(&uri, Some(&wrong), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::DigestMismatch { .. }), "{err:?}");
    assert_eq!(err.kind(), "digest_mismatch");
    assert!(cache_entries(cache.path()).is_empty());
}

#[tokio::test]
async fn private_destinations_are_refused_without_a_request() {
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let port = srv.addr.port();
    let mut strict = options(cache.path());
    strict.allowed_private_hosts.clear();

    // Direct requests: IP literals and names resolving to loopback.
    for uri in [
        format!("http://127.0.0.1:{port}/a"),
        format!("http://[::1]:{port}/a"),
        format!("http://2130706433:{port}/a"), // 127.0.0.1 in decimal
        format!("http://trusted.test:{port}/a"),
        format!("http://evil.test:{port}/a"),
        "http://169.254.169.254/latest".to_owned(),
        "http://10.0.0.1/x".to_owned(),
    ] {
        let msg = assert_forbidden(sources::resolve(&uri, &strict).await, &uri);
        assert!(msg.contains("non-public"), "{msg}");
    }
    assert_eq!(
        srv.hits.with_prefix("/"),
        0,
        "a refused request reached the server"
    );

    // Redirects from an allowed host to refused destinations.
    let opts = options(cache.path());
    for kind in [
        "to-loopback",
        "to-loopback-v6",
        "to-metadata",
        "to-private",
        "to-evil-name",
    ] {
        let uri = format!("http://trusted.test:{port}/{kind}");
        let msg = assert_forbidden(sources::resolve(&uri, &opts).await, kind);
        assert!(msg.contains("non-public"), "{kind}: {msg}");
    }
    assert_eq!(srv.hits.with_prefix("/target/"), 0);

    // Other schemes, too many redirects, and plain http when not allowed.
    let msg = assert_forbidden(
        sources::resolve(&format!("http://trusted.test:{port}/to-ftp"), &opts).await,
        "ftp",
    );
    assert!(msg.contains("ftp"), "{msg}");
    let msg = assert_forbidden(
        sources::resolve(&format!("http://trusted.test:{port}/loop"), &opts).await,
        "loop",
    );
    assert!(msg.contains("too many redirects"), "{msg}");
    let mut https_only = options(cache.path());
    https_only.allow_http = false;
    assert_forbidden(
        sources::resolve(&format!("http://trusted.test:{port}/a"), &https_only).await,
        "http",
    );
    // Everything refused left nothing behind.
    assert!(cache_entries(cache.path()).is_empty());
}

#[tokio::test]
async fn allow_private_networks_lets_loopback_through() {
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.allowed_private_hosts.clear();
    opts.allow_private_networks = true;
    let uri = format!("http://127.0.0.1:{}/a", srv.addr.port());
    assert!(sources::resolve(&uri, &opts).await.is_ok());
}

#[tokio::test]
async fn the_size_cap_is_enforced_while_streaming() {
    let (srv, streamed) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.max_bytes = 1 << 20;
    let port = srv.addr.port();

    // An endless body with no Content-Length: only a mid-stream check can end this (the
    // timeout is far longer than the test takes).
    let err = sources::resolve(&format!("http://trusted.test:{port}/endless"), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::TooLarge { limit, .. } if limit == 1 << 20),
        "{err:?}"
    );
    assert!(streamed.load(Ordering::Relaxed) >= 16);

    // A declared Content-Length over the cap is refused before the body is read.
    let err = sources::resolve(&format!("http://trusted.test:{port}/sized"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err:?}");
    assert!(
        cache_entries(cache.path()).is_empty(),
        "partial downloads left behind"
    );
}

#[tokio::test]
async fn timeouts_and_upstream_errors() {
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(cache.path());
    opts.timeout = Duration::from_millis(300);
    let port = srv.addr.port();
    let err = sources::resolve(&format!("http://trusted.test:{port}/slow"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");

    let opts = options(cache.path());
    let err = sources::resolve(&format!("http://trusted.test:{port}/missing"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err:?}");
    let err = sources::resolve(&format!("http://trusted.test:{port}/broken"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Fetch { .. }), "{err:?}");
    assert!(err.to_string().contains("500"), "{err}");
    assert!(cache_entries(cache.path()).is_empty());
}

#[tokio::test]
async fn errors_never_show_credentials() {
    let (srv, _) = server().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path());
    let port = srv.addr.port();
    for uri in [
        format!("http://admin:hunter2@trusted.test:{port}/missing"),
        format!("http://trusted.test:{port}/a?sig=hunter2"),
        format!("http://admin:hunter2@127.0.0.1:{port}/a"),
    ] {
        let err = sources::resolve(&uri, &opts).await.unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(
            msg.contains("trusted.test") || msg.contains("127.0.0.1"),
            "{msg}"
        );
    }
}
