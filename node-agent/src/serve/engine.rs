//! Starting the engine for `serve`: the model is loaded on the configured device off the async
//! runtime, and the pool is sized from `--pool-pages`, `--pool-bytes` or
//! `--device-pool-fraction`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use crate::backend::device::{
    ComputeDtype, Device, WithBackend, checkpoint_dtype, pages_for_fraction, parse_dtype,
    weight_bytes_estimate, with_backend,
};
use crate::backend::{Backend, BackendError};
use crate::config::{PoolSize, ServeConfig};
use crate::engine::actor::EngineHandle;
use crate::engine::{EngineConfig, EngineError};
use crate::metrics::{Metrics, StepMetrics};

/// Starts the engine thread (loading the model off the async runtime).
pub(super) async fn start(
    config: &ServeConfig,
    dir: &Path,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<EngineHandle> {
    let mut engine = config.engine.clone();
    if let PoolSize::Bytes(bytes) = config.pool {
        let page_bytes = crate::engine::core::page_bytes(dir, engine.block_size)?;
        let pages = bytes / page_bytes as u64;
        anyhow::ensure!(
            pages >= 1,
            "--pool-bytes {bytes} is smaller than one page ({page_bytes} bytes)"
        );
        engine.num_pages = usize::try_from(pages.min(u64::from(u32::MAX)))?;
    }
    engine.observer = Some(Arc::new(StepMetrics(metrics.clone())));
    let dtype = parse_dtype(&config.dtype, checkpoint_dtype(dir).as_deref())?;
    let device = config.device;
    let fraction = match config.pool {
        PoolSize::DeviceFraction(f) => Some(f),
        PoolSize::Pages(_) | PoolSize::Bytes(_) => None,
    };
    tracing::info!(%device, ?dtype, "loading the model");
    let dir = dir.to_owned();
    let handle =
        tokio::task::spawn_blocking(move || spawn_engine(device, dtype, &dir, engine, fraction))
            .await
            .context("the model loader panicked")?
            .with_context(|| format!("loading the model on {device}"))?;
    let c = handle.model_config();
    tracing::info!(
        layers = c.num_layers,
        hidden = c.hidden_size,
        vocab = c.vocab_size,
        context = c.max_position_embeddings,
        pool_pages = handle.num_pages(),
        "engine started"
    );
    Ok(handle)
}

/// Loads the model in `dir` on `device` and starts the engine thread. With `pool_fraction`,
/// and a backend that reports its free memory, the pool gets that share of the device's free
/// memory less the weights ([`pages_for_fraction`]) instead of `config.num_pages`.
///
/// # Errors
/// As [`with_backend`] (wrapped in [`EngineError::Backend`]) and
/// [`EngineHandle::spawn`].
fn spawn_engine(
    device: Device,
    dtype: ComputeDtype,
    dir: &Path,
    config: EngineConfig,
    pool_fraction: Option<f64>,
) -> Result<EngineHandle, EngineError> {
    struct Spawn<'a> {
        dir: &'a Path,
        config: EngineConfig,
        dtype: ComputeDtype,
        pool_fraction: Option<f64>,
    }
    impl WithBackend for Spawn<'_> {
        type Output = Result<EngineHandle, EngineError>;
        fn run<B: Backend>(self, backend: B) -> Self::Output {
            let mut config = self.config;
            if let (Some(fraction), Some(free)) = (self.pool_fraction, backend.free_memory()) {
                let page_bytes = crate::engine::core::page_bytes(self.dir, config.block_size)?;
                let weights = weight_bytes_estimate(self.dir, self.dtype)
                    .map_err(|e| BackendError::Device(format!("reading the checkpoint: {e}")))?;
                config.num_pages =
                    pages_for_fraction(free as u64, fraction, weights, page_bytes as u64)?;
                tracing::info!(
                    free_bytes = free,
                    weight_bytes = weights,
                    pool_pages = config.num_pages,
                    "pool sized from --device-pool-fraction"
                );
            }
            EngineHandle::spawn(backend, self.dir, config)
        }
    }
    with_backend(
        device,
        dtype,
        Spawn {
            dir,
            config,
            dtype,
            pool_fraction,
        },
    )?
}
