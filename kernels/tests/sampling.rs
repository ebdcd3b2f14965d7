//! `argmax`, `log_softmax` and `sample`: greedy and truncated sampling against a naive
//! distribution written in the test, determinism, tie order, and every error path.

mod common;

use common::{Rng, assert_close};
use loraplane_kernels::KernelError;
use loraplane_kernels::cpu::{SamplingSpec, argmax, log_softmax, sample};

fn spec(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingSpec {
    SamplingSpec {
        temperature,
        top_k,
        top_p,
    }
}

fn naive_log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x
        .iter()
        .map(|&v| (f64::from(v) - m).exp())
        .sum::<f64>()
        .ln();
    x.iter().map(|&v| f64::from(v) - lse).collect()
}

/// The distribution `sample` must draw from, per token id, built the slow way in f64: order by
/// probability then id, truncate to top_k, then to the top_p prefix, renormalise.
fn naive_distribution(x: &[f32], s: &SamplingSpec) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let scaled: Vec<f64> = x
        .iter()
        .map(|&v| (f64::from(v) - m) / f64::from(s.temperature))
        .collect();
    let mut order: Vec<usize> = (0..x.len())
        .filter(|&i| x[i] != f32::NEG_INFINITY)
        .collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    order.truncate(s.top_k.unwrap_or(usize::MAX));
    let z: f64 = order.iter().map(|&i| scaled[i].exp()).sum();
    if let Some(p) = s.top_p {
        let mut mass = 0.0;
        let keep = order
            .iter()
            .position(|&i| {
                mass += scaled[i].exp() / z;
                mass >= f64::from(p)
            })
            .map_or(order.len(), |k| k + 1);
        order.truncate(keep);
    }
    let z: f64 = order.iter().map(|&i| scaled[i].exp()).sum();
    let mut probs = vec![0.0; x.len()];
    for &i in &order {
        probs[i] = scaled[i].exp() / z;
    }
    probs
}

/// Draws with `n` evenly spaced uniforms (a stratified sweep, so frequencies are within ~2/n of
/// the true probabilities) and returns the frequency of every token.
fn sweep(x: &[f32], s: &SamplingSpec, n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; x.len()];
    for i in 0..n {
        let (token, _) = sample(x, s, ((i as f64 + 0.5) / n as f64) as f32).expect("valid draw");
        counts[token] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

#[test]
fn argmax_takes_lowest_index_on_ties_and_skips_nan() {
    assert_eq!(argmax(&[1.0, 3.0, -2.0, 3.0]), Some((1, 3.0)));
    assert_eq!(
        argmax(&[f32::NAN, 0.5, f32::NAN, 2.0, f32::NAN]),
        Some((3, 2.0))
    );
    assert_eq!(
        argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]),
        Some((0, f32::NEG_INFINITY))
    );
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
    assert_eq!(argmax(&[]), None);
}

#[test]
fn log_softmax_matches_naive_and_normalises() {
    // Tolerance 1e-6 absolute + 1e-6 relative.
    let mut rng = Rng::new(1);
    let mut x: Vec<f32> = rng.vec(1001).iter().map(|v| v * 30.0).collect();
    x[17] = f32::NEG_INFINITY;
    let mut out = vec![0.0; x.len()];
    log_softmax(&x, &mut out).unwrap();
    let want = naive_log_softmax(&x);
    assert_eq!(out[17], f32::NEG_INFINITY);
    let finite: Vec<usize> = (0..x.len()).filter(|&i| i != 17).collect();
    let got: Vec<f32> = finite.iter().map(|&i| out[i]).collect();
    let want: Vec<f64> = finite.iter().map(|&i| want[i]).collect();
    assert_close(&got, &want, 1e-6, 1e-6, "log_softmax");
    let total: f64 = out.iter().map(|&l| f64::from(l).exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
    assert_eq!(
        log_softmax(&x, &mut out[1..]).map_err(|e| e.kind()),
        Err("shape_mismatch")
    );
}

#[test]
fn greedy_returns_argmax_and_its_full_softmax_logprob() {
    let mut rng = Rng::new(2);
    let x: Vec<f32> = rng.vec(500).iter().map(|v| v * 10.0).collect();
    let (best, _) = argmax(&x).unwrap();
    let want = naive_log_softmax(&x)[best];
    for temperature in [0.0, -1.0] {
        for u in [0.0, 0.5, 0.999] {
            let (token, logprob) = sample(&x, &spec(temperature, Some(3), Some(0.5)), u).unwrap();
            assert_eq!(token, best);
            assert!((f64::from(logprob) - want).abs() < 1e-6);
        }
    }
}

#[test]
fn top_k_one_and_tiny_top_p_equal_argmax() {
    let mut rng = Rng::new(3);
    for trial in 0..20 {
        let mut x: Vec<f32> = rng.vec(257).iter().map(|v| v * 5.0).collect();
        if trial % 2 == 0 {
            x[200] = 9.0; // a tie at the top: the lower id must win
            x[40] = 9.0;
        }
        let (best, _) = argmax(&x).unwrap();
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(sample(&x, &spec(1.3, Some(1), None), u).unwrap().0, best);
            assert_eq!(sample(&x, &spec(0.7, None, Some(1e-6)), u).unwrap().0, best);
            assert_eq!(
                sample(&x, &spec(2.0, Some(50), Some(1e-9)), u).unwrap().0,
                best
            );
        }
    }
}

