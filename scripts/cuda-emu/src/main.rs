//! Emulated launches of every CUDA kernel against the CPU reference (see run.sh).

#![allow(clippy::all)]

// The source checks build.rs runs, compiled here too so `cargo test` exercises them.
#[cfg(test)]
mod scan;
use loraplane_kernels::cpu::{self, AttnSeq, KvLayout, LoraSegment, RopeTable};
use loraplane_kernels::cuda::LaunchPlan;
use loraplane_kernels::cuda::plan::*;

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3(u32, u32, u32);
fn g(p: &LaunchPlan) -> Dim3 {
    Dim3(p.grid.0, p.grid.1, p.grid.2)
}
fn b(p: &LaunchPlan) -> Dim3 {
    Dim3(p.block.0, p.block.1, p.block.2)
}

unsafe extern "C" {
    fn emu_rms_norm_f32(
        g: Dim3,
        b: Dim3,
        x: *const f32,
        w: *const f32,
        o: *mut f32,
        p: RmsNormParams,
    );
    fn emu_silu_mul_f32(
        g: Dim3,
        b: Dim3,
        x: *const f32,
        u: *const f32,
        o: *mut f32,
        p: PointwiseParams,
    );
    fn emu_add_f32(g: Dim3, b: Dim3, x: *mut f32, y: *const f32, p: PointwiseParams);
    fn emu_add_bias_f32(g: Dim3, b: Dim3, x: *mut f32, y: *const f32, p: PointwiseParams);
    fn emu_convert_f32_to_bf16(g: Dim3, b: Dim3, x: *const f32, o: *mut u16, p: PointwiseParams);
    fn emu_convert_f32_to_f16(g: Dim3, b: Dim3, x: *const f32, o: *mut u16, p: PointwiseParams);
    fn emu_copy_rows_f32(
        g: Dim3,
        b: Dim3,
        s: *const f32,
        i: *const u32,
        o: *mut f32,
        p: CopyRowsParams,
    );
    fn emu_copy_rows_bf16(
        g: Dim3,
        b: Dim3,
        s: *const u16,
        i: *const u32,
        o: *mut f32,
        p: CopyRowsParams,
    );
    fn emu_copy_rows_f16(
        g: Dim3,
        b: Dim3,
        s: *const u16,
        i: *const u32,
        o: *mut f32,
        p: CopyRowsParams,
    );
    fn emu_rope_f32(
        g: Dim3,
        b: Dim3,
        x: *mut f32,
        pos: *const u32,
        c: *const f32,
        s: *const f32,
        p: RopeParams,
    );
    fn emu_write_kv_f32(
        g: Dim3,
        b: Dim3,
        k: *const f32,
        v: *const f32,
        e: *const u64,
        pool: *mut f32,
        p: WriteKvParams,
    );
    fn emu_gather_kv_pages_f32(
        g: Dim3,
        b: Dim3,
        pool: *const f32,
        pages: *const u32,
        o: *mut f32,
        p: KvPagesParams,
    );
    fn emu_scatter_kv_pages_f32(
        g: Dim3,
        b: Dim3,
        d: *const f32,
        e: *const u32,
        pool: *mut f32,
        p: KvPagesParams,
    );
    fn emu_paged_attention_f32(
        g: Dim3,
        b: Dim3,
        q: *const f32,
        pool: *const f32,
        bt: *const u32,
        s: *const AttnSeqParams,
        w: *const AttnWorkItem,
        o: *mut f32,
        pa: *mut f32,
        pm: *mut f32,
        p: AttnParams,
    );
    fn emu_attention_reduce_f32(
        g: Dim3,
        b: Dim3,
        pa: *const f32,
        pm: *const f32,
        it: *const AttnReduceItem,
        o: *mut f32,
        p: AttnParams,
    );
    fn emu_lora_shrink_f32(
        g: Dim3,
        b: Dim3,
        x: *const f32,
        pool: *const f32,
        rs: *const i32,
        s: *const LoraSegmentParams,
        a: *const u64,
        v: *mut f32,
        p: LoraShrinkParams,
    );
    fn emu_lora_expand_f32(
        g: Dim3,
        b: Dim3,
        v: *const f32,
        pool: *const f32,
        rs: *const i32,
        s: *const LoraSegmentParams,
        bb: *const u64,
        y: *mut f32,
        p: LoraExpandParams,
    );
    fn emu_argmax_f32(
        g: Dim3,
        b: Dim3,
        x: *const f32,
        i: *mut u32,
        v: *mut f32,
        p: RowReduceParams,
    );
    fn emu_log_softmax_f32(g: Dim3, b: Dim3, x: *const f32, o: *mut f32, p: RowReduceParams);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn perm(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

fn close(got: &[f32], want: &[f32], abs: f32, rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: len");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if !(e <= abs + rel * w.abs()) && !(g.is_nan() && w.is_nan()) && g != w {
            panic!("{what}[{i}]: got {g} want {w}");
        }
        if e.is_finite() {
            worst = worst.max(e);
        }
    }
    println!("ok {what} (max err {worst:e})");
}

