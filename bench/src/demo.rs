//! `loraplane-bench demo`: the main job out of the box. On a machine with no network it writes
//! (once, into a cache directory) a fixture model and 32 adapters of mixed ranks, starts a
//! disaggregated stack — a prefill agent and a decode agent as separate processes talking real
//! gRPC — runs a short mixed workload across the adapters with a progress bar, prints the
//! results, then keeps serving with ready-to-paste client examples until Ctrl-C.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::inference_client::InferenceClient;

use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::model::config::Arch;

/// `loraplane-bench demo`
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Model size: `small` (about 100M parameters, the default) or `tiny` (seconds).
    #[arg(long, value_enum, default_value = "small")]
    pub preset: Preset,
    /// Adapters to generate and serve (ranks 8, 16, 32 and 64 in turn).
    #[arg(long, default_value_t = 32)]
    pub adapters: usize,
    /// Requests in the workload.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Where the fixtures are kept between runs (default: ~/.cache/loraplane/demo-<preset>).
    #[arg(long, env = "LORAPLANE_DEMO_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// The decode agent's HTTP (OpenAI API) address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// The decode agent's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Exit after the workload instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_serve: bool,
}

const RANKS: [usize; 4] = [8, 16, 32, 64];

const PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map handles collisions, with an example.",
    "SELECT name, count(*) FROM orders WHERE status = 'shipped' GROUP BY name;",
    "Summarise the benefits of serving many fine-tuned adapters on one base model.",
    "Translate to French: the weather is sunny and warm today.",
    "def fibonacci(n):",
    "List three ideas for a weekend trip near the mountains.",
    "Once upon a time there was a small model that learned to write",
];

fn cache_dir(args: &DemoArgs) -> PathBuf {
    if let Some(d) = &args.cache_dir {
        return d.clone();
    }
    let preset = format!("{:?}", args.preset).to_lowercase();
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("loraplane").join(format!("demo-{preset}"))
}

/// Writes the model and adapters unless a previous run finished writing them.
fn ensure_fixtures(dir: &Path, args: &DemoArgs) -> anyhow::Result<()> {
    let marker = dir.join(format!("ready-{}", args.adapters));
    if marker.exists() {
        eprintln!("Using the fixtures in {}", dir.display());
        return Ok(());
    }
    eprintln!(
        "Writing a {:?} fixture model and {} adapters into {} (once)…",
        args.preset,
        args.adapters,
        dir.display()
    );
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: args.preset,
        dtype: FixtureDtype::F32,
        seed: 1,
        shards: 1,
    };
    model::write(&spec, &dir.join("model"))?;
    for i in 0..args.adapters {
        let targets = if i % 2 == 0 {
            Module::ALL.to_vec()
        } else {
            vec![Module::Q, Module::K, Module::V, Module::O]
        };
        let rank = RANKS[i % RANKS.len()];
        let spec = AdapterSpec {
            rank,
            alpha: 2.0 * rank as f64,
            targets,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            rslora: i % 3 == 0,
            dtype: FixtureDtype::F32,
            seed: 1000 + i as u64,
        };
        adapter::write(
            &spec,
            &dir.join("model"),
            &dir.join("adapters").join(format!("lora-{i:02}")),
        )?;
        eprint!("\r  adapters written: {}/{}", i + 1, args.adapters);
    }
    eprintln!();
    std::fs::write(marker, b"")?;
    Ok(())
}

/// A child agent, stopped (SIGTERM, then kill) when dropped.
struct AgentProcess {
    child: Child,
    name: &'static str,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped the {} agent", self.name);
    }
}

