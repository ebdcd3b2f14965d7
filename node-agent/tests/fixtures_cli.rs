//! `loraplane-agent fixtures` as a real process: the same seed writes byte-identical files, and
//! bad arguments fail with a message instead of a panic.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loraplane-agent"))
}

fn run(args: &[&str]) {
    let out = agent().args(args).output().expect("spawns");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_checkpoints_and_adapters() {
    let root = tempfile::tempdir().unwrap();
    let p = |name: &str| root.path().join(name).to_string_lossy().into_owned();
    for out in ["m1", "m2"] {
        run(&[
            "fixtures",
            "model",
            "--arch",
            "llama",
            "--preset",
            "tiny",
            "--seed",
            "9",
            "--shards",
            "2",
            "--dtype",
            "bf16",
            "--out",
            &p(out),
        ]);
    }
    for out in ["a1", "a2"] {
        run(&[
            "fixtures",
            "adapter",
            "--model",
            &p("m1"),
            "--rank",
            "8",
            "--targets",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            "--rank-pattern",
            "model.layers.0.mlp.down_proj=16",
            "--rslora",
            "--seed",
            "3",
            "--out",
            &p(out),
        ]);
    }
    let (m1, m2) = (tree(&root.path().join("m1")), tree(&root.path().join("m2")));
    assert_eq!(
        m1.len(),
        7,
        "config, two shards, index, tokenizer, tokenizer config, generation config"
    );
    assert_same(&m1, &m2);
    assert_same(
        &tree(&root.path().join("a1")),
        &tree(&root.path().join("a2")),
    );
}

/// Compares two directory listings by file, naming the files that differ.
fn assert_same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let differing: Vec<&String> = a
        .iter()
        .filter(|(k, v)| b[*k] != **v)
        .map(|(k, _)| k)
        .collect();
    assert!(differing.is_empty(), "files differ: {differing:?}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["fixtures", "adapter", "--model"])
        .arg(root.path().join("missing"))
        .args(["--targets", "q_proj,attn_out", "--out"])
        .arg(root.path().join("a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown module \"attn_out\""));

    let out = agent()
        .args(["fixtures", "adapter", "--model"])
        .arg(root.path().join("missing"))
        .arg("--out")
        .arg(root.path().join("a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.json"),
        "names the missing file: {stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
