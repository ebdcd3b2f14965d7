//! Device selection: `--device cpu|cuda[:N]` and the compute dtype, parsed once, and running
//! generic code on the backend they name ([`with_backend`]).
//!
//! Builds without the `cuda` feature too: then `cuda:N` parses (so configs stay portable) and
//! fails at start-up with [`DeviceError::NotBuilt`].

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::cpu::CpuBackend;
use super::{Backend, BackendError};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device ordinal `N` of `cuda:N`.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a device or dtype cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: expected `cpu`, `cuda` or `cuda:N`")]
    Invalid(String),
    #[error("dtype {0:?}: expected auto, float32, bfloat16 or float16 (or f32, bf16, f16)")]
    Dtype(String),
    #[error("device {0}: this binary was built without the `cuda` feature")]
    NotBuilt(Device),
}

impl DeviceError {
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceError::Invalid(_) => "invalid_device",
            DeviceError::Dtype(_) => "invalid_dtype",
            DeviceError::NotBuilt(_) => "device_not_built",
        }
    }
}

/// Parses `cpu`, `cuda` (device 0) or `cuda:N` (case-insensitive, surrounding spaces ignored).
///
/// # Errors
/// [`DeviceError::Invalid`] for anything else.
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    let lower = s.trim().to_ascii_lowercase();
    match lower.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| DeviceError::Invalid(s.to_owned())),
    }
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_device(s)
    }
}

/// How GEMM weights are stored on a GPU (activations, the pool and all accumulation stay
/// f32). The CPU backend computes in f32 whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Parses the `--dtype` values (`auto`, `float32`, `bfloat16`, `float16`, `f32`, `bf16`,
/// `f16`); `auto` takes the checkpoint's `torch_dtype` (f32 when it names none or another).
///
/// # Errors
/// [`DeviceError::Dtype`] for another spelling.
pub fn parse_dtype(s: &str, checkpoint: Option<&str>) -> Result<ComputeDtype, DeviceError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(match checkpoint {
            Some("bfloat16") => ComputeDtype::Bf16,
            Some("float16") => ComputeDtype::F16,
            _ => ComputeDtype::F32,
        }),
        "float32" | "f32" => Ok(ComputeDtype::F32),
        "bfloat16" | "bf16" => Ok(ComputeDtype::Bf16),
        "float16" | "f16" => Ok(ComputeDtype::F16),
        _ => Err(DeviceError::Dtype(s.to_owned())),
    }
}

/// Generic code to run on whichever backend a [`Device`] names.
pub trait WithBackend {
    type Output;
    fn run<B: Backend>(self, backend: B) -> Self::Output;
}

/// Builds the backend for `device` (opening the GPU and compiling its kernels for `cuda:N`)
/// and runs `job` on it.
///
/// # Errors
/// [`DeviceError::NotBuilt`] (as [`BackendError::Device`]) for `cuda:N` without the `cuda`
/// feature; the GPU backend's own errors (no driver, no such device, a kernel that does not
/// compile).
pub fn with_backend<W: WithBackend>(
    device: Device,
    dtype: ComputeDtype,
    job: W,
) -> Result<W::Output, BackendError> {
    match device {
        Device::Cpu => Ok(job.run(CpuBackend)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            use super::cuda::{CudaBackend, WeightDtype};
            let dtype = match dtype {
                ComputeDtype::F32 => WeightDtype::F32,
                ComputeDtype::Bf16 => WeightDtype::Bf16,
                ComputeDtype::F16 => WeightDtype::F16,
            };
            Ok(job.run(CudaBackend::new(ordinal, dtype)?))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = dtype;
            Err(BackendError::Device(
                DeviceError::NotBuilt(device).to_string(),
            ))
        }
    }
}

/// A device's measured copy bandwidth ([`copy_bandwidth`]), bytes per second counting bytes
/// read plus bytes written.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CopyRate {
    /// Size of each of the two buffers copied between.
    pub buffer_bytes: usize,
    /// The fastest timed round: the ceiling steps are read against.
    pub best_bps: f64,
    pub median_bps: f64,
}

