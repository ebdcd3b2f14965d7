//! `bench plan`: the capacity planner. Given a request trace and a device's step-cost profile,
//! it simulates unified and disaggregated fleets of every size up to `--max-devices` with the
//! agent's own scheduler ([`fleet`]), and recommends the replica counts per role that meet the
//! TTFT and inter-token p99 SLOs with the fewest devices (Splitwise's and DistServe's
//! provisioning question), with a table and a plot of the frontier.
//!
//! `--measure-profile` measures the profile on this machine first ([`calibrate`]); otherwise
//! `--profile FILE`, or the one shipped for the development machine. `--validate` replays the
//! trace on real agents (one unified agent, then one prefill and one decode agent, each pinned
//! to its own core: one core is one device) and reports predicted against measured TTFT,
//! inter-token latency and throughput.
//!
//! Layout: `trace` (workload files, CSV and JSONL traces), `cost` (the profile and its fit),
//! `calibrate` (measuring it), `fleet` (the simulation).

mod calibrate;
pub(crate) mod cost;
mod fleet;
mod trace;

use std::path::PathBuf;

use anyhow::Context;
use loraplane_agent::model::config::ModelConfig;
use serde_json::json;

use crate::suites::Ctx;
use crate::suites::pd::processes;
use crate::suites::report::{Plot, PlotKind, Report, Series, Table, Target, format_num};
use crate::suites::sim::{Outcome, Slo, Tracker};
use cost::{DEFAULT_PROFILE, StepCost};
use fleet::Layout;
use trace::Trace;

/// Options of the `plan` suite (ignored by the others).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PlanArgs {
    /// `plan`: the request trace — a `bench serving` workload file (.toml, .json) or a
    /// recorded trace (.csv with header `arrival_s,prompt_tokens,output_tokens[,adapter]`, or
    /// .jsonl with those fields). `--workload` is read when this is unset.
    #[arg(long, env = "LORAPLANE_BENCH_TRACE")]
    pub trace: Option<PathBuf>,
    /// `plan`: the device's step-cost profile (TOML; `bench/profiles/`). Default: the profile
    /// shipped for the development machine's CPU core and the `small` fixture.
    #[arg(
        long,
        env = "LORAPLANE_BENCH_PROFILE",
        conflicts_with = "measure_profile"
    )]
    pub profile: Option<PathBuf>,
    /// `plan`: measure the profile on this machine first (written to `<out>/step-cost.toml`).
    #[arg(long)]
    pub measure_profile: bool,
    /// `plan`: CPU threads of one device when measuring a profile.
    #[arg(long, default_value_t = 1)]
    pub profile_threads: usize,
    /// `plan`: largest fleet considered, in devices.
    #[arg(long, default_value_t = 8)]
    pub max_devices: usize,
    /// `plan`: replay the trace on real agents (one unified; one prefill + one decode) and
    /// compare with the prediction.
    #[arg(long)]
    pub validate: bool,
}

/// One simulated fleet and how it did.
#[derive(Debug, Clone, serde::Serialize)]
struct Candidate {
    layout: Layout,
    devices: usize,
    outcome: Outcome,
    itl_p99_s: f64,
    meets: bool,
    stats: fleet::SimStats,
}

