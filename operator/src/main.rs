//! `loraplane-operator`: the Kubernetes operator that reconciles `BaseModel` and `LoraAdapter`
//! resources (group `loraplane.dev`) onto node agents. The controllers land with the operator
//! issue; until then the binary only describes itself.

#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "loraplane-operator",
    version,
    about = "The loraplane Kubernetes operator"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the controllers are not built yet; see the operator issue")
}
