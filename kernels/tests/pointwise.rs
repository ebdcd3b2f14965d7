//! `rms_norm`, rotary embedding (inverse frequencies, table, rotation), `silu_mul`,
//! `add_inplace` and `embedding` against naive f64 versions written from the HF formulas.
//!
//! Tolerances are stated per test; copies (`embedding`) and single f32 adds must be exact.

mod common;

use common::{Rng, assert_close, to_f64};
use loraplane_kernels::KernelError;
use loraplane_kernels::cpu::{
    Llama3RopeScaling, RopeTable, add_inplace, embedding, rms_norm, rope, rope_inv_freq, silu_mul,
};

fn kind(r: Result<(), KernelError>) -> Result<(), &'static str> {
    r.map_err(|e| e.kind())
}

// ---- rms_norm ----

fn naive_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / d as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &w)| f64::from(v) * inv * f64::from(w))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rms_norm_matches_naive() {
    // Tolerance 1e-5 relative + 1e-6 absolute.
    let mut rng = Rng::new(1);
    for (rows, d) in [(6, 37), (1, 1), (300, 512)] {
        let x = rng.vec(rows * d);
        let w = rng.vec(d);
        let mut out = vec![0.0; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out).unwrap();
        assert_close(&out, &naive_rms_norm(&x, &w, 1e-5), 1e-6, 1e-5, "rms_norm");
    }
}

#[test]
fn rms_norm_errors() {
    let mut out = vec![0.0; 6];
    assert_eq!(
        kind(rms_norm(&[1.0; 6], &[], 1e-5, &mut out)),
        Err("invalid_argument")
    );
    assert_eq!(
        kind(rms_norm(&[1.0; 6], &[1.0; 4], 1e-5, &mut out)),
        Err("ragged_rows")
    );
    assert_eq!(
        kind(rms_norm(&[1.0; 6], &[1.0; 3], 1e-5, &mut out[..5])),
        Err("shape_mismatch")
    );
    assert!(out.iter().all(|&x| x == 0.0));
}

// ---- rotary embedding ----

/// `_compute_default_rope_parameters` then `_compute_llama3_parameters`, transcribed in f64.
fn hf_inv_freq(head_dim: usize, theta: f64, s: Option<&Llama3RopeScaling>) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64))
        .collect();
    let Some(s) = s else { return base };
    let (factor, low, high) = (
        f64::from(s.factor),
        f64::from(s.low_freq_factor),
        f64::from(s.high_freq_factor),
    );
    let old = s.original_max_position_embeddings as f64;
    let (low_freq_wavelen, high_freq_wavelen) = (old / low, old / high);
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

fn llama31() -> Llama3RopeScaling {
    Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    }
}

#[test]
fn rope_inv_freq_default_matches_hf_formula() {
    // Tolerance 2e-6 relative (f32 powf vs f64).
    for (d, theta) in [(128, 10_000.0), (64, 1_000_000.0), (10, 500.0)] {
        let got = rope_inv_freq(d, theta as f32, None);
        assert_close(&got, &hf_inv_freq(d, theta, None), 0.0, 2e-6, "inv_freq");
    }
    assert_eq!(rope_inv_freq(0, 10_000.0, None), Vec::<f32>::new());
    assert_eq!(rope_inv_freq(3, 10_000.0, None).len(), 2); // like torch.arange(0, 3, 2)
}