fn load_profile(ctx: &mut Ctx) -> anyhow::Result<StepCost> {
    let args = ctx.plan.clone();
    if args.measure_profile {
        let kv = calibrate::DEFAULT_KV_BANDWIDTH;
        let (cost, steps) = calibrate::measure(ctx, args.profile_threads.max(1), kv, 2 << 30)?;
        let path = ctx.out.join("step-cost.toml");
        std::fs::write(&path, toml::to_string(&cost)?)
            .with_context(|| format!("writing {}", path.display()))?;
        ctx.progress.update(format!(
            "profile measured from {} steps (relative RMS error {:.1} %): {}",
            steps.len(),
            cost.fit_rel_rms * 100.0,
            path.display()
        ));
        return Ok(cost);
    }
    match &args.profile {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the profile {}", path.display()))?;
            StepCost::parse(&text).with_context(|| format!("{}: invalid profile", path.display()))
        }
        None => StepCost::parse(DEFAULT_PROFILE),
    }
}

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let path = ctx
        .plan
        .trace
        .clone()
        .or_else(|| ctx.serving.workload.clone())
        .context("bench plan needs --trace FILE (a workload file, .csv or .jsonl trace)")?;
    anyhow::ensure!(
        (1..=64).contains(&ctx.plan.max_devices),
        "--max-devices must be 1 to 64"
    );
    let dir = ctx.fixtures.model()?;
    let config = crate::suites::setup::model_config(&dir)?;
    let trace = Trace::read(&path, config.vocab_size, &ctx.workload.ranks, ctx.seed)?;
    anyhow::ensure!(
        !trace.jobs.is_empty(),
        "{}: the trace has no requests",
        path.display()
    );
    let cost = load_profile(ctx)?;
    let slo = Slo {
        ttft_s: ctx
            .workload
            .slo_ttft_ms
            .unwrap_or(if ctx.tiny() { 200.0 } else { 2000.0 })
            / 1e3,
        itl_s: ctx
            .workload
            .slo_itl_ms
            .unwrap_or(if ctx.tiny() { 20.0 } else { 200.0 })
            / 1e3,
    };
    let max = ctx.plan.max_devices;
    let mut layouts: Vec<Layout> = (1..=max).map(Layout::Unified).collect();
    for p in 1..max {
        for d in 1..=max - p {
            layouts.push(Layout::Split {
                prefill: p,
                decode: d,
            });
        }
    }
    let mut candidates = Vec::new();
    for (k, &layout) in layouts.iter().enumerate() {
        ctx.progress
            .update(format!("simulating {layout} ({}/{})", k + 1, layouts.len()));
        let (tracker, stats) =
            fleet::simulate(&cost, layout, &trace.jobs, &|j| trace.adapter_of(j))?;
        candidates.push(judge(layout, &tracker, stats, slo));
    }
    let best = |pred: &dyn Fn(&Layout) -> bool| {
        candidates
            .iter()
            .filter(|c| c.meets && pred(&c.layout))
            .min_by(|a, b| {
                (a.devices, a.outcome.ttft.p99)
                    .partial_cmp(&(b.devices, b.outcome.ttft.p99))
                    .expect("finite")
            })
            .cloned()
    };
    let best_unified = best(&|l| matches!(l, Layout::Unified(_)));
    let best_split = best(&|l| matches!(l, Layout::Split { .. }));
    let overall = best(&|_| true);

    let mut report = Report::new(
        "plan",
        "Capacity planner: replicas per role for a trace under SLOs",
    );
    report.method.push(format!(
        "Trace `{}`: {} requests over {:.1} s, prompts {}–{} tokens, outputs {}–{} tokens, {} adapters. \
         SLOs: TTFT p99 ≤ {} ms, inter-token p99 ≤ {} ms; every request must finish.",
        trace.name,
        trace.jobs.len(),
        trace.jobs.last().map_or(0.0, |j| j.arrival),
        trace.jobs.iter().map(|j| j.prompt.len()).min().unwrap_or(0),
        trace.jobs.iter().map(|j| j.prompt.len()).max().unwrap_or(0),
        trace.jobs.iter().map(|j| j.max_tokens).min().unwrap_or(0),
        trace.jobs.iter().map(|j| j.max_tokens).max().unwrap_or(0),
        trace.ranks.len(),
        format_num(slo.ttft_s * 1e3),
        format_num(slo.itl_s * 1e3),
    ));
    report.method.push(format!(
        "Step-cost profile: {} (fit from {} steps, relative RMS error {:.1} %); coefficients {}. \
         Agents: max-batch-tokens {}, max-prefill-chunk {}, max-running {}, {} pool pages. \
         Every layout up to {max} devices is simulated with the agent's scheduler on a virtual clock; \
         requests go to the least-loaded agent of their role; a prompt's KV reaches its decode agent \
         {} ms + its last layer's bytes at {} MB/s after its prefill ends.",
        cost.description,
        cost.fit_steps,
        cost.fit_rel_rms * 100.0,
        cost.named()
            .iter()
            .map(|(n, c)| format!("{n} = {c:.3e}"))
            .collect::<Vec<_>>()
            .join(", "),
        cost.limits.max_batch_tokens,
        cost.limits.max_prefill_chunk,
        cost.limits.max_running,
        cost.limits.pool_pages,
        format_num(cost.kv_latency_s * 1e3),
        format_num(cost.kv_bandwidth_bytes_per_s / 1e6),
    ));
    let mut table = Table::new(
        "Every layout simulated",
        &[
            "layout",
            "devices",
            "TTFT p50 / p99 (ms)",
            "inter-token p50 / p99 (ms)",
            "output tok/s",
            "finished",
            "meets SLOs",
        ],
    );
    for c in &candidates {
        table.row(vec![
            c.layout.to_string(),
            c.devices.to_string(),
            format!(
                "{} / {}",
                format_num(c.outcome.ttft.p50 * 1e3),
                format_num(c.outcome.ttft.p99 * 1e3)
            ),
            format!(
                "{} / {}",
                format_num(c.outcome.itl.p50 * 1e3),
                format_num(c.itl_p99_s * 1e3)
            ),
            format_num(c.outcome.tokens_per_s),
            format!("{}/{}", c.outcome.completed, c.outcome.requests),
            if c.meets { "yes".into() } else { "no".into() },
        ]);
    }
    let mut rec = Table::new(
        "Recommendation (fewest devices meeting both SLOs)",
        &[
            "mode",
            "layout",
            "devices",
            "TTFT p99 (ms)",
            "inter-token p99 (ms)",
            "output tok/s",
        ],
    );
    for (mode, c) in [
        ("unified", &best_unified),
        ("disaggregated", &best_split),
        ("overall", &overall),
    ] {
        match c {
            Some(c) => rec.row(vec![
                mode.into(),
                c.layout.to_string(),
                c.devices.to_string(),
                format_num(c.outcome.ttft.p99 * 1e3),
                format_num(c.itl_p99_s * 1e3),
                format_num(c.outcome.tokens_per_s),
            ]),
            None => rec.row(vec![
                mode.into(),
                format!("none within {max} devices"),
                "–".into(),
                "–".into(),
                "–".into(),
                "–".into(),
            ]),
        }
    }
    report.tables.push(rec);
    report.tables.push(table);
    // The frontier: per device count, the best TTFT p99 each mode reaches.
    let frontier = |unified: bool| -> Vec<(f64, f64)> {
        (1..=max)
            .filter_map(|n| {
                candidates
                    .iter()
                    .filter(|c| {
                        c.devices == n
                            && matches!(c.layout, Layout::Unified(_)) == unified
                            && c.outcome.completed == c.outcome.requests
                    })
                    .map(|c| c.outcome.ttft.p99 * 1e3)
                    .min_by(f64::total_cmp)
                    .map(|t| (n as f64, t))
            })
            .collect()
    };
    report.plots.push(Plot {
        file: "plan-frontier.png".into(),
        title: format!(
            "Best TTFT p99 per fleet size (SLO {} ms)",
            format_num(slo.ttft_s * 1e3)
        ),
        x_label: "devices".into(),
        y_label: "TTFT p99 (ms)".into(),
        kind: PlotKind::Lines {
            series: vec![
                Series {
                    name: "unified".into(),
                    points: frontier(true),
                },
                Series {
                    name: "disaggregated".into(),
                    points: frontier(false),
                },
                Series {
                    name: "TTFT SLO".into(),
                    points: vec![(1.0, slo.ttft_s * 1e3), (max as f64, slo.ttft_s * 1e3)],
                },
            ],
            log_x: false,
        },
    });
    match &overall {
        Some(c) => report.findings.push(format!(
            "Recommended: {} ({} devices): TTFT p99 {} ms, inter-token p99 {} ms, {} output tok/s.",
            c.layout,
            c.devices,
            format_num(c.outcome.ttft.p99 * 1e3),
            format_num(c.itl_p99_s * 1e3),
            format_num(c.outcome.tokens_per_s)
        )),
        None => report.findings.push(format!(
            "No layout of at most {max} devices meets the SLOs; raise --max-devices or relax them."
        )),
    }
    let validation = if ctx.plan.validate {
        Some(validate(
            ctx,
            dir,
            &config,
            &cost,
            &trace,
            slo,
            &mut report,
        )?)
    } else {
        None
    };
    report.data = json!({
        "trace": {"name": trace.name, "requests": trace.jobs.len(), "adapters": trace.ranks.len()},
        "slo": slo,
        "profile": cost,
        "candidates": candidates,
        "recommended": {"unified": best_unified, "disaggregated": best_split, "overall": overall},
        "validation": validation,
    });
    Ok(report)
}

