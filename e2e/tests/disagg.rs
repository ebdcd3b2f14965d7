//! Splitwise as separate processes on loopback: two `--role prefill` agents and one
//! `--role decode` agent against a `--role unified` agent. For many concurrent requests over
//! eight adapters of mixed ranks, greedy outputs through the decode agent are token-for-token
//! the unified agent's. Then a prefill agent is killed (SIGKILL) and the decode agent keeps
//! serving through the other one; every pool returns to its starting free pages.
//!
//! The deterministic mid-stream faults (a peer dying after N messages, a corrupted chunk, a
//! truncated stream, a decode agent leaving) are pinned in node-agent/tests/disagg_grpc.rs,
//! where the fault is injected at an exact message rather than by timing.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use loraplane_e2e::{Agent, World, metric, scrape};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;

const RANKS: [&str; 4] = ["4", "8", "16", "32"];

fn adapters(w: &World) -> std::path::PathBuf {
    let dir = w.path("adapters");
    for i in 0..8 {
        let out = dir.join(format!("lora-{i}"));
        loraplane_e2e::fixtures(&[
            "adapter",
            "--model",
            w.model.to_str().unwrap(),
            "--rank",
            RANKS[i % 4],
            "--targets",
            if i % 2 == 0 {
                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
            } else {
                "q_proj,v_proj,down_proj"
            },
            "--seed",
            &(40 + i).to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    dir
}

async fn generate(agent: &Agent, i: usize) -> Vec<u32> {
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let prompt: Vec<u32> = (0..(10 + (i * 17) % 60))
        .map(|j| ((i * 37 + j * 11) % 500) as u32)
        .collect();
    let request = pb::GenerateRequest {
        request_id: format!("r{i}"),
        adapter: if i % 5 == 4 {
            String::new()
        } else {
            format!("lora-{}", i % 8)
        },
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt,
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(8),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        tokens.extend(msg.token_ids);
        assert!(msg.error.is_empty(), "{}", msg.error);
    }
    tokens
}

async fn free_pages_return(agent: &Agent) {
    for _ in 0..200 {
        let text = scrape(agent.metrics).await;
        let (free, total) = (
            metric(&text, "loraplane_pool_free_pages"),
            metric(&text, "loraplane_pool_capacity_pages"),
        );
        let kv = metric(&text, "loraplane_pool_used_pages{kind=\"kv\"}");
        if kv == Some(0.0) && free.is_some() && free <= total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("KV pages were not returned:\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_agents_match_a_unified_agent_and_survive_a_dead_prefill_agent() {
    let w = World::tiny();
    let adapter_dir = adapters(&w);
    let token = w.path("cluster-token");
    std::fs::write(&token, "e2e-cluster-secret\n").unwrap();
    let (dir, tok) = (
        adapter_dir.to_str().unwrap().to_owned(),
        token.to_str().unwrap().to_owned(),
    );
    let common = [
        "--adapters",
        dir.as_str(),
        "--adapter-roots",
        dir.as_str(),
        "--pool-pages",
        "2048",
    ];
    let prefill_args = |common: &[&str]| {
        let mut a: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--role",
                "prefill",
                "--kv-addr",
                "127.0.0.1:0",
                "--cluster-token-file",
                &tok,
            ]
            .map(String::from),
        );
        a
    };
    let p1 = Agent::start(
        &w,
        &prefill_args(&common)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let p2 = Agent::start(
        &w,
        &prefill_args(&common)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let peers = format!("{},{}", p1.kv.unwrap(), p2.kv.unwrap());
    let mut decode_args: Vec<&str> = common.to_vec();
    decode_args.extend([
        "--role",
        "decode",
        "--prefill-peers",
        &peers,
        "--cluster-token-file",
        &tok,
    ]);
    decode_args.extend(["--local-prefill-threshold", "4", "--kv-timeout", "10s"]);
    let decode = Agent::start(&w, &decode_args);
    let unified = Agent::start(&w, &common);

    let n = 20;
    let expected = futures::future::join_all((0..n).map(|i| generate(&unified, i))).await;
    let got = futures::future::join_all((0..n).map(|i| generate(&decode, i))).await;
    assert_eq!(got, expected, "disaggregated output differs from unified");
    let d = scrape(decode.metrics).await;
    assert_eq!(
        metric(&d, "loraplane_prefills_total{where=\"remote\"}"),
        Some(n as f64),
        "every prompt went remote"
    );
    assert!(
        metric(
            &d,
            "loraplane_kv_transfer_bytes_total{direction=\"received\"}"
        )
        .unwrap()
            > 0.0
    );
    let sent: f64 = [&p1, &p2]
        .iter()
        .map(|p| futures::executor::block_on(scrape(p.metrics)))
        .map(|t| metric(&t, "loraplane_kv_transfer_bytes_total{direction=\"sent\"}").unwrap())
        .sum();
    assert_eq!(
        Some(sent),
        metric(
            &d,
            "loraplane_kv_transfer_bytes_total{direction=\"received\"}"
        )
    );

    // A prefill agent dies: requests fail over to the other one and still match.
    let mut p1 = p1;
    std::process::Command::new("kill")
        .args(["-KILL", &p1.pid().to_string()])
        .status()
        .unwrap();
    p1.wait(Duration::from_secs(10));
    // New prompts: the decode agent's own prefix cache holds most blocks of the earlier ones,
    // and would prefill what little is left of some of them locally.
    let again_expected = futures::future::join_all((n..n + 6).map(|i| generate(&unified, i))).await;
    let again = futures::future::join_all((n..n + 6).map(|i| generate(&decode, i))).await;
    assert_eq!(again, again_expected);
    let d = scrape(decode.metrics).await;
    assert_eq!(
        metric(&d, "loraplane_prefills_total{where=\"local\"}"),
        Some(0.0),
        "the surviving peer served"
    );

    free_pages_return(&decode).await;
    free_pages_return(&p2).await;
    free_pages_return(&unified).await;
}
