//! `--adapters <uri>`: preloading every adapter under an `s3://`, `gs://` or `az://` prefix or
//! a `pvc://` directory, the remote counterpart of a local `--adapters` directory. Each adapter is named
//! after its sub-prefix or subdirectory, belongs to tenant `default`, and is fetched through the
//! same sources (cache, size cap, digest) as an admin load.

use anyhow::Context as _;

use crate::engine::actor::EngineHandle;
use crate::sources::{self, SourceOptions};

/// Whether `--adapters` names a URI rather than a local directory.
pub(super) fn is_uri(value: &str) -> bool {
    value.contains("://")
}

/// Preloads the adapters under `uri`; returns how many loaded. A listing failure stops the
/// agent (the flag is wrong); one adapter failing is logged and skipped, as for a local
/// directory.
pub(super) async fn preload(
    handle: &EngineHandle,
    uri: &str,
    opts: &SourceOptions,
) -> anyhow::Result<usize> {
    let listed = sources::list_adapters(uri, opts)
        .await
        .context("listing --adapters")?;
    let mut loaded = 0;
    for (name, adapter_uri) in listed {
        let dir = sources::resolve_adapter(&adapter_uri, None, opts);
        if super::preload_one(handle, &name, "adapter", dir).await {
            loaded += 1;
        }
    }
    Ok(loaded)
}
