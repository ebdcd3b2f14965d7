//! The router signals of issue 15 point 3 on a real agent's metrics listener: the series llm-d's
//! `lora-load-state-scorer` reads (`vllm:lora_adapter_loaded{adapter_name,level,pinned}` and
//! its companions) are present, follow residency, respect `--metrics-adapter-identity`, and
//! stay bounded with hundreds of adapters in memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loraplane_e2e::{Agent, World, http, key_hash, metric, post_json, scrape};
use serde_json::json;

const ADMIN: &str = "router-admin";

/// Lines of `name` (any labels) in a scrape.
fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_series_follow_residency() {
    let world = World::tiny();
    for (name, seed) in [("hot", 2), ("warm", 3), ("pinned", 4)] {
        world.adapter(&format!("adapters/{name}"), seed);
    }
    let roots = world.path("adapters");
    let agent = Agent::start(
        &world,
        &[
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--adapters",
            roots.to_str().unwrap(),
            "--max-running",
            "32",
            "--pool-pages",
            "512",
        ],
    );
    // Pin one through the admin API (the same source: re-read, unchanged, pinned).
    let auth = format!("Bearer {ADMIN}");
    let body = json!({"lora_name": "pinned", "lora_path": roots.join("pinned").display().to_string(), "pin": true});
    let r = http(
        agent.http,
        "POST",
        "/v1/load_lora_adapter",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &json!({"model": "hot", "prompt": "hello", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let m = scrape(agent.metrics).await;
    let loaded = |name: &str, level: &str, pinned: &str| {
        metric(
            &m,
            &format!(
                "vllm:lora_adapter_loaded{{adapter_name=\"{name}\",level=\"{level}\",pinned=\"{pinned}\"}}"
            ),
        )
    };
    assert_eq!(loaded("hot", "gpu", "false"), Some(1.0), "{m}");
    assert_eq!(loaded("warm", "cpu", "false"), Some(1.0), "{m}");
    assert_eq!(loaded("pinned", "cpu", "true"), Some(1.0), "{m}");
    assert_eq!(series(&m, "vllm:lora_adapter_loaded").len(), 3, "{m}");
    assert_eq!(metric(&m, "vllm:num_gpu_loaded_lora_adapters"), Some(1.0));
    assert_eq!(metric(&m, "vllm:num_cpu_loaded_lora_adapters"), Some(2.0));
    assert_eq!(metric(&m, "vllm:max_gpu_lora_adapters"), Some(32.0));
    assert_eq!(
        metric(
            &m,
            "vllm:lora_adapter_load_seconds_count{transition=\"source_to_cpu\"}"
        ),
        Some(4.0),
        "three preloads and the re-read of the pinned one: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "vllm:lora_adapter_load_seconds_count{transition=\"cpu_to_gpu\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "vllm:kv_cache_usage_perc"),
        metric(&m, "vllm:gpu_cache_usage_perc")
    );
    // 512 pages of one layer each, over the tiny model's 2 layers.
    assert_eq!(
        metric(
            &m,
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"256\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "loraplane_lora_adapter_series_omitted"),
        Some(0.0)
    );
}

/// Hundreds of adapters in memory: the per-adapter series stop at the documented cap (256),
/// the counts stay exact, and with `--metrics-adapter-identity id` no adapter name appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_series_are_bounded_and_can_hide_names() {
    let world = World::tiny();
    let one = world.adapter("one", 2);
    let roots = world.path("adapters");
    let n = 300;
    for i in 0..n {
        let dir = roots.join(format!("tenant-adapter-{i:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(one.join(f), dir.join(f)).unwrap();
        }
    }
    let agent = Agent::start(
        &world,
        &[
            "--adapters",
            roots.to_str().unwrap(),
            "--metrics-adapter-identity",
            "id",
        ],
    );
    let m = scrape(agent.metrics).await;
    let lines = series(&m, "vllm:lora_adapter_loaded");
    assert_eq!(lines.len(), 256, "the cap");
    assert_eq!(
        metric(&m, "vllm:num_cpu_loaded_lora_adapters"),
        Some(f64::from(n))
    );
    assert_eq!(
        metric(&m, "loraplane_lora_adapter_series_omitted"),
        Some(f64::from(n - 256))
    );
    assert!(!m.contains("tenant-adapter"), "adapter names leaked:\n{m}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("vllm:lora_adapter_loaded{adapter_name=\"lora-")),
        "{lines:?}"
    );
}
