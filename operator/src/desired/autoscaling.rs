//! Autoscaling per role (`spec.serving.<role>.autoscaling`): a `HorizontalPodAutoscaler`
//! (`autoscaling/v2`) on Pods metrics, or a KEDA `ScaledObject` with Prometheus triggers
//! (`--autoscaler keda`), named `<model>-<role>` like the StatefulSet it scales.
//!
//! The load signals are series the agents already export (docs/architecture.md §7.5):
//! prefill agents scale on prompt tokens not yet computed (`loraplane_queued_prefill_tokens`),
//! decode and unified agents on running sequences (`loraplane_requests_running`) and/or the
//! share of the page pool their KV caches hold (`loraplane_pool_used_pages{kind="kv"}` over
//! `loraplane_pool_capacity_pages`). The HPA reads them through prometheus-adapter under the
//! names in [`metric_names`]; the chart ships the adapter rules that serve exactly those
//! (`charts/loraplane/files/prometheus-adapter-rules.yaml`, checked by a test here and run
//! against live agents by the chart test). KEDA queries Prometheus directly.
//!
//! Who owns `spec.replicas`: with autoscaling on, the StatefulSet the operator applies leaves
//! `replicas` out, so the autoscaler's writes (through the scale subresource) are never undone.
//! Leaving out a field the operator's field manager owned would make server-side apply remove
//! it (the StatefulSet would fall back to one replica), so when autoscaling is switched on the
//! operator first hands the field to a second manager ([`HANDOVER_MANAGER`]) at its current
//! value, as Kubernetes' server-side apply documentation describes for handing replicas to an
//! HPA; the autoscaler's first update then takes it over.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use super::config::SpecError;
use super::keda::{Advanced, HpaConfig, ScaleTargetRef, ScaledObject, ScaledObjectSpec, Trigger};
use super::{MANAGER, child_meta, namespace, role_labels, role_name};
use crate::crd::{Autoscaling, BaseModel, RoleSpec};
use crate::role::{self, Role};

/// The field manager that keeps `spec.replicas` at its value while ownership passes from the
/// operator to the autoscaler.
pub const HANDOVER_MANAGER: &str = "loraplane-operator-replicas-handover";
/// The scale-down stabilisation window when the spec names none (the HPA's own default).
pub const DEFAULT_SCALE_DOWN_STABILIZATION_S: i32 = 300;
/// How often KEDA queries Prometheus (its default too).
pub const KEDA_POLLING_INTERVAL_S: i32 = 30;

/// The custom metrics (`custom.metrics.k8s.io`, per pod) the HPAs name. prometheus-adapter
/// serves them from the agents' series by the chart's rules.
pub mod metric_names {
    /// Prompt tokens admitted or waiting but not yet computed (the agent's series as is).
    pub const QUEUED_PROMPT_TOKENS: &str = "loraplane_queued_prefill_tokens";
    /// Sequences in the running batch (the agent's series as is).
    pub const RUNNING_SEQUENCES: &str = "loraplane_requests_running";
    /// KV pages over pool pages, 0..1 (derived by the adapter rule).
    pub const KV_CACHE_UTILIZATION: &str = "loraplane_kv_cache_utilization";
    pub const ALL: [&str; 3] = [
        QUEUED_PROMPT_TOKENS,
        RUNNING_SEQUENCES,
        KV_CACHE_UTILIZATION,
    ];
}

/// Which object carries a role's autoscaling (operator-wide: `--autoscaler`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Autoscaler {
    /// An `autoscaling/v2` HorizontalPodAutoscaler on Pods metrics (prometheus-adapter).
    #[default]
    Hpa,
    /// A KEDA ScaledObject whose Prometheus triggers query this server address.
    Keda { prometheus: String },
}

/// One per-agent load target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadTarget {
    QueuedPromptTokens(i64),
    RunningSequences(i64),
    /// Percent of the page pool held by KV caches.
    KvCacheUtilizationPercent(i32),
}

