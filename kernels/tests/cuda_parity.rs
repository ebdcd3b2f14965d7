//! Every CUDA kernel against its CPU reference (feature `cuda`), on asymmetric data: odd sizes
//! that are not multiples of a warp or a block, head_dim ≠ block_size, grouped-query heads,
//! pages in scrambled order with the rest of the pool poisoned with NaN (a misplaced read
//! shows up), segments of different ranks with base-model rows between them.
//!
//! Without a CUDA device every test prints `SKIPPED: no CUDA device (...)` to stderr (past
//! the harness's capture) and passes: CI machines have no GPU. Tolerances, per kernel:
//! - copies (embedding, row selection, KV write/gather/scatter) and argmax: exact;
//! - pointwise (`add`, bias): exact; `silu_mul`, RoPE: 1e-6 abs + 1e-6 rel (CUDA's `expf`
//!   and FMA contraction differ from Rust's by an ulp or two);
//! - RMSNorm, log-softmax: 1e-5 abs + 1e-5 rel (block-wide sums in another order);
//! - attention: 2e-5 abs + 1e-4 rel (online softmax and split merges reorder the sums);
//! - LoRA, f32 GEMM: 1e-4 · Σ|terms| (sums of ~10³–10⁴ products in another order);
//!   bf16/f16 GEMM: the same bound against an f64 reference on the rounded inputs.
//!
//! Each check that passes writes a `parity: <what>: <worst error>` line to stderr (`exact`, or
//! the largest error and its share of the tolerance), which `scripts/gpu-check.sh` collects.

#![cfg(feature = "cuda")]
// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::OnceLock;

use common::{Rng, assert_close, to_f64};
use loraplane_kernels::cpu::{self, AttnSeq, KvLayout, LoraSegment, RopeTable};
use loraplane_kernels::cuda::ops::{self, DeviceRopeTable};
use loraplane_kernels::cuda::{CudaDevice, DeviceMatrix, WeightDtype, copy_bandwidth, linear};

/// One device for the whole binary (kernels compile once); `None` without CUDA.
fn device() -> Option<&'static CudaDevice> {
    static DEV: OnceLock<Result<CudaDevice, String>> = OnceLock::new();
    match DEV.get_or_init(|| CudaDevice::open(0).map_err(|e| e.to_string())) {
        Ok(dev) => Some(dev),
        Err(reason) => {
            // Straight to fd 2: the test harness captures print!/eprint! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({reason})");
            None
        }
    }
}

/// A `parity: <what>: <detail>` line on stderr, past the harness's capture, in one write so
/// that the harness's own output, in the same log, cannot split it.
fn report(what: &str, detail: &str) {
    let _ = std::io::stderr().write_all(format!("parity: {what}: {detail}\n").as_bytes());
}

/// [`assert_close`], reporting the largest error and its share of the tolerance.
#[track_caller]
fn close(got: &[f32], want: &[f64], abs: f64, rel: f64, what: &str) {
    assert_close(got, want, abs, rel, what);
    let (mut worst, mut share) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let err = (f64::from(g) - w).abs();
        worst = worst.max(err);
        share = share.max(err / (abs + rel * w.abs()));
    }
    report(
        what,
        &format!(
            "max |err| {worst:.3e}, {:.1} % of the tolerance",
            share * 100.0
        ),
    );
}

macro_rules! device_or_skip {
    () => {
        match device() {
            Some(dev) => dev,
            None => return,
        }
    };
}

#[test]
fn rms_norm_matches() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(1);
    for (rows, d) in [(7, 4099), (3, 37), (1, 1)] {
        let x = rng.vec(rows * d);
        let w = rng.vec(d);
        let mut want = vec![0.0; rows * d];
        cpu::rms_norm(&x, &w, 1e-5, &mut want).unwrap();
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
        let mut out = dev.zeros(rows * d).unwrap();
        ops::rms_norm(dev, &xd, &wd, 1e-5, &mut out).unwrap();
        let got = dev.download(&out).unwrap();
        close(
            &got,
            &to_f64(&want),
            1e-5,
            1e-5,
            &format!("rms_norm {rows}x{d}"),
        );
    }
}

