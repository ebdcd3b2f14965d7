//! Pure builders of the objects a `BaseModel` owns: `fn(&BaseModel, …) -> K8sObject`, no I/O,
//! no clocks, no randomness (the admin token is an argument), so every object is tested with
//! plain `#[test]`s and the reconciler only reads, calls these and applies.
//!
//! | object | name | builder |
//! |---|---|---|
//! | ConfigMap of agent configuration | `<model>-agent-config` | [`config::agent_config`] |
//! | Secret with the admin and cluster tokens | `<model>-agent-credentials` | [`secret::credentials`] |
//! | StatefulSet per role | `<model>-<role>` | [`statefulset::statefulset`] |
//! | headless Service per role (peer discovery) | `<model>-<role>` | [`service::headless`] |
//! | client Service (decode or unified pods) | `<model>` | [`service::client`] |
//! | PodDisruptionBudget per role | `<model>-<role>` | [`pdb::pdb`] |
//! | HorizontalPodAutoscaler per autoscaled role | `<model>-<role>` | [`autoscaling::hpa`] |
//! | or, with `--autoscaler keda`, a KEDA ScaledObject | `<model>-<role>` | [`autoscaling::scaled_object`] |

pub mod autoscaling;
pub mod claims;
pub mod config;
pub mod keda;
pub mod pdb;
pub mod rbac;
pub mod secret;
pub mod service;
pub mod statefulset;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::BaseModel;
use crate::role::Role;

/// The field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "loraplane-operator";
/// The agent's gRPC port (Inference, Admin, KvTransfer, health, reflection).
pub const GRPC_PORT: i32 = 50051;
/// The agent's HTTP port (OpenAI API, `/healthz`, `/readyz`).
pub const HTTP_PORT: i32 = 8000;
/// The agent's Prometheus `/metrics` port (`--metrics-addr`), on the pod network only: no
/// Service publishes it, the chart's PodMonitor scrapes it by its name `metrics`.
pub const METRICS_PORT: i32 = 9400;
/// The prefill agent's `KvTransfer` port (decode agents stream KV caches from it).
pub const KV_PORT: i32 = 50052;

/// Label keys.
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The BaseModel an object or agent pod belongs to.
    pub const BASE_MODEL: &str = "loraplane.dev/base-model";
    /// `unified`, `prefill` or `decode`.
    pub const ROLE: &str = "loraplane.dev/role";
    /// On Secrets in tenant namespaces: `"true"` makes the Secret's `api-key` a tenant key.
    pub const API_KEY: &str = "loraplane.dev/api-key";
}

/// Annotation keys.
pub mod annotations {
    /// Hash of the desired object last applied; equal hashes skip the apply.
    pub const DESIRED_HASH: &str = "loraplane.dev/desired-hash";
    /// On the pod template: hash of the agent configuration, so a change rolls the pods.
    pub const CONFIG_HASH: &str = "loraplane.dev/config-hash";
    /// On a tenant Namespace: adapters the namespace may have (all base models together).
    pub const MAX_ADAPTERS: &str = "loraplane.dev/max-adapters";
    /// On a tenant Namespace: the agents' per-tenant concurrent-request limit.
    pub const MAX_CONCURRENT_REQUESTS: &str = "loraplane.dev/max-concurrent-requests";
    /// On a tenant Namespace: the agents' per-tenant tokens-per-minute limit.
    pub const MAX_TOKENS_PER_MINUTE: &str = "loraplane.dev/max-tokens-per-minute";
    /// On a tenant Namespace: pinned replicas per role the namespace's adapters may hold on
    /// one base model; caps demand-following growth (`replicas: {min, max}`).
    pub const MAX_ADAPTER_REPLICAS: &str = "loraplane.dev/max-adapter-replicas";
}

/// What the builders need beyond the BaseModel: operator-wide settings (Helm values).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentParams {
    /// The `loraplane-agent` image.
    pub image: String,
    /// `Always`, `IfNotPresent`, `Never`; unset leaves the Kubernetes default.
    pub image_pull_policy: Option<String>,
    /// The agent's `--drain-timeout`; pods get this plus [`AgentParams::termination_margin`]
    /// to exit.
    pub drain_timeout: Duration,
    /// Extra time past the drain for the agent to flush and exit after SIGTERM.
    pub termination_margin: Duration,
    /// The cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// What carries autoscaling of roles that ask for it.
    pub autoscaler: autoscaling::Autoscaler,
}

impl Default for AgentParams {
    fn default() -> Self {
        AgentParams {
            image: "ghcr.io/loraplane/loraplane-agent:latest".into(),
            image_pull_policy: None,
            drain_timeout: Duration::from_secs(30),
            termination_margin: Duration::from_secs(15),
            cluster_domain: "cluster.local".into(),
            autoscaler: autoscaling::Autoscaler::Hpa,
        }
    }
}

/// The name of a role's StatefulSet, headless Service, PodDisruptionBudget and autoscaler.
pub fn role_name(model: &BaseModel, role: Role) -> String {
    format!("{}-{}", model.name_any(), role.as_str())
}

/// The client Service's name.
pub fn client_service_name(model: &BaseModel) -> String {
    model.name_any()
}

/// The agent ConfigMap's name.
pub fn config_name(model: &BaseModel) -> String {
    format!("{}-agent-config", model.name_any())
}

/// The credentials Secret's name.
pub fn credentials_secret_name(model_name: &str) -> String {
    format!("{model_name}-agent-credentials")
}

/// The namespace children live in (the BaseModel's).
pub fn namespace(model: &BaseModel) -> String {
    model.namespace().unwrap_or_else(|| "default".into())
}

/// Labels every child carries.
pub fn common_labels(model: &BaseModel) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.into(), "loraplane-agent".into()),
        (labels::INSTANCE.into(), model.name_any()),
        (labels::MANAGED_BY.into(), MANAGER.into()),
        (labels::BASE_MODEL.into(), model.name_any()),
    ])
}

/// Labels of a role's children and pods.
pub fn role_labels(model: &BaseModel, role: Role) -> BTreeMap<String, String> {
    let mut l = common_labels(model);
    l.insert(labels::COMPONENT.into(), role.as_str().into());
    l.insert(labels::ROLE.into(), role.as_str().into());
    l
}

/// The (immutable) pod selector of a role.
pub fn role_selector(model: &BaseModel, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::BASE_MODEL.into(), model.name_any()),
        (labels::ROLE.into(), role.as_str().into()),
    ])
}

/// The label selector that finds a model's children (`managed-by` guards user objects).
pub fn children_selector(model_name: &str) -> String {
    format!(
        "{}={MANAGER},{}={model_name}",
        labels::MANAGED_BY,
        labels::BASE_MODEL
    )
}

/// The controller owner reference to the BaseModel (none for an object the API server has not
/// stored yet, which has no uid).
pub fn owner_refs(model: &BaseModel) -> Option<Vec<OwnerReference>> {
    model.controller_owner_ref(&()).map(|r| vec![r])
}

/// Metadata of a child: name, namespace, labels, owner.
pub fn child_meta(model: &BaseModel, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(model)),
        labels: Some(labels),
        owner_references: owner_refs(model),
        ..ObjectMeta::default()
    }
}

/// Short, stable hex digest of a JSON-serialisable value (object hashes, config hashes).
pub fn hash_json<T: serde::Serialize>(value: &T) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

#[cfg(test)]
mod tests;
