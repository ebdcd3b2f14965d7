//! Bringing one adapter's placements on a model's agents in line with its spec, through the
//! Admin API only (no Kubernetes calls): sync the fleet snapshot, decide with
//! [`crate::placement::place`], reserve the room, run the loads and unloads concurrently
//! outside the fleet lock, record what the agents answered.
//!
//! A demand-following adapter (`replicas: {min, max}`) is first sized
//! ([`crate::placement::demand`]) from the request rates its holders reported, then placed
//! sticky (rendezvous order); its new holders beyond the model's loads-per-minute budget wait
//! for a later reconcile.
//!
//! An agent that restarted shows a new incarnation (or a `ListAdapters` without the adapter):
//! it is no longer a holder, so the plan loads the adapter there again. An agent that holds an
//! older version (another source or digest) is unloaded first and loaded again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::future::join_all;
use kube::ResourceExt;
use loraplane_proto::v1 as pb;

use tokio::time::Instant;

use super::fleet::{AdapterKey, Fleet};
use crate::agent_client::{AgentApi, AgentError};
use crate::crd::{AdapterReplicas, AutoReplicas, LoraAdapter, Replicas, ScalingStatus};
use crate::discovery::Agent;
use crate::placement::demand::{Decision, LoadBudget, ScaleReason, rendezvous_score};
use crate::placement::{self, Demand};
use crate::role::Role;
use crate::status::{Converged, PlacementOutcome};

/// An adapter as the agents see it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWant {
    /// The namespace.
    pub tenant: String,
    pub name: String,
    pub source_uri: String,
    /// Bare lowercase hex.
    pub expected_sha256: Option<String>,
    /// On demand, fixed or demand-following.
    pub replicas: Replicas,
    /// Known size (from status), used for capacity before the first load reports it.
    pub size_hint: u64,
    /// Pinned replicas per role the namespace's adapters may hold together on this model
    /// (`loraplane.dev/max-adapter-replicas`); `None` = no quota. Caps demand-following growth.
    pub replica_quota: Option<u32>,
}

impl AdapterWant {
    pub fn from_adapter(a: &LoraAdapter) -> Self {
        // The reconciler refuses an invalid value before converging (and passes the resolved
        // one to [`Self::with_replicas`]); the key is all that the other callers (the
        // finalizer) need.
        let replicas =
            AdapterReplicas::resolve(a.spec.replicas.as_ref()).unwrap_or(Replicas::OnDemand);
        Self::with_replicas(a, replicas)
    }

    /// The adapter with `replicas` already resolved from its `spec.replicas`.
    pub fn with_replicas(a: &LoraAdapter, replicas: Replicas) -> Self {
        AdapterWant {
            tenant: a.namespace().unwrap_or_default(),
            name: a.name_any(),
            source_uri: a.spec.source.to_uri(),
            expected_sha256: a.spec.source.expected_sha256(),
            replicas,
            size_hint: a.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(0),
            replica_quota: None,
        }
    }

    pub fn key(&self) -> AdapterKey {
        (self.tenant.clone(), self.name.clone())
    }

    fn adapter_ref(&self) -> pb::AdapterRef {
        pb::AdapterRef {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
        }
    }

    /// Whether an agent's copy is this version of the adapter.
    pub fn matches(&self, info: &pb::AdapterInfo) -> bool {
        info.source_uri == self.source_uri
            && self
                .expected_sha256
                .as_ref()
                .is_none_or(|e| info.digest.trim_start_matches("sha256:") == e)
    }
}

/// How a converge is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long an agent snapshot is reused.
    pub ttl: Duration,
    /// Loads demand-following adapters may start per minute on one model (0 = unbounded).
    pub loads_per_minute: u32,
}

/// Work the convergence did (for metrics and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub loads: u32,
    pub unloads: u32,
}

#[derive(Debug, Default)]
struct Step {
    unload: bool,
    load: bool,
}

#[derive(Debug)]
struct StepResult {
    pod: String,
    unload: Option<Result<bool, AgentError>>,
    load: Option<Result<pb::AdapterInfo, AgentError>>,
}

