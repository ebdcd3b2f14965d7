// Pointwise kernels and row copies. References: kernels/src/cpu/elementwise.rs (silu_mul,
// add_inplace, embedding). Plans: kernels/src/cuda/plan/pointwise.rs (pointwise_plan: a
// grid-stride loop; copy_rows_plan: grid (rows, column tiles)).

// Mirrors `PointwiseParams` in plan/pointwise.rs (16 bytes, asserted there).
struct PointwiseParams {
    unsigned long long len;
    unsigned int cols;
    unsigned int pad;
};

// Mirrors `CopyRowsParams` in plan/pointwise.rs (8 bytes).
struct CopyRowsParams {
    unsigned int rows;
    unsigned int cols;
};

#define GRID_STRIDE(i, n)                                                                      \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;   \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

// out = gate * sigmoid(gate) * up, written as the CPU reference writes it.
extern "C" __global__ void silu_mul_f32(
    const float* __restrict__ gate,
    const float* __restrict__ up,
    float* __restrict__ out,
    const PointwiseParams p)
{
    GRID_STRIDE(i, p.len) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void add_f32(
    float* __restrict__ x,
    const float* __restrict__ y,
    const PointwiseParams p)
{
    GRID_STRIDE(i, p.len) {
        x[i] += y[i];
    }
}

// x[r, c] += bias[c] over rows of p.cols.
extern "C" __global__ void add_bias_f32(
    float* __restrict__ x,
    const float* __restrict__ bias,
    const PointwiseParams p)
{
    GRID_STRIDE(i, p.len) {
        x[i] += bias[i % p.cols];
    }
}

// Activations to the 16-bit type of the weights, before a bf16/f16 GEMM.
extern "C" __global__ void convert_f32_to_bf16(
    const float* __restrict__ x,
    unsigned short* __restrict__ out,
    const PointwiseParams p)
{
    GRID_STRIDE(i, p.len) {
        out[i] = to_bf16_bits(x[i]);
    }
}

extern "C" __global__ void convert_f32_to_f16(
    const float* __restrict__ x,
    unsigned short* __restrict__ out,
    const PointwiseParams p)
{
    GRID_STRIDE(i, p.len) {
        out[i] = to_f16_bits(x[i]);
    }
}

// out[r, c] = float(src[idx[r], c]): the embedding lookup (idx = token ids, src = the table in
// its storage type) and row selection (idx = rows, src = activations). Indices are validated
// on the host.
#define COPY_ROWS(name, T, WIDEN)                                                               \
    extern "C" __global__ void name(                                                           \
        const T* __restrict__ src,                                                             \
        const unsigned int* __restrict__ idx,                                                  \
        float* __restrict__ out,                                                               \
        const CopyRowsParams p)                                                                \
    {                                                                                          \
        const unsigned int r = blockIdx.x;                                                     \
        const unsigned int c = blockIdx.y * blockDim.x + threadIdx.x;                          \
        if (r >= p.rows || c >= p.cols) {                                                      \
            return;                                                                            \
        }                                                                                      \
        out[(size_t)r * p.cols + c] = WIDEN(src[(size_t)idx[r] * p.cols + c]);                 \
    }

COPY_ROWS(copy_rows_f32, float, from_f32)
COPY_ROWS(copy_rows_bf16, unsigned short, from_bf16_bits)
COPY_ROWS(copy_rows_f16, unsigned short, from_f16_bits)
