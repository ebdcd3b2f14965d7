//! `loraplane-agent serve`: starts the engine, preloads adapters, wires every surface (gRPC
//! `Inference` + `Admin` + health + reflection on one port; the OpenAI API, admin routes and
//! health on the second; Prometheus `/metrics` on a third, loopback by default, so tenants
//! cannot read it), and runs until a signal, then drains.
//!
//! Start-up order: logging → model (a directory, or a source URI fetched through `sources`)
//! → engine → tenants → adapter preload → listeners. When both listeners are bound the agent
//! prints ONE machine-readable line on stdout —
//! `{"event":"listening","grpc":"ADDR","http":"ADDR","metrics":"ADDR"}` — so a supervisor or a test that asked
//! for port 0 learns the real ports; everything else is logged to stderr.
//!
//! Shutdown: the first SIGTERM or SIGINT starts a drain (readiness and gRPC health fail at
//! once, new requests get HTTP 503 + `Retry-After` / gRPC `UNAVAILABLE`), waits up to
//! `--drain-timeout` for in-flight requests, ends those still running with an explicit error
//! event, then stops the servers and returns (exit 0) — at most [`EXIT_BOUND`] (1 s) after
//! the drain timeout. A second signal stops waiting. `Admin/Drain` starts the same drain without exiting.

mod disagg;
mod engine;
mod process;
mod remote_adapters;

pub use process::{Logged, exit_code, run_process};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::admin::{self, AdminService, AdminState};
use crate::api::auth::Tenants;
use crate::api::grpc;
use crate::api::http;
use crate::api::lifecycle::Lifecycle;
use crate::api::service::AgentService;
use crate::config::{LogFormat, ServeConfig};
use crate::engine::actor::EngineHandle;
use crate::lora::ids::AdapterKey;
use crate::metrics::Metrics;

/// How long requests still running at the drain timeout get to write their last (error)
/// event after they are ended.
const END_FLUSH: Duration = Duration::from_millis(250);
/// How long the servers then get to close their connections. With [`END_FLUSH`], the agent
/// exits at most [`EXIT_BOUND`] after `--drain-timeout`.
const SERVER_STOP_GRACE: Duration = Duration::from_millis(750);
/// `END_FLUSH + SERVER_STOP_GRACE`: a signalled agent exits within `--drain-timeout` plus this.
pub const EXIT_BOUND: Duration = Duration::from_secs(1);
const _: () =
    assert!(END_FLUSH.as_millis() + SERVER_STOP_GRACE.as_millis() == EXIT_BOUND.as_millis());
/// The gRPC service name health is reported for (besides the overall "").
const INFERENCE_SERVICE: &str = "loraplane.v1.Inference";

/// Installs the global tracing subscriber (stderr; JSON or text).
pub fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .with_context(|| format!("invalid --log-level {level:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

/// Resolves `--model` to a local checkpoint directory: a path as is, a URI through the
/// sources module (downloads are cached under `--source-cache-dir`).
async fn model_dir(config: &ServeConfig) -> anyhow::Result<PathBuf> {
    if config.model.contains("://") {
        tracing::info!(source = %crate::sources::redact(&config.model), "fetching the model");
        return crate::sources::resolve_model(&config.model, &config.sources)
            .await
            .context("fetching --model");
    }
    Ok(PathBuf::from(&config.model))
}

/// Accepted gRPC connections with TCP_NODELAY: tokens and KV chunks are written as they are
/// produced, and Nagle's algorithm would otherwise delay each small write by an ACK round trip.
pub fn nodelay_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The served name of the base model: the flag, else the directory's (or repository's) name.
fn served_name(config: &ServeConfig, dir: &Path) -> String {
    if let Some(n) = &config.served_model_name {
        return n.clone();
    }
    let from_uri = config
        .model
        .split_once("://")
        .map(|(_, rest)| rest.split('@').next().unwrap_or(rest).trim_end_matches('/'))
        .and_then(|r| r.rsplit('/').next())
        .filter(|s| !s.is_empty());
    from_uri
        .map(str::to_owned)
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "base".to_owned())
}

