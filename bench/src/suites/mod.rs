//! `loraplane-bench <suite>`: the benchmark suites that measure the engine against the
//! performance targets of docs/performance-targets.md and the experiments of the papers behind it
//! (S-LoRA's adapter sweep, Splitwise's phase split, the roofline of the decode step).
//!
//! Every suite writes `<out>/<suite>.md`, `<out>/<suite>.json` and PNG plots, prints a short
//! summary table, and marks each target it covers as met or missed. Figures are ratios taken
//! within one run on one machine, so they compare like with like; they are reported, never
//! asserted. `--quick` shrinks every suite so `loraplane-bench all --quick` fits in a few
//! minutes of a debug build (CI runs it with `--preset tiny`).
//!
//! Layout: `setup` (fixture model and adapters, engines), `timed` (a backend wrapper that
//! times every operation: the in-run profile), `sim` (workloads and the virtual-clock serving
//! driver), `stats`, `report` (Markdown, JSON, PNG), and one module per suite. `serving` is the
//! one suite that drives a server over HTTP (ours or any OpenAI-compatible one) from a workload
//! file; it is not part of `all`.

mod adapters;
mod hetero;
mod kv_transfer;
mod pd;
mod plan;
pub mod report;
mod roofline;
mod serving;
mod setup;
mod sim;
mod stats;
mod timed;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use loraplane_agent::backend::device::{ComputeDtype, Device, parse_device, parse_dtype};
use loraplane_agent::fixtures::model::Preset;

pub use report::Report;

/// Which suite to run (one subcommand of `loraplane-bench` each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// 64 requests on 64 adapters of ranks 8–64 against the same batch without adapters.
    Hetero,
    /// S-LoRA's sweep: throughput and latency against the number of adapters.
    Adapters,
    /// Measured GEMM peak and memory bandwidth against the model's steps.
    Roofline,
    /// gRPC KV transfer against raw loopback TCP, and the share hidden behind prefill.
    KvTransfer,
    /// Unified against disaggregated prefill/decode under long and short prompts.
    Pd,
    /// A workload file against an OpenAI-compatible server (`--url`, or `--serve` for ours).
    Serving,
    /// Every suite above but `serving`, in that order.
    All,
    /// The capacity planner: replicas per role for a trace under SLOs (not part of `all`).
    Plan,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Hetero => "hetero",
            Suite::Adapters => "adapters",
            Suite::Roofline => "roofline",
            Suite::KvTransfer => "kv-transfer",
            Suite::Pd => "pd",
            Suite::Serving => "serving",
            Suite::All => "all",
            Suite::Plan => "plan",
        }
    }
}

/// The flags every suite takes: `loraplane-bench <suite> …`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run of each suite (CI runs `loraplane-bench all --quick --preset tiny`).
    #[arg(long, env = "LORAPLANE_BENCH_QUICK")]
    pub quick: bool,
    /// Directory for the Markdown, JSON and PNG results (created if missing).
    #[arg(long, env = "LORAPLANE_BENCH_OUT", default_value = "bench-results")]
    pub out: PathBuf,
    /// Where the engine runs: `cpu`, or `cuda:N` (a binary built with `--features cuda`; the
    /// `hetero` suite only — the others measure the CPU backend and its machine).
    #[arg(long, env = "LORAPLANE_BENCH_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// How GEMM weights are stored on a GPU (`float32`, `bfloat16`, `float16`).
    #[arg(long, env = "LORAPLANE_BENCH_DTYPE", default_value = "float32", value_parser = |s: &str| parse_dtype(s, None))]
    pub dtype: ComputeDtype,
    /// Fixture model the suites run on (`small` is about 90M parameters; `tiny` is for CI).
    #[arg(
        long,
        value_enum,
        env = "LORAPLANE_BENCH_PRESET",
        default_value = "small"
    )]
    pub preset: Preset,
    /// Decoder layers of the fixture model instead of the preset's; each keeps the preset's
    /// shape, so per-layer costs and ratios are the full model's (scripts/gpu-check.sh runs
    /// `--preset bench --layers 8`: generating and loading all 32 layers of the Llama-3-8B
    /// shape takes minutes).
    #[arg(long, env = "LORAPLANE_BENCH_LAYERS", value_parser = parse_layers)]
    pub layers: Option<usize>,
    /// Where fixture checkpoints and adapters are written and reused across runs; a temporary
    /// directory (removed afterwards) when unset.
    #[arg(long, env = "LORAPLANE_BENCH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of the fixtures and workloads.
    #[arg(long, env = "LORAPLANE_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub serving: serving::ServingArgs,
    #[command(flatten)]
    pub plan: plan::PlanArgs,
}

