//! A PodDisruptionBudget per role: voluntary disruptions (node drains, upgrades) take at most
//! one agent of a role at a time, so a disaggregated model never loses all prefill or all
//! decode agents to a drain.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, role_labels, role_name, role_selector};
use crate::crd::BaseModel;
use crate::role::Role;

/// The PodDisruptionBudget `<model>-<role>` (`maxUnavailable: 1`).
pub fn pdb(model: &BaseModel, role: Role) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(model, role_name(model, role), role_labels(model, role)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(role_selector(model, role)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
