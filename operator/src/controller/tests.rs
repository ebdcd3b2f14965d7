//! Scenario tests: each reconcile runs against the mock API server and in-memory fake agents,
//! and the exact Kubernetes calls (and agent writes) are pinned.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::crd::{Phase, PlacementState};
use crate::desired::rbac;
use crate::fixtures::world::World;
use crate::fixtures::{api_key, namespace};
use crate::role::Role;

pub(super) const NS: &str = "/api/v1/namespaces/loraplane-system";
pub(super) const APPS: &str = "/apis/apps/v1/namespaces/loraplane-system";
pub(super) const POLICY: &str = "/apis/policy/v1/namespaces/loraplane-system";
pub(super) const HPA: &str = "/apis/autoscaling/v2/namespaces/loraplane-system";
pub(super) const BM: &str =
    "/apis/loraplane.dev/v1alpha1/namespaces/loraplane-system/basemodels/llama3-8b";
const LORA: &str = "/apis/loraplane.dev/v1alpha1/namespaces/team-a/loraadapters";
const GIB: u64 = 1 << 30;

pub(super) fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

pub(super) fn reads() -> Vec<String> {
    lines(&[
        &format!("GET {NS}/secrets/llama3-8b-agent-credentials"),
        &format!("GET {NS}/configmaps"),
        &format!("GET {APPS}/statefulsets"),
        &format!("GET {NS}/services"),
        &format!("GET {POLICY}/poddisruptionbudgets"),
        &format!("GET {HPA}/horizontalpodautoscalers"),
    ])
}

/// Every call the scenario made is granted by the ClusterRole the operator ships.
pub(super) fn assert_rbac(w: &World) {
    for c in w.api.history() {
        let (group, resource, verb) = c.rbac();
        assert!(
            rbac::allows(&group, &resource, &verb),
            "RBAC lacks {verb} {group}/{resource} for {}",
            c.line()
        );
    }
}

pub(super) async fn reconcile_model(w: &World, m: &BaseModel) {
    base_model::reconcile(Arc::new(m.clone()), w.ctx.clone())
        .await
        .unwrap();
}

async fn reconcile_adapter(w: &World, a: &LoraAdapter) -> Action {
    lora_adapter::reconcile(Arc::new(a.clone()), w.ctx.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn base_model_create_then_unchanged_then_spec_change() {
    let mut w = World::new();
    let m = BaseModel::test().unified(2);
    w.model_only(&m);

    // Create: the token Secret, every child by server-side apply, status, one Event.
    reconcile_model(&w, &m).await;
    let mut want = vec![
        format!("GET {NS}/secrets/llama3-8b-agent-credentials"),
        format!("POST {NS}/secrets"),
    ];
    want.extend(reads().into_iter().skip(1));
    want.extend(lines(&[
        &format!("PATCH {NS}/configmaps/llama3-8b-agent-config"),
        &format!("PATCH {APPS}/statefulsets/llama3-8b-unified"),
        &format!("PATCH {NS}/services/llama3-8b-unified"),
        &format!("PATCH {NS}/services/llama3-8b"),
        &format!("PATCH {POLICY}/poddisruptionbudgets/llama3-8b-unified"),
        &format!("PATCH {BM}/status"),
        "POST /apis/events.k8s.io/v1/namespaces/loraplane-system/events",
    ]));
    assert_eq!(w.api.take_lines(), want);
    for c in w.api.history().iter().filter(|c| c.method == "PATCH") {
        assert!(
            c.query.contains("fieldManager=loraplane-operator") && c.query.contains("force=true"),
            "{}",
            c.query
        );
        assert!(
            c.content_type.starts_with("application/apply-patch"),
            "{}",
            c.content_type
        );
    }
    let event = w.api.history().last().unwrap().body.clone();
    assert_eq!(event["reason"], "Progressing");
    let stored = w.stored_model().unwrap();
    let st = stored.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Progressing));
    assert_eq!(st.unified.as_ref().unwrap().replicas, 2);

    // Unchanged world: reads only.
    reconcile_model(&w, &stored).await;
    assert_eq!(w.api.take_lines(), reads());

    // Spec change: only the StatefulSet and the status move.
    let mut changed = stored.clone().generation(2);
    changed.spec.serving.unified.as_mut().unwrap().replicas = Some(4);
    reconcile_model(&w, &changed).await;
    let mut want = reads();
    want.push(format!("PATCH {APPS}/statefulsets/llama3-8b-unified"));
    want.push(format!("PATCH {BM}/status"));
    assert_eq!(w.api.take_lines(), want);
    let st = w.stored_model().unwrap().status.unwrap();
    assert_eq!(
        (st.observed_generation, st.unified.unwrap().replicas),
        (Some(2), 4)
    );
    assert_rbac(&w);
}