/// Workload knobs of the serving suites (`adapters`, `pd`); unset values take per-suite
/// defaults scaled by `--quick` and the preset.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Zipf exponent of adapter popularity (the k-th most popular adapter has weight 1/k^α).
    #[arg(long, env = "LORAPLANE_BENCH_ZIPF_ALPHA", default_value_t = 1.0)]
    pub zipf_alpha: f64,
    /// Poisson arrival rate in requests/s. Default: `--load` times the capacity measured for
    /// the base model (unified model for `pd`) in the same run.
    #[arg(long, env = "LORAPLANE_BENCH_RATE")]
    pub rate: Option<f64>,
    /// Offered load relative to the measured capacity when `--rate` is unset
    /// (default 2.0 for `adapters`: saturating, so throughput is the capacity; 0.7 for `pd`).
    #[arg(long, env = "LORAPLANE_BENCH_LOAD")]
    pub load: Option<f64>,
    /// Requests per serving run.
    #[arg(long, env = "LORAPLANE_BENCH_REQUESTS")]
    pub requests: Option<usize>,
    /// Adapter counts of the `adapters` sweep (comma-separated).
    #[arg(long, env = "LORAPLANE_BENCH_ADAPTER_COUNTS", value_delimiter = ',')]
    pub adapter_counts: Vec<usize>,
    /// Adapter ranks, cycled over the adapters (comma-separated).
    #[arg(long, env = "LORAPLANE_BENCH_RANKS", value_delimiter = ',')]
    pub ranks: Vec<usize>,
    /// Prompt lengths, drawn uniformly from `MIN-MAX` tokens.
    #[arg(long, env = "LORAPLANE_BENCH_PROMPT_LEN", value_parser = parse_range)]
    pub prompt_len: Option<(usize, usize)>,
    /// Output lengths, drawn uniformly from `MIN-MAX` tokens.
    #[arg(long, env = "LORAPLANE_BENCH_OUTPUT_LEN", value_parser = parse_range)]
    pub output_len: Option<(usize, usize)>,
    /// Time-to-first-token SLO in milliseconds (default scales with the preset).
    #[arg(long, env = "LORAPLANE_BENCH_SLO_TTFT_MS")]
    pub slo_ttft_ms: Option<f64>,
    /// Mean inter-token latency SLO in milliseconds (default scales with the preset).
    #[arg(long, env = "LORAPLANE_BENCH_SLO_ITL_MS")]
    pub slo_itl_ms: Option<f64>,
    /// Repetitions of each measurement (median and spread are reported).
    #[arg(long, env = "LORAPLANE_BENCH_REPEATS")]
    pub repeats: Option<usize>,
}

fn parse_layers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: expected a number of layers from 1 to 1024")),
    }
}

fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
    let lo: usize = lo
        .trim()
        .parse()
        .map_err(|_| format!("bad minimum in {s:?}"))?;
    let hi: usize = hi
        .trim()
        .parse()
        .map_err(|_| format!("bad maximum in {s:?}"))?;
    if lo == 0 || hi < lo {
        return Err(format!("{s:?}: need 0 < MIN <= MAX"));
    }
    Ok((lo, hi))
}

/// What every suite gets: the options, the fixtures and a progress reporter.
pub(crate) struct Ctx {
    pub quick: bool,
    pub device: Device,
    pub dtype: ComputeDtype,
    pub preset: Preset,
    /// `--layers`: the fixture model's decoder layers when not the preset's.
    pub layers: Option<usize>,
    pub seed: u64,
    pub workload: WorkloadArgs,
    pub serving: serving::ServingArgs,
    pub plan: plan::PlanArgs,
    pub out: PathBuf,
    pub fixtures: setup::Fixtures,
    pub progress: Progress,
}

