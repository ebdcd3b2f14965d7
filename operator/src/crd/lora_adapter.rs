//! `LoraAdapter` (short name `lora`): a tenant's PEFT LoRA adapter for a base model. The
//! operator admits it (base model exists, namespace admitted, quota), places it on agents,
//! loads it through their Admin API and reports where it runs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Phase;

/// A LoRA adapter of a base model, owned by the tenant (namespace) it lives in.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "loraplane.dev",
    version = "v1alpha1",
    kind = "LoraAdapter",
    namespaced,
    shortname = "lora",
    category = "loraplane",
    status = "LoraAdapterStatus",
    derive = "PartialEq",
    doc = "A tenant's LoRA adapter: placed on the base model's agents and loaded through their Admin API.",
    printcolumn = r#"{"name":"Base Model","type":"string","jsonPath":".spec.baseModel.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Rank","type":"integer","jsonPath":".status.rank"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"agents with the adapter loaded","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.digest","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoraAdapterSpec {
    /// The BaseModel this adapter was trained for.
    pub base_model: BaseModelRef,
    /// Where the adapter (`adapter_config.json` + `adapter_model.safetensors`) comes from.
    pub source: AdapterSource,
    /// Agents (per role) that keep it pinned and warm: a number (fixed), or
    /// `{min, max, targetRequestsPerSecond, scaleUpStabilizationSeconds,
    /// scaleDownStabilizationSeconds}` (sized by the request rate the agents report). Unset:
    /// every agent registers it and loads the weights on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<AdapterReplicas>,
}

/// `spec.replicas`: a fixed count or a demand-following range.
///
/// A structural schema cannot say "integer or object", so the field is declared
/// `x-kubernetes-preserve-unknown-fields` and checked by the operator
/// ([`AdapterReplicas::resolve`]); any other shape is kept as written (`Invalid`) so the
/// adapter still reaches the reconciler, which reports it (`InvalidSpec`) instead of the
/// watcher dropping the object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum AdapterReplicas {
    Fixed(i64),
    Range(ReplicaRange),
    Invalid(serde_json::Value),
}

/// `replicas: {min, max, …}`: pinned replicas per role sized by demand (docs/architecture.md
/// §4.7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaRange {
    /// Fewest replicas per role, kept whatever the demand (at least 1: the request rate that
    /// sizes the adapter is counted by the agents that hold it).
    pub min: i64,
    /// Most replicas per role.
    pub max: i64,
    /// Requests per second one replica is meant to serve (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_requests_per_second: Option<f64>,
    /// How long more replicas must be wanted before they are added (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_stabilization_seconds: Option<i64>,
    /// How long fewer replicas must be enough before any is released (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_stabilization_seconds: Option<i64>,
}

/// The checked meaning of `spec.replicas`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Replicas {
    /// Every agent, unpinned, loaded on demand.
    OnDemand,
    /// This many pinned agents per role.
    Fixed(u32),
    /// Sized by demand.
    Auto(AutoReplicas),
}

/// A validated [`ReplicaRange`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoReplicas {
    pub min: u32,
    pub max: u32,
    pub target_rps: f64,
    pub scale_up_window: std::time::Duration,
    pub scale_down_window: std::time::Duration,
}

/// Largest replica count either form accepts.
pub const MAX_ADAPTER_REPLICAS: i64 = 1024;
/// Longest stabilisation window.
pub const MAX_STABILIZATION_SECONDS: i64 = 3600;

impl AdapterReplicas {
    /// Checks the value; the error says what is wrong in the user's terms.
    pub fn resolve(this: Option<&Self>) -> Result<Replicas, String> {
        let secs = |v: Option<i64>, default: i64, field: &str| -> Result<_, String> {
            let v = v.unwrap_or(default);
            if !(0..=MAX_STABILIZATION_SECONDS).contains(&v) {
                return Err(format!(
                    "spec.replicas.{field} must be 0..={MAX_STABILIZATION_SECONDS}, not {v}"
                ));
            }
            Ok(std::time::Duration::from_secs(v.unsigned_abs()))
        };
        match this {
            None => Ok(Replicas::OnDemand),
            Some(AdapterReplicas::Fixed(k)) if (1..=MAX_ADAPTER_REPLICAS).contains(k) => {
                Ok(Replicas::Fixed(u32::try_from(*k).unwrap_or(1)))
            }
            Some(AdapterReplicas::Fixed(k)) => Err(format!(
                "spec.replicas must be 1..={MAX_ADAPTER_REPLICAS}, not {k}"
            )),
            Some(AdapterReplicas::Range(r)) => {
                if r.min < 1 || r.min > r.max || r.max > MAX_ADAPTER_REPLICAS {
                    return Err(format!(
                        "spec.replicas needs 1 <= min <= max <= {MAX_ADAPTER_REPLICAS} \
                         (min {}, max {})",
                        r.min, r.max
                    ));
                }
                let target = r.target_requests_per_second.unwrap_or(5.0);
                if !(target.is_finite() && target > 0.0) {
                    return Err(format!(
                        "spec.replicas.targetRequestsPerSecond must be above 0, not {target}"
                    ));
                }
                Ok(Replicas::Auto(AutoReplicas {
                    min: u32::try_from(r.min).unwrap_or(0),
                    max: u32::try_from(r.max).unwrap_or(1),
                    target_rps: target,
                    scale_up_window: secs(
                        r.scale_up_stabilization_seconds,
                        30,
                        "scaleUpStabilizationSeconds",
                    )?,
                    scale_down_window: secs(
                        r.scale_down_stabilization_seconds,
                        300,
                        "scaleDownStabilizationSeconds",
                    )?,
                }))
            }
            Some(AdapterReplicas::Invalid(v)) => Err(format!(
                "spec.replicas must be a number or {{min, max, targetRequestsPerSecond, \
                 scaleUpStabilizationSeconds, scaleDownStabilizationSeconds}}, not {v}"
            )),
        }
    }
}

