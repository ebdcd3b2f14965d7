//! Compute kernels for loraplane: one contract, a CPU reference (always built) and CUDA
//! (feature `cuda`).
