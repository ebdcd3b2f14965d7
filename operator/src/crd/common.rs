//! Pieces both resources share: the phase enum and the condition types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one-word summary `kubectl get` shows; the conditions carry the detail.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum Phase {
    /// Waiting on something outside the resource (a base model, agents, capacity, quota).
    Pending,
    /// Children are being created or rolled out; adapters are being loaded.
    Progressing,
    /// Everything asked for is running.
    Ready,
    /// Running, but below what was asked for (some replicas or placements are failing).
    Degraded,
    /// The spec cannot be realised as written (an invalid value, a rejected adapter).
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The condition types both resources report (`status.conditions[].type`).
pub mod condition_types {
    /// Everything asked for is serving.
    pub const READY: &str = "Ready";
    /// The operator is still converging (rollout, loads in flight).
    pub const PROGRESSING: &str = "Progressing";
    /// Something asked for is failing.
    pub const DEGRADED: &str = "Degraded";
}
