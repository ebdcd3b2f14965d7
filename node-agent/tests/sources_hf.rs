//! `hf://` sources through `hf-hub` against a loopback server that speaks the Hub's download
//! protocol: `GET {endpoint}/{repo}/resolve/{revision}/{file}` with `Range`, answering 206 with
//! `etag`, `x-repo-commit` and `content-range` (what `hf-hub` 0.4 reads). The endpoint is
//! trusted configuration, so loopback is fine here (unlike `https://` sources).

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::EngineConfig;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::ids::Digest;
use loraplane_agent::model::config::Arch;
use loraplane_agent::sources::{self, SourceError, SourceOptions};
use sha2::Digest as _;

const TOKEN: &str = "hf_test_token";
const MAIN: &str = "1111111111111111111111111111111111111111";
const V1: &str = "2222222222222222222222222222222222222222";

type Files = HashMap<String, Vec<u8>>;

#[derive(Default)]
struct Hub {
    /// repo → commit → files.
    repos: HashMap<String, HashMap<String, Files>>,
    /// repo → branch or tag → commit.
    refs: HashMap<String, HashMap<String, String>>,
    /// Every request: (path, range).
    log: Mutex<Vec<(String, String)>>,
}

impl Hub {
    fn add(&mut self, repo: &str, refname: &str, commit: &str, files: Files) {
        self.repos
            .entry(repo.into())
            .or_default()
            .insert(commit.into(), files);
        self.refs
            .entry(repo.into())
            .or_default()
            .insert(refname.into(), commit.into());
    }

    /// Full-body requests for `file` (the metadata probe asks for `bytes=0-0`).
    fn body_fetches(&self, file: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(p, r)| p.ends_with(&format!("/{file}")) && r != "bytes=0-0")
            .count()
    }
}

async fn resolve_file(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    hub.log
        .lock()
        .unwrap()
        .push((format!("/{org}/{name}/resolve/{rev}/{file}"), range.clone()));
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let repo = format!("{org}/{name}");
    let commit = match hub.refs.get(&repo).and_then(|r| r.get(&rev)) {
        Some(c) => c.clone(),
        None => rev.clone(),
    };
    let Some(bytes) = hub
        .repos
        .get(&repo)
        .and_then(|c| c.get(&commit))
        .and_then(|f| f.get(&file))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let total = bytes.len();
    let (start, end) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .unwrap_or((0, total.saturating_sub(1)));
    let end = end.min(total.saturating_sub(1));
    let etag = hex::encode(sha2::Sha256::digest(bytes));
    (
        StatusCode::PARTIAL_CONTENT,
        [
            ("etag", format!("\"{etag}\"")),
            ("x-repo-commit", commit),
            ("content-range", format!("bytes {start}-{end}/{total}")),
            ("accept-ranges", "bytes".to_owned()),
        ],
        bytes[start..=end].to_vec(),
    )
        .into_response()
}

