//! `loraplane-bench placement`: the operator's scale check. N LoraAdapters are placed and
//! loaded on M fake agents served over real loopback gRPC (by default in a child process, the
//! hidden `loraplane-bench fake-agents`, so the peak memory reported is the operator's alone),
//! through the same code the LoraAdapter reconciler runs
//! ([`loraplane_operator::controller::converge::converge`] with the real
//! [`loraplane_operator::agent_client::GrpcAgents`], then
//! [`loraplane_operator::status::adapter_status`]). Kubernetes is not involved: the figures are
//! the operator's placement and Admin-API work.
//!
//! Three passes: a cold one (every adapter loaded), an unchanged one (must load nothing), and
//! one after an agent "restarts" (its registry is emptied and its pod shows a new restart
//! count): the adapters it held are loaded there again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use loraplane_units::parse_bytes;

use loraplane_operator::agent_client::{GrpcAgents, Timeouts};
use loraplane_operator::controller::converge::{AdapterWant, Limits, Work, converge};
use loraplane_operator::controller::fleet::Fleet;
use loraplane_operator::crd::{
    AdapterReplicas, AdapterSource, BaseModelRef, LoraAdapter, LoraAdapterSpec, Phase,
};
use loraplane_operator::discovery::{self, Agent};
use loraplane_operator::fake_agent::{FakeAgent, agent_pod, serve};
use loraplane_operator::metrics::Metrics;
use loraplane_operator::role::Role;
use loraplane_operator::status::{self, AdapterOutcome};

const TOKEN: &str = "bench-admin-token";

/// `loraplane-bench placement`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementArgs {
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    #[arg(long, default_value_t = 2000)]
    pub adapters: usize,
    /// Pinned replicas per adapter (per role); 0 = on demand (every agent).
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// Adapters reconciled at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Each agent's host adapter cache.
    #[arg(long, default_value = "16GiB", value_parser = parse_bytes)]
    pub capacity: u64,
    /// Each adapter's size.
    #[arg(long, default_value = "32MiB", value_parser = parse_bytes)]
    pub adapter_bytes: u64,
    /// Half the agents prefill, half decode.
    #[arg(long)]
    pub disaggregated: bool,
    /// Run the fake agents in this process (the peak memory then includes them).
    #[arg(long)]
    pub in_process: bool,
    /// Instead: the demand-following scenario (`replicas: {min, max}` adapters through a
    /// popularity shift, on a simulated clock; [`crate::demand_shift`]).
    #[arg(long)]
    pub demand_shift: bool,
    /// `--demand-shift`: the operator's `--adapter-loads-per-minute` (it also runs unbounded).
    #[arg(long, default_value_t = 30)]
    pub loads_per_minute: u32,
    /// `--demand-shift`: requests per second over all adapters.
    #[arg(long, default_value_t = 1000.0)]
    pub total_rps: f64,
    /// `--demand-shift`: directory for `placement-demand.{md,json,png}` (created if missing).
    #[arg(long, env = "LORAPLANE_BENCH_OUT", default_value = "bench-results")]
    pub out: std::path::PathBuf,
}

/// `loraplane-bench fake-agents` (hidden: the placement check's child process).
#[derive(Debug, Clone, clap::Args)]
pub struct FakeAgentsArgs {
    #[arg(long)]
    pub count: usize,
    #[arg(long, value_parser = parse_bytes)]
    pub capacity: u64,
    #[arg(long)]
    pub token: String,
    /// Roles, cycled over the agents (`unified`, or `prefill,decode`).
    #[arg(long, value_delimiter = ',', default_value = "unified")]
    pub roles: Vec<String>,
}

/// `fake-agents`: binds `count` agents on loopback, prints `addr role` per agent, then serves
/// until stdin closes; `restart <i>` on stdin empties agent `i` (answered with `ok`).
pub async fn fake_agents(args: FakeAgentsArgs) -> anyhow::Result<()> {
    let mut agents = Vec::new();
    let stdout = std::io::stdout();
    for i in 0..args.count {
        let role = args.roles[i % args.roles.len().max(1)].clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let agent = Arc::new(std::sync::Mutex::new(FakeAgent::new(
            &role,
            &args.token,
            args.capacity,
        )));
        tokio::spawn(serve(agent.clone(), listener));
        writeln!(stdout.lock(), "{addr} {role}")?;
        agents.push(agent);
    }
    writeln!(stdout.lock(), "ready")?;
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if let Some(i) = line.strip_prefix("restart ") {
                let i: usize = i.trim().parse()?;
                if let Some(a) = agents.get(i) {
                    a.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .restart();
                }
                writeln!(std::io::stdout().lock(), "ok")?;
            }
        }
        Ok(())
    });
    lines.await??;
    Ok(())
}

