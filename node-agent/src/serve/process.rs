//! The `serve` command as a whole process: validate the flags, install the logger, run the
//! agent on its own runtime until it drains, and report a failure once. `loraplane-agent serve`
//! is this function; so are the agents the demo and the benchmarks start as child processes
//! (`loraplane-bench` runs it under a hidden `serve` subcommand), so they serve exactly as the
//! production binary does.
//!
//! A failure is reported exactly once, as one line: through the logger when it is installed
//! (the error is then wrapped in [`Logged`]), else by [`exit_code`] on stderr. Never as a
//! `Debug` dump, which would add a backtrace whenever `RUST_BACKTRACE` is set.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::ServeArgs;

/// A failure [`run_process`] has already logged; [`exit_code`] does not print it again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Logged(String);

/// Runs `serve` with these flags (the environment fills what they leave unset) and returns
/// when the agent has stopped.
///
/// Errors: invalid flags or a logger that cannot be installed (not logged: the caller prints
/// them), or the agent's failure, logged and returned as [`Logged`].
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
    result.map_err(|e| {
        let line = format!("{e:#}");
        tracing::error!(error = %line, "the agent failed");
        Logged(line).into()
    })
}

/// The exit status of a command that ended with `result`, printing a failure not yet
/// reported as one line on stderr (`error: <cause chain>`), without a backtrace.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is::<Logged>() {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
