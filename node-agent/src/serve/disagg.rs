//! The roles of disaggregated serving inside `serve`: a `prefill` agent serves `KvTransfer`
//! on `--kv-addr` (mutual TLS when configured, the cluster credential always); a `decode`
//! agent routes prompts to `--prefill-peers`. Both export the disaggregation metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::lifecycle::Lifecycle;
use crate::config::ServeConfig;
use crate::disagg::config::Role;
use crate::disagg::decode::DecodeRouter;
use crate::disagg::metrics::DisaggCollector;
use crate::disagg::prefill::PrefillService;
use crate::disagg::stats::DisaggStats;
use crate::disagg::transfer::WireLayout;
use crate::engine::actor::EngineHandle;
use crate::metrics::Metrics;
use crate::serve::nodelay_incoming;

/// What the role adds to the agent.
#[derive(Debug, Default)]
pub(super) struct RoleParts {
    pub router: Option<DecodeRouter>,
    pub kv_addr: Option<SocketAddr>,
    pub kv_task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

pub(super) async fn start(
    config: &ServeConfig,
    handle: &EngineHandle,
    metrics: &Arc<Metrics>,
    lifecycle: &Lifecycle,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<RoleParts> {
    if config.role == Role::Unified {
        return Ok(RoleParts::default());
    }
    let d = &config.disagg;
    let c = handle.model_config();
    let layout = WireLayout {
        num_layers: c.num_layers,
        block_size: config.block_size(),
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    anyhow::ensure!(
        d.decode.max_chunk_bytes >= layout.block_elems() * 4,
        "--kv-max-chunk-bytes {} is smaller than one KV page ({} bytes)",
        d.decode.max_chunk_bytes,
        layout.block_elems() * 4
    );
    let stats = Arc::new(DisaggStats::default());
    let collector =
        DisaggCollector::new(stats.clone(), config.role).context("disaggregation metrics")?;
    let queued = collector.queued_prefill_tokens.clone();
    metrics
        .register(Box::new(collector))
        .context("registering disaggregation metrics")?;
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            loop {
                match handle.stats().await {
                    Ok(s) => queued.store(s.queued_prefill_tokens as u64, Ordering::Relaxed),
                    Err(_) => return,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let token = d
        .cluster_token
        .clone()
        .context("the cluster credential is required")?;
    match config.role {
        Role::Unified => Ok(RoleParts::default()),
        Role::Prefill => {
            let service = PrefillService::new(
                handle.clone(),
                layout,
                token,
                Arc::new(config.sources.clone()),
                stats,
            )
            .with_drain({
                let lifecycle = lifecycle.clone();
                move || lifecycle.drain_ticket()
            });
            let listener = TcpListener::bind(d.kv_addr)
                .await
                .with_context(|| format!("binding --kv-addr {}", d.kv_addr))?;
            let kv_addr = listener.local_addr()?;
            let mut builder = crate::disagg::channel::server();
            if let Some(tls) = &d.tls {
                builder = builder.tls_config(tls.server()).context("KV channel TLS")?;
            }
            let mut stop = stop;
            let server = builder
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(nodelay_incoming(listener), async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            tracing::info!(%kv_addr, tls = d.tls.is_some(), "prefill role: KvTransfer listening");
            Ok(RoleParts {
                router: None,
                kv_addr: Some(kv_addr),
                kv_task: Some(tokio::spawn(server)),
            })
        }
        Role::Decode => {
            let router = DecodeRouter::start(handle.clone(), layout, d.decode.clone(), stats).await;
            tracing::info!(peers = ?router.peers().addresses(), "decode role: prefilling on remote peers");
            Ok(RoleParts {
                router: Some(router),
                kv_addr: None,
                kv_task: None,
            })
        }
    }
}