#[tokio::test]
async fn switching_to_disaggregated_creates_both_roles_and_prunes_unified() {
    let mut w = World::new();
    let m = BaseModel::test().unified(1);
    w.model(&m);
    reconcile_model(&w, &m).await;
    w.api.take_lines();
    let switched = w.stored_model().unwrap().disaggregated(1, 2).generation(2);
    reconcile_model(&w, &switched).await;
    let mut want = reads();
    want.extend(lines(&[
        &format!("PATCH {APPS}/statefulsets/llama3-8b-prefill"),
        &format!("PATCH {APPS}/statefulsets/llama3-8b-decode"),
        &format!("DELETE {APPS}/statefulsets/llama3-8b-unified"),
        &format!("PATCH {NS}/services/llama3-8b-prefill"),
        &format!("PATCH {NS}/services/llama3-8b-decode"),
        &format!("PATCH {NS}/services/llama3-8b"),
        &format!("DELETE {NS}/services/llama3-8b-unified"),
        &format!("PATCH {POLICY}/poddisruptionbudgets/llama3-8b-prefill"),
        &format!("PATCH {POLICY}/poddisruptionbudgets/llama3-8b-decode"),
        &format!("DELETE {POLICY}/poddisruptionbudgets/llama3-8b-unified"),
        &format!("PATCH {BM}/status"),
    ]));
    assert_eq!(w.api.take_lines(), want);
    let st = w.stored_model().unwrap().status.unwrap();
    assert_eq!((st.unified, st.decode.map(|d| d.replicas)), (None, Some(2)));
    assert_rbac(&w);
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_touches_no_child() {
    let mut w = World::new();
    let m = BaseModel::test().memory(0.9, "500m", 8);
    w.model(&m);
    reconcile_model(&w, &m).await;
    let mut want = reads();
    want.push(format!("PATCH {BM}/status"));
    want.push("POST /apis/events.k8s.io/v1/namespaces/loraplane-system/events".into());
    assert_eq!(w.api.take_lines(), want);
    let st = w.stored_model().unwrap().status.unwrap();
    assert_eq!(st.phase, Some(Phase::Failed));
    let event = w.api.history().last().unwrap().body.clone();
    assert_eq!(
        (event["reason"].as_str(), event["type"].as_str()),
        (Some("Failed"), Some("Warning"))
    );
}

#[tokio::test]
async fn tenant_tables_reach_each_agent_incarnation_once() {
    let mut w = World::new();
    let m = BaseModel::test().unified(2).allow(&["team-a", "team-b"]);
    w.model(&m);
    let a0 = w.agent(&m, Role::Unified, 0, GIB);
    let a1 = w.agent(&m, Role::Unified, 1, GIB);
    let key = api_key("team-a", "key-1", "sk-team-a-1");
    w.api_key(key.clone());
    w.api_key(api_key("team-c", "key-c", "sk-team-c"));

    reconcile_model(&w, &m).await;
    assert_eq!(
        w.agent_writes(&[a0, a1]),
        [format!("{a0}: SetTenants"), format!("{a1}: SetTenants")]
    );
    let table = w.agents.with(a0, |a| a.tenants().to_vec()).unwrap();
    let ids: Vec<&str> = table.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["team-a", "team-b"], "team-c is not admitted");
    assert_eq!(
        table[0].api_key_sha256,
        [crate::tenancy::key_hash(b"sk-team-a-1")]
    );

    let stored = w.stored_model().unwrap();
    reconcile_model(&w, &stored).await;
    assert!(
        w.agent_writes(&[a0, a1]).is_empty(),
        "an unchanged table is not re-sent"
    );

    w.restart_agent(&m, Role::Unified, 1, 1);
    reconcile_model(&w, &stored).await;
    assert_eq!(w.agent_writes(&[a0, a1]), [format!("{a1}: SetTenants")]);

    w.delete_api_key(key);
    reconcile_model(&w, &stored).await;
    assert_eq!(
        w.agent_writes(&[a0, a1]),
        [format!("{a0}: SetTenants"), format!("{a1}: SetTenants")]
    );
    let table = w.agents.with(a1, |a| a.tenants().to_vec()).unwrap();
    assert!(
        table[0].api_key_sha256.is_empty(),
        "a deleted key is gone from the agents"
    );
    assert_rbac(&w);
}

