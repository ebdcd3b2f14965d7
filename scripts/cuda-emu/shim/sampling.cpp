#include "emu.h"
#include "emu_prelude.cuh"
#include "sampling.cu"
extern "C" void emu_argmax_f32(dim3 emu_g, dim3 emu_b, const float* x, unsigned int* i, float* v, RowReduceParams p) { emu_launch(argmax_f32, emu_g, emu_b, x, i, v, p); }
extern "C" void emu_log_softmax_f32(dim3 emu_g, dim3 emu_b, const float* x, float* o, RowReduceParams p) { emu_launch(log_softmax_f32, emu_g, emu_b, x, o, p); }
