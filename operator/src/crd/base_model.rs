//! `BaseModel` (short name `bm`): one base LLM served by a fleet of `loraplane-agent` pods,
//! either `Unified` (every agent does prefill and decode) or `Disaggregated` (prefill agents
//! stream KV caches to decode agents), with the memory budget of each agent and the
//! namespaces (tenants) whose adapters may run on it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Phase;

/// A base model and the agents serving it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "loraplane.dev",
    version = "v1alpha1",
    kind = "BaseModel",
    namespaced,
    shortname = "bm",
    category = "loraplane",
    status = "BaseModelStatus",
    derive = "PartialEq",
    doc = "A base LLM served by loraplane agents: one StatefulSet per role, Services, agent configuration and a PodDisruptionBudget.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.serving.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Prefill","type":"integer","description":"ready prefill agents","jsonPath":".status.prefill.ready"}"#,
    printcolumn = r#"{"name":"Decode","type":"integer","description":"ready decode agents","jsonPath":".status.decode.ready"}"#,
    printcolumn = r#"{"name":"Unified","type":"integer","description":"ready unified agents","jsonPath":".status.unified.ready"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BaseModelSpec {
    /// Where the checkpoint comes from.
    pub source: ModelSource,
    /// The dtype the agents compute in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// How the model is served: the mode and each role's agents.
    pub serving: Serving,
    /// Each agent's memory budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// Which namespaces (tenants) may run adapters on this model. Neither field: only the
    /// BaseModel's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenancy: Option<Tenancy>,
}

/// A checkpoint source: exactly one of `huggingFace` or `uri`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.huggingFace) != has(self.uri)", "message": "set exactly one of huggingFace or uri"},
    {"rule": "!has(self.sha256) || has(self.uri)", "message": "sha256 checks uri sources only"}
]))]
pub struct ModelSource {
    /// A Hugging Face Hub repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceModel>,
    /// `https://…`, `file:///…` (a path on the node image or a mounted volume),
    /// `pvc://<claim>/<path>` (the claim is mounted read-only), `s3://…`, `gs://…` or `az://…`
    /// (the agents' object-store credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(https|file|pvc|s3|gs|az)://.+$"),
        length(max = 4096)
    )]
    pub uri: Option<String>,
    /// Expected hex SHA-256 of the weights (optionally `sha256:`-prefixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(sha256:)?[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// A model repository on the Hugging Face Hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceModel {
    /// `org/name`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub repo: String,
    /// A branch, tag or commit (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,
    /// A Secret in the BaseModel's namespace holding the Hub token (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretRef>,
}

/// A Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The data key (default `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The dtype agents compute in (default `bfloat16`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bfloat16,
    Float16,
    Float32,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bfloat16 => "bf16",
            Dtype::Float16 => "f16",
            Dtype::Float32 => "f32",
        }
    }
}

/// `Unified`: one pool of agents doing prefill and decode. `Disaggregated`: prefill agents
/// compute prompts and stream the KV cache to decode agents (Splitwise).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServingMode {
    Unified,
    Disaggregated,
}

/// The serving topology.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'Disaggregated' || (has(self.prefill) && has(self.decode))", "message": "Disaggregated mode requires prefill and decode"},
    {"rule": "self.mode != 'Disaggregated' || !has(self.unified)", "message": "unified applies to Unified mode only"},
    {"rule": "self.mode != 'Unified' || (!has(self.prefill) && !has(self.decode))", "message": "prefill and decode apply to Disaggregated mode only"},
    {"rule": "!has(self.prefill) || !has(self.prefill.autoscaling) || (has(self.prefill.autoscaling.target.queuedPromptTokens) && !has(self.prefill.autoscaling.target.runningSequences) && !has(self.prefill.autoscaling.target.kvCacheUtilizationPercent))", "message": "prefill autoscaling targets queuedPromptTokens only"},
    {"rule": "!has(self.decode) || !has(self.decode.autoscaling) || !has(self.decode.autoscaling.target.queuedPromptTokens)", "message": "decode autoscaling targets runningSequences or kvCacheUtilizationPercent, not queuedPromptTokens"},
    {"rule": "!has(self.unified) || !has(self.unified.autoscaling) || !has(self.unified.autoscaling.target.queuedPromptTokens)", "message": "unified autoscaling targets runningSequences or kvCacheUtilizationPercent, not queuedPromptTokens"}
]))]
pub struct Serving {
    pub mode: ServingMode,
    /// Prefill agents (Disaggregated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoleSpec>,
    /// Decode agents (Disaggregated); clients reach these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<RoleSpec>,
    /// The agents of Unified mode (default: one replica, no resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<RoleSpec>,
}

/// One role's agents.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.replicas) && has(self.autoscaling))", "message": "set replicas or autoscaling, not both"}
]))]
pub struct RoleSpec {
    /// Agents of this role (default 1). Not with `autoscaling`, which then owns the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: Option<i32>,
    /// Scale this role's agents on their own load metrics (a HorizontalPodAutoscaler, or a
    /// KEDA ScaledObject when the operator runs with `--autoscaler keda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Container resources, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

/// Horizontal autoscaling of one role: between `minReplicas` and `maxReplicas` agents, so that
/// each agent carries about the target load. With several targets the role gets the largest
/// count any of them asks for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}
]))]
pub struct Autoscaling {
    /// Fewest agents, at least 1: the load metrics come from the agents themselves, so a role
    /// scaled to zero would have nothing left to report the load that should wake it.
    #[schemars(range(min = 1, max = 1024))]
    pub min_replicas: i32,
    /// Most agents.
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// The load each agent should carry.
    pub target: AutoscalingTarget,
    /// How long the load must have stayed low before agents are removed: the largest
    /// recommendation of this window wins (default 300, the HorizontalPodAutoscaler's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: Option<i32>,
}

/// Per-agent load targets (average over the role's agents). Prefill agents scale on
/// `queuedPromptTokens`; decode and unified agents on `runningSequences`,
/// `kvCacheUtilizationPercent` or both.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.queuedPromptTokens) || has(self.runningSequences) || has(self.kvCacheUtilizationPercent)", "message": "set at least one target"}
]))]
pub struct AutoscalingTarget {
    /// Prompt tokens admitted or waiting but not yet computed, per agent (the agents'
    /// `loraplane_queued_prefill_tokens`). Prefill only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub queued_prompt_tokens: Option<i64>,
    /// Sequences in the running batch, per agent (`loraplane_requests_running`). Keep it below
    /// the agents' `--max-running` cap (128), which the metric cannot exceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub running_sequences: Option<i64>,
    /// Share of each agent's page pool held by KV caches, in percent
    /// (`loraplane_pool_used_pages{kind="kv"}` over `loraplane_pool_capacity_pages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub kv_cache_utilization_percent: Option<i32>,
}

/// Each agent's memory budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Share of device memory the unified page pool (KV cache and adapter weights) takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self > 0.0 && self <= 1.0", "message": "devicePoolFraction must be in (0, 1]"}
    ]))]
    pub device_pool_fraction: Option<f64>,
    /// Bound of the host-memory adapter cache (`64Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_adapter_cache_bytes: Option<Quantity>,
    /// Largest adapter rank the agents accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_adapter_rank: Option<u32>,
}

/// The namespaces admitted as tenants: a list or a selector, not both.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.allowedNamespaces) && has(self.namespaceSelector))", "message": "set allowedNamespaces or namespaceSelector, not both"}
]))]
pub struct Tenancy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<RoleStatus>,
    /// The client Service's gRPC address (`<name>.<namespace>.svc:50051`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// One role's replica counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub replicas: i32,
    pub ready: i32,
}
