//! `bench serving`: a workload file (`bench/workloads/`) driven against any OpenAI-compatible
//! server with streaming completions — loraplane's own agent (`--serve` starts one on the
//! fixture model and the workload's adapters), vLLM, llama.cpp's server, LoRAX, or the HF PEFT
//! baseline of `scripts/peft-baseline/`. Reports output tokens/s, TTFT, inter-token latency and
//! end-to-end latency (p50/p99), and the workload's roofline from the GEMM peak and memory
//! bandwidth measured in the same run (docs/performance-targets.md §2.1).
//!
//! Layout: `workload` (the file format and its expansion), `client` (the SSE load generator),
//! `agent` (fixtures, `--serve`, text prompts), `roofline` (the workload's bound).

mod agent;
mod client;
mod roofline;
pub(crate) mod workload;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::suites::Ctx;
use crate::suites::report::{Bar, Plot, PlotKind, Report, Series, Table, Target, format_num};
use crate::suites::roofline::measure_machine;
use crate::suites::setup;
use crate::suites::sim::Pcts;
use client::{Outgoing, Record, Sampling};
use workload::{Arrival, Popularity, PromptFormat, Workload};

/// Options of the `serving` suite (ignored by the others).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServingArgs {
    /// `serving`: the workload file (TOML, or JSON for `.json`; see bench/workloads/README.md).
    #[arg(long, env = "LORAPLANE_BENCH_WORKLOAD")]
    pub workload: Option<PathBuf>,
    /// `serving`: base URL of the OpenAI-compatible server to drive (`http://127.0.0.1:8000`).
    #[arg(long, env = "LORAPLANE_BENCH_URL", conflicts_with = "serve")]
    pub url: Option<String>,
    /// `serving`: start `loraplane-agent serve` on the fixture model (`--preset`) with the
    /// workload's adapters, and drive it.
    #[arg(long)]
    pub serve: bool,
    /// `serving`: a flag for the agent `--serve` starts (repeatable, e.g.
    /// `--serve-arg=--max-running=32`).
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// `serving`: write every request's output (text, token count; tokens and log-probabilities
    /// when asked for) to this file, one JSON object per line, in request order.
    #[arg(long)]
    pub save_outputs: Option<PathBuf>,
    /// `serving`: ask for the sampled tokens' log-probabilities whatever the workload says.
    #[arg(long)]
    pub logprobs: bool,
    /// `serving`: only create the fixture model and the workload's adapters, print
    /// `{"model": DIR, "adapters": DIR}` on stdout and exit (for starting another server on
    /// them).
    #[arg(long)]
    pub prepare_only: bool,
}

fn workload_of(ctx: &Ctx) -> anyhow::Result<Workload> {
    let path = ctx
        .serving
        .workload
        .as_ref()
        .context("bench serving needs --workload FILE (e.g. bench/workloads/canonical.toml)")?;
    Workload::read(path)
}

/// `--prepare-only`: the fixtures, their paths on stdout.
pub(crate) fn prepare_only(ctx: &Ctx) -> anyhow::Result<()> {
    let w = workload_of(ctx)?;
    let p = agent::prepare(&ctx.fixtures, &w)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&p)?)?;
    Ok(())
}

/// The requests as the client sends them.
fn outgoing(
    w: &Workload,
    plan: &[workload::Planned],
    model_dir: &std::path::Path,
) -> anyhow::Result<Vec<Outgoing>> {
    let names = w.adapter_names();
    let text = match w.prompt_format {
        PromptFormat::Text => Some(agent::TextPrompts::new(&model_dir.join("tokenizer.json"))?),
        PromptFormat::TokenIds => None,
    };
    plan.iter()
        .enumerate()
        .map(|(i, p)| {
            let prompt = match &text {
                Some(t) => json!(t.build(p.prompt.len(), w.seed ^ (i as u64) << 20)?),
                None => json!(p.prompt),
            };
            Ok(Outgoing {
                model: w.model_of(&names, p),
                prompt,
                prompt_tokens: p.prompt.len(),
                max_tokens: p.max_tokens,
                arrival: p.arrival,
            })
        })
        .collect()
}

/// Figures of a run.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    requests: usize,
    ok: usize,
    failed: usize,
    output_tokens: usize,
    expected_output_tokens: usize,
    /// First send to last completion.
    duration_s: f64,
    output_tok_s: f64,
    requests_per_s: f64,
    ttft_s: Pcts,
    itl_s: Pcts,
    /// Per request, (latency - TTFT) / (tokens - 1).
    tpot_s: Pcts,
    e2e_s: Pcts,
}