/// Converges one adapter on the agents of `roles` (`want = None` removes it everywhere, for
/// an adapter that is no longer admitted).
pub async fn converge(
    api: &dyn AgentApi,
    fleet: &tokio::sync::Mutex<Fleet>,
    discovered: &[Agent],
    roles: &[Role],
    want: &AdapterWant,
    limits: Limits,
) -> (Converged, Work) {
    let key = want.key();
    let mut f = fleet.lock().await;
    f.sync(api, discovered, limits.ttl).await;
    if f.token.is_none() {
        return (Converged::default(), Work::default());
    }
    let mut holders = BTreeSet::new();
    let mut present = BTreeSet::new();
    let mut size = want.size_hint;
    let mut info_of_holder: Option<pb::AdapterInfo> = None;
    let mut pinned_on: BTreeSet<String> = BTreeSet::new();
    for (pod, e) in &f.agents {
        let Some(info) = e.snapshot.as_ref().and_then(|s| s.get(&key)) else {
            continue;
        };
        present.insert(pod.clone());
        if want.matches(info) {
            holders.insert(pod.clone());
            size = size.max(info.size_bytes);
            if info.pinned {
                pinned_on.insert(pod.clone());
            }
            if info_of_holder.is_none() && !info.digest.is_empty() {
                info_of_holder = Some(info.clone());
            }
        }
    }
    if size == 0 {
        // Not loaded anywhere yet: assume the fleet's typical adapter, so that concurrent
        // placements see each other's reservations and spread.
        size = f.mean_adapter_bytes();
    }
    let now = Instant::now();
    let sticky_key = format!("{}/{}", want.tenant, want.name);
    let (replicas, mut sizing) = match want.replicas {
        Replicas::OnDemand => (None, None),
        Replicas::Fixed(k) => (Some(k), None),
        Replicas::Auto(spec) => {
            let d = size_by_demand(&mut f, &spec, want, &present, roles, now);
            (Some(d.replicas), Some((spec, d)))
        }
    };
    // Agents with an older version count as holders for placement (the new version goes where
    // the old one was, no churn); they are reloaded below.
    let mut plan = placement::place(
        &Demand {
            replicas,
            size_bytes: size,
            holders: &present,
            sticky: sizing.as_ref().map(|_| sticky_key.as_str()),
        },
        &f.loads(),
        roles,
    );
    let mut deferred = 0;
    if let Some((spec, d)) = sizing.as_mut() {
        let lpm = limits.loads_per_minute;
        let budget = f.load_budget.get_or_insert_with(|| LoadBudget::new(lpm));
        deferred = bound_loads(
            &mut plan,
            &present,
            spec.min,
            &sticky_key,
            budget,
            now.into_std(),
        );
        if deferred > 0 {
            d.reason = ScaleReason::ChurnLimited;
        } else if plan.shortfall() > 0 {
            d.reason = ScaleReason::InsufficientCapacity;
        }
    }
    let targets = plan.targets();
    let mut steps: BTreeMap<String, Step> = BTreeMap::new();
    for t in &targets {
        let holds = holders.contains(t);
        if !holds || (plan.pin && !pinned_on.contains(t)) {
            let s = steps.entry(t.clone()).or_default();
            s.load = true;
            // An older version is removed first: a load of the same name with new files
            // must not be answered with the cached old ones.
            s.unload = present.contains(t) && !holds;
        }
    }
    for p in present.difference(&targets) {
        steps.entry(p.clone()).or_default().unload = true;
    }
    // Reserve the room before letting go of the lock.
    for (pod, s) in &steps {
        if s.load {
            f.record_load(
                pod,
                pb::AdapterInfo {
                    adapter: Some(want.adapter_ref()),
                    size_bytes: size,
                    pinned: plan.pin,
                    source_uri: want.source_uri.clone(),
                    ..pb::AdapterInfo::default()
                },
            );
        }
    }
    let calls: Vec<_> = steps
        .iter()
        .filter_map(|(pod, s)| {
            let target = f.agents.get(pod).and_then(|e| f.target(&e.agent))?;
            Some((pod.clone(), target, s.unload, s.load))
        })
        .collect();
    drop(f);
    let results: Vec<StepResult> =
        join_all(calls.iter().map(|(pod, target, unload, load)| async move {
            let unload = if *unload {
                Some(api.unload(target, want.adapter_ref()).await)
            } else {
                None
            };
            let load = if *load && unload.as_ref().is_none_or(|r| r.is_ok()) {
                Some(
                    api.load(
                        target,
                        pb::LoadAdapterRequest {
                            adapter: Some(want.adapter_ref()),
                            source_uri: want.source_uri.clone(),
                            expected_sha256: want.expected_sha256.clone().unwrap_or_default(),
                            pin: plan.pin,
                        },
                    )
                    .await,
                )
            } else {
                None
            };
            StepResult {
                pod: pod.clone(),
                unload,
                load,
            }
        }))
        .await;
    let mut f = fleet.lock().await;
    let mut work = Work::default();
    let mut errors: BTreeMap<String, AgentError> = BTreeMap::new();
    let mut loaded_info = info_of_holder;
    let (mut loaded_on, mut unloaded_from) = (Vec::new(), Vec::new());
    for r in results {
        match r.unload {
            Some(Ok(_)) => {
                work.unloads += 1;
                if !targets.contains(&r.pod) {
                    unloaded_from.push(r.pod.clone());
                }
                if r.load.is_none() {
                    f.record_unload(&r.pod, &key);
                }
            }
            Some(Err(e)) => {
                f.invalidate(&r.pod);
                errors.insert(r.pod.clone(), e);
            }
            None => {}
        }
        match r.load {
            Some(Ok(info)) => {
                work.loads += 1;
                if !holders.contains(&r.pod) {
                    loaded_on.push(r.pod.clone());
                }
                if loaded_info.is_none() {
                    loaded_info = Some(info.clone());
                }
                f.record_load(&r.pod, info);
            }
            Some(Err(e)) => {
                f.record_unload(&r.pod, &key);
                if !matches!(
                    e,
                    AgentError::Rejected { .. } | AgentError::Exhausted { .. }
                ) {
                    f.invalidate(&r.pod);
                }
                if matches!(e, AgentError::Unauthenticated { .. }) {
                    f.token = None;
                }
                errors.insert(r.pod.clone(), e);
            }
            None => {}
        }
    }
    let role_of = |pod: &str| f.agents.get(pod).map_or(Role::Unified, |e| e.agent.role);
    let placements = targets
        .iter()
        .map(|pod| PlacementOutcome {
            pod: pod.clone(),
            role: role_of(pod),
            error: errors.get(pod).map(|e| (e.is_permanent(), e.message())),
        })
        .collect();
    let change = match (loaded_on.is_empty(), unloaded_from.is_empty()) {
        (true, true) => None,
        (false, true) => Some(format!("loaded on {}", loaded_on.join(", "))),
        (true, false) => Some(format!("unloaded from {}", unloaded_from.join(", "))),
        (false, false) => Some(format!(
            "loaded on {}; unloaded from {}",
            loaded_on.join(", "),
            unloaded_from.join(", ")
        )),
    };
    let scaling = sizing.map(|(spec, d)| ScalingStatus {
        // Whole requests per minute: finer changes are noise and would rewrite the status.
        requests_per_minute: (d.rate * 60.0).round().max(0.0) as u64,
        recommended_replicas: d.recommended,
        desired_replicas: d.replicas,
        reason: d.reason.as_str().to_owned(),
        message: d.message(&spec),
    });
    let converged = Converged {
        placements,
        // Loads deferred by the churn bound are wanted later, not missing now.
        wanted: plan.wanted().saturating_sub(deferred),
        shortfall: plan.shortfall(),
        scaling,
        change,
        rank: loaded_info.as_ref().map(|i| i.rank),
        target_modules: loaded_info
            .as_ref()
            .map(|i| i.target_modules.clone())
            .unwrap_or_default(),
        digest: loaded_info
            .as_ref()
            .map(|i| i.digest.clone())
            .filter(|d| !d.is_empty()),
        size_bytes: loaded_info.as_ref().map(|i| i.size_bytes),
    };
    (converged, work)
}

