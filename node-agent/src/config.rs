//! `loraplane-agent serve` configuration: every flag is `--long` and `LORAPLANE_…` in the
//! environment, grouped into flattened structs, and a `--config FILE` (TOML, or JSON for a
//! `.json` file) whose keys are the long flag names (`grpc-addr` or `grpc_addr`). Precedence:
//! command line, then environment, then the file, then the defaults. Parsed and validated once
//! into [`ServeConfig`], which is passed down; nothing below reads the environment.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};
use loraplane_units::{parse_bytes, parse_duration};

use crate::api::auth::{self, AdminAuth, AuthError, TenantSpec};
use crate::api::service::RequestBounds;
use crate::backend::device::Device;
use crate::disagg::config::{DisaggArgs, DisaggConfig, DisaggConfigError, Role};
use crate::engine::{EngineConfig, PrefixCaching};
use crate::lora::host::AdapterLimits;
use crate::metrics::AdapterIdentity;
use crate::sources::{CaBundle, SourceOptions, StoreSettings};

/// `--prefix-cache`: whether prompt prefixes' KV blocks are reused, and within what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefixCacheMode {
    /// Every prompt is computed in full.
    Off,
    /// Reused within a tenant (and a request's `cache_salt`): no tenant ever hits another's
    /// blocks.
    PerTenant,
}

impl From<PrefixCacheMode> for PrefixCaching {
    fn from(m: PrefixCacheMode) -> Self {
        match m {
            PrefixCacheMode::Off => PrefixCaching::Off,
            PrefixCacheMode::PerTenant => PrefixCaching::PerTenant,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// `loraplane-agent serve …`
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A TOML or JSON file whose keys are long flag names; flags and environment override it.
    #[arg(long, env = "LORAPLANE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub disagg: DisaggArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub tenancy: TenancyArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub requests: RequestArgs,
    #[command(flatten)]
    pub sources: SourceArgs,
    #[command(flatten)]
    pub logging: LogArgs,
}

/// What to serve and where.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// `unified` (prefill and decode here), `prefill` (computes prompts for decode agents over
    /// `KvTransfer`) or `decode` (serves clients, prefilling on `--prefill-peers`).
    #[arg(long, env = "LORAPLANE_ROLE", value_enum, default_value = "unified")]
    pub role: Role,
    /// The base model: a checkpoint directory, or a source URI (`hf://org/repo[@rev]`,
    /// `https://…`, `file://…`).
    #[arg(long, env = "LORAPLANE_MODEL")]
    pub model: Option<String>,
    /// The name clients use for the base model (default: the model directory's name).
    #[arg(long, env = "LORAPLANE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// gRPC listen address (`Inference`, `Admin`, health, reflection). Port 0 picks one.
    #[arg(long, env = "LORAPLANE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (OpenAI API, admin routes, health). Port 0 picks one.
    #[arg(long, env = "LORAPLANE_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http_addr: SocketAddr,
    /// Prometheus `/metrics` listen address, apart from the API so tenants cannot read other
    /// tenants' names in it. Loopback by default (port 0 picks one, printed in the listening
    /// line); in Kubernetes the operator sets `0.0.0.0:9400` for the PodMonitor.
    #[arg(long, env = "LORAPLANE_METRICS_ADDR", default_value = "127.0.0.1:0")]
    pub metrics_addr: SocketAddr,
    /// What identifies an adapter in `vllm:lora_requests_info`: its `name`, or an opaque `id`.
    #[arg(
        long,
        env = "LORAPLANE_METRICS_ADAPTER_IDENTITY",
        value_enum,
        default_value = "name"
    )]
    pub metrics_adapter_identity: AdapterIdentity,
    /// How long a drain (SIGTERM) waits for in-flight requests: `30s`, `2m`, `500ms`.
    #[arg(long, env = "LORAPLANE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Who may call.
