//! One CUDA device as the kernels use it: its context, the one stream every launch and copy is
//! ordered on, the cuBLAS handle, and the modules compiled through the NVRTC cache; plus
//! [`DeviceBuffer`], the device memory the launch wrappers take.
//!
//! One stream, so stream order is the only synchronisation: cudarc's per-buffer event
//! tracking is switched off (it would add two driver calls per buffer per launch).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchArgs,
    ValidAsZeroBits,
};

use super::cache::{KernelSource, NvrtcCache, arch_for};
use crate::KernelError;
use crate::cpu::check;

/// Device memory of `len` elements. CUDA cannot allocate zero bytes, so an empty buffer holds
/// one unused element; [`DeviceBuffer::len`] is the logical length every check uses.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    pub(crate) slice: CudaSlice<T>,
    len: usize,
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of device memory held.
    pub fn num_bytes(&self) -> usize {
        self.slice.num_bytes()
    }
}

/// The compiled entry points of one [`KernelSource`] on one device.
struct LoadedModule {
    source: &'static str,
    functions: HashMap<&'static str, CudaFunction>,
    _module: Arc<CudaModule>,
}

/// A CUDA device, ready to launch the kernels of this crate.
///
/// # Guarantees
/// Every operation of the device is ordered on one stream; reads back to the host
/// ([`CudaDevice::download`]) wait for all work queued before them. Kernels are compiled once
/// per (kernel, source hash, options, arch) on first use and then reused.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arch: String,
    multiprocessors: usize,
    options: Vec<String>,
    nvrtc: NvrtcCache,
    modules: Mutex<HashMap<&'static str, Arc<LoadedModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("multiprocessors", &self.multiprocessors)
            .finish_non_exhaustive()
    }
}

/// Maps a cudarc error of `what` to [`KernelError::Cuda`].
pub(crate) fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        kernel: what,
        message: e.to_string(),
    }
}

/// Whether the CUDA driver library can be loaded and reports at least one device. Never
/// panics on machines without CUDA.
pub fn driver_device_count() -> Result<usize, KernelError> {
    // SAFETY: `is_culib_present` only tries `dlopen` on the driver library's names and drops
    // what it opens. Checking first turns cudarc's panic on a machine without CUDA into an
    // error.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::CudaUnavailable { library: "cuda" });
    }
    let count = CudaContext::device_count().map_err(cuda_err("cuInit"))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

