//! A backend wrapper that times every operation of the forward pass and counts the GEMM and
//! LoRA arithmetic: the in-run profile the reports use to say where a step's time goes
//! (base GEMMs, the LoRA path, attention, KV copies, the rest). Timing adds two clock reads per
//! operation (tens of nanoseconds against operations of microseconds and more).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use loraplane_kernels::cpu::{AttnSeq, KvLayout, LoraSegment, RopeTable};

use loraplane_agent::backend::cpu::{CpuBackend, CpuParam, CpuTensor};
use loraplane_agent::backend::{Backend, Result};

/// Operation classes of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Base-model linear layers and the LM head (the backend's packed GEMM).
    Gemm,
    /// The heterogeneous LoRA path (shrink and expand).
    Lora,
    /// Paged attention.
    Attention,
    /// Writing K/V into pages, gathering/scattering them for transfer, adapter copies.
    KvCopy,
    /// Norms, RoPE, SiLU·mul, residual adds, embedding lookups, row selection.
    Other,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Gemm, Op::Lora, Op::Attention, Op::KvCopy, Op::Other];

    pub fn name(self) -> &'static str {
        match self {
            Op::Gemm => "base GEMM",
            Op::Lora => "LoRA",
            Op::Attention => "attention",
            Op::KvCopy => "KV/adapter copies",
            Op::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Accumulated time (ns) per operation class, plus arithmetic counts.
#[derive(Debug, Default)]
pub struct OpTimes {
    nanos: [AtomicU64; 5],
    gemm_flops: AtomicU64,
    lora_flops: AtomicU64,
}

/// A copy of [`OpTimes`] at one moment, in seconds and flops.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct OpSnapshot {
    pub seconds: [f64; 5],
    pub gemm_flops: f64,
    pub lora_flops: f64,
}

impl OpSnapshot {
    pub fn get(&self, op: Op) -> f64 {
        self.seconds[op.index()]
    }

    /// `self - earlier`, for the span between two snapshots.
    pub fn since(&self, earlier: &OpSnapshot) -> OpSnapshot {
        let mut seconds = [0.0; 5];
        for (i, s) in seconds.iter_mut().enumerate() {
            *s = self.seconds[i] - earlier.seconds[i];
        }
        OpSnapshot {
            seconds,
            gemm_flops: self.gemm_flops - earlier.gemm_flops,
            lora_flops: self.lora_flops - earlier.lora_flops,
        }
    }
}

impl OpTimes {
    fn add(&self, op: Op, started: Instant) {
        let ns = started.elapsed().as_nanos() as u64;
        self.nanos[op.index()].fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> OpSnapshot {
        let mut seconds = [0.0; 5];
        for (s, n) in seconds.iter_mut().zip(&self.nanos) {
            *s = n.load(Ordering::Relaxed) as f64 * 1e-9;
        }
        OpSnapshot {
            seconds,
            gemm_flops: self.gemm_flops.load(Ordering::Relaxed) as f64,
            lora_flops: self.lora_flops.load(Ordering::Relaxed) as f64,
        }
    }
}

/// [`CpuBackend`] with every operation timed into a shared [`OpTimes`].
#[derive(Debug, Clone, Default)]
pub struct TimedCpu {
    inner: CpuBackend,
    pub times: Arc<OpTimes>,
}

impl TimedCpu {
    pub fn new() -> Self {
        TimedCpu::default()
    }

    fn timed<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.times.add(op, t);
        out
    }
}

fn out_dim(p: &CpuParam) -> usize {
    match p {
        CpuParam::Matrix(w) => w.out_dim(),
        CpuParam::Table { packed, .. } => packed.out_dim(),
        CpuParam::Vector(_) => 0,
    }
}