fn rms() {
    let mut r = Rng(1);
    for (rows, d) in [(3, 4099), (2, 37), (1, 1)] {
        let x = r.vec(rows * d);
        let w = r.vec(d);
        let mut want = vec![0.0; rows * d];
        cpu::rms_norm(&x, &w, 1e-5, &mut want).unwrap();
        let (plan, p) = rms_norm_plan(rows, d, 1e-5).unwrap();
        let mut out = vec![0.0; rows * d];
        unsafe {
            emu_rms_norm_f32(
                g(&plan),
                b(&plan),
                x.as_ptr(),
                w.as_ptr(),
                out.as_mut_ptr(),
                p,
            )
        };
        close(&out, &want, 1e-5, 1e-5, &format!("rms_norm {rows}x{d}"));
    }
}

fn pointwise() {
    let mut r = Rng(2);
    let n = 10_007;
    let gate: Vec<f32> = r.vec(n).iter().map(|x| x * 12.0).collect();
    let up = r.vec(n);
    let mut want = vec![0.0; n];
    cpu::silu_mul(&gate, &up, &mut want).unwrap();
    let (plan, p) = pointwise_plan(n, 1).unwrap();
    let mut out = vec![0.0; n];
    unsafe {
        emu_silu_mul_f32(
            g(&plan),
            b(&plan),
            gate.as_ptr(),
            up.as_ptr(),
            out.as_mut_ptr(),
            p,
        )
    };
    close(&out, &want, 1e-6, 1e-6, "silu_mul");
    let mut x = r.vec(n);
    let y = r.vec(n);
    let mut xw = x.clone();
    cpu::add_inplace(&mut xw, &y).unwrap();
    unsafe { emu_add_f32(g(&plan), b(&plan), x.as_mut_ptr(), y.as_ptr(), p) };
    assert_eq!(x, xw);
    println!("ok add");
    let cols = 331;
    let bias = r.vec(cols);
    let mut m = r.vec(cols * 5);
    let want: Vec<f32> = m
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % cols])
        .collect();
    let (plan2, p2) = pointwise_plan(m.len(), cols).unwrap();
    unsafe { emu_add_bias_f32(g(&plan2), b(&plan2), m.as_mut_ptr(), bias.as_ptr(), p2) };
    assert_eq!(m, want);
    println!("ok add_bias");
    let mut vals = r.vec(1000);
    vals.extend([f32::NAN, f32::INFINITY, -0.0, 65504.0, 1e-8, 3.0e38]);
    let (plan3, p3) = pointwise_plan(vals.len(), 1).unwrap();
    let mut o = vec![0u16; vals.len()];
    unsafe { emu_convert_f32_to_bf16(g(&plan3), b(&plan3), vals.as_ptr(), o.as_mut_ptr(), p3) };
    for (v, h) in vals.iter().zip(&o) {
        let w = half::bf16::from_f32(*v).to_bits();
        assert!(
            *h == w || (v.is_nan() && half::bf16::from_bits(*h).is_nan()),
            "bf16 {v}: {h:#x} vs {w:#x}"
        );
    }
    println!("ok convert bf16");
    unsafe { emu_convert_f32_to_f16(g(&plan3), b(&plan3), vals.as_ptr(), o.as_mut_ptr(), p3) };
    for (v, h) in vals.iter().zip(&o) {
        let w = half::f16::from_f32(*v).to_bits();
        assert!(
            *h == w || (v.is_nan() && half::f16::from_bits(*h).is_nan()),
            "f16 {v}: {h:#x} vs {w:#x}"
        );
    }
    println!("ok convert f16");
    let (vocab, d) = (53, 301);
    let table = r.vec(vocab * d);
    let ids = [52u32, 0, 7, 7, 31];
    let (plan4, p4) = copy_rows_plan(ids.len(), d).unwrap();
    let mut want = vec![0.0; ids.len() * d];
    cpu::embedding(&ids, &table, d, &mut want).unwrap();
    let mut out = vec![0.0; ids.len() * d];
    unsafe {
        emu_copy_rows_f32(
            g(&plan4),
            b(&plan4),
            table.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            p4,
        )
    };
    assert_eq!(out, want);
    println!("ok copy_rows f32");
    let tb: Vec<u16> = table
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    let tr: Vec<f32> = tb
        .iter()
        .map(|&h| half::bf16::from_bits(h).to_f32())
        .collect();
    cpu::embedding(&ids, &tr, d, &mut want).unwrap();
    unsafe {
        emu_copy_rows_bf16(
            g(&plan4),
            b(&plan4),
            tb.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            p4,
        )
    };
    assert_eq!(out, want);
    println!("ok copy_rows bf16");
    let th: Vec<u16> = table
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let tr: Vec<f32> = th
        .iter()
        .map(|&h| half::f16::from_bits(h).to_f32())
        .collect();
    cpu::embedding(&ids, &tr, d, &mut want).unwrap();
    unsafe {
        emu_copy_rows_f16(
            g(&plan4),
            b(&plan4),
            th.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            p4,
        )
    };
    assert_eq!(out, want);
    println!("ok copy_rows f16");
}

