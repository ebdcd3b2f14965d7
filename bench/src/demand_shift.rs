//! `loraplane-bench placement --demand-shift`: demand-following adapter replicas
//! (docs/architecture.md §4.7) through a popularity shift. Adapters with
//! `replicas: {min 1, max 4, 5 req/s per replica, 30 s up / 120 s down}` get Zipf-distributed
//! request rates; at minute 10 the popularity order reverses. The operator's own code sizes and
//! places them ([`loraplane_operator::controller::converge::converge`] with its fleet, sizers and
//! load budget) against in-memory fake agents whose request counters the simulation drives, on
//! a paused tokio clock, so 25 simulated minutes take seconds. It runs twice, with the
//! loads-per-minute bound and without one, and reports loads and unloads per minute and how long
//! each adapter took to reach its new size (`placement-demand.{md,json}` and a plot in `--out`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use loraplane_operator::controller::converge::{AdapterWant, Limits, converge};
use loraplane_operator::controller::fleet::Fleet;
use loraplane_operator::crd::{AutoReplicas, Replicas};
use loraplane_operator::discovery;
use loraplane_operator::fake_agent::{FakeAgent, FakeAgents, agent_pod};
use loraplane_operator::placement::demand::recommend;
use loraplane_operator::role::Role;
use serde::Serialize;

use crate::placement::PlacementArgs;
use crate::suites::report::{Environment, Plot, PlotKind, Report, Series, Table};

const TOKEN: &str = "bench-admin-token";
/// How often the agents' counters are read and every adapter reconciled (the snapshot TTL).
const TICK: Duration = Duration::from_secs(15);
const SHIFT_AT: Duration = Duration::from_secs(600);
const END_AT: Duration = Duration::from_secs(1500);

/// The replica range every adapter of the scenario has.
pub fn spec() -> AutoReplicas {
    AutoReplicas {
        min: 1,
        max: 4,
        target_rps: 5.0,
        scale_up_window: Duration::from_secs(30),
        scale_down_window: Duration::from_secs(120),
    }
}

