//! Every Kubernetes permission the operator uses, in one place: the chart's ClusterRole is
//! `loraplane-operator rbac` (a test keeps this list in step with the calls the controllers
//! make).

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::MANAGER;

/// (API group, resources, verbs) the operator needs.
pub const RULES: &[(&str, &[&str], &[&str])] = &[
    (
        "loraplane.dev",
        &["basemodels", "loraadapters"],
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "loraplane.dev",
        &["basemodels/status", "loraadapters/status"],
        &["get", "patch", "update"],
    ),
    // Owner references with blockOwnerDeletion need update on the owner's finalizers.
    ("loraplane.dev", &["basemodels/finalizers"], &["update"]),
    (
        "apps",
        &["statefulsets"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        &["services", "configmaps"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // Admin tokens (created) and tenant API keys (read, hashed).
    (
        "",
        &["secrets"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "policy",
        &["poddisruptionbudgets"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // Autoscaling per role: HPAs (`--autoscaler hpa`), or KEDA ScaledObjects (`keda`; the
    // operator lists HPAs then too, to prune its own). Not watched: the autoscalers rewrite
    // their status every few seconds, and a resync re-creates one deleted by hand.
    (
        "autoscaling",
        &["horizontalpodautoscalers"],
        &["list", "create", "patch", "delete"],
    ),
    (
        "keda.sh",
        &["scaledobjects"],
        &["list", "create", "patch", "delete"],
    ),
    // Agent discovery and tenancy.
    ("", &["pods", "namespaces"], &["get", "list", "watch"]),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    // Leader election.
    (
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    ),
];

/// The ClusterRole `loraplane-operator`.
pub fn cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(MANAGER.into()),
            ..ObjectMeta::default()
        },
        rules: Some(
            RULES
                .iter()
                .map(|(group, resources, verbs)| PolicyRule {
                    api_groups: Some(vec![(*group).to_owned()]),
                    resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
                    verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
                    ..PolicyRule::default()
                })
                .collect(),
        ),
        ..ClusterRole::default()
    }
}

/// Whether the rules grant `verb` on `group`/`resource`.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|(g, rs, vs)| *g == group && rs.contains(&resource) && vs.contains(&verb))
}
