#include "emu.h"
#include "emu_prelude.cuh"
#include "attention.cu"
extern "C" void emu_paged_attention_f32(dim3 emu_g, dim3 emu_b, const float* q, const float* pool, const unsigned int* bt, const AttnSeqParams* s, const AttnWorkItem* w, float* out, float* pa, float* pm, AttnParams p) { emu_launch(paged_attention_f32, emu_g, emu_b, q, pool, bt, s, w, out, pa, pm, p); }
extern "C" void emu_attention_reduce_f32(dim3 emu_g, dim3 emu_b, const float* pa, const float* pm, const AttnReduceItem* it, float* out, AttnParams p) { emu_launch(attention_reduce_f32, emu_g, emu_b, pa, pm, it, out, p); }
