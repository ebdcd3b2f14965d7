//! The contract between the operator and the agent's configuration: the operator renders each
//! role's `agent.toml` (ConfigMap) and command line (StatefulSet) with string keys, and the
//! agent reads them with its own parser (`--config`, clap's flags and value parsers, then
//! `validate`). This test renders both for representative `BaseModel`s — unified and
//! disaggregated, with memory budgets, a private Hub source and tenancy — parses them exactly
//! as `loraplane-agent serve` does, and checks every value arrives as the spec meant it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use loraplane_agent::config::{LogFormat, PoolSize, ServeArgs, parse_cli};
use loraplane_agent::disagg::config::Role as AgentRole;
use loraplane_operator::crd::BaseModel;
use loraplane_operator::desired::AgentParams;
use loraplane_operator::desired::config::{
    CACHE_DIR, CONFIG_DIR, CONFIG_KEY, CREDENTIALS_DIR, HF_TOKEN_DIR, agent_toml,
};
use loraplane_operator::desired::statefulset::agent_args;
use loraplane_operator::role::{Role, roles};
use serde_json::json;

/// The agent's command line, as `loraplane-agent` declares its `serve` subcommand.
#[derive(Debug, Parser)]
struct AgentCli {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    Serve(Box<ServeArgs>),
}

fn base_model(spec: serde_json::Value) -> BaseModel {
    serde_json::from_value(json!({
        "apiVersion": "loraplane.dev/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "llama", "namespace": "models", "uid": "u-1"},
        "spec": spec,
    }))
    .expect("a valid BaseModel")
}

/// What the agent makes of the operator's configuration for one role: the ConfigMap's file
/// written where the pod would mount it (here a temp dir), the StatefulSet's arguments with
/// `--config` pointing at it.
fn agent_view(model: &BaseModel, role: Role, params: &AgentParams, dir: &Path) -> ServeArgs {
    let file = dir.join(CONFIG_KEY);
    std::fs::write(&file, agent_toml(model, params).unwrap()).unwrap();
    let mounted = format!("{CONFIG_DIR}/{CONFIG_KEY}");
    let mut argv: Vec<OsString> = vec!["loraplane-agent".into()];
    for arg in agent_args(model, role, params) {
        argv.push(if arg == mounted {
            file.clone().into_os_string()
        } else {
            arg.into()
        });
    }
    assert!(
        argv.iter().any(|a| a == file.as_os_str()),
        "the arguments name the mounted config file"
    );
    let cli = parse_cli::<AgentCli>(argv).unwrap_or_else(|e| panic!("{role}: {e}"));
    let AgentCommand::Serve(args) = cli.command;
    *args
}

