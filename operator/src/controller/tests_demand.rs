//! Scenario tests of demand-following adapter replicas (`spec.replicas: {min, max}`): the
//! LoraAdapter reconciler against the mock API server and in-memory fake agents whose request
//! counters the tests drive, on a paused clock (the fleet's snapshots expire with it, so every
//! reconcile 30 s apart reads fresh counters). Growth, shrink, hysteresis, the churn bound and
//! the namespace's replica quota; the Kubernetes calls and agent writes are pinned.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::tests::lines;
use super::*;
use crate::crd::{AdapterReplicas, Phase, ScalingStatus};
use crate::fixtures::namespace;
use crate::fixtures::world::World;
use crate::placement::demand::rendezvous_score;
use crate::role::Role;

const GIB: u64 = 1 << 30;
const LORA: &str = "/apis/loraplane.dev/v1alpha1/namespaces/team-a/loraadapters";
const EVENTS: &str = "POST /apis/events.k8s.io/v1/namespaces/team-a/events";
const SECRET: &str = "GET /api/v1/namespaces/loraplane-system/secrets/llama3-8b-agent-credentials";
/// The fleet's snapshot TTL (Settings::default()), the cadence of the counters.
const TICK: Duration = Duration::from_secs(30);

/// A model with `n` unified agents admitting `team-a`.
fn world(n: usize, settings: Settings) -> (World, BaseModel, Vec<SocketAddr>) {
    let mut w = World::with_settings(settings);
    let m = BaseModel::test()
        .unified(i32::try_from(n).unwrap())
        .allow(&["team-a"]);
    w.model(&m);
    let addrs = (0..n).map(|i| w.agent(&m, Role::Unified, i, GIB)).collect();
    (w, m, addrs)
}

async fn reconcile(w: &World, a: &LoraAdapter) -> Action {
    lora_adapter::reconcile(Arc::new(a.clone()), w.ctx.clone())
        .await
        .unwrap()
}

/// Reconciles the stored adapter `name` once; returns its new status.
async fn step(w: &World, name: &str) -> crate::crd::LoraAdapterStatus {
    let a = w.stored_adapter("team-a", name).unwrap();
    reconcile(w, &a).await;
    w.stored_adapter("team-a", name).unwrap().status.unwrap()
}

/// Puts the adapter in the world and reconciles it twice (finalizer, first placement).
async fn create(w: &mut World, a: LoraAdapter) -> crate::crd::LoraAdapterStatus {
    w.adapter(&a);
    reconcile(w, &a).await;
    step(w, &a.metadata.name.clone().unwrap()).await
}

/// `rps` requests per second on adapter `name` for one tick, served by the agents that hold
/// it (all on the first: the rate is the sum), then the clock moves on by the tick.
fn serve(w: &World, agents: &[SocketAddr], name: &str, rps: u64) {
    let n = rps * TICK.as_secs();
    let served = agents.iter().any(|a| {
        w.agents
            .with(*a, |f| f.serve_requests("team-a", name, n))
            .unwrap()
    });
    assert!(served || n == 0, "no agent holds {name}");
}

async fn tick() {
    tokio::time::advance(TICK).await;
}

/// The pods holding adapter `name`.
fn holders(w: &World, agents: &[SocketAddr], name: &str) -> BTreeSet<String> {
    agents
        .iter()
        .enumerate()
        .filter(|(_, a)| w.agents.with(**a, |f| f.has("team-a", name)).unwrap())
        .map(|(i, _)| format!("llama3-8b-unified-{i}"))
        .collect()
}

/// The model's pods in the rendezvous order of adapter `name`.
fn rendezvous(name: &str, n: usize) -> Vec<String> {
    let mut pods: Vec<String> = (0..n).map(|i| format!("llama3-8b-unified-{i}")).collect();
    pods.sort_by_key(|p| std::cmp::Reverse(rendezvous_score(&format!("team-a/{name}"), p)));
    pods
}

fn scaling(st: &crate::crd::LoraAdapterStatus) -> (&str, u32, u64) {
    let s: &ScalingStatus = st.scaling.as_ref().unwrap();
    (s.reason.as_str(), s.desired_replicas, s.requests_per_minute)
}

