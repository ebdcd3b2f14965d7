#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::apps::v1::StatefulSetStatus;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, PodStatus,
};
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::fixtures::agent_pod;

fn at(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap())
}

fn sts(
    model: &BaseModel,
    role: Role,
    ready: i32,
    updated: i32,
    observed: i64,
    generation: i64,
) -> StatefulSet {
    let mut s =
        crate::desired::statefulset::statefulset(model, role, &Default::default(), "fp").unwrap();
    s.metadata.generation = Some(generation);
    s.status = Some(StatefulSetStatus {
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        observed_generation: Some(observed),
        replicas: ready,
        ..StatefulSetStatus::default()
    });
    s
}

fn observe<'a>(statefulsets: &'a [StatefulSet], pods: &'a [Pod]) -> ObservedModel<'a> {
    ObservedModel {
        statefulsets,
        pods,
        spec_error: None,
        endpoint: "llama3-8b.loraplane-system.svc:50051",
    }
}

fn cond<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
    c.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn a_model_is_ready_when_every_role_is() {
    let m = BaseModel::test().disaggregated(2, 4);
    let s = [
        sts(&m, Role::Prefill, 2, 2, 1, 1),
        sts(&m, Role::Decode, 4, 4, 1, 1),
    ];
    let st = base_model_status(&m, observe(&s, &[]), &at(10));
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(
        st.prefill,
        Some(RoleStatus {
            replicas: 2,
            ready: 2
        })
    );
    assert_eq!(
        st.decode,
        Some(RoleStatus {
            replicas: 4,
            ready: 4
        })
    );
    assert_eq!(st.unified, None);
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        st.endpoint.as_deref(),
        Some("llama3-8b.loraplane-system.svc:50051")
    );
    let ready = cond(&st.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AgentsReady")
    );
    assert_eq!(ready.message, "ready: prefill 2/2, decode 4/4");
    assert_eq!(cond(&st.conditions, "Progressing").status, "False");
    assert_eq!(cond(&st.conditions, "Degraded").status, "False");
}

#[test]
fn a_rollout_or_missing_agents_is_progressing() {
    let m = BaseModel::test().disaggregated(2, 4);
    let s = [
        sts(&m, Role::Prefill, 2, 2, 1, 1),
        sts(&m, Role::Decode, 3, 4, 1, 1),
    ];
    let st = base_model_status(&m, observe(&s, &[]), &at(10));
    assert_eq!(st.phase, Some(Phase::Progressing));
    assert_eq!(
        cond(&st.conditions, "Progressing").reason,
        "WaitingForAgents"
    );
    let stale = [
        sts(&m, Role::Prefill, 2, 2, 1, 2),
        sts(&m, Role::Decode, 4, 4, 1, 1),
    ];
    let st = base_model_status(&m, observe(&stale, &[]), &at(10));
    assert_eq!(cond(&st.conditions, "Progressing").reason, "RollingOut");
    let st = base_model_status(&m, observe(&[], &[]), &at(10));
    assert_eq!(st.phase, Some(Phase::Progressing));
    assert_eq!(
        st.decode,
        Some(RoleStatus {
            replicas: 4,
            ready: 0
        })
    );
}

