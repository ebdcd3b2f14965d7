//! Status of both resources as pure functions of what the reconcilers observed: phase,
//! conditions (`Ready`, `Progressing`, `Degraded`, each with a reason), per-role replica counts,
//! placements. Conditions keep their `lastTransitionTime` while their status does not change,
//! so a reconcile of an unchanged world computes a status equal to the stored one and writes
//! nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{
    BaseModel, BaseModelStatus, LoraAdapter, LoraAdapterStatus, Phase, Placement, PlacementState,
    RoleStatus, ScalingStatus, condition_types,
};
use crate::role::{self, Role};

/// Container waiting reasons that mean a pod will not become ready without a change.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// One condition as computed, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Cond {
            type_,
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Turns computed conditions into API conditions, keeping the transition time of any whose
/// status is unchanged from `old`.
pub fn conditions(
    computed: &[Cond],
    old: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    computed
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The reason and message of a status's `Ready` condition (for Events).
pub fn ready_message(conditions: &[Condition]) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == condition_types::READY)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// What the BaseModel reconciler saw (StatefulSets after its applies, the model's pods).
#[derive(Debug, Clone, Copy)]
pub struct ObservedModel<'a> {
    pub statefulsets: &'a [StatefulSet],
    pub pods: &'a [Pod],
    /// A spec the builders refused (the children are left as they were).
    pub spec_error: Option<&'a str>,
    pub endpoint: &'a str,
}

fn failing_pods(pods: &[Pod]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pods
        .iter()
        .filter_map(|p| {
            let reason = p
                .status
                .as_ref()?
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                .find(|r| FAILING_REASONS.contains(&r.as_str()))?;
            Some((p.name_any(), reason))
        })
        .collect();
    out.sort();
    out
}

/// The BaseModel's status.
pub fn base_model_status(
    model: &BaseModel,
    seen: ObservedModel<'_>,
    now: &Time,
) -> BaseModelStatus {
    let old = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let mut status = BaseModelStatus {
        observed_generation: generation,
        endpoint: Some(seen.endpoint.to_owned()),
        ..BaseModelStatus::default()
    };
    let mut not_ready = Vec::new();
    let mut rolling = Vec::new();
    for (role, spec) in role::roles(model) {
        let name = crate::desired::role_name(model, role);
        let sts = seen.statefulsets.iter().find(|s| s.name_any() == name);
        let want = crate::desired::autoscaling::wanted_replicas(&spec, sts);
        let st = sts.and_then(|s| s.status.as_ref());
        let ready = st.and_then(|s| s.ready_replicas).unwrap_or(0);
        let updated = st.and_then(|s| s.updated_replicas).unwrap_or(0);
        let observed = st.and_then(|s| s.observed_generation);
        let rs = RoleStatus {
            replicas: want,
            ready,
        };
        match role {
            Role::Unified => status.unified = Some(rs),
            Role::Prefill => status.prefill = Some(rs),
            Role::Decode => status.decode = Some(rs),
        }
        if ready < want {
            not_ready.push(format!("{role} {ready}/{want}"));
        }
        let current = sts.is_some_and(|s| observed >= s.metadata.generation && observed.is_some());
        if sts.is_none() || !current || updated < want {
            rolling.push(role.as_str());
        }
    }
    let failing = failing_pods(seen.pods);
    let ready_msg = |prefix: &str| {
        let parts: Vec<String> = role::roles(model)
            .iter()
            .map(|(r, _)| {
                let (ready, want) = match r {
                    Role::Unified => status.unified.as_ref(),
                    Role::Prefill => status.prefill.as_ref(),
                    Role::Decode => status.decode.as_ref(),
                }
                .map_or((0, 0), |s| (s.ready, s.replicas));
                format!("{r} {ready}/{want}")
            })
            .collect();
        format!("{prefix}{}", parts.join(", "))
    };
    let (phase, conds) = if let Some(err) = seen.spec_error {
        (
            Phase::Failed,
            vec![
                Cond::new(condition_types::READY, false, "InvalidSpec", err),
                Cond::new(condition_types::PROGRESSING, false, "InvalidSpec", err),
                Cond::new(condition_types::DEGRADED, true, "InvalidSpec", err),
            ],
        )
    } else {
        let all_ready = not_ready.is_empty();
        let ready = if all_ready {
            Cond::new(
                condition_types::READY,
                true,
                "AgentsReady",
                ready_msg("ready: "),
            )
        } else {
            Cond::new(
                condition_types::READY,
                false,
                "AgentsNotReady",
                ready_msg("ready: "),
            )
        };
        let progressing = if rolling.is_empty() && all_ready {
            Cond::new(
                condition_types::PROGRESSING,
                false,
                "RolloutComplete",
                "every role is up to date",
            )
        } else if rolling.is_empty() {
            Cond::new(
                condition_types::PROGRESSING,
                true,
                "WaitingForAgents",
                format!("waiting for {}", not_ready.join(", ")),
            )
        } else {
            Cond::new(
                condition_types::PROGRESSING,
                true,
                "RollingOut",
                format!("rolling out {}", rolling.join(", ")),
            )
        };
        let degraded = if failing.is_empty() {
            Cond::new(
                condition_types::DEGRADED,
                false,
                "AsExpected",
                "no agent is failing",
            )
        } else {
            let list: Vec<String> = failing.iter().map(|(p, r)| format!("{p}: {r}")).collect();
            Cond::new(
                condition_types::DEGRADED,
                true,
                "AgentsFailing",
                list.join(", "),
            )
        };
        let phase = if !failing.is_empty() {
            Phase::Degraded
        } else if all_ready && rolling.is_empty() {
            Phase::Ready
        } else {
            Phase::Progressing
        };
        (phase, vec![ready, progressing, degraded])
    };
    status.phase = Some(phase);
    status.conditions = conditions(&conds, &old.conditions, generation, now);
    status
}

