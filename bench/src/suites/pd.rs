//! `bench pd`: unified against disaggregated serving (Splitwise) under a mix of long and short
//! prompts — time to first token and inter-token latency, p50 and p99, per mode.
//!
//! Method: both modes run in-process on the virtual clock of `sim`. Unified: one engine on
//! every core. Disaggregated: a prefill engine and a decode engine, each confined to its own
//! single-thread rayon pool (one core's worth of compute each — node-agent forbids the `unsafe`
//! that OS-level pinning needs, so the split is by thread pool, and the two engines advance on
//! separate virtual clocks as if they ran side by side on their own cores). A prompt's KV moves
//! from the prefill engine to the decode engine in memory the moment its prefill step ends
//! (`kv-transfer` measures what the wire adds); the decode engine emits the first token when it
//! admits the request.

pub(crate) mod processes;

use std::collections::VecDeque;

use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::{Engine, EngineConfig, Event, KvImport, KvLayer};

use crate::suites::report::{GroupSeries, Plot, PlotKind, Report, Series, Table, format_num};
use crate::suites::sim::{
    self, AllNow, Job, Outcome, RunOptions, Slo, Tracker, WorkloadSpec, service_loads, timed_step,
};
use crate::suites::{Ctx, setup};

/// A prefill in flight on the prefill engine.
struct InPrefill {
    job: usize,
    events: UnboundedReceiver<Event>,
    kv: UnboundedReceiver<KvLayer>,
    layers: Vec<Vec<f32>>,
    first: Option<(u32, Option<f32>)>,
}

