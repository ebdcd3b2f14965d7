//! `bench hetero`: the LoRA overhead of heterogeneous batching. One batch of 64 requests, each
//! on its own adapter (ranks 8–64 cycled, all seven linear modules), against the same batch on
//! the base model: a prefill step (all 64 prompts in one step) and decode steps (64 tokens
//! each), timed separately, repeated with the two modes interleaved. Target
//! (docs/performance-targets.md §2.2): the adapter batch keeps ≥ 80 % of the no-adapter
//! tokens/s. On the CPU, the LoRA path is also judged against its own roofline (§2.2): its
//! time per decode step against the adapter bytes at the measured read bandwidth, per prefill
//! step against its FLOPs at the measured GEMM peak. On a GPU, the decode steps are read
//! against the device's measured copy bandwidth ([`device_roofline`]).

mod device_roofline;

use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

use loraplane_agent::backend::Backend;
use loraplane_agent::backend::device::{Device, WithBackend, copy_bandwidth, with_backend};
use loraplane_agent::engine::{Engine, EngineConfig, Event};
use loraplane_agent::lora::Module;
use loraplane_agent::rng::SplitMix64;

use crate::suites::report::{Bar, GroupSeries, Plot, PlotKind, Report, Table, Target, format_num};
use crate::suites::setup::{self, AdapterDef};
use crate::suites::sim::timed_step;
use crate::suites::stats::{Summary, median};
use crate::suites::timed::{Op, OpSnapshot, OpTimes, TimedCpu};
use crate::suites::{Ctx, sim};

const BATCH: usize = 64;
/// Each of the two buffers of the GPU copy-bandwidth measurement: large enough that a copy
/// takes far longer than its launch.
const COPY_BYTES: usize = 1 << 30;
const COPY_ROUNDS: usize = 10;

/// One repetition of one mode.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Sample {
    prefill_s: f64,
    prefill_ops: OpSnapshot,
    decode_s: Vec<f64>,
    /// Summed over the decode steps.
    decode_ops: OpSnapshot,
}