#[derive(Debug, Clone, clap::Args)]
pub struct TenancyArgs {
    /// Tenants, their API-key SHA-256 hashes and limits (JSON, or TOML for `.toml`). Without
    /// it (and until `Admin/SetTenants`), every caller is tenant `default`.
    #[arg(long, env = "LORAPLANE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Hex SHA-256 of the admin token.
    #[arg(
        long,
        env = "LORAPLANE_ADMIN_TOKEN_SHA256",
        conflicts_with = "admin_token_file"
    )]
    pub admin_token_sha256: Option<String>,
    /// A file holding the admin token itself (e.g. a mounted Secret); only its hash is kept.
    #[arg(long, env = "LORAPLANE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Adapters and their caches.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArgs {
    /// Preload every PEFT adapter directory in this directory (tenant `default`, named after
    /// the directory); or under an `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` or `pvc://claim/dir` (each sub-prefix or subdirectory holding an
    /// `adapter_config.json`).
    #[arg(long, env = "LORAPLANE_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// Largest adapter rank accepted.
    #[arg(long, env = "LORAPLANE_MAX_ADAPTER_RANK", default_value_t = 64)]
    pub max_adapter_rank: usize,
    /// Largest `adapter_model.safetensors` accepted: `512MiB`, `1G`, bytes.
    #[arg(long, env = "LORAPLANE_MAX_ADAPTER_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_adapter_bytes: u64,
    /// Host-memory adapter cache bound.
    #[arg(long, env = "LORAPLANE_HOST_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub host_cache_bytes: u64,
}

/// The unified pool and the scheduler.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Where the model runs: `cpu`, or `cuda:N` (a binary built with `--features cuda`).
    #[arg(long, env = "LORAPLANE_DEVICE", default_value = "cpu", value_parser = crate::backend::device::parse_device)]
    pub device: Device,
    /// Compute dtype (`auto`, `float32`, `bfloat16`, `float16`). The CPU backend computes in
    /// f32 whatever the checkpoint stores (weights are upcast at load); GPU backends honour it.
    #[arg(long, env = "LORAPLANE_DTYPE", default_value = "auto", value_parser = ["auto", "float32", "bfloat16", "float16", "f32", "bf16", "f16"])]
    pub dtype: String,
    /// Share of the device's free memory (less the weights) for the unified pool on GPU
    /// backends, (0, 1]; used when neither `--pool-pages` nor `--pool-bytes` is given. On the
    /// CPU the pool defaults to 2 GiB.
    #[arg(long, env = "LORAPLANE_DEVICE_POOL_FRACTION", default_value_t = 0.9)]
    pub device_pool_fraction: f64,
    /// Pages in the unified pool (KV blocks and adapter weights). Default: 2 GiB of pages on
    /// the CPU, `--device-pool-fraction` of the GPU.
    #[arg(long, env = "LORAPLANE_POOL_PAGES", conflicts_with = "pool_bytes")]
    pub pool_pages: Option<usize>,
    /// Size the pool in bytes instead (divided by the model's page size).
    #[arg(long, env = "LORAPLANE_POOL_BYTES", value_parser = parse_bytes)]
    pub pool_bytes: Option<u64>,
    /// Tokens per KV page.
    #[arg(long, env = "LORAPLANE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Tokens computed per engine step over all sequences.
    #[arg(long, env = "LORAPLANE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Largest prefill chunk of one sequence in one step.
    #[arg(long, env = "LORAPLANE_MAX_PREFILL_CHUNK", default_value_t = 512)]
    pub max_prefill_chunk: usize,
    /// Sequences running at once.
    #[arg(long, env = "LORAPLANE_MAX_RUNNING", default_value_t = 128)]
    pub max_running: usize,
    /// Reuse the KV blocks of shared prompt prefixes (`off`, or `per-tenant`: within a tenant
    /// and a request's `cache_salt`, for the same adapter weights).
    #[arg(long, env = "LORAPLANE_PREFIX_CACHE", value_enum, default_value_t = PrefixCacheMode::PerTenant)]
    pub prefix_cache: PrefixCacheMode,
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, clap::Args)]
pub struct RequestArgs {
    /// `max_tokens` of requests that give none (capped by the context left).
    #[arg(long, env = "LORAPLANE_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Largest request body or gRPC message.
    #[arg(long, env = "LORAPLANE_MAX_REQUEST_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,
    /// Most stop strings per request.
    #[arg(long, env = "LORAPLANE_MAX_STOP_STRINGS", default_value_t = 16)]
    pub max_stop_strings: usize,
    /// Longest stop string, bytes.
    #[arg(long, env = "LORAPLANE_MAX_STOP_STRING_BYTES", default_value_t = 256)]
    pub max_stop_string_bytes: usize,
}

