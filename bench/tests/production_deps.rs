//! The production binaries carry no tooling: neither `loraplane-agent` nor `loraplane-operator`
//! reaches this package through normal or build dependencies, under any of their features;
//! nothing they reach turns on the operator's `testing` feature (its `fake_agent` test double);
//! the agent's sources hold no benchmark or demo module and no plotting dependency or font; the
//! operator compiles `fake_agent` only for tests and `testing`. Read from `cargo metadata
//! --no-deps` (the workspace's own manifests, no network) and from the sources.

// Test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// The production binaries' packages.
const PRODUCTION: [&str; 2] = ["loraplane-agent", "loraplane-operator"];
/// What production must not contain: this package, and the operator's test double feature.
const TOOLING: &str = "loraplane-bench";
const TESTING: (&str, &str) = ("loraplane-operator", "testing");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_owned()
}

fn metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Problems with what `package` pulls into a build of its binary: every workspace package it
/// reaches through normal or build dependencies (optional ones and every feature of every
/// reached package included, so that no `--features` choice can change the answer), checked
/// against the tooling package and the `testing` feature.
fn production_problems(metadata: &Value, package: &str) -> Vec<String> {
    let packages: BTreeMap<&str, &Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p))
        .collect();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![(package.to_owned(), vec![package.to_owned()])];
    while let Some((name, path)) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let chain = path.join(" -> ");
        if name == TOOLING {
            problems.push(format!(
                "{chain}: the tooling package is in a production build"
            ));
        }
        let Some(p) = packages.get(name.as_str()) else {
            continue; // not a workspace package: it cannot depend on ours
        };
        if name == TESTING.0 {
            let default = p["features"]["default"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if default.iter().any(|f| f == TESTING.1) {
                problems.push(format!("{chain}: `{}` is a default feature", TESTING.1));
            }
        }
        let enables = format!("{}/{}", TESTING.0, TESTING.1);
        for (feature, list) in p["features"].as_object().unwrap() {
            if list
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == enables.as_str())
            {
                problems.push(format!("{chain}: feature `{feature}` enables {enables}"));
            }
        }
        for dep in p["dependencies"].as_array().unwrap() {
            if dep["kind"].as_str() == Some("dev") {
                continue;
            }
            let dep_name = dep["name"].as_str().unwrap();
            if dep_name == TESTING.0
                && dep["features"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f == TESTING.1)
            {
                problems.push(format!("{chain}: depends on {enables}"));
            }
            if packages.contains_key(dep_name) {
                let mut next = path.clone();
                next.push(dep_name.to_owned());
                todo.push((dep_name.to_owned(), next));
            }
        }
    }
    problems
}

#[test]
fn production_builds_reach_no_tooling_and_no_test_double() {
    let metadata = metadata();
    let names: Vec<&str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for package in PRODUCTION.iter().chain([&TOOLING]) {
        assert!(names.contains(package), "{package} is not in the workspace");
    }
    for package in PRODUCTION {
        let problems = production_problems(&metadata, package);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
    // This package does reach both libraries and the test double: the walk sees through it.
    let tooling = production_problems(&metadata, TOOLING);
    assert!(
        tooling
            .iter()
            .any(|p| p.contains("depends on loraplane-operator/testing")),
        "{tooling:?}"
    );
}

fn dep(name: &str, kind: Option<&str>, features: &[&str]) -> Value {
    json!({"name": name, "kind": kind, "features": features})
}

fn package(name: &str, deps: Vec<Value>, features: Value) -> Value {
    json!({"name": name, "dependencies": deps, "features": features})
}

/// The walk finds a tooling dependency however deep, a feature that turns `testing` on, and a
/// default `testing`, each with its path.
#[test]
fn the_check_fails_on_tooling_in_production() {
    let metadata = json!({"packages": [
        package("loraplane-agent", vec![dep("loraplane-kernels", None, &[])], json!({})),
        package("loraplane-kernels", vec![dep("loraplane-bench", Some("build"), &[])], json!({})),
        package("loraplane-bench", vec![], json!({})),
        package(
            "loraplane-operator",
            vec![
                dep("loraplane-operator", Some("dev"), &["testing"]),
                dep("loraplane-bench", Some("dev"), &[]),
            ],
            json!({"default": ["testing"], "testing": []}),
        ),
        package(
            "loraplane-e2e",
            vec![dep("loraplane-operator", None, &["testing"])],
            json!({"x": ["loraplane-operator/testing"]}),
        ),
    ]});
    assert_eq!(
        production_problems(&metadata, "loraplane-agent"),
        [
            "loraplane-agent -> loraplane-kernels -> loraplane-bench: the tooling package is in \
             a production build"
        ]
    );
    // Dev-dependencies are not part of the binary.
    assert_eq!(
        production_problems(&metadata, "loraplane-operator"),
        ["loraplane-operator: `testing` is a default feature"]
    );
    let e2e = production_problems(&metadata, "loraplane-e2e");
    assert!(e2e.contains(&"loraplane-e2e: feature `x` enables loraplane-operator/testing".into()));
    assert!(e2e.contains(&"loraplane-e2e: depends on loraplane-operator/testing".into()));
}

/// The files of `dir`, recursively, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            out.push(path.strip_prefix(dir).unwrap().to_owned());
        }
    }
    out
}

#[test]
fn the_agent_sources_hold_no_benchmark_demo_or_font() {
    let agent = root().join("node-agent");
    for path in files(&agent.join("src")) {
        let stem = path.file_stem().unwrap().to_string_lossy().to_lowercase();
        assert!(
            !(stem.starts_with("bench") || stem.starts_with("demo")),
            "node-agent/src/{} belongs in bench/",
            path.display()
        );
    }
    for path in files(&agent) {
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
        assert!(
            !matches!(ext.as_deref(), Some("ttf" | "otf")),
            "node-agent/{}: fonts are the plots', in bench/assets/",
            path.display()
        );
    }
    let lib = std::fs::read_to_string(agent.join("src/lib.rs")).unwrap();
    for module in ["bench", "demo"] {
        assert!(
            !lib.contains(&format!("mod {module}")),
            "lib.rs declares {module}"
        );
    }
    let manifest = std::fs::read_to_string(agent.join("Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("plotters"),
        "the agent depends on plotters"
    );
}

#[test]
fn the_operator_compiles_its_test_double_only_for_tests() {
    let lib = std::fs::read_to_string(root().join("operator/src/lib.rs")).unwrap();
    let lines: Vec<&str> = lib.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| *l == "pub mod fake_agent;")
        .expect("operator/src/lib.rs declares fake_agent");
    assert_eq!(
        lines[at - 1],
        "#[cfg(any(test, feature = \"testing\"))]",
        "fake_agent must be compiled only for tests and the `testing` feature"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("mod fake_agent"))
            .count(),
        1
    );
    assert!(!lines.iter().any(|l| l.starts_with("pub mod bench")));
}
