//! `lora_shrink` / `lora_expand` against naive f64 implementations on a heterogeneous batch:
//! segments of different ranks (including rank 0), rows that belong to no segment, A and Bᵀ
//! rows scattered over the pool in no particular order, in_dim ≠ out_dim; and the fused `lora`
//! bit for bit against the two.
//!
//! Tolerance: |got − want| <= 1e-5 + 1e-5·|want| (inputs in [-1, 1]).

mod common;

use common::{Rng, assert_close, to_f64};
use loraplane_kernels::KernelError;
use loraplane_kernels::cpu::{LoraSegment, lora, lora_expand, lora_shrink};

const TOL: f64 = 1e-5;

struct Adapter {
    rows: std::ops::Range<usize>,
    a: Vec<usize>,
    b: Vec<usize>,
    scale: f32,
}

/// Rows of A (`in_dim`) and Bᵀ (`out_dim`) at distinct random offsets in a random pool.
fn adapters(
    rng: &mut Rng,
    pool_len: usize,
    in_dim: usize,
    out_dim: usize,
    spec: &[(std::ops::Range<usize>, usize, f32)],
) -> Vec<Adapter> {
    spec.iter()
        .map(|(rows, rank, scale)| Adapter {
            rows: rows.clone(),
            a: (0..*rank).map(|_| rng.below(pool_len - in_dim)).collect(),
            b: (0..*rank).map(|_| rng.below(pool_len - out_dim)).collect(),
            scale: *scale,
        })
        .collect()
}

fn segments(adapters: &[Adapter]) -> Vec<LoraSegment<'_>> {
    adapters
        .iter()
        .map(|a| LoraSegment {
            rows: a.rows.clone(),
            a_rows: &a.a,
            b_rows: &a.b,
            scale: a.scale,
        })
        .collect()
}

fn naive_shrink(
    x: &[f32],
    in_dim: usize,
    pool: &[f32],
    ads: &[Adapter],
    max_rank: usize,
    v: &[f32],
) -> Vec<f64> {
    let mut want = to_f64(v); // rows in no segment keep their value
    for ad in ads {
        for t in ad.rows.clone() {
            for j in 0..max_rank {
                want[t * max_rank + j] = match ad.a.get(j) {
                    Some(&off) => (0..in_dim)
                        .map(|k| f64::from(x[t * in_dim + k]) * f64::from(pool[off + k]))
                        .sum(),
                    None => 0.0,
                };
            }
        }
    }
    want
}

fn naive_expand(
    v: &[f32],
    max_rank: usize,
    pool: &[f32],
    ads: &[Adapter],
    out_dim: usize,
    y: &[f32],
) -> Vec<f64> {
    let mut want = to_f64(y);
    for ad in ads {
        for t in ad.rows.clone() {
            for o in 0..out_dim {
                let s: f64 =
                    ad.b.iter()
                        .enumerate()
                        .map(|(j, &off)| f64::from(v[t * max_rank + j]) * f64::from(pool[off + o]))
                        .sum();
                want[t * out_dim + o] += f64::from(ad.scale) * s;
            }
        }
    }
    want
}

