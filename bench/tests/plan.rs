//! `loraplane-bench plan` as a user runs it, on the tiny fixture: measure a step-cost profile,
//! plan a recorded CSV trace, validate against real agent processes, then plan again from the
//! written profile without measuring. The figures are reported, never asserted; the test checks
//! that every layout was simulated, a recommendation and the validation rows were written, the
//! profile round-trips, and bad input fails with the reason.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn bench(args: &[&str], out: &std::path::Path, cache: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
        .arg("plan")
        .args(["--preset", "tiny", "--out"])
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        // User errors must still print one clean line (no backtrace) with these set.
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn plan_measures_a_profile_recommends_a_fleet_and_validates_on_real_agents() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    let mut csv = String::from("arrival_s,prompt_tokens,output_tokens,adapter\n");
    for i in 0..12 {
        let adapter = ["", "sql", "tone"][i % 3];
        csv.push_str(&format!(
            "{},{},{},{adapter}\n",
            i as f64 * 0.05,
            16 + 8 * (i % 4),
            4 + i % 5
        ));
    }
    std::fs::write(&trace, csv).unwrap();
    let out = dir.path().join("out");
    let run = bench(
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--measure-profile",
            "--validate",
            "--max-devices",
            "3",
        ],
        &out,
        cache.path(),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "plan failed:\n{stderr}");
    println!("{}", String::from_utf8_lossy(&run.stdout));

    let report = json(&out.join("plan.json"));
    let data = &report["data"];
    // 3 unified layouts, and 1+1, 1+2, 2+1.
    let candidates = data["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 6, "{candidates:?}");
    for c in candidates {
        assert_eq!(c["outcome"]["requests"], 12, "{c}");
    }
    assert_eq!(data["trace"]["adapters"], 2);
    assert!(data["recommended"]["overall"].is_object() || data["recommended"]["overall"].is_null());
    let rows = data["validation"]["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        10,
        "five figures for each of two layouts: {rows:?}"
    );
    for r in rows {
        assert!(
            r["predicted"].as_f64().unwrap() >= 0.0 && r["measured"].as_f64().unwrap() >= 0.0,
            "{r}"
        );
    }
    let md = std::fs::read_to_string(out.join("plan.md")).unwrap();
    for heading in ["Recommendation", "Every layout simulated", "Validation"] {
        assert!(md.contains(heading), "no {heading:?} in plan.md");
    }
    assert!(out.join("plan-frontier.png").exists());

    // The written profile is a valid input: plan again from it, without measuring.
    let profile = out.join("step-cost.toml");
    let measured = std::fs::read_to_string(&profile).unwrap();
    assert!(measured.contains("fit_steps"), "{measured}");
    let again = dir.path().join("again");
    let run = bench(
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
            "--max-devices",
            "2",
        ],
        &again,
        cache.path(),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let data = json(&again.join("plan.json"))["data"].clone();
    assert_eq!(data["candidates"].as_array().unwrap().len(), 3);
    assert_eq!(
        data["profile"]["fit_steps"],
        toml_value(&measured, "fit_steps")
    );
}

fn toml_value(text: &str, key: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap();
    serde_json::from_str(line.split('=').nth(1).unwrap().trim()).unwrap()
}

#[test]
fn bad_traces_and_profiles_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let trace = dir.path().join("t.csv");
    std::fs::write(&trace, "arrival_s,prompt_tokens,output_tokens\n0,12,x\n").unwrap();
    let run = bench(&["--trace", trace.to_str().unwrap()], &out, cache.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("line 2: output_tokens"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    std::fs::write(&trace, "arrival_s,prompt_tokens,output_tokens\n0,12,3\n").unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(&profile, "layers = 1\n").unwrap();
    let run = bench(
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
        ],
        &out,
        cache.path(),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("invalid profile") && stderr.contains("missing field"),
        "{stderr}"
    );

    let run = bench(&[], &out, cache.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("needs --trace"), "{stderr}");
    // One clean line, even with RUST_BACKTRACE set.
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
}
