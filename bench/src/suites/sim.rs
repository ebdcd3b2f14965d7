//! Serving workloads and the virtual-clock driver.
//!
//! Workloads: Poisson arrivals at a given rate, adapter popularity following a power law
//! (Zipf: the k-th most popular of n adapters is drawn with weight 1/k^α), prompt and output
//! lengths uniform in ranges — S-LoRA's synthetic workload. Each property draws from its own
//! seeded stream, so runs that differ only in adapter count or rate see the same prompts.
//!
//! Method (time): the engine runs for real, step by step, and a virtual clock advances by each
//! step's measured wall time; requests are submitted when the clock passes their arrival, and
//! an idle engine jumps the clock to the next arrival. Token events are stamped with the clock
//! at the end of the step that produced them. A run therefore costs only its compute time (no
//! sleeping through idle gaps), queueing is exact, and the schedule does not depend on how
//! fast the benchmark loop itself is. Extra work a baseline must do between steps (swapping
//! merged weights) is performed for real and charged to the clock the same way.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use loraplane_agent::backend::Backend;
use loraplane_agent::engine::{AdapterUse, Engine, Event, FinishReason, Request, SamplingParams};
use loraplane_agent::lora::host;
use loraplane_agent::lora::ids::TenantId;
use loraplane_agent::rng::SplitMix64;

use crate::suites::setup::TENANT;
use crate::suites::stats::percentile;

/// What a serving run offers the engine.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub requests: usize,
    /// Requests per second; infinite: every request arrives at time 0 (a closed batch).
    pub rate: f64,
    /// Adapters to draw from (0: every request uses the base model).
    pub adapters: usize,
    pub zipf_alpha: f64,
    pub prompt: (usize, usize),
    pub output: (usize, usize),
    /// Share of requests whose prompt is drawn from `long_prompt` instead.
    pub long_fraction: f64,
    pub long_prompt: (usize, usize),
    pub vocab: usize,
    pub seed: u64,
}

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct Job {
    /// Seconds after the start.
    pub arrival: f64,
    /// Index of the adapter (0 is the most popular).
    pub adapter: Option<usize>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub long: bool,
}

/// Uniform in [0, 1) with 53 bits.
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn uniform(rng: &mut SplitMix64, (lo, hi): (usize, usize)) -> usize {
    lo + rng.below(hi - lo + 1)
}

/// Draws adapter indices with probability proportional to 1/(k+1)^alpha.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, alpha: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += (k as f64).powf(-alpha);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = unit(rng) * total;
        self.cumulative
            .partition_point(|c| *c <= u)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

pub fn generate(spec: &WorkloadSpec) -> Vec<Job> {
    let stream = |k: u64| SplitMix64::new(spec.seed.wrapping_mul(0x9e37_79b9) ^ k);
    let (mut arrivals, mut lengths, mut picks, mut tokens) =
        (stream(1), stream(2), stream(3), stream(4));
    let zipf = Zipf::new(spec.adapters, spec.zipf_alpha);
    let mut t = 0.0;
    (0..spec.requests)
        .map(|_| {
            // Unit-rate exponential gaps scaled by the rate: the same arrival pattern at any rate.
            let gap = -(1.0 - unit(&mut arrivals)).ln();
            let arrival = if spec.rate.is_finite() {
                t += gap / spec.rate;
                t
            } else {
                0.0
            };
            let long = unit(&mut lengths) < spec.long_fraction;
            let len = uniform(
                &mut lengths,
                if long { spec.long_prompt } else { spec.prompt },
            );
            let max_tokens = uniform(&mut lengths, spec.output);
            let adapter = (spec.adapters > 0).then(|| zipf.sample(&mut picks));
            // Ordinary (non-special) token ids.
            let prompt = (0..len)
                .map(|_| tokens.below(spec.vocab.saturating_sub(16).max(1)) as u32)
                .collect();
            Job {
                arrival,
                adapter,
                prompt,
                max_tokens,
                long,
            }
        })
        .collect()
}

/// The engine request for a job.
pub fn request(id: usize, job: &Job, adapter: Option<String>) -> Request {
    Request {
        id: format!("r{id}"),
        tenant: TenantId(TENANT.to_owned()),
        adapters: adapter.into_iter().map(AdapterUse::plain).collect(),
        prompt: job.prompt.clone(),
        params: SamplingParams {
            max_tokens: job.max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    }
}

/// Latency targets a request must meet to count towards goodput.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Slo {
    pub ttft_s: f64,
    /// Bound on the request's mean inter-token gap (time per output token).
    pub itl_s: f64,
}