/// The device-to-device copy bandwidth of `cuda:N`, between two buffers of `bytes` over
/// `rounds` timed rounds (loraplane_kernels' `copy_bandwidth`, on a device opened for the
/// measurement and closed after it): the memory ceiling `bench hetero` reads GPU decode steps
/// against.
///
/// # Errors
/// [`BackendError::Device`] for `cpu` (the CPU suites measure their own bandwidth) and, as
/// [`DeviceError::NotBuilt`], for `cuda:N` in a binary without the `cuda` feature; the GPU's
/// own errors (no driver, no such device, out of memory, arguments too small to time).
pub fn copy_bandwidth(
    device: Device,
    bytes: usize,
    rounds: usize,
) -> Result<CopyRate, BackendError> {
    match device {
        Device::Cpu => Err(BackendError::Device(
            "copy bandwidth: only measured on a CUDA device".to_owned(),
        )),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let dev = loraplane_kernels::cuda::CudaDevice::open(ordinal)?;
            let b = loraplane_kernels::cuda::copy_bandwidth(&dev, bytes, rounds)?;
            Ok(CopyRate {
                buffer_bytes: b.buffer_bytes,
                best_bps: b.best(),
                median_bps: b.median(),
            })
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (bytes, rounds);
            Err(BackendError::Device(
                DeviceError::NotBuilt(device).to_string(),
            ))
        }
    }
}

/// Bytes per element of a `torch_dtype` spelling (4 for unknown spellings).
fn dtype_bytes(torch_dtype: Option<&str>) -> u64 {
    match torch_dtype {
        Some("bfloat16" | "float16") => 2,
        _ => 4,
    }
}

/// An estimate of the device memory the weights of the checkpoint in `dir` take once loaded:
/// the safetensors bytes rescaled from the checkpoint's dtype (`torch_dtype`, as its
/// `config.json` says) to the compute dtype (norms and biases, which stay f32, are a rounding
/// error next to the matrices).
///
/// # Errors
/// The checkpoint directory cannot be listed.
pub fn weight_bytes_estimate(
    dir: &Path,
    torch_dtype: Option<&str>,
    dtype: ComputeDtype,
) -> std::io::Result<u64> {
    let mut stored = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            stored += entry.metadata()?.len();
        }
    }
    let source = dtype_bytes(torch_dtype);
    let target = match dtype {
        ComputeDtype::F32 => 4,
        ComputeDtype::Bf16 | ComputeDtype::F16 => 2,
    };
    Ok(stored / source * target)
}