fn loads(writes: &[String]) -> usize {
    writes.iter().filter(|c| c.contains("LoadAdapter")).count()
}

fn unloads(writes: &[String]) -> usize {
    writes
        .iter()
        .filter(|c| c.contains("UnloadAdapter"))
        .count()
}

#[tokio::test(start_paused = true)]
async fn grows_on_sustained_demand_and_shrinks_after_the_stabilisation_window() {
    let (mut w, _m, agents) = world(4, Settings::default());
    let a = LoraAdapter::test().auto_replicas(1, 3, 1.0, 30, 120);
    let order = rendezvous("sql-expert", 4);

    // First placement: `min` replicas on the adapter's first rendezvous choice, an Event
    // saying where, status, the phase Event.
    w.adapter(&a);
    reconcile(&w, &a).await;
    w.api.take_lines();
    let st = step(&w, "sql-expert").await;
    assert_eq!(
        w.api.take_lines(),
        lines(&[
            SECRET,
            EVENTS,
            &format!("PATCH {LORA}/sql-expert/status"),
            EVENTS,
        ])
    );
    let history = w.api.history();
    assert_eq!(history[history.len() - 3].body["reason"], "Placed");
    assert_eq!(scaling(&st), ("Steady", 1, 0));
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(
        holders(&w, &agents, "sql-expert"),
        order[..1].iter().cloned().collect()
    );
    w.agent_writes(&agents);

    // 3 req/s for one interval: wanted, not yet sustained over the 30 s window.
    serve(&w, &agents, "sql-expert", 3);
    tick().await;
    let st = step(&w, "sql-expert").await;
    assert_eq!(scaling(&st), ("AwaitingSustainedDemand", 1, 180));
    assert!(w.agent_writes(&agents).is_empty());
    assert_eq!(
        w.api.take_lines(),
        [format!("PATCH {LORA}/sql-expert/status")],
        "the new decision is in the status, no Event without a change"
    );

    // Sustained: grown to 3 along the rendezvous order, with an Event.
    serve(&w, &agents, "sql-expert", 3);
    tick().await;
    let st = step(&w, "sql-expert").await;
    assert_eq!(scaling(&st), ("ScaledUp", 3, 180));
    assert_eq!(loads(&w.agent_writes(&agents)), 2);
    assert_eq!(
        holders(&w, &agents, "sql-expert"),
        order[..3].iter().cloned().collect()
    );
    assert_eq!(st.ready_replicas, 3);
    let lines_now = w.api.take_lines();
    assert_eq!(lines_now[0], EVENTS);
    let event = w
        .api
        .history()
        .into_iter()
        .rev()
        .find(|c| c.path.ends_with("/events"))
        .unwrap()
        .body;
    assert_eq!(event["reason"], "ScaledUp");
    assert!(
        event["note"].as_str().unwrap().starts_with("loaded on "),
        "{event}"
    );

    // Demand stops: nothing is released while the 120 s window still holds the 3.
    for _ in 0..4 {
        tick().await;
        let st = step(&w, "sql-expert").await;
        assert_eq!(scaling(&st), ("StabilizingScaleDown", 3, 0));
        assert!(w.agent_writes(&agents).is_empty());
    }
    // The window now holds only 1-replica demand: released from the end of the rendezvous order.
    tick().await;
    let st = step(&w, "sql-expert").await;
    assert_eq!(scaling(&st), ("ScaledDown", 1, 0));
    assert_eq!(unloads(&w.agent_writes(&agents)), 2);
    assert_eq!(
        holders(&w, &agents, "sql-expert"),
        order[..1].iter().cloned().collect()
    );
    assert_eq!(st.ready_replicas, 1);
}

#[tokio::test(start_paused = true)]
async fn a_burst_shorter_than_the_window_loads_nothing() {
    let (mut w, _m, agents) = world(4, Settings::default());
    let a = LoraAdapter::test().auto_replicas(1, 4, 1.0, 60, 120);
    create(&mut w, a).await;
    w.agent_writes(&agents);
    // Quiet, one 30 s burst of 10 req/s, quiet again: the 60 s window never holds only it.
    for rps in [0, 0, 10, 0, 0, 0] {
        serve(&w, &agents, "sql-expert", rps);
        tick().await;
        let st = step(&w, "sql-expert").await;
        assert_eq!(st.scaling.as_ref().unwrap().desired_replicas, 1);
    }
    assert!(w.agent_writes(&agents).is_empty(), "no churn from a burst");
}