/// Where adapter (and model) sources may come from.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Directories local adapter paths must stay inside (comma-separated or repeated).
    #[arg(long, env = "LORAPLANE_ADAPTER_ROOTS", value_delimiter = ',')]
    pub adapter_roots: Vec<PathBuf>,
    /// Where downloaded sources are kept (default: a `loraplane-sources` temp directory).
    #[arg(long, env = "LORAPLANE_SOURCE_CACHE_DIR")]
    pub source_cache_dir: Option<PathBuf>,
    /// Most bytes one source may download.
    #[arg(long, env = "LORAPLANE_SOURCE_MAX_BYTES", default_value = "4GiB", value_parser = parse_bytes)]
    pub source_max_bytes: u64,
    /// Time budget to fetch one source.
    #[arg(long, env = "LORAPLANE_SOURCE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub source_timeout: Duration,
    /// Let `https://` sources reach loopback, private and link-local addresses.
    #[arg(long, env = "LORAPLANE_ALLOW_PRIVATE_NETWORKS")]
    pub allow_private_networks: bool,
    /// Hosts exempt from the private-address rule (comma-separated or repeated).
    #[arg(long, env = "LORAPLANE_ALLOWED_PRIVATE_HOSTS", value_delimiter = ',')]
    pub allowed_private_hosts: Vec<String>,
    /// Accept plain `http://` sources.
    #[arg(long, env = "LORAPLANE_ALLOW_HTTP_SOURCES")]
    pub allow_http_sources: bool,
    /// The Hugging Face Hub endpoint (falls back to `HF_ENDPOINT`, then the public Hub).
    #[arg(long, env = "LORAPLANE_HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,
    /// A file holding the Hub token (falls back to `HF_TOKEN`).
    #[arg(long, env = "LORAPLANE_HF_TOKEN_FILE")]
    pub hf_token_file: Option<PathBuf>,
    /// A PEM bundle of extra CAs trusted by `https://`, `s3://`, `gs://` and `az://` sources
    /// (falls back to `SSL_CERT_FILE`); the public roots stay trusted.
    #[arg(long, env = "LORAPLANE_SOURCE_CA_FILE")]
    pub source_ca_file: Option<PathBuf>,
    /// An AWS shared-credentials file (`[default]` profile) for `s3://` sources, read at every
    /// fetch; without it the `AWS_*` environment (or the instance's role) is used.
    #[arg(long, env = "LORAPLANE_S3_CREDENTIALS_FILE")]
    pub s3_credentials_file: Option<PathBuf>,
    /// Where PersistentVolumeClaims are mounted (`<dir>/<claim>`) for `pvc://` sources.
    #[arg(long, env = "LORAPLANE_PVC_MOUNT_DIR")]
    pub pvc_mount_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// `json` (one object per line, for log pipelines) or `text`.
    #[arg(long, env = "LORAPLANE_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// A tracing filter: `info`, `debug`, `loraplane_agent=debug,info`.
    #[arg(long, env = "LORAPLANE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Disagg(#[from] DisaggConfigError),
    #[error("--model is required")]
    MissingModel,
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl ConfigError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Disagg(e) => e.kind(),
            ConfigError::MissingModel => "missing_model",
            ConfigError::Invalid { .. } => "invalid",
            ConfigError::File { .. } => "file",
            ConfigError::Auth(e) => e.kind(),
        }
    }
}