#[test]
fn same_uniform_same_token_and_logprob_is_unmodified_softmax() {
    let mut rng = Rng::new(4);
    let x: Vec<f32> = rng.vec(1000).iter().map(|v| v * 4.0).collect();
    let lsm = naive_log_softmax(&x);
    let s = spec(0.8, Some(40), Some(0.9));
    for _ in 0..50 {
        let u = (rng.f32() + 1.0) / 2.0;
        let first = sample(&x, &s, u).unwrap();
        assert_eq!(sample(&x, &s, u).unwrap(), first);
        assert!(
            (f64::from(first.1) - lsm[first.0]).abs() < 1e-6,
            "logprob ignores temperature and truncation"
        );
    }
}

#[test]
fn cumulative_pick_follows_probability_then_id_order() {
    // Probabilities 0.5, 0.3, 0.2 in that order: boundaries at 0.5 and 0.8.
    let x = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let s = spec(1.0, None, None);
    let pick = |u| sample(&x, &s, u).unwrap().0;
    assert_eq!(
        (
            pick(0.0),
            pick(0.49),
            pick(0.51),
            pick(0.79),
            pick(0.81),
            pick(0.999)
        ),
        (0, 0, 1, 1, 2, 2)
    );
    // Equal logits at ids 3 and 1: id 1 comes first in the cumulative order.
    let tie = [1.0f32, 3.0, 0.5, 3.0];
    let p1 = naive_distribution(&tie, &s)[1];
    assert_eq!(sample(&tie, &s, (p1 * 0.9) as f32).unwrap().0, 1);
    assert_eq!(sample(&tie, &s, (p1 * 1.1) as f32).unwrap().0, 3);
    // -inf logits are never candidates, even at the very end of the range.
    let masked = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, -1.0];
    assert_eq!(sample(&masked, &s, 0.999_999_9).unwrap().0, 3);
}

#[test]
fn sample_frequencies_match_the_truncated_distribution() {
    // Stratified sweep of 100 000 draws: |frequency - probability| <= 2e-5 + 1e-6.
    let mut rng = Rng::new(5);
    let x: Vec<f32> = rng.vec(12).iter().map(|v| v * 3.0).collect();
    for s in [
        spec(1.0, None, None),
        spec(0.7, Some(4), None),
        spec(1.5, None, Some(0.8)),
        spec(0.9, Some(6), Some(0.75)),
        spec(100.0, None, None),   // nearly uniform
        spec(0.05, Some(5), None), // nearly greedy
    ] {
        let n = 100_000;
        let want = naive_distribution(&x, &s);
        let got: Vec<f32> = sweep(&x, &s, n).iter().map(|&f| f as f32).collect();
        assert_close(&got, &want, 2.0 / n as f64 + 1e-6, 0.0, &format!("{s:?}"));
        let kept = want.iter().filter(|&&p| p > 0.0).count();
        if let Some(k) = s.top_k {
            assert!(kept <= k);
        }
    }
}

#[test]
fn tiny_temperature_does_not_overflow() {
    let x = [1.0f32, 30.0, 29.999, -5.0];
    for u in [0.0, 0.5, 0.99] {
        assert_eq!(sample(&x, &spec(1e-30, None, None), u).unwrap().0, 1);
    }
}

#[test]
fn sample_errors() {
    let kind = |x: &[f32], s: SamplingSpec, u: f32| sample(x, &s, u).map_err(|e| e.kind());
    let ok = spec(1.0, None, None);
    match sample(&[0.0, f32::NAN], &ok, 0.5) {
        Err(KernelError::InvalidLogit {
            kernel: "sample",
            index: 1,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("expected InvalidLogit at 1, got {other:?}"),
    }
    assert_eq!(kind(&[0.0, f32::NAN], ok, 0.5), Err("invalid_logit"));
    assert_eq!(kind(&[0.0, f32::INFINITY], ok, 0.5), Err("invalid_logit"));
    assert_eq!(
        kind(&[0.0, f32::INFINITY], spec(0.0, None, None), 0.5),
        Err("invalid_logit")
    );
    assert_eq!(kind(&[], ok, 0.5), Err("empty_distribution"));
    assert_eq!(
        kind(&[f32::NEG_INFINITY; 3], ok, 0.5),
        Err("empty_distribution")
    );
    assert_eq!(
        kind(&[1.0], spec(f32::NAN, None, None), 0.5),
        Err("invalid_argument")
    );
    assert_eq!(
        kind(&[1.0], spec(1.0, Some(0), None), 0.5),
        Err("invalid_argument")
    );
    for p in [0.0, -0.1, 1.01, f32::NAN] {
        assert_eq!(
            kind(&[1.0], spec(1.0, None, Some(p)), 0.5),
            Err("invalid_argument"),
            "top_p {p}"
        );
    }
    for u in [1.0, -0.01, f32::NAN, f32::INFINITY] {
        assert_eq!(kind(&[1.0], ok, u), Err("invalid_argument"), "uniform {u}");
    }
    // top_k larger than the vocabulary and top_p == 1 are plain sampling.
    assert_eq!(
        sample(&[0.0, 1.0], &spec(1.0, Some(10), Some(1.0)), 0.0).map(|r| r.0),
        Ok(1)
    );
}