fn judge(layout: Layout, tracker: &Tracker, stats: fleet::SimStats, slo: Slo) -> Candidate {
    let outcome = tracker.outcome(slo, None, None);
    let itl_p99_s = crate::suites::stats::percentile(&tracker.gaps(), 99.0);
    let meets = outcome.completed == outcome.requests
        && outcome.ttft.p99 <= slo.ttft_s
        && itl_p99_s <= slo.itl_s;
    Candidate {
        layout,
        devices: layout.devices(),
        outcome,
        itl_p99_s,
        meets,
        stats,
    }
}

/// Replays the trace (on the base model: the replay client sends no adapter) on real agents
/// and compares with the prediction for the same layouts.
/// `dir` and `config` are the fixture model the trace was read for.
fn validate(
    ctx: &mut Ctx,
    dir: PathBuf,
    config: &ModelConfig,
    cost: &StepCost,
    trace: &Trace,
    slo: Slo,
    report: &mut Report,
) -> anyhow::Result<serde_json::Value> {
    let page_bytes = loraplane_agent::engine::core::kv_geometry(config, cost.limits.block_size)
        .page_elems as u64
        * 4;
    let scratch = tempfile::tempdir()?;
    let agent_config = processes::AgentConfig {
        model: dir,
        pool_bytes: cost.limits.pool_pages as u64 * page_bytes,
        chunk: cost.limits.max_prefill_chunk,
        max_running: cost.limits.max_running,
        scratch: scratch.path().to_owned(),
        unified_core: Some(0),
    };
    let procs = processes::run(&agent_config, &trace.jobs, &mut ctx.progress)?;
    let mut table = Table::new(
        "Validation: predicted against measured on this machine (base model, one core per agent)",
        &["layout", "figure", "predicted", "measured", "error"],
    );
    let mut worst: f64 = 0.0;
    let mut rows = Vec::new();
    for (layout, measured) in [
        (Layout::Unified(1), &procs.unified),
        (
            Layout::Split {
                prefill: 1,
                decode: 1,
            },
            &procs.disaggregated,
        ),
    ] {
        let (predicted, _) = fleet::simulate(cost, layout, &trace.jobs, &|_| None)?;
        let (p, m) = (
            judge(layout, &predicted, Default::default(), slo),
            judge(layout, measured, Default::default(), slo),
        );
        for (figure, pv, mv) in [
            (
                "TTFT p50 (ms)",
                p.outcome.ttft.p50 * 1e3,
                m.outcome.ttft.p50 * 1e3,
            ),
            (
                "TTFT p99 (ms)",
                p.outcome.ttft.p99 * 1e3,
                m.outcome.ttft.p99 * 1e3,
            ),
            (
                "inter-token p50 (ms)",
                p.outcome.itl.p50 * 1e3,
                m.outcome.itl.p50 * 1e3,
            ),
            ("inter-token p99 (ms)", p.itl_p99_s * 1e3, m.itl_p99_s * 1e3),
            (
                "output tok/s",
                p.outcome.tokens_per_s,
                m.outcome.tokens_per_s,
            ),
        ] {
            // A measured zero (tokens that reached the client together) has no relative error.
            let err = if mv > 1e-9 { (pv - mv) / mv } else { f64::NAN };
            if err.is_finite() {
                worst = worst.max(err.abs());
            }
            table.row(vec![
                layout.to_string(),
                figure.into(),
                format_num(pv),
                format_num(mv),
                if err.is_finite() {
                    format!("{:+.0} %", err * 100.0)
                } else {
                    "n/a".into()
                },
            ]);
            rows.push(json!({"layout": layout, "figure": figure, "predicted": pv, "measured": mv, "rel_error": err}));
        }
    }
    report.tables.push(table);
    report.targets.push(
        Target::at_least(
            "planner prediction vs real agents",
            "largest relative error reported (TTFT, inter-token p50/p99, throughput)",
            -worst,
            f64::NEG_INFINITY,
            format!("{:.0} %", worst * 100.0),
        )
        .note(if procs.pinned {
            "agents pinned one per core"
        } else {
            "agents not pinned (no taskset or one core)"
        }),
    );
    report.targets.last_mut().expect("pushed").met = None;
    Ok(json!({"rows": rows, "worst_rel_error": worst, "pinned": procs.pinned}))
}