#[test]
fn rope_inv_freq_llama3_matches_hf_formula_in_every_band() {
    // Llama 3.1 8B: head_dim 128, theta 500000. Tolerance 2e-6 relative.
    let s = llama31();
    let got = rope_inv_freq(128, 500_000.0, Some(&s));
    let want = hf_inv_freq(128, 500_000.0, Some(&s));
    assert_close(&got, &want, 0.0, 2e-6, "llama3 inv_freq");
    let unscaled = hf_inv_freq(128, 500_000.0, None);
    let bands = unscaled.iter().zip(&want).fold([0; 3], |mut n, (u, w)| {
        let r = w / u;
        n[if (r - 1.0).abs() < 1e-12 {
            0
        } else if (r - 0.125).abs() < 1e-12 {
            2
        } else {
            1
        }] += 1;
        n
    });
    assert!(
        bands.iter().all(|&n| n > 0),
        "kept / smoothed / divided counts: {bands:?}"
    );
    // Anchors: the highest frequency is untouched, the lowest divided by `factor`.
    assert_eq!(got[0], 1.0);
    let lowest = 500_000f64.powf(-126.0 / 128.0) / 8.0;
    assert!((f64::from(got[63]) - lowest).abs() <= 2e-6 * lowest);
    // A different band split (Llama 3.2 style factor 32).
    let s32 = Llama3RopeScaling { factor: 32.0, ..s };
    assert_close(
        &rope_inv_freq(64, 500_000.0, Some(&s32)),
        &hf_inv_freq(64, 500_000.0, Some(&s32)),
        0.0,
        2e-6,
        "factor 32",
    );
}

#[test]
fn rope_table_uses_the_f32_angle() {
    // HF and candle form `position * inv_freq` in f32 and take cos/sin of that. Tolerance 1e-6.
    let inv = rope_inv_freq(16, 10_000.0, Some(&llama31()));
    let table = RopeTable::new(&inv, 1000);
    assert_eq!(
        (table.half_dim, table.max_positions, table.cos.len()),
        (8, 1000, 8000)
    );
    for p in [0usize, 1, 17, 999] {
        for (i, &f) in inv.iter().enumerate() {
            let angle = f64::from(p as f32 * f);
            assert!((f64::from(table.cos[p * 8 + i]) - angle.cos()).abs() < 1e-6);
            assert!((f64::from(table.sin[p * 8 + i]) - angle.sin()).abs() < 1e-6);
        }
    }
}

/// Rotate-half written from the formula, angles as the table forms them.
fn naive_rope(x: &[f32], heads: usize, hd: usize, positions: &[usize], inv: &[f32]) -> Vec<f64> {
    let half = hd / 2;
    let mut out = to_f64(x);
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..half {
                let angle = f64::from(p as f32 * inv[i]);
                let (x1, x2) = (f64::from(x[base + i]), f64::from(x[base + i + half]));
                out[base + i] = x1 * angle.cos() - x2 * angle.sin();
                out[base + i + half] = x2 * angle.cos() + x1 * angle.sin();
            }
        }
    }
    out
}

#[test]
fn rope_matches_naive_rotate_half() {
    // Tolerance 1e-6 absolute + 1e-6 relative.
    let mut rng = Rng::new(2);
    let (heads, hd) = (3, 10);
    let inv = rope_inv_freq(hd, 10_000.0, None);
    let table = RopeTable::new(&inv, 301);
    for positions in [
        vec![7, 0, 300, 3, 3],
        (0..3000).map(|i| (i * 37) % 301).collect(),
    ] {
        let x0 = rng.vec(positions.len() * heads * hd);
        let mut x = x0.clone();
        rope(&mut x, heads, hd, &positions, &table).unwrap();
        assert_close(
            &x,
            &naive_rope(&x0, heads, hd, &positions, &inv),
            1e-6,
            1e-6,
            "rope",
        );
    }
}

#[test]
fn rope_errors_leave_x_untouched() {
    let inv = rope_inv_freq(4, 10_000.0, None);
    let table = RopeTable::new(&inv, 8);
    let mut x = vec![1.0f32; 2 * 2 * 4];
    assert_eq!(
        rope(&mut x, 2, 4, &[3, 8], &table),
        Err(KernelError::PositionOutOfRange {
            kernel: "rope",
            position: 8,
            max_positions: 8
        })
    );
    assert_eq!(
        kind(rope(&mut x, 2, 4, &[3], &table)),
        Err("shape_mismatch")
    );
    assert_eq!(
        kind(rope(&mut x, 4, 2, &[3, 4], &table)),
        Err("invalid_argument")
    ); // head_dim != 2·half
    assert_eq!(
        kind(rope(&mut x, 16, 1, &[3], &table)),
        Err("invalid_argument")
    ); // odd head_dim
    assert_eq!(
        kind(rope(&mut x, 0, 4, &[], &table)),
        Err("invalid_argument")
    );
    let broken = RopeTable {
        cos: vec![1.0; 3],
        ..table.clone()
    };
    assert_eq!(
        kind(rope(&mut x, 2, 4, &[3, 4], &broken)),
        Err("shape_mismatch")
    );
    assert!(x.iter().all(|&v| v == 1.0));
}

