//! The one NVRTC kernel cache: every `.cu` source is compiled at most once per
//! (kernel name, source hash, compile options, device arch), and a failed compile returns the
//! NVRTC log in [`KernelError::Compile`].
//!
//! The map itself ([`KernelCache`]) is generic over what it stores, so its compile-once and
//! error behaviour is unit-tested on machines without CUDA; [`NvrtcCache`] plugs NVRTC in.
//! The cache is an owned value held by the CUDA backend, not a global: two backends (or two
//! tests) never share state behind each other's back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::KernelError;

/// A kernel's CUDA C++ source, embedded with `include_str!`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// Kernel family name, used in cache keys, errors and as the NVRTC program name.
    pub name: &'static str,
    /// `extern "C"` entry points the source defines.
    pub entries: &'static [&'static str],
    pub source: &'static str,
}

/// Everything that changes the compiled code; two equal keys may share one PTX.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompileKey {
    pub kernel: &'static str,
    /// [`source_hash`] of the source text.
    pub source_hash: u64,
    /// NVRTC options other than the architecture, in the order they are passed.
    pub options: Vec<String>,
    /// Virtual architecture, e.g. `compute_90` (see [`arch_for`]).
    pub arch: String,
}

impl CompileKey {
    pub fn new(source: &KernelSource, options: &[String], arch: &str) -> Self {
        Self {
            kernel: source.name,
            source_hash: source_hash(source.source),
            options: options.to_vec(),
            arch: arch.to_owned(),
        }
    }

    /// The full NVRTC command line: the options, then `--gpu-architecture`.
    pub fn nvrtc_options(&self) -> Vec<String> {
        let mut options = self.options.clone();
        options.push(format!("--gpu-architecture={}", self.arch));
        options
    }
}

/// 64-bit FNV-1a of the source: stable across processes, builds and Rust versions (unlike
/// `DefaultHasher`), so it can also name an on-disk cache later.
pub fn source_hash(source: &str) -> u64 {
    source.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The virtual architecture for a compute capability, e.g. `(9, 0)` → `compute_90`: NVRTC
/// emits PTX for it and the driver JIT-compiles that for the exact device on load.
pub fn arch_for(major: u32, minor: u32) -> String {
    format!("compute_{major}{minor}")
}

/// A compile-once map from [`CompileKey`] to a shared artefact.
///
/// # Guarantees
/// For a given key, `compile` runs until it succeeds once; later calls return the same `Arc`.
/// A failed compile is not cached (the error goes back to the caller, and a later call with a
/// fixed environment may succeed). Compiles are serialised by the map's lock, so two threads
/// asking for the same key never compile it twice.
pub struct KernelCache<T> {
    entries: Mutex<HashMap<CompileKey, Arc<T>>>,
}

impl<T> Default for KernelCache<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> KernelCache<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached artefact for `key`, compiling it with `compile` on a miss.
    ///
    /// # Errors
    /// Whatever `compile` returns; nothing is cached then.
    pub fn get_or_compile(
        &self,
        key: &CompileKey,
        compile: impl FnOnce(&CompileKey) -> Result<T, KernelError>,
    ) -> Result<Arc<T>, KernelError> {
        // A panic in another thread's compile leaves the map itself consistent (inserts are
        // single calls), so a poisoned lock is safe to keep using.
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hit) = entries.get(key) {
            return Ok(Arc::clone(hit));
        }
        let compiled = Arc::new(compile(key)?);
        entries.insert(key.clone(), Arc::clone(&compiled));
        Ok(compiled)
    }

    /// Number of compiled entries.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`KernelCache`] of PTX compiled by NVRTC.
#[derive(Default)]
pub struct NvrtcCache {
    ptx: KernelCache<Ptx>,
}

impl NvrtcCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// PTX for `source` compiled with `options` for `arch`, compiled on first use.
    ///
    /// # Errors
    /// [`KernelError::CudaUnavailable`] if the NVRTC library cannot be loaded;
    /// [`KernelError::Compile`] with NVRTC's log if the source does not compile;
    /// [`KernelError::InvalidArgument`] if the source contains a NUL byte.
    pub fn ptx(
        &self,
        source: &KernelSource,
        options: &[String],
        arch: &str,
    ) -> Result<Arc<Ptx>, KernelError> {
        let key = CompileKey::new(source, options, arch);
        self.ptx.get_or_compile(&key, |key| compile(source, key))
    }

    /// Number of distinct compiled programs.
    pub fn len(&self) -> usize {
        self.ptx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ptx.is_empty()
    }
}

