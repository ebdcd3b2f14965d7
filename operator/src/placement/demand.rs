//! Demand-following adapter replicas (`spec.replicas: {min, max}`): how many pinned replicas
//! per role an adapter gets from the request rate its holders report, and how many adapter
//! loads a model's agents may take per minute. Pure: the time is an argument, so hysteresis
//! and the churn bound are unit-tested without a clock (docs/style.md rule 15).
//!
//! The sizing follows the HorizontalPodAutoscaler's stabilisation, per adapter:
//! - each decision records a recommendation `clamp(ceil(rate / target), min, max)`;
//! - the adapter grows only to the *smallest* recommendation over the scale-up window, once
//!   the history covers that window: the demand must be sustained for the whole window, so a
//!   burst shorter than it adds nothing;
//! - it shrinks only to the *largest* recommendation over the scale-down window: a dip must
//!   last the whole window before a replica is released, and a replica released is not loaded
//!   back by the next blip;
//! - a tenant's replica quota caps growth above `min` (the floor the user asked for is kept).
//!
//! [`LoadBudget`] then bounds the loads a model's agents take in any sliding minute, so a
//! popularity shift across many adapters cannot turn into an eviction storm in the agents'
//! host caches; placements over the budget wait for the next reconcile.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::crd::AutoReplicas;

/// Why the replica count is what it is (the status reason and the Event reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleReason {
    /// The demand asks for what is there.
    Steady,
    ScaledUp,
    ScaledDown,
    /// More are wanted, but not yet for the whole scale-up window.
    AwaitingSustainedDemand,
    /// Fewer would do, but not yet for the whole scale-down window.
    StabilizingScaleDown,
    /// Growth stopped at the namespace's replica quota.
    TenantQuota,
    /// Loads wait for the model's loads-per-minute budget.
    ChurnLimited,
    /// Not every wanted replica fits an agent (host cache, device pool).
    InsufficientCapacity,
}

impl ScaleReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleReason::Steady => "Steady",
            ScaleReason::ScaledUp => "ScaledUp",
            ScaleReason::ScaledDown => "ScaledDown",
            ScaleReason::AwaitingSustainedDemand => "AwaitingSustainedDemand",
            ScaleReason::StabilizingScaleDown => "StabilizingScaleDown",
            ScaleReason::TenantQuota => "TenantQuota",
            ScaleReason::ChurnLimited => "ChurnLimited",
            ScaleReason::InsufficientCapacity => "InsufficientCapacity",
        }
    }
}

/// One sizing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the current rate alone asks for (within `[min, max]`).
    pub recommended: u32,
    /// Replicas per role to place.
    pub replicas: u32,
    pub reason: ScaleReason,
    /// The request rate it was decided on (requests per second).
    pub rate: f64,
}

impl Decision {
    /// A one-line explanation for the status and Events.
    pub fn message(&self, spec: &AutoReplicas) -> String {
        let base = format!(
            "{:.2} req/s at {} req/s per replica asks for {} (min {}, max {})",
            self.rate, spec.target_rps, self.recommended, spec.min, spec.max
        );
        match self.reason {
            ScaleReason::Steady => format!("{base}; {} replicas", self.replicas),
            ScaleReason::ScaledUp | ScaleReason::ScaledDown => {
                format!("{base}; now {} replicas", self.replicas)
            }
            ScaleReason::AwaitingSustainedDemand => format!(
                "{base}; keeping {} until it lasts {}s",
                self.replicas,
                spec.scale_up_window.as_secs()
            ),
            ScaleReason::StabilizingScaleDown => format!(
                "{base}; keeping {} until it lasts {}s",
                self.replicas,
                spec.scale_down_window.as_secs()
            ),
            ScaleReason::TenantQuota => format!(
                "{base}; held at {} by the namespace's replica quota",
                self.replicas
            ),
            ScaleReason::ChurnLimited => format!(
                "{base}; {} wanted, loads beyond the loads-per-minute budget wait",
                self.replicas
            ),
            ScaleReason::InsufficientCapacity => format!(
                "{base}; {} wanted, no other agent has room for it",
                self.replicas
            ),
        }
    }
}

