//! The command line, parsed once: every flag is `--long` and `LORAPLANE_…` in the environment
//! (Helm values map onto them), grouped into flattened structs, validated into the settings
//! the controllers take. Nothing below `main` reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use loraplane_units::parse_duration;

use crate::agent_client::Timeouts;
use crate::controller::Settings;
use crate::desired::AgentParams;
use crate::desired::autoscaling::Autoscaler;

#[derive(Debug, Parser)]
#[command(
    name = "loraplane-operator",
    version,
    about = "The loraplane Kubernetes operator: reconciles BaseModel and LoraAdapter resources onto node agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers (what the chart's Deployment runs).
    Run(Box<RunArgs>),
    /// Print both CRDs as YAML, or write one file per CRD into --out-dir.
    Crds(CrdsArgs),
    /// Print the ClusterRole with every permission the operator uses.
    Rbac,
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Write `<plural>.<group>.yaml` files here instead of printing.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
    #[command(flatten)]
    pub agents: AgentArgs,
    #[command(flatten)]
    pub reconcile: ReconcileArgs,
    #[command(flatten)]
    pub autoscaling: AutoscalingArgs,
    #[command(flatten)]
    pub logging: LogArgs,
}

/// The operator's own HTTP surface.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "LORAPLANE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
}

/// Leader election.
#[derive(Debug, Args)]
pub struct LeaderArgs {
    /// Run without leader election (a single replica, or local development).
    #[arg(long, env = "LORAPLANE_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    #[arg(
        long,
        env = "LORAPLANE_LEASE_NAME",
        default_value = "loraplane-operator"
    )]
    pub lease_name: String,
    /// The Lease's namespace (default: --pod-namespace, then the client's namespace).
    #[arg(long, env = "LORAPLANE_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, env = "LORAPLANE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    #[arg(long, env = "LORAPLANE_LEASE_RENEW", default_value = "5s", value_parser = parse_duration)]
    pub lease_renew: Duration,
    /// This replica's pod name (downward API): the Lease holder identity and the Events'
    /// reporting instance. Default: the host name.
    #[arg(long, env = "LORAPLANE_POD_NAME")]
    pub pod_name: Option<String>,
    /// This replica's namespace (downward API).
    #[arg(long, env = "LORAPLANE_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

/// How agents are deployed and called.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The `loraplane-agent` image of the StatefulSets.
    #[arg(
        long,
        env = "LORAPLANE_AGENT_IMAGE",
        default_value = "ghcr.io/loraplane/loraplane-agent:latest"
    )]
    pub agent_image: String,
    #[arg(long, env = "LORAPLANE_AGENT_IMAGE_PULL_POLICY")]
    pub agent_image_pull_policy: Option<String>,
    /// The agents' `--drain-timeout`; pods get 15 s more to terminate.
    #[arg(long, env = "LORAPLANE_AGENT_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub agent_drain_timeout: Duration,
    #[arg(long, env = "LORAPLANE_AGENT_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub agent_connect_timeout: Duration,
    /// Deadline of ListAdapters, GetStats, UnloadAdapter and SetTenants.
    #[arg(long, env = "LORAPLANE_AGENT_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub agent_request_timeout: Duration,
    /// Deadline of LoadAdapter (it downloads the adapter).
    #[arg(long, env = "LORAPLANE_AGENT_LOAD_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub agent_load_timeout: Duration,
    #[arg(
        long,
        env = "LORAPLANE_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
}

/// Reconcile timing.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// How long an agent's adapter list and capacity are reused before being fetched again.
    #[arg(long, env = "LORAPLANE_SNAPSHOT_TTL", default_value = "30s", value_parser = parse_duration)]
    pub snapshot_ttl: Duration,
    /// Loads of demand-following adapters (`replicas: {min, max}`) one model's agents may take
    /// per sliding minute; 0 = unbounded.
    #[arg(long, env = "LORAPLANE_ADAPTER_LOADS_PER_MINUTE", default_value_t = 30)]
    pub adapter_loads_per_minute: u32,
    /// Re-reconcile of healthy objects (watches drive everything else).
    #[arg(long, env = "LORAPLANE_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,
    /// Requeue while converging.
    #[arg(long, env = "LORAPLANE_PROGRESS_REQUEUE", default_value = "10s", value_parser = parse_duration)]
    pub progress_requeue: Duration,
    /// First retry after an error; doubles up to --retry-max.
    #[arg(long, env = "LORAPLANE_RETRY_BASE", default_value = "1s", value_parser = parse_duration)]
    pub retry_base: Duration,
    #[arg(long, env = "LORAPLANE_RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub retry_max: Duration,
}