#[test]
fn pointwise_kernels_match() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(2);
    let n = 100_003;
    let (gate, up) = (rng.vec(n), rng.vec(n));
    let gate: Vec<f32> = gate.iter().map(|g| g * 12.0).collect(); // reach both tails
    let mut want = vec![0.0; n];
    cpu::silu_mul(&gate, &up, &mut want).unwrap();
    let (gd, ud) = (dev.upload(&gate).unwrap(), dev.upload(&up).unwrap());
    let mut out = dev.zeros(n).unwrap();
    ops::silu_mul(dev, &gd, &ud, &mut out).unwrap();
    close(
        &dev.download(&out).unwrap(),
        &to_f64(&want),
        1e-6,
        1e-6,
        "silu_mul",
    );

    let mut x = rng.vec(n);
    let y = rng.vec(n);
    let mut xd = dev.upload(&x).unwrap();
    ops::add(dev, &mut xd, &dev.upload(&y).unwrap()).unwrap();
    cpu::add_inplace(&mut x, &y).unwrap();
    assert_eq!(dev.download(&xd).unwrap(), x, "add");
    report("add", "exact");

    let cols = 331;
    let bias = rng.vec(cols);
    let rows = rng.vec(cols * 5);
    let mut rd = dev.upload(&rows).unwrap();
    ops::add_bias(dev, &mut rd, &dev.upload(&bias).unwrap()).unwrap();
    let want: Vec<f32> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| r + bias[i % cols])
        .collect();
    assert_eq!(dev.download(&rd).unwrap(), want, "add_bias");
    report("add_bias", "exact");
    // Shape errors are the reference's.
    let short = dev.upload(&y[..10]).unwrap();
    assert_eq!(
        ops::add(dev, &mut xd, &short).unwrap_err().kind(),
        cpu::add_inplace(&mut x, &y[..10]).unwrap_err().kind()
    );
}

fn rounded(x: &[f32], dtype: WeightDtype) -> Vec<f32> {
    x.iter()
        .map(|&v| match dtype {
            WeightDtype::F32 => v,
            WeightDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            WeightDtype::F16 => half::f16::from_f32(v).to_f32(),
        })
        .collect()
}

#[test]
fn embedding_and_row_selection_are_exact_copies() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(3);
    let (vocab, d) = (53, 301);
    let table = rng.vec(vocab * d);
    let ids = [52u32, 0, 7, 7, 31];
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let t = DeviceMatrix::upload(dev, &table, vocab, d, dtype).unwrap();
        let mut out = dev.zeros(ids.len() * d).unwrap();
        ops::embedding(dev, &ids, &t, &mut out).unwrap();
        let mut want = vec![0.0; ids.len() * d];
        cpu::embedding(&ids, &rounded(&table, dtype), d, &mut want).unwrap();
        assert_eq!(dev.download(&out).unwrap(), want, "embedding {dtype:?}");
        report(&format!("embedding {dtype:?}"), "exact");
        let err = ops::embedding(dev, &[53], &t, &mut dev.zeros(d).unwrap()).unwrap_err();
        assert_eq!(err.kind(), "token_out_of_range");
    }
    let x = rng.vec(9 * d);
    let rows = [8usize, 2, 2, 0];
    let mut out = dev.zeros(rows.len() * d).unwrap();
    ops::select_rows(dev, &dev.upload(&x).unwrap(), d, &rows, &mut out).unwrap();
    let want: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * d..(r + 1) * d].to_vec())
        .collect();
    assert_eq!(dev.download(&out).unwrap(), want, "select_rows");
    report("select_rows", "exact");
}

#[test]
fn rope_matches_with_llama3_scaling() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(4);
    let (heads, head_dim) = (3, 10);
    let scaling = cpu::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let inv = cpu::rope_inv_freq(head_dim, 500_000.0, Some(&scaling));
    let table = RopeTable::new(&inv, 4096);
    let positions = [4095usize, 0, 17, 1000, 17, 3];
    let x = rng.vec(positions.len() * heads * head_dim);
    let mut want = x.clone();
    cpu::rope(&mut want, heads, head_dim, &positions, &table).unwrap();
    let t = DeviceRopeTable::upload(dev, &table).unwrap();
    let mut xd = dev.upload(&x).unwrap();
    ops::rope(dev, &mut xd, heads, head_dim, &positions, &t).unwrap();
    close(
        &dev.download(&xd).unwrap(),
        &to_f64(&want),
        1e-6,
        1e-6,
        "rope",
    );
    let err = ops::rope(dev, &mut xd, heads, head_dim, &[4096; 6], &t).unwrap_err();
    assert_eq!(err.kind(), "position_out_of_range");
}

