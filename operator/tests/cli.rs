//! The operator binary's command line as a user meets it: a failure prints one clean line,
//! `error: …` with its causes, and no backtrace even with `RUST_BACKTRACE` set.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn user_errors_print_one_line_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    // `crds --out-dir` through a regular file cannot create the directory.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loraplane-operator"))
        .args(["crds", "--out-dir"])
        .arg(file.join("crds"))
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: creating "), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
}
