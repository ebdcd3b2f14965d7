//! Base-model GEMMs through cuBLAS: `y = x·Wᵀ (+ bias)` for a weight kept in Hugging Face's
//! `[out, in]` row-major layout, stored in f32, bf16 or f16 and always accumulated in f32.
//!
//! cuBLAS is column-major. Row-major `y [T, out]` is column-major `yᵀ [out, T]`, and row-major
//! `W [out, in]` is column-major `Wᵀ [in, out]`; so `yᵀ = op(Wᵀ)·xᵀ` with `op` = transpose:
//! `transa = T, transb = N, m = out, n = T, k = in, lda = ldb = in, ldc = out` — no copy, no
//! explicit transposition (the usual trick).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::DevicePtr;
use cudarc::driver::DevicePtrMut;

use super::device::{CudaDevice, DeviceBuffer};
use super::ops::{add_bias, convert_to_half};
use crate::KernelError;

const KERNEL: &str = "linear";

/// How a weight matrix is stored on the device. Activations stay f32; a 16-bit GEMM converts
/// its input to the weight's type and accumulates in f32 (cuBLAS `COMPUTE_32F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
}

#[derive(Debug)]
pub(crate) enum MatrixData {
    F32(DeviceBuffer<f32>),
    /// bf16 or f16 bit patterns, as [`DeviceMatrix::dtype`] says.
    Half(DeviceBuffer<u16>),
}

/// A `[rows, cols]` row-major matrix on the device: a linear layer's weight (`[out, in]`) or
/// the embedding table (`[vocab, hidden]`, also the tied LM head).
#[derive(Debug)]
pub struct DeviceMatrix {
    data: MatrixData,
    dtype: WeightDtype,
    rows: usize,
    cols: usize,
}

