//! `--adapters <uri>`: preloading every adapter under an `s3://` prefix or a `pvc://`
//! directory, the remote counterpart of a local `--adapters` directory. Each adapter is named
//! after its sub-prefix or subdirectory, belongs to tenant `default`, and is fetched through the
//! same sources (cache, size cap, digest) as an admin load.

use anyhow::Context as _;

use crate::api::admin;
use crate::engine::actor::EngineHandle;
use crate::lora::ids::AdapterKey;
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
        .with_context(|| "listing --adapters".to_owned())?;
    let mut loaded = 0;
    for (name, adapter_uri) in listed {
        if !admin::is_valid_name(&name) {
            tracing::warn!(adapter = %name, "skipping an adapter whose name is not a valid adapter name");
            continue;
        }
        let dir = match sources::resolve_adapter(&adapter_uri, None, opts).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(adapter = %name, error = %e, "adapter preload failed");
                continue;
            }
        };
        let key = AdapterKey::new("default", &name);
        match handle.load_adapter(key, dir, None, false).await {
            Ok(a) => {
                loaded += 1;
                tracing::info!(adapter = %name, source = %sources::redact(&adapter_uri), rank = a.rank, "adapter preloaded");
            }
            Err(e) => tracing::error!(adapter = %name, error = %e, "adapter preload failed"),
        }
    }
    Ok(loaded)
}
