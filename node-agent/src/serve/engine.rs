//! Starting the engine for `serve`: the checkpoint's `config.json` is read once here and
//! handed to everything that needs it (the dtype, the pool's page size, the model itself), the
//! pool's [`PoolSize`] becomes a page count once ([`pool_pages`]) when the backend is open, and
//! the model is loaded off the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use crate::backend::Backend;
use crate::backend::device::{
    ComputeDtype, WithBackend, pages_for_fraction, parse_dtype, weight_bytes_estimate, with_backend,
};
use crate::config::{PoolSize, ServeConfig};
use crate::engine::actor::EngineHandle;
use crate::engine::core::{Engine, EngineConfig, page_bytes};
use crate::metrics::{Metrics, StepMetrics};
use crate::model::config::ModelConfig;

/// Pages of `page_bytes` that `pool` means: the one place `--pool-pages`, `--pool-bytes` and
/// `--device-pool-fraction` become a page count. `free_memory` is what the backend reports
/// (GPUs do, the CPU does not); `weight_bytes` is asked for only by a device fraction.
///
/// # Errors
/// A pool smaller than one page, a device fraction on a backend that does not report its free
/// memory, or a fraction that leaves no room after the weights.
pub(super) fn pool_pages(
    pool: PoolSize,
    page_bytes: usize,
    free_memory: Option<usize>,
    weight_bytes: impl FnOnce() -> std::io::Result<u64>,
) -> anyhow::Result<usize> {
    let page_bytes = page_bytes as u64;
    let pages = match pool {
        PoolSize::Pages(pages) => pages,
        PoolSize::Bytes(bytes) => {
            let pages = bytes / page_bytes.max(1);
            anyhow::ensure!(
                pages >= 1,
                "--pool-bytes {bytes} is smaller than one page ({page_bytes} bytes)"
            );
            usize::try_from(pages.min(u64::from(u32::MAX)))?
        }
        PoolSize::DeviceFraction(fraction) => {
            let free = free_memory.context(
                "--device-pool-fraction: this backend does not report its free memory; \
                 give --pool-pages or --pool-bytes",
            )?;
            let weights = weight_bytes().context("reading the checkpoint")?;
            let pages = pages_for_fraction(free as u64, fraction, weights, page_bytes)?;
            tracing::info!(
                free_bytes = free,
                weight_bytes = weights,
                pool_pages = pages,
                "pool sized from --device-pool-fraction"
            );
            pages
        }
    };
    Ok(pages)
}

/// Starts the engine thread (loading the model off the async runtime).
pub(super) async fn start(
    config: &ServeConfig,
    dir: &Path,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<EngineHandle> {
    let model = ModelConfig::read(dir)?;
    let dtype = parse_dtype(&config.dtype, model.torch_dtype.as_deref())?;
    let device = config.device;
    let job = Spawn {
        dir: dir.to_owned(),
        model,
        dtype,
        pool: config.pool,
        engine: config.engine_config(0),
        metrics: metrics.clone(),
    };
    tracing::info!(%device, ?dtype, "loading the model");
    let started = tokio::task::spawn_blocking(move || with_backend(device, dtype, job))
        .await
        .context("the model loader panicked")?;
    let handle = started
        .map_err(anyhow::Error::from)
        .and_then(|spawned| spawned)
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

/// Sizes the pool on the opened backend, loads the model and starts the engine thread.
struct Spawn {
    dir: PathBuf,
    model: ModelConfig,
    dtype: ComputeDtype,
    pool: PoolSize,
    /// Everything but the page count, which [`pool_pages`] decides here.
    engine: EngineConfig,
    metrics: Arc<Metrics>,
}

impl WithBackend for Spawn {
    type Output = anyhow::Result<EngineHandle>;

    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let page_bytes = page_bytes(&self.model, self.engine.block_size);
        let num_pages = pool_pages(self.pool, page_bytes, backend.free_memory(), || {
            weight_bytes_estimate(&self.dir, self.model.torch_dtype.as_deref(), self.dtype)
        })?;
        let config = EngineConfig {
            num_pages,
            observer: Some(Arc::new(StepMetrics(self.metrics))),
            ..self.engine
        };
        let engine = Engine::with_model(backend, &self.dir, self.model, config)?;
        Ok(EngineHandle::start(engine)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_weights() -> std::io::Result<u64> {
        panic!("only a device fraction needs the weights' size")
    }

    #[test]
    fn every_pool_size_becomes_pages_here() {
        assert_eq!(
            pool_pages(PoolSize::Pages(7), 1024, None, no_weights).unwrap(),
            7
        );
        assert_eq!(
            pool_pages(PoolSize::Bytes(10 * 1024 + 5), 1024, None, no_weights).unwrap(),
            10
        );
        let e = pool_pages(PoolSize::Bytes(1000), 1024, None, no_weights).unwrap_err();
        assert!(e.to_string().contains("smaller than one page"), "{e}");
        // 1 MiB free, all of it, 256 KiB of weights: 768 KiB of 1 KiB pages.
        let pages = pool_pages(PoolSize::DeviceFraction(1.0), 1024, Some(1 << 20), || {
            Ok(256 << 10)
        });
        assert_eq!(pages.unwrap(), 768);
        let e = pool_pages(PoolSize::DeviceFraction(0.5), 1024, None, || Ok(0)).unwrap_err();
        assert!(
            e.to_string().contains("does not report its free memory"),
            "{e}"
        );
    }
}
