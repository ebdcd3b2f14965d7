//! The KV channel over mutual TLS (rustls): a decode agent with a client certificate from the
//! cluster CA streams KV from a prefill agent that requires one; a client without a
//! certificate is refused at the handshake; a client that does not trust the prefill agent's
//! CA fails its handshake and counts the failure as `tls`.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::credential::ClusterCredential;
use loraplane_agent::disagg::decode::{DecodeOptions, DecodeRouter};
use loraplane_agent::disagg::prefill::PrefillService;
use loraplane_agent::disagg::stats::DisaggStats;
use loraplane_agent::disagg::transfer::WireLayout;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{EngineConfig, EngineError, Event, Request, SamplingParams};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::ids::TenantId;
use loraplane_agent::model::config::Arch;
use loraplane_agent::sources::SourceOptions;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca_cert.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["decode-agent".into()]),
    }
}

fn options(addr: String, tls: ClientTlsConfig) -> DecodeOptions {
    DecodeOptions {
        peers: vec![addr],
        refresh: Duration::from_secs(3600),
        local_prefill_threshold: 1,
        local_fallback: false,
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(20),
        max_chunk_bytes: 1 << 20,
        credential: Some(ClusterCredential::new("token").unwrap()),
        tls: Some(tls),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_streams_over_mutual_tls_and_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    model::write(
        &ModelSpec {
            arch: Arch::Qwen2,
            preset: Preset::Tiny,
            dtype: FixtureDtype::F32,
            seed: 8,
            shards: 1,
        },
        &model_dir,
    )
    .unwrap();
    let pki = pki();

    let config = || EngineConfig {
        num_pages: 256,
        ..EngineConfig::default()
    };
    let prefill = EngineHandle::spawn(CpuBackend, &model_dir, config()).unwrap();
    let decode = EngineHandle::spawn(CpuBackend, &model_dir, config()).unwrap();
    let c = prefill.model_config().clone();
    let layout = WireLayout {
        num_layers: c.num_layers,
        block_size: 16,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let service = PrefillService::new(
        prefill.clone(),
        layout,
        ClusterCredential::new("token").unwrap(),
        Arc::new(SourceOptions::new(dir.path().join("cache"))),
        Arc::new(DisaggStats::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let request = Request {
        id: "tls".into(),
        tenant: TenantId::default_tenant(),
        adapters: Vec::new(),
        prompt: (0..40).map(|i| i * 11 % 400).collect(),
        params: SamplingParams {
            max_tokens: 5,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    };
    let with_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.client.0, &pki.client.1))
        .domain_name("localhost");
    let stats = Arc::new(DisaggStats::default());
    let router = DecodeRouter::start(
        decode.clone(),
        layout,
        options(addr.clone(), with_cert),
        stats.clone(),
    )
    .await;
    let mut stream = router.submit(request.clone()).await.unwrap();
    let mut tokens = Vec::new();
    while let Some(ev) = stream.recv().await {
        match ev {
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished { error, .. } => {
                assert!(error.is_none());
                break;
            }
        }
    }
    let mut local = decode
        .submit(Request {
            id: "local".into(),
            ..request.clone()
        })
        .await
        .unwrap();
    let mut expected = Vec::new();
    while let Some(Event::Token { id, .. }) = local.recv().await {
        expected.push(id);
    }
    assert_eq!(tokens, expected, "remote prefill over mTLS equals local");
    assert_eq!(
        stats
            .remote_prefills
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let stats = Arc::new(DisaggStats::default());
    let router = DecodeRouter::start(
        decode.clone(),
        layout,
        options(addr.clone(), no_cert),
        stats.clone(),
    )
    .await;
    let err = router
        .submit(Request {
            id: "nocert".into(),
            ..request.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err}");

    // A decode agent that does not trust the prefill agent's CA: the handshake fails on the
    // decode side, and the failure is counted as what it is, a TLS problem.
    let stranger = crate::pki();
    let wrong_ca = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&stranger.ca))
        .identity(Identity::from_pem(&stranger.client.0, &stranger.client.1))
        .domain_name("localhost");
    let stats = Arc::new(DisaggStats::default());
    let router = DecodeRouter::start(
        decode.clone(),
        layout,
        options(addr, wrong_ca),
        stats.clone(),
    )
    .await;
    let err = router
        .submit(Request {
            id: "wrong-ca".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
    let failures = stats.failures();
    assert!(
        failures.get("tls").copied().unwrap_or(0) >= 1,
        "a rejected certificate counts as a tls failure: {failures:?}"
    );
    assert_eq!(
        prefill.stats().await.unwrap().steps,
        1,
        "only the authenticated prefill ran"
    );
}
