//! The CPU backend: every operation on the kernels of `loraplane-kernels` (the base GEMMs on
//! weights packed at load, multi-threaded on rayon's pool). All f32.

use loraplane_kernels::cpu as k;
use loraplane_kernels::cpu::{AttnSeq, KvLayout, LoraSegment, PackedMatrix, RopeTable};

use super::{Backend, BackendError, Result};

/// Row-major activations `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        CpuTensor {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }
}

/// Weights. Matrices are packed once at load for the base GEMM ([`k::gemm_packed`]), which
/// then reads them in the micro-kernel's order on every step without re-packing.
#[derive(Debug)]
pub enum CpuParam {
    Vector(Vec<f32>),
    /// `[out, in]` weights packed for `x · Wᵀ`.
    Matrix(PackedMatrix),
    /// `[vocab, hidden]`, kept flat (lookups) and packed (tied LM head).
    Table {
        data: Vec<f32>,
        packed: PackedMatrix,
        hidden: usize,
    },
}

/// The CPU backend.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend;

fn matmul(x: &CpuTensor, w: &PackedMatrix) -> Result<CpuTensor> {
    let mut y = CpuTensor::zeros(x.rows, w.out_dim());
    k::gemm_packed(&x.data, w, &mut y.data)?;
    Ok(y)
}

fn vector(p: &CpuParam) -> &[f32] {
    match p {
        CpuParam::Vector(v) => v,
        CpuParam::Matrix { .. } | CpuParam::Table { .. } => &[],
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Param = CpuParam;
    type Pool = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matrix(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<CpuParam> {
        Ok(CpuParam::Matrix(PackedMatrix::pack(
            &data, out_dim, in_dim,
        )?))
    }

    fn vector(&self, data: Vec<f32>) -> Result<CpuParam> {
        Ok(CpuParam::Vector(data))
    }

    fn table(&self, data: Vec<f32>, vocab: usize, hidden: usize) -> Result<CpuParam> {
        let packed = PackedMatrix::pack(&data, vocab, hidden)?;
        Ok(CpuParam::Table {
            data,
            packed,
            hidden,
        })
    }

    fn pool(&self, pages: usize, page_elems: usize) -> Result<Vec<f32>> {
        // Huge pages where the OS allows: adapter rows stream from everywhere in the pool.
        Ok(k::zeroed_pool(pages * page_elems))
    }

    fn pool_write(&self, pool: &mut Vec<f32>, offset: usize, data: &[f32]) -> Result<()> {
        let size = pool.len();
        let dst = pool
            .get_mut(offset..offset.saturating_add(data.len()))
            .ok_or(BackendError::PoolRange {
                offset,
                len: data.len(),
                size,
            })?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn gather_kv(&self, layout: &KvLayout, pool: &Vec<f32>, pages: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        k::gather_kv_pages(layout, pool, pages, &mut out)?;
        Ok(out)
    }

    fn scatter_kv(
        &self,
        layout: &KvLayout,
        data: &[f32],
        pages: &[u32],
        pool: &mut Vec<f32>,
    ) -> Result<()> {
        Ok(k::scatter_kv_pages(layout, data, pages, pool)?)
    }

    fn pool_read(&self, pool: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        pool.get(offset..offset.saturating_add(len))
            .map(<[f32]>::to_vec)
            .ok_or(BackendError::PoolRange {
                offset,
                len,
                size: pool.len(),
            })
    }

    fn embedding(&self, ids: &[u32], table: &CpuParam) -> Result<CpuTensor> {
        let CpuParam::Table { data, hidden, .. } = table else {
            return Err(BackendError::Gemm(
                "embedding needs a table parameter".into(),
            ));
        };
        let mut out = CpuTensor::zeros(ids.len(), *hidden);
        k::embedding(ids, data, *hidden, &mut out.data)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuParam, eps: f32) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(x.rows, x.cols);
        k::rms_norm(&x.data, vector(weight), eps, &mut out.data)?;
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuParam, bias: Option<&CpuParam>) -> Result<CpuTensor> {
        let CpuParam::Matrix(w) = w else {
            return Err(BackendError::Gemm("linear needs a matrix parameter".into()));
        };
        let out_dim = w.out_dim();
        let mut y = matmul(x, w)?;
        if let Some(b) = bias {
            let b = vector(b);
            if b.len() != out_dim {
                return Err(BackendError::Gemm(format!(
                    "bias has {} elements, layer has {out_dim} outputs",
                    b.len()
                )));
            }
            for row in y.data.chunks_exact_mut(out_dim) {
                k::add_inplace(row, b)?;
            }
        }
        Ok(y)
    }

    fn linear_tied(&self, x: &CpuTensor, table: &CpuParam) -> Result<CpuTensor> {
        let CpuParam::Table { packed, .. } = table else {
            return Err(BackendError::Gemm(
                "tied head needs a table parameter".into(),
            ));
        };
        matmul(x, packed)
    }

    fn lora(
        &self,
        x: &CpuTensor,
        y: &mut CpuTensor,
        pool: &Vec<f32>,
        segments: &[LoraSegment<'_>],
        max_rank: usize,
    ) -> Result<()> {
        if segments.is_empty() || max_rank == 0 {
            return Ok(());
        }
        // Shrink and expand fused, chunk by chunk (`x·Aᵀ` never leaves the thread's cache).
        Ok(k::lora(
            &x.data,
            x.cols,
            pool,
            segments,
            max_rank,
            y.cols,
            &mut y.data,
        )?)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()> {
        Ok(k::rope(&mut x.data, heads, head_dim, positions, table)?)
    }

    fn write_kv(
        &self,
        layout: &KvLayout,
        key: &CpuTensor,
        value: &CpuTensor,
        slots: &[usize],
        pool: &mut Vec<f32>,
    ) -> Result<()> {
        Ok(k::write_kv(layout, &key.data, &value.data, slots, pool)?)
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
        let mut out = CpuTensor::zeros(q.rows, q.cols);
        k::paged_attention(
            layout,
            &q.data,
            heads,
            pool,
            seqs,
            scale,
            sliding_window,
            &mut out.data,
        )?;
        Ok(out)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(gate.rows, gate.cols);
        k::silu_mul(&gate.data, &up.data, &mut out.data)?;
        Ok(out)
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        Ok(k::add_inplace(&mut x.data, &y.data)?)
    }

    fn select_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols.max(1)).zip(rows) {
            let src = x.data.get(r * x.cols..(r + 1) * x.cols).ok_or_else(|| {
                BackendError::Gemm(format!("row {r} out of range ({} rows)", x.rows))
            })?;
            dst.copy_from_slice(src);
        }
        Ok(out)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}
