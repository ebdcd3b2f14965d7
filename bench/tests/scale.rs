//! The scale check as a test: 2,000 LoraAdapters (two pinned replicas each) placed and loaded
//! on 20 fake agents over loopback gRPC by the operator's real placement, convergence and
//! Admin client; every adapter Ready, an unchanged pass loads nothing, a restarted agent gets
//! exactly its adapters back. `loraplane-bench placement` prints the same figures.

// Test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use loraplane_bench::placement::{self, PlacementArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_adapters_on_twenty_agents_converge() {
    placement::run(PlacementArgs {
        agents: 20,
        adapters: 2000,
        replicas: 2,
        concurrency: 64,
        capacity: 16 << 30,
        adapter_bytes: 32 << 20,
        disaggregated: false,
        // The test binary cannot re-execute itself as the fake agents' process.
        in_process: true,
    })
    .await
    .unwrap();
}
