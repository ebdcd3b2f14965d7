//! Placement and adapter loading against real `loraplane-agent serve` processes on loopback
//! (tiny fixture model and adapters written by the agent's own `fixtures` command), through
//! the operator's real Admin client: adapters appear in the agents' `ListAdapters` where the
//! plan put them, an agent restarted with an empty cache gets its adapters back, deletion
//! unloads them, tenant tables are accepted.
//!
//! The agent binary must be built in the same profile first
//! (`cargo build -p loraplane-agent --bins`); without it, or with an agent that has no `serve`,
//! the tests print a loud SKIPPED line and pass.

// Test code: a failed fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use loraplane_operator::agent_client::{AgentApi, GrpcAgents, Target, Timeouts};
use loraplane_operator::controller::converge::{
    AdapterWant, Limits as ConvergeLimits, converge, remove_everywhere,
};
use loraplane_operator::controller::fleet::Fleet;
use loraplane_operator::crd::{AdapterReplicas, LoraAdapter, Phase};
use loraplane_operator::discovery;
use loraplane_operator::fake_agent::agent_pod;
use loraplane_operator::metrics::Metrics;
use loraplane_operator::role::Role;
use loraplane_operator::status::{self, AdapterOutcome};
use loraplane_operator::tenancy::{Limits, Tenant};
use support::{AgentProc, fixtures};