fn run_batch<B: Backend>(
    engine: &mut Engine<B>,
    times: Option<&OpTimes>,
    adapters: Option<&[AdapterDef]>,
    prompt_len: usize,
    decode_steps: usize,
    seed: u64,
) -> anyhow::Result<Sample> {
    let vocab = engine.model_config().vocab_size;
    let mut rng = SplitMix64::new(seed);
    let mut streams: Vec<UnboundedReceiver<Event>> = Vec::new();
    for i in 0..BATCH {
        let job = sim::Job {
            arrival: 0.0,
            adapter: None,
            prompt: (0..prompt_len)
                .map(|_| rng.below(vocab - 16) as u32)
                .collect(),
            max_tokens: decode_steps + 1,
            long: false,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let name = adapters.map(|a| a[i % a.len()].name.clone());
        engine.submit(sim::request(i, &job, name), tx)?;
        streams.push(rx);
    }
    let mut sample = Sample::default();
    let snapshot = || times.map(OpTimes::snapshot).unwrap_or_default();
    let s0 = snapshot();
    let (n, dt) = timed_step(engine, None)?;
    anyhow::ensure!(
        n == BATCH * prompt_len,
        "the prefill step computed {n} tokens, expected {}",
        BATCH * prompt_len
    );
    sample.prefill_s = dt;
    let s1 = snapshot();
    sample.prefill_ops = s1.since(&s0);
    for _ in 0..decode_steps {
        let (n, dt) = timed_step(engine, None)?;
        anyhow::ensure!(
            n == BATCH,
            "a decode step computed {n} tokens, expected {BATCH}"
        );
        sample.decode_s.push(dt);
    }
    sample.decode_ops = snapshot().since(&s1);
    while engine.has_work() {
        engine.step()?;
    }
    drop(streams);
    Ok(sample)
}

/// The batch shape of a run.
#[derive(Debug, Clone, Copy)]
struct Shape {
    prompt_len: usize,
    decode_steps: usize,
    repeats: usize,
}

/// The discarded cold batch and the interleaved repeats of both modes.
struct Measured {
    cold: Sample,
    lora: Vec<Sample>,
    base: Vec<Sample>,
}

/// Loads the model and adapters on `backend`, warms up, then runs the repeats, adapters and
/// base interleaved. `times` is the timing wrapper's counters (CPU only).
fn measure<B: Backend>(
    ctx: &mut Ctx,
    backend: B,
    times: Option<&OpTimes>,
    dir: &std::path::Path,
    engine_config: EngineConfig,
    defs: &[AdapterDef],
    shape: Shape,
) -> anyhow::Result<Measured> {
    let Shape {
        prompt_len,
        decode_steps,
        repeats,
    } = shape;
    ctx.progress.update("loading the model and adapters");
    let mut engine = setup::engine(backend, &mut ctx.fixtures, dir, engine_config, defs)?;
    // Warm-up (discarded): the first adapter batch also copies every adapter into the pool.
    ctx.progress.update("warm-up (adapters become resident)");
    let cold = run_batch(&mut engine, times, Some(defs), prompt_len, decode_steps, 1)?;
    run_batch(&mut engine, times, None, prompt_len, decode_steps, 1)?;
    let (mut lora, mut base) = (Vec::new(), Vec::new());
    for r in 0..repeats {
        ctx.progress
            .update(format!("repeat {}/{repeats}: adapters, then base", r + 1));
        let seed = 100 + r as u64;
        lora.push(run_batch(
            &mut engine,
            times,
            Some(defs),
            prompt_len,
            decode_steps,
            seed,
        )?);
        base.push(run_batch(
            &mut engine,
            times,
            None,
            prompt_len,
            decode_steps,
            seed,
        )?);
    }
    Ok(Measured { cold, lora, base })
}

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let dir = ctx.fixtures.model()?;
    let config = setup::model_config(&dir)?;
    let ranks = if ctx.workload.ranks.is_empty() {
        vec![8, 16, 32, 64]
    } else {
        ctx.workload.ranks.clone()
    };
    let prompt_len = ctx
        .workload
        .prompt_len
        .map_or_else(|| if ctx.tiny() { 16 } else { ctx.pick(8, 32) }, |r| r.0);
    let decode_steps = ctx.pick(4, 8);
    let repeats = ctx.repeats(2, 5);
    ctx.progress.update(format!(
        "writing {BATCH} adapters (ranks {ranks:?}, all modules)"
    ));
    let defs = setup::adapter_defs(&ctx.fixtures, BATCH, &ranks, &Module::ALL, 16)?;
    let hosts = setup::hosts_of(&mut ctx.fixtures, &config, &defs)?;
    let kv_tokens = BATCH * (prompt_len + decode_steps + 2 * 16);
    let engine_config = EngineConfig {
        num_pages: setup::pool_pages(&config, 16, &hosts, kv_tokens)?,
        max_running: BATCH,
        max_batch_tokens: BATCH * prompt_len,
        max_prefill_chunk: prompt_len,
        ..EngineConfig::default()
    };
    let shape = Shape {
        prompt_len,
        decode_steps,
        repeats,
    };
    // On the CPU: a timing wrapper of the backend (per-operation profile) and the machine's read
    // bandwidth, to bound what a bandwidth-bound LoRA path could reach. On a GPU: step times.
    let mut copy = None;
    let (measured, peaks) = if ctx.device == Device::Cpu {
        // The LoRA path's own roofline: decode reads adapter bytes at the machine's stream
        // bandwidth, prefill does LoRA FLOPs at its GEMM peak (the serving suite's figures).
        let peaks = crate::suites::roofline::measure_machine(ctx)?;
        let backend = TimedCpu::new();
        let times = backend.times.clone();
        let m = measure(
            ctx,
            backend,
            Some(&times),
            &dir,
            engine_config,
            &defs,
            shape,
        )?;
        (m, Some(peaks))
    } else {
        struct OnDevice<'a> {
            ctx: &'a mut Ctx,
            dir: &'a std::path::Path,
            config: EngineConfig,
            defs: &'a [AdapterDef],
            shape: Shape,
        }
        impl WithBackend for OnDevice<'_> {
            type Output = anyhow::Result<Measured>;
            fn run<B: Backend>(self, backend: B) -> Self::Output {
                measure(
                    self.ctx,
                    backend,
                    None,
                    self.dir,
                    self.config,
                    self.defs,
                    self.shape,
                )
            }
        }
        ctx.progress
            .update(format!("{}: device-to-device copy bandwidth", ctx.device));
        // Measured before the model is loaded, on a device opened for it alone; a failure
        // here is reported and the ratios are still measured.
        copy = Some(copy_bandwidth(ctx.device, COPY_BYTES, COPY_ROUNDS));
        ctx.progress.update(format!("opening {}", ctx.device));
        let (device, dtype) = (ctx.device, ctx.dtype);
        let job = OnDevice {
            ctx,
            dir: &dir,
            config: engine_config,
            defs: &defs,
            shape,
        };
        (with_backend(device, dtype, job)??, None)
    };
    let Measured { cold, lora, base } = measured;

    let prefill_tokens = (BATCH * prompt_len) as f64;
    let decode_t =
        |s: &[Sample]| Summary::of(&s.iter().map(|x| median(&x.decode_s)).collect::<Vec<_>>());
    let prefill_t = |s: &[Sample]| Summary::of(&s.iter().map(|x| x.prefill_s).collect::<Vec<_>>());
    let (ld, bd) = (decode_t(&lora), decode_t(&base));
    let (lp, bp) = (prefill_t(&lora), prefill_t(&base));
    let ratio = |l: &[Sample], b: &[Sample], f: &dyn Fn(&Sample) -> f64| {
        Summary::of(
            &l.iter()
                .zip(b)
                .map(|(l, b)| f(b) / f(l))
                .collect::<Vec<_>>(),
        )
    };
    let decode_ratio = ratio(&lora, &base, &|s| median(&s.decode_s));
    let prefill_ratio = ratio(&lora, &base, &|s| s.prefill_s);

    let mut report = Report::new(
        "hetero",
        "Heterogeneous batching: 64 requests on 64 adapters vs the base model",
    );
    let goal = "≥ 0.80 of the no-adapter tokens/s";
    let measured = |r: &Summary| format!("{:.3} (range {:.3}–{:.3})", r.median, r.min, r.max);
    report.targets.push(Target::at_least(
        "LoRA overhead ratio, decode step",
        goal,
        decode_ratio.median,
        0.80,
        measured(&decode_ratio),
    ));
    report.targets.push(Target::at_least(
        "LoRA overhead ratio, prefill step",
        goal,
        prefill_ratio.median,
        0.80,
        measured(&prefill_ratio),
    ));

    let tps = |t: &Summary, tokens: f64| t.map(|s| tokens / s);
    let mut table = Table::new(
        "Tokens/s (median of the repeats, range)",
        &[
            "step",
            "base model",
            "64 adapters",
            "ratio",
            "step time base",
            "step time adapters",
        ],
    );
    for (name, b, l, r, tokens) in [
        ("decode (64 tokens)", &bd, &ld, &decode_ratio, BATCH as f64),
        (
            "prefill (all prompts)",
            &bp,
            &lp,
            &prefill_ratio,
            prefill_tokens,
        ),
    ] {
        let (bt, lt) = (tps(b, tokens), tps(l, tokens));
        table.row(vec![
            name.to_owned(),
            format!(
                "{} ({}–{})",
                format_num(bt.median),
                format_num(bt.min),
                format_num(bt.max)
            ),
            format!(
                "{} ({}–{})",
                format_num(lt.median),
                format_num(lt.min),
                format_num(lt.max)
            ),
            format!("{:.3}", r.median),
            format!("{:.1} ms", b.median * 1e3),
            format!("{:.1} ms", l.median * 1e3),
        ]);
    }
    report.tables.push(table);

    // Bytes a decode step must read: base weights once, and every request's own adapter.
    let base_bytes = (0..config.num_layers)
        .map(|_| {
            Module::ALL
                .iter()
                .map(|m| {
                    let (i, o) = config.module_shape(*m);
                    i * o
                })
                .sum::<usize>()
        })
        .sum::<usize>()
        * 4
        + config.vocab_size * config.hidden_size * 4;
    let adapter_bytes: usize = hosts.iter().map(|h| h.bytes).sum();
    match &peaks {
        Some(peaks) => cpu_profile(
            &mut report,
            &Profiled {
                lora: &lora,
                base: &base,
                cold: &cold,
                base_step: bd.median,
                base_bytes,
                adapter_bytes,
                bandwidth: peaks.read_gbps * 1e9,
                gemm_peak: peaks.gemm_gflops * 1e9,
                prompt_len,
            },
        ),
        None => report.findings.push(format!(
            "Cold start (first batch, discarded) on {}: prefill {:.1} ms with adapters, \
             including copying the 64 adapters into pool pages.",
            ctx.device,
            cold.prefill_s * 1e3
        )),
    }

    let bars = |b: &Summary, l: &Summary, tokens: f64| {
        let (bt, lt) = (tps(b, tokens), tps(l, tokens));
        vec![
            Bar {
                label: "base model".into(),
                value: bt.median,
                range: Some((bt.min, bt.max)),
                color: 0,
            },
            Bar {
                label: "64 adapters".into(),
                value: lt.median,
                range: Some((lt.min, lt.max)),
                color: 1,
            },
        ]
    };
    report.plots.push(Plot {
        file: "hetero-decode.png".into(),
        title: format!("Decode step, batch of {BATCH}: tokens/s"),
        x_label: String::new(),
        y_label: "tokens/s".into(),
        kind: PlotKind::Bars {
            bars: bars(&bd, &ld, BATCH as f64),
        },
    });
    report.plots.push(Plot {
        file: "hetero-prefill.png".into(),
        title: format!("Prefill step, {BATCH} × {prompt_len} tokens: tokens/s"),
        x_label: String::new(),
        y_label: "tokens/s".into(),
        kind: PlotKind::Bars {
            bars: bars(&bp, &lp, prefill_tokens),
        },
    });
    report.method = vec![
        format!(
            "Model: the `{}` fixture ({} layers, hidden {}, vocab {}). Adapters: {BATCH} adapters, \
             ranks {ranks:?} cycled, on all seven linear modules (q, k, v, o, gate, up, down), \
             registered as {BATCH} distinct adapters (own host-cache entry and pool pages) over \
             16 distinct weight files. Batch: {BATCH} requests, prompt {prompt_len} tokens each, \
             request i on adapter i; the baseline is the same prompts without adapters.",
            format!("{:?}", ctx.preset).to_lowercase(),
            config.num_layers,
            config.hidden_size,
            config.vocab_size
        ),
        format!(
            "Steps: the engine's token budget is {BATCH}×{prompt_len}, so one prefill step \
             computes every prompt; then {decode_steps} decode steps of {BATCH} tokens each \
             (median per repeat). {repeats} repeats, adapters and base interleaved after one \
             discarded warm-up of each (which makes the adapters pool-resident, as in steady \
             state). Ratio = base step time ÷ adapter step time per repeat; the table gives the \
             median and range over repeats."
        ),
        if ctx.device == Device::Cpu {
            "Profile: the engine runs on a timing wrapper of the CPU backend, which adds up the \
             wall time of every backend operation (base GEMM, LoRA shrink/expand, attention, KV \
             copies, the rest) and counts GEMM and LoRA multiply-adds."
                .to_owned()
        } else {
            format!(
                "Device: {} with {:?} GEMM weights; step times are wall times of whole engine \
                 steps (each ends by reading the sampled tokens back, so the GPU is idle at \
                 both ends). No per-operation profile on GPUs.",
                ctx.device, ctx.dtype
            )
        },
    ];
    report.data = json!({
        "device": ctx.device.to_string(),
        "batch": BATCH,
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
        "ranks": ranks,
        "decode_ratio": decode_ratio,
        "prefill_ratio": prefill_ratio,
        "decode_step_s": {"base": bd, "adapters": ld},
        "prefill_step_s": {"base": bp, "adapters": lp},
        "base_weight_bytes": base_bytes,
        "read_bandwidth_bps": peaks.as_ref().map(|p| p.read_gbps * 1e9),
        "gemm_peak_gflops": peaks.as_ref().map(|p| p.gemm_gflops),
        "adapter_bytes_per_decode_step": adapter_bytes,
        "samples": {"base": base, "adapters": lora, "cold_adapters": cold},
    });
    match copy {
        None => {}
        Some(Ok(copy)) => {
            let base = device_roofline::decode_step_bytes(
                &config,
                ctx.dtype,
                BATCH,
                prompt_len,
                decode_steps,
                0,
            );
            let roofline = device_roofline::DecodeRoofline {
                base,
                with_adapters: device_roofline::StepBytes {
                    adapters: adapter_bytes,
                    ..base
                },
                base_step: bd.median,
                adapter_step: ld.median,
                copy,
            };
            let value = device_roofline::add(&mut report, &ctx.device.to_string(), &roofline);
            if let Some(data) = report.data.as_object_mut() {
                data.insert("decode_roofline".to_owned(), value);
            }
        }
        Some(Err(e)) => report.findings.push(format!(
            "The device-to-device copy bandwidth of {} could not be measured ({e}), so the \
             decode step is not read against it.",
            ctx.device
        )),
    }
    Ok(report)
}

