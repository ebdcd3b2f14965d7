//! The operator's view of one BaseModel's agents: who they are (from discovery), what each
//! holds and how much room it has (from `ListAdapters` and `GetStats`), and which tenant table
//! each incarnation last received. Shared by both controllers so 2,000 adapter reconciles do
//! not make 2,000 × agents calls: a snapshot is fetched when an agent is new, restarted
//! (a new incarnation), after a failed call, or once it is older than the TTL; every load and
//! unload the operator makes updates it in place.
//!
//! One async mutex per model serialises placement decisions on that model (two adapters must
//! not both see the same free room); the RPCs that change agents run outside it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use loraplane_proto::v1 as pb;
use tokio::time::Instant;

use crate::agent_client::{AgentApi, AgentError, Target};
use crate::discovery::Agent;
use crate::placement::AgentLoad;

/// An adapter's key on an agent: (tenant, name).
pub type AdapterKey = (String, String);

/// What one agent reported.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub fetched: Instant,
    pub capacity_bytes: u64,
    pub adapters: HashMap<AdapterKey, pb::AdapterInfo>,
}

impl Snapshot {
    pub fn pinned(&self) -> (u64, u32) {
        self.adapters
            .values()
            .filter(|a| a.pinned)
            .fold((0, 0), |(b, n), a| (b + a.size_bytes, n + 1))
    }
}

/// One agent and what is known of it.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub agent: Agent,
    pub snapshot: Option<Snapshot>,
    /// Hash of the tenant table this incarnation acknowledged.
    pub tenants_pushed: Option<String>,
    /// Why the last snapshot fetch failed.
    pub error: Option<AgentError>,
}

/// One model's agents.
#[derive(Debug, Default)]
pub struct Fleet {
    /// The model's admin token (read from its Secret).
    pub token: Option<Arc<str>>,
    pub agents: BTreeMap<String, AgentEntry>,
}

impl Fleet {
    /// The call target of an agent.
    pub fn target(&self, agent: &Agent) -> Option<Target> {
        self.token.as_ref().map(|token| Target {
            addr: agent.addr,
            token: token.clone(),
        })
    }

    /// Brings the agent set in line with discovery (dropping gone agents, resetting restarted
    /// ones) and fetches every snapshot that is missing or older than `ttl`.
    ///
    /// Agents whose fetch fails stay without a snapshot (and out of placement) with the error
    /// recorded; an `Unauthenticated` answer also forgets the token so it is read again.
    pub async fn sync(&mut self, api: &dyn AgentApi, discovered: &[Agent], ttl: Duration) {
        let now = Instant::now();
        self.agents
            .retain(|pod, _| discovered.iter().any(|a| &a.pod == pod));
        for a in discovered {
            match self.agents.get_mut(&a.pod) {
                Some(e) if e.agent == *a => {}
                Some(e) => {
                    *e = AgentEntry {
                        agent: a.clone(),
                        snapshot: None,
                        tenants_pushed: None,
                        error: None,
                    }
                }
                None => {
                    self.agents.insert(
                        a.pod.clone(),
                        AgentEntry {
                            agent: a.clone(),
                            snapshot: None,
                            tenants_pushed: None,
                            error: None,
                        },
                    );
                }
            }
        }
        let Some(token) = self.token.clone() else {
            return;
        };
        let stale: Vec<(String, Target)> = self
            .agents
            .values()
            .filter(|e| {
                e.snapshot
                    .as_ref()
                    .is_none_or(|s| now.duration_since(s.fetched) >= ttl)
            })
            .map(|e| {
                (
                    e.agent.pod.clone(),
                    Target {
                        addr: e.agent.addr,
                        token: token.clone(),
                    },
                )
            })
            .collect();
        let fetched = join_all(stale.iter().map(|(pod, t)| async move {
            let stats = api.stats(t).await;
            let list = match &stats {
                Ok(_) => api.list_adapters(t).await,
                Err(e) => Err(e.clone()),
            };
            (pod.clone(), stats, list)
        }))
        .await;
        for (pod, stats, list) in fetched {
            let Some(e) = self.agents.get_mut(&pod) else {
                continue;
            };
            match (stats, list) {
                (Ok(stats), Ok(list)) => {
                    e.snapshot = Some(Snapshot {
                        fetched: now,
                        capacity_bytes: stats.host_cache.map_or(0, |h| h.capacity_bytes),
                        adapters: list
                            .into_iter()
                            .filter_map(|info| {
                                let r = info.adapter.clone()?;
                                Some(((r.tenant, r.name), info))
                            })
                            .collect(),
                    });
                    e.error = None;
                }
                (Err(err), _) | (_, Err(err)) => {
                    if matches!(err, AgentError::Unauthenticated { .. }) {
                        self.token = None;
                    }
                    e.snapshot = None;
                    e.error = Some(err);
                }
            }
        }
    }

    /// Placement's view of the agents that have a snapshot.
    pub fn loads(&self) -> Vec<AgentLoad> {
        self.agents
            .values()
            .filter_map(|e| {
                let s = e.snapshot.as_ref()?;
                let (pinned_bytes, pinned_adapters) = s.pinned();
                Some(AgentLoad {
                    pod: e.agent.pod.clone(),
                    role: e.agent.role,
                    node: e.agent.node.clone(),
                    capacity_bytes: s.capacity_bytes,
                    pinned_bytes,
                    pinned_adapters,
                })
            })
            .collect()
    }

    /// Records an adapter an agent now holds (after a load, or a reservation before one).
    pub fn record_load(&mut self, pod: &str, info: pb::AdapterInfo) {
        if let Some(s) = self.agents.get_mut(pod).and_then(|e| e.snapshot.as_mut())
            && let Some(r) = info.adapter.clone()
        {
            s.adapters.insert((r.tenant, r.name), info);
        }
    }

    /// Records that an agent no longer holds an adapter.
    pub fn record_unload(&mut self, pod: &str, key: &AdapterKey) {
        if let Some(s) = self.agents.get_mut(pod).and_then(|e| e.snapshot.as_mut()) {
            s.adapters.remove(key);
        }
    }

    /// Forgets an agent's snapshot so the next sync fetches it again (after a failed call).
    pub fn invalidate(&mut self, pod: &str) {
        if let Some(e) = self.agents.get_mut(pod) {
            e.snapshot = None;
        }
    }
}

/// Every model's fleet, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Fleets {
    inner: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Fleet>>>>,
}

impl Fleets {
    /// The fleet of a model (created empty on first use).
    pub fn get(&self, namespace: &str, name: &str) -> Arc<tokio::sync::Mutex<Fleet>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .entry(format!("{namespace}/{name}"))
            .or_default()
            .clone()
    }

    /// Forgets a model's fleet (the model is gone).
    pub fn remove(&self, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.remove(&format!("{namespace}/{name}"));
    }
}
