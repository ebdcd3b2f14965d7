// RMSNorm, f32: out[r, i] = x[r, i] * rsqrt(mean_i(x[r, i]^2) + eps) * weight[i].
// Reference: kernels/src/cpu/norm.rs. Launch plan: kernels/src/cuda/plan.rs (rms_norm_plan):
// one block per row, blockDim.x a multiple of 32, dynamic shared memory of one float per warp.

// Mirrors `RmsNormParams` in plan.rs field for field (16 bytes, asserted there).
struct RmsNormParams {
    unsigned int rows;
    unsigned int dim;
    float eps;
    unsigned int pad;
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

extern "C" __global__ void rms_norm_f32(
    const float* __restrict__ x,
    const float* __restrict__ weight,
    float* __restrict__ out,
    const RmsNormParams p)
{
    extern __shared__ float warp_sums[];
    const unsigned int row = blockIdx.x;
    if (row >= p.rows) {
        return;
    }
    const float* xr = x + (size_t)row * p.dim;
    float* outr = out + (size_t)row * p.dim;

    float acc = 0.0f;
    for (unsigned int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float v = xr[i];
        acc = fmaf(v, v, acc);
    }
    acc = warp_sum(acc);

    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int warp = threadIdx.x / 32u;
    if (lane == 0) {
        warp_sums[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        float total = lane < blockDim.x / 32u ? warp_sums[lane] : 0.0f;
        total = warp_sum(total);
        if (lane == 0) {
            warp_sums[0] = total;
        }
    }
    __syncthreads();

    // 1 / sqrtf rather than rsqrtf: the correctly rounded form the CPU reference uses.
    const float inv = 1.0f / sqrtf(warp_sums[0] / (float)p.dim + p.eps);
    for (unsigned int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        outr[i] = xr[i] * inv * weight[i];
    }
}
