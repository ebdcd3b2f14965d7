//! `loraplane-bench`: the benchmark suites (`hetero`, `adapters`, `roofline`, `kv-transfer`,
//! `pd`, `serving`, `all`), the demo (`demo`) and the operator's placement check
//! (`placement`). Hidden helpers: `serve` (the agent's own `serve`, for the agents the demo
//! and the suites start as child processes) and `fake-agents` (the placement check's child).

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

use loraplane_agent::config::{self, ServeArgs};
use loraplane_bench::demand_shift;
use loraplane_bench::demo::{self, DemoArgs};
use loraplane_bench::placement::{self, FakeAgentsArgs, PlacementArgs};
use loraplane_bench::suites::{BenchArgs, Suite};

#[derive(Debug, Parser)]
#[command(
    name = "loraplane-bench",
    version,
    about = "loraplane's benchmarks and demo (Markdown, JSON and PNG results)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// 64 requests on 64 adapters of ranks 8–64 against the same batch without adapters.
    Hetero(Box<BenchArgs>),
    /// S-LoRA's sweep: throughput and latency against the number of adapters.
    Adapters(Box<BenchArgs>),
    /// Measured GEMM peak and memory bandwidth against the model's steps.
    Roofline(Box<BenchArgs>),
    /// gRPC KV transfer against raw loopback TCP, and the share hidden behind prefill.
    KvTransfer(Box<BenchArgs>),
    /// Unified against disaggregated prefill/decode under long and short prompts.
    Pd(Box<BenchArgs>),
    /// A workload file against an OpenAI-compatible server (`--url`, or `--serve` for ours).
    Serving(Box<BenchArgs>),
    /// Every suite above but `serving`, in that order.
    All(Box<BenchArgs>),
    /// Capacity planner: replicas per role meeting TTFT and inter-token SLOs for a trace.
    Plan(Box<BenchArgs>),
    /// Run the out-of-the-box demonstration: a disaggregated stack serving many adapters.
    Demo(DemoArgs),
    /// The operator's scale check: place and load adapters on fake agents over loopback gRPC;
    /// print convergence time and peak memory.
    Placement(PlacementArgs),
    /// The agent's `serve` (the child processes the demo and the suites start).
    #[command(hide = true)]
    Serve(Box<ServeArgs>),
    /// Serve fake agents' Admin API (the placement check's other process).
    #[command(hide = true)]
    FakeAgents(FakeAgentsArgs),
}

/// Runs an async entry point on a multi-threaded runtime.
fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() -> std::process::ExitCode {
    // `serve --config FILE` reads the file as the agent does.
    let cli: Cli = config::parse_cli(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    let suite = |suite, args: Box<BenchArgs>| args.run(suite);
    // A failure prints one line (`error: …` with its causes), never a backtrace, whatever
    // RUST_BACKTRACE says: the agent's own exit path.
    let result = match cli.command {
        Command::Hetero(args) => suite(Suite::Hetero, args),
        Command::Adapters(args) => suite(Suite::Adapters, args),
        Command::Roofline(args) => suite(Suite::Roofline, args),
        Command::KvTransfer(args) => suite(Suite::KvTransfer, args),
        Command::Pd(args) => suite(Suite::Pd, args),
        Command::Serving(args) => suite(Suite::Serving, args),
        Command::All(args) => suite(Suite::All, args),
        Command::Plan(args) => suite(Suite::Plan, args),
        Command::Demo(args) => demo::run(args),
        Command::Placement(args) if args.demand_shift => demand_shift::run(&args).map(|_| ()),
        Command::Placement(args) => block_on(placement::run(args)),
        Command::Serve(args) => loraplane_agent::serve::run_process(*args),
        Command::FakeAgents(args) => block_on(placement::fake_agents(args)),
    };
    loraplane_agent::serve::exit_code(result)
}
