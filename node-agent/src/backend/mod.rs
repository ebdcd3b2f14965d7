//! The backend contract: the small set of operations the model's forward pass is written
//! against once (embedding, RMSNorm, linear, LoRA shrink/expand, RoPE, paged KV write, paged
//! attention, SiLU·mul, add). The CPU backend implements it with the hand-written kernels of
//! `loraplane-kernels` (the base GEMM on weights packed at load); the CUDA backend (feature `cuda`) implements the
//! same contract with cuBLAS and NVRTC kernels. [`device`] picks one from `--device cpu|cuda:N`.
//!
//! Host-side metadata (positions, slots, block tables, LoRA row offsets) is passed as plain
//! slices; a device backend uploads what it needs.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;

use loraplane_kernels::KernelError;
use loraplane_kernels::cpu::{AttnSeq, KvLayout, LoraSegment, RopeTable};

/// A backend operation failed: a kernel refused its input, or the GEMM library failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("gemm: {0}")]
    Gemm(String),
    #[error("pool access out of range: offset {offset} + {len} > {size}")]
    PoolRange {
        offset: usize,
        len: usize,
        size: usize,
    },
    /// The requested device cannot be used by this binary (see [`device::DeviceError`]).
    #[error("{0}")]
    Device(String),
}

impl BackendError {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Kernel(e) => e.kind(),
            BackendError::Gemm(_) => "gemm",
            BackendError::PoolRange { .. } => "pool_range",
            BackendError::Device(_) => "device",
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Compute device for the model. All tensors are 2-D row-major `[rows, cols]`.
pub trait Backend: Send + 'static {
    /// Activations.
    type Tensor: Send;
    /// Immutable model weights: matrices, vectors and the embedding table.
    type Param: Send + Sync;
    /// The unified page pool's memory.
    type Pool: Send;

    fn name(&self) -> &'static str;

    /// Free memory on the device, bytes, for backends whose pool lives in a bounded device
    /// memory (sized by `--device-pool-fraction`); `None` on the host.
    fn free_memory(&self) -> Option<usize> {
        None
    }

    /// A linear layer's weight from Hugging Face's `[out, in]` row-major data.
    fn matrix(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<Self::Param>;
    /// A vector (norm weight, bias).
    fn vector(&self, data: Vec<f32>) -> Result<Self::Param>;
    /// The embedding table `[vocab, hidden]`, usable both for lookups and (tied) as the LM head.
    fn table(&self, data: Vec<f32>, vocab: usize, hidden: usize) -> Result<Self::Param>;

    /// Pool memory of `pages * page_elems` zeroed elements.
    fn pool(&self, pages: usize, page_elems: usize) -> Result<Self::Pool>;
    /// Copies host data into the pool at an element offset (adapter weights, received KV).
    fn pool_write(&self, pool: &mut Self::Pool, offset: usize, data: &[f32]) -> Result<()>;
    /// The KV elements (keys then values) of whole pages, concatenated, on the host: what one
    /// layer of a sequence sends in disaggregated serving.
    fn gather_kv(&self, layout: &KvLayout, pool: &Self::Pool, pages: &[u32]) -> Result<Vec<f32>>;
    /// The inverse of [`Backend::gather_kv`]: writes received KV into pages.
    fn scatter_kv(
        &self,
        layout: &KvLayout,
        data: &[f32],
        pages: &[u32],
        pool: &mut Self::Pool,
    ) -> Result<()>;
    /// Copies pool elements back to the host (KV transfer, tests).
    fn pool_read(&self, pool: &Self::Pool, offset: usize, len: usize) -> Result<Vec<f32>>;

    /// Rows of `table` for `ids`: `[ids.len(), hidden]`.
    fn embedding(&self, ids: &[u32], table: &Self::Param) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Param, eps: f32) -> Result<Self::Tensor>;
    /// `x · Wᵀ (+ bias)` for a weight made by [`Backend::matrix`].
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Param,
        bias: Option<&Self::Param>,
    ) -> Result<Self::Tensor>;
    /// `x · Eᵀ` with the embedding table as the LM head (tied embeddings).
    fn linear_tied(&self, x: &Self::Tensor, table: &Self::Param) -> Result<Self::Tensor>;
    /// Heterogeneous LoRA: `y[rows of seg] += seg.scale · (x·A)·B` for every segment, with A and B
    /// read from pool rows (S-LoRA MBGMM/MBGMV).
    fn lora(
        &self,
        x: &Self::Tensor,
        y: &mut Self::Tensor,
        pool: &Self::Pool,
        segments: &[LoraSegment<'_>],
        max_rank: usize,
    ) -> Result<()>;
    /// In-place rotary embedding of `[T, heads·head_dim]`.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()>;
    fn write_kv(
        &self,
        layout: &KvLayout,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[usize],
        pool: &mut Self::Pool,
    ) -> Result<()>;
    /// Causal paged attention over the pool for prefill chunks and decode rows alike.
    fn attention(
        &self,
        layout: &KvLayout,
        q: &Self::Tensor,
        heads: usize,
        pool: &Self::Pool,
        seqs: &[AttnSeq<'_>],
        scale: f32,
        sliding_window: Option<usize>,
    ) -> Result<Self::Tensor>;
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// The given rows of `x`, in order.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// The tensor's values on the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
}
