#!/usr/bin/env bash
# Runs every CUDA kernel's real .cu source on the CPU (scripts/cuda-emu: g++ with CUDA
# built-ins emulated by threads, barriers and per-warp exchange buffers) against the CPU
# reference, with the real launch plans. Checks kernel *logic* (indexing, masking, reductions,
# split merges) on machines without a GPU; says nothing about performance or the driver/cuBLAS
# path, which the GPU parity tests (kernels/tests/cuda_parity.rs) cover.
# Usage: scripts/cuda-emu/run.sh [small|attn|split]   (default: all). Needs g++ >= 12.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../../target/cuda-emu}"
cargo build --release -q
"$CARGO_TARGET_DIR/release/cuda-emu" "$@"
