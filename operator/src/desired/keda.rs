//! The part of KEDA's `ScaledObject` (`keda.sh/v1alpha1`) the operator writes, as a Rust type
//! so it goes through the same typed server-side apply as every other child. KEDA owns the
//! CRD; this type has no schema of its own and is never installed by loraplane. Field names
//! follow <https://keda.sh/docs/latest/reference/scaledobject-spec/>.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// A KEDA ScaledObject: KEDA creates and drives an HPA for `scaleTargetRef` from `triggers`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keda.sh",
    version = "v1alpha1",
    kind = "ScaledObject",
    namespaced,
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectSpec {
    pub scale_target_ref: ScaleTargetRef,
    pub min_replica_count: i32,
    pub max_replica_count: i32,
    /// Seconds between KEDA's queries of the triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_interval: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced: Option<Advanced>,
    pub triggers: Vec<Trigger>,
}

/// The workload KEDA scales.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// `spec.advanced`: what KEDA copies into the HPA it creates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Advanced {
    pub horizontal_pod_autoscaler_config: HpaConfig,
}

/// `spec.advanced.horizontalPodAutoscalerConfig`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HpaConfig {
    pub behavior: HorizontalPodAutoscalerBehavior,
}

/// One trigger; for `prometheus`, `metadata` holds `serverAddress`, `query` and `threshold`
/// (the target per replica: KEDA compares the query's value divided by the replicas).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    #[serde(rename = "type")]
    pub type_: String,
    /// `AverageValue` (the query's total is shared by the replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
}
