//! A fleet of agents on a virtual clock, each step planned by the agent's own scheduler
//! ([`loraplane_agent::scheduler::Scheduler`], the pure policy the engine applies) and costed
//! by a [`StepCost`] profile instead of being computed.
//!
//! - Unified: `n` agents; each request goes to the agent with the fewest requests in flight
//!   (ties: the lowest index), and is prefilled and decoded there with chunked prefill.
//! - Disaggregated: `p` prefill agents run each prompt with one output token (the prefill agent
//!   samples the first token); its KV reaches the least-loaded of `d` decode agents
//!   [`StepCost::handoff_s`] after the prefill step ends, and is imported there: the decode
//!   agent emits the first token when it admits the sequence, then decodes the rest.
//!
//! Each agent's pool is the profile's; adapter residency, LRU eviction, preemption and
//! refusal are the scheduler's decisions, applied here to plain counters. Events are stamped
//! into the suites' [`Tracker`], so predicted and measured runs are summarised by one code.

use std::collections::{HashMap, VecDeque};

use loraplane_agent::engine::{Event, FinishReason};
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::scheduler::{
    AdapterState, Decision, Limits, Scheduler, SeqId, SeqState, Snapshot,
};
use tokio::sync::mpsc::UnboundedSender;

use super::cost::{StepCost, StepShape};
use crate::suites::sim::{Job, Tracker};

/// How many agents of each role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    Unified(usize),
    Split { prefill: usize, decode: usize },
}

impl Layout {
    pub fn devices(&self) -> usize {
        match *self {
            Layout::Unified(n) => n,
            Layout::Split { prefill, decode } => prefill + decode,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Layout::Unified(n) => write!(f, "{n} unified"),
            Layout::Split { prefill, decode } => write!(f, "{prefill} prefill + {decode} decode"),
        }
    }
}

/// What a simulated run did besides the per-request outcome.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SimStats {
    pub steps: u64,
    pub preemptions: u64,
    pub refused: u64,
    pub adapter_placements: u64,
    /// Busy seconds per agent over the run's end time (prefill agents first).
    pub utilisation: Vec<f64>,
}

struct Seq {
    job: usize,
    adapter: Option<AdapterKey>,
    rank: usize,
    tokens: usize,
    prompt_len: usize,
    max_tokens: usize,
    computed: usize,
    pages: usize,
    admitted: u64,
    importing: bool,
}

impl Seq {
    /// Computes `n` more tokens of it in the step of `shape`.
    fn compute(&mut self, n: usize, shape: &mut StepShape) {
        let rank = self.adapter.as_ref().map(|_| self.rank);
        shape.add(n, self.computed, self.computed < self.prompt_len, rank);
        self.computed += n;
    }
}

struct Agent {
    prefill_only: bool,
    sched: Scheduler,
    limits: Limits,
    seqs: HashMap<SeqId, Seq>,
    running: Vec<SeqId>,
    waiting: VecDeque<SeqId>,
    adapters: HashMap<AdapterKey, (Option<usize>, usize, u64)>, // (resident pages, pages, last used)
    free: usize,
    clock: f64,
    busy: f64,
    next_admit: u64,
}

impl Agent {
    fn new(cost: &StepCost, prefill_only: bool) -> Agent {
        let l = cost.limits;
        let limits = Limits {
            max_batch_tokens: l.max_batch_tokens,
            max_prefill_chunk: l.max_prefill_chunk,
            max_running: l.max_running,
            pool_pages: l.pool_pages,
            block_size: l.block_size,
            num_layers: cost.layers,
        };
        Agent {
            prefill_only,
            sched: Scheduler::new(limits),
            limits,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            adapters: HashMap::new(),
            free: l.pool_pages,
            clock: 0.0,
            busy: 0.0,
            next_admit: 0,
        }
    }