/// Runs the agent's validation too, with the mounted Secrets replaced by files in `dir`
/// (the paths the operator wrote are checked first).
fn validated(mut args: ServeArgs, dir: &Path) -> loraplane_agent::config::ServeConfig {
    let secret = |path: &Option<PathBuf>, name: &str| {
        assert_eq!(
            path.as_deref(),
            Some(Path::new(&format!("{CREDENTIALS_DIR}/{name}"))),
        );
        let local = dir.join(name);
        std::fs::write(&local, format!("{name}-value\n")).unwrap();
        Some(local)
    };
    args.tenancy.admin_token_file = secret(&args.tenancy.admin_token_file, "admin-token");
    args.disagg.cluster_token_file = secret(&args.disagg.cluster_token_file, "cluster-token");
    if args.sources.hf_token_file.is_some() {
        let local = dir.join("hf-token");
        std::fs::write(&local, "hf_secret\n").unwrap();
        args.sources.hf_token_file = Some(local);
    }
    args.validate(|_| None).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What every role of every model gets, whatever the spec says.
fn assert_common(a: &ServeArgs, served: &str, params: &AgentParams) {
    assert_eq!(a.server.served_model_name.as_deref(), Some(served));
    assert_eq!(a.server.grpc_addr, addr("0.0.0.0:50051"));
    assert_eq!(a.server.http_addr, addr("0.0.0.0:8000"));
    // Metrics on their own port, for the chart's PodMonitor; never on the API port.
    assert_eq!(a.server.metrics_addr, addr("0.0.0.0:9400"));
    assert_eq!(a.server.drain_timeout, params.drain_timeout);
    assert_eq!(a.disagg.kv_addr, addr("0.0.0.0:50052"));
    assert_eq!(
        a.sources.source_cache_dir.as_deref(),
        Some(Path::new(&format!("{CACHE_DIR}/sources")))
    );
    assert_eq!(a.logging.log_format, LogFormat::Json);
    assert_eq!(
        a.tenancy.api_keys_file, None,
        "tenants arrive over Admin/SetTenants"
    );
}

#[test]
fn unified_model_with_memory_budgets_and_a_private_hub_source() {
    let model = base_model(json!({
        "source": {"huggingFace": {
            "repo": "meta-llama/Llama-3.1-8B",
            "revision": "v1",
            "tokenSecretRef": {"name": "hub"},
        }},
        "dtype": "float16",
        "serving": {"mode": "Unified", "unified": {"replicas": 3}},
        "memory": {
            "devicePoolFraction": 0.75,
            "hostAdapterCacheBytes": "64Gi",
            "maxAdapterRank": 128,
        },
        "tenancy": {"allowedNamespaces": ["team-a", "team-b"]},
    }));
    let params = AgentParams {
        drain_timeout: Duration::from_millis(45_500),
        ..AgentParams::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let rendered: Vec<Role> = roles(&model).into_iter().map(|(r, _)| r).collect();
    assert_eq!(rendered, [Role::Unified]);

    let a = agent_view(&model, Role::Unified, &params, dir.path());
    assert_common(&a, "llama", &params);
    assert_eq!(a.server.role, AgentRole::Unified);
    assert_eq!(
        a.server.model.as_deref(),
        Some("hf://meta-llama/Llama-3.1-8B@v1")
    );
    assert_eq!(a.engine.dtype, "f16");
    assert_eq!(a.engine.device_pool_fraction, 0.75);
    assert_eq!(a.adapters.host_cache_bytes, 64 << 30);
    assert_eq!(a.adapters.max_adapter_rank, 128);
    assert_eq!(
        a.sources.hf_token_file.as_deref(),
        Some(Path::new(&format!("{HF_TOKEN_DIR}/token")))
    );
    assert!(a.disagg.prefill_peers.is_empty());

    let c = validated(a, dir.path());
    assert_eq!(c.model, "hf://meta-llama/Llama-3.1-8B@v1");
    assert_eq!(c.drain_timeout, Duration::from_millis(45_500));
    let engine = c.engine_config(1);
    assert_eq!(engine.host_cache_bytes, 64 << 30);
    assert_eq!(engine.adapter_limits.max_rank, 128);
    assert_eq!(c.sources.hf_token.as_deref(), Some("hf_secret"));
    assert!(c.admin.is_admin("admin-token-value"));
    // On the (default) CPU device the fraction does not apply; the pool defaults to bytes.
    assert_eq!(c.pool, PoolSize::Bytes(2 << 30));
}

#[test]
fn disaggregated_model_prefill_and_decode_roles() {
    let model = base_model(json!({
        "source": {"uri": "pvc://weights/llama/3.1-8b"},
        "serving": {
            "mode": "Disaggregated",
            "prefill": {"replicas": 2},
            "decode": {"replicas": 4},
        },
        "memory": {"hostAdapterCacheBytes": "1536Mi"},
        "tenancy": {"namespaceSelector": {"matchLabels": {"loraplane.dev/tenant": "true"}}},
    }));
    let params = AgentParams {
        cluster_domain: "cluster.example".into(),
        ..AgentParams::default()
    };
    let rendered: Vec<Role> = roles(&model).into_iter().map(|(r, _)| r).collect();
    assert_eq!(rendered, [Role::Prefill, Role::Decode]);

    for (role, agent_role) in [
        (Role::Prefill, AgentRole::Prefill),
        (Role::Decode, AgentRole::Decode),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let a = agent_view(&model, role, &params, dir.path());
        assert_common(&a, "llama", &params);
        assert_eq!(a.server.role, agent_role, "{role}");
        assert_eq!(
            a.server.model.as_deref(),
            Some("/models/weights/llama/3.1-8b")
        );
        assert_eq!(
            a.engine.dtype, "auto",
            "no dtype in the spec: the checkpoint's"
        );
        assert_eq!(a.adapters.host_cache_bytes, 1536 << 20);
        assert_eq!(a.sources.hf_token_file, None);
        let peers = match role {
            Role::Decode => vec!["llama-prefill.models.svc.cluster.example:50052".to_owned()],
            _ => vec![],
        };
        assert_eq!(a.disagg.prefill_peers, peers, "{role}");

        let c = validated(a, dir.path());
        assert_eq!(c.role, agent_role);
        let cluster = c
            .disagg
            .cluster_token
            .as_ref()
            .expect("the cluster credential");
        assert_eq!(c.disagg.decode.peers, peers);
        assert!(cluster.verify("cluster-token-value"));
        assert!(
            !c.admin.is_admin("cluster-token-value"),
            "the cluster credential is not the admin credential"
        );
    }
}

#[test]
fn a_file_source_becomes_a_path_and_defaults_stay_the_agents() {
    let model = base_model(json!({
        "source": {"uri": "file:///srv/models/qwen2"},
        "dtype": "bfloat16",
        "serving": {"mode": "Unified"},
    }));
    let params = AgentParams::default();
    let dir = tempfile::tempdir().unwrap();
    let a = agent_view(&model, Role::Unified, &params, dir.path());
    assert_common(&a, "llama", &params);
    assert_eq!(a.server.model.as_deref(), Some("/srv/models/qwen2"));
    assert_eq!(a.engine.dtype, "bf16");
    // Nothing in the spec: the agent's own defaults, not values the operator invented.
    assert_eq!(a.engine.device_pool_fraction, 0.9);
    assert_eq!(a.adapters.host_cache_bytes, 1 << 30);
    assert_eq!(a.adapters.max_adapter_rank, 64);
    validated(a, dir.path());
}