/// Loads every PEFT adapter directory in `dir` for tenant `default`. A bad adapter is logged
/// and skipped; it never stops the agent.
async fn preload_adapters(handle: &EngineHandle, dir: &Path) -> anyhow::Result<usize> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading --adapters {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(crate::sources::ADAPTER_CONFIG).is_file())
        .collect();
    entries.sort();
    let mut loaded = 0;
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = std::future::ready(Ok::<_, std::convert::Infallible>(path));
        if preload_one(handle, &name, "adapter directory", dir).await {
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// Preloads one `--adapters` adapter for tenant `default`; returns whether it loaded. A name
/// that is not a valid adapter name is skipped with a warning naming it an `item` (before
/// `dir` is awaited, so nothing is fetched for it); a failure to get `dir` or to load it is
/// logged.
async fn preload_one<E: std::fmt::Display>(
    handle: &EngineHandle,
    name: &str,
    item: &str,
    dir: impl Future<Output = Result<PathBuf, E>>,
) -> bool {
    if !admin::is_valid_name(name) {
        tracing::warn!(adapter = %name, "skipping an {item} whose name is not a valid adapter name");
        return false;
    }
    let dir = match dir.await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(adapter = %name, error = %e, "adapter preload failed");
            return false;
        }
    };
    let key = AdapterKey::new("default", name);
    match handle.load_adapter(key, dir, None, false).await {
        Ok(a) => {
            tracing::info!(adapter = %name, rank = a.rank, digest = %crate::lora::ids::digest_or_none(a.digest), "adapter preloaded");
            true
        }
        Err(e) => {
            tracing::error!(adapter = %name, error = %e, "adapter preload failed");
            false
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("ctrl-c")
    }
}