/// What the CPU's per-operation profile is read against.
struct Profiled<'a> {
    lora: &'a [Sample],
    base: &'a [Sample],
    cold: &'a Sample,
    base_step: f64,
    base_bytes: usize,
    adapter_bytes: usize,
    bandwidth: f64,
    /// FLOP/s.
    gemm_peak: f64,
    prompt_len: usize,
}

/// The timing wrapper's breakdown (table, plot) and what it explains (findings): CPU only.
fn cpu_profile(report: &mut Report, p: &Profiled<'_>) {
    let Profiled {
        lora,
        base,
        cold,
        base_step,
        base_bytes,
        adapter_bytes,
        bandwidth,
        gemm_peak,
        prompt_len,
    } = *p;
    // Where the time goes: per-op time of one step, averaged over the repeats.
    let per_step = |s: &[Sample], decode: bool| {
        let mut acc = [0.0; 5];
        for x in s {
            let (ops, steps) = if decode {
                (&x.decode_ops, x.decode_s.len().max(1) as f64)
            } else {
                (&x.prefill_ops, 1.0)
            };
            for op in Op::ALL {
                acc[op as usize] += ops.get(op) / steps / s.len() as f64;
            }
        }
        acc
    };
    let (bdo, ldo, bpo, lpo) = (
        per_step(base, true),
        per_step(lora, true),
        per_step(base, false),
        per_step(lora, false),
    );
    let mut breakdown = Table::new(
        "Where a step's time goes (ms per step, timed backend)",
        &[
            "operation",
            "decode base",
            "decode adapters",
            "prefill base",
            "prefill adapters",
        ],
    );
    for op in Op::ALL {
        let i = op as usize;
        breakdown.row(vec![
            op.name().to_owned(),
            format!("{:.2}", bdo[i] * 1e3),
            format!("{:.2}", ldo[i] * 1e3),
            format!("{:.2}", bpo[i] * 1e3),
            format!("{:.2}", lpo[i] * 1e3),
        ]);
    }
    report.tables.push(breakdown);

    let lora_share = ldo[Op::Lora as usize] / ldo.iter().sum::<f64>().max(1e-12);
    let lora_flops = lora.iter().map(|s| s.decode_ops.lora_flops).sum::<f64>();
    let gemm_flops = lora.iter().map(|s| s.decode_ops.gemm_flops).sum::<f64>();
    let lora_decode = ldo[Op::Lora as usize];
    // A LoRA path that read every adapter byte at the machine's stream bandwidth.
    let best_lora = adapter_bytes as f64 / bandwidth;
    report.findings.push(format!(
        "Decode with adapters: the LoRA path takes {:.1} ms of a {:.1} ms step ({:.0} %), \
         against {:.1} ms for the base GEMMs, though it does only {:.1} % of their arithmetic. \
         Every one of the 64 requests reads its own adapter: {} MB of adapter weights per step \
         against {} MB of base weights ({:.2}×), so the LoRA path is a read stream — it moves \
         them at {:.1} GB/s, {:.0} % of the {:.1} GB/s this machine streams. Even at the full \
         stream bandwidth the path would take {:.1} ms, capping the ratio at {:.2} for this \
         adapter mix ({:.1} ms base step); ≥ 0.80 needs adapters that together weigh less than \
         about a quarter of the base step's time in bandwidth, i.e. smaller ranks, fewer \
         modules, or requests sharing adapters.",
        lora_decode * 1e3,
        ldo.iter().sum::<f64>() * 1e3,
        lora_share * 100.0,
        ldo[Op::Gemm as usize] * 1e3,
        100.0 * lora_flops / gemm_flops.max(1.0),
        format_num(adapter_bytes as f64 / 1e6),
        format_num(base_bytes as f64 / 1e6),
        adapter_bytes as f64 / base_bytes as f64,
        adapter_bytes as f64 / lora_decode.max(1e-12) / 1e9,
        100.0 * adapter_bytes as f64 / lora_decode.max(1e-12) / bandwidth,
        bandwidth / 1e9,
        best_lora * 1e3,
        base_step / (base_step + best_lora),
        base_step * 1e3,
    ));
    let prefill_lora_flops = lora.iter().map(|s| s.prefill_ops.lora_flops).sum::<f64>();
    let prefill_gemm_flops = lora.iter().map(|s| s.prefill_ops.gemm_flops).sum::<f64>();
    let n = lora.len().max(1) as f64;
    // The LoRA path against its own roofline (docs/performance-targets.md §2.2): decode is a
    // read stream of every request's adapter, prefill is arithmetic.
    let decode_bound = best_lora / lora_decode.max(1e-12);
    let prefill_lora = lpo[Op::Lora as usize];
    let prefill_bound = prefill_lora_flops / n / gemm_peak / prefill_lora.max(1e-12);
    report.targets.push(Target::at_least(
        "LoRA path vs its roofline, decode",
        "≥ 70 % of adapter bytes ÷ stream bandwidth",
        decode_bound,
        0.70,
        format!(
            "{:.0} % ({:.2} ms measured, {:.2} ms at {} GB/s)",
            decode_bound * 100.0,
            lora_decode * 1e3,
            best_lora * 1e3,
            format_num(bandwidth / 1e9)
        ),
    ));
    report.targets.push(Target::at_least(
        "LoRA path vs its roofline, prefill",
        "≥ 50 % of LoRA FLOPs ÷ GEMM peak",
        prefill_bound,
        0.50,
        format!(
            "{:.0} % ({} of {} GFLOP/s)",
            prefill_bound * 100.0,
            format_num(prefill_lora_flops / n / prefill_lora.max(1e-12) / 1e9),
            format_num(gemm_peak / 1e9)
        ),
    ));
    report.findings.push(format!(
        "Prefill with adapters: LoRA {:.1} ms of {:.1} ms ({:.0} %); base GEMMs {:.1} ms. The \
         LoRA path does {:.1} % of the base GEMMs' arithmetic and runs at {} GFLOP/s against \
         their {} GFLOP/s: each segment of {prompt_len} tokens on one adapter is a small GEMM \
         (MBGMM: shrink as tiles of dot products over A in place; expand as the base GEMM's \
         tiles over Bᵀ copied into panels), whose rank-wide shapes (8–64 columns or depth) keep \
         it below the square-matrix peak.",
        lpo[Op::Lora as usize] * 1e3,
        lpo.iter().sum::<f64>() * 1e3,
        100.0 * lpo[Op::Lora as usize] / lpo.iter().sum::<f64>().max(1e-12),
        lpo[Op::Gemm as usize] * 1e3,
        100.0 * prefill_lora_flops / prefill_gemm_flops.max(1.0),
        format_num(prefill_lora_flops / n / lpo[Op::Lora as usize].max(1e-12) / 1e9),
        format_num(prefill_gemm_flops / n / lpo[Op::Gemm as usize].max(1e-12) / 1e9),
    ));
    report.findings.push(format!(
        "Cold start (first batch, discarded): prefill {:.1} ms with adapters, including {:.1} ms \
         copying the 64 adapters into pool pages.",
        cold.prefill_s * 1e3,
        cold.prefill_ops.get(Op::KvCopy) * 1e3
    ));

    let ops_of = |a: &[f64; 5]| Op::ALL.iter().map(|op| a[*op as usize] * 1e3).collect();
    report.plots.push(Plot {
        file: "hetero-breakdown.png".into(),
        title: "Decode step time by operation".into(),
        x_label: String::new(),
        y_label: "ms per step".into(),
        kind: PlotKind::Groups {
            groups: Op::ALL.iter().map(|op| op.name().to_owned()).collect(),
            series: vec![
                GroupSeries {
                    name: "base model".into(),
                    values: ops_of(&bdo),
                },
                GroupSeries {
                    name: "64 adapters".into(),
                    values: ops_of(&ldo),
                },
            ],
        },
    });
}