/// Shrink then expand over `rows` rows, each checked against the naive version.
fn check(
    seed: u64,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    max_rank: usize,
    spec: &[(std::ops::Range<usize>, usize, f32)],
) {
    let mut rng = Rng::new(seed);
    let pool = rng.vec(4096.max(8 * (in_dim + out_dim)));
    let ads = adapters(&mut rng, pool.len(), in_dim, out_dim, spec);
    let segs = segments(&ads);
    let x = rng.vec(rows * in_dim);

    let mut v = vec![-3.0f32; rows * max_rank];
    let want_v = naive_shrink(&x, in_dim, &pool, &ads, max_rank, &v);
    lora_shrink(&x, in_dim, &pool, &segs, max_rank, &mut v).expect("valid shrink");
    assert_close(&v, &want_v, TOL, TOL, "v");

    let y0 = rng.vec(rows * out_dim);
    let mut y = y0.clone();
    let want_y = naive_expand(&v, max_rank, &pool, &ads, out_dim, &y0);
    lora_expand(&v, max_rank, &pool, &segs, out_dim, &mut y).expect("valid expand");
    assert_close(&y, &want_y, TOL, TOL, "y");
    // Fused, chunk by chunk: the very same bits.
    let mut fused = y0.clone();
    lora(&x, in_dim, &pool, &segs, max_rank, out_dim, &mut fused).expect("valid lora");
    assert_eq!(fused, y, "lora against lora_shrink + lora_expand");
    // Base-model rows are bit-identical, not merely close.
    for t in (0..rows).filter(|t| !spec.iter().any(|(r, _, _)| r.contains(t))) {
        assert_eq!(
            y[t * out_dim..(t + 1) * out_dim],
            y0[t * out_dim..(t + 1) * out_dim],
            "base row {t}"
        );
    }
}

#[test]
fn heterogeneous_decode_batch_matches_naive() {
    // Rows 0, 5, 6 are the base model; one adapter of rank 0; ranks 3 and 5 under max rank 6.
    let spec = [(1..4, 3, 0.5), (4..5, 0, 2.0), (7..11, 5, -1.25)];
    check(1, 11, 37, 23, 6, &spec);
}

#[test]
fn segments_in_any_order_and_single_rows_match_naive() {
    let spec = [(9..10, 2, 1.0), (0..2, 6, 0.125), (3..4, 1, 4.0)];
    check(2, 10, 19, 41, 6, &spec);
}

#[test]
fn large_prefill_batch_takes_the_parallel_path_and_matches_naive() {
    let spec = [(0..40, 8, 0.5), (45..100, 16, 0.25), (100..101, 4, 1.0)];
    check(3, 120, 160, 96, 16, &spec);
}

#[test]
fn prefill_segments_with_ragged_ranks_and_columns_match_naive() {
    // Ranks that leave a partial GEMM panel (20 of 32), outputs that leave a column tail
    // (37 = 2·16 + 5), long segments (GEMM path) beside a single row (streaming path).
    let spec = [(0..30, 20, 0.5), (30..31, 24, 1.0), (33..64, 24, 2.0)];
    check(4, 64, 50, 37, 24, &spec);
}

#[test]
fn rows_longer_than_a_shrink_block_match_naive() {
    // 2,100 columns: two whole blocks of 1,024 and a last one of 52 (a 16-float body and a
    // tail of 4), summed block by block; a prefill segment and decode-sized ones, one of them a
    // single row (the fused kernel's one-row shrink).
    check(
        11,
        21,
        2100,
        40,
        6,
        &[
            (0..14, 5, 0.3),
            (14..16, 6, -0.7),
            (17..20, 3, 1.5),
            (20..21, 5, 0.9),
        ],
    );
}

#[test]
fn a_row_gets_the_same_bits_in_a_prefill_segment_and_alone() {
    // A prefill segment (40 rows: the GEMM-tiled expand, several shrink tiles) and each row as
    // a one-row decode segment give identical bits, so chunking and batching never change a
    // token. Odd rank (a lone A row in the last shrink tile), in_dim with a tail past the
    // 16-float body, out_dim past one packed column block (256) with a column tail; and rows
    // longer than a shrink block (summed block by block).
    for in_dim in [170, 2100] {
        same_bits_in_a_prefill_segment_and_alone(in_dim);
    }
}

