//! The sizing's hysteresis, quota and churn bound, on a synthetic clock.

use std::time::{Duration, Instant};

use super::*;

fn spec(min: u32, max: u32) -> AutoReplicas {
    AutoReplicas {
        min,
        max,
        target_rps: 2.0,
        scale_up_window: Duration::from_secs(30),
        scale_down_window: Duration::from_secs(120),
    }
}

/// Decisions at `t0 + 10 s · i` for each rate in turn; the replicas after each.
fn run(s: &AutoReplicas, rates: &[f64], quota: Option<u32>) -> Vec<(u32, ScaleReason)> {
    let t0 = Instant::now();
    let mut sizer = Sizer::default();
    rates
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let d = sizer.decide(s, *r, 1, quota, t0 + Duration::from_secs(10 * i as u64));
            (d.replicas, d.reason)
        })
        .collect()
}

#[test]
fn recommendation_is_the_rate_over_the_target_within_bounds() {
    let s = spec(1, 4);
    let got: Vec<u32> = [0.0, 0.5, 2.0, 2.1, 7.9, 100.0, f64::NAN, -3.0]
        .iter()
        .map(|r| recommend(*r, &s))
        .collect();
    assert_eq!(got, [1, 1, 1, 2, 4, 4, 1, 1]);
}

#[test]
fn growth_needs_demand_sustained_over_the_scale_up_window() {
    use ScaleReason::*;
    // 7 req/s asks for 4 from t=10 s; the window (30 s) is covered at t=40 s.
    let got = run(&spec(1, 4), &[0.0, 7.0, 7.0, 7.0, 7.0, 7.0], None);
    assert_eq!(
        got,
        [
            (1, Steady),
            (1, AwaitingSustainedDemand),
            (1, AwaitingSustainedDemand),
            (1, AwaitingSustainedDemand),
            (4, ScaledUp),
            (4, Steady),
        ]
    );
}

#[test]
fn a_burst_shorter_than_the_window_adds_nothing() {
    let got = run(
        &spec(1, 4),
        &[0.0, 0.0, 0.0, 0.0, 7.0, 7.0, 0.0, 0.0, 0.0],
        None,
    );
    assert!(got.iter().all(|(r, _)| *r == 1), "{got:?}");
}

#[test]
fn shrinking_waits_for_the_scale_down_window_and_takes_its_largest_need() {
    use ScaleReason::*;
    let mut rates = vec![7.0; 5]; // 4 wanted from t=0 s: grown at t=30 s
    rates.extend([3.0; 1]); // t=50 s: 2 would do
    rates.extend([0.0; 13]); // t=60..180 s: 1 would do
    let got = run(&spec(1, 4), &rates, None);
    assert_eq!(got[3], (4, ScaledUp));
    assert_eq!(got[4], (4, Steady));
    // Until t=160 s the window still holds a 4 (t=40 s).
    assert!(
        got[5..=16].iter().all(|g| *g == (4, StabilizingScaleDown)),
        "{got:?}"
    );
    // t=170 s: the window [50 s, 170 s] holds a 2 at most.
    assert_eq!(got[17], (2, ScaledDown));
    // t=180 s: only 1s left in the window.
    assert_eq!(got[18], (1, ScaledDown));
}

#[test]
fn the_first_decision_starts_from_the_replicas_already_there() {
    let t0 = Instant::now();
    let mut sizer = Sizer::default();
    // An operator restart finds 3 holders and no demand: nothing is released yet.
    let d = sizer.decide(&spec(1, 4), 0.0, 3, None, t0);
    assert_eq!(
        (d.replicas, d.reason),
        (3, ScaleReason::StabilizingScaleDown)
    );
    // Holders beyond max are released at once.
    let mut sizer = Sizer::default();
    assert_eq!(sizer.decide(&spec(1, 2), 0.0, 5, None, t0).replicas, 2);
}

#[test]
fn a_quota_caps_growth_but_not_the_floor() {
    use ScaleReason::*;
    let got = run(&spec(2, 4), &[9.0; 6], Some(3));
    assert_eq!(got.last(), Some(&(3, TenantQuota)));
    let got = run(&spec(2, 4), &[9.0; 6], Some(0));
    assert_eq!(got.last(), Some(&(2, TenantQuota)));
}

#[test]
fn the_load_budget_is_a_sliding_minute() {
    let t0 = Instant::now();
    let mut b = LoadBudget::new(3);
    assert_eq!(b.available(t0), 3);
    b.spend(2, t0);
    assert_eq!(b.available(t0 + Duration::from_secs(10)), 1);
    b.spend(1, t0 + Duration::from_secs(10));
    assert_eq!(b.available(t0 + Duration::from_secs(59)), 0);
    assert_eq!(b.available(t0 + Duration::from_secs(60)), 2);
    assert_eq!(b.available(t0 + Duration::from_secs(70)), 3);
    let mut unbounded = LoadBudget::new(0);
    unbounded.spend(1000, t0);
    assert_eq!(unbounded.available(t0), u32::MAX);
}

#[test]
fn rendezvous_order_is_stable_and_spreads_adapters() {
    assert_eq!(
        rendezvous_score("team-a/sql", "pod-1"),
        rendezvous_score("team-a/sql", "pod-1")
    );
    assert_ne!(
        rendezvous_score("team-a/sql", "pod-1"),
        rendezvous_score("team-a/sq", "lpod-1"),
        "the separator keeps (adapter, pod) pairs apart"
    );
    // 400 adapters' first choice among 4 pods: each pod is someone's first about a quarter
    // of the time.
    let pods = ["p0", "p1", "p2", "p3"];
    let mut firsts = [0u32; 4];
    for i in 0..400 {
        let a = format!("t/adapter-{i}");
        let best = (0..4)
            .max_by_key(|&p| rendezvous_score(&a, pods[p]))
            .unwrap_or(0);
        firsts[best] += 1;
    }
    assert!(firsts.iter().all(|n| (70..=130).contains(n)), "{firsts:?}");
}