/// The demand-following decision for one adapter: its rate and current replicas from the
/// fleet, its tenant's remaining quota, then [`crate::placement::demand::Sizer::decide`].
fn size_by_demand(
    f: &mut Fleet,
    spec: &AutoReplicas,
    want: &AdapterWant,
    present: &BTreeSet<String>,
    roles: &[Role],
    now: Instant,
) -> Decision {
    let key = want.key();
    let rate = f.adapter_rate(&key);
    let current = roles
        .iter()
        .map(|r| {
            present
                .iter()
                .filter(|p| f.agents.get(*p).is_some_and(|e| e.agent.role == *r))
                .count()
        })
        .max()
        .unwrap_or(0);
    let cap = want
        .replica_quota
        .map(|q| q.saturating_sub(f.tenant_replicas(&want.tenant, &key)));
    f.sizers.entry(key).or_default().decide(
        spec,
        rate,
        u32::try_from(current).unwrap_or(u32::MAX),
        cap,
        now.into_std(),
    )
}

/// Holds back the new holders (agents without any copy) beyond the model's load budget, the
/// lowest ranked first; a later reconcile places them. Loads that bring a role up to `min` are
/// not budgeted (the floor the user asked for, as a fixed count would be). Returns how many
/// were held back.
fn bound_loads(
    plan: &mut placement::Plan,
    present: &BTreeSet<String>,
    min: u32,
    sticky_key: &str,
    budget: &mut LoadBudget,
    now: std::time::Instant,
) -> u32 {
    let mut budgeted: Vec<(u64, String)> = Vec::new();
    for r in &plan.roles {
        let held = r.targets.iter().filter(|t| present.contains(*t)).count();
        let mut new: Vec<(u64, String)> = r
            .targets
            .iter()
            .filter(|t| !present.contains(*t))
            .map(|t| (rendezvous_score(sticky_key, t), t.clone()))
            .collect();
        new.sort_by(|a, b| b.cmp(a));
        let free = (min as usize).saturating_sub(held).min(new.len());
        budgeted.extend(new.split_off(free));
    }
    let available = budget.available(now) as usize;
    budgeted.sort_by(|a, b| b.cmp(a));
    let held: BTreeSet<String> = if budgeted.len() > available {
        budgeted
            .split_off(available)
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    } else {
        BTreeSet::new()
    };
    budget.spend(u32::try_from(budgeted.len()).unwrap_or(u32::MAX), now);
    for r in &mut plan.roles {
        r.targets.retain(|t| !held.contains(t));
    }
    u32::try_from(held.len()).unwrap_or(u32::MAX)
}