/// 5-token blocks, 2 KV heads of dim `head_dim`, 7 spare elements per page.
fn layout(head_dim: usize) -> KvLayout {
    let (block_size, num_kv_heads) = (5, 2);
    KvLayout {
        page_elems: 2 * block_size * num_kv_heads * head_dim + 7,
        block_size,
        num_kv_heads,
        head_dim,
    }
}

#[test]
fn kv_write_gather_scatter_are_exact() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(5);
    let l = layout(12);
    let kv_dim = 24;
    let pages = 6;
    let mut pool = vec![f32::NAN; pages * l.page_elems];
    // Slot 13 twice: the later token wins, as on the CPU.
    let slots = [13usize, 0, 29, 13, 7];
    let (k, v) = (rng.vec(slots.len() * kv_dim), rng.vec(slots.len() * kv_dim));
    let mut pd = dev.upload(&pool).unwrap();
    ops::write_kv(
        dev,
        &l,
        &dev.upload(&k).unwrap(),
        &dev.upload(&v).unwrap(),
        &slots,
        &mut pd,
    )
    .unwrap();
    cpu::write_kv(&l, &k, &v, &slots, &mut pool).unwrap();
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&dev.download(&pd).unwrap(), &pool), "write_kv");
    report("write_kv", "exact");

    let order = [5u32, 2, 0, 2];
    let mut want = Vec::new();
    cpu::gather_kv_pages(&l, &pool, &order, &mut want).unwrap();
    let mut got = dev.zeros(want.len()).unwrap();
    ops::gather_kv_pages(dev, &l, &pd, &order, &mut got).unwrap();
    assert!(same(&dev.download(&got).unwrap(), &want), "gather");
    report("gather_kv_pages", "exact");

    // Page 1 twice: the later chunk wins.
    let targets = [1u32, 4, 1];
    let data = rng.vec(targets.len() * l.page_kv_elems());
    ops::scatter_kv_pages(dev, &l, &dev.upload(&data).unwrap(), &targets, &mut pd).unwrap();
    cpu::scatter_kv_pages(&l, &data, &targets, &mut pool).unwrap();
    assert!(same(&dev.download(&pd).unwrap(), &pool), "scatter");
    report("scatter_kv_pages", "exact");

    let err = ops::write_kv(
        dev,
        &l,
        &dev.upload(&k[..kv_dim]).unwrap(),
        &dev.upload(&v[..kv_dim]).unwrap(),
        &[pages * 5],
        &mut pd,
    )
    .unwrap_err();
    assert_eq!(err.kind(), "slot_out_of_range");
}

struct Batch {
    pool: Vec<f32>,
    tables: Vec<Vec<u32>>,
    /// (q_start, q_len, pos_start) per sequence.
    shape: Vec<(usize, usize, usize)>,
    rows: usize,
}

/// Sequences whose cached prefix plus new rows are written into scrambled pages of a NaN pool
/// by the CPU `write_kv`; rows between sequences belong to none.
fn batch(rng: &mut Rng, l: &KvLayout, shape: &[(usize, usize, usize)], rows: usize) -> Batch {
    let kv_dim = l.num_kv_heads * l.head_dim;
    let blocks: Vec<usize> = shape
        .iter()
        .map(|&(_, q_len, pos)| (pos + q_len).div_ceil(l.block_size))
        .collect();
    let total: usize = blocks.iter().sum();
    let mut free = rng.permutation(total + 3).into_iter();
    let mut pool = vec![f32::NAN; (total + 3) * l.page_elems];
    let mut tables = Vec::new();
    for (&(_, q_len, pos), &n) in shape.iter().zip(&blocks) {
        let table: Vec<u32> = (0..n).map(|_| free.next().unwrap() as u32).collect();
        let context = pos + q_len;
        let slots: Vec<usize> = (0..context)
            .map(|p| table[p / l.block_size] as usize * l.block_size + p % l.block_size)
            .collect();
        let (k, v) = (rng.vec(context * kv_dim), rng.vec(context * kv_dim));
        cpu::write_kv(l, &k, &v, &slots, &mut pool).unwrap();
        tables.push(table);
    }
    Batch {
        pool,
        tables,
        shape: shape.to_vec(),
        rows,
    }
}

