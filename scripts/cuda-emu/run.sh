#!/usr/bin/env bash
# Runs every CUDA kernel's real .cu source on the CPU (scripts/cuda-emu: g++ with CUDA
# built-ins emulated by threads, barriers and per-warp exchange buffers) against the CPU
# reference, with the real launch plans. Checks kernel *logic* (indexing, masking, reductions,
# split merges) on machines without a GPU; says nothing about performance or the driver/cuBLAS
# path, which the GPU parity tests (kernels/tests/cuda_parity.rs) cover.
#
# It refuses, naming the construct, what it cannot emulate rather than computing something
# else: the build stops on inline PTX, static __shared__ arrays, 2-D/3-D blocks (threadIdx.y),
# shuffles other than __shfl_xor_sync, warp votes and atomics (src/scan.rs), and on a .cu file
# without a shim; an 8-byte shuffle does not compile and a 2-D block aborts at launch
# (shim/emu.h). `cargo test` below checks those refusals first.
#
# Usage: scripts/cuda-emu/run.sh [small|attn|split]   (default: all). Needs g++ >= 12.
# scripts/test.sh runs it (about 2 minutes on CI's two cores, its own build included).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../../target/cuda-emu}"

cxx="${CXX:-g++}"
if ! command -v "$cxx" >/dev/null; then
  echo "cuda-emu: needs a C++20 compiler with <barrier> (g++ >= 12); '$cxx' is not installed" >&2
  exit 1
fi
if [[ "$cxx" == *g++* ]]; then
  major="$("$cxx" -dumpversion | cut -d. -f1)"
  if (( major < 12 )); then
    echo "cuda-emu: needs g++ >= 12 for C++20 <barrier>; '$cxx' is version $("$cxx" -dumpversion)" >&2
    exit 1
  fi
fi

cargo test --release --locked -q
cargo build --release --locked -q
"$CARGO_TARGET_DIR/release/cuda-emu" "$@"