    fn load(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// Ends a running sequence, freeing its pages; returns its job.
    fn finish(&mut self, id: SeqId) -> usize {
        let s = self.seqs.remove(&id).expect("a running sequence");
        self.free += s.pages;
        self.running.retain(|x| *x != id);
        s.job
    }

    fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
}

/// Simulates `jobs` on `layout` (`adapter_of(j)`: job `j`'s adapter index and rank); returns the tracker of the client-visible events.
pub fn simulate(
    cost: &StepCost,
    layout: Layout,
    jobs: &[Job],
    adapter_of: &dyn Fn(usize) -> Option<(usize, usize)>,
) -> anyhow::Result<(Tracker, SimStats)> {
    let (front, back) = match layout {
        Layout::Unified(n) => (n, 0),
        Layout::Split { prefill, decode } => (prefill, decode),
    };
    anyhow::ensure!(
        front > 0 && (back > 0 || matches!(layout, Layout::Unified(_))),
        "a fleet needs at least one agent per role: {layout}"
    );
    let split = back > 0;
    let mut agents: Vec<Agent> = (0..front + back)
        .map(|i| Agent::new(cost, split && i < front))
        .collect();
    let mut tracker = Tracker::new(jobs);
    let mut senders: Vec<Option<UnboundedSender<Event>>> = vec![None; jobs.len()];
    let mut stats = SimStats::default();
    let tenant = TenantId(crate::suites::setup::TENANT.to_owned());
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| jobs[a].arrival.total_cmp(&jobs[b].arrival));
    let mut next = 0;
    // KV handoffs in flight: (ready time, job).
    let mut handoffs: Vec<(f64, usize)> = Vec::new();
    let mut next_id = 0u64;
    let least_loaded = |agents: &[Agent], range: std::ops::Range<usize>| {
        range
            .min_by_key(|&i| (agents[i].load(), i))
            .expect("a non-empty role")
    };
    // Job `j` as a sequence not yet started (`importing`: its KV handed off from a prefill
    // agent); only `tokens`, `max_tokens` and `importing` differ between arrival and handoff.
    let new_seq = |j: usize, tokens: usize, max_tokens: usize, importing: bool| {
        let (adapter, rank) = match adapter_of(j) {
            Some((idx, rank)) => (Some(AdapterKey::new(&tenant.0, &format!("a{idx}"))), rank),
            None => (None, 0),
        };
        Seq {
            job: j,
            adapter,
            rank,
            tokens,
            prompt_len: jobs[j].prompt.len(),
            max_tokens,
            computed: 0,
            pages: 0,
            admitted: 0,
            importing,
        }
    };
    loop {
        let t_arrival = order.get(next).map(|&j| jobs[j].arrival);
        let t_handoff = handoffs.iter().map(|h| h.0).min_by(f64::total_cmp);
        let stepper = (0..agents.len())
            .filter(|&i| agents[i].has_work())
            .min_by(|&a, &b| agents[a].clock.total_cmp(&agents[b].clock));
        let t_step = stepper.map(|i| agents[i].clock);
        let first = [t_arrival, t_handoff, t_step]
            .into_iter()
            .flatten()
            .min_by(f64::total_cmp);
        let Some(now) = first else { break };
        if t_arrival == Some(now) {
            let j = order[next];
            next += 1;
            let (tx_i, rx_i) = (j, tracker.channel(j));
            senders[tx_i] = Some(rx_i);
            let a = least_loaded(&agents, 0..front);
            let job = &jobs[j];
            let max_tokens = if split { 1 } else { job.max_tokens };
            let seq = new_seq(j, job.prompt.len(), max_tokens, false);
            enqueue(&mut agents[a], cost, &mut next_id, now, seq);
            continue;
        }
        if t_handoff == Some(now) {
            let pos = handoffs
                .iter()
                .position(|h| h.0 == now)
                .expect("found above");
            let (_, j) = handoffs.swap_remove(pos);
            let d = least_loaded(&agents, front..front + back);
            let job = &jobs[j];
            // The KV arrives with the prompt and the first output token.
            let seq = new_seq(j, job.prompt.len() + 1, job.max_tokens, true);
            enqueue(&mut agents[d], cost, &mut next_id, now, seq);
            continue;
        }
        let i = stepper.expect("a step is the earliest event");
        let finished = step(
            &mut agents[i],
            cost,
            &tenant,
            &senders,
            &mut tracker,
            &mut stats,
        )?;
        if agents[i].prefill_only {
            let end = agents[i].clock;
            for j in finished {
                handoffs.push((end + cost.handoff_s(jobs[j].prompt.len()), j));
            }
        } else {
            for j in finished {
                if let Some(tx) = senders[j].take() {
                    let _ = tx.send(finished_event(FinishReason::Length));
                }
            }
            tracker.poll(agents[i].clock);
        }
    }
    let end = agents.iter().map(|a| a.clock).fold(0.0, f64::max).max(1e-9);
    stats.utilisation = agents.iter().map(|a| a.busy / end).collect();
    tracker.poll(end);
    Ok((tracker, stats))
}