/// Why an adapter is not placed at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// `BaseModelNotFound`, `NamespaceNotAdmitted`, `ClaimOutsideModelNamespace`,
    /// `QuotaExceeded`, `NoAgents`, `InvalidSpec` (phase `Failed`).
    pub reason: &'static str,
    pub message: String,
}

/// One target agent's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementOutcome {
    pub pod: String,
    pub role: Role,
    /// `None`: loaded. `Some((permanent, message))`: the load failed.
    pub error: Option<(bool, String)>,
}

/// What the adapter's convergence reported, in status terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Converged {
    pub placements: Vec<PlacementOutcome>,
    /// Agents asked for over every role.
    pub wanted: u32,
    /// Agents that could not fit it (capacity).
    pub shortfall: u32,
    pub rank: Option<u32>,
    pub target_modules: Vec<String>,
    pub digest: Option<String>,
    pub size_bytes: Option<u64>,
    /// The demand-following decision (`replicas: {min, max}` only).
    pub scaling: Option<ScalingStatus>,
    /// The placements this reconcile added and removed, for an Event (`None`: none).
    pub change: Option<String>,
}

/// How an adapter's reconcile ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterOutcome {
    Blocked(Blocked),
    Converged(Converged),
}

/// The LoraAdapter's status.
pub fn adapter_status(
    adapter: &LoraAdapter,
    outcome: &AdapterOutcome,
    now: &Time,
) -> LoraAdapterStatus {
    let old = adapter.status.clone().unwrap_or_default();
    let generation = adapter.metadata.generation;
    let (phase, conds, mut status) = match outcome {
        AdapterOutcome::Blocked(b) => (
            // Only a spec change helps an invalid spec; the rest wait for the world.
            if b.reason == "InvalidSpec" {
                Phase::Failed
            } else {
                Phase::Pending
            },
            vec![
                Cond::new(condition_types::READY, false, b.reason, b.message.clone()),
                Cond::new(
                    condition_types::PROGRESSING,
                    false,
                    b.reason,
                    b.message.clone(),
                ),
                Cond::new(
                    condition_types::DEGRADED,
                    false,
                    "AsExpected",
                    "nothing is placed",
                ),
            ],
            // Keep what is known about the adapter itself; placements are gone.
            LoraAdapterStatus {
                rank: old.rank,
                target_modules: old.target_modules.clone(),
                digest: old.digest.clone(),
                size_bytes: old.size_bytes,
                ..LoraAdapterStatus::default()
            },
        ),
        AdapterOutcome::Converged(c) => converged_status(c, &old),
    };
    status.phase = Some(phase);
    status.observed_generation = generation;
    status.conditions = conditions(&conds, &old.conditions, generation, now);
    status
}

