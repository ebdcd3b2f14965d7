//! loraplane's tooling, kept out of the serving binaries: the benchmark suites that measure the
//! agent against docs/performance-targets.md ([`suites`]), the out-of-the-box demo ([`demo`])
//! and the operator's placement scale check ([`placement`], with its demand-shift scenario in
//! [`demand_shift`]). The `loraplane-bench` binary
//! runs them; it drives the agent and operator libraries, and starts agents as child processes
//! by running itself with the hidden `serve` subcommand (the agent library's own `serve`).
//!
//! Neither `loraplane-agent` nor `loraplane-operator` depends on this package, and the
//! operator's test double (`fake_agent`) reaches it only through the operator's `testing`
//! feature: `tests/production_deps.rs` checks both.

#![forbid(unsafe_code)]

pub mod demand_shift;
pub mod demo;
pub mod placement;
pub mod suites;
