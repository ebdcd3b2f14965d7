//! Compiles the kernels' `.cu` sources as C++ under `shim/emu.h` (CUDA built-ins emulated with
//! threads and barriers). The prelude's two PTX `asm` conversions (f16) are swapped for
//! `_Float16` in a generated copy; everything else is the real source, checked first for what
//! the emulator cannot run (src/scan.rs): the build fails naming it rather than compiling a
//! kernel that would silently compute something else.

#[path = "src/scan.rs"]
mod scan;

/// Refuses to build when a kernel uses something the emulator cannot run (src/scan.rs), naming
/// each construct and where it is, and when a `.cu` file has no shim (it would go untested).
fn check_sources(cuda: &std::path::Path, prelude: &str) {
    let emu_h = std::fs::read_to_string("shim/emu.h").expect("shim/emu.h");
    let buffers = scan::shared_buffers(&emu_h);
    let buffers: Vec<&str> = buffers.iter().map(String::as_str).collect();
    let mut findings: Vec<String> =
        scan::unsupported("prelude.cuh (as emulated)", prelude, &buffers)
            .iter()
            .map(ToString::to_string)
            .collect();
    let mut sources: Vec<_> = std::fs::read_dir(cuda)
        .expect("kernels/src/cuda")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for path in sources {
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let stem = path
            .file_stem()
            .expect("file stem")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("a .cu source");
        findings.extend(
            scan::unsupported(&name, &text, &buffers)
                .iter()
                .map(ToString::to_string),
        );
        if !std::path::Path::new(&format!("shim/{stem}.cpp")).exists() {
            findings.push(format!(
                "{name}: no shim/{stem}.cpp, so its kernels would not be emulated at all"
            ));
        }
    }
    if !findings.is_empty() {
        panic!(
            "\n\ncuda-emu cannot run these kernels on the CPU:\n  {}\n\nExtend shim/emu.h and \
             src/scan.rs to emulate them, or check the kernel on a GPU \
             (kernels/tests/cuda_parity.rs).\n",
            findings.join("\n  ")
        );
    }
}

fn main() {
    let cuda = std::path::Path::new("../../kernels/src/cuda");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let prelude = std::fs::read_to_string(cuda.join("prelude.cuh")).expect("prelude.cuh");
    let start = prelude
        .find("__device__ __forceinline__ float from_f16_bits")
        .expect("f16 helpers");
    let end = prelude
        .find("__device__ __forceinline__ float from_f32")
        .expect("from_f32");
    let patched = format!(
        "{}{}{}",
        &prelude[..start],
        "__device__ __forceinline__ float from_f16_bits(unsigned short h) {\n    _Float16 x; std::memcpy(&x, &h, 2); return (float)x;\n}\n\n__device__ __forceinline__ unsigned short to_f16_bits(float f) {\n    _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h;\n}\n\n",
        &prelude[end..]
    );
    check_sources(cuda, &patched);
    std::fs::write(out.join("emu_prelude.cuh"), patched).expect("write prelude");
    let mut b = cc::Build::new();
    b.cpp(true)
        .flag("-std=c++20")
        .flag("-pthread")
        .opt_level(1)
        .warnings(false)
        .include("shim")
        .include(&out)
        .include(cuda);
    for f in [
        "emu",
        "rms_norm",
        "elementwise",
        "rope",
        "kv",
        "attention",
        "lora",
        "sampling",
    ] {
        b.file(format!("shim/{f}.cpp"));
    }
    b.compile("emu");
    println!("cargo:rustc-link-lib=stdc++");
    println!("cargo:rerun-if-changed=shim");
    println!("cargo:rerun-if-changed=src/scan.rs");
    println!("cargo:rerun-if-changed=../../kernels/src/cuda");
}