/// Requests per second of the adapters by popularity rank (0 = hottest): Zipf(1) over `n`.
fn zipf_rates(n: usize, total_rps: f64) -> Vec<f64> {
    let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
    (0..n)
        .map(|rank| total_rps / ((rank + 1) as f64 * h))
        .collect()
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ShiftRun {
    /// The bound (0 = none).
    pub loads_per_minute_bound: u32,
    /// (minute, loads, unloads), every minute of the run.
    pub per_minute: Vec<(u64, u32, u32)>,
    /// Adapters whose size the shift changed: (grew, shrank).
    pub changed: (usize, usize),
    /// Seconds from the shift until each of them had its new size, growing ones and shrinking
    /// ones; `None` when it never got there within the run.
    pub follow_grow_s: Vec<Option<f64>>,
    pub follow_shrink_s: Vec<Option<f64>>,
}

impl ShiftRun {
    fn after_shift(&self) -> impl Iterator<Item = &(u64, u32, u32)> {
        self.per_minute
            .iter()
            .filter(|(m, _, _)| *m >= SHIFT_AT.as_secs() / 60)
    }

    pub fn max_loads_per_minute_after_shift(&self) -> u32 {
        self.after_shift().map(|(_, l, _)| *l).max().unwrap_or(0)
    }

    pub fn max_unloads_per_minute_after_shift(&self) -> u32 {
        self.after_shift().map(|(_, _, u)| *u).max().unwrap_or(0)
    }

    /// Loads in minutes 5–9, before the shift and after the warm-up (initial placement and
    /// growth to the first popularity).
    pub fn loads_before_shift_after_warmup(&self) -> u32 {
        self.per_minute
            .iter()
            .filter(|(m, _, _)| *m >= 5 && *m < SHIFT_AT.as_secs() / 60)
            .map(|(_, l, _)| *l)
            .sum()
    }

    /// The slowest follow time (grow and shrink), `None` if one never followed.
    pub fn all_followed_s(&self) -> Option<f64> {
        self.follow_grow_s
            .iter()
            .chain(&self.follow_shrink_s)
            .try_fold(0.0_f64, |m, t| t.map(|t| m.max(t)))
    }
}

fn percentile(v: &[Option<f64>], p: f64) -> Option<f64> {
    let mut xs: Vec<f64> = v.iter().copied().collect::<Option<Vec<f64>>>()?;
    if xs.is_empty() {
        return Some(0.0);
    }
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs.get(i).copied()
}

/// One run on a paused clock (must be called inside a runtime whose clock is paused).
pub async fn simulate(
    agents: usize,
    adapters: usize,
    total_rps: f64,
    loads_per_minute: u32,
    capacity: u64,
    adapter_bytes: u64,
) -> anyhow::Result<ShiftRun> {
    let fakes = FakeAgents::new();
    let mut pods = Vec::new();
    for i in 0..agents {
        let addr = SocketAddr::from((
            [10, 9, u8::try_from(i / 250)?, u8::try_from(i % 250 + 1)?],
            50051,
        ));
        fakes.add(addr, FakeAgent::new("unified", TOKEN, capacity));
        pods.push(agent_pod(i, addr, Role::Unified, 0));
    }
    let found = discovery::agents(&pods, "bench");
    anyhow::ensure!(found.len() == agents, "discovered {} agents", found.len());
    let addr_of: BTreeMap<String, SocketAddr> =
        found.iter().map(|a| (a.pod.clone(), a.addr)).collect();
    let fleet = tokio::sync::Mutex::new(Fleet {
        token: Some(TOKEN.into()),
        ..Fleet::default()
    });
    let spec = spec();
    let wants: Vec<AdapterWant> = (0..adapters)
        .map(|i| {
            let tenant = format!("tenant-{}", i % 10);
            let name = format!("adapter-{i}");
            AdapterWant {
                source_uri: format!(
                    "https://adapters.example/{tenant}/{name}?size={adapter_bytes}"
                ),
                tenant,
                name,
                expected_sha256: None,
                replicas: Replicas::Auto(spec),
                size_hint: adapter_bytes,
                replica_quota: None,
            }
        })
        .collect();
    let limits = Limits {
        ttl: TICK,
        loads_per_minute,
    };
    let by_rank = zipf_rates(adapters, total_rps);
    let before = |i: usize| by_rank[i];
    let after = |i: usize| by_rank[adapters - 1 - i];
    let size_before: Vec<u32> = (0..adapters).map(|i| recommend(before(i), &spec)).collect();
    let size_after: Vec<u32> = (0..adapters).map(|i| recommend(after(i), &spec)).collect();
    let mut holders: Vec<Vec<String>> = vec![Vec::new(); adapters];
    let mut followed: Vec<Option<f64>> = vec![None; adapters];
    let mut per_minute: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    let start = tokio::time::Instant::now();
    loop {
        let t = start.elapsed();
        let mut work = (0u32, 0u32);
        for (i, want) in wants.iter().enumerate() {
            let (c, w) = converge(&fakes, &fleet, &found, &[Role::Unified], want, limits).await;
            work.0 += w.loads;
            work.1 += w.unloads;
            holders[i] = c.placements.into_iter().map(|p| p.pod).collect();
            let n = u32::try_from(holders[i].len()).unwrap_or(u32::MAX);
            if t >= SHIFT_AT && followed[i].is_none() && n == size_after[i] {
                followed[i] = Some((t - SHIFT_AT).as_secs_f64());
            }
        }
        let m = per_minute.entry(t.as_secs() / 60).or_default();
        m.0 += work.0;
        m.1 += work.1;
        if t >= END_AT {
            break;
        }
        // The next interval's requests, on each adapter's first holder (the rate is the sum).
        let rps = |i: usize| if t >= SHIFT_AT { after(i) } else { before(i) };
        for (i, want) in wants.iter().enumerate() {
            let n = (rps(i) * TICK.as_secs_f64()).round() as u64;
            if let Some(addr) = holders[i].first().and_then(|p| addr_of.get(p)) {
                fakes.with(*addr, |a| a.serve_requests(&want.tenant, &want.name, n));
            }
        }
        tokio::time::advance(TICK).await;
    }
    let changed: Vec<usize> = (0..adapters)
        .filter(|&i| size_before[i] != size_after[i])
        .collect();
    let grew: Vec<usize> = changed
        .iter()
        .copied()
        .filter(|&i| size_after[i] > size_before[i])
        .collect();
    let shrank: Vec<usize> = changed
        .iter()
        .copied()
        .filter(|&i| size_after[i] < size_before[i])
        .collect();
    Ok(ShiftRun {
        loads_per_minute_bound: loads_per_minute,
        per_minute: per_minute
            .into_iter()
            .map(|(m, (l, u))| (m, l, u))
            .collect(),
        changed: (grew.len(), shrank.len()),
        follow_grow_s: grew.iter().map(|&i| followed[i]).collect(),
        follow_shrink_s: shrank.iter().map(|&i| followed[i]).collect(),
    })
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "not within the run".to_owned(), |s| format!("{s:.0} s"))
}

