//! The CUDA backend (feature `cuda`): base GEMMs on cuBLAS, everything else on the NVRTC
//! kernels of `loraplane-kernels`, the unified pool in device memory. Activations and the pool
//! are f32; weights are stored in f32, bf16 or f16 ([`WeightDtype`]) and every GEMM
//! accumulates in f32.
//!
//! This file only shapes calls: the kernels crate validates every argument with the CPU
//! reference's rules and owns every `unsafe` launch, so this crate stays `forbid(unsafe_code)`.
//! All work is ordered on the device's one stream; only [`Backend::to_host`], `gather_kv` and
//! `pool_read` wait for it.

use std::sync::{Arc, Mutex, PoisonError};

use loraplane_kernels::cpu::{AttnSeq, KvLayout, LoraSegment, RopeTable};
use loraplane_kernels::cuda::ops::{self, DeviceRopeTable};
use loraplane_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceMatrix, linear};

pub use loraplane_kernels::cuda::WeightDtype;

use super::{Backend, BackendError, Result};

/// Row-major activations `[rows, cols]` in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    pub data: DeviceBuffer<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Weights in device memory.
#[derive(Debug)]
pub enum CudaParam {
    /// A norm weight or a bias, f32.
    Vector(DeviceBuffer<f32>),
    /// A linear layer's `[out, in]` weight.
    Matrix(DeviceMatrix),
    /// The embedding table `[vocab, hidden]`, also the tied LM head.
    Table(DeviceMatrix),
}

/// A rotary table uploaded once and recognised by its address, shape and a sample of its
/// values (a model keeps one table for its lifetime; the sample guards against a different
/// table later allocated at the same address).
#[derive(Debug, PartialEq)]
struct RopeKey {
    address: usize,
    half_dim: usize,
    max_positions: usize,
    sample: Vec<u32>,
}

impl RopeKey {
    fn of(table: &RopeTable) -> Self {
        const SAMPLES: usize = 16;
        let n = table.cos.len();
        let sample = (0..SAMPLES.min(n))
            .map(|i| i * (n - 1) / (SAMPLES - 1).max(1))
            .flat_map(|i| [table.cos[i].to_bits(), table.sin[i].to_bits()])
            .collect();
        Self {
            address: table.cos.as_ptr() as usize,
            half_dim: table.half_dim,
            max_positions: table.max_positions,
            sample,
        }
    }
}

/// The CUDA backend on one device (`cuda:N`).
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    dtype: WeightDtype,
    rope: Mutex<Option<(RopeKey, Arc<DeviceRopeTable>)>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

fn gemm(reason: impl Into<String>) -> BackendError {
    BackendError::Gemm(reason.into())
}

fn checked_len(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| gemm(format!("{what}: {a} × {b} overflows")))
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles every kernel once, so that a broken toolchain fails
    /// here rather than at the first request.
    ///
    /// # Errors
    /// `KernelError::CudaUnavailable` (no driver/NVRTC/cuBLAS), `KernelError::Cuda` (no
    /// such device), `KernelError::Compile` (NVRTC rejected a kernel, with its log).
    pub fn new(ordinal: usize, dtype: WeightDtype) -> Result<Self> {
        let dev = CudaDevice::open(ordinal)?;
        dev.preload(loraplane_kernels::cuda::ALL_SOURCES)?;
        Ok(Self::with_device(Arc::new(dev), dtype))
    }

    /// A backend on an already opened device (tests share one device between backends).
    pub fn with_device(dev: Arc<CudaDevice>, dtype: WeightDtype) -> Self {
        Self {
            dev,
            dtype,
            rope: Mutex::new(None),
        }
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.dev.zeros(checked_len("tensor", rows, cols)?)?,
            rows,
            cols,
        })
    }

    fn rope_table(&self, table: &RopeTable) -> Result<Arc<DeviceRopeTable>> {
        let key = RopeKey::of(table);
        let mut cached = self.rope.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, t)) = cached.as_ref()
            && *k == key
        {
            return Ok(Arc::clone(t));
        }
        let uploaded = Arc::new(DeviceRopeTable::upload(&self.dev, table)?);
        *cached = Some((key, Arc::clone(&uploaded)));
        Ok(uploaded)
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        w: &DeviceMatrix,
        bias: Option<&CudaParam>,
    ) -> Result<CudaTensor> {
        if x.cols != w.cols() {
            return Err(gemm(format!(
                "x has {} columns, the weight takes {}",
                x.cols,
                w.cols()
            )));
        }
        let bias = match bias {
            None => None,
            Some(CudaParam::Vector(b)) => Some(b),
            Some(_) => return Err(gemm("a bias must be a vector parameter")),
        };
        let mut y = self.tensor(x.rows, w.rows())?;
        linear(&self.dev, &x.data, w, bias, &mut y.data)?;
        Ok(y)
    }

    fn check_pool_range(pool: &DeviceBuffer<f32>, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= pool.len() => Ok(()),
            _ => Err(BackendError::PoolRange {
                offset,
                len,
                size: pool.len(),
            }),
        }
    }
}