impl JsonSchema for AdapterReplicas {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AdapterReplicas".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Agents (per role) that keep it pinned and warm: an integer 1-1024 (fixed), or {min, max, targetRequestsPerSecond (default 5), scaleUpStabilizationSeconds (default 30), scaleDownStabilizationSeconds (default 300)} sized by the request rate the agents report. Unset: every agent registers it and loads the weights on demand. Checked by the operator (an invalid value sets phase Failed, reason InvalidSpec).",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// A BaseModel by name; `namespace` defaults to the adapter's own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModelRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// An adapter source: exactly one of `huggingFace` or `uri`, with an optional digest check.
///
/// There is no Hub token: the agents' `Admin/LoadAdapter` carries no credential, so private
/// Hub adapters are reached through `uri` (an `https://` URL with its own access) instead.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.huggingFace) != has(self.uri)", "message": "set exactly one of huggingFace or uri"}
]))]
pub struct AdapterSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceAdapter>,
    /// `https://…` (a directory, or a `.tar`/`.tar.gz` archive), `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix` (the agents' object-store credentials),
    /// `pvc://<claim>/<path>` (a claim in the BaseModel's
    /// namespace, mounted read-only into its agents; the adapter must live in that namespace),
    /// `file:///…` (under the agents' adapter roots) or `hf://org/repo[@rev]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(https|s3|gs|az|pvc|file|hf)://.+$"),
        length(max = 4096)
    )]
    pub uri: Option<String>,
    /// Expected hex SHA-256 of `adapter_model.safetensors` (optionally `sha256:`-prefixed); a
    /// load whose files differ fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(sha256:)?[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// An adapter repository on the Hugging Face Hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceAdapter {
    /// `org/name`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub repo: String,
    /// A branch, tag or commit (default: the Hub's default branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,
}

impl AdapterSource {
    /// The `source_uri` of `Admin/LoadAdapter`: `hf://org/repo[@revision]` or the URI as given.
    pub fn to_uri(&self) -> String {
        match (&self.hugging_face, &self.uri) {
            (Some(hf), _) => match &hf.revision {
                Some(rev) => format!("hf://{}@{rev}", hf.repo),
                None => format!("hf://{}", hf.repo),
            },
            (None, Some(uri)) => uri.clone(),
            // Unreachable through the API server (CEL rule); an empty URI is refused by the agent.
            (None, None) => String::new(),
        }
    }

    /// The claim of a `pvc://<claim>/<path>` URI (no validation beyond the shape; the agents
    /// refuse a malformed one).
    pub fn pvc_claim(&self) -> Option<&str> {
        let rest = self.uri.as_deref()?.strip_prefix("pvc://")?;
        let (claim, path) = rest.split_once('/')?;
        (!claim.is_empty() && !path.is_empty()).then_some(claim)
    }

    /// The expected digest as bare lowercase hex, if one is given.
    pub fn expected_sha256(&self) -> Option<String> {
        self.sha256
            .as_deref()
            .map(|s| s.trim_start_matches("sha256:").to_ascii_lowercase())
    }
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraAdapterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Largest rank over the adapter's modules, as the agents report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_modules: Vec<String>,
    /// `sha256:<hex>` of the loaded weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Agents holding (or asked to hold) the adapter, sorted by pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placement>,
    /// Placements in state `Loaded`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Demand-following sizing (`spec.replicas: {min, max}` only): what was observed and
    /// decided, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingStatus>,
}

/// The last sizing decision of a demand-following adapter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatus {
    /// Requests per minute the agents holding it reported over the last interval.
    pub requests_per_minute: u64,
    /// Replicas per role the demand asks for now (before stabilisation).
    pub recommended_replicas: u32,
    /// Replicas per role decided.
    pub desired_replicas: u32,
    /// `Steady`, `ScaledUp`, `ScaledDown`, `AwaitingSustainedDemand`, `StabilizingScaleDown`,
    /// `ChurnLimited`, `TenantQuota`, `InsufficientCapacity`.
    pub reason: String,
    pub message: String,
}

/// One agent's copy of the adapter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The agent pod.
    pub pod: String,
    /// `unified`, `prefill` or `decode`.
    pub role: String,
    pub state: PlacementState,
    /// Why a load failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where one placement stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlacementState {
    /// Verified and in the agent's registry (`Admin/ListAdapters` shows it).
    Loaded,
    /// The load failed; the message says why.
    Failed,
}