fn compile(source: &KernelSource, key: &CompileKey) -> Result<Ptx, KernelError> {
    if source.source.contains('\0') {
        // cudarc would panic building the C string.
        return Err(KernelError::invalid(
            "nvrtc",
            "source",
            format!("`{}` contains a NUL byte", source.name),
        ));
    }
    // SAFETY: `is_culib_present` only tries `dlopen` on NVRTC's library names and drops what
    // it opens; it touches no other state. Checking first turns cudarc's panic on a machine
    // without NVRTC into an error.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(KernelError::CudaUnavailable { library: "nvrtc" });
    }
    let options = CompileOptions {
        options: key.nvrtc_options(),
        name: Some(format!("{}.cu", source.name)),
        ..CompileOptions::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source.source, options)
        .map_err(|e| compile_error(source.name, key, e))
}

fn compile_error(kernel: &str, key: &CompileKey, error: CompileError) -> KernelError {
    match error {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
        } => KernelError::Compile {
            kernel: kernel.to_owned(),
            options,
            message: format!("{nvrtc:?}"),
            log: log.to_string_lossy().into_owned(),
        },
        other => KernelError::Compile {
            kernel: kernel.to_owned(),
            options: key.nvrtc_options(),
            message: other.to_string(),
            log: String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const SRC: KernelSource = KernelSource {
        name: "demo",
        entries: &["demo_f32"],
        source: "extern \"C\" __global__ void demo_f32() {}",
    };

    #[test]
    fn source_hash_is_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(source_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(source_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(source_hash(SRC.source), source_hash("extern"));
    }

    #[test]
    fn key_covers_name_source_options_and_arch() {
        let base = CompileKey::new(&SRC, &["--use_fast_math".into()], "sm_90");
        assert_eq!(
            base,
            CompileKey::new(&SRC, &["--use_fast_math".into()], "sm_90")
        );
        assert_ne!(base, CompileKey::new(&SRC, &[], "sm_90"));
        assert_ne!(
            base,
            CompileKey::new(&SRC, &["--use_fast_math".into()], "sm_80")
        );
        let edited = KernelSource {
            source: "extern \"C\" __global__ void demo_f32() { }",
            ..SRC
        };
        assert_ne!(
            base,
            CompileKey::new(&edited, &["--use_fast_math".into()], "sm_90")
        );
        let renamed = KernelSource {
            name: "other",
            ..SRC
        };
        assert_ne!(
            base,
            CompileKey::new(&renamed, &["--use_fast_math".into()], "sm_90")
        );
        assert_eq!(
            base.nvrtc_options(),
            vec!["--use_fast_math", "--gpu-architecture=sm_90"]
        );
        assert_eq!(arch_for(9, 0), "compute_90");
    }

    #[test]
    fn compiles_once_per_key_and_does_not_cache_failures() {
        let cache = KernelCache::<String>::new();
        let calls = Cell::new(0);
        let key = CompileKey::new(&SRC, &[], "sm_90");
        let compile = |k: &CompileKey| {
            calls.set(calls.get() + 1);
            Ok(format!("ptx for {}", k.arch))
        };
        let first = cache.get_or_compile(&key, compile).unwrap();
        let second = cache.get_or_compile(&key, compile).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(calls.get(), 1);

        let other = CompileKey::new(&SRC, &[], "sm_80");
        let failing = |k: &CompileKey| {
            Err(KernelError::Compile {
                kernel: k.kernel.to_owned(),
                options: k.nvrtc_options(),
                message: "NVRTC_ERROR_COMPILATION".into(),
                log: "demo.cu(1): error: expected a \";\"".into(),
            })
        };
        let err = cache.get_or_compile(&other, failing).unwrap_err();
        assert_eq!(err.kind(), "compile");
        assert!(err.to_string().contains("expected a \";\""));
        assert_eq!(cache.len(), 1);
        assert_eq!(
            *cache.get_or_compile(&other, compile).unwrap(),
            "ptx for sm_80"
        );
        assert_eq!((cache.len(), calls.get()), (2, 2));
    }

    #[test]
    fn nvrtc_cache_rejects_nul_before_touching_nvrtc() {
        let bad = KernelSource {
            source: "\0",
            ..SRC
        };
        let err = NvrtcCache::new().ptx(&bad, &[], "sm_90").unwrap_err();
        assert_eq!(err.kind(), "invalid_argument");
    }

    #[test]
    fn nvrtc_cache_without_nvrtc_is_an_error_not_a_panic() {
        // On a machine with NVRTC this compiles the real kernel instead.
        let cache = NvrtcCache::new();
        match cache.ptx(&super::super::RMS_NORM, &[], "compute_80") {
            Ok(_) => assert_eq!(cache.len(), 1),
            Err(e) => {
                assert_eq!(e.kind(), "cuda_unavailable");
                assert!(cache.is_empty());
            }
        }
    }
}
