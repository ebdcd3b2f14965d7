//! `loraplane-bench serving` end to end over loopback: the suite starts a real agent (the
//! agent library's `serve`, run by `loraplane-bench`) on the tiny fixture (`--serve`), drives
//! it with streaming completions from a workload file, and writes its report and the
//! per-request outputs. Counts
//! are checked (requests, tokens, prompt lengths as the server counted them, the report's
//! files); timings are reported, never asserted.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn bench(args: &[&str], workload: &str, dir: &Path) -> Output {
    let path = dir.join("workload.toml");
    std::fs::write(&path, workload).unwrap();
    Command::new(env!("CARGO_BIN_EXE_loraplane-bench"))
        .args(["serving", "--quick", "--preset", "tiny", "--workload"])
        .arg(&path)
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(run: &Output) {
    assert!(
        run.status.success(),
        "bench serving failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{}", String::from_utf8_lossy(&run.stdout));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn outputs(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const UNIFORM: &str = r#"
name = "tiny-uniform"
requests = 6
concurrency = 4
prompt_tokens = 8
output_tokens = 4
seed = 1
[arrival]
kind = "all-at-once"
[adapters]
count = 3
ranks = [4, 8]
targets = ["q_proj", "v_proj", "down_proj"]
popularity = { kind = "uniform" }
"#;

#[test]
fn serving_suite_drives_its_own_agent_and_counts_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("outputs.jsonl");
    let run = bench(
        &[
            "--serve",
            "--logprobs",
            "--save-outputs",
            saved.to_str().unwrap(),
        ],
        UNIFORM,
        dir.path(),
    );
    ok(&run);

    let out = dir.path().join("out");
    let json = read_json(&out.join("serving.json"));
    assert_eq!(json["suite"], "serving");
    let f = &json["data"]["figures"];
    assert_eq!(
        (&f["requests"], &f["ok"], &f["failed"]),
        (&6.into(), &6.into(), &0.into())
    );
    assert_eq!(f["output_tokens"], 24);
    assert_eq!(f["expected_output_tokens"], 24);
    assert_eq!(json["data"]["requests"].as_array().unwrap().len(), 6);
    assert!(json["data"]["roofline_tok_s"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out.join("serving.md")).unwrap();
    assert!(md.contains("Serving tok/s vs workload roofline") && md.contains("## Method"));
    for png in ["serving-latency.png", "serving-throughput.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }

    // Every request: its adapter (round robin), its four tokens with their log-probabilities.
    let saved = outputs(&saved);
    assert_eq!(saved.len(), 6);
    for (i, r) in saved.iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["model"], format!("lora-{}", i % 3));
        assert_eq!(r["error"], serde_json::Value::Null, "{r}");
        assert_eq!(r["completion_tokens"], 4);
        assert_eq!(r["server_prompt_tokens"], 8);
        assert_eq!(r["finish_reason"], "length");
        assert_eq!(r["tokens"].as_array().unwrap().len(), 4);
        let lps = r["token_logprobs"].as_array().unwrap();
        assert!(lps.iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)));
    }

    // Greedy: the same workload again gives the same tokens.
    let again = dir.path().join("again.jsonl");
    ok(&bench(
        &[
            "--serve",
            "--logprobs",
            "--save-outputs",
            again.to_str().unwrap(),
        ],
        UNIFORM,
        dir.path(),
    ));
    let again = outputs(&again);
    for (a, b) in saved.iter().zip(&again) {
        assert_eq!(a["tokens"], b["tokens"]);
        assert_eq!(a["text"], b["text"]);
    }
}

#[test]
fn text_prompts_poisson_arrivals_and_power_law_popularity() {
    let workload = UNIFORM
        .replace("tiny-uniform", "tiny-text")
        .replace("kind = \"all-at-once\"", "kind = \"poisson\"\nrate = 200.0")
        .replace(
            "{ kind = \"uniform\" }",
            "{ kind = \"power-law\", alpha = 1.0 }",
        )
        .replace("seed = 1", "seed = 1\nprompt_format = \"text\"");
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("outputs.jsonl");
    ok(&bench(
        &["--serve", "--save-outputs", saved.to_str().unwrap()],
        &workload,
        dir.path(),
    ));
    let json = read_json(&dir.path().join("out/serving.json"));
    assert_eq!(json["data"]["figures"]["ok"], 6);
    assert_eq!(json["data"]["figures"]["output_tokens"], 24);
    for r in outputs(&saved) {
        // The text prompt is exactly 8 tokens as the server's tokenizer counts them (BOS
        // included).
        assert_eq!(r["server_prompt_tokens"], 8, "{r}");
        assert_eq!(r["completion_tokens"], 4);
        assert!(r["tokens"].as_array().unwrap().is_empty());
    }
}

#[test]
fn an_unreachable_server_or_a_bad_workload_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = bench(&["--url", "http://127.0.0.1:1"], UNIFORM, dir.path());
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("warm-up request") && err.contains("127.0.0.1:1"),
        "{err}"
    );

    let run = bench(
        &["--serve"],
        &UNIFORM.replace("requests = 6", "requests = 0"),
        dir.path(),
    );
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("`requests` must be at least 1"), "{err}");

    let run = bench(&[], UNIFORM, dir.path());
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--url URL and --serve"));
}