impl DeviceMatrix {
    /// Uploads `data` (`[rows, cols]` f32), rounding to `dtype` on the host (nearest even, as
    /// the `half` crate and PyTorch do).
    ///
    /// # Errors
    /// `data` not `rows · cols` long, dimensions beyond cuBLAS's `i32`, or an allocation
    /// failure.
    pub fn upload(
        dev: &CudaDevice,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
    ) -> Result<Self, KernelError> {
        let len = rows.checked_mul(cols).ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "rows * cols",
        })?;
        if data.len() != len {
            return Err(KernelError::ShapeMismatch {
                kernel: KERNEL,
                what: "weight",
                expected: len,
                actual: data.len(),
            });
        }
        blas_dim("rows", rows)?;
        blas_dim("cols", cols)?;
        let data = match dtype {
            WeightDtype::F32 => MatrixData::F32(dev.upload(data)?),
            WeightDtype::Bf16 => MatrixData::Half(
                dev.upload(
                    &data
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_bits())
                        .collect::<Vec<u16>>(),
                )?,
            ),
            WeightDtype::F16 => MatrixData::Half(
                dev.upload(
                    &data
                        .iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect::<Vec<u16>>(),
                )?,
            ),
        };
        Ok(Self {
            data,
            dtype,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Bytes of device memory the matrix holds.
    pub fn num_bytes(&self) -> usize {
        match &self.data {
            MatrixData::F32(b) => b.num_bytes(),
            MatrixData::Half(b) => b.num_bytes(),
        }
    }

    pub(crate) fn data(&self) -> &MatrixData {
        &self.data
    }
}

fn blas_dim(what: &'static str, n: usize) -> Result<i32, KernelError> {
    i32::try_from(n)
        .map_err(|_| KernelError::invalid(KERNEL, what, format!("{n} exceeds cuBLAS's i32")))
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> KernelError {
    KernelError::Cuda {
        kernel: KERNEL,
        message: e.to_string(),
    }
}

/// `out = x · Wᵀ (+ bias)`: `x` is `[T, w.cols()]`, `out` `[T, w.rows()]`, `bias` `[w.rows()]`.
///
/// # Errors
/// `x` not a whole number of rows; `out` or `bias` of the wrong length; sizes beyond `i32`;
/// a cuBLAS failure. `out` is untouched on a shape error.
pub fn linear(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
    w: &DeviceMatrix,
    bias: Option<&DeviceBuffer<f32>>,
    out: &mut DeviceBuffer<f32>,
) -> Result<(), KernelError> {
    let (out_dim, in_dim) = (w.rows, w.cols);
    if in_dim == 0 || !x.len().is_multiple_of(in_dim) {
        return Err(KernelError::RaggedRows {
            kernel: KERNEL,
            what: "x",
            len: x.len(),
            width: in_dim,
        });
    }
    let tokens = x.len() / in_dim;
    let expected = tokens
        .checked_mul(out_dim)
        .ok_or(KernelError::SizeOverflow {
            kernel: KERNEL,
            what: "out",
        })?;
    if out.len() != expected {
        return Err(KernelError::ShapeMismatch {
            kernel: KERNEL,
            what: "out",
            expected,
            actual: out.len(),
        });
    }
    if let Some(b) = bias
        && b.len() != out_dim
    {
        return Err(KernelError::ShapeMismatch {
            kernel: KERNEL,
            what: "bias",
            expected: out_dim,
            actual: b.len(),
        });
    }
    let (m, n, k) = (
        blas_dim("out_dim", out_dim)?,
        blas_dim("tokens", tokens)?,
        blas_dim("in_dim", in_dim)?,
    );
    if tokens == 0 || out_dim == 0 {
        return Ok(());
    }
    dev.bind()?;
    let stream = dev.stream();
    let handle = *dev.blas().handle();
    let (alpha, beta) = (1.0f32, 0.0f32);
    match &w.data {
        MatrixData::F32(wd) => {
            let (a, _a) = wd.slice.device_ptr(stream);
            let (b, _b) = x.slice.device_ptr(stream);
            let (c, _c) = out.slice.device_ptr_mut(stream);
            // SAFETY: A is `out_dim × in_dim` (checked at upload), B is `tokens × in_dim` and C
            // `tokens × out_dim` (checked above), all row-major, which with transa = T and the
            // leading dimensions below is exactly what cuBLAS reads and writes. The handle is
            // bound to this device's stream, on which the buffers were written.
            unsafe {
                cudarc::cublas::result::sgemm(
                    handle,
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    &alpha,
                    a as *const f32,
                    k,
                    b as *const f32,
                    k,
                    &beta,
                    c as *mut f32,
                    m,
                )
            }
            .map_err(blas_err)?;
        }
        MatrixData::Half(wd) => {
            let ty = match w.dtype {
                WeightDtype::F16 => cudaDataType::CUDA_R_16F,
                WeightDtype::Bf16 | WeightDtype::F32 => cudaDataType::CUDA_R_16BF,
            };
            let mut xh = dev.zeros::<u16>(x.len())?;
            convert_to_half(dev, x, w.dtype, &mut xh)?;
            let (a, _a) = wd.slice.device_ptr(stream);
            let (b, _b) = xh.slice.device_ptr(stream);
            let (c, _c) = out.slice.device_ptr_mut(stream);
            // SAFETY: as for the f32 case, with A and B 16-bit of type `ty` (the weight was
            // stored and `x` converted as `w.dtype`) and C f32; COMPUTE_32F with f32 scalars
            // is a documented cublasGemmEx combination for 16F/16BF inputs and a 32F output.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    (&alpha as *const f32).cast(),
                    a as *const std::ffi::c_void,
                    ty,
                    k,
                    b as *const std::ffi::c_void,
                    ty,
                    k,
                    (&beta as *const f32).cast(),
                    c as *mut std::ffi::c_void,
                    cudaDataType::CUDA_R_32F,
                    m,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(blas_err)?;
        }
    }
    if let Some(b) = bias {
        add_bias(dev, out, b)?;
    }
    Ok(())
}
