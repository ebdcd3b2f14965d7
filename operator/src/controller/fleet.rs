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

/// What one agent reported, with running totals kept in step by [`Snapshot::insert`] and
/// [`Snapshot::remove`] (placement reads them once per adapter: they must not cost a scan).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub fetched: Instant,
    pub capacity_bytes: u64,
    adapters: HashMap<AdapterKey, pb::AdapterInfo>,
    pinned_bytes: u64,
    pinned_count: u32,
    sized_bytes: u128,
    sized_count: u64,
}

impl Snapshot {
    pub fn new(fetched: Instant, capacity_bytes: u64, list: Vec<pb::AdapterInfo>) -> Self {
        let mut s = Snapshot {
            fetched,
            capacity_bytes,
            adapters: HashMap::with_capacity(list.len()),
            pinned_bytes: 0,
            pinned_count: 0,
            sized_bytes: 0,
            sized_count: 0,
        };
        for info in list {
            if let Some(r) = info.adapter.clone() {
                s.insert((r.tenant, r.name), info);
            }
        }
        s
    }

    fn account(&mut self, info: &pb::AdapterInfo, add: bool) {
        let apply = |v: &mut u64, d: u64| {
            *v = if add {
                v.saturating_add(d)
            } else {
                v.saturating_sub(d)
            }
        };
        if info.pinned {
            apply(&mut self.pinned_bytes, info.size_bytes);
            self.pinned_count = if add {
                self.pinned_count.saturating_add(1)
            } else {
                self.pinned_count.saturating_sub(1)
            };
        }
        if info.size_bytes > 0 {
            let b = u128::from(info.size_bytes);
            self.sized_bytes = if add {
                self.sized_bytes + b
            } else {
                self.sized_bytes.saturating_sub(b)
            };
            apply(&mut self.sized_count, 1);
        }
    }

    /// Records an adapter (replacing any entry of the same key).
    pub fn insert(&mut self, key: AdapterKey, info: pb::AdapterInfo) {
        self.account(&info, true);
        if let Some(old) = self.adapters.insert(key, info) {
            self.account(&old, false);
        }
    }

    pub fn remove(&mut self, key: &AdapterKey) {
        if let Some(old) = self.adapters.remove(key) {
            self.account(&old, false);
        }
    }

    pub fn get(&self, key: &AdapterKey) -> Option<&pb::AdapterInfo> {
        self.adapters.get(key)
    }

    pub fn contains(&self, key: &AdapterKey) -> bool {
        self.adapters.contains_key(key)
    }

    /// Bytes and count of pinned adapters.
    pub fn pinned(&self) -> (u64, u32) {
        (self.pinned_bytes, self.pinned_count)
    }

    /// Sum and count of the adapters whose size is known.
    pub fn sized(&self) -> (u128, u64) {
        (self.sized_bytes, self.sized_count)
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

    /// Brings the agent set in line with discovery: gone agents are dropped; a restarted one
    /// (new incarnation) starts over with no snapshot and no tenant table.
    pub fn set_agents(&mut self, discovered: &[Agent]) {
        self.agents
            .retain(|pod, _| discovered.iter().any(|a| &a.pod == pod));
        for a in discovered {
            let fresh = AgentEntry {
                agent: a.clone(),
                snapshot: None,
                tenants_pushed: None,
                error: None,
            };
            match self.agents.get_mut(&a.pod) {
                Some(e) if e.agent == *a => {}
                Some(e) => *e = fresh,
                None => {
                    self.agents.insert(a.pod.clone(), fresh);
                }
            }
        }
    }

    /// [`Fleet::set_agents`], then fetches every snapshot that is missing or older than `ttl`.
    ///
    /// Agents whose fetch fails stay without a snapshot (and out of placement) with the error
    /// recorded; an `Unauthenticated` answer also forgets the token so it is read again.
    pub async fn sync(&mut self, api: &dyn AgentApi, discovered: &[Agent], ttl: Duration) {
        let now = Instant::now();
        self.set_agents(discovered);
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
                    e.snapshot = Some(Snapshot::new(
                        now,
                        stats.host_cache.map_or(0, |h| h.capacity_bytes),
                        list,
                    ));
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

    /// The mean size of the adapters the agents report (0 when none is known).
    pub fn mean_adapter_bytes(&self) -> u64 {
        let (sum, n) = self
            .agents
            .values()
            .filter_map(|e| e.snapshot.as_ref())
            .map(Snapshot::sized)
            .fold((0u128, 0u128), |(s, n), (b, c)| (s + b, n + u128::from(c)));
        u64::try_from(sum.checked_div(n).unwrap_or(0)).unwrap_or(u64::MAX)
    }

    /// Records an adapter an agent now holds (after a load, or a reservation before one).
    pub fn record_load(&mut self, pod: &str, info: pb::AdapterInfo) {
        if let Some(s) = self.agents.get_mut(pod).and_then(|e| e.snapshot.as_mut())
            && let Some(r) = info.adapter.clone()
        {
            s.insert((r.tenant, r.name), info);
        }
    }

    /// Records that an agent no longer holds an adapter.
    pub fn record_unload(&mut self, pod: &str, key: &AdapterKey) {
        if let Some(s) = self.agents.get_mut(pod).and_then(|e| e.snapshot.as_mut()) {
            s.remove(key);
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
