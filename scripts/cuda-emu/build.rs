//! Compiles the kernels' `.cu` sources as C++ under `shim/emu.h` (CUDA built-ins emulated with
//! threads and barriers). The prelude's two PTX `asm` conversions (f16) are swapped for
//! `_Float16` in a generated copy; everything else is the real source.

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
    println!("cargo:rerun-if-changed=../../kernels/src/cuda");
}