/// Runs the agent until it has drained after a signal.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let metrics = Metrics::with_adapter_identity(config.metrics_adapter_identity)
        .context("building the metrics registry")?;
    let dir = model_dir(&config).await?;
    let handle = engine::start(&config, &dir, &metrics).await?;
    let served = served_name(&config, &dir);

    let tenants = Tenants::new(config.tenants.clone())?;
    metrics.tenants_known(&tenants.ids());
    if tenants.is_open() {
        tracing::info!("no API keys configured: serving a single `default` tenant to every caller");
    } else {
        tracing::info!(tenants = tenants.ids().len(), "API keys loaded");
    }
    if !config.admin.is_configured() {
        tracing::warn!("no admin credential configured: the admin API refuses every call");
    }
    if let Some(adapters) = &config.adapters_dir {
        let n = match adapters.to_str().filter(|s| remote_adapters::is_uri(s)) {
            Some(uri) => remote_adapters::preload(&handle, uri, &config.sources).await?,
            None => preload_adapters(&handle, adapters).await?,
        };
        tracing::info!(adapters = n, dir = %adapters.display(), "adapters preloaded for tenant `default`");
    }

    let lifecycle = Lifecycle::new(config.drain_timeout);
    let max_lora = config.max_running();
    // A vLLM block holds every layer; a pool page holds one layer of one block.
    let layers = handle.model_config().num_layers.max(1);
    metrics.set_cache_config(config.block_size(), handle.num_pages() / layers, max_lora);
    let (stop_tx, stop_rx) = watch::channel(false);
    let role = disagg::start(&config, &handle, &metrics, &lifecycle, stop_rx.clone()).await?;
    let service = AgentService::new(
        handle.clone(),
        tenants.clone(),
        lifecycle.clone(),
        metrics.clone(),
        config.bounds.clone(),
        served.clone(),
        max_lora,
    );
    let service = match role.router.clone() {
        Some(router) => service.with_router(router),
        None => service,
    };
    let service = if config.role == crate::disagg::config::Role::Prefill {
        service.prefill_only()
    } else {
        service
    };

    // ---- Admin surfaces (api/admin.rs): gRPC `loraplane.v1.Admin` and the vLLM routes. ----
    let admin_state = Arc::new(
        AdminState::new(
            handle.clone(),
            tenants.clone(),
            config.admin.clone(),
            lifecycle.clone(),
            config.sources.clone(),
            config.role,
            &served,
        )
        .with_max_request_bytes(config.bounds.max_request_bytes),
    );
    let admin_grpc = AdminService::new(admin_state.clone()).into_server();
    let admin_http = admin::admin_routes(admin_state);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(INFERENCE_SERVICE, ServingStatus::Serving)
        .await;

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", config.grpc_addr))?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding --http-addr {}", config.http_addr))?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", config.metrics_addr))?;
    let (grpc_addr, http_addr, metrics_addr): (SocketAddr, SocketAddr, SocketAddr) = (
        grpc_listener.local_addr()?,
        http_listener.local_addr()?,
        metrics_listener.local_addr()?,
    );

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (reflection_v1, reflection_v1alpha) =
        grpc::reflection_services().context("building gRPC reflection")?;
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(grpc::inference_server(service.clone()))
        .add_service(admin_grpc)
        .serve_with_incoming_shutdown(nodelay_incoming(grpc_listener), stopped(stop_rx.clone()));
    let app = http::app(service.clone(), admin_http);
    let http_server = crate::api::listener::serve(http_listener, app, stop_rx.clone());
    // Prometheus scrapes during the drain too: this listener stops with the others.
    let metrics_server = crate::api::listener::serve(
        metrics_listener,
        http::metrics_router(service.clone()),
        stop_rx,
    );

    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(http_server);
    let metrics_task = tokio::spawn(metrics_server);

    // Readiness follows the lifecycle, whoever starts the drain (a signal or Admin/Drain).
    {
        let (lifecycle, health, metrics) = (lifecycle.clone(), health.clone(), metrics.clone());
        tokio::spawn(async move {
            lifecycle.drain_started().await;
            metrics.set_draining(true);
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(INFERENCE_SERVICE, ServingStatus::NotServing)
                .await;
        });
    }

    tracing::info!(%grpc_addr, %http_addr, %metrics_addr, role = config.role.as_str(), model = %served, "serving");
    let mut listening = serde_json::json!({
        "event": "listening",
        "grpc": grpc_addr.to_string(),
        "http": http_addr.to_string(),
        "metrics": metrics_addr.to_string(),
    });
    if let Some(kv) = role.kv_addr {
        listening["kv"] = serde_json::Value::String(kv.to_string());
    }
    println!("{listening}");

    let mut grpc_task = grpc_task;
    let mut http_task = http_task;
    let which = tokio::select! {
        s = signal() => s?,
        r = &mut grpc_task => anyhow::bail!("the gRPC server stopped: {r:?}"),
        r = &mut http_task => anyhow::bail!("the HTTP server stopped: {r:?}"),
    };
    let first = lifecycle.start_drain();
    tracing::info!(
        signal = which,
        in_flight = lifecycle.in_flight(),
        timeout_s = config.drain_timeout.as_secs_f64(),
        already_draining = !first,
        "draining"
    );
    let remaining = tokio::select! {
        n = lifecycle.wait_idle(config.drain_timeout) => n,
        _ = signal() => {
            tracing::warn!("second signal: stopping without waiting for in-flight requests");
            lifecycle.in_flight()
        }
    };
    if remaining > 0 {
        tracing::warn!(
            in_flight = remaining,
            "drain timeout reached with requests still in flight: ending them with an error"
        );
        // Each gets a last event (HTTP: an error event and `[DONE]`; gRPC: finish reason
        // ERROR and the message) rather than a connection cut at exit.
        lifecycle.end_in_flight();
        let left = lifecycle.wait_idle(END_FLUSH).await;
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "requests still writing their last event at exit"
            );
        }
    } else {
        tracing::info!("drained: no request in flight");
    }
    let _ = stop_tx.send(true);
    let kv_task = role.kv_task;
    let servers = async {
        let (g, h, m) = tokio::join!(grpc_task, http_task, metrics_task);
        if let Some(kv) = kv_task
            && let Ok(Err(e)) = kv.await
        {
            tracing::error!(error = %e, "KV-transfer server error");
        }
        if let Ok(Err(e)) = g {
            tracing::error!(error = %e, "gRPC server error");
        }
        if let Err(e) = h.and(m) {
            tracing::error!(error = %e, "HTTP server task failed");
        }
    };
    if tokio::time::timeout(SERVER_STOP_GRACE, servers)
        .await
        .is_err()
    {
        tracing::warn!("servers did not close their connections in time; exiting anyway");
    }
    tracing::info!("stopped");
    Ok(())
}
