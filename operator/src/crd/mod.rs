//! The platform's custom resources as Rust types (group `loraplane.dev`, version `v1alpha1`):
//! [`BaseModel`] and [`LoraAdapter`]. Their OpenAPI schemas are derived from the types; what a
//! schema cannot say (one-of sources, mode-dependent roles, ranges with open ends) is written as
//! CEL rules (`x-kubernetes-validations`) next to the field it constrains. The YAML the chart
//! ships is generated from here by `loraplane-operator crds` and checked by a test.

mod base_model;
mod common;
mod lora_adapter;

pub use base_model::{
    Autoscaling, AutoscalingTarget, BaseModel, BaseModelSpec, BaseModelStatus, Dtype,
    HuggingFaceModel, Memory, ModelSource, RoleSpec, RoleStatus, SecretRef, Serving, ServingMode,
    Tenancy,
};
pub use common::{Phase, condition_types};
pub use lora_adapter::{
    AdapterReplicas, AdapterSource, AutoReplicas, BaseModelRef, HuggingFaceAdapter, LoraAdapter,
    LoraAdapterSpec, LoraAdapterStatus, MAX_ADAPTER_REPLICAS, MAX_STABILIZATION_SECONDS, Placement,
    PlacementState, ReplicaRange, Replicas, ScalingStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every loraplane resource.
pub const GROUP: &str = "loraplane.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Both CRDs, as installed (`BaseModel` first).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        with_name_limit(BaseModel::crd()),
        with_name_limit(LoraAdapter::crd()),
    ]
}

/// Both CRDs as one multi-document YAML stream: exactly what `loraplane-operator crds` prints
/// and what `charts/loraplane/crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The file name of a CRD in `charts/loraplane/crds/` (`<plural>.<group>.yaml`).
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as a YAML document.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

/// Adds the root-level rule that keeps object names usable as agent adapter names and as
/// prefixes of child object names (a pod is `<name>-decode-<ordinal>`, a label value ≤ 63).
fn with_name_limit(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let limit = match crd.spec.names.kind.as_str() {
        // `<name>-prefill-<ordinal>` plus the controller-revision-hash label must stay ≤ 63.
        "BaseModel" => 40,
        _ => 63,
    };
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let rule = serde_json::json!({
                "rule": format!("self.metadata.name.size() <= {limit}"),
                "message": format!("metadata.name must be at most {limit} characters"),
            });
            let rules = schema.x_kubernetes_validations.get_or_insert_with(Vec::new);
            if let Ok(rule) = serde_json::from_value(rule) {
                rules.push(rule);
            }
        }
    }
    crd
}

#[cfg(test)]
mod tests;
