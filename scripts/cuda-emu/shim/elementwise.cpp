#include "emu.h"
#include "emu_prelude.cuh"
#include "elementwise.cu"
extern "C" void emu_silu_mul_f32(dim3 emu_g, dim3 emu_b, const float* g, const float* u, float* o, PointwiseParams p) { emu_launch(silu_mul_f32, emu_g, emu_b, g, u, o, p); }
extern "C" void emu_add_f32(dim3 emu_g, dim3 emu_b, float* x, const float* y, PointwiseParams p) { emu_launch(add_f32, emu_g, emu_b, x, y, p); }
extern "C" void emu_add_bias_f32(dim3 emu_g, dim3 emu_b, float* x, const float* b, PointwiseParams p) { emu_launch(add_bias_f32, emu_g, emu_b, x, b, p); }
extern "C" void emu_convert_f32_to_bf16(dim3 emu_g, dim3 emu_b, const float* x, unsigned short* o, PointwiseParams p) { emu_launch(convert_f32_to_bf16, emu_g, emu_b, x, o, p); }
extern "C" void emu_convert_f32_to_f16(dim3 emu_g, dim3 emu_b, const float* x, unsigned short* o, PointwiseParams p) { emu_launch(convert_f32_to_f16, emu_g, emu_b, x, o, p); }
extern "C" void emu_copy_rows_f32(dim3 emu_g, dim3 emu_b, const float* s, const unsigned int* i, float* o, CopyRowsParams p) { emu_launch(copy_rows_f32, emu_g, emu_b, s, i, o, p); }
extern "C" void emu_copy_rows_bf16(dim3 emu_g, dim3 emu_b, const unsigned short* s, const unsigned int* i, float* o, CopyRowsParams p) { emu_launch(copy_rows_bf16, emu_g, emu_b, s, i, o, p); }
extern "C" void emu_copy_rows_f16(dim3 emu_g, dim3 emu_b, const unsigned short* s, const unsigned int* i, float* o, CopyRowsParams p) { emu_launch(copy_rows_f16, emu_g, emu_b, s, i, o, p); }