#[test]
fn crash_looping_agents_degrade_the_model() {
    let m = BaseModel::test().unified(2);
    let s = [sts(&m, Role::Unified, 1, 2, 1, 1)];
    let mut pod = agent_pod(
        &m,
        Role::Unified,
        1,
        "10.0.0.1:50051".parse().unwrap(),
        false,
        3,
    );
    pod.status = Some(PodStatus {
        container_statuses: Some(vec![ContainerStatus {
            name: "agent".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let st = base_model_status(&m, observe(&s, &[pod]), &at(10));
    assert_eq!(st.phase, Some(Phase::Degraded));
    let d = cond(&st.conditions, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "AgentsFailing")
    );
    assert_eq!(d.message, "llama3-8b-unified-1: CrashLoopBackOff");
}

#[test]
fn an_invalid_spec_fails_the_model() {
    let m = BaseModel::test();
    let st = base_model_status(
        &m,
        ObservedModel {
            spec_error: Some("spec.memory.hostAdapterCacheBytes: bad"),
            ..observe(&[], &[])
        },
        &at(10),
    );
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(cond(&st.conditions, "Ready").reason, "InvalidSpec");
}

#[test]
fn transition_times_move_only_when_a_condition_flips() {
    let m = BaseModel::test().unified(1);
    let s = [sts(&m, Role::Unified, 0, 1, 1, 1)];
    let first = base_model_status(&m, observe(&s, &[]), &at(10));
    let m = m.with_status(Some(first.clone()));
    let again = base_model_status(&m, observe(&s, &[]), &at(20));
    assert_eq!(
        first, again,
        "an unchanged world computes the stored status"
    );
    let ready = [sts(&m, Role::Unified, 1, 1, 1, 1)];
    let later = base_model_status(&m, observe(&ready, &[]), &at(30));
    assert_eq!(
        cond(&later.conditions, "Ready").last_transition_time,
        at(30)
    );
    assert_eq!(
        cond(&later.conditions, "Degraded").last_transition_time,
        at(10)
    );
}

fn loaded(pod: &str) -> PlacementOutcome {
    PlacementOutcome {
        pod: pod.into(),
        role: Role::Unified,
        error: None,
    }
}

fn failed(pod: &str, permanent: bool) -> PlacementOutcome {
    PlacementOutcome {
        pod: pod.into(),
        role: Role::Unified,
        error: Some((permanent, "boom".into())),
    }
}

fn converged(placements: Vec<PlacementOutcome>, wanted: u32, shortfall: u32) -> AdapterOutcome {
    AdapterOutcome::Converged(Converged {
        placements,
        wanted,
        shortfall,
        rank: Some(16),
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        digest: Some("sha256:ab".into()),
        size_bytes: Some(1024),
        scaling: None,
        change: None,
    })
}

#[test]
fn adapter_phases() {
    let a = LoraAdapter::test();
    let phase = |o: AdapterOutcome| adapter_status(&a, &o, &at(1)).phase.unwrap();
    assert_eq!(
        phase(converged(vec![loaded("b"), loaded("a")], 2, 0)),
        Phase::Ready
    );
    assert_eq!(
        phase(converged(vec![loaded("a"), failed("b", false)], 2, 0)),
        Phase::Degraded
    );
    assert_eq!(phase(converged(vec![loaded("a")], 2, 1)), Phase::Degraded);
    assert_eq!(
        phase(converged(vec![failed("a", true)], 1, 0)),
        Phase::Failed
    );
    assert_eq!(
        phase(converged(vec![failed("a", false)], 1, 0)),
        Phase::Degraded
    );
    assert_eq!(phase(converged(vec![], 2, 2)), Phase::Pending);
    assert_eq!(phase(converged(vec![], 0, 0)), Phase::Pending);
    let blocked = AdapterOutcome::Blocked(Blocked {
        reason: "QuotaExceeded",
        message: "too many".into(),
    });
    let st = adapter_status(&a, &blocked, &at(1));
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(cond(&st.conditions, "Ready").reason, "QuotaExceeded");
    assert!(st.placements.is_empty());
}

#[test]
fn adapter_status_records_placements_rank_modules_and_digest() {
    let a = LoraAdapter::test().generation(3);
    let st = adapter_status(
        &a,
        &converged(vec![loaded("b"), failed("a", false)], 2, 0),
        &at(1),
    );
    assert_eq!(st.rank, Some(16));
    assert_eq!(st.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(st.digest.as_deref(), Some("sha256:ab"));
    assert_eq!(st.ready_replicas, 1);
    assert_eq!(st.observed_generation, Some(3));
    let pods: Vec<(&str, PlacementState)> = st
        .placements
        .iter()
        .map(|p| (p.pod.as_str(), p.state))
        .collect();
    assert_eq!(
        pods,
        [("a", PlacementState::Failed), ("b", PlacementState::Loaded)]
    );
    assert_eq!(st.placements[0].message.as_deref(), Some("boom"));
    let again = adapter_status(
        &a.clone().with_status(Some(st.clone())),
        &converged(vec![loaded("b"), failed("a", false)], 2, 0),
        &at(99),
    );
    assert_eq!(st, again);
}

#[test]
fn phases_are_counted_for_the_gauge() {
    let ready = LoraAdapterStatus {
        phase: Some(Phase::Ready),
        ..Default::default()
    };
    let counts = count_phases([Some(&ready), Some(&ready), None]);
    assert_eq!(counts["Ready"], 2);
    assert_eq!(counts["Pending"], 1);
    assert_eq!(counts["Failed"], 0);
}
