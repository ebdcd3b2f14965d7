//! Measuring a step-cost profile: the real engine on this machine (the fixture model of
//! `--preset`, the CPU backend inside a rayon pool of `threads` threads: one device) runs
//! steps whose composition is known — prompts alone, then decode steps of batches at two
//! context lengths, with no adapter, one shared adapter and one adapter per sequence — and
//! [`StepCost::fit`] turns the timed steps into coefficients.

use std::time::Instant;

use tokio::sync::mpsc::unbounded_channel;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::core::kv_geometry;
use loraplane_agent::engine::{Engine, EngineConfig, Event};
use loraplane_agent::lora::Module;
use loraplane_agent::model::config::ModelConfig;

use super::cost::{AgentLimits, StepCost, StepShape};
use crate::suites::report::cpu_name;
use crate::suites::sim::{Job, request};
use crate::suites::{Ctx, setup};

/// The KV channel's bandwidth on the development machine (`bench kv-transfer`: gRPC over
/// loopback, 3,828 MB/s), for profiles measured here.
pub const DEFAULT_KV_BANDWIDTH: f64 = 3.8e9;

/// Floats of one rank of an adapter on every target module of every layer (A row + Bᵀ row).
pub fn adapter_floats_per_rank(c: &ModelConfig) -> usize {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h);
    per_layer * c.num_layers
}

/// The limits `serve` runs with by default (its flags' defaults), the pool at `pool_bytes`.
pub fn agent_limits(c: &ModelConfig, pool_bytes: u64) -> AgentLimits {
    let block_size = 16;
    let page_bytes = kv_geometry(c, block_size).page_elems as u64 * 4;
    AgentLimits {
        max_batch_tokens: 512,
        max_prefill_chunk: 512,
        max_running: 128,
        block_size,
        pool_pages: (pool_bytes / page_bytes).max(1) as usize,
    }
}

/// Measures a profile; `kv_bandwidth` is the KV channel's (bytes/s).
pub fn measure(
    ctx: &mut Ctx,
    threads: usize,
    kv_bandwidth: f64,
    pool_bytes: u64,
) -> anyhow::Result<(StepCost, Vec<(StepShape, f64)>)> {
    let dir = ctx.fixtures.model()?;
    let config = setup::model_config(&dir)?;
    let rank = 16;
    let adapters = if ctx.tiny() { 4 } else { 8 };
    let defs = setup::adapter_defs(&ctx.fixtures, adapters, &[rank], &Module::ALL, 16)?;
    let (short, long) = if ctx.tiny() { (16, 96) } else { (32, 128) };
    let limits = agent_limits(&config, pool_bytes);
    let engine_config = EngineConfig {
        num_pages: setup::pool_pages(
            &config,
            16,
            &setup::hosts_of(&mut ctx.fixtures, &config, &defs)?,
            adapters * (long + 16) * 2,
        )?,
        max_running: 64,
        max_batch_tokens: 4096,
        max_prefill_chunk: 4096,
        ..EngineConfig::default()
    };
    ctx.progress.update("calibrating: loading the engine");
    let mut engine = setup::engine(CpuBackend, &mut ctx.fixtures, &dir, engine_config, &defs)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let names: Vec<String> = defs.iter().map(|d| d.name.clone()).collect();
    let mut steps = Vec::new();
    let reps = ctx.pick(1, 2);
    // (sequences, prompt length, decode steps, adapter use: 0 none, 1 shared, 2 one each).
    let mut runs = Vec::new();
    for &len in &[short, long] {
        for &n in &[1usize, 2, adapters] {
            for use_ in 0..3 {
                if use_ == 2 && n == 1 {
                    continue;
                }
                runs.push((n, len, 4, use_));
            }
        }
    }
    runs.push((1, 2 * long, 1, 0));
    for rep in 0..reps {
        for (k, &(n, len, decodes, use_)) in runs.iter().enumerate() {
            ctx.progress.update(format!(
                "calibrating ({threads} thread(s)): round {}/{reps}, batch {}/{}",
                rep + 1,
                k + 1,
                runs.len()
            ));
            let adapter_of = |s: usize| match use_ {
                0 => None,
                1 => Some(0),
                _ => Some(s % adapters),
            };
            steps.extend(measure_batch(
                &mut engine,
                &pool,
                &names,
                (n, len, decodes),
                &adapter_of,
                rank,
                rep * 1000 + k,
            )?);
        }
    }
    let mut cost = StepCost {
        description: format!(
            "{} ({} thread(s)), fixture `{}`",
            cpu_name(),
            threads,
            ctx.fixtures.preset_name()
        ),
        layers: config.num_layers,
        kv_bytes_per_token: (2 * config.kv_dim() * config.num_layers * 4) as f64,
        page_floats: kv_geometry(&config, limits.block_size).page_elems,
        adapter_floats_per_rank: adapter_floats_per_rank(&config),
        kv_bandwidth_bytes_per_s: kv_bandwidth,
        kv_latency_s: 1e-3,
        limits,
        step_s: 0.0,
        prefill_token_s: 0.0,
        decode_seq_s: 0.0,
        attention_kilo_s: 0.0,
        adapter_s: 0.0,
        lora_kilo_rank_token_s: 0.0,
        fit_rel_rms: 0.0,
        fit_steps: 0,
    };
    cost.fit(&steps)?;
    cost.validate()?;
    Ok((cost, steps))
}

/// Runs `n` prompts of `len` tokens to completion with `decodes` tokens each, timing the
/// prefill step and every decode step.
fn measure_batch(
    engine: &mut Engine<CpuBackend>,
    pool: &rayon::ThreadPool,
    names: &[String],
    (n, len, decodes): (usize, usize, usize),
    adapter_of: &dyn Fn(usize) -> Option<usize>,
    rank: usize,
    seed: usize,
) -> anyhow::Result<Vec<(StepShape, f64)>> {
    let vocab = engine.model_config().vocab_size;
    let mut receivers = Vec::new();
    for s in 0..n {
        let job = Job {
            arrival: 0.0,
            adapter: adapter_of(s),
            prompt: (0..len)
                .map(|t| ((seed * 7919 + s * 131 + t * 17) % (vocab - 16)) as u32)
                .collect(),
            max_tokens: decodes + 1,
            long: false,
        };
        let (tx, rx) = unbounded_channel::<Event>();
        receivers.push(rx);
        let adapter = job.adapter.map(|a| names[a].clone());
        engine
            .submit(request(seed * 100 + s, &job, adapter), tx)
            .map_err(|e| anyhow::anyhow!("calibration request: {e}"))?;
    }
    let distinct = (0..n)
        .filter_map(adapter_of)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let mut out = Vec::new();
    for k in 0..=decodes {
        let t = Instant::now();
        let computed = pool.install(|| engine.step())?;
        let dt = t.elapsed().as_secs_f64();
        let mut shape = StepShape::default();
        for s in 0..n {
            let rank = adapter_of(s).map(|_| rank);
            if k == 0 {
                shape.add(len, 0, true, rank);
            } else {
                shape.add(1, len + k - 1, false, rank);
            }
        }
        shape.adapters = distinct as f64;
        let expect = if k == 0 { n * len } else { n };
        // A step that did not compute what was planned (the engine split it) is not a sample.
        if computed == expect {
            out.push((shape, dt));
        }
    }
    while engine.has_work() {
        pool.install(|| engine.step())?;
    }
    drop(receivers);
    Ok(out)
}
