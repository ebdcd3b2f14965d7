//! The `serve` command as a whole process: validate the flags, install the logger, run the
//! agent on its own runtime until it drains, and report a failure once. `loraplane-agent serve`
//! is this function; so are the agents the demo and the benchmarks start as child processes
//! (`loraplane-bench` runs it under a hidden `serve` subcommand), so they serve exactly as the
//! production binary does.

use std::time::Duration;

use crate::config::ServeArgs;

/// Runs `serve` with these flags (the environment fills what they leave unset) and returns
/// when the agent has stopped.
pub fn run_process(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.validate(|k| std::env::var(k).ok())?;
    super::init_logging(config.log_format, &config.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loraplane-serve")
        .build()?;
    let result = runtime.block_on(super::run(config));
    // Blocking tasks (a model download, a tokenizer call) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "the agent failed");
    }
    result
}