fn rope() {
    let mut r = Rng(4);
    let (heads, hd) = (3, 10);
    let s = cpu::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let table = RopeTable::new(&cpu::rope_inv_freq(hd, 500_000.0, Some(&s)), 4096);
    let positions = [4095usize, 0, 17, 1000, 17, 3];
    let x = r.vec(positions.len() * heads * hd);
    let mut want = x.clone();
    cpu::rope(&mut want, heads, hd, &positions, &table).unwrap();
    let (plan, p) = rope_plan(positions.len(), heads, hd).unwrap();
    let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let mut got = x.clone();
    unsafe {
        emu_rope_f32(
            g(&plan),
            b(&plan),
            got.as_mut_ptr(),
            pos.as_ptr(),
            table.cos.as_ptr(),
            table.sin.as_ptr(),
            p,
        )
    };
    close(&got, &want, 1e-6, 1e-6, "rope");
}

fn kv() {
    let mut r = Rng(5);
    let l = KvLayout {
        page_elems: 2 * 5 * 2 * 12 + 7,
        block_size: 5,
        num_kv_heads: 2,
        head_dim: 12,
    };
    let kv_dim = 24;
    let pages = 6;
    let mut pool = vec![f32::NAN; pages * l.page_elems];
    let slots = [13usize, 0, 29, 7];
    let (k, v) = (r.vec(slots.len() * kv_dim), r.vec(slots.len() * kv_dim));
    let mut got = pool.clone();
    cpu::write_kv(&l, &k, &v, &slots, &mut pool).unwrap();
    let entries: Vec<u64> = slots
        .iter()
        .enumerate()
        .flat_map(|(t, &s)| [t as u64, s as u64])
        .collect();
    let (plan, p) = write_kv_plan(slots.len(), kv_dim, 5, l.page_elems).unwrap();
    unsafe {
        emu_write_kv_f32(
            g(&plan),
            b(&plan),
            k.as_ptr(),
            v.as_ptr(),
            entries.as_ptr(),
            got.as_mut_ptr(),
            p,
        )
    };
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&got, &pool));
    println!("ok write_kv");
    let order = [5u32, 2, 0, 2];
    let mut want = Vec::new();
    cpu::gather_kv_pages(&l, &pool, &order, &mut want).unwrap();
    let (plan, p) = kv_pages_plan(order.len(), l.page_kv_elems(), l.page_elems).unwrap();
    let mut out = vec![0.0; want.len()];
    unsafe {
        emu_gather_kv_pages_f32(
            g(&plan),
            b(&plan),
            got.as_ptr(),
            order.as_ptr(),
            out.as_mut_ptr(),
            p,
        )
    };
    assert!(same(&out, &want));
    println!("ok gather");
    let targets = [1u32, 4];
    let data = r.vec(2 * l.page_kv_elems());
    cpu::scatter_kv_pages(&l, &data, &targets, &mut pool).unwrap();
    let e: Vec<u32> = vec![0, 1, 1, 4];
    let (plan, p) = kv_pages_plan(2, l.page_kv_elems(), l.page_elems).unwrap();
    unsafe {
        emu_scatter_kv_pages_f32(
            g(&plan),
            b(&plan),
            data.as_ptr(),
            e.as_ptr(),
            got.as_mut_ptr(),
            p,
        )
    };
    assert!(same(&got, &pool));
    println!("ok scatter");
}