impl CudaDevice {
    /// Opens device `ordinal` (`cuda:N`): its primary context, a stream, a cuBLAS handle.
    ///
    /// # Errors
    /// [`KernelError::CudaUnavailable`] when the driver, NVRTC or cuBLAS library is missing;
    /// [`KernelError::Cuda`] when the device does not exist or cannot be initialised.
    pub fn open(ordinal: usize) -> Result<Self, KernelError> {
        let count = driver_device_count()?;
        if ordinal >= count {
            return Err(KernelError::Cuda {
                kernel: "device",
                message: format!("cuda:{ordinal} requested, {count} device(s) present"),
            });
        }
        // SAFETY: as for the driver above: `dlopen` probes only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(KernelError::CudaUnavailable { library: "nvrtc" });
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::CudaUnavailable { library: "cublas" });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("device"))?;
        // SAFETY: switched off before this context's first allocation, and every buffer this
        // device allocates is used on `stream` only, whose order already serialises all
        // reads and writes (see the module docs).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Cuda {
            kernel: "cublas",
            message: e.to_string(),
        })?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("device"))?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("device"))?;
        Ok(Self {
            arch: arch_for(major as u32, minor as u32),
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(1).max(1),
            ctx,
            stream,
            blas,
            options: Vec::new(),
            nvrtc: NvrtcCache::new(),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("<{e}>"))
    }

    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// `(free, total)` device memory in bytes.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if the driver call fails.
    pub fn memory(&self) -> Result<(usize, usize), KernelError> {
        self.ctx.mem_get_info().map_err(cuda_err("memory"))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    pub(crate) fn bind(&self) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(cuda_err("bind"))
    }

    /// A zeroed buffer of `len` elements.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] when the allocation fails (out of memory).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<DeviceBuffer<T>, KernelError> {
        let slice = self
            .stream
            .alloc_zeros(len.max(1))
            .map_err(cuda_err("alloc"))?;
        Ok(DeviceBuffer { slice, len })
    }

    /// A buffer holding a copy of `data`.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] when the allocation or the copy fails.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DeviceBuffer<T>, KernelError> {
        // SAFETY: the memory is uninitialised only until the copy below, queued on the same
        // stream before anything can read it; an empty buffer's one element is never read.
        let slice =
            unsafe { self.stream.alloc::<T>(data.len().max(1)) }.map_err(cuda_err("alloc"))?;
        let mut buffer = DeviceBuffer {
            slice,
            len: data.len(),
        };
        self.write(&mut buffer, 0, data)?;
        Ok(buffer)
    }

    /// Copies `data` into `dst` at element `offset`.
    ///
    /// # Errors
    /// [`KernelError::PoolOffsetOutOfRange`] if `offset + data.len()` exceeds `dst`
    /// (nothing is written); [`KernelError::Cuda`] if the copy fails.
    pub fn write<T: DeviceRepr>(
        &self,
        dst: &mut DeviceBuffer<T>,
        offset: usize,
        data: &[T],
    ) -> Result<(), KernelError> {
        let end = check::pool_range("write", offset, data.len(), dst.len)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice.slice_mut(offset..end);
        self.stream
            .memcpy_htod(data, &mut view)
            .map_err(cuda_err("write"))
    }

    /// The whole buffer on the host, after all queued work.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if the copy or any queued kernel failed.
    pub fn download<T: DeviceRepr>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>, KernelError> {
        self.download_range(src, 0, src.len)
    }

    /// Elements `offset .. offset + len` of `src` on the host, after all queued work.
    ///
    /// # Errors
    /// [`KernelError::PoolOffsetOutOfRange`] for a range outside `src`; [`KernelError::Cuda`]
    /// if the copy or any queued kernel failed.
    pub fn download_range<T: DeviceRepr>(
        &self,
        src: &DeviceBuffer<T>,
        offset: usize,
        len: usize,
    ) -> Result<Vec<T>, KernelError> {
        let end = check::pool_range("read", offset, len, src.len)?;
        if len == 0 {
            self.synchronize()?;
            return Ok(Vec::new());
        }
        let view = src.slice.slice(offset..end);
        let host = self.stream.clone_dtoh(&view).map_err(cuda_err("read"))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Waits for every queued operation; reports an asynchronous failure of any of them.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] with the driver's message.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))?;
        self.ctx.check_err().map_err(cuda_err("synchronize"))
    }

    /// Compiles (once) every kernel source, so that a broken source or an unsupported
    /// architecture fails at start-up rather than at the first request.
    ///
    /// # Errors
    /// [`KernelError::Compile`] with the NVRTC log, or [`KernelError::Cuda`] on module load.
    pub fn preload(&self, sources: &[KernelSource]) -> Result<(), KernelError> {
        sources.iter().try_for_each(|s| self.module(s).map(|_| ()))
    }

    fn module(&self, source: &KernelSource) -> Result<Arc<LoadedModule>, KernelError> {
        // The lock is held across a compile: two threads never compile one source twice, and
        // a poisoned lock still guards a consistent map (inserts are single calls).
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = modules.get(source.name)
            && std::ptr::eq(m.source, source.source)
        {
            return Ok(Arc::clone(m));
        }
        let ptx = self.nvrtc.ptx(source, &self.options, &self.arch)?;
        let module = self
            .ctx
            .load_module((*ptx).clone())
            .map_err(cuda_err("load_module"))?;
        let mut functions = HashMap::new();
        for &entry in source.entries {
            let f = module
                .load_function(entry)
                .map_err(cuda_err("load_function"))?;
            functions.insert(entry, f);
        }
        let loaded = Arc::new(LoadedModule {
            source: source.source,
            functions,
            _module: module,
        });
        modules.insert(source.name, Arc::clone(&loaded));
        Ok(loaded)
    }

    /// The entry point `entry` of `source`, compiled and loaded on first use.
    pub(crate) fn function(
        &self,
        source: &KernelSource,
        entry: &'static str,
    ) -> Result<CudaFunction, KernelError> {
        self.module(source)?
            .functions
            .get(entry)
            .cloned()
            .ok_or_else(|| {
                KernelError::invalid(
                    "cuda",
                    "entry",
                    format!("{entry} is not in {}", source.name),
                )
            })
    }

    /// A launch builder for `f` on this device's stream.
    pub(crate) fn launcher<'a>(&'a self, f: &'a CudaFunction) -> LaunchArgs<'a> {
        self.stream.launch_builder(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_before_any_copy() {
        assert_eq!(check::pool_range("write", 2, 3, 5), Ok(5));
        assert_eq!(check::pool_range("write", 0, 0, 0), Ok(0));
        assert_eq!(
            check::pool_range("read", 4, 2, 5).unwrap_err().kind(),
            "pool_offset_out_of_range"
        );
        assert_eq!(
            check::pool_range("read", usize::MAX, 2, 5)
                .unwrap_err()
                .kind(),
            "pool_offset_out_of_range"
        );
    }

    #[test]
    fn opening_without_cuda_is_an_error_not_a_panic() {
        match CudaDevice::open(0) {
            Ok(dev) => assert!(dev.multiprocessors() >= 1),
            Err(e) => assert!(matches!(e.kind(), "cuda_unavailable" | "cuda"), "{e}"),
        }
        let err = CudaDevice::open(usize::MAX).unwrap_err();
        assert!(err.kind().starts_with("cuda"), "{err}");
    }
}
