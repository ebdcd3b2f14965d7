#include "emu.h"
thread_local EmuCtx emu_ctx;
EmuBlock* emu_block;
float tile[1 << 16], x_stage[1 << 16], v_stage[1 << 16], smem[1 << 16], scratch[1 << 16], warp_sums[1 << 16];
