#include "emu.h"
#include "emu_prelude.cuh"
#include "lora.cu"
extern "C" void emu_lora_shrink_f32(dim3 emu_g, dim3 emu_b, const float* x, const float* pool, const int* rs, const LoraSegmentParams* s, const unsigned long long* a, float* v, LoraShrinkParams p) { emu_launch(lora_shrink_f32, emu_g, emu_b, x, pool, rs, s, a, v, p); }
extern "C" void emu_lora_expand_f32(dim3 emu_g, dim3 emu_b, const float* v, const float* pool, const int* rs, const LoraSegmentParams* s, const unsigned long long* b, float* y, LoraExpandParams p) { emu_launch(lora_expand_f32, emu_g, emu_b, v, pool, rs, s, b, y, p); }
