//! `bench roofline`: the machine's measured GEMM peak (the best of candle's matmul and the CPU
//! backend's packed GEMM on large square f32 matrices) and memory bandwidth (a parallel read stream and a parallel copy), against what the
//! model's steps achieve: the GEMM path of a prefill step as a fraction of the GEMM peak
//! (target ≥ 50 %), and each decode step against its roofline time
//! `max(bytes read / bandwidth, flops / peak)` (a GPU target: docs/performance-targets.md §2.4).

use std::time::Instant;

use candle_core::{Device, Tensor};
use loraplane_kernels::cpu::{PackedMatrix, gemm_packed};
use rayon::prelude::*;
use serde_json::json;

use loraplane_agent::engine::{EngineConfig, Event};
use loraplane_agent::lora::Module;
use loraplane_agent::model::config::ModelConfig;
use loraplane_agent::rng::SplitMix64;

use crate::suites::Ctx;
use crate::suites::report::{Bar, Plot, PlotKind, Report, Series, Table, Target, format_num};
use crate::suites::setup;
use crate::suites::sim::{self, timed_step};
use crate::suites::stats::Summary;
use crate::suites::timed::{Op, TimedCpu};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_signed()).collect()
}

fn tensor(rows: usize, cols: usize, seed: u64) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_vec(
        random(rows * cols, seed),
        (rows, cols),
        &Device::Cpu,
    )?)
}

/// GFLOP/s of `x · w` over `repeats` timed runs after one warm-up.
fn matmul_gflops(x: &Tensor, w: &Tensor, repeats: usize) -> anyhow::Result<Summary> {
    let (m, k) = x.dims2()?;
    let n = w.dims2()?.1;
    let flops = 2.0 * (m * k * n) as f64;
    x.matmul(w)?;
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let y = x.matmul(w)?;
        let dt = t.elapsed().as_secs_f64();
        drop(y);
        rates.push(flops / dt / 1e9);
    }
    Ok(Summary::of(&rates))
}

/// GFLOP/s of the CPU backend's own GEMM (weights packed once) for `[m, k] · ([n, k])ᵀ`, over
/// `repeats` timed runs after one warm-up.
fn packed_gflops(m: usize, k: usize, n: usize, repeats: usize) -> anyhow::Result<Summary> {
    let x = random(m * k, 6);
    let w = PackedMatrix::pack(&random(n * k, 7), n, k)?;
    let mut y = vec![0.0f32; m * n];
    let flops = 2.0 * (m * k * n) as f64;
    gemm_packed(&x, &w, &mut y)?;
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        gemm_packed(&x, &w, &mut y)?;
        rates.push(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(Summary::of(&rates))
}

/// Read bandwidth (GB/s): every core sums its share of a large buffer (an optimised kernel, so
/// the figure holds in debug builds too).
fn read_bandwidth(buf: &[f32], repeats: usize) -> Summary {
    let bytes = size_of_val(buf) as f64;
    let mut rates = Vec::new();
    let mut sink = 0.0f32;
    for r in 0..=repeats {
        let t = Instant::now();
        sink += loraplane_kernels::cpu::stream_sum(buf);
        let dt = t.elapsed().as_secs_f64();
        if r > 0 {
            rates.push(bytes / dt / 1e9);
        }
    }
    std::hint::black_box(sink);
    Summary::of(&rates)
}

/// Copy bandwidth (GB/s, bytes read plus bytes written), every core copying its share.
fn copy_bandwidth(src: &[f32], dst: &mut [f32], repeats: usize) -> Summary {
    let bytes = 2.0 * size_of_val(src) as f64;
    let mut rates = Vec::new();
    for r in 0..=repeats {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        let dt = t.elapsed().as_secs_f64();
        if r > 0 {
            rates.push(bytes / dt / 1e9);
        }
    }
    std::hint::black_box(&dst);
    Summary::of(&rates)
}

/// Bytes of weights a forward step reads: every linear layer, the norms, and the LM head.
pub(crate) fn weight_bytes(c: &ModelConfig) -> usize {
    let per_layer: usize = Module::ALL
        .iter()
        .map(|m| {
            let (i, o) = c.module_shape(*m);
            i * o
        })
        .sum::<usize>()
        + 2 * c.hidden_size;
    4 * (c.num_layers * per_layer + c.hidden_size + c.vocab_size * c.hidden_size)
}

/// Multiply-adds ×2 of a decode step of `batch` rows at context `ctx` (GEMMs and attention).
fn decode_flops(c: &ModelConfig, batch: usize, context: usize) -> f64 {
    let gemm = (weight_bytes(c) / 4) as f64 * 2.0 * batch as f64;
    let attn = 4.0 * (c.num_layers * c.num_heads * c.head_dim * context * batch) as f64;
    gemm + attn
}

/// The machine's peaks as other suites' rooflines use them: the best GEMM run and the best
/// read-stream run, measured the way this suite measures them.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct MachinePeaks {
    pub gemm_gflops: f64,
    pub gemm_shape: String,
    pub read_gbps: f64,
    pub gemm_runs: Summary,
    pub read_runs: Summary,
}

