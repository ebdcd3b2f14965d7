//! The scheduler as a pure unit: from a [`Snapshot`] of the engine's sequences, adapters and
//! free pages, plus fixed [`Limits`] and the tenants' fairness counters, to the [`StepPlan`] of
//! one step (which sequences run and with how many tokens, which are preempted, refused or
//! admitted, which adapters are evicted or placed, in order). The engine applies the plan:
//! allocating pages, copying adapters, building the model's input.
//!
//! Nothing here touches a model, a page or a channel, so the policy is tested with plain data
//! (after TGI's `backends/v3/src/queue.rs`, whose `State::next_batch` is tested the same way).
//!
//! - [`policy`]: the policy itself and its entry points, [`Scheduler::plan`] and
//!   [`Scheduler::plan_admissions`].
//! - [`plan`]: the decisions.
//! - [`state`]: what the scheduler sees.
//! - [`fairness`]: per-tenant virtual token counters.
//! - `sim`: the pool as the plan unfolds (pages, adapter residency, LRU eviction).

pub mod fairness;
pub mod plan;
pub mod policy;
mod sim;
pub mod state;
#[cfg(test)]
mod tests;

pub use plan::{Decision, StepPlan};
pub use policy::Scheduler;
pub use state::{AdapterState, Limits, SeqId, SeqState, Snapshot};
