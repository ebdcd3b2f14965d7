//! A simulated scale-up and scale-down of an autoscaled role against real
//! `loraplane-agent serve` processes on loopback: what the StatefulSet controller and the
//! kubelet would do when the HPA changes the count, with the operator's discovery, placement
//! and tenant push doing what its reconciles do. The claim under test: no request is lost.
//!
//! - Scale-up: a new agent (a new pod of the operator's StatefulSet) becomes ready; the
//!   operator places the adapter and pushes the tenant table there, and it serves.
//! - Scale-down: the highest ordinal gets SIGTERM while requests stream from it. Every
//!   accepted request finishes with all its tokens; a request that reaches the draining agent
//!   is refused retryably (`UNAVAILABLE`) and succeeds on the agent that stays; the agent exits
//!   0 well inside the StatefulSet's `terminationGracePeriodSeconds` (the operator's builder
//!   sets it past the agents' `--drain-timeout`), so the kubelet never kills it mid-request.
//!
//! The agent binary must be built in the same profile first
//! (`cargo build -p loraplane-agent --bins`); without it the test prints a loud SKIPPED line
//! and passes.

// Test code: a failed fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use loraplane_operator::agent_client::{AgentApi, GrpcAgents, Target, Timeouts};
use loraplane_operator::controller::converge::{AdapterWant, Limits as ConvergeLimits, converge};
use loraplane_operator::controller::fleet::Fleet;
use loraplane_operator::crd::{Autoscaling, AutoscalingTarget, BaseModel, LoraAdapter};
use loraplane_operator::desired::{AgentParams, statefulset};
use loraplane_operator::discovery;
use loraplane_operator::fake_agent;
use loraplane_operator::metrics::Metrics;
use loraplane_operator::role::Role;
use loraplane_operator::tenancy::{Limits, Tenant, key_hash};
use loraplane_proto::v1::inference_client::InferenceClient;
use loraplane_proto::v1::{FinishReason, GenerateRequest, SamplingParams, generate_request};
use support::{AgentProc, fixtures};

const TOKEN: &str = "autoscaling-test-admin-token";
const API_KEY: &str = "sk-team-a-autoscaling";
const DRAIN: Duration = Duration::from_secs(30);
/// Long enough that the requests are still streaming when SIGTERM arrives (the tiny model's
/// context is 1024 positions).
const MAX_TOKENS: u32 = 900;

/// An agent of the test directory's model, token and adapter root; pod `ordinal`.
fn start_agent(bin: &Path, dir: &Path, ordinal: usize) -> AgentProc {
    let log = std::fs::File::create(dir.join(format!("agent-{ordinal}.log"))).unwrap();
    AgentProc::spawn(
        Command::new(bin)
            .arg("serve")
            .arg("--model")
            .arg(dir.join("model"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(dir.join("admin-token"))
            .arg("--adapter-roots")
            .arg(dir.join("adapters"))
            .args(["--drain-timeout", &format!("{}s", DRAIN.as_secs())])
            .args(["--log-format", "text"])
            .stderr(Stdio::from(log)),
    )
}

/// The model: unified, autoscaled between 1 and 3 agents on running sequences.
fn model() -> BaseModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "loraplane.dev/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "scale", "namespace": "models", "uid": "uid-scale"},
        "spec": {
            "source": {"uri": "file:///models/tiny"},
            "serving": {"mode": "Unified", "unified": {"autoscaling": {
                "minReplicas": 1, "maxReplicas": 3, "target": {"runningSequences": 4}}}},
        }
    }))
    .unwrap()
}

/// Pod `ordinal` of the role's StatefulSet as the StatefulSet controller would create it: its
/// template's labels, ready, at `addr`.
fn pod(model: &BaseModel, ordinal: usize, addr: SocketAddr) -> Pod {
    let sts =
        statefulset::statefulset(model, Role::Unified, &AgentParams::default(), "fp").unwrap();
    let template = sts.spec.unwrap().template;
    let name = format!("{}-{ordinal}", sts.metadata.name.unwrap());
    let meta = ObjectMeta {
        uid: Some(format!("uid-{name}")),
        name: Some(name),
        namespace: Some("models".into()),
        labels: template.metadata.unwrap().labels,
        ..ObjectMeta::default()
    };
    fake_agent::pod(meta, format!("node-{ordinal}"), addr, true, 0)
}