/// Unloads an adapter from every agent of the fleet that holds it (the finalizer's cleanup).
///
/// Errors: the first agent that could not be reached or refused the unload; the caller retries
/// (agents that are not ready are not agents, and their copy dies with their process).
pub async fn remove_everywhere(
    api: &dyn AgentApi,
    fleet: &tokio::sync::Mutex<Fleet>,
    discovered: &[Agent],
    key: &AdapterKey,
    ttl: Duration,
) -> Result<u32, AgentError> {
    let mut f = fleet.lock().await;
    f.sync(api, discovered, ttl).await;
    if let Some(err) = f.agents.values().find_map(|e| e.error.clone()) {
        return Err(err);
    }
    let calls: Vec<_> = f
        .agents
        .values()
        .filter(|e| e.snapshot.as_ref().is_some_and(|s| s.contains(key)))
        .filter_map(|e| Some((e.agent.pod.clone(), f.target(&e.agent)?)))
        .collect();
    drop(f);
    let adapter = pb::AdapterRef {
        tenant: key.0.clone(),
        name: key.1.clone(),
    };
    let results = join_all(
        calls
            .iter()
            .map(|(pod, t)| async { (pod.clone(), api.unload(t, adapter.clone()).await) }),
    )
    .await;
    let mut f = fleet.lock().await;
    let mut removed = 0;
    let mut first_err = None;
    for (pod, r) in results {
        match r {
            Ok(_) => {
                removed += 1;
                f.record_unload(&pod, key);
            }
            Err(e) => {
                f.invalidate(&pod);
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}
