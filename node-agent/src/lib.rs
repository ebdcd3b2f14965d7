//! The loraplane node agent: loads a Llama-family base model and many PEFT LoRA adapters and
//! serves them from one unified paged memory pool with heterogeneous batching.

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod config;
pub mod credential;
pub mod disagg;
pub mod dtype;
pub mod engine;
pub mod fixtures;
pub mod lora;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod rng;
pub mod scheduler;
pub mod serve;
pub mod sources;
pub mod structured;