fn attention_case(
    dev: &CudaDevice,
    seed: u64,
    head_dim: usize,
    heads: usize,
    window: Option<usize>,
    shape: &[(usize, usize, usize)],
    rows: usize,
) {
    let mut rng = Rng::new(seed);
    let l = layout(head_dim);
    let b = batch(&mut rng, &l, shape, rows);
    let seqs: Vec<AttnSeq<'_>> = b
        .shape
        .iter()
        .zip(&b.tables)
        .map(|(&(q_start, q_len, pos_start), t)| AttnSeq {
            q_start,
            q_len,
            pos_start,
            block_table: t,
        })
        .collect();
    let q = rng.vec(b.rows * heads * head_dim);
    // Rows of no sequence must keep this sentinel.
    let mut want = vec![7.0f32; q.len()];
    let scale = 1.0 / (head_dim as f32).sqrt();
    cpu::paged_attention(&l, &q, heads, &b.pool, &seqs, scale, window, &mut want).unwrap();
    let mut out = dev.upload(&vec![7.0f32; q.len()]).unwrap();
    ops::paged_attention(
        dev,
        &l,
        &dev.upload(&q).unwrap(),
        heads,
        &dev.upload(&b.pool).unwrap(),
        &seqs,
        scale,
        window,
        &mut out,
    )
    .unwrap();
    let label = format!("attention hd={head_dim} heads={heads} window={window:?}");
    close(
        &dev.download(&out).unwrap(),
        &to_f64(&want),
        2e-5,
        1e-4,
        &label,
    );
}

#[test]
fn attention_prefill_chunks_and_decodes_match() {
    let dev = device_or_skip!();
    // A chunk continuing a cached prefix, a fresh prompt, two decodes; row 13 is no one's.
    let shape = [(0, 6, 9), (6, 7, 0), (14, 1, 40), (15, 1, 0)];
    attention_case(dev, 6, 12, 8, None, &shape, 16); // group 4, head_dim < 32
    attention_case(dev, 7, 40, 2, None, &shape, 16); // group 1, head_dim not a warp multiple
    attention_case(dev, 8, 128, 16, None, &shape, 16); // 16 warps per block
    attention_case(dev, 9, 64, 4, Some(4), &shape, 16); // sliding window
}

#[test]
fn attention_long_decodes_split_and_merge() {
    let dev = device_or_skip!();
    // Contexts of 1500–5000 keys with few blocks: the plan splits them (flash-decoding).
    let shape = [(0, 1, 4999), (1, 1, 1499), (2, 3, 2100)];
    attention_case(dev, 10, 64, 8, None, &shape, 5);
    attention_case(dev, 11, 128, 2, Some(1800), &shape, 5);
    // Errors are the reference's.
    let l = layout(16);
    let table = [0u32];
    let seqs = [AttnSeq {
        q_start: 0,
        q_len: 1,
        pos_start: 9,
        block_table: &table,
    }];
    let q = dev.zeros(4 * 16).unwrap();
    let pool = dev.zeros(2 * l.page_elems).unwrap();
    let err = ops::paged_attention(
        dev,
        &l,
        &q,
        4,
        &pool,
        &seqs,
        1.0,
        None,
        &mut dev.zeros(64).unwrap(),
    );
    assert_eq!(err.unwrap_err().kind(), "block_table_too_short");
}