fn attention_case(
    seed: u64,
    hd: usize,
    heads: usize,
    window: Option<usize>,
    shape: &[(usize, usize, usize)],
    rows: usize,
    target: usize,
) {
    let mut r = Rng(seed);
    let l = KvLayout {
        page_elems: 2 * 5 * 2 * hd + 7,
        block_size: 5,
        num_kv_heads: 2,
        head_dim: hd,
    };
    let kv_dim = 2 * hd;
    let blocks: Vec<usize> = shape
        .iter()
        .map(|&(_, ql, pos)| (pos + ql).div_ceil(5))
        .collect();
    let total: usize = blocks.iter().sum();
    let mut free = r.perm(total + 3).into_iter();
    let mut pool = vec![f32::NAN; (total + 3) * l.page_elems];
    let mut tables = Vec::new();
    for (&(_, ql, pos), &n) in shape.iter().zip(&blocks) {
        let t: Vec<u32> = (0..n).map(|_| free.next().unwrap() as u32).collect();
        let ctx = pos + ql;
        let slots: Vec<usize> = (0..ctx).map(|p| t[p / 5] as usize * 5 + p % 5).collect();
        let (k, v) = (r.vec(ctx * kv_dim), r.vec(ctx * kv_dim));
        cpu::write_kv(&l, &k, &v, &slots, &mut pool).unwrap();
        tables.push(t);
    }
    let seqs: Vec<AttnSeq<'_>> = shape
        .iter()
        .zip(&tables)
        .map(|(&(qs, ql, ps), t)| AttnSeq {
            q_start: qs,
            q_len: ql,
            pos_start: ps,
            block_table: t,
        })
        .collect();
    let q = r.vec(rows * heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![7.0f32; q.len()];
    cpu::paged_attention(&l, &q, heads, &pool, &seqs, scale, window, &mut want).unwrap();
    let plan =
        attention_plan(&l, q.len(), heads, pool.len(), &seqs, scale, window, target).unwrap();
    let mut out = vec![7.0f32; q.len()];
    let mut pa = vec![0.0f32; plan.partial_slots * hd + 1];
    let mut pm = vec![0.0f32; plan.partial_slots * 2 + 1];
    unsafe {
        emu_paged_attention_f32(
            g(&plan.main),
            b(&plan.main),
            q.as_ptr(),
            pool.as_ptr(),
            plan.block_tables.as_ptr(),
            plan.seqs.as_ptr(),
            plan.work.as_ptr(),
            out.as_mut_ptr(),
            pa.as_mut_ptr(),
            pm.as_mut_ptr(),
            plan.params,
        )
    };
    if !plan.reduce_launch.is_empty() {
        unsafe {
            emu_attention_reduce_f32(
                g(&plan.reduce_launch),
                b(&plan.reduce_launch),
                pa.as_ptr(),
                pm.as_ptr(),
                plan.reduce.as_ptr(),
                out.as_mut_ptr(),
                plan.params,
            )
        };
    }
    close(
        &out,
        &want,
        2e-5,
        1e-4,
        &format!(
            "attention hd={hd} heads={heads} window={window:?} blocks={} splits={}",
            plan.work.len(),
            plan.reduce.len()
        ),
    );
}

fn lora() {
    let mut r = Rng(12);
    let (in_dim, out_dim, max_rank, rows) = (1029, 301, 16, 9);
    let pool_len = 50_000;
    let pool = r.vec(pool_len);
    let a0: Vec<usize> = (0..16).map(|_| r.below(pool_len - in_dim)).collect();
    let b0: Vec<usize> = (0..16).map(|_| r.below(pool_len - out_dim)).collect();
    let a1: Vec<usize> = (0..3).map(|_| r.below(pool_len - in_dim)).collect();
    let b1: Vec<usize> = (0..3).map(|_| r.below(pool_len - out_dim)).collect();
    let e: Vec<usize> = Vec::new();
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
            a_rows: &e,
            b_rows: &e,
            scale: 1.0,
        },
    ];
    let x = r.vec(rows * in_dim);
    let y0 = r.vec(rows * out_dim);
    let mut vw = vec![5.0f32; rows * max_rank];
    cpu::lora_shrink(&x, in_dim, &pool, &segs, max_rank, &mut vw).unwrap();
    let mut yw = y0.clone();
    cpu::lora_expand(&vw, max_rank, &pool, &segs, out_dim, &mut yw).unwrap();
    let t = lora_table(&segs, rows, max_rank, pool_len, in_dim, out_dim).unwrap();
    for stage in [true, false] {
        let (plan, mut p) = lora_shrink_plan(rows, in_dim, max_rank).unwrap();
        if !stage {
            p.stage_x = 0;
        }
        let mut v = vec![5.0f32; rows * max_rank];
        unsafe {
            emu_lora_shrink_f32(
                g(&plan),
                b(&plan),
                x.as_ptr(),
                pool.as_ptr(),
                t.row_segment.as_ptr(),
                t.segments.as_ptr(),
                t.a_offsets.as_ptr(),
                v.as_mut_ptr(),
                p,
            )
        };
        close(&v, &vw, 1e-3, 1e-5, &format!("lora shrink stage_x={stage}"));
    }
    let (plan, p) = lora_expand_plan(rows, out_dim, max_rank).unwrap();
    let mut y = y0.clone();
    unsafe {
        emu_lora_expand_f32(
            g(&plan),
            b(&plan),
            vw.as_ptr(),
            pool.as_ptr(),
            t.row_segment.as_ptr(),
            t.segments.as_ptr(),
            t.b_offsets.as_ptr(),
            y.as_mut_ptr(),
            p,
        )
    };
    close(&y, &yw, 1e-4, 1e-5, "lora expand");
}