fn figures(records: &[Record]) -> Figures {
    let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
    let output_tokens: usize = ok.iter().map(|r| r.completion_tokens).sum();
    let first = records.iter().map(|r| r.sent).fold(f64::INFINITY, f64::min);
    let last = records.iter().map(|r| r.done).fold(0.0, f64::max);
    let duration_s = if last > first { last - first } else { 0.0 };
    let per_s = |n: usize| {
        if duration_s > 0.0 {
            n as f64 / duration_s
        } else {
            0.0
        }
    };
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft()).collect();
    let gaps: Vec<f64> = ok.iter().flat_map(|r| r.gaps.iter().copied()).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.completion_tokens > 1)
        .filter_map(|r| Some((r.latency() - r.ttft()?) / (r.completion_tokens - 1) as f64))
        .collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.latency()).collect();
    Figures {
        requests: records.len(),
        ok: ok.len(),
        failed: records.len() - ok.len(),
        output_tokens,
        expected_output_tokens: records.iter().map(|r| r.max_tokens).sum(),
        duration_s,
        output_tok_s: per_s(output_tokens),
        requests_per_s: per_s(ok.len()),
        ttft_s: Pcts::of(&ttft),
        itl_s: Pcts::of(&gaps),
        tpot_s: Pcts::of(&tpot),
        e2e_s: Pcts::of(&e2e),
    }
}

fn save_outputs(path: &std::path::Path, records: &[Record]) -> anyhow::Result<()> {
    let mut out = String::new();
    for r in records {
        out += &serde_json::to_string(r)?;
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let mut w = workload_of(ctx)?;
    w.logprobs |= ctx.serving.logprobs;
    ctx.progress.update("fixture model");
    let model_dir = ctx.fixtures.model()?;
    let config = setup::model_config(&model_dir)?;

    // The server: ours, started here, or the one at --url.
    let (agent, url) = match (&ctx.serving.url, ctx.serving.serve) {
        (Some(url), false) => (None, url.clone()),
        (None, true) => {
            ctx.progress
                .update(format!("fixtures: {} adapters", w.adapters.count));
            let prepared = agent::prepare(&ctx.fixtures, &w)?;
            ctx.progress.update("starting loraplane-agent serve");
            let log = ctx.out.join("serving-agent.log");
            let a = agent::start(&prepared, &w, &ctx.serving.serve_arg, &log)?;
            let url = a.http.clone();
            (Some(a), url)
        }
        _ => anyhow::bail!("bench serving needs exactly one of --url URL and --serve"),
    };

    let plan = w.expand(config.vocab_size);
    let requests = outgoing(&w, &plan, &model_dir)?;
    let sampling = Sampling {
        temperature: w.temperature,
        ignore_eos: w.ignore_eos,
        logprobs: w.logprobs,
    };
    // One client thread: the load generator must take as little CPU from the server as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A warm-up request (one token, not measured): connections, first-use allocations.
    if let Some(first) = requests.first() {
        ctx.progress.update(format!("warm-up request to {url}"));
        let mut warm = first.clone();
        warm.max_tokens = 1;
        warm.arrival = 0.0;
        let r = runtime.block_on(client::drive(
            &url,
            vec![warm],
            sampling,
            1,
            &mut |_, _, _, _| {},
        ))?;
        if let Some(e) = r.first().and_then(|r| r.error.clone()) {
            anyhow::bail!("the warm-up request to {url} failed: {e}");
        }
    }
    // The machine, measured while the server idles (after the warm-up proved it answers).
    let machine = measure_machine(ctx)?;

    let progress = &mut ctx.progress;
    let records = runtime.block_on(client::drive(
        &url,
        requests,
        sampling,
        w.concurrency,
        &mut |done, total, tokens, t| {
            progress.update(format!(
                "{done}/{total} requests, {tokens} tokens, {:.1} tok/s, {t:.1} s",
                if t > 0.0 { tokens as f64 / t } else { 0.0 }
            ))
        },
    ))?;
    drop(agent);
    if let Some(path) = &ctx.serving.save_outputs {
        save_outputs(path, &records)?;
    }
    let f = figures(&records);
    if f.ok == 0 {
        let e = records
            .iter()
            .find_map(|r| r.error.clone())
            .unwrap_or_default();
        anyhow::bail!("every request to {url} failed; the first: {e}");
    }
    let bound = roofline::bound(&config, &w, &plan, machine.gemm_gflops, machine.read_gbps);
    Ok(report(ctx, &w, &url, &records, &f, &machine, &bound))
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1e3)
}