/// What carries `spec.serving.<role>.autoscaling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoscalerKind {
    /// An `autoscaling/v2` HorizontalPodAutoscaler on Pods metrics that prometheus-adapter
    /// serves (the chart ships the rules).
    Hpa,
    /// A KEDA ScaledObject with Prometheus triggers (needs KEDA installed).
    Keda,
}

/// Autoscaling of the roles that ask for it.
#[derive(Debug, Args)]
pub struct AutoscalingArgs {
    #[arg(long, env = "LORAPLANE_AUTOSCALER", value_enum, default_value = "hpa")]
    pub autoscaler: AutoscalerKind,
    /// The Prometheus server KEDA's triggers query, e.g.
    /// `http://prometheus-operated.monitoring.svc:9090` (required with `--autoscaler keda`).
    #[arg(
        long,
        env = "LORAPLANE_KEDA_PROMETHEUS_ADDRESS",
        required_if_eq("autoscaler", "keda")
    )]
    pub keda_prometheus_address: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    #[arg(long, env = "LORAPLANE_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// A tracing filter: `info`, `loraplane_operator=debug,info`.
    #[arg(long, env = "LORAPLANE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl RunArgs {
    /// The settings the controllers take.
    pub fn settings(&self) -> Settings {
        let a = &self.agents;
        let r = &self.reconcile;
        let autoscaler = match self.autoscaling.autoscaler {
            AutoscalerKind::Hpa => Autoscaler::Hpa,
            AutoscalerKind::Keda => Autoscaler::Keda {
                // clap requires the address with `keda`.
                prometheus: self
                    .autoscaling
                    .keda_prometheus_address
                    .clone()
                    .unwrap_or_default(),
            },
        };
        Settings {
            agent: AgentParams {
                image: a.agent_image.clone(),
                image_pull_policy: a.agent_image_pull_policy.clone(),
                drain_timeout: a.agent_drain_timeout,
                cluster_domain: a.cluster_domain.clone(),
                autoscaler,
                ..AgentParams::default()
            },
            snapshot_ttl: r.snapshot_ttl,
            adapter_loads_per_minute: r.adapter_loads_per_minute,
            resync: r.resync,
            progress: r.progress_requeue,
            retry_base: r.retry_base,
            retry_max: r.retry_max,
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.agents.agent_connect_timeout,
            request: self.agents.agent_request_timeout,
            load: self.agents.agent_load_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use clap::CommandFactory;
    use loraplane_units::parse_bytes;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_become_settings() {
        let cli = Cli::try_parse_from([
            "loraplane-operator",
            "run",
            "--agent-image",
            "r.example/agent:1",
            "--agent-drain-timeout",
            "2m",
            "--snapshot-ttl",
            "5s",
            "--agent-load-timeout",
            "90s",
            "--adapter-loads-per-minute",
            "7",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let s = args.settings();
        assert_eq!(s.agent.image, "r.example/agent:1");
        assert_eq!(s.agent.drain_timeout, Duration::from_secs(120));
        assert_eq!(s.snapshot_ttl, Duration::from_secs(5));
        assert_eq!(s.adapter_loads_per_minute, 7);
        assert_eq!(args.timeouts().load, Duration::from_secs(90));
        assert_eq!(args.server.metrics_addr.port(), 8080);
        assert!(!args.leader.no_leader_election);
    }

    #[test]
    fn the_autoscaler_is_an_hpa_unless_keda_is_asked_for_with_its_prometheus() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["loraplane-operator", "run"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Run(args) => args.settings().agent.autoscaler,
                _ => panic!("not run"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), Autoscaler::Hpa);
        assert_eq!(
            parse(&[
                "--autoscaler",
                "keda",
                "--keda-prometheus-address",
                "http://prom:9090"
            ])
            .unwrap(),
            Autoscaler::Keda {
                prometheus: "http://prom:9090".into()
            }
        );
        let err = parse(&["--autoscaler", "keda"]).unwrap_err();
        assert!(
            err.to_string().contains("--keda-prometheus-address"),
            "{err}"
        );
        assert!(parse(&["--autoscaler", "vpa"]).is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert_eq!(parse_bytes("32Mi"), Ok(32 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
    }
}