/// Pages of `page_bytes` that fit in `fraction` of `free` device memory once `weights` bytes
/// are set aside.
///
/// # Errors
/// [`BackendError::Device`] when not even one page fits.
pub fn pages_for_fraction(
    free: u64,
    fraction: f64,
    weights: u64,
    page_bytes: u64,
) -> Result<usize, BackendError> {
    // Truncation is the intent: a budget in whole bytes.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let budget = (free as f64 * fraction) as u64;
    let pages = budget.saturating_sub(weights) / page_bytes.max(1);
    if pages == 0 {
        return Err(BackendError::Device(format!(
            "--device-pool-fraction {fraction}: {budget} bytes of {free} free leave no room for \
             a {page_bytes}-byte page after about {weights} bytes of weights"
        )));
    }
    Ok(usize::try_from(pages.min(u64::from(u32::MAX))).unwrap_or(u32::MAX as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_fraction_sets_weights_aside() {
        // 10 GiB free, 90 %: 9 GiB budget; 1 GiB of weights; 1 MiB pages → 8192 pages.
        let gib = 1u64 << 30;
        assert_eq!(
            pages_for_fraction(10 * gib, 0.9, gib, 1 << 20).unwrap(),
            ((10 * gib) as f64 * 0.9) as usize / (1 << 20) - 1024
        );
        assert_eq!(pages_for_fraction(4096, 1.0, 0, 1024).unwrap(), 4);
        let err = pages_for_fraction(1 << 20, 0.5, 1 << 20, 1024).unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
    }

    #[test]
    fn weight_estimate_rescales_to_the_compute_dtype() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), vec![0u8; 5000]).unwrap();
        // 1000 bf16 bytes = 500 elements: 2000 bytes in f32, 1000 in f16.
        let bf16 = Some("bfloat16");
        let got = weight_bytes_estimate(dir.path(), bf16, ComputeDtype::F32).unwrap();
        assert_eq!(got, 2000);
        let got = weight_bytes_estimate(dir.path(), bf16, ComputeDtype::F16).unwrap();
        assert_eq!(got, 1000);
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device(" CUDA "), Ok(Device::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(Device::Cuda(3)));
        assert_eq!("cuda:12".parse::<Device>(), Ok(Device::Cuda(12)));
        for bad in [
            "", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "cuda:+1", "cpu:0",
        ] {
            assert_eq!(
                parse_device(bad),
                Err(DeviceError::Invalid(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            parse_device(&Device::Cuda(7).to_string()),
            Ok(Device::Cuda(7))
        );
        assert_eq!(Device::default(), Device::Cpu);
    }

    #[test]
    fn dtypes_parse_with_auto_from_the_checkpoint() {
        assert_eq!(
            parse_dtype("auto", Some("bfloat16")),
            Ok(ComputeDtype::Bf16)
        );
        assert_eq!(parse_dtype("auto", Some("float16")), Ok(ComputeDtype::F16));
        assert_eq!(parse_dtype("auto", Some("float32")), Ok(ComputeDtype::F32));
        assert_eq!(parse_dtype("auto", None), Ok(ComputeDtype::F32));
        assert_eq!(parse_dtype("BF16", None), Ok(ComputeDtype::Bf16));
        assert_eq!(
            parse_dtype("float16", Some("bfloat16")),
            Ok(ComputeDtype::F16)
        );
        assert_eq!(parse_dtype("f32", None), Ok(ComputeDtype::F32));
        assert_eq!(
            parse_dtype("int8", None).unwrap_err().kind(),
            "invalid_dtype"
        );
    }

    #[test]
    fn copy_bandwidth_is_a_gpu_measurement_that_fails_cleanly_elsewhere() {
        let err = copy_bandwidth(Device::Cpu, 1 << 20, 1).unwrap_err();
        assert_eq!(err.kind(), "device");
        // As for `with_backend` below: NotBuilt, no driver, or a measurement on a GPU machine.
        match copy_bandwidth(Device::Cuda(0), 1 << 20, 2) {
            Ok(rate) => assert!(rate.best_bps >= rate.median_bps && rate.median_bps > 0.0),
            Err(e) => assert!(
                matches!(e.kind(), "device" | "cuda_unavailable" | "cuda"),
                "{e}"
            ),
        }
    }

    #[test]
    fn cpu_jobs_run_and_gpu_jobs_fail_cleanly_without_a_gpu() {
        struct Name;
        impl WithBackend for Name {
            type Output = &'static str;
            fn run<B: Backend>(self, backend: B) -> &'static str {
                backend.name()
            }
        }
        assert_eq!(
            with_backend(Device::Cpu, ComputeDtype::F32, Name).unwrap(),
            "cpu"
        );
        // Without the feature this is NotBuilt; with it, on a machine without a GPU, the
        // driver is missing. On a GPU machine it opens the device.
        match with_backend(Device::Cuda(0), ComputeDtype::F32, Name) {
            Ok(name) => assert_eq!(name, "cuda"),
            Err(e) => assert!(
                matches!(e.kind(), "device" | "cuda_unavailable" | "cuda"),
                "{e}"
            ),
        }
    }
}
