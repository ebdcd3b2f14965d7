// CPU emulation of the CUDA subset the kernels use. One OS thread per CUDA thread; blocks run
// one after another; __syncthreads is a block barrier, shuffles go through a per-warp buffer.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <functional>
#include <memory>
#include <algorithm>
#include <cstdio>
#include <cstdlib>

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct EmuCtx {
    dim3 bi, ti, bd, gd;
};
extern thread_local EmuCtx emu_ctx;
#define blockIdx (emu_ctx.bi)
#define threadIdx (emu_ctx.ti)
#define blockDim (emu_ctx.bd)
#define gridDim (emu_ctx.gd)

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint32_t> shfl; // 32 per warp
};
extern EmuBlock* emu_block;
extern thread_local bool emu_exited_warp;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) == 4,
                  "cuda-emu: __shfl_xor_sync is emulated for 4-byte values only; an 8-byte "
                  "shuffle (double, long long) would lose its upper half");
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t bits; std::memcpy(&bits, &v, 4);
    auto& b = *emu_block->warps[warp];
    b.arrive_and_wait();
    emu_block->shfl[warp * 32 + lane] = bits;
    b.arrive_and_wait();
    uint32_t o = emu_block->shfl[warp * 32 + (lane ^ offset)];
    b.arrive_and_wait();
    T r; std::memcpy(&r, &o, 4); return r;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
using std::min; using std::max;
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__
// No `asm`: inline PTX cannot run on the CPU. build.rs refuses sources that use it (src/scan.rs).

// Dynamic shared memory: one buffer per name the kernels use (blocks run one at a time).
extern float tile[], x_stage[], v_stage[], smem[], scratch[], warp_sums[];

template <class... A>
void emu_launch(void (*k)(A...), dim3 grid, dim3 block, A... args) {
    // Threads are numbered along x only (threadIdx.y and .z would read 0): refuse, loudly.
    if (block.y != 1 || block.z != 1) {
        std::fprintf(stderr,
                     "cuda-emu: a %ux%ux%u thread block is not emulated: only 1-D blocks are "
                     "(2-D and 3-D blocks need threadIdx.y/z and warps across rows)\n",
                     block.x, block.y, block.z);
        std::abort();
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        EmuBlock b;
        unsigned n = block.x * block.y * block.z;
        b.block = std::make_unique<std::barrier<>>(n);
        unsigned warps = (n + 31) / 32;
        for (unsigned w = 0; w < warps; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        b.shfl.assign(warps * 32, 0);
        emu_block = &b;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t) {
            ts.emplace_back([&, t] {
                emu_ctx.bi = {bx, by, bz};
                emu_ctx.ti = {t, 0, 0};
                emu_ctx.bd = block;
                emu_ctx.gd = grid;
                k(args...);
                b.warps[t / 32]->arrive_and_drop();
                b.block->arrive_and_drop();
            });
        }
        for (auto& t : ts) t.join();
    }
}
