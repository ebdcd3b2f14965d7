//! `loraplane-agent`: the node agent binary (`serve` in its three roles, and `fixtures`). The
//! demo and the benchmarks are the `loraplane-bench` package's binary, so none of their code
//! ships in this one.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli: Cli = config::parse_cli(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => loraplane_agent::serve::run_process(*args),
        Command::Fixtures(cmd) => cmd.run(),
    }
}