fn finished_event(reason: FinishReason) -> Event {
    Event::Finished {
        reason,
        text: String::new(),
        usage: Default::default(),
        timings: Default::default(),
        error: None,
    }
}

fn token_event() -> Event {
    Event::Token {
        id: 0,
        text: String::new(),
        logprob: None,
        logits: None,
    }
}

fn enqueue(agent: &mut Agent, cost: &StepCost, next_id: &mut u64, now: f64, seq: Seq) {
    if !agent.has_work() {
        agent.clock = agent.clock.max(now);
    }
    if let Some(key) = &seq.adapter {
        agent
            .adapters
            .entry(key.clone())
            .or_insert((None, cost.adapter_pages(seq.rank), 0));
    }
    let id = SeqId(*next_id);
    *next_id += 1;
    agent.seqs.insert(id, seq);
    agent.waiting.push_back(id);
}

/// Plans and applies one step of `agent` at its clock; returns the jobs that finished on it.
fn step(
    agent: &mut Agent,
    cost: &StepCost,
    tenant: &TenantId,
    senders: &[Option<UnboundedSender<Event>>],
    tracker: &mut Tracker,
    stats: &mut SimStats,
) -> anyhow::Result<Vec<usize>> {
    let plan = {
        let seq_state = |id: &SeqId| {
            let s = &agent.seqs[id];
            SeqState {
                id: *id,
                tenant,
                adapters: s.adapter.as_slice(),
                tokens: s.tokens,
                prompt_len: s.prompt_len,
                max_tokens: s.max_tokens,
                computed: s.computed,
                pages: s.pages,
                // Traces carry lengths, not contents: no prefix is shared (caching off).
                shared_pages: 0,
                prefix: &[],
                admitted: s.admitted,
                importing: s.importing,
                import_cached: 0,
            }
        };
        let snapshot = Snapshot {
            running: agent.running.iter().map(seq_state).collect(),
            waiting: agent.waiting.iter().map(seq_state).collect(),
            adapters: agent
                .adapters
                .iter()
                .map(|(k, &(resident, pages, last_used))| {
                    (
                        k,
                        AdapterState {
                            host_ready: true,
                            resident,
                            placement: Some(pages),
                            unloading: false,
                            last_used,
                        },
                    )
                })
                .collect(),
            free_pages: agent.free,
            cache: None,
        };
        agent.sched.plan(snapshot)
    };
    let start = agent.clock;
    let mut shape = StepShape::default();
    let mut in_batch: Vec<SeqId> = Vec::new();
    let mut adapters_in_step: Vec<AdapterKey> = Vec::new();
    let mut finished = Vec::new();
    let mut progressed = false;
    let limits = agent.limits;
    for decision in plan.decisions {
        match decision {
            Decision::Evict(key) => {
                if let Some(a) = agent.adapters.get_mut(&key)
                    && let Some(p) = a.0.take()
                {
                    agent.free += p;
                }
            }
            Decision::Preempt(id) => {
                let s = agent.seqs.get_mut(&id).expect("planned sequence");
                agent.free += s.pages;
                s.pages = 0;
                s.computed = 0;
                s.importing = false;
                agent.running.retain(|x| *x != id);
                agent.waiting.push_front(id);
                stats.preemptions += 1;
                progressed = true;
            }
            Decision::Refuse { seq, .. } => {
                let s = agent.seqs.remove(&seq).expect("planned sequence");
                agent.waiting.retain(|x| *x != seq);
                stats.refused += 1;
                progressed = true;
                tracker.fail(s.job);
                if let Some(tx) = &senders[s.job] {
                    let _ = tx.send(finished_event(FinishReason::Error));
                }
            }
            Decision::Place(key) => {
                if let Some(a) = agent.adapters.get_mut(&key) {
                    a.0 = Some(a.1);
                    agent.free = agent.free.saturating_sub(a.1);
                    stats.adapter_placements += 1;
                }
            }
            Decision::Run { seq, tokens } => {
                let s = agent.seqs.get_mut(&seq).expect("planned sequence");
                let pages = limits.pages_for(s.computed + tokens);
                agent.free = (agent.free + s.pages).saturating_sub(pages);
                s.pages = pages;
                s.compute(tokens, &mut shape);
                in_batch.push(seq);
            }
            // No prefix cache in the simulation, so no cached block is reused or evicted.
            Decision::EvictBlock(_) => {}
            Decision::Admit {
                seq,
                tokens,
                reserve,
                cached: _,
            } => {
                let s = agent.seqs.get_mut(&seq).expect("planned sequence");
                let pages = limits.pages_for(reserve);
                agent.free = agent.free.saturating_sub(pages);
                s.pages = pages;
                s.admitted = agent.next_admit;
                agent.next_admit += 1;
                agent.waiting.retain(|x| *x != seq);
                agent.running.push(seq);
                progressed = true;
                if let Some(key) = &s.adapter
                    && let Some(a) = agent.adapters.get_mut(key)
                {
                    a.2 = s.admitted + 1;
                }
                if s.importing {
                    // The imported prompt's KV is written and its first token sent now.
                    s.importing = false;
                    s.computed = s.prompt_len;
                    if let Some(tx) = &senders[s.job] {
                        let _ = tx.send(token_event());
                    }
                    tracker.poll(start);
                    if s.max_tokens <= 1 {
                        // Its first token finished it (the engine ends it at admission).
                        finished.push(agent.finish(seq));
                        continue;
                    }
                }
                if tokens > 0 {
                    s.compute(tokens, &mut shape);
                    in_batch.push(seq);
                }
            }
        }
    }
    for id in &in_batch {
        if let Some(key) = &agent.seqs[id].adapter
            && !adapters_in_step.contains(key)
        {
            adapters_in_step.push(key.clone());
        }
    }
    shape.adapters = adapters_in_step.len() as f64;
    if in_batch.is_empty() && !progressed && agent.has_work() {
        anyhow::bail!(
            "the scheduler planned nothing for an agent with work: the profile's pool ({} pages) \
             cannot hold a request of this trace",
            limits.pool_pages
        );
    }
    let dt = if in_batch.is_empty() {
        0.0
    } else {
        cost.step(&shape)
    };
    agent.clock = start + dt;
    agent.busy += dt;
    stats.steps += 1;
    let end = agent.clock;
    for id in in_batch {
        let s = agent.seqs.get_mut(&id).expect("in batch");
        if s.computed < s.tokens {
            continue; // a prefill chunk: no token yet
        }
        s.tokens += 1;
        if !agent.prefill_only
            && let Some(tx) = &senders[s.job]
        {
            let _ = tx.send(token_event());
        }
        if s.tokens - s.prompt_len >= s.max_tokens {
            finished.push(agent.finish(id));
        }
    }
    tracker.poll(end);
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suites::sim::Slo;

    /// 10 ms a step plus 1 ms a prompt token, nothing else; handoffs take 1 ms + 0.4 ms a token.
    fn cost() -> StepCost {
        let mut c = StepCost::parse(super::super::cost::DEFAULT_PROFILE).unwrap();
        c.step_s = 0.01;
        c.prefill_token_s = 0.001;
        c.decode_seq_s = 0.0;
        c.attention_kilo_s = 0.0;
        c.adapter_s = 0.0;
        c.lora_kilo_rank_token_s = 0.0;
        c.kv_latency_s = 0.001;
        c.kv_bandwidth_bytes_per_s = c.kv_bytes_per_token / c.layers as f64 / 0.0004;
        c
    }

    fn job(arrival: f64, prompt: usize, output: usize) -> Job {
        Job {
            arrival,
            adapter: None,
            prompt: vec![7; prompt],
            max_tokens: output,
            long: false,
        }
    }

    fn run(layout: Layout, jobs: &[Job]) -> crate::suites::sim::Outcome {
        let (t, _) = simulate(&cost(), layout, jobs, &|_| None).unwrap();
        t.outcome(
            Slo {
                ttft_s: 1.0,
                itl_s: 1.0,
            },
            None,
            None,
        )
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn one_request_on_one_agent_costs_its_prefill_then_one_step_a_token() {
        let o = run(Layout::Unified(1), &[job(1.0, 10, 5)]);
        assert_eq!((o.completed, o.output_tokens), (1, 5));
        assert!(close(o.ttft.p50, 0.02), "{o:?}");
        assert!(close(o.itl.p50, 0.01) && close(o.itl.p99, 0.01), "{o:?}");
        assert!(close(o.makespan_s, 0.06), "{o:?}");
    }

    #[test]
    fn a_disaggregated_first_token_waits_for_the_kv_handoff() {
        let o = run(
            Layout::Split {
                prefill: 1,
                decode: 1,
            },
            &[job(0.0, 10, 5)],
        );
        assert_eq!((o.completed, o.output_tokens), (1, 5));
        // Prefill 20 ms, then 1 ms + 10 tokens × 0.4 ms; the first token comes at admission.
        assert!(close(o.ttft.p50, 0.025), "{o:?}");
        assert!(close(o.itl.p99, 0.01), "{o:?}");
    }

    #[test]
    fn a_second_agent_takes_the_second_request() {
        let jobs = [job(0.0, 10, 2), job(0.0, 10, 2)];
        let one = run(Layout::Unified(1), &jobs);
        let two = run(Layout::Unified(2), &jobs);
        // One agent prefills both prompts in one step (10 ms + 20 tokens); two agents in parallel.
        assert!(close(one.ttft.p99, 0.03), "{one:?}");
        assert!(close(two.ttft.p99, 0.02), "{two:?}");
        assert_eq!((one.completed, two.completed), (2, 2));
    }

    #[test]
    fn a_request_larger_than_the_pool_is_refused_not_stuck() {
        let mut c = cost();
        c.limits.pool_pages = c.layers * 2; // two blocks of KV
        let jobs = [job(0.0, 100, 4), job(0.0, 8, 4)];
        let (t, stats) = simulate(&c, Layout::Unified(1), &jobs, &|_| None).unwrap();
        let o = t.outcome(
            Slo {
                ttft_s: 1.0,
                itl_s: 1.0,
            },
            None,
            None,
        );
        assert_eq!((o.completed, o.failed, stats.refused), (1, 1, 1), "{o:?}");
    }

    #[test]
    fn adapters_are_placed_once_and_their_steps_cost_more() {
        let mut c = cost();
        c.adapter_s = 0.005;
        let jobs = [job(0.0, 10, 3), job(0.0, 10, 3)];
        let (t, stats) = simulate(&c, Layout::Unified(1), &jobs, &|_| Some((0, 8))).unwrap();
        let o = t.outcome(
            Slo {
                ttft_s: 1.0,
                itl_s: 1.0,
            },
            None,
            None,
        );
        assert_eq!(stats.adapter_placements, 1);
        assert!(close(o.ttft.p50, 0.035), "{o:?}"); // 10 ms + 20 tokens + one adapter
        assert!(close(o.itl.p50, 0.015), "{o:?}");
    }
}
