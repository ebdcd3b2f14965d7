//! `bench pd`, second method: real agents as separate processes. A unified agent, then a
//! prefill agent and a decode agent (`serve --role prefill|decode`, KV over the gRPC
//! `KvTransfer` channel), each pinned to its own core with `taskset` when the machine has it
//! (pinning by an external tool: node-agent forbids the `unsafe` a syscall would need). A
//! client replays the same jobs in real time over `Inference/Generate` and stamps every token
//! with the wall clock.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;
use tokio::sync::mpsc::{self, UnboundedSender};
use tonic::transport::Endpoint;

use loraplane_agent::engine::{Event, FinishReason};

use crate::suites::Progress;
use crate::suites::sim::{Job, Tracker};

/// A child agent, killed through its own handle when dropped.
struct Agent {
    child: Child,
    /// Held open: the agent writes one line, and a closed pipe must not surprise it.
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the agents are configured (the same engine sizing as the in-process engines).
pub(crate) struct AgentConfig {
    pub model: PathBuf,
    pub pool_bytes: u64,
    pub chunk: usize,
    pub max_running: usize,
    pub scratch: PathBuf,
    /// Pin the unified agent to this core (the planner's validation: one core, one device);
    /// `None`: it uses every core.
    pub unified_core: Option<usize>,
}

/// What the process runs measured.
pub(crate) struct ProcessRuns {
    pub unified: Tracker,
    pub disaggregated: Tracker,
    pub pinned: bool,
}

fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start(
    role: &str,
    core: Option<usize>,
    extra: &[String],
    cfg: &AgentConfig,
) -> anyhow::Result<(Agent, serde_json::Value)> {
    let exe = std::env::current_exe()
        .context("locating loraplane-bench, which runs the agents (its `serve`)")?;
    let mut cmd = match core {
        Some(c) => {
            let mut t = Command::new("taskset");
            t.arg("-c").arg(c.to_string()).arg(&exe);
            t
        }
        None => Command::new(&exe),
    };
    let log = cfg.scratch.join(format!("{role}.log"));
    cmd.arg("serve")
        .args(["--role", role, "--model"])
        .arg(&cfg.model)
        .args(["--served-model-name", "model", "--log-format", "text"])
        .args(["--log-level", "warn", "--cluster-token-file"])
        .arg(cfg.scratch.join("cluster-token"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--pool-bytes")
        .arg(cfg.pool_bytes.to_string())
        .arg("--max-batch-tokens")
        .arg(cfg.chunk.to_string())
        .arg("--max-prefill-chunk")
        .arg(cfg.chunk.to_string())
        .arg("--max-running")
        .arg(cfg.max_running.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log)?));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {role} agent"))?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("the {role} agent has no stdout");
    };
    let mut agent = Agent {
        child,
        _stdout: BufReader::new(stdout),
    };
    let mut line = String::new();
    agent._stdout.read_line(&mut line)?;
    let listening: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
        anyhow::anyhow!(
            "the {role} agent did not start; its log ({}):\n{}",
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    Ok((agent, listening))
}

fn addr(listening: &serde_json::Value, key: &str) -> anyhow::Result<String> {
    listening[key]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the agent reported no {key} address: {listening}"))
}

/// A request's stream, stamped with seconds since the run's start.
enum Msg {
    Tokens { job: usize, at: f64, n: usize },
    Done { job: usize, at: f64, ok: bool },
}

/// Replays `jobs` against the agent at `grpc` in real time.
async fn replay(
    grpc: &str,
    jobs: &[Job],
    progress: &mut dyn FnMut(usize, usize, f64),
) -> anyhow::Result<Tracker> {
    let channel = Endpoint::from_shared(format!("http://{grpc}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let client = InferenceClient::new(channel);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    for (i, job) in jobs.iter().enumerate() {
        let (mut client, tx, job) = (client.clone(), tx.clone(), job.clone());
        tokio::spawn(async move {
            let at = start + Duration::from_secs_f64(job.arrival);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let req = pb::GenerateRequest {
                request_id: format!("r{i}"),
                prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: job.prompt.clone(),
                })),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(job.max_tokens as u32),
                    ignore_eos: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let result = async {
                let mut stream = client.generate(req).await?.into_inner();
                while let Some(msg) = stream.message().await? {
                    anyhow::ensure!(msg.error.is_empty(), "{}", msg.error);
                    if !msg.token_ids.is_empty() {
                        let at = start.elapsed().as_secs_f64();
                        let _ = tx.send(Msg::Tokens {
                            job: i,
                            at,
                            n: msg.token_ids.len(),
                        });
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = &result {
                tracing::warn!(request = i, error = %e, "bench request failed");
            }
            let _ = tx.send(Msg::Done {
                job: i,
                at: start.elapsed().as_secs_f64(),
                ok: result.is_ok(),
            });
        });
    }
    drop(tx);
    let mut tracker = Tracker::new(jobs);
    let mut senders: HashMap<usize, UnboundedSender<Event>> = HashMap::new();
    let mut last_at: HashMap<usize, f64> = HashMap::new();
    let mut done = 0;
    while let Some(msg) = rx.recv().await {
        let (job, at) = match msg {
            Msg::Tokens { job, at, .. } | Msg::Done { job, at, .. } => (job, at),
        };
        let sender = senders
            .entry(job)
            .or_insert_with(|| tracker.channel(job))
            .clone();
        match msg {
            Msg::Tokens { n, .. } => {
                // Tokens that arrive together share the gap since the job's previous message
                // (the first message's extra tokens come with no gap).
                let prev = last_at.insert(job, at);
                for k in 1..=n {
                    let _ = sender.send(Event::Token {
                        id: 0,
                        text: String::new(),
                        logprob: None,
                        logits: None,
                    });
                    let t = prev.map_or(at, |p| p + (at - p) * k as f64 / n as f64);
                    tracker.poll(t);
                }
                continue;
            }
            Msg::Done { ok, .. } => {
                let _ = sender.send(Event::Finished {
                    reason: if ok {
                        FinishReason::Length
                    } else {
                        FinishReason::Error
                    },
                    text: String::new(),
                    usage: Default::default(),
                    timings: Default::default(),
                    error: None,
                });
                done += 1;
                progress(done, jobs.len(), at);
            }
        }
        tracker.poll(at);
    }
    Ok(tracker)
}

/// Runs `jobs` on a unified agent, then on a prefill + decode pair.
pub(crate) fn run(
    cfg: &AgentConfig,
    jobs: &[Job],
    progress: &mut Progress,
) -> anyhow::Result<ProcessRuns> {
    std::fs::write(
        cfg.scratch.join("cluster-token"),
        format!("bench-{}", std::process::id()),
    )?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2 && have_taskset();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    progress.update("processes: starting a unified agent");
    let (agent, listening) = start("unified", cfg.unified_core.filter(|_| pinned), &[], cfg)?;
    let grpc = addr(&listening, "grpc")?;
    let unified = runtime.block_on(replay(&grpc, jobs, &mut |d, n, t| {
        progress.update(format!("processes, unified: {d}/{n} requests, {t:.1} s"))
    }))?;
    drop(agent);

    progress.update("processes: starting a prefill agent and a decode agent");
    let kv_addr = ["--kv-addr".to_owned(), "127.0.0.1:0".to_owned()];
    let (prefill, listening) = start("prefill", pinned.then_some(0), &kv_addr, cfg)?;
    let kv = addr(&listening, "kv")?;
    let peers = [
        "--prefill-peers".to_owned(),
        kv,
        "--local-prefill-threshold".to_owned(),
        "1".to_owned(),
    ];
    let (decode, listening) = start("decode", pinned.then_some(1), &peers, cfg)?;
    let grpc = addr(&listening, "grpc")?;
    let disaggregated = runtime.block_on(replay(&grpc, jobs, &mut |d, n, t| {
        progress.update(format!(
            "processes, disaggregated: {d}/{n} requests, {t:.1} s"
        ))
    }))?;
    drop(decode);
    drop(prefill);
    Ok(ProcessRuns {
        unified,
        disaggregated,
        pinned,
    })
}