/// A model with three unified agents admitting `team-a`, and the adapter `sql-expert`.
fn adapter_world(
    replicas: Option<i32>,
) -> (World, BaseModel, Vec<std::net::SocketAddr>, LoraAdapter) {
    let mut w = World::new();
    let m = BaseModel::test().unified(3).allow(&["team-a"]);
    w.model(&m);
    let addrs = (0..3).map(|i| w.agent(&m, Role::Unified, i, GIB)).collect();
    let mut a = LoraAdapter::test();
    a.spec.replicas = replicas.map(|k| crate::crd::AdapterReplicas::Fixed(k.into()));
    w.adapter(&a);
    (w, m, addrs, a)
}

#[tokio::test]
async fn adapter_create_unchanged_spec_change_and_delete() {
    let (mut w, _m, agents, a) = adapter_world(Some(2));
    let load = |i: usize| format!("{}: LoadAdapter team-a/sql-expert", agents[i]);
    let unload = |i: usize| format!("{}: UnloadAdapter team-a/sql-expert", agents[i]);

    // First sight: only the finalizer.
    reconcile_adapter(&w, &a).await;
    assert_eq!(w.api.take_lines(), [format!("PATCH {LORA}/sql-expert")]);
    assert!(w.agent_writes(&agents).is_empty());
    let a = w.stored_adapter("team-a", "sql-expert").unwrap();
    assert_eq!(
        a.metadata.finalizers.as_deref(),
        Some(&[lora_adapter::FINALIZER.to_owned()][..])
    );

    // Placed on two of three agents, status and one Event.
    let action = reconcile_adapter(&w, &a).await;
    assert_eq!(
        w.api.take_lines(),
        [
            format!("GET {NS}/secrets/llama3-8b-agent-credentials"),
            format!("PATCH {LORA}/sql-expert/status"),
            "POST /apis/events.k8s.io/v1/namespaces/team-a/events".to_owned(),
        ]
    );
    assert_eq!(w.agent_writes(&agents), [load(0), load(1)]);
    assert_eq!(action, Action::requeue(w.ctx.settings.resync));
    let a = w.stored_adapter("team-a", "sql-expert").unwrap();
    let st = a.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!((st.rank, st.ready_replicas), (Some(16), 2));
    assert_eq!(st.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(
        st.digest,
        Some(crate::fake_agent::digest_of("hf://acme/sql-lora"))
    );
    let placed: Vec<(&str, PlacementState)> = st
        .placements
        .iter()
        .map(|p| (p.pod.as_str(), p.state))
        .collect();
    assert_eq!(
        placed,
        [
            ("llama3-8b-unified-0", PlacementState::Loaded),
            ("llama3-8b-unified-1", PlacementState::Loaded)
        ]
    );

    // Unchanged world: no Kubernetes call, no agent write.
    reconcile_adapter(&w, &a).await;
    assert!(w.api.take_lines().is_empty());
    assert!(w.agent_writes(&agents).is_empty());

    // Spec change (a new source): the old version is unloaded and the new one loaded in place.
    let mut changed = a.clone().generation(2);
    changed.spec.source = crate::crd::AdapterSource {
        hugging_face: None,
        uri: Some("https://adapters.example/sql-v2".into()),
        sha256: None,
    };
    w.adapter(&changed);
    reconcile_adapter(&w, &changed).await;
    assert_eq!(
        w.api.take_lines(),
        [format!("PATCH {LORA}/sql-expert/status")]
    );
    assert_eq!(
        w.agent_writes(&agents),
        [unload(0), load(0), unload(1), load(1)]
    );
    let st = w
        .stored_adapter("team-a", "sql-expert")
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        st.digest,
        Some(crate::fake_agent::digest_of(
            "https://adapters.example/sql-v2"
        ))
    );
    assert_eq!(st.observed_generation, Some(2));

    // Delete: the finalizer unloads it everywhere, records an Event, then lets it go.
    let deleting = w.stored_adapter("team-a", "sql-expert").unwrap().deleting();
    w.adapter(&deleting);
    reconcile_adapter(&w, &deleting).await;
    assert_eq!(
        w.api.take_lines(),
        [
            "POST /apis/events.k8s.io/v1/namespaces/team-a/events".to_owned(),
            format!("PATCH {LORA}/sql-expert"),
        ]
    );
    assert_eq!(w.agent_writes(&agents), [unload(0), unload(1)]);
    assert!(
        w.stored_adapter("team-a", "sql-expert").is_none(),
        "the finalizer was the last one"
    );
    assert!(agents.iter().all(|a| {
        !w.agents
            .with(*a, |f| f.has("team-a", "sql-expert"))
            .unwrap()
    }));
    assert_rbac(&w);
}