#[derive(Debug, Clone, Default)]
struct Rec {
    arrival: f64,
    first: Option<f64>,
    last: Option<f64>,
    tokens: usize,
    gaps: Vec<f64>,
    done: Option<f64>,
    failed: bool,
    long: bool,
}

/// Follows every request's events and stamps them with the virtual clock.
#[derive(Debug)]
pub struct Tracker {
    recs: Vec<Rec>,
    live: Vec<(usize, UnboundedReceiver<Event>)>,
}

/// Percentiles of a latency, seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Pcts {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Pcts {
    pub fn of(v: &[f64]) -> Pcts {
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        Pcts {
            p50: percentile(v, 50.0),
            p99: percentile(v, 99.0),
            mean,
        }
    }
}

/// What a run achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// First arrival to last completion (or to the horizon when the run was cut), seconds.
    pub makespan_s: f64,
    pub output_tokens: usize,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft: Pcts,
    pub itl: Pcts,
    pub slo_attainment: f64,
    /// Requests per second that met both SLOs (DistServe's goodput).
    pub goodput_rps: f64,
    /// Output tokens per second of the requests that met both SLOs.
    pub goodput_tps: f64,
    pub cut_at_horizon: bool,
}

impl Tracker {
    pub fn new(jobs: &[Job]) -> Self {
        Tracker {
            recs: jobs
                .iter()
                .map(|j| Rec {
                    arrival: j.arrival,
                    long: j.long,
                    ..Rec::default()
                })
                .collect(),
            live: Vec::new(),
        }
    }

    /// The event channel for job `i`'s request.
    pub fn channel(&mut self, i: usize) -> UnboundedSender<Event> {
        let (tx, rx) = unbounded_channel();
        self.live.push((i, rx));
        tx
    }

    pub fn fail(&mut self, i: usize) {
        self.recs[i].failed = true;
    }

    /// Stamps every event delivered since the last poll with `now`.
    pub fn poll(&mut self, now: f64) {
        let recs = &mut self.recs;
        self.live.retain_mut(|(i, rx)| {
            let rec = &mut recs[*i];
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Token { .. } => {
                        if let Some(last) = rec.last {
                            rec.gaps.push(now - last);
                        }
                        rec.first.get_or_insert(now);
                        rec.last = Some(now);
                        rec.tokens += 1;
                    }
                    Event::Finished { reason, .. } => {
                        rec.done = Some(now);
                        rec.failed =
                            matches!(reason, FinishReason::Error | FinishReason::Cancelled);
                        return false;
                    }
                }
            }
            true
        });
    }

    /// Jobs still in flight (submitted, not finished).
    pub fn in_flight(&self) -> Vec<usize> {
        self.live.iter().map(|(i, _)| *i).collect()
    }

    /// Every inter-token gap of every request, seconds.
    pub fn gaps(&self) -> Vec<f64> {
        self.recs
            .iter()
            .flat_map(|r| r.gaps.iter().copied())
            .collect()
    }

    pub fn finished(&self) -> usize {
        self.recs.iter().filter(|r| r.done.is_some()).count()
    }

    /// Summarises requests matching `filter` (by their `long` flag; `None` for all).
    pub fn outcome(&self, slo: Slo, horizon: Option<f64>, filter: Option<bool>) -> Outcome {
        let recs: Vec<&Rec> = self
            .recs
            .iter()
            .filter(|r| filter.is_none_or(|l| r.long == l))
            .collect();
        let start = recs.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
        let end = recs
            .iter()
            .filter_map(|r| r.done.or(r.last))
            .fold(0.0, f64::max);
        let completed: Vec<&&Rec> = recs
            .iter()
            .filter(|r| r.done.is_some() && !r.failed)
            .collect();
        let cut = completed.len() < recs.len() && horizon.is_some();
        let end = match horizon {
            Some(h) if cut => h.max(end),
            _ => end,
        };
        let makespan = (end - if start.is_finite() { start } else { 0.0 }).max(1e-9);
        let output_tokens: usize = recs.iter().map(|r| r.tokens).sum();
        let ttfts: Vec<f64> = recs
            .iter()
            .filter_map(|r| Some(r.first? - r.arrival))
            .collect();
        let gaps: Vec<f64> = recs.iter().flat_map(|r| r.gaps.iter().copied()).collect();
        let good: Vec<&&Rec> = completed
            .iter()
            .copied()
            .filter(|r| {
                let ttft_ok = r.first.is_some_and(|f| f - r.arrival <= slo.ttft_s);
                let mean_gap = if r.gaps.is_empty() {
                    0.0
                } else {
                    r.gaps.iter().sum::<f64>() / r.gaps.len() as f64
                };
                ttft_ok && mean_gap <= slo.itl_s
            })
            .collect();
        let n = recs.len().max(1) as f64;
        Outcome {
            requests: recs.len(),
            completed: completed.len(),
            failed: recs.iter().filter(|r| r.failed).count(),
            makespan_s: makespan,
            output_tokens,
            tokens_per_s: output_tokens as f64 / makespan,
            requests_per_s: completed.len() as f64 / makespan,
            ttft: Pcts::of(&ttfts),
            itl: Pcts::of(&gaps),
            slo_attainment: good.len() as f64 / n,
            goodput_rps: good.len() as f64 / makespan,
            goodput_tps: good.iter().map(|r| r.tokens).sum::<usize>() as f64 / makespan,
            cut_at_horizon: cut,
        }
    }
}