fn same_bits_in_a_prefill_segment_and_alone(in_dim: usize) {
    let (rows, out_dim, rank, max_rank) = (40, 300, 7, 8);
    let mut rng = Rng::new(7);
    let pool = rng.vec(8192.max(8 * (in_dim + out_dim)));
    let ads = adapters(
        &mut rng,
        pool.len(),
        in_dim,
        out_dim,
        &[(0..rows, rank, 0.37)],
    );
    let segs = segments(&ads);
    let x = rng.vec(rows * in_dim);
    let y0 = rng.vec(rows * out_dim);
    let mut v = vec![0.0f32; rows * max_rank];
    lora_shrink(&x, in_dim, &pool, &segs, max_rank, &mut v).expect("shrink");
    let mut y = y0.clone();
    lora_expand(&v, max_rank, &pool, &segs, out_dim, &mut y).expect("expand");
    for t in [0, 1, 2, 3, 17, 38, 39] {
        let one = [LoraSegment {
            rows: 0..1,
            ..segs[0].clone()
        }];
        let mut v1 = vec![0.0f32; max_rank];
        let x1 = &x[t * in_dim..(t + 1) * in_dim];
        lora_shrink(x1, in_dim, &pool, &one, max_rank, &mut v1).expect("shrink one");
        assert_eq!(v1, v[t * max_rank..(t + 1) * max_rank], "v of row {t}");
        let mut y1 = y0[t * out_dim..(t + 1) * out_dim].to_vec();
        lora_expand(&v1, max_rank, &pool, &one, out_dim, &mut y1).expect("expand one");
        assert_eq!(y1, y[t * out_dim..(t + 1) * out_dim], "y of row {t}");
        // The fused kernel's one-row path: the same bits again.
        let mut y2 = y0[t * out_dim..(t + 1) * out_dim].to_vec();
        lora(x1, in_dim, &pool, &one, max_rank, out_dim, &mut y2).expect("fused one");
        assert_eq!(y2, y1, "fused y of row {t}");
    }
}

#[test]
fn max_rank_zero_is_a_no_op() {
    let pool = vec![1.0f32; 64];
    let x = vec![1.0f32; 2 * 8];
    let segs = [LoraSegment {
        rows: 0..2,
        a_rows: &[],
        b_rows: &[],
        scale: 1.0,
    }];
    let mut v: Vec<f32> = vec![];
    lora_shrink(&x, 8, &pool, &segs, 0, &mut v).unwrap();
    let mut y = vec![2.0f32; 2 * 4];
    lora_expand(&v, 0, &pool, &segs, 4, &mut y).unwrap();
    assert_eq!(y, vec![2.0; 8]);
    lora(&x, 8, &pool, &segs, 0, 4, &mut y).unwrap();
    assert_eq!(y, vec![2.0; 8]);
}

