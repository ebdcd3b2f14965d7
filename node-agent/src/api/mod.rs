//! The agent's serving surfaces: the gRPC `Inference` service, the OpenAI-compatible HTTP API,
//! tenants and credentials, lifecycle (readiness and drain) and the one error mapping.
//!
//! Layering: `service` is the transport-free core (validation, limits, submission); `grpc` and
//! `http`/`openai` translate wire formats over the [`service::Inference`] trait; `auth` and
//! `lifecycle` are shared state the admin surfaces (`admin`, another module) use too.

pub mod admin;
pub mod auth;
pub mod error;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod openai;
pub mod service;
pub mod tools;