/// Converges the adapter (finalizer, then placement) and returns it as stored.
async fn converged(w: &World, a: &LoraAdapter) -> LoraAdapter {
    reconcile_adapter(w, a).await;
    let a = w.stored_adapter("team-a", "sql-expert").unwrap();
    reconcile_adapter(w, &a).await;
    w.api.take_lines();
    w.stored_adapter("team-a", "sql-expert").unwrap()
}

#[tokio::test]
async fn an_agent_restart_gets_its_adapters_back_without_a_status_write() {
    let (mut w, m, agents, a) = adapter_world(Some(2));
    let a = converged(&w, &a).await;
    w.agent_writes(&agents);
    w.restart_agent(&m, Role::Unified, 0, 1);
    assert!(
        !w.agents
            .with(agents[0], |f| f.has("team-a", "sql-expert"))
            .unwrap()
    );
    reconcile_adapter(&w, &a).await;
    assert_eq!(
        w.agent_writes(&agents),
        [format!("{}: LoadAdapter team-a/sql-expert", agents[0])]
    );
    assert!(
        w.api.take_lines().is_empty(),
        "same placements: status unchanged"
    );
    assert!(
        w.agents
            .with(agents[0], |f| f.has("team-a", "sql-expert"))
            .unwrap()
    );
}

#[tokio::test]
async fn a_vanished_agent_is_replaced_and_a_new_one_gets_on_demand_adapters() {
    let (mut w, m, agents, a) = adapter_world(Some(2));
    let a = converged(&w, &a).await;
    w.agent_writes(&agents);
    w.remove_agent(&m, Role::Unified, 1);
    reconcile_adapter(&w, &a).await;
    assert_eq!(
        w.agent_writes(&agents),
        [format!("{}: LoadAdapter team-a/sql-expert", agents[2])]
    );
    assert_eq!(
        w.api.take_lines(),
        [format!("PATCH {LORA}/sql-expert/status")]
    );
    let st = w
        .stored_adapter("team-a", "sql-expert")
        .unwrap()
        .status
        .unwrap();
    let pods: Vec<&str> = st.placements.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(pods, ["llama3-8b-unified-0", "llama3-8b-unified-2"]);

    // On demand: every agent, including one added by a scale-up.
    let (mut w, m, agents, a) = adapter_world(None);
    let a = converged(&w, &a).await;
    assert_eq!(a.status.as_ref().unwrap().ready_replicas, 3);
    w.agent_writes(&agents);
    let added = w.agent(&m, Role::Unified, 3, GIB);
    reconcile_adapter(&w, &a).await;
    assert_eq!(
        w.agent_writes(&[agents[0], agents[1], agents[2], added]),
        [format!("{added}: LoadAdapter team-a/sql-expert")]
    );
    assert_eq!(
        w.api.take_lines(),
        [format!("PATCH {LORA}/sql-expert/status")]
    );
    let pinned = w.agents.with(added, |f| f.adapters()[0].pinned).unwrap();
    assert!(!pinned, "on-demand adapters are not pinned");
}

#[tokio::test]
async fn disaggregated_models_get_the_adapter_on_prefill_and_decode_agents() {
    let mut w = World::new();
    let m = BaseModel::test().disaggregated(2, 2).allow(&["team-a"]);
    w.model(&m);
    let p: Vec<_> = (0..2).map(|i| w.agent(&m, Role::Prefill, i, GIB)).collect();
    let d: Vec<_> = (0..2).map(|i| w.agent(&m, Role::Decode, i, GIB)).collect();
    let a = LoraAdapter::test().replicas(1);
    w.adapter(&a);
    let a = converged(&w, &a).await;
    let st = a.status.unwrap();
    let roles: Vec<&str> = st.placements.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles, ["decode", "prefill"]);
    assert_eq!(st.phase, Some(Phase::Ready));
    assert!(
        w.agents
            .with(p[0], |f| f.has("team-a", "sql-expert"))
            .unwrap()
    );
    assert!(
        w.agents
            .with(d[0], |f| f.has("team-a", "sql-expert"))
            .unwrap()
    );
}