/// What a policy submits now: jobs with the adapter each runs with, and the seconds of extra
/// work done (for real) before they can run.
#[derive(Debug, Default)]
pub struct Admitted {
    pub jobs: Vec<(usize, Option<String>)>,
    pub extra_s: f64,
}

/// Decides which arrived jobs a run submits, and with which adapter.
pub trait Policy {
    /// Moves the jobs to submit now out of `queue` (arrived, not yet submitted, oldest first)
    /// and returns them with the adapter each runs with, plus the seconds of extra work done
    /// (for real) before they can run.
    fn admit(
        &mut self,
        queue: &mut VecDeque<usize>,
        jobs: &[Job],
        engine_busy: bool,
    ) -> anyhow::Result<Admitted>;
}

/// Submits every request as it arrives: with its adapter (`names`) or on the base model.
pub struct AllNow<'a> {
    pub names: Option<&'a [String]>,
}

impl Policy for AllNow<'_> {
    fn admit(
        &mut self,
        queue: &mut VecDeque<usize>,
        jobs: &[Job],
        _busy: bool,
    ) -> anyhow::Result<Admitted> {
        let names = self.names;
        let jobs = queue
            .drain(..)
            .map(|i| {
                let name = names.and_then(|n| jobs[i].adapter.and_then(|a| n.get(a).cloned()));
                (i, name)
            })
            .collect();
        Ok(Admitted { jobs, extra_s: 0.0 })
    }
}

/// How a run is bounded and where it computes.
#[derive(Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// Stop once the clock passes this many seconds (requests still running count as missed).
    pub horizon: Option<f64>,
    /// Run steps inside this rayon pool (cores given to the engine).
    pub pool: Option<&'a rayon::ThreadPool>,
}

/// What a run measured besides the per-request outcome.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunStats {
    pub steps: u64,
    /// Tokens computed over all steps (prefill chunks and decodes).
    pub tokens: usize,
    /// Wall time of engine steps.
    pub compute_s: f64,
    /// Wall time of policy work charged to the clock (merged-weight swaps).
    pub extra_s: f64,
    /// Adapter reloads from disk (host-cache misses), charged to the clock.
    pub reload_s: f64,
    pub preemptions: u64,
    pub adapter_device_loads: u64,
    pub final_clock_s: f64,
}

/// Runs `engine.step()` (inside `pool` when given) and returns the tokens computed and seconds.
pub fn timed_step<B: Backend>(
    engine: &mut Engine<B>,
    pool: Option<&rayon::ThreadPool>,
) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let n = match pool {
        Some(p) => p.install(|| engine.step()),
        None => engine.step(),
    }?;
    Ok((n, t.elapsed().as_secs_f64()))
}

