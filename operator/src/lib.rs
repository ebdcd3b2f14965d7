//! `loraplane-operator`: the Kubernetes operator that turns `BaseModel` and `LoraAdapter`
//! resources (group `loraplane.dev`) into running `loraplane-agent` fleets and placed adapters.
//!
//! Layout (docs/style.md rules 1–3): pure logic with no Kubernetes or gRPC I/O — [`crd`] (the
//! types), [`desired`] (builders of child objects), [`placement`], [`discovery`], [`tenancy`],
//! [`status`]; the edges — [`controller`] (reads, applies, patches status), [`agent_client`]
//! (the agents' Admin API), [`leader`], [`server`], [`metrics`]. The operator never depends on
//! the agent crate: it talks to agents only through `loraplane-proto`.

#![forbid(unsafe_code)]

pub mod agent_client;
pub mod config;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod discovery;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod role;
pub mod server;
pub mod status;
pub mod tenancy;

/// A stand-in for the agents' Admin API: a test double for the operator's own tests and, behind
/// the `testing` feature that only tooling and tests enable, for `loraplane-bench placement`.
/// The `loraplane-operator` binary is built without it.
#[cfg(any(test, feature = "testing"))]
pub mod fake_agent;
#[cfg(test)]
pub mod fixtures;