impl LoadTarget {
    /// The custom metric the HPA reads.
    pub fn metric_name(self) -> &'static str {
        match self {
            LoadTarget::QueuedPromptTokens(_) => metric_names::QUEUED_PROMPT_TOKENS,
            LoadTarget::RunningSequences(_) => metric_names::RUNNING_SEQUENCES,
            LoadTarget::KvCacheUtilizationPercent(_) => metric_names::KV_CACHE_UTILIZATION,
        }
    }

    /// The per-agent target as a Kubernetes quantity (`2048`, `32`, `800m` for 80 %).
    pub fn average_value(self) -> Quantity {
        Quantity(match self {
            LoadTarget::QueuedPromptTokens(n) | LoadTarget::RunningSequences(n) => n.to_string(),
            LoadTarget::KvCacheUtilizationPercent(p) => format!("{}m", i64::from(p) * 10),
        })
    }

    /// The per-agent target as a decimal (KEDA's `threshold`).
    pub fn threshold(self) -> String {
        match self {
            LoadTarget::QueuedPromptTokens(n) | LoadTarget::RunningSequences(n) => n.to_string(),
            LoadTarget::KvCacheUtilizationPercent(p) => format!("{}", f64::from(p) / 100.0),
        }
    }

    /// PromQL for the role's total load (KEDA divides it by the replicas): the sum over the
    /// role's pods, picked by namespace and pod name (`<model>-<role>-<ordinal>`), the two
    /// labels every Kubernetes scrape configuration sets.
    pub fn total_query(self, namespace: &str, pods: &str) -> String {
        let sel = format!(r#"namespace="{namespace}",pod=~"{pods}""#);
        match self {
            LoadTarget::QueuedPromptTokens(_) | LoadTarget::RunningSequences(_) => {
                format!("sum({}{{{sel}}})", self.metric_name())
            }
            LoadTarget::KvCacheUtilizationPercent(_) => format!(
                r#"sum(loraplane_pool_used_pages{{kind="kv",{sel}}} / ignoring(kind) loraplane_pool_capacity_pages{{{sel}}})"#
            ),
        }
    }
}

fn invalid(role: Role, reason: String) -> SpecError {
    SpecError::Autoscaling {
        role: role.as_str(),
        reason,
    }
}

/// The role's load targets, checked as the CRD's rules check them (so a spec that bypassed
/// them, or an older schema, is refused with the same reason).
///
/// Errors: replicas out of range or inverted, no target, a target the role does not export.
pub fn targets(role: Role, a: &Autoscaling) -> Result<Vec<LoadTarget>, SpecError> {
    if !(1..=1024).contains(&a.min_replicas) || !(1..=1024).contains(&a.max_replicas) {
        return Err(invalid(
            role,
            format!(
                "minReplicas {} and maxReplicas {} must be within 1..=1024",
                a.min_replicas, a.max_replicas
            ),
        ));
    }
    if a.min_replicas > a.max_replicas {
        return Err(invalid(
            role,
            format!(
                "minReplicas {} exceeds maxReplicas {}",
                a.min_replicas, a.max_replicas
            ),
        ));
    }
    if let Some(s) = a.scale_down_stabilization_seconds
        && !(0..=3600).contains(&s)
    {
        return Err(invalid(
            role,
            format!("scaleDownStabilizationSeconds {s} must be within 0..=3600"),
        ));
    }
    let t = &a.target;
    let mut out = Vec::new();
    if let Some(n) = t.queued_prompt_tokens {
        out.push(LoadTarget::QueuedPromptTokens(n));
    }
    if let Some(n) = t.running_sequences {
        out.push(LoadTarget::RunningSequences(n));
    }
    if let Some(p) = t.kv_cache_utilization_percent {
        out.push(LoadTarget::KvCacheUtilizationPercent(p));
    }
    if out.is_empty() {
        return Err(invalid(role, "set at least one target".into()));
    }
    for target in &out {
        let fits_role = match (role, target) {
            (Role::Prefill, LoadTarget::QueuedPromptTokens(_)) => true,
            (Role::Prefill, _) | (_, LoadTarget::QueuedPromptTokens(_)) => false,
            _ => true,
        };
        if !fits_role {
            let want = if role == Role::Prefill {
                "queuedPromptTokens only"
            } else {
                "runningSequences or kvCacheUtilizationPercent, not queuedPromptTokens"
            };
            return Err(invalid(role, format!("{role} autoscaling targets {want}")));
        }
        let (field, value, range) = match *target {
            LoadTarget::QueuedPromptTokens(n) => ("queuedPromptTokens", n, 1..=i64::MAX),
            LoadTarget::RunningSequences(n) => ("runningSequences", n, 1..=100_000),
            LoadTarget::KvCacheUtilizationPercent(p) => {
                ("kvCacheUtilizationPercent", i64::from(p), 1..=100)
            }
        };
        if !range.contains(&value) {
            return Err(invalid(
                role,
                format!(
                    "target.{field} {value} must be within {}..={}",
                    range.start(),
                    range.end()
                ),
            ));
        }
    }
    Ok(out)
}

/// The HPA behaviour: scale-down waits out the stabilisation window; scale-up keeps the HPA's
/// defaults (immediate).
pub fn behavior(a: &Autoscaling) -> HorizontalPodAutoscalerBehavior {
    HorizontalPodAutoscalerBehavior {
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(
                a.scale_down_stabilization_seconds
                    .unwrap_or(DEFAULT_SCALE_DOWN_STABILIZATION_S),
            ),
            ..HPAScalingRules::default()
        }),
        scale_up: None,
    }
}