/// Serves `jobs` disaggregated; returns the tracker of the decode side's events.
fn serve_disaggregated(
    prefill: &mut Engine<CpuBackend>,
    decode: &mut Engine<CpuBackend>,
    jobs: &[Job],
    pools: (&rayon::ThreadPool, &rayon::ThreadPool),
    progress: &mut dyn FnMut(usize, usize, f64),
) -> anyhow::Result<(Tracker, f64, f64)> {
    let mut tracker = Tracker::new(jobs);
    let (mut clock_p, mut clock_d) = (0.0f64, 0.0f64);
    let (mut busy_p, mut busy_d) = (0.0, 0.0);
    let mut next = 0;
    let mut in_prefill: Vec<InPrefill> = Vec::new();
    let mut handoffs: VecDeque<(f64, usize, KvImport)> = VecDeque::new();
    let mut last_report = std::time::Instant::now();
    loop {
        let p_next = if prefill.has_work() {
            Some(clock_p)
        } else {
            jobs.get(next).map(|j| clock_p.max(j.arrival))
        };
        let d_next = if decode.has_work() {
            Some(clock_d)
        } else {
            handoffs.front().map(|h| clock_d.max(h.0))
        };
        let prefill_turn = match (p_next, d_next) {
            (None, None) => break,
            (Some(p), Some(d)) => p <= d,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if prefill_turn {
            clock_p = p_next.unwrap_or(clock_p);
            while next < jobs.len() && jobs[next].arrival <= clock_p {
                let (tx, events) = unbounded_channel();
                let (kv_tx, kv) = unbounded_channel();
                let req = sim::request(next, &jobs[next], None);
                match prefill.submit_prefill(req, tx, kv_tx) {
                    Ok(()) => in_prefill.push(InPrefill {
                        job: next,
                        events,
                        kv,
                        layers: Vec::new(),
                        first: None,
                    }),
                    Err(_) => tracker.fail(next),
                }
                next += 1;
            }
            clock_p += service_loads(prefill)?;
            if prefill.has_work() {
                let (_, dt) = timed_step(prefill, Some(pools.0))?;
                clock_p += dt;
                busy_p += dt;
            }
            // Prefills that completed hand their KV to the decode side now.
            let mut still = Vec::new();
            for mut p in in_prefill.drain(..) {
                while let Ok(layer) = p.kv.try_recv() {
                    p.layers.push(layer.data);
                }
                let mut finished = false;
                while let Ok(ev) = p.events.try_recv() {
                    match ev {
                        Event::Token { id, logprob, .. } => p.first = Some((id, logprob)),
                        Event::Finished { .. } => finished = true,
                    }
                }
                match (finished, p.first) {
                    (true, Some((first_token, first_logprob))) => handoffs.push_back((
                        clock_p,
                        p.job,
                        KvImport {
                            first_block: 0,
                            layers: p.layers,
                            first_token,
                            first_logprob,
                        },
                    )),
                    (true, None) => tracker.fail(p.job),
                    (false, _) => still.push(p),
                }
            }
            in_prefill = still;
        } else {
            clock_d = d_next.unwrap_or(clock_d);
            while handoffs.front().is_some_and(|h| h.0 <= clock_d) {
                if let Some((_, job, import)) = handoffs.pop_front() {
                    let tx = tracker.channel(job);
                    let req = sim::request(job, &jobs[job], None);
                    if decode.submit_prefilled(req, tx, import).is_err() {
                        tracker.fail(job);
                    }
                }
            }
            if decode.has_work() {
                let (_, dt) = timed_step(decode, Some(pools.1))?;
                clock_d += dt;
                busy_d += dt;
                tracker.poll(clock_d);
            }
        }
        if last_report.elapsed().as_secs_f64() > 0.5 {
            progress(tracker.finished(), jobs.len(), clock_d.max(clock_p));
            last_report = std::time::Instant::now();
        }
    }
    tracker.poll(clock_d);
    Ok((tracker, busy_p, busy_d))
}

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let dir = ctx.fixtures.model()?;
    let config = setup::model_config(&dir)?;
    let w = ctx.workload.clone();
    let requests = w
        .requests
        .unwrap_or_else(|| if ctx.tiny() { 48 } else { ctx.pick(24, 64) });
    let short = w
        .prompt_len
        .unwrap_or(if ctx.quick { (8, 32) } else { (16, 64) });
    let long = if ctx.tiny() {
        (256, 512)
    } else {
        ctx.pick((256, 384), (384, 768))
    };
    let output = w
        .output_len
        .unwrap_or(if ctx.quick { (8, 32) } else { (16, 48) });
    let long_fraction = 0.2;
    let slo = Slo {
        ttft_s: w
            .slo_ttft_ms
            .unwrap_or(if ctx.tiny() { 200.0 } else { 8000.0 })
            / 1e3,
        itl_s: w
            .slo_itl_ms
            .unwrap_or(if ctx.tiny() { 20.0 } else { 300.0 })
            / 1e3,
    };
    let max_running = 32;
    let chunk = if ctx.tiny() { 512 } else { 256 };
    let engine_config = || -> anyhow::Result<EngineConfig> {
        Ok(EngineConfig {
            num_pages: setup::pool_pages(&config, 16, &[], max_running * (long.1 + output.1 + 16))?,
            max_running,
            max_batch_tokens: chunk,
            max_prefill_chunk: chunk,
            ..EngineConfig::default()
        })
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build();
    let (all_cores, one_a, one_b) = (pool(cores)?, pool(1)?, pool(1)?);
    ctx.progress
        .update("loading three engines (unified, prefill, decode)");
    let mut unified = setup::engine(CpuBackend, &mut ctx.fixtures, &dir, engine_config()?, &[])?;
    let mut prefill = setup::engine(CpuBackend, &mut ctx.fixtures, &dir, engine_config()?, &[])?;
    let mut decode = setup::engine(CpuBackend, &mut ctx.fixtures, &dir, engine_config()?, &[])?;
    let spec = |rate: f64| WorkloadSpec {
        requests,
        rate,
        adapters: 0,
        zipf_alpha: w.zipf_alpha,
        prompt: short,
        output,
        long_fraction,
        long_prompt: long,
        vocab: config.vocab_size,
        seed: ctx.seed ^ 0x7064,
    };
    let opts = RunOptions {
        horizon: None,
        pool: Some(&all_cores),
    };
    let load = w.load.unwrap_or(0.7);
    let (rate, capacity) = match w.rate {
        Some(r) => (r, None),
        None => {
            let jobs = sim::generate(&spec(f64::INFINITY));
            let progress = &mut ctx.progress;
            let (t, _) = sim::serve(
                &mut unified,
                &jobs,
                &mut AllNow { names: None },
                opts,
                &mut |d, n, c| {
                    progress.update(format!(
                        "capacity (unified, closed batch): {d}/{n}, clock {c:.1} s"
                    ))
                },
            )?;
            let cap = t.outcome(slo, None, None).requests_per_s;
            (load * cap, Some(cap))
        }
    };
    let jobs = sim::generate(&spec(rate));
    let progress = &mut ctx.progress;
    let (uni, uni_stats) = sim::serve(
        &mut unified,
        &jobs,
        &mut AllNow { names: None },
        opts,
        &mut |d, n, c| progress.update(format!("unified: {d}/{n} requests, clock {c:.1} s")),
    )?;
    let (dis, busy_p, busy_d) = serve_disaggregated(
        &mut prefill,
        &mut decode,
        &jobs,
        (&one_a, &one_b),
        &mut |d, n, c| progress.update(format!("disaggregated: {d}/{n} requests, clock {c:.1} s")),
    )?;

    // The same jobs on real agents: separate processes, real time, KV over gRPC.
    let page_bytes = loraplane_agent::engine::core::kv_geometry(&config, 16).page_elems as u64 * 4;
    let scratch = tempfile::tempdir()?;
    let agent_config = processes::AgentConfig {
        model: dir.clone(),
        pool_bytes: engine_config()?.num_pages as u64 * page_bytes,
        chunk,
        max_running,
        scratch: scratch.path().to_owned(),
        unified_core: None,
    };
    drop((unified, prefill, decode));
    let procs = processes::run(&agent_config, &jobs, &mut ctx.progress)?;

    let outcomes = |t: &Tracker| -> [Outcome; 3] {
        [
            t.outcome(slo, None, None),
            t.outcome(slo, None, Some(false)),
            t.outcome(slo, None, Some(true)),
        ]
    };
    let (u, d) = (outcomes(&uni), outcomes(&dis));
    let (pu, pdis) = (outcomes(&procs.unified), outcomes(&procs.disaggregated));
    let mut report = Report::new(
        "pd",
        "Unified vs disaggregated prefill/decode (Splitwise) under long and short prompts",
    );
    let mut table = Table::new(
        "Latency per mode (all requests; short and long prompts separately)",
        &[
            "mode", "requests", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tokens/s", "SLO",
        ],
    );
    for (mode, o) in [
        ("unified, in-process", &u),
        ("disaggregated, in-process", &d),
        ("unified, processes", &pu),
        ("disaggregated, processes", &pdis),
    ] {
        for (class, x) in [("all", &o[0]), ("short", &o[1]), ("long", &o[2])] {
            table.row(vec![
                format!("{mode} ({class})"),
                x.requests.to_string(),
                format!("{:.0} ms", x.ttft.p50 * 1e3),
                format!("{:.0} ms", x.ttft.p99 * 1e3),
                format!("{:.1} ms", x.itl.p50 * 1e3),
                format!("{:.1} ms", x.itl.p99 * 1e3),
                format_num(x.tokens_per_s),
                format!("{:.0} %", x.slo_attainment * 100.0),
            ]);
        }
    }
    report.tables.push(table);
    report.findings.push(format!(
        "Unified: one engine on {cores} cores, busy {:.1} s of a {:.1} s run; every long prompt's \
         chunks share steps with the running decodes, which is what stretches the ITL tail \
         (chunked prefill bounds each step to {chunk} tokens). Disaggregated: the prefill \
         engine was busy {:.1} s and the decode engine {:.1} s, each on one core; decode steps \
         never carry a prompt chunk, so ITL reflects decode batches alone, at half the cores.",
        uni_stats.compute_s, uni_stats.final_clock_s, busy_p, busy_d
    ));
    let groups = vec![
        "TTFT p50".to_owned(),
        "TTFT p99".to_owned(),
        "ITL p50".to_owned(),
        "ITL p99".to_owned(),
    ];
    let vals = |o: &Outcome| {
        vec![
            o.ttft.p50 * 1e3,
            o.ttft.p99 * 1e3,
            o.itl.p50 * 1e3,
            o.itl.p99 * 1e3,
        ]
    };
    report.findings.push(format!(
        "Separate processes (real time, real gRPC): unified ITL p99 {:.0} ms against {:.0} ms \
         disaggregated, TTFT p50 {:.0} ms against {:.0} ms; the prefill and decode agents were \
         {}.",
        pu[0].itl.p99 * 1e3,
        pdis[0].itl.p99 * 1e3,
        pu[0].ttft.p50 * 1e3,
        pdis[0].ttft.p50 * 1e3,
        if procs.pinned {
            "pinned to cores 0 and 1 with taskset"
        } else {
            "not pinned (no taskset, or a single core)"
        }
    ));
    report.plots.push(Plot {
        file: "pd-latency-processes.png".into(),
        title: "Latency per mode, separate processes (ms)".into(),
        x_label: String::new(),
        y_label: "ms".into(),
        kind: PlotKind::Groups {
            groups: vec![
                "TTFT p50".to_owned(),
                "TTFT p99".to_owned(),
                "ITL p50".to_owned(),
                "ITL p99".to_owned(),
            ],
            series: vec![
                GroupSeries {
                    name: "unified".into(),
                    values: vals(&pu[0]),
                },
                GroupSeries {
                    name: "disaggregated".into(),
                    values: vals(&pdis[0]),
                },
            ],
        },
    });
    report.plots.push(Plot {
        file: "pd-latency.png".into(),
        title: "Latency per mode, in-process (ms)".into(),
        x_label: String::new(),
        y_label: "ms".into(),
        kind: PlotKind::Groups {
            groups,
            series: vec![
                GroupSeries {
                    name: "unified".into(),
                    values: vals(&u[0]),
                },
                GroupSeries {
                    name: "disaggregated".into(),
                    values: vals(&d[0]),
                },
            ],
        },
    });
    let cdf = |t: &Tracker| {
        let mut gaps = t.gaps();
        gaps.sort_by(f64::total_cmp);
        let n = gaps.len().max(1) as f64;
        let step = (gaps.len() / 200).max(1);
        gaps.iter()
            .enumerate()
            .step_by(step)
            .map(|(i, g)| (g * 1e3, (i + 1) as f64 / n))
            .collect::<Vec<_>>()
    };
    report.plots.push(Plot {
        file: "pd-itl-cdf.png".into(),
        title: "Inter-token latency distribution".into(),
        x_label: "inter-token latency (ms)".into(),
        y_label: "share of gaps ≤ x".into(),
        kind: PlotKind::Lines {
            series: vec![
                Series {
                    name: "unified".into(),
                    points: cdf(&uni),
                },
                Series {
                    name: "disaggregated".into(),
                    points: cdf(&dis),
                },
            ],
            log_x: false,
        },
    });
    report.method = vec![
        format!(
            "Workload: {requests} requests, Poisson arrivals at {rate:.3} req/s{}; {:.0} % long \
             prompts of {}–{} tokens, the rest {}–{} tokens; outputs {}–{} tokens; base model \
             (`{}` fixture), greedy. SLOs for the attainment column: TTFT ≤ {:.0} ms, mean \
             inter-token latency ≤ {:.0} ms.",
            match capacity {
                Some(c) => format!(
                    " ({load:.2} × the unified engine's closed-batch capacity of {c:.3} req/s)"
                ),
                None => " (--rate)".to_owned(),
            },
            long_fraction * 100.0,
            long.0,
            long.1,
            short.0,
            short.1,
            output.0,
            output.1,
            format!("{:?}", ctx.preset).to_lowercase(),
            slo.ttft_s * 1e3,
            slo.itl_s * 1e3
        ),
        format!(
            "Engines: token budget and prefill chunk {chunk}, up to {max_running} running \
             requests, the same configuration for all three engines. Unified runs its steps in a \
             {cores}-thread rayon pool; the prefill and decode engines each in a 1-thread pool. \
             Time: `sim`'s virtual clock (measured step times), one clock per engine in the \
             disaggregated mode — the engine whose next step is due first runs next, so the \
             two interleave exactly as two engines on two cores would, minus any memory \
             bandwidth they would contend for."
        ),
        "Limits of the in-process method: the engines share one process and are not pinned \
         (node-agent forbids unsafe code); the KV handoff is in memory (no wire time — see \
         `kv-transfer`); the first two tokens of a disaggregated request are stamped at the \
         end of the decode step that admitted it."
            .to_owned(),
        format!(
            "Separate processes: the same jobs replayed in real time (each request sent at its \
             arrival time) over `Inference/Generate` to `loraplane-agent serve --role unified`, \
             then to `--role decode` with `--role prefill` as its only prefill peer \
             (`--local-prefill-threshold 1`: every prompt is prefilled remotely, its KV \
             streamed over `KvTransfer`). Agents get the same engine sizing; the prefill and \
             decode agents are {}. Tokens are stamped when the client receives them; tokens \
             that arrive in one message share the gap since the previous message.",
            if procs.pinned {
                "pinned to cores 0 and 1 with `taskset`, the unified agent has both"
            } else {
                "not pinned (no `taskset` or a single core)"
            }
        ),
    ];
    report.data = json!({
        "rate_rps": rate,
        "capacity_rps": capacity,
        "requests": requests,
        "short_prompt": short,
        "long_prompt": long,
        "long_fraction": long_fraction,
        "output": output,
        "slo": slo,
        "unified": {"all": u[0], "short": u[1], "long": u[2], "stats": uni_stats},
        "disaggregated": {"all": d[0], "short": d[1], "long": d[2],
                          "prefill_busy_s": busy_p, "decode_busy_s": busy_d},
        "processes": {
            "pinned": procs.pinned,
            "unified": {"all": pu[0], "short": pu[1], "long": pu[2]},
            "disaggregated": {"all": pdis[0], "short": pdis[1], "long": pdis[2]},
        },
    });
    Ok(report)
}