/// Loads adapters the engine asked for (host-cache misses) from disk; returns the seconds.
pub fn service_loads<B: Backend>(engine: &mut Engine<B>) -> anyhow::Result<f64> {
    let t = Instant::now();
    let loads = engine.take_pending_loads();
    if loads.is_empty() {
        return Ok(0.0);
    }
    let config = engine.model_config().clone();
    for (key, source) in loads {
        let result = host::load(&source, &config, &Default::default());
        engine.finish_adapter_load(&key, result)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Serves `jobs` on `engine` under the virtual clock (see the module docs). Leaves the engine
/// empty: requests still running at the horizon are cancelled.
pub fn serve<B: Backend>(
    engine: &mut Engine<B>,
    jobs: &[Job],
    policy: &mut dyn Policy,
    opts: RunOptions<'_>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> anyhow::Result<(Tracker, RunStats)> {
    let mut tracker = Tracker::new(jobs);
    let mut stats = RunStats::default();
    let before = engine.stats();
    let mut queue = VecDeque::new();
    let (mut next, mut clock) = (0, 0.0f64);
    let mut last_report = Instant::now();
    loop {
        while next < jobs.len() && jobs[next].arrival <= clock {
            queue.push_back(next);
            next += 1;
        }
        if !queue.is_empty() {
            let admitted = policy.admit(&mut queue, jobs, engine.has_work())?;
            clock += admitted.extra_s;
            stats.extra_s += admitted.extra_s;
            for (i, adapter) in admitted.jobs {
                let tx = tracker.channel(i);
                if engine.submit(request(i, &jobs[i], adapter), tx).is_err() {
                    tracker.fail(i);
                }
            }
            let reload = service_loads(engine)?;
            clock += reload;
            stats.reload_s += reload;
        }
        if engine.has_work() {
            let (n, dt) = timed_step(engine, opts.pool)?;
            clock += dt;
            stats.tokens += n;
            stats.compute_s += dt;
            stats.steps += 1;
            tracker.poll(clock);
            if opts.horizon.is_some_and(|h| clock >= h) {
                break;
            }
        } else if next < jobs.len() {
            clock = clock.max(jobs[next].arrival);
        } else if queue.is_empty() {
            tracker.poll(clock);
            break;
        } else {
            anyhow::bail!("the policy admits nothing to an idle engine");
        }
        if last_report.elapsed().as_secs_f64() > 0.5 {
            progress(tracker.finished(), jobs.len(), clock);
            last_report = Instant::now();
        }
    }
    for i in tracker.in_flight() {
        engine.cancel(&format!("r{i}"));
    }
    tracker.poll(clock);
    let after = engine.stats();
    stats.preemptions = after.preemptions - before.preemptions;
    stats.adapter_device_loads = after.adapter_device_loads - before.adapter_device_loads;
    stats.final_clock_s = clock;
    engine.trim();
    Ok((tracker, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            requests: 2000,
            rate: 4.0,
            adapters: 10,
            zipf_alpha: 1.0,
            prompt: (8, 16),
            output: (4, 6),
            long_fraction: 0.25,
            long_prompt: (100, 120),
            vocab: 512,
            seed: 3,
        }
    }

    #[test]
    fn workloads_follow_their_distributions() {
        let jobs = generate(&spec());
        let span = jobs.last().map(|j| j.arrival).unwrap_or(0.0);
        let rate = jobs.len() as f64 / span;
        assert!((rate - 4.0).abs() < 0.4, "Poisson rate {rate}");
        let mut counts = [0usize; 10];
        for j in &jobs {
            counts[j.adapter.unwrap_or(99)] += 1;
            assert!((4..=6).contains(&j.max_tokens));
            let n = j.prompt.len();
            assert!(if j.long {
                (100..=120).contains(&n)
            } else {
                (8..=16).contains(&n)
            });
            assert!(j.prompt.iter().all(|t| *t < 512));
        }
        // Zipf(1) over 10: the first adapter is drawn about twice as often as the second.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((1.6..2.5).contains(&ratio), "{counts:?}");
        assert!(counts.windows(2).filter(|w| w[0] < w[1]).count() <= 3);
        let long = jobs.iter().filter(|j| j.long).count() as f64 / jobs.len() as f64;
        assert!((0.2..0.3).contains(&long));
    }

    #[test]
    fn the_same_seed_gives_the_same_prompts_at_any_rate_or_adapter_count() {
        let a = generate(&spec());
        let b = generate(&WorkloadSpec {
            rate: f64::INFINITY,
            adapters: 1000,
            ..spec()
        });
        assert!(a.iter().zip(&b).all(|(x, y)| x.prompt == y.prompt));
        assert!(b.iter().all(|j| j.arrival == 0.0));
    }

    #[test]
    fn outcomes_count_slos_and_goodput() {
        let jobs = generate(&WorkloadSpec {
            requests: 2,
            ..spec()
        });
        let mut t = Tracker::new(&jobs);
        let (a, b) = (t.channel(0), t.channel(1));
        let tok = || Event::Token {
            id: 1,
            text: String::new(),
            logprob: None,
            logits: None,
        };
        let fin = || Event::Finished {
            reason: FinishReason::Length,
            text: String::new(),
            usage: Default::default(),
            timings: Default::default(),
            error: None,
        };
        let (t0, t1) = (jobs[0].arrival, jobs[1].arrival);
        a.send(tok()).ok();
        t.poll(t0 + 0.1);
        a.send(tok()).ok();
        a.send(fin()).ok();
        t.poll(t0 + 0.2);
        b.send(tok()).ok();
        b.send(fin()).ok();
        t.poll(t1 + 5.0);
        let o = t.outcome(
            Slo {
                ttft_s: 1.0,
                itl_s: 0.5,
            },
            None,
            None,
        );
        assert_eq!((o.completed, o.output_tokens), (2, 3));
        assert_eq!(o.slo_attainment, 0.5, "the second request's TTFT is 5 s");
        assert!((o.itl.p50 - 0.1).abs() < 1e-9);
    }
}
