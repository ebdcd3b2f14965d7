#include "emu.h"
#include "emu_prelude.cuh"
#include "rope.cu"
extern "C" void emu_rope_f32(dim3 emu_g, dim3 emu_b, float* x, const unsigned int* pos, const float* c, const float* s, RopeParams p) { emu_launch(rope_f32, emu_g, emu_b, x, pos, c, s, p); }
