//! Splitwise disaggregation: prefill agents compute prompts and stream their KV cache, layer by
//! layer, to decode agents over the `loraplane.v1.KvTransfer` gRPC service.
//!
//! Design (decode-first, docs/architecture.md §3.6): a client reaches a decode agent, which sends
//! the tokenized prompt to a prefill agent it picks and receives the KV cache as the prefill
//! agent's layers finish (so transfer overlaps prefill compute). The decode agent buffers the
//! stream in host memory, validates it completely, and only then admits the request into its
//! pool with the KV written in place. Compared with reserving device pages before calling the
//! peer, a slow or dying prefill agent can never hold decode pages hostage, and a failed
//! transfer has nothing on the device to clean up; admission control stays where it is.

pub mod affinity;
pub mod channel;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod prefill;
pub mod stats;
pub mod transfer;