/// Runs the scenario (bounded, then unbounded) and writes the report into `args.out`.
///
/// Errors: the output directory cannot be written, or an adapter never followed the shift
/// under the bound.
pub fn run(args: &PlacementArgs) -> anyhow::Result<Vec<ShiftRun>> {
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    let mut runs = Vec::new();
    for bound in [args.loads_per_minute, 0] {
        runs.push(rt.block_on(simulate(
            args.agents,
            args.adapters,
            args.total_rps,
            bound,
            args.capacity,
            args.adapter_bytes,
        ))?);
    }
    let mut report = Report::new(
        "placement-demand",
        "Adapter replicas following a popularity shift",
    );
    report.environment = Environment {
        cpu: "simulated clock; operator placement code against in-memory fake agents".into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        preset: format!("{} agents, {} adapters", args.agents, args.adapters),
        version: env!("CARGO_PKG_VERSION"),
        suite_seconds: started.elapsed().as_secs_f64(),
        ..Environment::default()
    };
    let mut table = Table::new(
        "Loads, unloads and time to follow",
        &[
            "loads/min bound",
            "adapters grown / shrunk",
            "max loads/min after shift",
            "max unloads/min after shift",
            "loads in steady minutes 5–9",
            "grow: p50 / max",
            "shrink: p50 / max",
            "all followed",
        ],
    );
    for r in &runs {
        table.row(vec![
            if r.loads_per_minute_bound == 0 {
                "none".to_owned()
            } else {
                r.loads_per_minute_bound.to_string()
            },
            format!("{} / {}", r.changed.0, r.changed.1),
            r.max_loads_per_minute_after_shift().to_string(),
            r.max_unloads_per_minute_after_shift().to_string(),
            r.loads_before_shift_after_warmup().to_string(),
            format!(
                "{} / {}",
                secs(percentile(&r.follow_grow_s, 0.5)),
                secs(percentile(&r.follow_grow_s, 1.0))
            ),
            format!(
                "{} / {}",
                secs(percentile(&r.follow_shrink_s, 0.5)),
                secs(percentile(&r.follow_shrink_s, 1.0))
            ),
            secs(r.all_followed_s()),
        ]);
    }
    report.tables.push(table);
    report.plots.push(Plot {
        file: "placement-demand.png".into(),
        title: "Adapter loads per minute (popularity reverses at minute 10)".into(),
        x_label: "minute".into(),
        y_label: "loads".into(),
        kind: PlotKind::Lines {
            series: runs
                .iter()
                .map(|r| Series {
                    name: if r.loads_per_minute_bound == 0 {
                        "no bound".to_owned()
                    } else {
                        format!("bound {}/min", r.loads_per_minute_bound)
                    },
                    points: r
                        .per_minute
                        .iter()
                        .map(|(m, l, _)| (*m as f64, f64::from(*l)))
                        .collect(),
                })
                .collect(),
            log_x: false,
        },
    });
    let s = spec();
    report.method = vec![
        format!(
            "{} adapters on {} unified fake agents (host cache {} MiB each, adapters {} MiB), \
             each with `replicas: {{min: {}, max: {}, targetRequestsPerSecond: {}, \
             scaleUpStabilizationSeconds: {}, scaleDownStabilizationSeconds: {}}}`. \
             {} req/s in all, Zipf(1) over the adapters; at minute {} the popularity order \
             reverses. Every {} s (the snapshot TTL) the agents' request counters are read and \
             every adapter is reconciled by the operator's converge (sizing, sticky placement, \
             load budget); the clock is tokio's, paused and advanced, so minutes take seconds.",
            args.adapters,
            args.agents,
            args.capacity >> 20,
            args.adapter_bytes >> 20,
            s.min,
            s.max,
            s.target_rps,
            s.scale_up_window.as_secs(),
            s.scale_down_window.as_secs(),
            args.total_rps,
            SHIFT_AT.as_secs() / 60,
            TICK.as_secs()
        ),
        "Time to follow: from the shift until an adapter whose size the new rates change has \
         exactly that many replicas. Growing needs the scale-up window of sustained demand plus \
         a counter interval, shrinking the scale-down window; the rest is the load budget."
            .into(),
    ];
    report.data = serde_json::to_value(&runs)?;
    std::fs::create_dir_all(&args.out)?;
    crate::suites::report::register_font()?;
    report.write(&args.out)?;
    println!("{}", report.markdown());
    if let Some(bounded) = runs.first()
        && bounded.all_followed_s().is_none()
    {
        anyhow::bail!("an adapter did not follow the shift within the run under the bound");
    }
    Ok(runs)
}
