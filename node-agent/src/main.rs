//! `loraplane-agent`: the node agent binary (serving roles, fixtures, demo and benchmarks).

#![forbid(unsafe_code)]

use std::time::Duration;

use clap::{Parser, Subcommand};

use loraplane_agent::bench::BenchArgs;
use loraplane_agent::config::{self, ServeArgs};
use loraplane_agent::fixtures::FixturesCommand;

#[derive(Debug, Parser)]
#[command(name = "loraplane-agent", version, about = "The loraplane data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a base model and its LoRA adapters over gRPC and the OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// Write deterministic fixture checkpoints and adapters in the real on-disk formats.
    #[command(subcommand)]
    Fixtures(FixturesCommand),
    /// Run the out-of-the-box demonstration: a disaggregated stack serving many adapters.
    Demo(loraplane_agent::demo::DemoArgs),
    /// Measure the engine against the performance targets (Markdown, JSON and PNG results).
    Bench(Box<BenchArgs>),
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.validate(|k| std::env::var(k).ok())?;
    loraplane_agent::serve::init_logging(config.log_format, &config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loraplane-serve")
        .build()?;
    let result = runtime.block_on(loraplane_agent::serve::run(config));
    // Blocking tasks (a model download, a tokenizer call) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "the agent failed");
    }
    result
}

fn main() -> anyhow::Result<()> {
    let cli: Cli = config::parse_cli(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Fixtures(cmd) => cmd.run(),
        Command::Bench(args) => args.run(),
        Command::Demo(args) => loraplane_agent::demo::run(args),
    }
}