/// Measures [`MachinePeaks`] (square f32 matmuls in both layouts, candle's and the backend's packed
/// GEMM, the best of them; a read stream over every core), a few seconds.
pub(crate) fn measure_machine(ctx: &mut Ctx) -> anyhow::Result<MachinePeaks> {
    let repeats = ctx.repeats(3, 5);
    // `--quick --preset tiny` is the tests' smoke run: small sizes, a peak that means little.
    let smoke = ctx.quick && ctx.tiny();
    let sizes: &[usize] = match (smoke, ctx.quick) {
        (true, _) => &[256, 512],
        (false, true) => &[1024, 2048],
        (false, false) => &[1024, 2048, 4096],
    };
    let mut best: Option<(String, Summary)> = None;
    for &n in sizes {
        ctx.progress
            .update(format!("roofline: GEMM peak, {n}×{n} f32 matmul"));
        let (a, b) = (tensor(n, n, 1)?, tensor(n, n, 2)?);
        for (shape, s) in [
            (format!("{n}×{n}·{n}×{n}"), matmul_gflops(&a, &b, repeats)?),
            (
                format!("{n}×{n}·({n}×{n})ᵀ"),
                matmul_gflops(&a, &b.t()?, repeats)?,
            ),
            // The backend's own GEMM: where it beats the library, the machine can do that much.
            (
                format!("{n}×{n}·({n}×{n})ᵀ packed"),
                packed_gflops(n, n, n, repeats)?,
            ),
        ] {
            if best.as_ref().is_none_or(|(_, b)| s.max > b.max) {
                best = Some((shape, s));
            }
        }
    }
    let (gemm_shape, gemm_runs) = best.ok_or_else(|| anyhow::anyhow!("no GEMM measured"))?;
    let mib = match (smoke, ctx.tiny()) {
        (true, _) => 16,
        (false, true) => 64,
        (false, false) => ctx.pick(128, 512),
    };
    ctx.progress
        .update(format!("roofline: memory bandwidth, {mib} MiB read stream"));
    let read_runs = read_bandwidth(&random(mib << 18, 3), repeats);
    Ok(MachinePeaks {
        gemm_gflops: gemm_runs.max,
        gemm_shape,
        read_gbps: read_runs.max,
        gemm_runs,
        read_runs,
    })
}

