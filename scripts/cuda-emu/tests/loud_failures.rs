//! The emulator refuses, naming the construct, what it cannot run correctly, instead of
//! computing something else: an 8-byte shuffle does not compile, a 2-D thread block aborts at
//! launch. (What the source scan refuses is tested in src/scan.rs.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shim() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("shim")
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_owned())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_eight_byte_shuffle_does_not_compile() {
    let dir = tempfile_dir("shuffle");
    let src = dir.join("shuffle.cpp");
    std::fs::write(
        &src,
        "#include \"emu.h\"\n\
         __global__ void k(double* x) { x[0] = __shfl_xor_sync(0xffffffffu, x[0], 1); }\n\
         __global__ void ok(float* x) { x[0] = __shfl_xor_sync(0xffffffffu, x[0], 1); }\n",
    )
    .expect("write the test source");
    let out = Command::new(cxx())
        .args(["-std=c++20", "-fsyntax-only", "-I"])
        .arg(shim())
        .arg(&src)
        .output()
        .expect("run the C++ compiler");
    let log = text(&out);
    assert!(!out.status.success(), "an 8-byte shuffle compiled:\n{log}");
    assert!(log.contains("an 8-byte shuffle"), "{log}");
    assert_eq!(
        log.matches("static assertion failed").count(),
        1,
        "only the double shuffle is refused:\n{log}"
    );
}

#[test]
fn a_two_dimensional_block_aborts_naming_it() {
    let dir = tempfile_dir("blocks");
    let src = dir.join("blocks.cpp");
    let bin = dir.join("blocks");
    std::fs::write(
        &src,
        "#include \"emu.h\"\n\
         __global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n\
         int main(int argc, char**) {\n\
             float x[4] = {0, 0, 0, 0};\n\
             dim3 block = argc > 1 ? dim3{2, 2, 1} : dim3{4, 1, 1};\n\
             emu_launch(k, dim3{1, 1, 1}, block, (float*)x);\n\
             std::printf(\"sum %g\\n\", x[0] + x[1] + x[2] + x[3]);\n\
         }\n",
    )
    .expect("write the test source");
    let out = Command::new(cxx())
        .args(["-std=c++20", "-pthread", "-O1", "-I"])
        .arg(shim())
        .arg(&src)
        .arg(shim().join("emu.cpp"))
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("run the C++ compiler");
    assert!(out.status.success(), "{}", text(&out));

    let one_d = Command::new(&bin).output().expect("run the 1-D launch");
    assert!(one_d.status.success(), "{}", text(&one_d));
    assert_eq!(text(&one_d).trim(), "sum 4");

    let two_d = Command::new(&bin)
        .arg("2d")
        .output()
        .expect("run the 2-D launch");
    let log = text(&two_d);
    assert!(!two_d.status.success(), "a 2-D block ran:\n{log}");
    assert!(
        log.contains("a 2x2x1 thread block is not emulated"),
        "{log}"
    );
}

/// A fresh directory under the target directory (no dependency for temp dirs).
fn tempfile_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}
