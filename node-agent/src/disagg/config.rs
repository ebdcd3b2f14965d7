//! The agent's [`Role`] and the `serve` flags of disaggregated serving (flattened into
//! `ServeArgs`), validated into a [`DisaggConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use loraplane_units::{parse_bytes, parse_duration};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::credential::ClusterCredential;
use crate::disagg::decode::DecodeOptions;

/// The agent's role in a (possibly disaggregated) deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Prefill and decode in one agent.
    Unified,
    /// Computes prompts for decode agents.
    Prefill,
    /// Owns requests and decodes; prompts are prefilled remotely.
    Decode,
}

impl Role {
    /// The `--role` value and the `role` label of `loraplane_role_info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unified => "unified",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Disaggregated serving (roles `prefill` and `decode`).
#[derive(Debug, Clone, clap::Args)]
pub struct DisaggArgs {
    /// Decode role: prefill agents as `host:port` (comma-separated or repeated). A DNS name may
    /// resolve to many agents (a Kubernetes headless Service); names are re-resolved every
    /// `--peer-refresh`.
    #[arg(long, env = "LORAPLANE_PREFILL_PEERS", value_delimiter = ',')]
    pub prefill_peers: Vec<String>,
    #[arg(long, env = "LORAPLANE_PEER_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub peer_refresh: Duration,
    /// Decode role: prompts shorter than this many tokens are prefilled locally.
    #[arg(long, env = "LORAPLANE_LOCAL_PREFILL_THRESHOLD", default_value_t = 64)]
    pub local_prefill_threshold: usize,
    /// Decode role: when no prefill peer answers, fail the request (503, retryable) instead of
    /// prefilling locally.
    #[arg(long, env = "LORAPLANE_DISABLE_LOCAL_PREFILL")]
    pub disable_local_prefill: bool,
    /// Prefill role: where the `KvTransfer` service listens. Port 0 picks one.
    #[arg(long, env = "LORAPLANE_KV_ADDR", default_value = "0.0.0.0:50052")]
    pub kv_addr: SocketAddr,
    /// The cluster credential every agent of a deployment shares (a mounted Secret): prefill
    /// agents require it on the KV channel, decode agents present it. Required for both roles.
    #[arg(long, env = "LORAPLANE_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Decode role: deadline of one remote prefill, transfer included.
    #[arg(long, env = "LORAPLANE_KV_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub kv_timeout: Duration,
    #[arg(long, env = "LORAPLANE_KV_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub kv_connect_timeout: Duration,
    /// Largest KV chunk one message carries (below gRPC's 4 MiB default message limit).
    #[arg(long, env = "LORAPLANE_KV_MAX_CHUNK_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub kv_max_chunk_bytes: u64,
    /// Mutual TLS on the KV channel: this agent's certificate (PEM)…
    #[arg(long, env = "LORAPLANE_KV_TLS_CERT", requires_all = ["kv_tls_key", "kv_tls_ca"])]
    pub kv_tls_cert: Option<PathBuf>,
    /// …its private key (PEM)…
    #[arg(long, env = "LORAPLANE_KV_TLS_KEY", requires = "kv_tls_cert")]
    pub kv_tls_key: Option<PathBuf>,
    /// …and the cluster CA that signs every agent's certificate (PEM).
    #[arg(long, env = "LORAPLANE_KV_TLS_CA", requires = "kv_tls_cert")]
    pub kv_tls_ca: Option<PathBuf>,
    /// Decode role: the name prefill agents' certificates are issued for.
    #[arg(
        long,
        env = "LORAPLANE_KV_TLS_SERVER_NAME",
        default_value = "loraplane-prefill"
    )]
    pub kv_tls_server_name: String,
}

/// PEM material of the KV channel's mutual TLS.
#[derive(Debug, Clone)]
pub struct KvTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
    pub server_name: String,
}

impl KvTls {
    /// A prefill agent's side: its certificate, and the cluster CA its callers' certificates
    /// must chain to.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// A decode agent's side: the cluster CA, its own certificate, and the name prefill agents'
    /// certificates are issued for.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(self.server_name.clone())
    }
}

/// Validated disaggregation settings: each flag of [`DisaggArgs`] lands in exactly one field.
#[derive(Debug, Clone)]
pub struct DisaggConfig {
    /// Prefill role: where `KvTransfer` listens.
    pub kv_addr: SocketAddr,
    /// Both roles: the cluster credential (required unless the role is `unified`).
    pub cluster_token: Option<ClusterCredential>,
    /// Prefill role: mutual TLS of the `KvTransfer` server (the decode side's is in
    /// [`DecodeOptions::tls`]).
    pub tls: Option<KvTls>,
    /// Decode role: how prefill peers are reached, what is sent to them, and when to prefill
    /// locally instead.
    pub decode: DecodeOptions,
}

/// Why the disaggregation flags were refused.
#[derive(Debug, thiserror::Error)]
pub enum DisaggConfigError {
    #[error(
        "--cluster-token-file is required for --role {0}: the KV channel requires the cluster credential"
    )]
    MissingClusterToken(Role),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("--kv-max-chunk-bytes must be between 64KiB and 4MiB")]
    ChunkSize,
}

impl DisaggConfigError {
    pub fn kind(&self) -> &'static str {
        match self {
            DisaggConfigError::MissingClusterToken(_) => "missing_cluster_token",
            DisaggConfigError::File { .. } => "file",
            DisaggConfigError::ChunkSize => "chunk_size",
        }
    }
}

fn read(path: &Path) -> Result<String, DisaggConfigError> {
    std::fs::read_to_string(path).map_err(|e| DisaggConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl DisaggArgs {
    pub fn validate(self, role: Role) -> Result<DisaggConfig, DisaggConfigError> {
        let cluster_token = match &self.cluster_token_file {
            Some(path) => {
                let token =
                    ClusterCredential::new(&read(path)?).map_err(|e| DisaggConfigError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                Some(token)
            }
            None => None,
        };
        if role != Role::Unified && cluster_token.is_none() {
            return Err(DisaggConfigError::MissingClusterToken(role));
        }
        if !(64 << 10..=4 << 20).contains(&self.kv_max_chunk_bytes) {
            return Err(DisaggConfigError::ChunkSize);
        }
        let tls = match (&self.kv_tls_cert, &self.kv_tls_key, &self.kv_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(KvTls {
                cert: read(cert)?,
                key: read(key)?,
                ca: read(ca)?,
                server_name: self.kv_tls_server_name.clone(),
            }),
            _ => None,
        };
        Ok(DisaggConfig {
            kv_addr: self.kv_addr,
            decode: DecodeOptions {
                peers: self.prefill_peers,
                refresh: self.peer_refresh,
                local_prefill_threshold: self.local_prefill_threshold,
                local_fallback: !self.disable_local_prefill,
                connect_timeout: self.kv_connect_timeout,
                timeout: self.kv_timeout,
                max_chunk_bytes: self.kv_max_chunk_bytes as usize,
                credential: cluster_token.clone(),
                tls: tls.as_ref().map(KvTls::client),
            },
            cluster_token,
            tls,
        })
    }
}
