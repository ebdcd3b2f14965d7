//! Scheduling policy pieces that are pure data: per-tenant fairness.

pub mod fairness;