/// What the operator's reconciles do for these pods: push the tenant table to each agent and
/// converge the adapter onto them. Returns the loads it made.
async fn reconcile(
    api: &GrpcAgents,
    fleet: &tokio::sync::Mutex<Fleet>,
    pods: &[Pod],
    a: &LoraAdapter,
) -> u32 {
    let found = discovery::agents(pods, "scale");
    let table = [Tenant {
        id: "team-a".into(),
        api_key_sha256: vec![key_hash(API_KEY.as_bytes())],
        limits: Limits::default(),
    }];
    for agent in &found {
        let target = Target {
            addr: agent.addr,
            token: TOKEN.into(),
        };
        api.set_tenants(&target, &table).await.unwrap();
    }
    let (c, work) = converge(
        api,
        fleet,
        &found,
        &[Role::Unified],
        &AdapterWant::from_adapter(a),
        ConvergeLimits {
            ttl: Duration::from_secs(3600),
            loads_per_minute: 0,
        },
    )
    .await;
    assert!(c.placements.iter().all(|p| p.error.is_none()), "{c:?}");
    work.loads
}

fn request(i: usize, max_tokens: u32) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(GenerateRequest {
        request_id: format!("req-{i}"),
        adapter: "sql".into(),
        prompt: Some(generate_request::Prompt::Text(format!(
            "request {i}: the fleet scales"
        ))),
        sampling: Some(SamplingParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..SamplingParams::default()
        }),
        ..GenerateRequest::default()
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    r
}

/// One streamed request: tokens received, finish reason, when it ended.
#[derive(Debug)]
struct Outcome {
    tokens: usize,
    finish: i32,
    error: String,
    ended: Instant,
}

/// Starts `n` streaming requests on `addr` and returns once each has its first tokens.
async fn streams(addr: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let mut handles = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(n);
    for i in 0..n {
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            let mut client = InferenceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let mut stream = client
                .generate(request(i, MAX_TOKENS))
                .await
                .unwrap()
                .into_inner();
            let mut out = Outcome {
                tokens: 0,
                finish: 0,
                error: String::new(),
                ended: Instant::now(),
            };
            let mut started = false;
            while let Some(msg) = stream.message().await.unwrap() {
                out.tokens += msg.token_ids.len();
                if !started && out.tokens > 0 {
                    started = true;
                    let _ = tx.send(i).await;
                }
                if msg.finish_reason != 0 {
                    out.finish = msg.finish_reason;
                    out.error = msg.error;
                }
            }
            out.ended = Instant::now();
            out
        }));
    }
    for _ in 0..n {
        rx.recv().await.unwrap();
    }
    handles
}