#[tokio::test(start_paused = true)]
async fn loads_per_minute_are_bounded_across_a_popularity_jump() {
    let settings = Settings {
        adapter_loads_per_minute: 2,
        ..Settings::default()
    };
    let (mut w, _m, agents) = world(6, settings);
    let a = LoraAdapter::test().auto_replicas(1, 6, 1.0, 0, 300);
    create(&mut w, a).await;
    // The first load (up to `min`) is not budgeted; growth beyond it is.
    let mut load_times: Vec<Duration> = Vec::new();
    let started = tokio::time::Instant::now();
    w.agent_writes(&agents);
    let mut reasons = Vec::new();
    for _ in 0..8 {
        serve(&w, &agents, "sql-expert", 6);
        tick().await;
        let st = step(&w, "sql-expert").await;
        reasons.push(scaling(&st).0.to_owned());
        let n = loads(&w.agent_writes(&agents));
        load_times.extend(std::iter::repeat_n(started.elapsed(), n));
        assert_eq!(
            st.phase,
            Some(Phase::Ready),
            "held-back loads are not failures"
        );
    }
    assert_eq!(holders(&w, &agents, "sql-expert").len(), 6, "it gets there");
    assert!(reasons.contains(&"ChurnLimited".to_owned()), "{reasons:?}");
    assert_eq!(reasons.last().map(String::as_str), Some("Steady"));
    // No sliding minute holds more than two loads.
    for t in &load_times {
        let within = load_times
            .iter()
            .filter(|u| **u >= *t && **u < *t + Duration::from_secs(60))
            .count();
        assert!(within <= 2, "{load_times:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_namespace_replica_quota_caps_growth() {
    let (mut w, _m, agents) = world(4, Settings::default());
    w.namespace(namespace(
        "team-a",
        &[],
        &[("loraplane.dev/max-adapter-replicas", "3")],
    ));
    for name in ["one", "two"] {
        let a = LoraAdapter::test()
            .named(name)
            .auto_replicas(1, 4, 1.0, 0, 300);
        create(&mut w, a).await;
    }
    for _ in 0..3 {
        serve(&w, &agents, "one", 4);
        serve(&w, &agents, "two", 4);
        tick().await;
        step(&w, "one").await;
        step(&w, "two").await;
    }
    let (one, two) = (
        holders(&w, &agents, "one").len(),
        holders(&w, &agents, "two").len(),
    );
    assert_eq!(
        (one, two),
        (2, 1),
        "3 replicas in all, the first asker grew"
    );
    let st = w.stored_adapter("team-a", "two").unwrap().status.unwrap();
    assert_eq!(scaling(&st).0, "TenantQuota");
    assert!(
        st.scaling.unwrap().message.contains("quota"),
        "the status says why"
    );
}

#[tokio::test]
async fn an_invalid_replicas_value_fails_without_touching_agents() {
    let (mut w, _m, agents) = world(2, Settings::default());
    for (name, v) in [
        ("words", serde_json::json!("many")),
        ("zero-min", serde_json::json!({"min": 0, "max": 2})),
        ("upside-down", serde_json::json!({"min": 3, "max": 2})),
        ("zero", serde_json::json!(0)),
    ] {
        let mut a = LoraAdapter::test().named(name);
        a.spec.replicas = Some(serde_json::from_value(v).unwrap());
        let st = create(&mut w, a).await;
        assert_eq!(st.phase, Some(Phase::Failed), "{name}");
        assert_eq!(st.conditions[0].reason, "InvalidSpec", "{name}");
    }
    assert!(w.agent_writes(&agents).is_empty());
    // A fixed count and a range both still parse as themselves.
    let fixed: AdapterReplicas = serde_json::from_value(serde_json::json!(2)).unwrap();
    assert_eq!(fixed, AdapterReplicas::Fixed(2));
    let range: AdapterReplicas =
        serde_json::from_value(serde_json::json!({"min": 1, "max": 4})).unwrap();
    assert!(matches!(range, AdapterReplicas::Range(_)));
}