// ---- silu_mul, add_inplace, embedding ----

#[test]
fn silu_mul_matches_naive() {
    // Tolerance 1e-6 relative + 1e-7 absolute; gate spans [-8, 8) to reach both tails.
    let mut rng = Rng::new(3);
    for n in [1, 33, 100_003] {
        let gate: Vec<f32> = rng.vec(n).iter().map(|g| g * 8.0).collect();
        let up = rng.vec(n);
        let mut out = vec![0.0; n];
        silu_mul(&gate, &up, &mut out).unwrap();
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let g = f64::from(g);
                g / (1.0 + (-g).exp()) * f64::from(u)
            })
            .collect();
        assert_close(&out, &want, 1e-7, 1e-6, "silu_mul");
    }
    let mut out = vec![0.0; 3];
    assert_eq!(
        kind(silu_mul(&[1.0; 3], &[1.0; 2], &mut out)),
        Err("shape_mismatch")
    );
    assert_eq!(
        kind(silu_mul(&[1.0; 3], &[1.0; 3], &mut out[..2])),
        Err("shape_mismatch")
    );
}

#[test]
fn add_inplace_is_exact() {
    let mut rng = Rng::new(4);
    for n in [5, 70_001] {
        let x0 = rng.vec(n);
        let y = rng.vec(n);
        let mut x = x0.clone();
        add_inplace(&mut x, &y).unwrap();
        assert!(x.iter().zip(&x0).zip(&y).all(|((s, a), b)| *s == a + b));
    }
    assert_eq!(
        kind(add_inplace(&mut [1.0; 3], &[1.0; 4])),
        Err("shape_mismatch")
    );
}

#[test]
fn embedding_copies_rows_exactly() {
    let mut rng = Rng::new(5);
    for (vocab, d, ids) in [
        (11usize, 7usize, vec![10u32, 0, 3, 3, 9]),
        (50, 64, (0..2000).map(|i| (i * 7 % 50) as u32).collect()),
    ] {
        let table = rng.vec(vocab * d);
        let mut out = vec![0.0; ids.len() * d];
        embedding(&ids, &table, d, &mut out).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            assert_eq!(
                out[t * d..(t + 1) * d],
                table[id as usize * d..(id as usize + 1) * d],
                "token {t}"
            );
        }
    }
}

#[test]
fn embedding_errors_leave_out_untouched() {
    let table = vec![1.0f32; 4 * 3];
    let mut out = vec![0.0f32; 2 * 3];
    assert_eq!(
        embedding(&[1, 4], &table, 3, &mut out),
        Err(KernelError::TokenOutOfRange {
            kernel: "embedding",
            id: 4,
            vocab: 4
        })
    );
    assert_eq!(
        kind(embedding(&[1, 2], &table, 3, &mut out[..5])),
        Err("shape_mismatch")
    );
    assert_eq!(
        kind(embedding(&[1, 2], &table, 5, &mut out)),
        Err("ragged_rows")
    );
    assert_eq!(
        kind(embedding(&[1, 2], &table, 0, &mut out)),
        Err("invalid_argument")
    );
    assert!(out.iter().all(|&x| x == 0.0));
}

#[test]
fn stream_sum_adds_every_element_serial_and_parallel() {
    for n in [0usize, 1, 15, 17, 1000, (1 << 16) + 3, 1 << 18] {
        let x: Vec<f32> = (0..n).map(|i| ((i % 7) as f32) - 3.0 + 0.25).collect();
        let exact: f64 = x.iter().map(|v| f64::from(*v)).sum();
        let got = loraplane_kernels::cpu::stream_sum(&x);
        assert!(
            (f64::from(got) - exact).abs() <= 1e-3 * (1.0 + exact.abs()),
            "n={n}: {got} vs {exact}"
        );
    }
}