#[test]
fn lora_shrink_and_expand_match() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(12);
    let (in_dim, out_dim, max_rank, rows) = (4099, 1003, 16, 9);
    let pool_len = 200_000;
    let pool = rng.vec(pool_len);
    let a_off = |r: &mut Rng, n: usize| -> Vec<usize> {
        (0..n).map(|_| r.below(pool_len - in_dim)).collect()
    };
    let b_off = |r: &mut Rng, n: usize| -> Vec<usize> {
        (0..n).map(|_| r.below(pool_len - out_dim)).collect()
    };
    let (a0, b0) = (a_off(&mut rng, 16), b_off(&mut rng, 16));
    let (a1, b1) = (a_off(&mut rng, 3), b_off(&mut rng, 3));
    let (a2, b2) = (Vec::new(), Vec::new());
    // Rows 0 and 5 are the base model's; a rank-0 segment covers row 8.
    let segs = [
        LoraSegment {
            rows: 6..8,
            a_rows: &a1,
            b_rows: &b1,
            scale: 0.75,
        },
        LoraSegment {
            rows: 1..5,
            a_rows: &a0,
            b_rows: &b0,
            scale: 2.0,
        },
        LoraSegment {
            rows: 8..9,
            a_rows: &a2,
            b_rows: &b2,
            scale: 1.0,
        },
    ];
    let x = rng.vec(rows * in_dim);
    let y0 = rng.vec(rows * out_dim);
    let mut v_want = vec![5.0f32; rows * max_rank];
    cpu::lora_shrink(&x, in_dim, &pool, &segs, max_rank, &mut v_want).unwrap();
    let mut y_want = y0.clone();
    cpu::lora_expand(&v_want, max_rank, &pool, &segs, out_dim, &mut y_want).unwrap();

    let pd = dev.upload(&pool).unwrap();
    let table = ops::DeviceLoraTable::upload(dev, &segs, rows, max_rank, pool_len, in_dim, out_dim)
        .unwrap();
    let mut v = dev.upload(&vec![5.0f32; rows * max_rank]).unwrap();
    ops::lora_shrink(dev, &dev.upload(&x).unwrap(), &pd, &table, &mut v).unwrap();
    let v_got = dev.download(&v).unwrap();
    // Σ|x·a| bounds the rounding of each dot product: in_dim terms of magnitude <= 1.
    close(
        &v_got,
        &to_f64(&v_want),
        1e-4 * in_dim as f64 / 10.0,
        1e-4,
        "lora_shrink",
    );
    let mut y = dev.upload(&y0).unwrap();
    ops::lora_expand(dev, &dev.upload(&v_want).unwrap(), &pd, &table, &mut y).unwrap();
    close(
        &dev.download(&y).unwrap(),
        &to_f64(&y_want),
        1e-3,
        1e-4,
        "lora_expand",
    );

    // Both halves at once, as the backend calls it.
    let mut y = dev.upload(&y0).unwrap();
    ops::lora(
        dev,
        &dev.upload(&x).unwrap(),
        in_dim,
        &mut y,
        out_dim,
        &pd,
        &segs,
        max_rank,
    )
    .unwrap();
    close(
        &dev.download(&y).unwrap(),
        &to_f64(&y_want),
        1e-2,
        1e-3,
        "lora (shrink + expand)",
    );

    let too_far = [pool_len - 1];
    let bad = [LoraSegment {
        rows: 0..1,
        a_rows: &too_far,
        b_rows: &too_far,
        scale: 1.0,
    }];
    let err = ops::DeviceLoraTable::upload(dev, &bad, rows, max_rank, pool_len, in_dim, out_dim);
    assert_eq!(err.unwrap_err().kind(), "pool_offset_out_of_range");
}

/// `x·Wᵀ + b` in f64 with the bound `Σ|x||w|` each output's rounding is measured against.
fn reference_linear(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    t: usize,
    o: usize,
    i: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; t * o];
    let mut bound = vec![0.0; t * o];
    for r in 0..t {
        for c in 0..o {
            let (mut s, mut m) = (f64::from(b[c]), f64::from(b[c]).abs());
            for k in 0..i {
                let p = f64::from(x[r * i + k]) * f64::from(w[c * i + k]);
                s += p;
                m += p.abs();
            }
            y[r * o + c] = s;
            bound[r * o + c] = m;
        }
    }
    (y, bound)
}