async fn serve(hub: Hub) -> (String, Arc<Hub>) {
    let hub = Arc::new(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/{org}/{name}/resolve/{rev}/{file}", get(resolve_file))
        .with_state(hub.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hub)
}

fn adapter_files(seed: u8) -> Files {
    HashMap::from([
        (
            "adapter_config.json".to_owned(),
            br#"{"peft_type":"LORA","r":4}"#.to_vec(),
        ),
        (
            "adapter_model.safetensors".to_owned(),
            (0..200_000u32).map(|i| (i as u8) ^ seed).collect(),
        ),
        ("README.md".to_owned(), b"not fetched".to_vec()),
    ])
}

fn options(cache: &Path, endpoint: &str) -> SourceOptions {
    let mut opts = SourceOptions::new(cache);
    opts.hf_endpoint = endpoint.to_owned();
    opts.hf_token = Some(TOKEN.to_owned());
    opts
}

#[tokio::test]
async fn adapters_download_at_the_requested_revision() {
    let mut hub = Hub::default();
    hub.add("acme/sql-lora", "main", MAIN, adapter_files(1));
    hub.add("acme/sql-lora", "v1", V1, adapter_files(2));
    let (endpoint, hub) = serve(hub).await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &endpoint);

    let main_weights = &adapter_files(1)["adapter_model.safetensors"];
    let digest = Digest::of(main_weights);
    let dir = sources::resolve_adapter("hf://acme/sql-lora", Some(&digest), &opts)
        .await
        .unwrap();
    assert_eq!(
        dir.file_name().unwrap(),
        MAIN,
        "snapshot named after the commit"
    );
    assert_eq!(
        &std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        main_weights
    );
    assert!(!dir.join("README.md").exists());
    assert!(dir.starts_with(cache.path().join("hf")));

    let v1 = sources::resolve("hf://acme/sql-lora@v1", &opts)
        .await
        .unwrap();
    assert_eq!(v1.file_name().unwrap(), V1);
    assert_eq!(
        std::fs::read(v1.join("adapter_model.safetensors")).unwrap(),
        adapter_files(2)["adapter_model.safetensors"]
    );

    // Again: the config is re-checked (it pins the commit), the weights come from the cache.
    let before = hub.body_fetches("adapter_model.safetensors");
    let again = sources::resolve_adapter("hf://acme/sql-lora", Some(&digest), &opts)
        .await
        .unwrap();
    assert_eq!(again, dir);
    assert_eq!(hub.body_fetches("adapter_model.safetensors"), before);
}

#[tokio::test]
async fn refusals() {
    let mut hub = Hub::default();
    hub.add("acme/sql-lora", "main", MAIN, adapter_files(1));
    let (endpoint, hub) = serve(hub).await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &endpoint);

    let wrong = Digest::of(b"other");
    let err = sources::resolve_adapter("hf://acme/sql-lora", Some(&wrong), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::DigestMismatch { .. }), "{err:?}");

    let err = sources::resolve("hf://acme/missing", &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err:?}");

    let mut no_token = opts.clone();
    no_token.hf_token = None;
    let err = sources::resolve("hf://acme/sql-lora", &no_token)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Forbidden { .. }), "{err:?}");

    for bad in [
        "hf://acme/../x",
        "hf://a/b/c",
        "hf://acme/sql-lora@../../x",
        "hf://",
    ] {
        let err = sources::resolve(bad, &opts).await.unwrap_err();
        assert!(
            matches!(err, SourceError::Unsupported { .. }),
            "{bad}: {err:?}"
        );
    }

    // The size cap: the announced size is over it, so the body is never requested.
    let fresh = tempfile::tempdir().unwrap();
    let mut small = options(fresh.path(), &endpoint);
    small.max_bytes = 10_000;
    let before = hub.body_fetches("adapter_model.safetensors");
    let err = sources::resolve("hf://acme/sql-lora", &small)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err:?}");
    assert_eq!(hub.body_fetches("adapter_model.safetensors"), before);
}

#[tokio::test]
async fn sharded_models_download_and_load() {
    // Download progress is logged; `--nocapture` shows it.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let src = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 3,
        shards: 2,
    };
    model::write(&spec, src.path()).unwrap();
    let mut files = Files::new();
    for entry in std::fs::read_dir(src.path()).unwrap() {
        let entry = entry.unwrap();
        files.insert(
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    let shards = files.keys().filter(|f| f.ends_with(".safetensors")).count();
    assert_eq!(shards, 2);
    let mut hub = Hub::default();
    hub.add("acme/tiny-llama", "main", MAIN, files.clone());
    let (endpoint, _hub) = serve(hub).await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &endpoint);

    let dir = sources::resolve_model("hf://acme/tiny-llama", &opts)
        .await
        .unwrap();
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    let handle = EngineHandle::spawn(CpuBackend, &dir, EngineConfig::default()).unwrap();
    assert_eq!(handle.stats().await.unwrap().running, 0);
}
