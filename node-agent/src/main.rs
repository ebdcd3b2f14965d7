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

/// A failure prints one line (`error: …`), never a `Debug` dump with a backtrace, whatever
/// `RUST_BACKTRACE` says: these are user errors (a missing model directory, a bad flag).
fn main() -> std::process::ExitCode {
    let cli: Cli = config::parse_cli(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Serve(args) => loraplane_agent::serve::run_process(*args),
        Command::Fixtures(cmd) => cmd.run(),
    };
    loraplane_agent::serve::exit_code(result)
}