#[test]
fn linear_matches_in_every_weight_dtype() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(13);
    let (t, o, i) = (5, 257, 301);
    let (x, w, b) = (rng.vec(t * i), rng.vec(o * i), rng.vec(o));
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let m = DeviceMatrix::upload(dev, &w, o, i, dtype).unwrap();
        let mut out = dev.zeros(t * o).unwrap();
        linear(
            dev,
            &dev.upload(&x).unwrap(),
            &m,
            Some(&dev.upload(&b).unwrap()),
            &mut out,
        )
        .unwrap();
        let got = dev.download(&out).unwrap();
        let (want, bound) = reference_linear(&rounded(&x, dtype), &rounded(&w, dtype), &b, t, o, i);
        let mut share = 0.0f64;
        for (k, ((g, w), m)) in got.iter().zip(&want).zip(&bound).enumerate() {
            let err = (f64::from(*g) - w).abs();
            assert!(err <= 1e-4 * m, "linear {dtype:?}[{k}]: got {g}, want {w}");
            share = share.max(err / (1e-4 * m));
        }
        report(
            &format!("linear {dtype:?}"),
            &format!("{:.1} % of the tolerance (1e-4·Σ|x·w|)", share * 100.0),
        );
    }
    let m = DeviceMatrix::upload(dev, &w, o, i, WeightDtype::F32).unwrap();
    let err = linear(
        dev,
        &dev.upload(&x).unwrap(),
        &m,
        None,
        &mut dev.zeros(3).unwrap(),
    );
    assert_eq!(err.unwrap_err().kind(), "shape_mismatch");
}

#[test]
fn argmax_and_log_softmax_match() {
    let dev = device_or_skip!();
    let mut rng = Rng::new(14);
    let vocab = 32_003;
    let mut logits = rng.vec(4 * vocab);
    // Row 1: a tie between 10 and 20_000 (lowest wins) and a NaN that never wins.
    logits[vocab + 10] = 3.0;
    logits[vocab + 20_000] = 3.0;
    logits[vocab + 5] = f32::NAN;
    // Row 2: all -inf but one. Row 3: -inf entries among finite ones.
    logits[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
    logits[2 * vocab + 31_999] = -50.0;
    for k in (3 * vocab..4 * vocab).step_by(7) {
        logits[k] = f32::NEG_INFINITY;
    }
    let ld = dev.upload(&logits).unwrap();
    let got = ops::argmax_rows(dev, &ld, vocab).unwrap();
    let want: Vec<_> = logits.chunks(vocab).map(cpu::argmax).collect();
    assert_eq!(got, want, "argmax");
    assert_eq!(got[1], Some((10, 3.0)));
    report("argmax", "exact");

    let clean: Vec<f32> = logits
        .iter()
        .enumerate()
        .map(|(k, &x)| if k / vocab == 1 { x.max(-1.0) } else { x })
        .collect();
    let cd = dev.upload(&clean).unwrap();
    let mut out = dev.zeros(clean.len()).unwrap();
    ops::log_softmax_rows(dev, &cd, vocab, &mut out).unwrap();
    let got = dev.download(&out).unwrap();
    let mut share = 0.0f64;
    for (r, (g, x)) in got.chunks(vocab).zip(clean.chunks(vocab)).enumerate() {
        let mut want = vec![0.0; vocab];
        cpu::log_softmax(x, &mut want).unwrap();
        for (k, (a, b)) in g.iter().zip(&want).enumerate() {
            if a.is_infinite() && a == b {
                continue;
            }
            let (err, tol) = (
                (f64::from(*a) - f64::from(*b)).abs(),
                1e-5 + 1e-5 * f64::from(b.abs()),
            );
            assert!(err <= tol, "log_softmax row {r}[{k}]: got {a}, want {b}");
            share = share.max(err / tol);
        }
    }
    report(
        "log_softmax",
        &format!("{:.1} % of the tolerance", share * 100.0),
    );
}

/// The ceiling `bench hetero` reads decode steps against: the copy moves the data (the
/// function checks a sample) at a plausible rate, between 1 GB/s and 20 TB/s (an H200's HBM3e
/// is specified at 4.8 TB/s).
#[test]
fn copy_bandwidth_moves_the_data_at_a_plausible_rate() {
    let dev = device_or_skip!();
    let b = copy_bandwidth(dev, 256 << 20, 3).unwrap();
    assert_eq!(b.rates.len(), 3);
    assert!(
        b.best() > 1e9 && b.best() < 20e12,
        "copy bandwidth {:.3e} B/s",
        b.best()
    );
    report(
        "copy_bandwidth",
        &format!(
            "{:.0} GB/s device-to-device (read + write, 256 MiB buffers)",
            b.best() / 1e9
        ),
    );
    assert_eq!(
        copy_bandwidth(dev, 100, 1).unwrap_err().kind(),
        "invalid_argument"
    );
}
