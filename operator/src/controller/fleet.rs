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
use crate::placement::demand::{LoadBudget, Sizer};

/// An adapter's key on an agent: (tenant, name).
pub type AdapterKey = (String, String);

/// What one agent reported, with running totals kept in step by [`Snapshot::insert`] and
/// [`Snapshot::remove`] (placement reads them once per adapter: they must not cost a scan).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub fetched: Instant,
    pub capacity_bytes: u64,
    /// Free device-pool bytes, when the agent reports a pool.
    pub pool_free_bytes: Option<u64>,
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
            pool_free_bytes: None,
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
    /// The per-adapter request counters of the last stats read, and when it was made.
    counters: Option<(Instant, HashMap<AdapterKey, u64>)>,
    /// Requests per second per adapter between the last two stats reads.
    pub rates: HashMap<AdapterKey, f64>,
}

/// Per-adapter request counters of a `GetStats` answer.
fn counters_of(stats: &pb::GetStatsResponse) -> HashMap<AdapterKey, u64> {
    stats
        .adapter_requests
        .iter()
        .filter_map(|r| {
            let a = r.adapter.as_ref()?;
            Some(((a.tenant.clone(), a.name.clone()), r.requests_total))
        })
        .collect()
}

/// Rates between two reads of the counters; an adapter whose counter went down (registered
/// anew) or is new has no rate until the next read.
fn rates_between(
    old: &(Instant, HashMap<AdapterKey, u64>),
    now: Instant,
    new: &HashMap<AdapterKey, u64>,
) -> HashMap<AdapterKey, f64> {
    let dt = now.duration_since(old.0).as_secs_f64();
    if dt <= 0.0 {
        return HashMap::new();
    }
    new.iter()
        .filter_map(|(k, n)| {
            let before = *old.1.get(k)?;
            (*n >= before).then(|| (k.clone(), (n - before) as f64 / dt))
        })
        .collect()
}

/// One model's agents.
#[derive(Debug, Default)]
pub struct Fleet {
    /// The model's admin token (read from its Secret).
    pub token: Option<Arc<str>>,
    pub agents: BTreeMap<String, AgentEntry>,
    /// Sizing state of the model's demand-following adapters.
    pub sizers: HashMap<AdapterKey, Sizer>,
    /// Loads the demand-following adapters may still start this minute (`None` until the
    /// first one asks, then sized by `--adapter-loads-per-minute`).
    pub load_budget: Option<LoadBudget>,
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
                counters: None,
                rates: HashMap::new(),
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
                    let counters = counters_of(&stats);
                    e.rates = e
                        .counters
                        .as_ref()
                        .map(|old| rates_between(old, now, &counters))
                        .unwrap_or_default();
                    e.counters = Some((now, counters));
                    let mut snapshot =
                        Snapshot::new(now, stats.host_cache.map_or(0, |h| h.capacity_bytes), list);
                    snapshot.pool_free_bytes = stats
                        .pool
                        .filter(|p| p.total_pages > 0)
                        .map(|p| u64::from(p.free_pages).saturating_mul(p.page_bytes));
                    e.snapshot = Some(snapshot);
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
                    pool_free_bytes: s.pool_free_bytes,
                })
            })
            .collect()
    }

    /// An adapter's request rate (requests per second): the sum over each role's agents of
    /// what they reported between their last two reads, the busiest role's (a disaggregated
    /// request is counted by its prefill and its decode agent).
    pub fn adapter_rate(&self, key: &AdapterKey) -> f64 {
        let mut per_role: BTreeMap<&str, f64> = BTreeMap::new();
        for e in self.agents.values() {
            if let Some(r) = e.rates.get(key) {
                *per_role.entry(e.agent.role.as_str()).or_default() += r;
            }
        }
        per_role.into_values().fold(0.0, f64::max)
    }

    /// Pinned replicas per role the tenant's *other* adapters hold (the busiest role's count),
    /// for the namespace's replica quota.
    pub fn tenant_replicas(&self, tenant: &str, except: &AdapterKey) -> u32 {
        let mut per_role: BTreeMap<&str, u32> = BTreeMap::new();
        for e in self.agents.values() {
            let Some(s) = e.snapshot.as_ref() else {
                continue;
            };
            let n = s
                .adapters
                .iter()
                .filter(|(k, info)| k.0 == tenant && *k != except && info.pinned)
                .count();
            *per_role.entry(e.agent.role.as_str()).or_default() +=
                u32::try_from(n).unwrap_or(u32::MAX);
        }
        per_role.into_values().max().unwrap_or(0)
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
        let Some(e) = self.agents.get_mut(pod) else {
            return;
        };
        if let Some(r) = info.adapter.as_ref() {
            let key = (r.tenant.clone(), r.name.clone());
            // An adapter new to the agent starts counting requests at zero: the next read
            // then yields a rate over the whole interval instead of none.
            if let Some((_, counters)) = e.counters.as_mut() {
                counters.entry(key.clone()).or_insert(0);
            }
            if let Some(s) = e.snapshot.as_mut() {
                s.insert(key, info);
            }
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