fn vector(p: &CudaParam) -> Result<&DeviceBuffer<f32>> {
    match p {
        CudaParam::Vector(v) => Ok(v),
        CudaParam::Matrix(_) | CudaParam::Table(_) => Err(gemm("expected a vector parameter")),
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Param = CudaParam;
    type Pool = DeviceBuffer<f32>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn free_memory(&self) -> Option<usize> {
        self.dev.memory().ok().map(|(free, _total)| free)
    }

    fn matrix(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<CudaParam> {
        Ok(CudaParam::Matrix(DeviceMatrix::upload(
            &self.dev, &data, out_dim, in_dim, self.dtype,
        )?))
    }

    fn vector(&self, data: Vec<f32>) -> Result<CudaParam> {
        Ok(CudaParam::Vector(self.dev.upload(&data)?))
    }

    fn table(&self, data: Vec<f32>, vocab: usize, hidden: usize) -> Result<CudaParam> {
        Ok(CudaParam::Table(DeviceMatrix::upload(
            &self.dev, &data, vocab, hidden, self.dtype,
        )?))
    }

    fn pool(&self, pages: usize, page_elems: usize) -> Result<DeviceBuffer<f32>> {
        Ok(self.dev.zeros(checked_len("pool", pages, page_elems)?)?)
    }

    fn pool_write(&self, pool: &mut DeviceBuffer<f32>, offset: usize, data: &[f32]) -> Result<()> {
        Self::check_pool_range(pool, offset, data.len())?;
        Ok(self.dev.write(pool, offset, data)?)
    }

    fn gather_kv(
        &self,
        layout: &KvLayout,
        pool: &DeviceBuffer<f32>,
        pages: &[u32],
    ) -> Result<Vec<f32>> {
        layout.validate()?;
        let mut out = self.dev.zeros(checked_len(
            "gather_kv",
            pages.len(),
            layout.page_kv_elems(),
        )?)?;
        ops::gather_kv_pages(&self.dev, layout, pool, pages, &mut out)?;
        Ok(self.dev.download(&out)?)
    }

    fn scatter_kv(
        &self,
        layout: &KvLayout,
        data: &[f32],
        pages: &[u32],
        pool: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let data = self.dev.upload(data)?;
        Ok(ops::scatter_kv_pages(
            &self.dev, layout, &data, pages, pool,
        )?)
    }

    fn pool_read(&self, pool: &DeviceBuffer<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        Self::check_pool_range(pool, offset, len)?;
        Ok(self.dev.download_range(pool, offset, len)?)
    }

    fn embedding(&self, ids: &[u32], table: &CudaParam) -> Result<CudaTensor> {
        let CudaParam::Table(t) = table else {
            return Err(gemm("embedding needs a table parameter"));
        };
        let mut out = self.tensor(ids.len(), t.cols())?;
        ops::embedding(&self.dev, ids, t, &mut out.data)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaParam, eps: f32) -> Result<CudaTensor> {
        let mut out = self.tensor(x.rows, x.cols)?;
        ops::rms_norm(&self.dev, &x.data, vector(weight)?, eps, &mut out.data)?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaParam,
        bias: Option<&CudaParam>,
    ) -> Result<CudaTensor> {
        let CudaParam::Matrix(m) = w else {
            return Err(gemm("linear needs a matrix parameter"));
        };
        self.matmul(x, m, bias)
    }

    fn linear_tied(&self, x: &CudaTensor, table: &CudaParam) -> Result<CudaTensor> {
        let CudaParam::Table(t) = table else {
            return Err(gemm("tied head needs a table parameter"));
        };
        self.matmul(x, t, None)
    }

    fn lora(
        &self,
        x: &CudaTensor,
        y: &mut CudaTensor,
        pool: &DeviceBuffer<f32>,
        segments: &[LoraSegment<'_>],
        max_rank: usize,
    ) -> Result<()> {
        if segments.is_empty() || max_rank == 0 {
            return Ok(());
        }
        Ok(ops::lora(
            &self.dev,
            &x.data,
            x.cols,
            &mut y.data,
            y.cols,
            pool,
            segments,
            max_rank,
        )?)
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()> {
        let table = self.rope_table(table)?;
        Ok(ops::rope(
            &self.dev,
            &mut x.data,
            heads,
            head_dim,
            positions,
            &table,
        )?)
    }

    fn write_kv(
        &self,
        layout: &KvLayout,
        key: &CudaTensor,
        value: &CudaTensor,
        slots: &[usize],
        pool: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        Ok(ops::write_kv(
            &self.dev,
            layout,
            &key.data,
            &value.data,
            slots,
            pool,
        )?)
    }

    fn attention(
        &self,
        layout: &KvLayout,
        q: &CudaTensor,
        heads: usize,
        pool: &DeviceBuffer<f32>,
        seqs: &[AttnSeq<'_>],
        scale: f32,
        sliding_window: Option<usize>,
    ) -> Result<CudaTensor> {
        let mut out = self.tensor(q.rows, q.cols)?;
        ops::paged_attention(
            &self.dev,
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

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        let mut out = self.tensor(gate.rows, gate.cols)?;
        ops::silu_mul(&self.dev, &gate.data, &up.data, &mut out.data)?;
        Ok(out)
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        Ok(ops::add(&self.dev, &mut x.data, &y.data)?)
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let mut out = self.tensor(rows.len(), x.cols)?;
        if x.cols == 0 {
            return Ok(out);
        }
        ops::select_rows(&self.dev, &x.data, x.cols, rows, &mut out.data)?;
        Ok(out)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        Ok(self.dev.download(&x.data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_key_tells_tables_apart() {
        let a = RopeTable::new(&[1.0, 0.1], 8);
        let b = RopeTable::new(&[1.0, 0.2], 8);
        assert_eq!(RopeKey::of(&a), RopeKey::of(&a));
        assert_ne!(RopeKey::of(&a), RopeKey::of(&b));
        let empty = RopeTable::new(&[], 0);
        assert!(RopeKey::of(&empty).sample.is_empty());
    }
}
