#include "emu.h"
#include "emu_prelude.cuh"
#include "kv.cu"
extern "C" void emu_write_kv_f32(dim3 emu_g, dim3 emu_b, const float* k, const float* v, const unsigned long long* e, float* pool, WriteKvParams p) { emu_launch(write_kv_f32, emu_g, emu_b, k, v, e, pool, p); }
extern "C" void emu_gather_kv_pages_f32(dim3 emu_g, dim3 emu_b, const float* pool, const unsigned int* pages, float* out, KvPagesParams p) { emu_launch(gather_kv_pages_f32, emu_g, emu_b, pool, pages, out, p); }
extern "C" void emu_scatter_kv_pages_f32(dim3 emu_g, dim3 emu_b, const float* d, const unsigned int* e, float* pool, KvPagesParams p) { emu_launch(scatter_kv_pages_f32, emu_g, emu_b, d, e, pool, p); }
