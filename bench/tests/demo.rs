//! `loraplane-bench demo --no-serve` on a fresh cache directory: it writes its fixtures, starts
//! a prefill and a decode agent as separate processes, runs the workload through them and
//! prints the results table; every prompt is prefilled remotely. (The README runs the same
//! command with the `small` preset.)

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_demo_runs_a_disaggregated_workload_and_reports_it() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
        .args([
            "demo",
            "--preset",
            "tiny",
            "--adapters",
            "8",
            "--requests",
            "16",
            "--no-serve",
        ])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("| requests | 16 (0 failed) |"), "{stdout}");
    assert!(
        stdout.contains("| remote prefills | 16 |"),
        "every prompt went through the prefill agent:\n{stdout}"
    );
    for row in [
        "requests/s",
        "tokens/s",
        "TTFT p50 / p99",
        "inter-token p50 / p99",
    ] {
        assert!(stdout.contains(row), "missing {row}:\n{stdout}");
    }
    assert!(
        stderr.contains("16/16 requests"),
        "the progress bar reached the end:\n{stderr}"
    );
    // A second run reuses the fixtures.
    let again = Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
        .args([
            "demo",
            "--preset",
            "tiny",
            "--adapters",
            "8",
            "--requests",
            "4",
            "--no-serve",
        ])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("Using the fixtures in"));
}
