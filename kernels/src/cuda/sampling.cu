// Per-row reductions over logits, f32. Reference: kernels/src/cpu/sampling.rs (argmax,
// log_softmax). Plan: plan/pointwise.rs (row_reduce_plan): one block per row, whole warps,
// 8 bytes of shared memory per warp.

// Mirrors `RowReduceParams` in plan/pointwise.rs (8 bytes).
struct RowReduceParams {
    unsigned int rows;
    unsigned int cols;
};

#define NO_INDEX 0xffffffffu

// Whether (v, i) beats the best so far (bv, bi): NaN never wins, a larger value wins, and the
// lower index wins ties — the reference's left-to-right scan with a strict `>`.
__device__ __forceinline__ bool beats(float v, unsigned int i, float bv, unsigned int bi) {
    if (i == NO_INDEX || v != v) {
        return false;
    }
    return bi == NO_INDEX || v > bv || (v == bv && i < bi);
}

// out_index[r] = argmax of row r (NO_INDEX when every value is NaN), out_value[r] its value.
extern "C" __global__ void argmax_f32(
    const float* __restrict__ x,
    unsigned int* __restrict__ out_index,
    float* __restrict__ out_value,
    const RowReduceParams p)
{
    extern __shared__ float smem[];
    const unsigned int warps = blockDim.x / 32u;
    float* warp_value = smem;
    unsigned int* warp_index = (unsigned int*)(smem + warps);
    const unsigned int r = blockIdx.x;
    if (r >= p.rows) {
        return;
    }
    const float* row = x + (size_t)r * p.cols;
    float bv = 0.0f;
    unsigned int bi = NO_INDEX;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) {
        if (beats(row[c], c, bv, bi)) {
            bv = row[c];
            bi = c;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, offset);
        const unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, offset);
        if (beats(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int warp = threadIdx.x / 32u;
    if (lane == 0) {
        warp_value[warp] = bv;
        warp_index[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned int w = 1; w < warps; ++w) {
            if (beats(warp_value[w], warp_index[w], bv, bi)) {
                bv = warp_value[w];
                bi = warp_index[w];
            }
        }
        out_index[r] = bi;
        out_value[r] = bv;
    }
}

// Block-wide reduction through one float per warp; every thread gets the result.
__device__ float block_reduce(float v, float* scratch, bool is_max) {
    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int warp = threadIdx.x / 32u;
    const unsigned int warps = blockDim.x / 32u;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? scratch[lane] : (is_max ? NEG_INF : 0.0f);
        w = is_max ? warp_max(w) : warp_sum(w);
        if (lane == 0) {
            scratch[0] = w;
        }
    }
    __syncthreads();
    return scratch[0];
}

// out[r, c] = x[r, c] - (max + log(sum exp(x - max))). fmaxf ignores NaN like the reference's
// f32::max; a NaN, an all -inf row or a +inf makes the row NaN as there.
extern "C" __global__ void log_softmax_f32(
    const float* __restrict__ x,
    float* __restrict__ out,
    const RowReduceParams p)
{
    extern __shared__ float scratch[];
    const unsigned int r = blockIdx.x;
    if (r >= p.rows) {
        return;
    }
    const float* row = x + (size_t)r * p.cols;
    float m = NEG_INF;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) {
        m = fmaxf(m, row[c]);
    }
    m = block_reduce(m, scratch, true);
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) {
        s += expf(row[c] - m);
    }
    s = block_reduce(s, scratch, false);
    const float lse = m + logf(s);
    float* o = out + (size_t)r * p.cols;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) {
        o[c] = row[c] - lse;
    }
}