struct DecodePoint {
    batch: usize,
    context: usize,
    step: Summary,
    bytes: f64,
    flops: f64,
    ops: [f64; 5],
}

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let repeats = ctx.repeats(3, 5);
    // The peak: the best of square matmuls of a few sizes (the GEMM library's best case).
    let sizes: Vec<usize> = if ctx.quick {
        vec![1024, 2048]
    } else {
        vec![1024, 2048, 4096]
    };
    let mut peaks = Vec::new();
    for &n in &sizes {
        ctx.progress
            .update(format!("GEMM peak: {n}×{n} f32 matmul"));
        let (a, b) = (tensor(n, n, 1)?, tensor(n, n, 2)?);
        peaks.push((format!("{n}×{n}·{n}×{n}"), matmul_gflops(&a, &b, repeats)?));
        // The layout the model's weights use: B a transposed view.
        let bt = b.t()?;
        peaks.push((
            format!("{n}×{n}·({n}×{n})ᵀ"),
            matmul_gflops(&a, &bt, repeats)?,
        ));
        peaks.push((
            format!("{n}×{n}·({n}×{n})ᵀ packed (the backend's GEMM)"),
            packed_gflops(n, n, n, repeats)?,
        ));
    }

    let mib = if ctx.tiny() { 64 } else { ctx.pick(128, 512) };
    ctx.progress
        .update(format!("memory bandwidth: {mib} MiB read stream and copy"));
    let src = random(mib << 18, 3);
    let read = read_bandwidth(&src, repeats);
    let mut dst = vec![0.0f32; src.len()];
    let copy = copy_bandwidth(&src, &mut dst, repeats);
    drop((src, dst));
    let bw = read.max;

    // The model.
    let dir = ctx.fixtures.model()?;
    let config = setup::model_config(&dir)?;
    let prefill_tokens = if ctx.tiny() { 256 } else { ctx.pick(256, 512) };
    let batches: Vec<usize> = if ctx.quick {
        vec![1, 8]
    } else {
        vec![1, 8, 32]
    };
    let context = ctx.pick(32, 64);
    let decode_steps = ctx.pick(4, 8);
    let backend = TimedCpu::new();
    let times = backend.times.clone();
    let engine_config = EngineConfig {
        num_pages: setup::pool_pages(
            &config,
            16,
            &[],
            prefill_tokens + 32 * (context + decode_steps + 32),
        )?,
        max_batch_tokens: prefill_tokens,
        max_prefill_chunk: prefill_tokens,
        max_running: 64,
        ..EngineConfig::default()
    };
    ctx.progress.update("loading the model");
    let mut engine = setup::engine(backend, &mut ctx.fixtures, &dir, engine_config, &[])?;
    let vocab = config.vocab_size;
    let submit = |engine: &mut loraplane_agent::engine::Engine<TimedCpu>,
                  count: usize,
                  len: usize,
                  max_tokens: usize,
                  seed: u64|
     -> anyhow::Result<Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>> {
        let mut rng = SplitMix64::new(seed);
        let mut rx = Vec::new();
        for i in 0..count {
            let job = sim::Job {
                arrival: 0.0,
                adapter: None,
                prompt: (0..len).map(|_| rng.below(vocab - 16) as u32).collect(),
                max_tokens,
                long: false,
            };
            let (tx, r) = tokio::sync::mpsc::unbounded_channel();
            engine.submit(sim::request(i, &job, None), tx)?;
            rx.push(r);
        }
        Ok(rx)
    };

    // GEMM path: the linear layers of one prefill step of `prefill_tokens` tokens.
    let mut gemm_rates = Vec::new();
    let mut prefill_ops = [0.0; 5];
    for r in 0..=repeats {
        ctx.progress.update(format!(
            "prefill step of {prefill_tokens} tokens ({r}/{repeats})"
        ));
        let _rx = submit(&mut engine, 1, prefill_tokens, 1, 10 + r as u64)?;
        let s0 = times.snapshot();
        timed_step(&mut engine, None)?;
        let ops = times.snapshot().since(&s0);
        while engine.has_work() {
            engine.step()?;
        }
        if r > 0 {
            gemm_rates.push(ops.gemm_flops / ops.get(Op::Gemm) / 1e9);
            for op in Op::ALL {
                prefill_ops[op as usize] += ops.get(op) / repeats as f64;
            }
        }
    }
    let gemm_path = Summary::of(&gemm_rates);
    // The same shape on bare candle (no copies in and out of the backend's tensors).
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let x = tensor(prefill_tokens, h, 4)?;
    let w = tensor(i, h, 5)?.t()?;
    let bare = matmul_gflops(&x, &w, repeats)?;
    peaks.push((
        format!("{prefill_tokens}×{h}·({i}×{h})ᵀ (layer shape)"),
        bare,
    ));
    peaks.push((
        format!("{prefill_tokens}×{h}·({i}×{h})ᵀ packed (layer shape, the backend's GEMM)"),
        packed_gflops(prefill_tokens, h, i, repeats)?,
    ));
    // The peak: the best rate any GEMM (candle's or the backend's) reached on any shape
    // measured in this run.
    let (best_shape, peak) = peaks
        .iter()
        .cloned()
        .max_by(|a, b| a.1.max.total_cmp(&b.1.max))
        .ok_or_else(|| anyhow::anyhow!("no GEMM measured"))?;
    let peak_gflops = peak.max;

    // Decode steps against their roofline.
    let mut points = Vec::new();
    for &batch in &batches {
        ctx.progress
            .update(format!("decode steps at batch {batch}, context {context}"));
        let _rx = submit(
            &mut engine,
            batch,
            context,
            decode_steps + 2,
            20 + batch as u64,
        )?;
        // Prefill (possibly several steps) until every sequence decodes.
        loop {
            let (n, _) = timed_step(&mut engine, None)?;
            if n == batch {
                break;
            }
        }
        let s0 = times.snapshot();
        let mut steps = Vec::new();
        for _ in 0..decode_steps {
            let (n, dt) = timed_step(&mut engine, None)?;
            if n != batch {
                break;
            }
            steps.push(dt);
        }
        let ops_total = times.snapshot().since(&s0);
        while engine.has_work() {
            engine.step()?;
        }
        let mean_ctx = context + 1 + steps.len() / 2;
        let kv_bytes = 2 * config.num_layers * config.kv_dim() * mean_ctx * batch * 4;
        let mut ops = [0.0; 5];
        for op in Op::ALL {
            ops[op as usize] = ops_total.get(op) / steps.len().max(1) as f64;
        }
        points.push(DecodePoint {
            batch,
            context: mean_ctx,
            step: Summary::of(&steps),
            bytes: (weight_bytes(&config) + kv_bytes) as f64,
            flops: decode_flops(&config, batch, mean_ctx),
            ops,
        });
    }

    let roofline_s = |p: &DecodePoint| (p.bytes / (bw * 1e9)).max(p.flops / (peak_gflops * 1e9));
    let mut report = Report::new(
        "roofline",
        "Roofline: GEMM peak, memory bandwidth, and the model's steps",
    );
    let gemm_fraction = gemm_path.median / peak_gflops;
    report.targets.push(
        Target::at_least(
            "CPU GEMM path vs measured GEMM peak",
            "≥ 50 % of the measured GEMM peak",
            gemm_fraction,
            0.50,
            format!(
                "{:.0} % ({} of {} GFLOP/s)",
                gemm_fraction * 100.0,
                format_num(gemm_path.median),
                format_num(peak_gflops)
            ),
        )
        .note(format!(
            "the base GEMMs of a {prefill_tokens}-token prefill step, timed inside the engine \
             (the backend's packed GEMM on weights packed at load)"
        )),
    );
    if let Some(p) = points.first() {
        let f = roofline_s(p) / p.step.median;
        let mut t = Target::at_least(
            "Decode step vs memory-bandwidth roofline (batch 1)",
            "≥ 60 % of the roofline (GPU target)",
            f,
            0.60,
            format!(
                "{:.0} % ({:.2} ms measured, {:.2} ms roofline)",
                f * 100.0,
                p.step.median * 1e3,
                roofline_s(p) * 1e3
            ),
        );
        t = t.note("a GPU target (docs/performance-targets.md §2.4); the CPU backend's figure");
        report.targets.push(t);
    }

    let mut machine = Table::new(
        "Machine (measured in this run)",
        &["figure", "median", "best", "range"],
    );
    for (m, p) in &peaks {
        machine.row(vec![
            format!("GEMM f32 {m} (GFLOP/s)"),
            format_num(p.median),
            format_num(p.max),
            format!("{}–{}", format_num(p.min), format_num(p.max)),
        ]);
    }
    machine.row(vec![
        format!("read stream {mib} MiB, all cores (GB/s)"),
        format_num(read.median),
        format_num(read.max),
        format!("{}–{}", format_num(read.min), format_num(read.max)),
    ]);
    machine.row(vec![
        format!("copy {mib} MiB, all cores (GB/s, read + write)"),
        format_num(copy.median),
        format_num(copy.max),
        format!("{}–{}", format_num(copy.min), format_num(copy.max)),
    ]);
    machine.row(vec![
        format!("engine GEMM path, prefill {prefill_tokens} tokens (GFLOP/s)"),
        format_num(gemm_path.median),
        format_num(gemm_path.max),
        format!(
            "{}–{}",
            format_num(gemm_path.min),
            format_num(gemm_path.max)
        ),
    ]);
    report.tables.push(machine);

    let mut decode = Table::new(
        "Decode steps against the roofline",
        &[
            "batch",
            "context",
            "step (ms)",
            "MB read",
            "roofline (ms)",
            "achieved",
            "GEMM ms",
            "attention ms",
            "other ms",
        ],
    );
    for p in &points {
        decode.row(vec![
            p.batch.to_string(),
            p.context.to_string(),
            format!("{:.2}", p.step.median * 1e3),
            format!("{:.1}", p.bytes / 1e6),
            format!("{:.2}", roofline_s(p) * 1e3),
            format!("{:.0} %", 100.0 * roofline_s(p) / p.step.median),
            format!("{:.2}", p.ops[Op::Gemm as usize] * 1e3),
            format!("{:.2}", p.ops[Op::Attention as usize] * 1e3),
            format!(
                "{:.2}",
                (p.ops[Op::Other as usize] + p.ops[Op::KvCopy as usize]) * 1e3
            ),
        ]);
    }
    report.tables.push(decode);

    let prefill_total: f64 = prefill_ops.iter().sum();
    report.findings.push(format!(
        "Prefill step ({prefill_tokens} tokens, {:.1} ms timed): base GEMMs {:.0} %, attention \
         {:.0} %, KV writes {:.0} %, the rest {:.0} %. The engine's GEMM path (all layer \
         shapes, timed around the backend call) reaches {} GFLOP/s; bare candle reaches {} \
         GFLOP/s on the MLP's shape, and the run's peak is {} GFLOP/s ({best_shape}). The \
         engine's figure includes the smaller q/k/v/o shapes and the LM head.",
        prefill_total * 1e3,
        100.0 * prefill_ops[Op::Gemm as usize] / prefill_total.max(1e-12),
        100.0 * prefill_ops[Op::Attention as usize] / prefill_total.max(1e-12),
        100.0 * prefill_ops[Op::KvCopy as usize] / prefill_total.max(1e-12),
        100.0 * prefill_ops[Op::Other as usize] / prefill_total.max(1e-12),
        format_num(gemm_path.median),
        format_num(bare.median),
        format_num(peak_gflops),
    ));
    if let Some(p) = points.first() {
        let gemm_bw = weight_bytes(&config) as f64 / p.ops[Op::Gemm as usize].max(1e-12) / 1e9;
        report.findings.push(format!(
            "Decode at batch 1: the base GEMMs take {:.2} ms of {:.2} ms and stream the {:.0} MB \
             of weights at {:.1} GB/s, against {:.1} GB/s measured for a plain read stream; \
             the remaining {:.2} ms is per-operation work (attention, norms, RoPE, sampling, \
             scheduling) that does not scale with the weights.",
            p.ops[Op::Gemm as usize] * 1e3,
            p.step.median * 1e3,
            weight_bytes(&config) as f64 / 1e6,
            gemm_bw,
            bw,
            (p.step.median - p.ops[Op::Gemm as usize]) * 1e3,
        ));
    }

    report.plots.push(Plot {
        file: "roofline-gemm.png".into(),
        title: "GEMM throughput (GFLOP/s)".into(),
        x_label: String::new(),
        y_label: "GFLOP/s".into(),
        kind: PlotKind::Bars {
            bars: vec![
                Bar {
                    label: "peak".into(),
                    value: peak.max,
                    range: Some((peak.min, peak.max)),
                    color: 0,
                },
                Bar {
                    label: "bare candle, layer shape".into(),
                    value: bare.median,
                    range: Some((bare.min, bare.max)),
                    color: 2,
                },
                Bar {
                    label: "engine GEMM path".into(),
                    value: gemm_path.median,
                    range: Some((gemm_path.min, gemm_path.max)),
                    color: 1,
                },
            ],
        },
    });
    report.plots.push(Plot {
        file: "roofline-decode.png".into(),
        title: "Decode step time against the roofline".into(),
        x_label: "batch size".into(),
        y_label: "ms per step".into(),
        kind: PlotKind::Lines {
            series: vec![
                Series {
                    name: "measured".into(),
                    points: points
                        .iter()
                        .map(|p| (p.batch as f64, p.step.median * 1e3))
                        .collect(),
                },
                Series {
                    name: "roofline".into(),
                    points: points
                        .iter()
                        .map(|p| (p.batch as f64, roofline_s(p) * 1e3))
                        .collect(),
                },
            ],
            log_x: false,
        },
    });
    report.method = vec![
        format!(
            "GEMM peak: candle's f32 matmul (the `gemm` crate on every core) and the CPU \
             backend's packed GEMM on square random matrices of sizes {sizes:?} and the \
             prefill layer shape, {repeats} timed runs each after a warm-up; the best run of \
             any of them is the peak. Bandwidth: \
             a {mib} MiB buffer read by every core (sum) and copied by every core; the read \
             stream's best run is the roofline's bandwidth."
        ),
        format!(
            "GEMM path: one prefill step of {prefill_tokens} tokens through the engine on the \
             timing backend; GEMM flops (2·rows·in·out per linear layer) divided by the time in \
             the base linear layers. Decode: batches {batches:?} at context {context}, \
             {decode_steps} decode steps each (median). Bytes read per decode step = every \
             weight (linear layers, norms, LM head) + the KV cache read by attention; roofline \
             time = max(bytes / bandwidth, flops / peak)."
        ),
    ];
    report.data = json!({
        "gemm_peak_gflops": peak,
        "gemm_gflops": peaks.iter().map(|(n, p)| json!({"shape": n, "gflops": p})).collect::<Vec<_>>(),
        "gemm_peak_shape": best_shape,
        "read_gbps": read,
        "copy_gbps": copy,
        "engine_gemm_gflops": gemm_path,
        "bare_layer_gemm_gflops": bare,
        "prefill_ops_s": prefill_ops,
        "decode": points.iter().map(|p| json!({
            "batch": p.batch, "context": p.context, "step_s": p.step, "bytes": p.bytes,
            "flops": p.flops, "roofline_s": roofline_s(p), "ops_s": p.ops,
        })).collect::<Vec<_>>(),
        "weight_bytes": weight_bytes(&config),
    });
    Ok(report)
}
