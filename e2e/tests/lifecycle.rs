//! The agent's lifecycle over the real binary: graceful drain on SIGTERM, cancellation when
//! clients disconnect mid-stream, and the metrics a workload leaves behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use loraplane_agent::metrics::names;
use loraplane_e2e::{
    Agent, World, eventually, http, metric, post_json, request_head, scrape, sse_data,
};
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const PROMPT: &str = "Draining agents finish what they started";

/// Opens a streaming completion on a raw socket and returns it once the first token arrived.
async fn open_stream(addr: SocketAddr, max_tokens: usize) -> BufReader<TcpStream> {
    let body = json!({
        "model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = request_head(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        body.len(),
    );
    s.write_all(format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // Read up to the first SSE event.
    loop {
        line.clear();
        assert!(
            r.read_line(&mut line).await.unwrap() > 0,
            "stream closed early"
        );
        if line.contains("data:") {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let world = World::tiny();
    // Two running slots for twenty requests: most are still queued when the signal lands.
    let mut agent = Agent::start(&world, &["--drain-timeout", "60s", "--max-running", "2"]);
    let max_tokens = 300;
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(tokio::spawn(open_stream(agent.http, max_tokens)));
    }
    let mut readers = Vec::new();
    for s in streams {
        readers.push(s.await.unwrap());
    }
    // Eighteen more, accepted but waiting for a slot.
    let mut queued = Vec::new();
    for _ in 0..18 {
        let body = json!({"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true, "stream": true}).to_string();
        let mut s = TcpStream::connect(agent.http).await.unwrap();
        let head = request_head(
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body.len(),
        );
        s.write_all(format!("{head}{body}").as_bytes())
            .await
            .unwrap();
        queued.push(s);
    }
    // All twenty accepted (counted at submission) before the signal. Not "twenty in flight at
    // once": the two running requests can finish their 300 tokens before a scrape sees that.
    eventually(Duration::from_secs(10), || async {
        let m = scrape(agent.metrics).await;
        let accepted: f64 = m
            .lines()
            .filter(|l| l.starts_with(&format!("{}{{", names::REQUESTS)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        Ok((accepted == 20.0).then_some(()))
    })
    .await
    .unwrap_or_else(|_| panic!("20 requests never accepted: {}", agent.log()));

    agent.sigterm();
    // Readiness fails at once; new requests are refused as retryable on both surfaces.
    eventually(Duration::from_secs(5), || async {
        let r = http(agent.http, "GET", "/readyz", &[], b"").await?;
        Ok((r.status == 503).then_some(()))
    })
    .await
    .unwrap();
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let e = client
        .generate(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("x".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);

    // Every in-flight request completes in full.
    let mut done = 0;
    for mut r in readers {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        let events = sse_data(&rest);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], json!(max_tokens));
        done += 1;
    }
    for mut s in queued {
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let body = &all[text.find("\r\n\r\n").unwrap() + 4..];
        let events = sse_data(body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert!(text.contains(r#""finish_reason":"length""#));
        done += 1;
    }
    assert_eq!(done, 20);
    let status = agent.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(agent.log().contains("drained"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_clients_cancel_and_free_their_pages() {
    let world = World::tiny();
    let agent = Agent::start(&world, &["--pool-pages", "2048"]);
    let start = scrape(agent.metrics).await;
    let free_at_start = metric(&start, names::POOL_FREE).unwrap();
    assert_eq!(free_at_start, 2048.0);

    let mut open = Vec::new();
    for _ in 0..50 {
        open.push(tokio::spawn(open_stream(agent.http, 800)));
    }
    let mut streams = Vec::new();
    for s in open {
        streams.push(s.await.unwrap());
    }
    let busy = scrape(agent.metrics).await;
    assert!(
        metric(&busy, names::POOL_FREE).unwrap() < free_at_start,
        "requests hold pages"
    );
    // Fifty clients walk away mid-stream.
    drop(streams);
    let m = eventually(Duration::from_secs(20), || async {
        let m = scrape(agent.metrics).await;
        // Blocks the cancelled requests filled stay in the prefix cache, as idle pages.
        let cached = metric(&m, r#"loraplane_pool_used_pages{kind="prefix_cache"}"#).unwrap_or(0.0);
        let idle = metric(&m, names::POOL_FREE).map(|f| f + cached) == Some(free_at_start)
            && metric(&m, names::REQUESTS_RUNNING) == Some(0.0)
            && metric(&m, names::REQUESTS_WAITING) == Some(0.0)
            && metric(&m, names::REQUESTS_IN_FLIGHT) == Some(0.0);
        Ok(idle.then_some(m))
    })
    .await
    .unwrap_or_else(|_| panic!("pages never came back:\n{}", agent.log()));
    // They were cancelled, not run to the end: far fewer than 50 × 800 tokens were made.
    let generated: f64 = m
        .lines()
        .filter(|l| l.starts_with(names::GENERATION_TOKENS))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(generated < 50.0 * 800.0 / 2.0, "generated {generated}");
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &json!({"model": "tiny", "prompt": "still fine", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_appears_after_a_workload() {
    let world = World::tiny();
    world.adapter("adapters/sql", 5);
    let adapters = world.path("adapters");
    let agent = Agent::start(&world, &["--adapters", adapters.to_str().unwrap()]);
    for model in ["tiny", "sql"] {
        for stream in [false, true] {
            let r = post_json(
                agent.http,
                "/v1/completions",
                None,
                &json!({"model": model, "prompt": PROMPT, "max_tokens": 8, "ignore_eos": true, "stream": stream}),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let mut client = InferenceClient::connect(agent.grpc_url()).await.unwrap();
    let mut s = client
        .generate(pb::GenerateRequest {
            adapter: "sql".into(),
            prompt: Some(pb::generate_request::Prompt::Text(PROMPT.into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while futures::StreamExt::next(&mut s).await.is_some() {}
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &json!({"model": "ghost", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status, 404);

    let m = scrape(agent.metrics).await;
    for name in names::ALL {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    let positive = [
        format!("{}_count", names::TIME_TO_FIRST_TOKEN),
        format!("{}_count", names::INTER_TOKEN_LATENCY),
        format!("{}_count", names::REQUEST_DURATION),
        format!("{}_count", names::BATCH_TOKENS),
        format!("{}_count", names::STEP_DURATION),
        names::STEPS.to_owned(),
        names::POOL_CAPACITY.to_owned(),
        names::POOL_FREE.to_owned(),
        names::POOL_PAGE_BYTES.to_owned(),
        names::ADAPTERS.to_owned(),
        names::ADAPTER_LOADS.to_owned(),
        names::ADAPTER_HOST_HITS.to_owned(),
        names::HOST_CACHE_USED.to_owned(),
        names::HOST_CACHE_CAPACITY.to_owned(),
        format!("{}{{tenant=\"default\"}}", names::GENERATION_TOKENS),
        format!("{}{{tenant=\"default\"}}", names::PROMPT_TOKENS),
        format!(
            "{}{{api=\"completions\",tenant=\"default\"}}",
            names::REQUESTS
        ),
        format!("{}{{api=\"grpc\",tenant=\"default\"}}", names::REQUESTS),
        format!(
            "{}{{api=\"completions\",kind=\"model_not_found\"}}",
            names::ERRORS
        ),
        format!("{}{{kind=\"adapter\"}}", names::POOL_USED),
    ];
    for series in positive {
        let v = metric(&m, &series).unwrap_or_else(|| panic!("{series} missing:\n{m}"));
        assert!(v > 0.0, "{series} = {v}");
    }
    assert_eq!(metric(&m, names::DRAINING), Some(0.0));
    assert_eq!(metric(&m, names::VLLM_WAITING), Some(0.0));
    assert_eq!(
        metric(&m, &format!("{}{{kind=\"kv\"}}", names::POOL_USED)),
        Some(0.0)
    );
    assert_eq!(metric(&m, names::VLLM_KV_USAGE), Some(0.0));
    let lora = m
        .lines()
        .find(|l| l.starts_with(names::VLLM_LORA_INFO))
        .unwrap();
    assert!(lora.contains("max_lora=\"128\""), "{lora}");
    assert!(lora.contains("running_lora_adapters=\"\""), "{lora}");
}

/// `serve --device` refuses what it cannot run before binding anything: an unknown device at
/// flag parsing, and `cuda:N` in a binary without the GPU backend (or, with it, on a machine
/// without a driver) at start-up, with a message that says why.
#[test]
fn unusable_devices_fail_at_start_up_with_the_reason() {
    let world = World::tiny();
    let run = |device: &str| {
        let out = std::process::Command::new(loraplane_e2e::agent_binary())
            .args(["serve", "--model"])
            .arg(&world.model)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--device", device])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, stdout, stderr) = run("gpu:0");
    assert!(!status.success());
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("expected `cpu`, `cuda` or `cuda:N`"),
        "{stderr}"
    );
    let (status, stdout, stderr) = run("cuda:0");
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("built without the `cuda` feature")
            || stderr.contains("CUDA")
            || stderr.contains("cuda"),
        "{stderr}"
    );
}