fn report(
    ctx: &Ctx,
    w: &Workload,
    url: &str,
    records: &[Record],
    f: &Figures,
    machine: &crate::suites::roofline::MachinePeaks,
    bound: &roofline::Bound,
) -> Report {
    let target = if ctx.serving.serve {
        "loraplane-agent serve (--serve)".to_owned()
    } else {
        url.to_owned()
    };
    let mut report = Report::new(
        "serving",
        &format!("Serving: workload `{}` against {target}", w.name),
    );
    let fraction = f.output_tok_s / bound.tok_s;
    report.targets.push(
        Target::at_least(
            "Serving tok/s vs workload roofline",
            "≥ 50 % of the roofline",
            fraction,
            0.50,
            format!(
                "{:.0} % ({} of {} tok/s)",
                fraction * 100.0,
                format_num(f.output_tok_s),
                format_num(bound.tok_s)
            ),
        )
        .note(format!(
            "docs/performance-targets.md §2.1; judged for loraplane, reported for any server. \
             The roofline is {}-bound on this machine ({} GFLOP/s GEMM peak, {} GB/s read \
             bandwidth, measured in this run)",
            bound.limit(),
            format_num(machine.gemm_gflops),
            format_num(machine.read_gbps)
        )),
    );

    let mut results = Table::new("Results", &["figure", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("requests ok / sent", format!("{} / {}", f.ok, f.requests)),
        (
            "output tokens (received / asked)",
            format!("{} / {}", f.output_tokens, f.expected_output_tokens),
        ),
        ("duration (s)", format!("{:.2}", f.duration_s)),
        ("output tok/s", format!("{:.1}", f.output_tok_s)),
        ("requests/s", format!("{:.2}", f.requests_per_s)),
        (
            "TTFT p50 / p99 (ms)",
            format!("{} / {}", ms(f.ttft_s.p50), ms(f.ttft_s.p99)),
        ),
        (
            "ITL p50 / p99 (ms)",
            format!("{} / {}", ms(f.itl_s.p50), ms(f.itl_s.p99)),
        ),
        (
            "TPOT p50 / p99 (ms)",
            format!("{} / {}", ms(f.tpot_s.p50), ms(f.tpot_s.p99)),
        ),
        (
            "end-to-end p50 / p99 (ms)",
            format!("{} / {}", ms(f.e2e_s.p50), ms(f.e2e_s.p99)),
        ),
        ("roofline tok/s", format!("{:.1}", bound.tok_s)),
        ("of the roofline", format!("{:.0} %", fraction * 100.0)),
    ];
    for (k, v) in rows {
        results.row(vec![k.to_owned(), v]);
    }
    report.tables.push(results);

    let mut roof = Table::new("Roofline of the workload", &["figure", "value"]);
    for (k, v) in [
        (
            "GEMM peak (GFLOP/s, best run)",
            format!(
                "{} ({})",
                format_num(machine.gemm_gflops),
                machine.gemm_shape
            ),
        ),
        (
            "read bandwidth (GB/s, best run)",
            format_num(machine.read_gbps),
        ),
        ("workload GFLOP", format!("{:.1}", bound.flops / 1e9)),
        (
            "workload GB read (best batching)",
            format!("{:.2}", bound.bytes / 1e9),
        ),
        ("compute-bound time (s)", format!("{:.2}", bound.compute_s)),
        ("bandwidth-bound time (s)", format!("{:.2}", bound.memory_s)),
        ("roofline output tok/s", format!("{:.1}", bound.tok_s)),
    ] {
        roof.row(vec![k.to_owned(), v]);
    }
    report.tables.push(roof);

    // Requests per adapter: how the popularity came out.
    let mut per_model: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for r in records {
        let e = per_model.entry(r.model.as_str()).or_default();
        e.0 += 1;
        e.1 += r.completion_tokens;
    }
    let mut counts: Vec<(&str, (usize, usize))> = per_model.into_iter().collect();
    counts.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
    let mut pop = Table::new(
        "Requests per model (most asked first)",
        &["model", "requests", "output tokens"],
    );
    for (m, (n, t)) in counts.iter().take(16) {
        pop.row(vec![(*m).to_owned(), n.to_string(), t.to_string()]);
    }
    if counts.len() > 16 {
        let (n, t) = counts[16..]
            .iter()
            .fold((0, 0), |a, (_, (n, t))| (a.0 + n, a.1 + t));
        pop.row(vec![
            format!("{} others", counts.len() - 16),
            n.to_string(),
            t.to_string(),
        ]);
    }
    report.tables.push(pop);

    let cdf = |mut v: Vec<f64>| -> Vec<(f64, f64)> {
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        v.iter()
            .enumerate()
            .map(|(i, x)| (x * 1e3, 100.0 * (i + 1) as f64 / n))
            .collect()
    };
    let ok = || records.iter().filter(|r| r.ok());
    report.plots.push(Plot {
        file: "serving-latency.png".into(),
        title: format!("Latency distribution, workload {}", w.name),
        x_label: "ms".into(),
        y_label: "% of requests at or below".into(),
        kind: PlotKind::Lines {
            series: vec![
                Series {
                    name: "TTFT".into(),
                    points: cdf(ok().filter_map(Record::ttft).collect()),
                },
                Series {
                    name: "end-to-end".into(),
                    points: cdf(ok().map(Record::latency).collect()),
                },
            ],
            log_x: false,
        },
    });
    report.plots.push(Plot {
        file: "serving-throughput.png".into(),
        title: "Output tokens/s against the workload's roofline".into(),
        x_label: String::new(),
        y_label: "output tokens/s".into(),
        kind: PlotKind::Bars {
            bars: vec![
                Bar {
                    label: "measured".into(),
                    value: f.output_tok_s,
                    range: None,
                    color: 0,
                },
                Bar {
                    label: "roofline".into(),
                    value: bound.tok_s,
                    range: None,
                    color: 5,
                },
            ],
        },
    });

    let arrival = match w.arrival {
        Arrival::AllAtOnce => "all at once".to_owned(),
        Arrival::Poisson { rate } => format!("Poisson at {rate} requests/s"),
    };
    let popularity = match w.adapters.popularity {
        Popularity::Uniform => "uniform (request i → adapter i mod n)".to_owned(),
        Popularity::PowerLaw { alpha } => format!("power law, α = {alpha}"),
    };
    report.method = vec![
        format!(
            "Workload `{}`: {} requests over {} adapters (ranks {:?}, targets {}), popularity \
             {popularity}, prompts of {:?} tokens sent as {}, {:?} output tokens, temperature \
             {}{}, arrivals {arrival}, at most {} in flight, seed {}.",
            w.name,
            w.requests,
            w.adapters.count,
            w.adapters.ranks,
            w.adapters
                .targets
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", "),
            w.prompt_tokens,
            match w.prompt_format {
                PromptFormat::TokenIds => "token ids",
                PromptFormat::Text => "text of exactly that many tokens",
            },
            w.output_tokens,
            w.temperature,
            if w.ignore_eos { ", ignore_eos" } else { "" },
            w.concurrency,
            w.seed
        ),
        "Client: one thread, streaming `POST /v1/completions` (server-sent events, \
         `stream_options.include_usage`), `model` = the adapter's name, one unmeasured one-token \
         warm-up request first. Output tok/s = tokens received / (first send to last \
         completion). TTFT from sending to the first token; ITL = gaps between tokens (a chunk \
         of several tokens splits its gap evenly); TPOT = (latency − TTFT) / (tokens − 1); \
         percentiles are nearest-rank."
            .to_owned(),
        format!(
            "Roofline: the workload's flops (linear layers, LoRA shrink/expand, attention, the \
             LM head per output token) at the GEMM peak, against its bytes (weights per prefill \
             and decode step with requests batched {} at a time in arrival order, the batch's \
             adapters, the KV cache) at the read bandwidth; the larger time bounds tokens/s. \
             The model is the fixture `{}` preset (f32): against a server running another model \
             the roofline does not apply.",
            w.concurrency,
            format!("{:?}", ctx.preset).to_lowercase()
        ),
    ];
    report.data = json!({
        "url": url,
        "serve": ctx.serving.serve,
        "workload": w,
        "figures": f,
        "output_tok_s": f.output_tok_s,
        "ttft_p99_s": f.ttft_s.p99,
        "roofline": bound,
        "roofline_tok_s": bound.tok_s,
        "roofline_fraction": fraction,
        "machine": machine,
        "requests": records.iter().map(|r| json!({
            "index": r.index, "model": r.model, "sent_s": r.sent, "ttft_s": r.ttft(),
            "latency_s": r.latency(), "completion_tokens": r.completion_tokens,
            "error": r.error,
        })).collect::<Vec<_>>(),
    });
    report
}
