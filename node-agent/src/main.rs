//! `loraplane-agent`: the node agent binary (serving roles, fixtures, demo and benchmarks).

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

use loraplane_agent::fixtures::FixturesCommand;

#[derive(Debug, Parser)]
#[command(name = "loraplane-agent", version, about = "The loraplane data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write deterministic fixture checkpoints and adapters in the real on-disk formats.
    #[command(subcommand)]
    Fixtures(FixturesCommand),
    /// Run the out-of-the-box demonstration on this machine.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fixtures(cmd) => cmd.run(),
        Command::Demo => {
            anyhow::bail!("the demo is not yet available: it lands with the serving stack")
        }
    }
}
