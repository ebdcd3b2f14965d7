//! The agent configuration ConfigMap: one `agent.toml` whose keys are `loraplane-agent serve`
//! long flag names (the agent reads it with `--config`), shared by every role; the role and
//! the prefill peers differ per StatefulSet and are passed as arguments instead.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use loraplane_units::quantity::{self, QuantityError};
use toml::Value;

use super::{
    AgentParams, GRPC_PORT, HTTP_PORT, KV_PORT, METRICS_PORT, child_meta, common_labels,
    config_name,
};
use crate::crd::{BaseModel, ModelSource};

/// The ConfigMap key of the agent configuration file.
pub const CONFIG_KEY: &str = "agent.toml";
/// Where the ConfigMap is mounted in agent pods.
pub const CONFIG_DIR: &str = "/etc/loraplane";
/// Where the credentials Secret is mounted.
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/loraplane/agent";
/// Where the Hub token Secret is mounted (when the source names one).
pub const HF_TOKEN_DIR: &str = "/var/run/secrets/loraplane/hf";
/// The writable cache of downloaded sources (an emptyDir).
pub const CACHE_DIR: &str = "/var/cache/loraplane";
/// Where `pvc://<claim>/…` model and adapter sources are mounted (`<dir>/<claim>`; the
/// agents' `--pvc-mount-dir`).
pub const PVC_DIR: &str = "/models";

/// Why a spec cannot be turned into objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.{field}: {source}")]
    Quantity {
        field: &'static str,
        source: QuantityError,
    },
    #[error("spec.source.uri {0:?}: a pvc:// source needs a claim and a path (pvc://claim/path)")]
    PvcUri(String),
    #[error("spec.serving.{role}.autoscaling: {reason}")]
    Autoscaling { role: &'static str, reason: String },
}

impl SpecError {
    pub fn kind(&self) -> &'static str {
        match self {
            SpecError::Quantity { .. } => "invalid_quantity",
            SpecError::PvcUri(_) => "invalid_pvc_uri",
            SpecError::Autoscaling { .. } => "invalid_autoscaling",
        }
    }
}

/// A `pvc://claim/path` source split into the claim and the path inside it.
pub fn pvc_source(model: &BaseModel) -> Result<Option<(String, String)>, SpecError> {
    let Some(uri) = model.spec.source.uri.as_deref() else {
        return Ok(None);
    };
    let Some(rest) = uri.strip_prefix("pvc://") else {
        return Ok(None);
    };
    match rest.split_once('/') {
        Some((claim, path)) if !claim.is_empty() && !path.is_empty() => Ok(Some((
            claim.to_owned(),
            path.trim_start_matches('/').to_owned(),
        ))),
        _ => Err(SpecError::PvcUri(uri.to_owned())),
    }
}

/// The agent's `--model`: `hf://org/repo[@rev]`, a path for `file://` and `pvc://`, or the URI.
pub fn model_arg(model: &BaseModel) -> Result<String, SpecError> {
    let ModelSource {
        hugging_face, uri, ..
    } = &model.spec.source;
    if let Some(hf) = hugging_face {
        return Ok(match &hf.revision {
            Some(rev) => format!("hf://{}@{rev}", hf.repo),
            None => format!("hf://{}", hf.repo),
        });
    }
    if let Some((claim, path)) = pvc_source(model)? {
        return Ok(format!("{PVC_DIR}/{claim}/{path}"));
    }
    let uri = uri.clone().unwrap_or_default();
    Ok(match uri.strip_prefix("file://") {
        Some(path) => path.to_owned(),
        None => uri,
    })
}

/// The configuration file's entries (flag name → value), sorted, with `pvc-mount-dir` when
/// adapter claims are mounted.
pub fn agent_settings(
    model: &BaseModel,
    params: &AgentParams,
    adapter_claims: &BTreeSet<String>,
) -> Result<BTreeMap<String, Value>, SpecError> {
    let mut m = BTreeMap::new();
    let mut set = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    set("model", Value::String(model_arg(model)?));
    set(
        "served-model-name",
        Value::String(kube::ResourceExt::name_any(model)),
    );
    set("grpc-addr", Value::String(format!("0.0.0.0:{GRPC_PORT}")));
    set("http-addr", Value::String(format!("0.0.0.0:{HTTP_PORT}")));
    set(
        "metrics-addr",
        Value::String(format!("0.0.0.0:{METRICS_PORT}")),
    );
    set(
        "drain-timeout",
        Value::String(format!("{}ms", params.drain_timeout.as_millis())),
    );
    set(
        "admin-token-file",
        Value::String(format!(
            "{CREDENTIALS_DIR}/{}",
            super::secret::ADMIN_TOKEN_KEY
        )),
    );
    set(
        "cluster-token-file",
        Value::String(format!(
            "{CREDENTIALS_DIR}/{}",
            super::secret::CLUSTER_TOKEN_KEY
        )),
    );
    set("kv-addr", Value::String(format!("0.0.0.0:{KV_PORT}")));
    set(
        "source-cache-dir",
        Value::String(format!("{CACHE_DIR}/sources")),
    );
    set("log-format", Value::String("json".into()));
    // Only with claims to read: the setting would otherwise roll every agent for nothing.
    if !adapter_claims.is_empty() {
        set("pvc-mount-dir", Value::String(PVC_DIR.into()));
    }
    if let Some(dtype) = model.spec.dtype {
        set("dtype", Value::String(dtype.as_str().into()));
    }
    if let Some(hf) = &model.spec.source.hugging_face
        && hf.token_secret_ref.is_some()
    {
        set(
            "hf-token-file",
            Value::String(format!("{HF_TOKEN_DIR}/token")),
        );
    }
    if let Some(mem) = &model.spec.memory {
        if let Some(f) = mem.device_pool_fraction {
            set("device-pool-fraction", Value::Float(f));
        }
        if let Some(q) = &mem.host_adapter_cache_bytes {
            let bytes = quantity::to_bytes(&q.0).map_err(|source| SpecError::Quantity {
                field: "memory.hostAdapterCacheBytes",
                source,
            })?;
            set("host-cache-bytes", Value::String(bytes.to_string()));
        }
        if let Some(r) = mem.max_adapter_rank {
            set("max-adapter-rank", Value::Integer(i64::from(r)));
        }
    }
    Ok(m)
}

/// The rendered `agent.toml`.
pub fn agent_toml(model: &BaseModel, params: &AgentParams) -> Result<String, SpecError> {
    agent_toml_with(model, params, &BTreeSet::new())
}

/// The rendered `agent.toml` with adapter claims mounted.
pub fn agent_toml_with(
    model: &BaseModel,
    params: &AgentParams,
    adapter_claims: &BTreeSet<String>,
) -> Result<String, SpecError> {
    let settings = agent_settings(model, params, adapter_claims)?;
    let table: toml::Table = settings.into_iter().collect();
    Ok(format!(
        "# Generated by loraplane-operator from BaseModel {}; edits are overwritten.\n{}",
        kube::ResourceExt::name_any(model),
        toml::to_string(&table).unwrap_or_default()
    ))
}

/// The ConfigMap `<model>-agent-config` with adapter claims mounted.
pub fn agent_config(
    model: &BaseModel,
    params: &AgentParams,
    adapter_claims: &BTreeSet<String>,
) -> Result<ConfigMap, SpecError> {
    Ok(ConfigMap {
        metadata: child_meta(model, config_name(model), common_labels(model)),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_owned(),
            agent_toml_with(model, params, adapter_claims)?,
        )])),
        ..ConfigMap::default()
    })
}
