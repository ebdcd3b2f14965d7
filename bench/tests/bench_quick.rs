//! `loraplane-bench all --quick` on the tiny fixture, as CI runs it: every suite must
//! produce its Markdown (with each target of docs/performance-targets.md marked), its JSON and
//! its PNG plots, and they must parse. The figures themselves are reported, never asserted: on
//! a shared 2-core CI machine they say nothing reliable.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

const SUITES: [&str; 5] = ["hetero", "adapters", "roofline", "kv-transfer", "pd"];

/// Checks a PNG's signature, its IHDR (non-zero size) and that it ends with IEND.
fn check_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR", "{}: no IHDR", path.display());
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert!(
        dim(16) > 0 && dim(20) > 0,
        "{}: empty image",
        path.display()
    );
    assert_eq!(
        &bytes[bytes.len() - 8..bytes.len() - 4],
        b"IEND",
        "{}: truncated",
        path.display()
    );
}

#[test]
fn bench_all_quick_writes_markdown_json_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
        .args(["all", "--quick", "--preset", "tiny", "--out"])
        .arg(out.path())
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed:\n{stdout}\n{stderr}");
    // The numbers go to the test log for whoever reads CI, never into assertions.
    println!("{stdout}");
    println!(
        "bench all --quick --preset tiny: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for suite in SUITES {
        let md = std::fs::read_to_string(out.path().join(format!("{suite}.md"))).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(format!("{suite}.json"))).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{suite}.json: {e}"));
        assert_eq!(json["suite"], suite);
        assert!(md.starts_with("# "), "{suite}.md has no title");
        assert!(md.contains("## Method"), "{suite}.md explains no method");
        let targets = json["targets"].as_array().unwrap();
        for t in targets {
            let name = t["name"].as_str().unwrap();
            assert!(md.contains(name), "{suite}.md does not list target {name}");
        }
        if !targets.is_empty() {
            assert!(
                md.contains("✅ met") || md.contains("❌ missed") || md.contains("— reported"),
                "{suite}.md marks no target"
            );
        }
        let plots = json["plots"].as_array().unwrap();
        assert!(!plots.is_empty(), "{suite} draws no plot");
        for p in plots {
            let file = p["file"].as_str().unwrap();
            assert!(
                md.contains(&format!("]({file})")),
                "{suite}.md does not show {file}"
            );
            check_png(&out.path().join(file));
        }
    }
    // The targets (docs/performance-targets.md) these suites cover are all in the summary.
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    for needle in [
        "LoRA overhead ratio",
        "merged serving at 64 adapters",
        "1,000 adapters",
        "GEMM peak",
        "roofline",
        "loopback TCP",
    ] {
        assert!(summary.contains(needle), "summary.md lacks {needle}");
    }
}

/// `--device` is parsed like `serve`'s; a device a suite cannot use fails before any work,
/// with the reason, and writes nothing.
#[test]
fn bench_refuses_devices_it_cannot_use() {
    let out = tempfile::tempdir().unwrap();
    let bench = |args: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
            .args(args)
            .args(["--quick", "--preset", "tiny", "--out"])
            .arg(out.path().join("results"))
            .output()
            .unwrap();
        assert!(!run.status.success(), "bench {args:?} succeeded");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let err = bench(&["hetero", "--device", "tpu"]);
    assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{err}");
    let err = bench(&["adapters", "--device", "cuda:0"]);
    assert!(
        err.contains("only the `hetero` suite runs on --device cuda:0"),
        "{err}"
    );
    assert!(!out.path().join("results").exists());
    if cfg!(not(feature = "cuda")) {
        let err = bench(&["hetero", "--device", "cuda:1"]);
        assert!(err.contains("built without the `cuda` feature"), "{err}");
    }
}

/// `--layers` shortens the fixture model (scripts/gpu-check.sh runs the `bench` preset with 8 of
/// its 32 layers): the checkpoint has that many layers, in its own cache directory, and the
/// report says so.
#[test]
fn bench_layers_shorten_the_fixture_model() {
    let (out, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bench = |layers: &str| {
        Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
            .args(["hetero", "--quick", "--preset", "tiny", "--repeats", "1"])
            .args(["--layers", layers, "--out"])
            .arg(out.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .output()
            .unwrap()
    };
    let run = bench("1");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed:\n{stderr}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cache.path().join("model-tiny-1layers-0/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("hetero.json")).unwrap())
            .unwrap();
    assert_eq!(json["environment"]["preset"], "tiny (1 layers)");
    assert!(json["method"][0].as_str().unwrap().contains("1 layers"));

    let run = bench("0");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("expected a number of layers"), "{stderr}");
}