/// One adapter's sizing state: its recommendations over the longest window, and the count
/// last decided.
#[derive(Debug, Clone, Default)]
pub struct Sizer {
    history: VecDeque<(Instant, u32)>,
    /// When this sizer saw its first sample (the windows count from here).
    since: Option<Instant>,
    replicas: Option<u32>,
}

/// The replicas the rate alone asks for.
pub fn recommend(rate: f64, spec: &AutoReplicas) -> u32 {
    let raw = if rate.is_finite() && rate > 0.0 {
        (rate / spec.target_rps).ceil()
    } else {
        0.0
    };
    // `as` saturates for floats; the clamp bounds it anyway.
    (raw.min(f64::from(u32::MAX)) as u32).clamp(spec.min, spec.max)
}

impl Sizer {
    /// Decides the replicas per role at `now` from the adapter's request `rate` (requests per
    /// second over its holders), the replicas it has now (`current`, used only on the first
    /// decision, e.g. after an operator restart) and the most the tenant's quota leaves it
    /// (`quota_cap`; `None` = no quota).
    pub fn decide(
        &mut self,
        spec: &AutoReplicas,
        rate: f64,
        current: u32,
        quota_cap: Option<u32>,
        now: Instant,
    ) -> Decision {
        let recommended = recommend(rate, spec);
        let since = *self.since.get_or_insert(now);
        let have = self.replicas.unwrap_or(current).clamp(spec.min, spec.max);
        self.history.push_back((now, recommended));
        let keep = spec.scale_up_window.max(spec.scale_down_window);
        while self
            .history
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.history.pop_front();
        }
        let within = |window: Duration| {
            self.history
                .iter()
                .filter(move |(t, _)| now.saturating_duration_since(*t) <= window)
                .map(|(_, r)| *r)
        };
        let covered = |window: Duration| now.saturating_duration_since(since) >= window;
        let up_to = if covered(spec.scale_up_window) {
            within(spec.scale_up_window).min().unwrap_or(have)
        } else {
            have
        };
        let down_to = if covered(spec.scale_down_window) {
            within(spec.scale_down_window).max().unwrap_or(have)
        } else {
            have
        };
        let (mut replicas, mut reason) = if up_to > have {
            (up_to, ScaleReason::ScaledUp)
        } else if down_to < have {
            (down_to, ScaleReason::ScaledDown)
        } else if recommended > have {
            (have, ScaleReason::AwaitingSustainedDemand)
        } else if recommended < have {
            (have, ScaleReason::StabilizingScaleDown)
        } else {
            (have, ScaleReason::Steady)
        };
        if let Some(cap) = quota_cap {
            let cap = cap.max(spec.min);
            if replicas > cap {
                reason = if cap < have {
                    ScaleReason::ScaledDown
                } else {
                    ScaleReason::TenantQuota
                };
                replicas = cap;
            } else if replicas == cap && recommended > cap {
                reason = ScaleReason::TenantQuota;
            }
        }
        self.replicas = Some(replicas);
        Decision {
            recommended,
            replicas,
            reason,
            rate,
        }
    }
}

/// The loads a model's agents may take in any sliding minute (0 = unbounded).
#[derive(Debug, Clone, Default)]
pub struct LoadBudget {
    per_minute: u32,
    recent: VecDeque<Instant>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl LoadBudget {
    pub fn new(per_minute: u32) -> Self {
        LoadBudget {
            per_minute,
            recent: VecDeque::new(),
        }
    }

    /// Loads that may start at `now` (`u32::MAX` when unbounded).
    pub fn available(&mut self, now: Instant) -> u32 {
        if self.per_minute == 0 {
            return u32::MAX;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        let used = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        self.per_minute.saturating_sub(used)
    }

    /// Records `n` loads started at `now`.
    pub fn spend(&mut self, n: u32, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        self.recent.extend(std::iter::repeat_n(now, n as usize));
    }
}

/// A stable 64-bit score of (adapter, pod) for rendezvous (highest-random-weight) hashing:
/// each adapter ranks the agents in its own pseudo-random order, so adapters spread evenly, an
/// adapter grows onto and shrinks back from the same agents, and adding or removing an agent
/// moves only the adapters that rank it first. FNV-1a with a SplitMix64 finaliser: fixed, so
/// every operator replica and release computes the same order.
pub fn rendezvous_score(adapter: &str, pod: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in adapter.bytes().chain([0u8]).chain(pod.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests;
