//! `loraplane-operator`: `run` (the controllers), `crds` (the CRDs as YAML), `rbac` (the
//! ClusterRole it needs). The placement scale check is `loraplane-bench placement`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use loraplane_operator::agent_client::GrpcAgents;
use loraplane_operator::config::{Cli, Command, CrdsArgs, LogArgs, LogFormat, RunArgs};
use loraplane_operator::leader::{self, LeaderConfig};
use loraplane_operator::metrics::Metrics;
use loraplane_operator::server::{self, Health};
use loraplane_operator::{controller, crd, desired};

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn crds(args: &CrdsArgs) -> anyhow::Result<()> {
    match &args.out_dir {
        None => print!("{}", crd::crds_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for c in crd::crds() {
                let path = dir.join(crd::crd_file_name(&c));
                std::fs::write(&path, crd::crd_yaml(&c)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(%error, "no SIGTERM handler; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.logging);
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let bound = server::spawn(
        args.server.metrics_addr,
        Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    )
    .await
    .with_context(|| format!("binding --metrics-addr {}", args.server.metrics_addr))?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    let client = kube::Client::try_default()
        .await
        .context("building a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    ready.store(true, Ordering::Relaxed);
    let shutdown = shutdown_signal().boxed().shared();
    let identity = args
        .leader
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("loraplane-operator-{}", std::process::id()));
    let lease = LeaderConfig {
        name: args.leader.lease_name.clone(),
        namespace: args
            .leader
            .lease_namespace
            .clone()
            .or_else(|| args.leader.pod_namespace.clone())
            .unwrap_or_else(|| client.default_namespace().to_owned()),
        identity: identity.clone(),
        lease_duration: args.leader.lease_duration,
        renew_every: args.leader.lease_renew,
    };
    let elect = !args.leader.no_leader_election;
    if elect {
        tokio::select! {
            () = leader::acquire(client.clone(), &lease) => {},
            () = shutdown.clone() => return Ok(()),
        }
    }
    metrics.set_leader(true);
    let agents = Arc::new(GrpcAgents::new(args.timeouts(), metrics.clone()));
    let controllers = controller::runtime::run(
        client.clone(),
        args.settings(),
        agents,
        metrics.clone(),
        Some(identity),
        shutdown.clone(),
    );
    let lost = async {
        if elect {
            leader::hold(client.clone(), &lease).await
        } else {
            futures::future::pending().await
        }
    };
    tokio::select! {
        () = controllers => {},
        error = lost => {
            metrics.set_leader(false);
            anyhow::bail!("leadership lost ({}): exiting so a restart campaigns again", error);
        }
    }
    metrics.set_leader(false);
    if elect {
        leader::release(client, &lease).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Crds(args) => crds(&args),
        Command::Rbac => serde_yaml::to_string(&desired::rbac::cluster_role())
            .map(|yaml| print!("{yaml}"))
            .map_err(Into::into),
    };
    // A failure prints one line (`error: …` with its causes), never a backtrace, whatever
    // RUST_BACKTRACE says (anyhow's `Debug` for `main`'s error would print one).
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