/// The process's peak resident set (Linux `VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

enum Agents {
    Child {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<std::process::ChildStdout>,
    },
    InProcess(Vec<Arc<std::sync::Mutex<FakeAgent>>>),
}

impl Agents {
    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        match self {
            Agents::Child { stdin, stdout, .. } => {
                writeln!(stdin, "restart {i}")?;
                stdin.flush()?;
                let mut line = String::new();
                stdout.read_line(&mut line)?;
                if line.trim() != "ok" {
                    bail!("fake agents answered {line:?}");
                }
            }
            Agents::InProcess(v) => {
                if let Some(a) = v.get(i) {
                    a.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .restart();
                }
            }
        }
        Ok(())
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        if let Agents::Child { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn start_agents(
    args: &PlacementArgs,
    roles: &[Role],
) -> anyhow::Result<(Agents, Vec<(SocketAddr, Role)>)> {
    let role_names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    if args.in_process {
        let mut v = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..args.agents {
            let role = roles[i % roles.len()];
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push((listener.local_addr()?, role));
            let agent = Arc::new(std::sync::Mutex::new(FakeAgent::new(
                role.as_str(),
                TOKEN,
                args.capacity,
            )));
            tokio::spawn(serve(agent.clone(), listener));
            v.push(agent);
        }
        return Ok((Agents::InProcess(v), addrs));
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "fake-agents",
            "--count",
            &args.agents.to_string(),
            "--capacity",
            &args.capacity.to_string(),
            "--token",
            TOKEN,
            "--roles",
            &role_names.join(","),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the fake agents")?;
    let stdin = child.stdin.take().context("child stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut addrs = Vec::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            bail!("the fake agents exited early");
        }
        let line = line.trim();
        if line == "ready" {
            break;
        }
        let (addr, role) = line.split_once(' ').context("fake agent line")?;
        addrs.push((addr.parse()?, Role::parse(role).context("fake agent role")?));
    }
    Ok((
        Agents::Child {
            child,
            stdin,
            stdout,
        },
        addrs,
    ))
}

fn adapters(args: &PlacementArgs) -> Vec<LoraAdapter> {
    (0..args.adapters)
        .map(|i| {
            let ns = format!("tenant-{}", i % 20);
            let name = format!("adapter-{i}");
            let mut a = LoraAdapter::new(
                &name,
                LoraAdapterSpec {
                    base_model: BaseModelRef {
                        name: "bench".into(),
                        namespace: Some("bench".into()),
                    },
                    source: AdapterSource {
                        hugging_face: None,
                        uri: Some(format!(
                            "https://adapters.example/{ns}/{name}?size={}",
                            args.adapter_bytes
                        )),
                        sha256: None,
                    },
                    replicas: (args.replicas > 0)
                        .then(|| AdapterReplicas::Fixed(i64::from(args.replicas))),
                },
            );
            a.metadata.namespace = Some(ns);
            a
        })
        .collect()
}

/// One pass over every adapter, `concurrency` at a time.
async fn pass(
    api: &GrpcAgents,
    fleet: &tokio::sync::Mutex<Fleet>,
    agents: &[Agent],
    roles: &[Role],
    adapters: &mut [LoraAdapter],
    concurrency: usize,
    ttl: Duration,
) -> (Duration, Work, BTreeMap<Phase, usize>) {
    let started = Instant::now();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let results: Vec<(usize, loraplane_operator::crd::LoraAdapterStatus, Work)> =
        futures::stream::iter(adapters.iter().enumerate())
            .map(|(i, a)| {
                let now = now.clone();
                async move {
                    let want = AdapterWant::from_adapter(a);
                    let limits = Limits {
                        ttl,
                        loads_per_minute: 0,
                    };
                    let (c, w) = converge(api, fleet, agents, roles, &want, limits).await;
                    (
                        i,
                        status::adapter_status(a, &AdapterOutcome::Converged(c), &now),
                        w,
                    )
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let took = started.elapsed();
    let mut work = Work::default();
    let mut phases = BTreeMap::new();
    for (i, st, w) in results {
        work.loads += w.loads;
        work.unloads += w.unloads;
        if let Some(p) = st.phase {
            *phases.entry(p).or_default() += 1;
        }
        adapters[i].status = Some(st);
    }
    (took, work, phases)
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

/// Runs the benchmark and prints its figures.
///
/// Errors: the fake agents could not be started, or a pass did not converge.
pub async fn run(args: PlacementArgs) -> anyhow::Result<()> {
    let roles: Vec<Role> = if args.disaggregated {
        vec![Role::Prefill, Role::Decode]
    } else {
        vec![Role::Unified]
    };
    let rss_start = peak_rss_bytes();
    let (mut fakes, addrs) = start_agents(&args, &roles).await?;
    let mut pods: Vec<Pod> = addrs
        .iter()
        .enumerate()
        .map(|(i, (addr, role))| agent_pod(i, *addr, *role, 0))
        .collect();
    let agents = discovery::agents(&pods, "bench");
    if agents.len() != args.agents {
        bail!("discovered {} of {} agents", agents.len(), args.agents);
    }
    let metrics = Metrics::new();
    let api = GrpcAgents::new(Timeouts::default(), metrics.clone());
    let fleet = tokio::sync::Mutex::new(Fleet {
        token: Some(TOKEN.into()),
        ..Fleet::default()
    });
    let ttl = Duration::from_secs(3600);
    let mut adapters = adapters(&args);
    println!(
        "bench-placement: {} adapters ({} each, replicas {}) on {} agents ({}), host cache {:.0} MiB each, concurrency {}, fake agents {}",
        args.adapters,
        if args.adapter_bytes >= 1 << 20 {
            format!("{:.0} MiB", mib(args.adapter_bytes))
        } else {
            format!("{} B", args.adapter_bytes)
        },
        if args.replicas == 0 {
            "on demand".to_owned()
        } else {
            args.replicas.to_string()
        },
        args.agents,
        roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("+"),
        mib(args.capacity),
        args.concurrency,
        if args.in_process {
            "in this process"
        } else {
            "in a child process"
        },
    );
    let (cold, cold_work, cold_phases) = pass(
        &api,
        &fleet,
        &agents,
        &roles,
        &mut adapters,
        args.concurrency,
        ttl,
    )
    .await;
    println!(
        "cold convergence:   {:>8.3} s  ({} loads, {} unloads; phases {:?})",
        cold.as_secs_f64(),
        cold_work.loads,
        cold_work.unloads,
        cold_phases
    );
    let (steady, steady_work, _) = pass(
        &api,
        &fleet,
        &agents,
        &roles,
        &mut adapters,
        args.concurrency,
        ttl,
    )
    .await;
    println!(
        "unchanged re-pass:  {:>8.3} s  ({} loads, {} unloads)",
        steady.as_secs_f64(),
        steady_work.loads,
        steady_work.unloads
    );
    // Restart agent 0: empty registry, new restart count.
    fakes.restart(0)?;
    pods[0] = agent_pod(0, addrs[0].0, addrs[0].1, 1);
    let agents = discovery::agents(&pods, "bench");
    let (restart, restart_work, restart_phases) = pass(
        &api,
        &fleet,
        &agents,
        &roles,
        &mut adapters,
        args.concurrency,
        ttl,
    )
    .await;
    println!(
        "after a restart:    {:>8.3} s  ({} reloads on the restarted agent; phases {:?})",
        restart.as_secs_f64(),
        restart_work.loads,
        restart_phases
    );
    let per_agent: Vec<u32> = {
        let f = fleet.lock().await;
        f.loads().iter().map(|l| l.pinned_adapters).collect()
    };
    let (min, max) = (
        per_agent.iter().min().copied().unwrap_or(0),
        per_agent.iter().max().copied().unwrap_or(0),
    );
    println!("pinned adapters per agent: min {min}, max {max}");
    println!(
        "admin calls: {} LoadAdapter, {} ListAdapters, {} GetStats",
        metrics.agent_calls("LoadAdapter", "ok"),
        metrics.agent_calls("ListAdapters", "ok"),
        metrics.agent_calls("GetStats", "ok"),
    );
    match (rss_start, peak_rss_bytes()) {
        (Some(start), Some(peak)) => println!(
            "operator peak RSS:  {:>8.1} MiB (at start {:.1} MiB)",
            mib(peak),
            mib(start)
        ),
        _ => println!("operator peak RSS:  n/a (no /proc/self/status)"),
    }
    let ready = cold_phases.get(&Phase::Ready).copied().unwrap_or(0);
    if steady_work.loads != 0 {
        bail!("the unchanged pass loaded {} adapters", steady_work.loads);
    }
    if ready != args.adapters {
        bail!(
            "{ready} of {} adapters Ready after the cold pass",
            args.adapters
        );
    }
    Ok(())
}
