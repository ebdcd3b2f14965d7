// Heterogeneous LoRA, f32: shrink v = x·A and expand y += s·(v·Bᵀ), every row with its own
// adapter and rank (S-LoRA MBGMV/MBGMM, Punica BGMV/SGMV). A and Bᵀ rows are read from the
// unified pool at 64-bit element offsets (an adapter's rows are scattered over pages).
// Reference: kernels/src/cpu/lora.rs. Plans: plan/lora.rs (lora_shrink_plan,
// lora_expand_plan, lora_table).

// Mirrors `LoraShrinkParams` in plan/lora.rs (16 bytes).
struct LoraShrinkParams {
    unsigned int rows;
    unsigned int in_dim;
    unsigned int max_rank;
    unsigned int stage_x;
};

// Mirrors `LoraExpandParams` in plan/lora.rs (16 bytes).
struct LoraExpandParams {
    unsigned int rows;
    unsigned int out_dim;
    unsigned int max_rank;
    unsigned int pad;
};

// Mirrors `LoraSegmentParams` in plan/lora.rs (16 bytes): rows of A are
// a_offsets[first .. first + rank], rows of Bᵀ b_offsets[first .. first + rank].
struct LoraSegmentParams {
    unsigned int rank;
    float scale;
    unsigned int first;
    unsigned int pad;
};

// Grid (rows, ceil(max_rank / warps)); warp w of block (t, y) computes v[t, y * warps + w].
// Rows of no segment are left untouched; v[t, j] = 0 for rank <= j < max_rank.
extern "C" __global__ void lora_shrink_f32(
    const float* __restrict__ x,
    const float* __restrict__ pool,
    const int* __restrict__ row_segment,
    const LoraSegmentParams* __restrict__ segs,
    const unsigned long long* __restrict__ a_offsets,
    float* __restrict__ v,
    const LoraShrinkParams p)
{
    extern __shared__ float x_stage[];
    const unsigned int t = blockIdx.x;
    if (t >= p.rows) {
        return;
    }
    // Uniform over the block, so the early return cannot split a __syncthreads.
    const int seg = row_segment[t];
    if (seg < 0) {
        return;
    }
    const float* xr = x + (size_t)t * p.in_dim;
    if (p.stage_x) {
        for (unsigned int i = threadIdx.x; i < p.in_dim; i += blockDim.x) {
            x_stage[i] = xr[i];
        }
        __syncthreads();
        xr = x_stage;
    }
    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int j = blockIdx.y * (blockDim.x / 32u) + threadIdx.x / 32u;
    if (j >= p.max_rank) {
        return;
    }
    const LoraSegmentParams s = segs[seg];
    float* out = v + (size_t)t * p.max_rank + j;
    if (j >= s.rank) {
        if (lane == 0) {
            *out = 0.0f;
        }
        return;
    }
    const float* a = pool + a_offsets[s.first + j];
    float acc = 0.0f;
    for (unsigned int i = lane; i < p.in_dim; i += 32u) {
        acc = fmaf(xr[i], a[i], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        *out = acc;
    }
}

// Grid (rows, ceil(out_dim / threads)); thread o of a row sums v[t, j]·Bᵀ_j[o] over the
// segment's rank (coalesced along o), then adds scale times that sum, as the reference does.
extern "C" __global__ void lora_expand_f32(
    const float* __restrict__ v,
    const float* __restrict__ pool,
    const int* __restrict__ row_segment,
    const LoraSegmentParams* __restrict__ segs,
    const unsigned long long* __restrict__ b_offsets,
    float* __restrict__ y,
    const LoraExpandParams p)
{
    extern __shared__ float v_stage[];
    const unsigned int t = blockIdx.x;
    if (t >= p.rows) {
        return;
    }
    const int seg = row_segment[t];
    if (seg < 0) {
        return;
    }
    const LoraSegmentParams s = segs[seg];
    if (s.rank == 0) {
        return;
    }
    for (unsigned int j = threadIdx.x; j < s.rank; j += blockDim.x) {
        v_stage[j] = v[(size_t)t * p.max_rank + j];
    }
    __syncthreads();
    const unsigned int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= p.out_dim) {
        return;
    }
    const unsigned long long* rows = b_offsets + s.first;
    float acc = 0.0f;
    for (unsigned int j = 0; j < s.rank; ++j) {
        acc = fmaf(v_stage[j], pool[rows[j] + o], acc);
    }
    y[(size_t)t * p.out_dim + o] += s.scale * acc;
}