impl Backend for TimedCpu {
    type Tensor = CpuTensor;
    type Param = CpuParam;
    type Pool = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu (timed)"
    }

    fn matrix(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<CpuParam> {
        self.inner.matrix(data, out_dim, in_dim)
    }

    fn vector(&self, data: Vec<f32>) -> Result<CpuParam> {
        self.inner.vector(data)
    }

    fn table(&self, data: Vec<f32>, vocab: usize, hidden: usize) -> Result<CpuParam> {
        self.inner.table(data, vocab, hidden)
    }

    fn pool(&self, pages: usize, page_elems: usize) -> Result<Vec<f32>> {
        self.inner.pool(pages, page_elems)
    }

    fn pool_write(&self, pool: &mut Vec<f32>, offset: usize, data: &[f32]) -> Result<()> {
        self.timed(Op::KvCopy, || self.inner.pool_write(pool, offset, data))
    }

    fn gather_kv(&self, layout: &KvLayout, pool: &Vec<f32>, pages: &[u32]) -> Result<Vec<f32>> {
        self.timed(Op::KvCopy, || self.inner.gather_kv(layout, pool, pages))
    }

    fn scatter_kv(
        &self,
        layout: &KvLayout,
        data: &[f32],
        pages: &[u32],
        pool: &mut Vec<f32>,
    ) -> Result<()> {
        self.timed(Op::KvCopy, || {
            self.inner.scatter_kv(layout, data, pages, pool)
        })
    }

    fn pool_read(&self, pool: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.timed(Op::KvCopy, || self.inner.pool_read(pool, offset, len))
    }

    fn embedding(&self, ids: &[u32], table: &CpuParam) -> Result<CpuTensor> {
        self.timed(Op::Other, || self.inner.embedding(ids, table))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuParam, eps: f32) -> Result<CpuTensor> {
        self.timed(Op::Other, || self.inner.rms_norm(x, weight, eps))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuParam, bias: Option<&CpuParam>) -> Result<CpuTensor> {
        let flops = 2 * x.rows * x.cols * out_dim(w);
        self.times
            .gemm_flops
            .fetch_add(flops as u64, Ordering::Relaxed);
        self.timed(Op::Gemm, || self.inner.linear(x, w, bias))
    }

    fn linear_tied(&self, x: &CpuTensor, table: &CpuParam) -> Result<CpuTensor> {
        let flops = 2 * x.rows * x.cols * out_dim(table);
        self.times
            .gemm_flops
            .fetch_add(flops as u64, Ordering::Relaxed);
        self.timed(Op::Gemm, || self.inner.linear_tied(x, table))
    }

    fn lora(
        &self,
        x: &CpuTensor,
        y: &mut CpuTensor,
        pool: &Vec<f32>,
        segments: &[LoraSegment<'_>],
        max_rank: usize,
    ) -> Result<()> {
        let flops: usize = segments
            .iter()
            .map(|s| 2 * s.rows.len() * s.a_rows.len() * (x.cols + y.cols))
            .sum();
        self.times
            .lora_flops
            .fetch_add(flops as u64, Ordering::Relaxed);
        self.timed(Op::Lora, || self.inner.lora(x, y, pool, segments, max_rank))
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()> {
        self.timed(Op::Other, || {
            self.inner.rope(x, heads, head_dim, positions, table)
        })
    }

    fn write_kv(
        &self,
        layout: &KvLayout,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[usize],
        pool: &mut Vec<f32>,
    ) -> Result<()> {
        self.timed(Op::KvCopy, || {
            self.inner.write_kv(layout, k, v, slots, pool)
        })
    }

    fn attention(
        &self,
        layout: &KvLayout,
        q: &CpuTensor,
        heads: usize,
        pool: &Vec<f32>,
        seqs: &[AttnSeq<'_>],
        scale: f32,
        sliding_window: Option<usize>,
    ) -> Result<CpuTensor> {
        self.timed(Op::Attention, || {
            self.inner
                .attention(layout, q, heads, pool, seqs, scale, sliding_window)
        })
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        self.timed(Op::Other, || self.inner.silu_mul(gate, up))
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        self.timed(Op::Other, || self.inner.add(x, y))
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        self.timed(Op::Other, || self.inner.select_rows(x, rows))
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        self.timed(Op::Other, || self.inner.to_host(x))
    }
}
