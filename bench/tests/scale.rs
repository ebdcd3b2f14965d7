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
        demand_shift: false,
        loads_per_minute: 30,
        total_rps: 1000.0,
        out: std::env::temp_dir(),
    })
    .await
    .unwrap();
}

/// The demand-shift scenario, smaller: under the bound no minute has more loads than it
/// allows, every resized adapter follows the shift, and without the bound the same shift
/// loads more in its busiest minute. `loraplane-bench placement --demand-shift` prints the
/// full-size figures.
#[test]
fn demand_shift_is_followed_within_the_load_bound() {
    let out = tempfile::tempdir().unwrap();
    let runs = loraplane_bench::demand_shift::run(&PlacementArgs {
        agents: 8,
        adapters: 200,
        replicas: 0,
        concurrency: 1,
        capacity: 16 << 30,
        adapter_bytes: 32 << 20,
        disaggregated: false,
        in_process: true,
        demand_shift: true,
        loads_per_minute: 6,
        total_rps: 300.0,
        out: out.path().to_owned(),
    })
    .unwrap();
    let (bounded, unbounded) = (&runs[0], &runs[1]);
    assert!(
        bounded.changed.0 > 0 && bounded.changed.1 > 0,
        "{bounded:?}"
    );
    assert!(
        bounded.max_loads_per_minute_after_shift() <= 6,
        "{:?}",
        bounded.per_minute
    );
    assert!(
        unbounded.max_loads_per_minute_after_shift() > 6,
        "{:?}",
        unbounded.per_minute
    );
    assert!(bounded.all_followed_s().is_some());
    assert_eq!(
        bounded.loads_before_shift_after_warmup(),
        0,
        "no churn in steady state"
    );
    for f in [
        "placement-demand.md",
        "placement-demand.json",
        "placement-demand.png",
    ] {
        assert!(out.path().join(f).exists(), "{f}");
    }
}