/// Starts `serve` and returns it with its `listening` line.
fn start(
    name: &'static str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<(AgentProcess, serde_json::Value)> {
    let exe = std::env::current_exe()
        .context("locating loraplane-bench, which runs the agents (its `serve`)")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()
        .with_context(|| format!("starting the {name} agent"))?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let process = AgentProcess { child, name };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let listening: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
        anyhow::anyhow!(
            "the {name} agent did not start; its log ({}):\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    Ok((process, listening))
}

#[derive(Debug, Default)]
struct Outcome {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tokens: usize,
    errors: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn one_request(
    grpc: String,
    i: usize,
    adapters: usize,
    max_tokens: u32,
) -> anyhow::Result<(Option<f64>, Vec<f64>, usize)> {
    let mut client = InferenceClient::connect(grpc).await?;
    let adapter = if i % 8 == 7 || adapters == 0 {
        String::new()
    } else {
        format!("lora-{:02}", i % adapters)
    };
    let request = pb::GenerateRequest {
        request_id: format!("demo-{i}"),
        adapter,
        prompt: Some(pb::generate_request::Prompt::Text(
            PROMPTS[i % PROMPTS.len()].to_owned(),
        )),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut ttft, mut last, mut gaps, mut tokens) = (None, start, Vec::new(), 0);
    while let Some(msg) = stream.message().await? {
        anyhow::ensure!(msg.error.is_empty(), "{}", msg.error);
        let n = msg.token_ids.len();
        if n == 0 {
            continue;
        }
        // Tokens that arrive together share the gap since the previous message.
        let now = Instant::now();
        match ttft {
            None => {
                ttft = Some((now - start).as_secs_f64());
                gaps.extend(std::iter::repeat_n(0.0, n - 1));
            }
            Some(_) => gaps.extend(std::iter::repeat_n(
                (now - last).as_secs_f64() / n as f64,
                n,
            )),
        }
        last = now;
        tokens += n;
    }
    Ok((ttft, gaps, tokens))
}

async fn workload(grpc: String, args: &DemoArgs) -> (Outcome, Duration) {
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let total = args.requests;
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let d = done.load(Ordering::Relaxed);
                let width = 30;
                let filled = d * width / total.max(1);
                eprint!(
                    "\r  [{}{}] {d}/{total} requests",
                    "#".repeat(filled),
                    " ".repeat(width - filled)
                );
                let _ = std::io::stderr().flush();
                if d >= total {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let workers = (0..args.concurrency.max(1)).map(|_| {
        let (grpc, done, next) = (grpc.clone(), done.clone(), next.clone());
        let (adapters, max_tokens) = (args.adapters, args.max_tokens);
        tokio::spawn(async move {
            let mut out = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return out;
                }
                match one_request(grpc.clone(), i, adapters, max_tokens).await {
                    Ok((ttft, gaps, tokens)) => {
                        out.ttft.extend(ttft);
                        out.itl.extend(gaps);
                        out.tokens += tokens;
                    }
                    Err(e) => {
                        out.errors += 1;
                        eprintln!("\n  request {i} failed: {e:#}");
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    let mut all = Outcome::default();
    for w in futures::future::join_all(workers).await {
        let o = w.unwrap_or_default();
        all.ttft.extend(o.ttft);
        all.itl.extend(o.itl);
        all.tokens += o.tokens;
        all.errors += o.errors;
    }
    let elapsed = started.elapsed();
    let _ = progress.await;
    (all, elapsed)
}

async fn remote_prefills(metrics: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("loraplane_prefills_total{where=\"remote\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn print_examples(http: &str, grpc: &str, metrics: &str, adapters: usize) {
    let model = if adapters > 0 { "lora-00" } else { "model" };
    println!(
        r#"
Serving until Ctrl-C. Try it:

  curl -s http://{http}/v1/completions -H 'Content-Type: application/json' \
    -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'

  curl -s http://{http}/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": true}}'

  grpcurl -plaintext -d '{{"adapter": "{model}", "text": "Once upon a time", "sampling": {{"max_tokens": 16}}}}' \
    {grpc} loraplane.v1.Inference/Generate

  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="http://{http}/v1", api_key="none"); print(c.completions.create(model="{model}", prompt="Once upon a time", max_tokens=16).choices[0].text)'

  curl -s http://{http}/v1/models       # the base model and every adapter
  curl -s http://{metrics}/metrics      # Prometheus metrics (their own loopback listener)
"#
    );
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = cache_dir(&args);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    ensure_fixtures(&dir, &args)?;
    let token = dir.join("cluster-token");
    let secret = format!(
        "demo-{:x}-{:x}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ 0x9e37_79b9
    );
    std::fs::write(&token, secret)?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (model_dir, adapters_dir) = (dir.join("model"), dir.join("adapters"));
    let common = |role: &str| -> Vec<String> {
        let mut a = vec!["--role", role, "--model"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        a.push(s(&model_dir));
        a.extend([
            "--cluster-token-file".into(),
            s(&token),
            "--log-format".into(),
            "text".into(),
            "--log-level".into(),
            "warn".into(),
        ]);
        a.extend([
            "--served-model-name".into(),
            "model".into(),
            "--pool-bytes".into(),
            "2GiB".into(),
        ]);
        if args.adapters > 0 {
            a.extend([
                "--adapters".into(),
                s(&adapters_dir),
                "--adapter-roots".into(),
                s(&adapters_dir),
            ]);
        }
        a
    };
    eprintln!("Starting a prefill agent and a decode agent (separate processes, KV over gRPC)…");
    let mut prefill_args = common("prefill");
    prefill_args.extend(
        [
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--kv-addr",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let (prefill, listening) = start("prefill", &prefill_args, &dir.join("prefill.log"))?;
    let kv = listening["kv"]
        .as_str()
        .context("the prefill agent reported no KV address")?
        .to_owned();
    let mut decode_args = common("decode");
    decode_args.extend([
        "--prefill-peers".into(),
        kv,
        "--local-prefill-threshold".into(),
        "8".into(),
    ]);
    decode_args.extend([
        "--grpc-addr".into(),
        args.grpc_addr.to_string(),
        "--http-addr".into(),
        args.http_addr.to_string(),
    ]);
    let (decode, listening) = start("decode", &decode_args, &dir.join("decode.log"))?;
    let (grpc, http, metrics) = (
        listening["grpc"].as_str().unwrap_or_default().to_owned(),
        listening["http"].as_str().unwrap_or_default().to_owned(),
        listening["metrics"].as_str().unwrap_or_default().to_owned(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "Running {} requests over {} adapters ({} in flight, {} tokens each)…",
        args.requests, args.adapters, args.concurrency, args.max_tokens
    );
    let (mut out, elapsed) = runtime.block_on(workload(format!("http://{grpc}"), &args));
    let remote = runtime.block_on(remote_prefills(&metrics)).unwrap_or(0.0);
    let secs = elapsed.as_secs_f64();
    let ms = |v: f64| v * 1e3;
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| requests | {} ({} failed) |", args.requests, out.errors);
    println!("| adapters | {} |", args.adapters);
    println!(
        "| requests/s | {:.2} |",
        args.requests.saturating_sub(out.errors) as f64 / secs
    );
    println!("| tokens/s | {:.1} |", out.tokens as f64 / secs);
    println!(
        "| TTFT p50 / p99 | {:.0} ms / {:.0} ms |",
        ms(percentile(&mut out.ttft, 0.5)),
        ms(percentile(&mut out.ttft, 0.99))
    );
    println!(
        "| inter-token p50 / p99 | {:.1} ms / {:.1} ms |",
        ms(percentile(&mut out.itl, 0.5)),
        ms(percentile(&mut out.itl, 0.99))
    );
    println!("| remote prefills | {remote:.0} |");
    println!("| wall time | {secs:.1} s |");
    anyhow::ensure!(
        out.errors == 0,
        "{} requests failed; logs are in {}",
        out.errors,
        dir.display()
    );
    if args.no_serve {
        drop(decode);
        drop(prefill);
        return Ok(());
    }
    print_examples(&http, &grpc, &metrics, args.adapters);
    runtime.block_on(tokio::signal::ctrl_c())?;
    eprintln!("\nStopping…");
    drop(decode);
    drop(prefill);
    Ok(())
}