impl Ctx {
    /// `quick` or `full` depending on the run.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }

    pub fn tiny(&self) -> bool {
        self.preset == Preset::Tiny
    }

    pub fn repeats(&self, quick: usize, full: usize) -> usize {
        self.workload
            .repeats
            .unwrap_or_else(|| self.pick(quick, full))
            .max(1)
    }
}

impl BenchArgs {
    /// Runs the chosen suite (all of them for [`Suite::All`]) and writes their results.
    pub fn run(self, suite: Suite) -> anyhow::Result<()> {
        if self.device != Device::Cpu && suite != Suite::Hetero {
            anyhow::bail!(
                "bench {}: only the `hetero` suite runs on --device {}; the other suites measure \
                 the CPU backend",
                suite.name(),
                self.device
            );
        }
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        report::register_font()?;
        let fixtures =
            setup::Fixtures::new(self.cache_dir.clone(), self.preset, self.layers, self.seed)?;
        let mut ctx = Ctx {
            quick: self.quick,
            device: self.device,
            dtype: self.dtype,
            preset: self.preset,
            layers: self.layers,
            seed: self.seed,
            workload: self.workload.clone(),
            serving: self.serving.clone(),
            plan: self.plan.clone(),
            out: self.out.clone(),
            fixtures,
            progress: Progress::new(),
        };
        if suite == Suite::Serving && self.serving.prepare_only {
            anyhow::ensure!(
                self.cache_dir.is_some(),
                "--prepare-only needs --cache-dir: the fixtures are otherwise removed on exit"
            );
            return serving::prepare_only(&ctx);
        }
        let suites = match suite {
            Suite::All => vec![
                Suite::Hetero,
                Suite::Adapters,
                Suite::Roofline,
                Suite::KvTransfer,
                Suite::Pd,
            ],
            one => vec![one],
        };
        let started = Instant::now();
        let mut reports = Vec::new();
        for suite in suites {
            ctx.progress.set_suite(suite.name());
            let t = Instant::now();
            let mut report = match suite {
                Suite::Hetero => hetero::run(&mut ctx),
                Suite::Adapters => adapters::run(&mut ctx),
                Suite::Roofline => roofline::run(&mut ctx),
                Suite::KvTransfer => kv_transfer::run(&mut ctx),
                Suite::Pd => pd::run(&mut ctx),
                Suite::Serving => serving::run(&mut ctx),
                Suite::Plan => plan::run(&mut ctx),
                Suite::All => continue,
            }
            .with_context(|| format!("bench {}", suite.name()))?;
            report.environment = report::Environment::collect(&ctx, t.elapsed());
            ctx.progress.done();
            report.write(&ctx.out)?;
            report.print_summary();
            reports.push(report);
        }
        if suite == Suite::All {
            report::write_index(&ctx.out, &reports, started.elapsed())?;
        }
        eprintln!(
            "bench: results in {} ({:.1} s)",
            ctx.out.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// A one-line progress indicator on stderr: redrawn in place on a terminal, one line per
/// update otherwise (logs and CI).
pub(crate) struct Progress {
    suite: &'static str,
    started: Instant,
    tty: bool,
    drawn: bool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            suite: "",
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn set_suite(&mut self, suite: &'static str) {
        self.suite = suite;
        self.started = Instant::now();
    }

    /// Shows what the suite is doing now.
    pub fn update(&mut self, what: impl std::fmt::Display) {
        let line = format!(
            "[{} {:>6.1}s] {what}",
            self.suite,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    fn done(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_counts_parse_within_bounds() {
        assert_eq!(parse_layers("8"), Ok(8));
        assert_eq!(parse_layers(" 32 "), Ok(32));
        for bad in ["0", "-1", "x", "", "1025"] {
            assert!(parse_layers(bad).is_err(), "{bad:?}");
        }
    }
}