#[test]
fn lora_errors_are_reported_and_outputs_untouched() {
    let pool = vec![0.5f32; 100];
    let (in_dim, out_dim, max_rank, rows) = (10, 6, 3, 4);
    let x = vec![1.0f32; rows * in_dim];
    let v = vec![1.0f32; rows * max_rank];
    let shrink = |segs: &[LoraSegment<'_>], x: &[f32], v_len: usize| {
        let mut v = vec![9.0f32; v_len];
        let r = lora_shrink(x, in_dim, &pool, segs, max_rank, &mut v);
        assert!(v.iter().all(|&e| e == 9.0));
        r.map_err(|e| e.kind())
    };
    let expand = |segs: &[LoraSegment<'_>], y_len: usize| {
        let mut y = vec![9.0f32; y_len];
        let r = lora_expand(&v, max_rank, &pool, segs, out_dim, &mut y);
        assert!(y.iter().all(|&e| e == 9.0));
        r.map_err(|e| e.kind())
    };
    let fused = |segs: &[LoraSegment<'_>], x: &[f32], y_len: usize| {
        let mut y = vec![9.0f32; y_len];
        let r = lora(x, in_dim, &pool, segs, max_rank, out_dim, &mut y);
        assert!(y.iter().all(|&e| e == 9.0));
        r.map_err(|e| e.kind())
    };
    let seg = |rows, a_rows, b_rows| LoraSegment {
        rows,
        a_rows,
        b_rows,
        scale: 1.0,
    };
    let (a2, b2) = ([0usize, 10], [0usize, 6]);
    let y_len = rows * out_dim;
    for (segs, x, y_len, kind) in [
        (
            vec![seg(0..2, &a2[..], &b2[..])],
            &x[1..],
            y_len,
            "ragged_rows",
        ),
        (vec![seg(0..2, &a2, &b2)], &x[..], y_len + 1, "ragged_rows"),
        (
            vec![seg(0..2, &a2, &b2)],
            &x[..],
            y_len - out_dim,
            "shape_mismatch",
        ),
        (
            vec![seg(0..5, &a2, &b2)],
            &x[..],
            y_len,
            "rows_out_of_range",
        ),
        (
            vec![seg(0..2, &a2, &b2), seg(1..3, &a2, &b2)],
            &x[..],
            y_len,
            "rows_overlap",
        ),
        (vec![seg(0..2, &a2, &b2[..1])], &x[..], y_len, "bad_rank"),
        (
            vec![seg(0..2, &[0, 91], &b2)],
            &x[..],
            y_len,
            "pool_offset_out_of_range",
        ),
        (
            vec![seg(0..2, &a2, &[0, 95])],
            &x[..],
            y_len,
            "pool_offset_out_of_range",
        ),
    ] {
        assert_eq!(fused(&segs, x, y_len), Err(kind), "{kind}");
    }

    assert_eq!(
        shrink(&[seg(0..2, &a2, &b2)], &x[1..], v.len()),
        Err("ragged_rows")
    );
    assert_eq!(
        shrink(&[seg(0..2, &a2, &b2)], &x, v.len() - 1),
        Err("shape_mismatch")
    );
    assert_eq!(
        shrink(&[seg(0..5, &a2, &b2)], &x, v.len()),
        Err("rows_out_of_range")
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 3..1;
    assert_eq!(
        shrink(&[seg(reversed, &a2, &b2)], &x, v.len()),
        Err("rows_out_of_range")
    );
    assert_eq!(
        shrink(&[seg(0..2, &a2, &b2), seg(1..3, &a2, &b2)], &x, v.len()),
        Err("rows_overlap")
    );
    assert_eq!(
        shrink(&[seg(0..2, &[0, 1, 2, 3], &[0, 1, 2, 3])], &x, v.len()),
        Err("bad_rank")
    );
    assert_eq!(
        shrink(&[seg(0..2, &a2, &b2[..1])], &x, v.len()),
        Err("bad_rank")
    );
    assert_eq!(
        shrink(&[seg(0..2, &[0, 91], &b2)], &x, v.len()),
        Err("pool_offset_out_of_range")
    );
    assert_eq!(
        shrink(&[seg(0..2, &[usize::MAX], &[0])], &x, v.len()),
        Err("pool_offset_out_of_range")
    );

    assert_eq!(
        expand(&[seg(0..2, &a2, &b2)], rows * out_dim + 1),
        Err("ragged_rows")
    );
    assert_eq!(
        expand(&[seg(0..2, &a2, &b2)], (rows + 1) * out_dim),
        Err("shape_mismatch")
    );
    assert_eq!(
        expand(&[seg(0..2, &a2, &[0, 95])], rows * out_dim),
        Err("pool_offset_out_of_range")
    );
    assert_eq!(
        expand(&[seg(2..5, &a2, &b2)], rows * out_dim),
        Err("rows_out_of_range")
    );

    let mut v0 = vec![0.0f32; 0];
    assert_eq!(
        lora_shrink(&[], 0, &pool, &[], max_rank, &mut v0).map_err(|e| e.kind()),
        Err("invalid_argument")
    );
    let mut y0 = vec![0.0f32; 0];
    assert_eq!(
        lora_expand(&v, max_rank, &pool, &[], 0, &mut y0).map_err(|e| e.kind()),
        Err("invalid_argument")
    );
    assert_eq!(
        lora_shrink(
            &x,
            in_dim,
            &pool,
            &[seg(0..2, &[0, 1, 2, 3], &[0, 1, 2, 3])],
            max_rank,
            &mut [0.0; 12]
        ),
        Err(KernelError::BadRank {
            kernel: "lora_shrink",
            segment: 0,
            rank: 4,
            b_rank: 4,
            max_rank: 3
        })
    );
}
