//! Where an adapter runs: a pure function of the adapter's demand and the agents' reported
//! load, so it is unit-tested without agents or a cluster.
//!
//! Rules, per role pool (prefill, decode and unified agents are placed alike: a disaggregated
//! request needs the adapter on the prefill agent that computes its prompt and on the decode
//! agent that owns it):
//! - `replicas: k` pins the adapter on `min(k, pool size)` agents. Agents that already hold it
//!   keep it (stability: no churn when nothing changed); the rest are chosen among agents whose
//!   host-cache headroom (capacity minus pinned bytes, as the agents report them) fits the
//!   adapter, preferring nodes that do not yet hold a replica (spread across failure domains),
//!   then the most headroom, then the fewest pinned adapters, then the pod name (determinism).
//!   Agents that cannot fit it are never chosen; the gap is reported as a shortfall.
//! - `replicas` unset ("on demand") registers it, unpinned, on every agent of the pool: the
//!   agents' host caches evict and reload its weights as requests come, so capacity does not
//!   limit it.
//! - When `k` shrinks, the holders with the least headroom are released first.
//! - Demand-following adapters (`replicas: {min, max}`, sized by [`demand`]) are *sticky*:
//!   agents are ranked by rendezvous hashing of (adapter, pod) instead of headroom, so an
//!   adapter grows onto and shrinks back from the same agents and one agent joining or leaving
//!   moves few adapters. Their new holders also need room in the device pool (where a pinned
//!   adapter stays warm), as the agents report it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::role::Role;

pub mod demand;

/// An agent as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLoad {
    pub pod: String,
    pub role: Role,
    /// The node it runs on (spread key); `None` counts as its own domain.
    pub node: Option<String>,
    /// Host adapter-cache bound the agent reports (`GetStats.host_cache.capacity_bytes`).
    pub capacity_bytes: u64,
    /// Bytes of adapters pinned on it (not evictable), from `ListAdapters`.
    pub pinned_bytes: u64,
    /// Adapters pinned on it.
    pub pinned_adapters: u32,
    /// Free device-pool bytes (`GetStats.pool`: free pages × page bytes); `None` when the agent
    /// did not report a pool.
    pub pool_free_bytes: Option<u64>,
}

impl AgentLoad {
    /// Bytes more that can be pinned.
    pub fn headroom(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.pinned_bytes)
    }
}

/// What one adapter asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand<'a> {
    /// Pinned replicas per role; `None` = every agent, unpinned.
    pub replicas: Option<u32>,
    /// Expected host-cache footprint (0 when not known yet: the first load tells).
    pub size_bytes: u64,
    /// Pods that hold the adapter now (its current, matching version).
    pub holders: &'a BTreeSet<String>,
    /// Demand-following: the adapter's `tenant/name`, to rank agents by rendezvous score (and
    /// to ask new holders for device-pool room); `None` keeps the headroom order.
    pub sticky: Option<&'a str>,
}

/// The outcome for one role pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePlan {
    pub role: Role,
    /// Pods that should hold the adapter, sorted.
    pub targets: Vec<String>,
    /// How many were asked for in this pool (`min(k, pool size)`, or the pool size).
    pub wanted: u32,
    /// `wanted - targets.len()`: agents that could not fit it.
    pub shortfall: u32,
}

/// The outcome for every role of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub roles: Vec<RolePlan>,
    /// Whether loads pin the adapter (replicas set) or leave it evictable (on demand).
    pub pin: bool,
}

impl Plan {
    /// Every target pod, sorted.
    pub fn targets(&self) -> BTreeSet<String> {
        self.roles
            .iter()
            .flat_map(|r| r.targets.iter().cloned())
            .collect()
    }

    pub fn wanted(&self) -> u32 {
        self.roles.iter().map(|r| r.wanted).sum()
    }

    pub fn shortfall(&self) -> u32 {
        self.roles.iter().map(|r| r.shortfall).sum()
    }
}

/// Places one adapter on the agents of `roles`.
pub fn place(demand: &Demand<'_>, agents: &[AgentLoad], roles: &[Role]) -> Plan {
    let roles = roles
        .iter()
        .map(|&role| {
            let pool: Vec<&AgentLoad> = agents.iter().filter(|a| a.role == role).collect();
            place_in_pool(demand, role, &pool)
        })
        .collect();
    Plan {
        roles,
        pin: demand.replicas.is_some(),
    }
}

fn place_in_pool(demand: &Demand<'_>, role: Role, pool: &[&AgentLoad]) -> RolePlan {
    let Some(k) = demand.replicas else {
        let mut targets: Vec<String> = pool.iter().map(|a| a.pod.clone()).collect();
        targets.sort();
        let wanted = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        return RolePlan {
            role,
            targets,
            wanted,
            shortfall: 0,
        };
    };
    let wanted = k.min(u32::try_from(pool.len()).unwrap_or(u32::MAX));
    let want = wanted as usize;
    // Each agent's rendezvous score for this adapter, computed once.
    let scored: Vec<(u64, &AgentLoad)> = pool
        .iter()
        .map(|&a| {
            let score = demand
                .sticky
                .map_or(0, |k| demand::rendezvous_score(k, &a.pod));
            (score, a)
        })
        .collect();
    let mut holders: Vec<(u64, &AgentLoad)> = scored
        .iter()
        .copied()
        .filter(|(_, a)| demand.holders.contains(&a.pod))
        .collect();
    // Keep the holders with the most headroom (sticky: the best ranked); release the rest.
    holders
        .sort_by_cached_key(|&(score, a)| (Reverse(score), Reverse(a.headroom()), a.pod.clone()));
    holders.truncate(want);
    let mut chosen: Vec<(u64, &AgentLoad)> = holders;
    let mut per_node: BTreeMap<Option<&str>, u32> = BTreeMap::new();
    for (_, a) in &chosen {
        *per_node.entry(a.node.as_deref()).or_default() += 1;
    }
    let mut candidates: Vec<(u64, &AgentLoad)> = scored
        .into_iter()
        .filter(|(_, a)| !chosen.iter().any(|(_, c)| c.pod == a.pod))
        .filter(|(_, a)| a.headroom() >= demand.size_bytes)
        .filter(|(_, a)| {
            demand.sticky.is_none() || a.pool_free_bytes.is_none_or(|f| f >= demand.size_bytes)
        })
        .collect();
    while chosen.len() < want && !candidates.is_empty() {
        let best = candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, (score, a))| {
                // A pod with no node name is its own failure domain.
                let same_node = match a.node.as_deref() {
                    Some(n) => per_node.get(&Some(n)).copied().unwrap_or(0),
                    None => 0,
                };
                (
                    same_node,
                    Reverse(*score),
                    Reverse(a.headroom()),
                    a.pinned_adapters,
                    a.pod.as_str(),
                )
            })
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        let (score, a) = candidates.swap_remove(i);
        *per_node.entry(a.node.as_deref()).or_default() += 1;
        chosen.push((score, a));
    }
    let mut targets: Vec<String> = chosen.iter().map(|(_, a)| a.pod.clone()).collect();
    targets.sort();
    let placed = u32::try_from(targets.len()).unwrap_or(u32::MAX);
    RolePlan {
        role,
        targets,
        wanted,
        shortfall: wanted.saturating_sub(placed),
    }
}

#[cfg(test)]
mod tests;