/// The pods of a role, as a PromQL regular expression (anchored by PromQL itself).
pub fn pod_pattern(model: &BaseModel, role: Role) -> String {
    format!("{}-[0-9]+", role_name(model, role))
}

fn scale_target(model: &BaseModel, role: Role) -> (String, String, String) {
    (
        "apps/v1".into(),
        "StatefulSet".into(),
        role_name(model, role),
    )
}

/// The HorizontalPodAutoscaler `<model>-<role>`: one Pods metric per target, averaged over the
/// role's agents.
///
/// Errors: an invalid autoscaling spec ([`targets`]).
pub fn hpa(
    model: &BaseModel,
    role: Role,
    a: &Autoscaling,
) -> Result<HorizontalPodAutoscaler, SpecError> {
    let metrics = targets(role, a)?
        .into_iter()
        .map(|t| MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: t.metric_name().into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(t.average_value()),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        })
        .collect();
    let (api_version, kind, name) = scale_target(model, role);
    Ok(HorizontalPodAutoscaler {
        metadata: child_meta(model, role_name(model, role), role_labels(model, role)),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(api_version),
                kind,
                name,
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            behavior: Some(behavior(a)),
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

/// The KEDA ScaledObject `<model>-<role>`: one Prometheus trigger per target, whose query is
/// the role's total load and whose threshold is the per-agent target.
///
/// Errors: an invalid autoscaling spec ([`targets`]).
pub fn scaled_object(
    model: &BaseModel,
    role: Role,
    a: &Autoscaling,
    prometheus: &str,
) -> Result<ScaledObject, SpecError> {
    let ns = namespace(model);
    let pods = pod_pattern(model, role);
    let triggers = targets(role, a)?
        .into_iter()
        .map(|t| Trigger {
            type_: "prometheus".into(),
            metric_type: Some("AverageValue".into()),
            metadata: [
                ("serverAddress", prometheus.to_owned()),
                ("query", t.total_query(&ns, &pods)),
                ("threshold", t.threshold()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        })
        .collect();
    let (api_version, kind, name) = scale_target(model, role);
    let mut so = ScaledObject::new(
        &role_name(model, role),
        ScaledObjectSpec {
            scale_target_ref: ScaleTargetRef {
                api_version,
                kind,
                name,
            },
            min_replica_count: a.min_replicas,
            max_replica_count: a.max_replicas,
            polling_interval: Some(KEDA_POLLING_INTERVAL_S),
            advanced: Some(Advanced {
                horizontal_pod_autoscaler_config: HpaConfig {
                    behavior: behavior(a),
                },
            }),
            triggers,
        },
    );
    so.metadata = child_meta(model, role_name(model, role), role_labels(model, role));
    Ok(so)
}

/// The replicas a role is meant to run now: its fixed `replicas` (default 1), or with
/// autoscaling the StatefulSet's count (the autoscaler's choice) held within
/// `[minReplicas, maxReplicas]` (`minReplicas` before the StatefulSet exists).
pub fn wanted_replicas(spec: &RoleSpec, observed: Option<&StatefulSet>) -> i32 {
    match &spec.autoscaling {
        None => role::replicas(spec),
        Some(a) => {
            let current = observed
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.replicas)
                .unwrap_or(a.min_replicas);
            current
                .max(a.min_replicas)
                .min(a.max_replicas.max(a.min_replicas))
        }
    }
}

/// Whether the operator's own field manager still owns `spec.replicas` of `sts` (it applied
/// the StatefulSet before autoscaling was switched on).
pub fn operator_owns_replicas(sts: &StatefulSet) -> bool {
    sts.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
    })
}

/// For an autoscaled role whose live StatefulSet still has `spec.replicas` owned by the
/// operator: the count [`HANDOVER_MANAGER`] should hold it at before the operator's apply
/// leaves the field out. That is the current count unchanged: another value would conflict
/// with the operator's own ownership, and the autoscaler brings it within its bounds anyway.
/// `None` when there is nothing to hand over.
pub fn replicas_handover(observed: &StatefulSet, spec: &RoleSpec) -> Option<i32> {
    spec.autoscaling.as_ref()?;
    operator_owns_replicas(observed)
        .then(|| observed.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1))
}

/// The partial StatefulSet [`HANDOVER_MANAGER`] applies: only `spec.replicas`.
pub fn handover_patch(observed: &StatefulSet, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": observed.name_any(), "namespace": observed.namespace()},
        "spec": {"replicas": replicas},
    })
}

#[cfg(test)]
mod tests;
