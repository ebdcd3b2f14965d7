//! The engine: one actor that owns the model, the unified page pool, the adapter registry and
//! the scheduler, and runs iteration-level continuous batching with chunked prefill.
//!
//! - [`core::Engine`] is the synchronous state machine (submit, step, cancel, admin), unit-tested
//!   without a runtime. Each step asks the scheduler (`crate::scheduler`, a pure policy) for a
//!   plan and applies it (`apply.rs`), then runs the model (`step.rs`).
//! - [`actor`] runs it on a dedicated thread and hands out an [`actor::EngineHandle`].

pub mod actor;
mod adapters;
mod apply;
pub mod core;
mod prefix;
pub mod request;
pub mod sampler;
mod sequence;
mod step;

pub use self::core::{
    AdapterTransition, Engine, EngineConfig, EngineError, EngineStats, StepObserver,
};
pub use adapters::{LoadChange, LoadWait, Loaded};
pub use prefix::{PrefixCaching, PrefixStats, weights_bytes};
pub use request::{
    AdapterUse, Event, FinishReason, KvImport, KvLayer, MAX_ADAPTERS_PER_REQUEST,
    MAX_CACHE_SALT_BYTES, Request, SamplingParams, Timings, Usage, check_adapters,
    check_cache_salt,
};