/// The CPU pool when no size is given. A byte budget, not a page count: a page's size depends
/// on the model, and the pool must hold many adapters beside the KV cache — S-LoRA's point. A
/// fixed 4096 pages was 128 MiB for the `small` fixture, room for about six of its adapters,
/// which capped a 16-adapter batch at a handful of sequences. The memory is reserved, not
/// touched: pages are committed by the OS as the pool uses them.
pub const DEFAULT_CPU_POOL_BYTES: u64 = 2 << 30;

/// How big the pool is, as configured: pages, bytes, or a share of the device's memory. It
/// becomes a page count once, in `serve`, when the model's page size and the device's free
/// memory are known; until then there is no page count at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolSize {
    /// `--pool-pages`.
    Pages(usize),
    /// `--pool-bytes` (or [`DEFAULT_CPU_POOL_BYTES`] on the CPU when nothing is given): divided
    /// by the model's page size.
    Bytes(u64),
    /// `--device-pool-fraction` of a GPU's free memory, less the weights.
    DeviceFraction(f64),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub role: Role,
    pub disagg: DisaggConfig,
    pub model: String,
    pub served_model_name: Option<String>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics_adapter_identity: AdapterIdentity,
    pub drain_timeout: Duration,
    pub tenants: Vec<TenantSpec>,
    pub admin: AdminAuth,
    pub adapters_dir: Option<PathBuf>,
    /// The engine's settings but the pool's size, which [`ServeConfig::engine_config`] adds.
    /// Private so that nothing reads a page count before the pool is resolved.
    engine: EngineConfig,
    pub pool: PoolSize,
    pub device: Device,
    /// `--dtype` as given (`auto` resolves against the checkpoint at start-up).
    pub dtype: String,
    pub bounds: RequestBounds,
    pub sources: SourceOptions,
    pub log_format: LogFormat,
    pub log_level: String,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

