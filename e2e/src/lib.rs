//! Shared helpers for the whole-system tests in `tests/`: find the real `loraplane-agent`
//! binary, write fixture checkpoints with it, start `serve` on loopback (port 0; the agent
//! prints its bound addresses on one stdout line), talk plain HTTP/1.1 over a socket, and
//! compute the engine's direct greedy output in-process for the surfaces to match.
//!
//! The binary must be built in the same profile as the tests: `scripts/test.sh` runs
//! `cargo build --locked -p loraplane-agent --bins` before `cargo test`.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{AdapterUse, EngineConfig, Event, Request, SamplingParams};
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::tokenizer::ChatMessage;

pub mod object_stores;
pub mod s3;
pub mod servers;

/// `target/<profile>/loraplane-agent`, next to the directory holding this test executable.
///
/// Panics with the command to run when the binary is missing.
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("loraplane-agent{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --locked -p loraplane-agent --bins` \
         (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The workspace root (for `proto/` and `e2e/clients/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is inside the workspace")
        .to_owned()
}

/// Runs `loraplane-agent fixtures …` and fails with its stderr.
pub fn fixtures(args: &[&str]) {
    let out = Command::new(agent_binary())
        .arg("fixtures")
        .args(args)
        .output()
        .expect("running loraplane-agent fixtures");
    assert!(
        out.status.success(),
        "fixtures {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary world: a tiny model and adapters written by the real binary.
pub struct World {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
}

impl World {
    /// A tiny Llama checkpoint (seed 1) in a fresh temp dir.
    pub fn tiny() -> World {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        let mut world = World { dir, model };
        world.model = world.tiny_model("tiny", &[]);
        world
    }

    /// Writes another tiny Llama checkpoint (seed 1) at `<dir>/<rel>`, with `extra` arguments
    /// to `fixtures model` (e.g. `--chat-template tools`), and returns its path.
    pub fn tiny_model(&self, rel: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(rel);
        let mut args = vec!["model", "--preset", "tiny", "--seed", "1"];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        fixtures(&args);
        out
    }

    /// Writes an adapter at `<dir>/<rel>` (rank 8 on every module) and returns its path.
    pub fn adapter(&self, rel: &str, seed: u64) -> PathBuf {
        let out = self.dir.path().join(rel);
        fixtures(&[
            "adapter",
            "--model",
            self.model.to_str().unwrap(),
            "--rank",
            "8",
            "--targets",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            "--seed",
            &seed.to_string(),
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// A running `loraplane-agent serve`. Killed on drop if still running.
pub struct Agent {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The Prometheus `/metrics` listener (`--metrics-addr`, loopback).
    pub metrics: SocketAddr,
    /// The `KvTransfer` address of a `--role prefill` agent.
    pub kv: Option<SocketAddr>,
    pub stderr_log: PathBuf,
}

impl Agent {
    /// Starts `serve --model <model> --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 <args>`
    /// and waits for its `listening` line.
    pub fn start(world: &World, args: &[&str]) -> Agent {
        Agent::start_with_env(world, args, &[])
    }

    /// [`Agent::start`] with extra environment variables (credentials, `SSL_CERT_FILE`).
    pub fn start_with_env(world: &World, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_from(world, world.model.as_os_str(), args, env)
    }

    /// [`Agent::start_with_env`] with `--model <model>` (a directory or a source URI).
    pub fn start_from(
        world: &World,
        model: &std::ffi::OsStr,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let stderr_log = world.dir.path().join(format!(
            "agent-{}.log",
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let log = std::fs::File::create(&stderr_log).unwrap();
        let mut child = Command::new(agent_binary())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--log-format", "text", "--log-level", "info"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting loraplane-agent serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the agent printed no listening line; its log:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON listening line");
        assert_eq!(v["event"], "listening", "{line}");
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        Agent {
            grpc: addr("grpc"),
            http: addr("http"),
            metrics: addr("metrics"),
            kv: v["kv"].as_str().map(|a| a.parse().unwrap()),
            child,
            stderr_log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit in {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP response read to the end.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn decode_chunked(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_str = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).context("truncated chunk")?);
        b = b.get(size + 2..).context("truncated chunk")?;
    }
}

/// The head of a raw HTTP/1.1 request with `Connection: close`.
pub fn request_head(method: &str, path: &str, headers: &[(&str, &str)], body_len: usize) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {body_len}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Sends raw bytes and reads the whole response (the server closes after it).
pub async fn http_raw(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .context("HTTP response timed out")??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = std::str::from_utf8(&buf[..split])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("status line")?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .context("status code")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        decode_chunked(raw)?
    } else {
        raw.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// One HTTP request.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let mut bytes = request_head(method, path, headers, body.len()).into_bytes();
    bytes.extend_from_slice(body);
    http_raw(addr, &bytes).await
}

/// POSTs JSON, optionally with a bearer key.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> HttpResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(addr, "POST", path, &headers, body.to_string().as_bytes())
        .await
        .unwrap()
}

/// An agent serving tenants `team-a` (API key `key-a`) and `team-b` (`key-b`), with the admin
/// token `admin` and adapters under the world's `adapters/` directory, plus `extra` flags.
pub fn two_tenant_agent(world: &World, admin: &str, extra: &[&str]) -> Agent {
    let keys = world.path("keys.json");
    let tenant =
        |id: &str, key: &str| serde_json::json!({"id": id, "api_key_sha256": [key_hash(key)]});
    let body =
        serde_json::json!({"tenants": [tenant("team-a", "key-a"), tenant("team-b", "key-b")]});
    std::fs::write(&keys, body.to_string()).unwrap();
    let roots = world.path("adapters");
    let admin = key_hash(admin);
    let mut args = vec![
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--admin-token-sha256",
        &admin,
        "--adapter-roots",
        roots.to_str().unwrap(),
    ];
    args.extend(extra);
    Agent::start(world, &args)
}

/// A gRPC request carrying `key` as its bearer credential.
pub fn with_key<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// `Admin/LoadAdapter` of `tenant`'s adapter `name` from `dir`, with the admin token `admin`.
pub async fn admin_load(agent: &Agent, admin: &str, tenant: &str, name: &str, dir: &Path) {
    let channel = tonic::transport::Endpoint::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = loraplane_proto::v1::LoadAdapterRequest {
        adapter: Some(loraplane_proto::v1::AdapterRef {
            tenant: tenant.into(),
            name: name.into(),
        }),
        source_uri: dir.to_str().unwrap().into(),
        expected_sha256: String::new(),
        pin: false,
    };
    loraplane_proto::v1::admin_client::AdminClient::new(channel)
        .load_adapter(with_key(req, admin))
        .await
        .unwrap();
}

/// `POST /v1/load_lora_adapter` of adapter `name` from `path`, with the admin token `admin`.
pub async fn load_lora(agent: &Agent, admin: &str, name: &str, path: &str) -> HttpResponse {
    let body = serde_json::json!({"lora_name": name, "lora_path": path});
    post_json(agent.http, "/v1/load_lora_adapter", Some(admin), &body).await
}

/// The prompt [`complete`] sends.
const PROMPT: &str = "The adapter under test says";

/// Greedy completion text and token count of `model`: what two sources of the same adapter must
/// agree on.
pub async fn complete(agent: &Agent, model: &str) -> (String, u64) {
    let r = post_json(
        agent.http,
        "/v1/completions",
        None,
        &serde_json::json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    let v = r.json();
    (
        v["choices"][0]["text"].as_str().expect("text").to_owned(),
        v["usage"]["completion_tokens"].as_u64().expect("usage"),
    )
}

/// The sorted ids `GET /v1/models` lists: what a preloaded prefix must add up to.
pub async fn model_ids(agent: &Agent) -> Vec<String> {
    let models = http(agent.http, "GET", "/v1/models", &[], b"")
        .await
        .expect("GET /v1/models");
    assert_eq!(models.status, 200, "{}", models.text());
    let mut ids: Vec<String> = models.json()["data"]
        .as_array()
        .expect("a data array")
        .iter()
        .map(|m| m["id"].as_str().expect("an id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The value of an unlabelled (or exactly labelled) series in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The Prometheus text of an agent's metrics listener ([`Agent::metrics`]).
pub async fn scrape(addr: SocketAddr) -> String {
    http(addr, "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text()
}

/// Hex SHA-256 of an API key, as the keys file holds it.
pub fn key_hash(key: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// The engine's direct greedy output for one prompt: what every surface must reproduce.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
}

/// Runs the engine in-process (no serving layer) on `model`, optionally with one adapter.
pub struct Oracle {
    handle: EngineHandle,
    next: AtomicU64,
}

impl Oracle {
    pub fn new(model: &Path) -> Oracle {
        let handle = EngineHandle::spawn(CpuBackend, model, EngineConfig::default()).unwrap();
        Oracle {
            handle,
            next: AtomicU64::new(0),
        }
    }

    pub async fn load(&self, name: &str, dir: &Path) {
        self.handle
            .load_adapter(
                AdapterKey::new("default", name),
                dir.to_owned(),
                None,
                false,
            )
            .await
            .unwrap();
    }

    /// Text encoded as `/v1/completions` and gRPC `text` do (with the tokenizer's specials).
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        self.handle.tokenizer().encode(text, true).unwrap()
    }

    /// Chat rendered with the template and encoded without extra specials.
    pub fn encode_chat(&self, messages: &[(&str, &str)]) -> Vec<u32> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect();
        let text = self
            .handle
            .tokenizer()
            .render_chat(&messages, true)
            .unwrap();
        self.handle.tokenizer().encode(&text, false).unwrap()
    }

    pub async fn greedy(
        &self,
        adapter: Option<&str>,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> Expected {
        let params = SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        };
        self.generate(adapter, prompt, params).await
    }

    /// The engine's output for `prompt` under `params`.
    pub async fn generate(
        &self,
        adapter: Option<&str>,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Expected {
        let adapters = adapter.into_iter().map(AdapterUse::plain).collect();
        self.compose(adapters, prompt, params).await
    }

    /// The engine's output for `prompt` under `params` with `adapters` composed.
    pub async fn compose(
        &self,
        adapters: Vec<AdapterUse>,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Expected {
        let mut stream = self
            .handle
            .submit(Request {
                id: format!("oracle-{}", self.next.fetch_add(1, Ordering::Relaxed)),
                tenant: TenantId::default_tenant(),
                adapters,
                prompt: prompt.clone(),
                params,
                cache_salt: None,
            })
            .await
            .unwrap();
        let (mut tokens, mut text) = (Vec::new(), String::new());
        while let Some(ev) = stream.recv().await {
            match ev {
                Event::Token { id, text: t, .. } => {
                    tokens.push(id);
                    text.push_str(&t);
                }
                Event::Finished { text: t, .. } => {
                    text.push_str(&t);
                    break;
                }
            }
        }
        Expected {
            prompt,
            tokens,
            text,
        }
    }
}

/// Polls `check` every 50 ms until it returns `Ok(Some(v))` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the Python clients (`pytest` on `target`, relative to the repository root, e.g.
/// `e2e/clients` or one file in it) against `agent`, with the expected outputs in `expected`
/// (the JSON file `e2e/clients/conftest.py` reads) and `scratch` for the generated gRPC stubs.
/// Prints pytest's report and fails with it when a test fails.
pub fn run_pytest(target: &str, agent: &Agent, expected: &Path, scratch: &Path) {
    let root = workspace_root();
    let out = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", target])
        .current_dir(&root)
        .env("LORAPLANE_E2E_HTTP", agent.http.to_string())
        .env("LORAPLANE_E2E_GRPC", agent.grpc.to_string())
        .env("LORAPLANE_E2E_EXPECTED", expected)
        .env("LORAPLANE_E2E_PROTO_ROOT", root.join("proto"))
        .env("LORAPLANE_E2E_TMP", scratch)
        .output()
        .expect("running python3 -m pytest (install e2e/clients/requirements.txt; scripts/test.sh does)");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "the Python clients failed (pip install -r e2e/clients/requirements.txt if modules are missing):\n{report}\nthe agent's log:\n{}",
        agent.log()
    );
}