#[tokio::test]
async fn admission_failures_leave_the_adapter_pending_with_a_reason() {
    // Not admitted.
    let (mut w, _m, agents, _) = adapter_world(Some(1));
    let other = LoraAdapter::test().in_namespace("team-b").finalized();
    w.adapter(&other);
    reconcile_adapter(&w, &other).await;
    let st = w
        .stored_adapter("team-b", "sql-expert")
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(st.conditions[0].reason, "NamespaceNotAdmitted");
    assert!(w.agent_writes(&agents).is_empty());

    // No such base model.
    let mut orphan = LoraAdapter::test().named("orphan").finalized();
    orphan.spec.base_model.name = "nope".into();
    w.adapter(&orphan);
    reconcile_adapter(&w, &orphan).await;
    let st = w
        .stored_adapter("team-a", "orphan")
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.conditions[0].reason, "BaseModelNotFound");

    // Over the namespace's quota: the older adapter runs, the newer waits.
    w.namespace(namespace(
        "team-a",
        &[],
        &[("loraplane.dev/max-adapters", "1")],
    ));
    let old = LoraAdapter::test()
        .named("old")
        .created_at(1_000)
        .finalized();
    let new = LoraAdapter::test()
        .named("new")
        .created_at(2_000)
        .finalized();
    w.adapter(&old);
    w.adapter(&new);
    w.adapter(&orphan.clone().created_at(3_000));
    reconcile_adapter(&w, &old).await;
    reconcile_adapter(&w, &new).await;
    let phase = |n: &str| w.stored_adapter("team-a", n).unwrap().status.unwrap().phase;
    assert_eq!(phase("old"), Some(Phase::Ready));
    assert_eq!(phase("new"), Some(Phase::Pending));
    let st = w.stored_adapter("team-a", "new").unwrap().status.unwrap();
    assert_eq!(st.conditions[0].reason, "QuotaExceeded");
    assert_rbac(&w);
}

#[tokio::test]
async fn a_refused_adapter_fails_and_a_full_fleet_waits() {
    let (mut w, _m, agents, _) = adapter_world(Some(2));
    let bad = LoraAdapter::test()
        .named("bad")
        .uri("https://adapters.example/invalid")
        .finalized();
    w.adapter(&bad);
    reconcile_adapter(&w, &bad).await;
    let st = w.stored_adapter("team-a", "bad").unwrap().status.unwrap();
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(st.conditions[0].reason, "LoadRejected");
    assert!(
        st.placements
            .iter()
            .all(|p| p.state == PlacementState::Failed)
    );
    let event = w.api.history().last().unwrap().body.clone();
    assert_eq!(event["type"], "Warning");
    w.agent_writes(&agents);

    let huge = LoraAdapter::test()
        .named("huge")
        .replicas(2)
        .uri(&format!("https://adapters.example/huge?size={}", 2 * GIB))
        .finalized()
        .with_status(Some(crate::crd::LoraAdapterStatus {
            size_bytes: Some(2 * GIB),
            ..Default::default()
        }));
    w.adapter(&huge);
    let action = reconcile_adapter(&w, &huge).await;
    let st = w.stored_adapter("team-a", "huge").unwrap().status.unwrap();
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(st.conditions[0].reason, "InsufficientCapacity");
    assert!(
        w.agent_writes(&agents).is_empty(),
        "nothing is tried where it cannot fit"
    );
    assert_eq!(
        action,
        Action::requeue(w.ctx.settings.progress),
        "retried with backoff"
    );
}

#[test]
fn backoff_doubles_and_caps() {
    let (base, max) = (Duration::from_secs(1), Duration::from_secs(10));
    let got: Vec<u64> = (1..=6).map(|n| delay(n, base, max).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 8, 10, 10]);
    let b = Backoff::default();
    assert_eq!(b.fail("x", base, max), Duration::from_secs(1));
    assert_eq!(b.fail("x", base, max), Duration::from_secs(2));
    b.reset("x");
    assert_eq!(b.fail("x", base, max), Duration::from_secs(1));
}

#[tokio::test]
async fn errors_are_counted_by_kind_and_backed_off() {
    let w = World::new();
    let err = Error::Token("missing".into());
    let a = w.ctx.on_error("basemodel", "k", &err);
    let b = w.ctx.on_error("basemodel", "k", &err);
    assert_eq!(
        (a, b),
        (
            Action::requeue(Duration::from_secs(1)),
            Action::requeue(Duration::from_secs(2))
        )
    );
    assert!(w.metrics.render().contains(
        r#"loraplane_operator_reconcile_errors_total{controller="basemodel",kind="admin_token"} 2"#
    ));
}
