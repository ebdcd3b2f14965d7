#include "emu.h"
#include "rms_norm.cu"
extern "C" void emu_rms_norm_f32(dim3 emu_g, dim3 emu_b, const float* x, const float* w, float* out, RmsNormParams p) { emu_launch(rms_norm_f32, emu_g, emu_b, x, w, out, p); }