fn converged_status(
    c: &Converged,
    old: &LoraAdapterStatus,
) -> (Phase, Vec<Cond>, LoraAdapterStatus) {
    let mut placements: Vec<Placement> = c
        .placements
        .iter()
        .map(|p| Placement {
            pod: p.pod.clone(),
            role: p.role.as_str().to_owned(),
            state: if p.error.is_none() {
                PlacementState::Loaded
            } else {
                PlacementState::Failed
            },
            message: p.error.as_ref().map(|(_, m)| m.clone()),
        })
        .collect();
    placements.sort_by(|a, b| a.pod.cmp(&b.pod));
    let loaded = c.placements.iter().filter(|p| p.error.is_none()).count() as u32;
    let failures: Vec<&PlacementOutcome> =
        c.placements.iter().filter(|p| p.error.is_some()).collect();
    let permanent = failures
        .iter()
        .any(|p| p.error.as_ref().is_some_and(|(perm, _)| *perm));
    let first_failure = failures
        .first()
        .and_then(|p| p.error.as_ref().map(|(_, m)| format!("{}: {m}", p.pod)))
        .unwrap_or_default();
    let summary = format!("loaded on {loaded} of {} agents", c.wanted);
    let (phase, ready, progressing, degraded) = if c.wanted == 0 {
        (
            Phase::Pending,
            Cond::new(
                condition_types::READY,
                false,
                "NoAgents",
                "no ready agent of the base model",
            ),
            Cond::new(
                condition_types::PROGRESSING,
                false,
                "NoAgents",
                "waiting for agents",
            ),
            Cond::new(
                condition_types::DEGRADED,
                false,
                "AsExpected",
                "nothing is placed",
            ),
        )
    } else if loaded >= c.wanted {
        (
            Phase::Ready,
            Cond::new(condition_types::READY, true, "Loaded", summary.clone()),
            Cond::new(condition_types::PROGRESSING, false, "Placed", summary),
            Cond::new(
                condition_types::DEGRADED,
                false,
                "AsExpected",
                "every placement is loaded",
            ),
        )
    } else if loaded == 0 && permanent {
        (
            Phase::Failed,
            Cond::new(
                condition_types::READY,
                false,
                "LoadRejected",
                first_failure.clone(),
            ),
            Cond::new(
                condition_types::PROGRESSING,
                false,
                "LoadRejected",
                "the agents refuse this adapter; fix the spec",
            ),
            Cond::new(
                condition_types::DEGRADED,
                true,
                "LoadRejected",
                first_failure,
            ),
        )
    } else if loaded == 0 && failures.is_empty() {
        let msg = format!("no agent has room for it ({} short)", c.shortfall);
        (
            Phase::Pending,
            Cond::new(
                condition_types::READY,
                false,
                "InsufficientCapacity",
                msg.clone(),
            ),
            Cond::new(
                condition_types::PROGRESSING,
                true,
                "WaitingForCapacity",
                msg,
            ),
            Cond::new(
                condition_types::DEGRADED,
                false,
                "AsExpected",
                "nothing is placed",
            ),
        )
    } else {
        let (reason, msg) = if failures.is_empty() {
            (
                "InsufficientCapacity",
                format!("{summary}; {} agents short of room", c.shortfall),
            )
        } else {
            ("LoadFailed", format!("{summary}; {first_failure}"))
        };
        (
            Phase::Degraded,
            Cond::new(
                condition_types::READY,
                loaded > 0,
                if loaded > 0 {
                    "PartiallyLoaded"
                } else {
                    reason
                },
                summary.clone(),
            ),
            Cond::new(condition_types::PROGRESSING, true, "Retrying", msg.clone()),
            Cond::new(condition_types::DEGRADED, true, reason, msg),
        )
    };
    let status = LoraAdapterStatus {
        rank: c.rank.or(old.rank),
        target_modules: if c.target_modules.is_empty() {
            old.target_modules.clone()
        } else {
            c.target_modules.clone()
        },
        digest: c.digest.clone().or_else(|| old.digest.clone()),
        size_bytes: c.size_bytes.or(old.size_bytes),
        ready_replicas: i32::try_from(loaded).unwrap_or(i32::MAX),
        placements,
        scaling: c.scaling.clone(),
        ..LoraAdapterStatus::default()
    };
    (phase, vec![ready, progressing, degraded], status)
}

/// Adapters per phase (for the `loraplane_operator_adapters` gauge).
pub fn count_phases<'a>(
    statuses: impl IntoIterator<Item = Option<&'a LoraAdapterStatus>>,
) -> BTreeMap<&'static str, i64> {
    let mut out: BTreeMap<&'static str, i64> = [
        Phase::Pending,
        Phase::Progressing,
        Phase::Ready,
        Phase::Degraded,
        Phase::Failed,
    ]
    .into_iter()
    .map(|p| (p.as_str(), 0))
    .collect();
    for s in statuses {
        let phase = s.and_then(|s| s.phase).unwrap_or(Phase::Pending);
        *out.entry(phase.as_str()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests;