fn sampling() {
    let mut r = Rng(14);
    let vocab = 3003;
    let mut logits = r.vec(4 * vocab);
    logits[vocab + 10] = 3.0;
    logits[vocab + 2000] = 3.0;
    logits[vocab + 5] = f32::NAN;
    logits[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
    logits[2 * vocab + 2999] = -50.0;
    for k in (3 * vocab..4 * vocab).step_by(7) {
        logits[k] = f32::NEG_INFINITY;
    }
    let (plan, p) = row_reduce_plan(4, vocab).unwrap();
    let (mut i, mut v) = (vec![0u32; 4], vec![0.0f32; 4]);
    unsafe {
        emu_argmax_f32(
            g(&plan),
            b(&plan),
            logits.as_ptr(),
            i.as_mut_ptr(),
            v.as_mut_ptr(),
            p,
        )
    };
    let want: Vec<_> = logits.chunks(vocab).map(cpu::argmax).collect();
    let got: Vec<_> = i
        .iter()
        .zip(&v)
        .map(|(&i, &v)| (i != u32::MAX).then_some((i as usize, v)))
        .collect();
    assert_eq!(got, want);
    println!("ok argmax {got:?}");
    let nan_row = vec![f32::NAN; vocab];
    let (plan1, p1) = row_reduce_plan(1, vocab).unwrap();
    unsafe {
        emu_argmax_f32(
            g(&plan1),
            b(&plan1),
            nan_row.as_ptr(),
            i.as_mut_ptr(),
            v.as_mut_ptr(),
            p1,
        )
    };
    assert_eq!(i[0], u32::MAX);
    println!("ok argmax all-NaN");
    let mut out = vec![0.0f32; logits.len()];
    unsafe { emu_log_softmax_f32(g(&plan), b(&plan), logits.as_ptr(), out.as_mut_ptr(), p) };
    let mut want = vec![0.0f32; logits.len()];
    for (o, x) in want.chunks_mut(vocab).zip(logits.chunks(vocab)) {
        cpu::log_softmax(x, o).unwrap();
    }
    close(&out, &want, 1e-5, 1e-5, "log_softmax");
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    if which.is_empty() || which == "small" {
        rms();
        pointwise();
        rope();
        kv();
        lora();
        sampling();
    }
    if which.is_empty() || which == "attn" {
        let shape = [(0, 6, 9), (6, 7, 0), (14, 1, 40), (15, 1, 0)];
        attention_case(6, 12, 8, None, &shape, 16, 1);
        attention_case(7, 40, 2, None, &shape, 16, 1);
        attention_case(9, 64, 4, Some(4), &shape, 16, 1);
        attention_case(8, 128, 16, None, &shape, 16, 1);
        attention_case(15, 256, 2, Some(70), &[(0, 20, 60), (20, 1, 130)], 21, 1);
    }
    if which.is_empty() || which == "split" {
        attention_case(10, 32, 2, None, &[(0, 1, 1100)], 1, 8);
        attention_case(11, 32, 4, Some(1050), &[(0, 1, 1300), (1, 2, 1040)], 3, 64);
    }
}