fn read_secret(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

impl ServeConfig {
    /// The engine's configuration for a pool of `num_pages` pages (the resolved [`PoolSize`]).
    pub fn engine_config(&self, num_pages: usize) -> EngineConfig {
        EngineConfig {
            num_pages,
            ..self.engine.clone()
        }
    }

    /// Tokens per KV page (`--block-size`).
    pub fn block_size(&self) -> usize {
        self.engine.block_size
    }

    /// Sequences running at once (`--max-running`).
    pub fn max_running(&self) -> usize {
        self.engine.max_running
    }
}

impl ServeArgs {
    /// Validates the flags. `env` reads the conventional variables the flags fall back on
    /// (`HF_ENDPOINT`, `HF_TOKEN`, `SSL_CERT_FILE`, and the object stores' variables:
    /// [`crate::sources::s3::ENVIRONMENT`], [`crate::sources::gcs::ENVIRONMENT`],
    /// [`crate::sources::azure::ENVIRONMENT`]); pass `|k| std::env::var(k).ok()` in the binary.
    ///
    /// Errors: an unsupported role, a missing model, out-of-range sizes, unreadable key files.
    pub fn validate(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ServeConfig, ConfigError> {
        let role = self.server.role;
        let disagg = self.disagg.validate(role)?;
        let model = self.server.model.ok_or(ConfigError::MissingModel)?;
        let e = &self.engine;
        for (flag, v) in [
            ("block-size", e.block_size),
            ("max-batch-tokens", e.max_batch_tokens),
            ("max-prefill-chunk", e.max_prefill_chunk),
            ("max-running", e.max_running),
        ] {
            if v == 0 {
                return Err(invalid(flag, "must be at least 1"));
            }
        }
        if !(e.device_pool_fraction > 0.0 && e.device_pool_fraction <= 1.0) {
            return Err(invalid("device-pool-fraction", "must be in (0, 1]"));
        }
        let pool = match (e.pool_pages, e.pool_bytes) {
            (Some(0), _) => return Err(invalid("pool-pages", "must be at least 1")),
            (Some(p), _) => PoolSize::Pages(p),
            (None, Some(b)) => PoolSize::Bytes(b),
            (None, None) if e.device != Device::Cpu => {
                PoolSize::DeviceFraction(e.device_pool_fraction)
            }
            (None, None) => PoolSize::Bytes(DEFAULT_CPU_POOL_BYTES),
        };
        if e.pool_pages.is_some_and(|p| p > u32::MAX as usize) {
            return Err(invalid("pool-pages", "must fit in 32 bits"));
        }
        let r = &self.requests;
        if r.default_max_tokens == 0 {
            return Err(invalid("default-max-tokens", "must be at least 1"));
        }
        if r.max_request_bytes < 1024 {
            return Err(invalid("max-request-bytes", "must be at least 1KiB"));
        }
        let usize_of = |flag, v: u64| usize::try_from(v).map_err(|_| invalid(flag, "too large"));
        let tenants = match &self.tenancy.api_keys_file {
            Some(path) => auth::load_tenants_file(path)?,
            None => Vec::new(),
        };
        let admin = match (
            &self.tenancy.admin_token_sha256,
            &self.tenancy.admin_token_file,
        ) {
            (Some(h), _) => AdminAuth::from_sha256_hex(h)?,
            (None, Some(path)) => AdminAuth::from_token(&read_secret(path)?)?,
            (None, None) => AdminAuth::disabled(),
        };
        auth::check_no_admin_key(&tenants, &admin)?;
        let s = self.sources;
        let mut sources = SourceOptions::new(
            s.source_cache_dir
                .unwrap_or_else(|| std::env::temp_dir().join("loraplane-sources")),
        );
        sources.local_roots = s.adapter_roots;
        sources.max_bytes = s.source_max_bytes;
        sources.timeout = s.source_timeout;
        sources.allow_private_networks = s.allow_private_networks;
        sources.allowed_private_hosts = s.allowed_private_hosts;
        sources.allow_http = s.allow_http_sources;
        if let Some(endpoint) = s.hf_endpoint.or_else(|| env("HF_ENDPOINT")) {
            sources.hf_endpoint = endpoint.trim_end_matches('/').to_owned();
        }
        sources.hf_token = match s.hf_token_file {
            Some(path) => Some(read_secret(&path)?),
            None => env("HF_TOKEN").filter(|t| !t.is_empty()),
        };
        let ca_file = match s.source_ca_file {
            Some(path) => Some((path, "--source-ca-file")),
            None => env("SSL_CERT_FILE")
                .filter(|p| !p.is_empty())
                .map(|p| (PathBuf::from(p), "SSL_CERT_FILE")),
        };
        if let Some((path, from)) = ca_file {
            sources.ca = Some(CaBundle::read(&path).map_err(|reason| ConfigError::File {
                path,
                reason: format!("{reason} (the CA bundle of {from})"),
            })?);
        }
        sources.s3.settings =
            StoreSettings::from_env(crate::sources::s3::ENVIRONMENT, &env).settings;
        sources.gcs = StoreSettings::from_env(crate::sources::gcs::ENVIRONMENT, &env);
        for var in crate::sources::gcs::CREDENTIAL_FILES {
            if let Some(path) = env(var).filter(|p| !p.is_empty()) {
                // Checked now so a typo stops the agent; read again at every fetch (rotation).
                std::fs::read(&path).map_err(|e| ConfigError::File {
                    path: path.into(),
                    reason: format!("{e} (the GCS credentials of {var})"),
                })?;
            }
        }
        sources.azure = StoreSettings::from_env(crate::sources::azure::ENVIRONMENT, &env);
        if let Some(path) = s.s3_credentials_file {
            // Checked now so a typo stops the agent; read again at every fetch (rotation).
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            crate::sources::s3::parse_credentials(&text).map_err(|reason| ConfigError::File {
                path: path.clone(),
                reason,
            })?;
            sources.s3.credentials_file = Some(path);
        }
        sources.pvc_mount_dir = s.pvc_mount_dir;
        let a = &self.adapters;
        let engine = EngineConfig {
            block_size: e.block_size,
            // Never read: `engine_config` sets it from the resolved pool.
            num_pages: 0,
            max_batch_tokens: e.max_batch_tokens,
            max_prefill_chunk: e.max_prefill_chunk,
            max_running: e.max_running,
            host_cache_bytes: usize_of("host-cache-bytes", a.host_cache_bytes)?,
            adapter_limits: AdapterLimits {
                max_rank: a.max_adapter_rank,
                max_bytes: a.max_adapter_bytes,
            },
            prefix_caching: e.prefix_cache.into(),
            observer: None,
        };
        Ok(ServeConfig {
            role,
            disagg,
            model,
            served_model_name: self.server.served_model_name,
            grpc_addr: self.server.grpc_addr,
            http_addr: self.server.http_addr,
            metrics_addr: self.server.metrics_addr,
            metrics_adapter_identity: self.server.metrics_adapter_identity,
            drain_timeout: self.server.drain_timeout,
            tenants,
            admin,
            adapters_dir: self.adapters.adapters,
            engine,
            pool,
            device: e.device,
            dtype: e.dtype.clone(),
            bounds: RequestBounds {
                default_max_tokens: r.default_max_tokens,
                max_stop_strings: r.max_stop_strings,
                max_stop_string_bytes: r.max_stop_string_bytes,
                max_request_bytes: usize_of("max-request-bytes", r.max_request_bytes)?,
                ..RequestBounds::default()
            },
            sources,
            log_format: self.logging.log_format,
            log_level: self.logging.log_level,
        })
    }
}

fn file_error(path: &Path, reason: impl Into<String>) -> clap::Error {
    clap::Error::raw(
        clap::error::ErrorKind::InvalidValue,
        format!("{}: {}\n", path.display(), reason.into()),
    )
}

/// Reads a config file into key → value (TOML, or JSON for `.json`).
fn read_config_file(path: &Path) -> Result<BTreeMap<String, serde_json::Value>, clap::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| file_error(path, e.to_string()))
    } else {
        toml::from_str(&text).map_err(|e| file_error(path, e.to_string()))
    }
}