const TOKEN: &str = "agents-test-admin-token";

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(bin: &Path) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        fixtures(
            bin,
            &[
                "model",
                "--preset",
                "tiny",
                "--seed",
                "1",
                "--out",
                model.to_str().unwrap(),
            ],
        );
        for (name, rank, seed) in [("pinned", "8", "2"), ("on-demand", "16", "3")] {
            let out = dir.path().join("adapters").join(name);
            fixtures(
                bin,
                &[
                    "adapter",
                    "--model",
                    model.to_str().unwrap(),
                    "--rank",
                    rank,
                    "--targets",
                    "q_proj,k_proj,v_proj,o_proj",
                    "--seed",
                    seed,
                    "--out",
                    out.to_str().unwrap(),
                ],
            );
        }
        std::fs::write(dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
        Files { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn uri(&self, adapter: &str) -> String {
        format!("file://{}", self.path("adapters").join(adapter).display())
    }
}

/// An agent on the files' model, admin token and adapter root, its gRPC API at `grpc`.
fn start_agent(bin: &Path, files: &Files, grpc: &str) -> AgentProc {
    let log =
        std::fs::File::create(files.path(&format!("agent-{}.log", grpc.replace([':', '.'], "_"))))
            .unwrap();
    AgentProc::spawn(
        Command::new(bin)
            .arg("serve")
            .arg("--model")
            .arg(files.path("model"))
            .args(["--grpc-addr", grpc, "--http-addr", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(files.path("admin-token"))
            .arg("--adapter-roots")
            .arg(files.path("adapters"))
            .args(["--host-cache-bytes", "64MiB", "--log-format", "text"])
            .stderr(Stdio::from(log)),
    )
}

fn adapter(name: &str, uri: String, replicas: Option<i32>) -> LoraAdapter {
    let mut a = LoraAdapter::new(
        name,
        serde_json::from_value(serde_json::json!({
            "baseModel": {"name": "bench", "namespace": "bench"},
            "source": {"uri": uri},
        }))
        .unwrap(),
    );
    a.spec.replicas = replicas.map(|k| AdapterReplicas::Fixed(k.into()));
    a.metadata.namespace = Some("team-a".into());
    a
}

async fn listed(api: &GrpcAgents, addr: SocketAddr) -> Vec<String> {
    let target = Target {
        addr,
        token: TOKEN.into(),
    };
    let mut names: Vec<String> = api
        .list_adapters(&target)
        .await
        .unwrap()
        .into_iter()
        .map(|a| {
            let r = a.adapter.unwrap();
            format!("{}/{}", r.tenant, r.name)
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_loading_restart_and_deletion_on_real_agents() {
    let bin = agent_binary_or_skip!();
    let files = Files::new(&bin);
    let mut agents: Vec<AgentProc> = (0..3)
        .map(|_| start_agent(&bin, &files, "127.0.0.1:0"))
        .collect();
    let mut pods: Vec<Pod> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| agent_pod(i, a.grpc, Role::Unified, 0))
        .collect();
    let api = GrpcAgents::new(Timeouts::default(), Metrics::new());
    let fleet = tokio::sync::Mutex::new(Fleet {
        token: Some(TOKEN.into()),
        ..Fleet::default()
    });
    let ttl = Duration::from_secs(3600);
    let limits = ConvergeLimits {
        ttl,
        loads_per_minute: 0,
    };
    let roles = [Role::Unified];
    let pinned = adapter("pinned", files.uri("pinned"), Some(2));
    let on_demand = adapter("on-demand", files.uri("on-demand"), None);
    let found = discovery::agents(&pods, "bench");
    assert_eq!(found.len(), 3);

    // Placement and loading: the pinned one on two agents (different nodes), the other everywhere.
    let (c, work) = converge(
        &api,
        &fleet,
        &found,
        &roles,
        &AdapterWant::from_adapter(&pinned),
        limits,
    )
    .await;
    assert_eq!(work.loads, 2);
    let st = status::adapter_status(&pinned, &AdapterOutcome::Converged(c), &now());
    assert_eq!(st.phase, Some(Phase::Ready), "{st:#?}");
    assert_eq!(st.rank, Some(8));
    assert_eq!(st.target_modules.len(), 4);
    assert!(
        st.digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:") && d.len() == 71)
    );
    let pods_with: Vec<&str> = st.placements.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(
        pods_with,
        ["bench-unified-0", "bench-unified-2"],
        "spread over nodes"
    );
    let (c, _) = converge(
        &api,
        &fleet,
        &found,
        &roles,
        &AdapterWant::from_adapter(&on_demand),
        limits,
    )
    .await;
    assert_eq!(c.placements.len(), 3);
    assert_eq!(
        listed(&api, agents[0].grpc).await,
        ["team-a/on-demand", "team-a/pinned"]
    );
    assert_eq!(listed(&api, agents[1].grpc).await, ["team-a/on-demand"]);
    assert_eq!(
        listed(&api, agents[2].grpc).await,
        ["team-a/on-demand", "team-a/pinned"]
    );

    // Nothing changed: nothing is loaded again.
    for a in [&pinned, &on_demand] {
        let (_, work) = converge(
            &api,
            &fleet,
            &found,
            &roles,
            &AdapterWant::from_adapter(a),
            limits,
        )
        .await;
        assert_eq!((work.loads, work.unloads), (0, 0));
    }

    // Agent 0 restarts with an empty cache (same address, one more container restart).
    let addr = agents[0].grpc;
    drop(agents.remove(0));
    agents.insert(0, start_agent(&bin, &files, &addr.to_string()));
    assert!(listed(&api, addr).await.is_empty());
    pods[0] = agent_pod(0, addr, Role::Unified, 1);
    let found = discovery::agents(&pods, "bench");
    for a in [&pinned, &on_demand] {
        let (c, work) = converge(
            &api,
            &fleet,
            &found,
            &roles,
            &AdapterWant::from_adapter(a),
            limits,
        )
        .await;
        assert_eq!(work.loads, 1, "reloaded on the restarted agent only");
        assert!(c.placements.iter().all(|p| p.error.is_none()));
    }
    assert_eq!(
        listed(&api, addr).await,
        ["team-a/on-demand", "team-a/pinned"]
    );

    // A digest the files do not have is refused for good (the spec must change).
    let wrong = adapter("wrong", files.uri("pinned"), Some(1));
    let mut wrong = wrong;
    wrong.spec.source.sha256 = Some("0".repeat(64));
    let (c, work) = converge(
        &api,
        &fleet,
        &found,
        &roles,
        &AdapterWant::from_adapter(&wrong),
        limits,
    )
    .await;
    assert_eq!(work.loads, 0);
    let st = status::adapter_status(&wrong, &AdapterOutcome::Converged(c), &now());
    assert_eq!(st.phase, Some(Phase::Failed), "{st:#?}");

    // Deletion (the finalizer's cleanup) unloads it from every agent.
    let key = AdapterWant::from_adapter(&pinned).key();
    let removed = remove_everywhere(&api, &fleet, &found, &key, ttl)
        .await
        .unwrap();
    assert_eq!(removed, 2);
    for a in &agents {
        assert_eq!(listed(&api, a.grpc).await, ["team-a/on-demand"]);
    }

    // Tenant tables: hashes only.
    let table = [Tenant {
        id: "team-a".into(),
        api_key_sha256: vec![loraplane_operator::tenancy::key_hash(b"sk-a")],
        limits: Limits::default(),
    }];
    let target = Target {
        addr,
        token: TOKEN.into(),
    };
    assert_eq!(api.set_tenants(&target, &table).await.unwrap(), 1);

    // A wrong admin credential is told apart from an unreachable agent.
    let bad = Target {
        addr,
        token: "nope".into(),
    };
    let err = api.stats(&bad).await.unwrap_err();
    assert_eq!(err.kind(), "unauthenticated");
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}
