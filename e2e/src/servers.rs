//! Loopback file servers the agent fetches adapter sources from: an HTTPS server whose
//! certificate a CA generated here signed (the CA's PEM comes back for `--source-ca-file`),
//! and a Hugging Face Hub stand-in speaking the Hub's download protocol
//! (`GET /{org}/{repo}/resolve/{revision}/{file}` with `Range`, answering 206 with `etag`,
//! `x-repo-commit` and `content-range`, what `hf-hub` 0.4 reads).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sha2::Digest as _;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// URL path (without the leading `/`) → bytes.
pub type Files = HashMap<String, Vec<u8>>;

async fn serve_file(State(files): State<Arc<Files>>, UrlPath(path): UrlPath<String>) -> Response {
    match files.get(&path) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A CA and a `localhost` / `127.0.0.1` server certificate it signed: (CA, cert, key) PEM.
pub fn test_pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("the CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("a server key");
    let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("the server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Serves `files` over TLS on a loopback port, as `localhost`; returns the address and the
/// PEM of the CA that signed the server's certificate.
pub async fn https_files(files: Files) -> (SocketAddr, String) {
    let (ca, cert, key) = test_pki();
    let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("a PEM certificate")];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("a PEM key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the server's certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = axum::Router::new()
        .route("/{*path}", get(serve_file))
        .with_state(Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA hangs up during the handshake.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    (addr, ca)
}

/// The commit every stand-in Hub repository is at.
pub const HUB_COMMIT: &str = "3333333333333333333333333333333333333333";

async fn hub_file(
    State(files): State<Arc<Files>>,
    UrlPath((org, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(bytes) = files.get(&format!("{org}/{name}/{file}")) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
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
            ("x-repo-commit", HUB_COMMIT.to_owned()),
            ("content-range", format!("bytes {start}-{end}/{total}")),
            ("accept-ranges", "bytes".to_owned()),
        ],
        bytes[start..=end].to_vec(),
    )
        .into_response()
}

/// A Hub stand-in on a loopback port serving `files` (`org/repo/file` → bytes) at any
/// revision; returns its endpoint URL (`HF_ENDPOINT`).
pub async fn hub(files: Files) -> String {
    let app = axum::Router::new()
        .route("/{org}/{name}/resolve/{rev}/{file}", get(hub_file))
        .with_state(Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