/// Turns the file's entries into arguments for the flags the command line and the
/// environment left unset.
fn file_args(
    path: &Path,
    cmd: &clap::Command,
    matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, clap::Error> {
    let mut out = Vec::new();
    for (key, value) in read_config_file(path)? {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| file_error(path, format!("unknown key {key:?}")))?;
        let id = arg.get_id().as_str();
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let scalar = |v: &serde_json::Value| -> Result<String, clap::Error> {
            match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                serde_json::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(file_error(
                    path,
                    format!("{key:?} must be a string, number or boolean"),
                )),
            }
        };
        match (arg.get_action(), &value) {
            (ArgAction::SetTrue, serde_json::Value::Bool(true)) => {
                out.push(format!("--{long}").into())
            }
            (ArgAction::SetTrue, serde_json::Value::Bool(false)) => {}
            (ArgAction::SetTrue, _) => {
                return Err(file_error(path, format!("{key:?} must be true or false")));
            }
            (_, serde_json::Value::Array(items)) => {
                for item in items {
                    out.push(format!("--{long}={}", scalar(item)?).into());
                }
            }
            (_, v) => out.push(format!("--{long}={}", scalar(v)?).into()),
        }
    }
    Ok(out)
}

/// Parses the command line of a CLI whose `serve` subcommand takes [`ServeArgs`], applying
/// `serve --config FILE` underneath the command line and environment.
///
/// Errors: clap's (usage, invalid values, unknown config keys); the caller `exit()`s on them.
pub fn parse_cli<P: CommandFactory + FromArgMatches>(
    argv: Vec<OsString>,
) -> Result<P, clap::Error> {
    let matches = P::command().try_get_matches_from(&argv)?;
    let extra = match matches.subcommand() {
        Some(("serve", sub)) => match sub.get_one::<PathBuf>("config") {
            Some(path) => {
                let cmd = P::command();
                let serve = cmd
                    .find_subcommand("serve")
                    .ok_or_else(|| file_error(path, "no serve subcommand"))?;
                file_args(path, serve, sub)?
            }
            None => Vec::new(),
        },
        _ => Vec::new(),
    };
    if extra.is_empty() {
        return P::from_arg_matches(&matches);
    }
    let mut argv = argv;
    argv.extend(extra);
    let matches = P::command().try_get_matches_from(&argv)?;
    P::from_arg_matches(&matches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        Serve(Box<ServeArgs>),
    }

    fn serve(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut v: Vec<OsString> = vec!["agent".into(), "serve".into()];
        v.extend(argv.iter().map(OsString::from));
        parse_cli::<Cli>(v).map(|c| match c.cmd {
            Cmd::Serve(a) => *a,
        })
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("3G"), Ok(3_000_000_000));
        assert!(parse_bytes("1XB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn config_file_sits_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "model = \"/m\"\nmax_running = 7\nblock-size = 8\nallow_private_networks = true\nadapter_roots = [\"/a\", \"/b\"]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let a = serve(&["--config", f, "--max-running", "3"]).unwrap();
        assert_eq!(a.server.model.as_deref(), Some("/m"));
        assert_eq!(a.engine.max_running, 3, "the flag wins over the file");
        assert_eq!(a.engine.block_size, 8);
        assert!(a.sources.allow_private_networks);
        assert_eq!(a.sources.adapter_roots.len(), 2);

        std::fs::write(&file, "no_such_flag = 1\n").unwrap();
        let e = serve(&["--config", f]).unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");

        let json = dir.path().join("agent.json");
        std::fs::write(&json, r#"{"model": "/j", "drain-timeout": "5s"}"#).unwrap();
        let a = serve(&["--config", json.to_str().unwrap()]).unwrap();
        assert_eq!(a.server.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn object_store_variables_are_read_and_a_missing_credentials_file_stops_the_agent() {
        let vars = |k: &str| match k {
            "AZURE_STORAGE_ACCOUNT_NAME" => Some("acct".to_owned()),
            "AZURE_STORAGE_ACCOUNT_KEY" => Some("c2VjcmV0".to_owned()),
            "GOOGLE_SKIP_SIGNATURE" => Some("true".to_owned()),
            "AWS_REGION" => Some("eu-west-1".to_owned()),
            _ => None,
        };
        let c = serve(&["--model", "/m"]).unwrap().validate(vars).unwrap();
        let s = &c.sources;
        assert_eq!(
            s.azure.settings,
            [
                ("azure_storage_account_name".to_owned(), "acct".to_owned()),
                (
                    "azure_storage_account_key".to_owned(),
                    "c2VjcmV0".to_owned()
                )
            ]
        );
        assert_eq!(
            s.gcs.settings,
            [("google_skip_signature".to_owned(), "true".to_owned())]
        );
        assert_eq!(
            s.s3.settings,
            [("aws_region".to_owned(), "eu-west-1".to_owned())]
        );
        assert!(!format!("{s:?}").contains("c2VjcmV0"), "a key in Debug");

        let missing = |k: &str| {
            (k == "GOOGLE_APPLICATION_CREDENTIALS").then(|| "/no/such/adc.json".to_owned())
        };
        let e = serve(&["--model", "/m"])
            .unwrap()
            .validate(missing)
            .unwrap_err();
        assert!(
            e.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS"),
            "{e}"
        );
    }

    #[test]
    fn roles_other_than_unified_are_refused_clearly() {
        let a = serve(&["--model", "/m", "--role", "decode"]).unwrap();
        let e = a.validate(|_| None).unwrap_err();
        assert!(
            e.to_string()
                .contains("--cluster-token-file is required for --role decode"),
            "{e}"
        );
        let a = serve(&["--model", "/m", "--pool-bytes", "1MiB"]).unwrap();
        let c = a
            .validate(|k| (k == "HF_ENDPOINT").then(|| "https://mirror.example/".into()))
            .unwrap();
        assert_eq!(c.pool, PoolSize::Bytes(1 << 20));
        assert_eq!(c.sources.hf_endpoint, "https://mirror.example");
        assert!(serve(&["--model", "/m", "--pool-bytes", "1MiB", "--pool-pages", "3"]).is_err());
    }
}