/// One whole request on whichever of `agents` takes it, in order, retrying on a retryable
/// refusal the way a client behind the Service does. Returns the agent that served it.
async fn generate_anywhere(agents: &[SocketAddr], i: usize) -> (SocketAddr, usize) {
    for addr in agents {
        // An agent that already exited is simply not there any more.
        let Ok(mut client) = InferenceClient::connect(format!("http://{addr}")).await else {
            continue;
        };
        match client.generate(request(i, 8)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let mut tokens = 0;
                while let Some(msg) = stream.message().await.unwrap() {
                    tokens += msg.token_ids.len();
                }
                return (*addr, tokens);
            }
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "a draining agent refuses retryably: {status:?}"
            ),
        }
    }
    panic!("no agent took request {i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_and_down_under_load_loses_no_request() {
    let bin = agent_binary_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    fixtures(
        &bin,
        &[
            "model",
            "--preset",
            "tiny",
            "--seed",
            "1",
            "--out",
            model_dir.to_str().unwrap(),
        ],
    );
    let adapter_dir = dir.path().join("adapters").join("sql");
    fixtures(
        &bin,
        &[
            "adapter",
            "--model",
            model_dir.to_str().unwrap(),
            "--rank",
            "8",
            "--seed",
            "2",
            "--out",
            adapter_dir.to_str().unwrap(),
        ],
    );
    std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    let m = model();
    let spec = m.spec.serving.unified.clone().unwrap();
    assert_eq!(
        spec.autoscaling,
        Some(Autoscaling {
            min_replicas: 1,
            max_replicas: 3,
            target: AutoscalingTarget {
                running_sequences: Some(4),
                ..AutoscalingTarget::default()
            },
            scale_down_stabilization_seconds: None,
        })
    );
    let params = AgentParams {
        drain_timeout: DRAIN,
        ..AgentParams::default()
    };
    let sts = statefulset::statefulset(&m, Role::Unified, &params, "fp").unwrap();
    let sts_spec = sts.spec.unwrap();
    assert_eq!(sts_spec.replicas, None, "the HPA owns the count");
    let grace = Duration::from_secs(
        u64::try_from(
            sts_spec
                .template
                .spec
                .unwrap()
                .termination_grace_period_seconds
                .unwrap(),
        )
        .unwrap(),
    );
    assert!(grace > DRAIN, "the kubelet waits out the drain");

    let mut adapter = LoraAdapter::new(
        "sql",
        serde_json::from_value(serde_json::json!({
            "baseModel": {"name": "scale", "namespace": "models"},
            "source": {"uri": format!("file://{}", adapter_dir.display())},
        }))
        .unwrap(),
    );
    adapter.metadata.namespace = Some("team-a".into());
    let api = GrpcAgents::new(Timeouts::default(), Metrics::new());
    let fleet = tokio::sync::Mutex::new(Fleet {
        token: Some(TOKEN.into()),
        ..Fleet::default()
    });

    // minReplicas: one agent.
    let a0 = start_agent(&bin, dir.path(), 0);
    let mut pods = vec![pod(&m, 0, a0.grpc)];
    assert_eq!(reconcile(&api, &fleet, &pods, &adapter).await, 1);

    // Scale-up to 2: the new pod is ready; the operator's reconcile places the adapter there
    // and it serves.
    let mut a1 = start_agent(&bin, dir.path(), 1);
    pods.push(pod(&m, 1, a1.grpc));
    assert_eq!(
        reconcile(&api, &fleet, &pods, &adapter).await,
        1,
        "loaded on the new agent only"
    );
    let (served_by, tokens) = generate_anywhere(&[a1.grpc], 0).await;
    assert_eq!((served_by, tokens), (a1.grpc, 8));

    // Scale-down to 1: ordinal 1 goes while six requests stream from it.
    let running = streams(a1.grpc, 6).await;
    let sigterm = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &a1.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // The endpoints controller drops the terminating pod; a client that still reaches it is
    // refused retryably and goes to the agent that stays.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 10..13 {
        let (addr, tokens) = generate_anywhere(&[a1.grpc, a0.grpc], i).await;
        assert_eq!((addr, tokens), (a0.grpc, 8), "request {i}");
    }
    pods[1]
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();

    let mut in_flight_at_sigterm = 0;
    for h in running {
        let o = h.await.unwrap();
        assert_eq!(
            (o.tokens, o.finish, o.error.as_str()),
            (MAX_TOKENS as usize, FinishReason::Length as i32, ""),
            "every accepted request ends with all its tokens"
        );
        if o.ended > sigterm {
            in_flight_at_sigterm += 1;
        }
    }
    assert!(
        in_flight_at_sigterm > 0,
        "SIGTERM came while requests were streaming"
    );
    let exit = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = a1.child.try_wait().unwrap() {
                return Some((status, Instant::now()));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let (status, exited) = exit.expect("the agent exits within the grace period");
    assert!(status.success(), "a drained agent exits 0: {status:?}");
    assert!(
        exited - sigterm < DRAIN,
        "it left as soon as its requests were done"
    );

    // The operator's next reconcile sees one ready agent: nothing to load or unload.
    pods.pop();
    assert_eq!(reconcile(&api, &fleet, &pods, &adapter).await, 0);
    let (addr, tokens) = generate_anywhere(&[a0.grpc], 20).await;
    assert_eq!((addr, tokens), (a0.grpc, 8));
}
