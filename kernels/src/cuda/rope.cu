// Rotary embedding, in place, f32. Reference: kernels/src/cpu/rope.rs (`rope`, with the same
// `[max_positions, half_dim]` cos/sin tables as `RopeTable`). Plan: plan/pointwise.rs
// (rope_plan): grid (tokens, pair tiles), one thread per rotated pair (x[i], x[i + half]).

// Mirrors `RopeParams` in plan/pointwise.rs (16 bytes).
struct RopeParams {
    unsigned int tokens;
    unsigned int num_heads;
    unsigned int head_dim;
    unsigned int half_dim;
};

extern "C" __global__ void rope_f32(
    float* __restrict__ x,
    const unsigned int* __restrict__ positions,
    const float* __restrict__ cos_table,
    const float* __restrict__ sin_table,
    const RopeParams p)
{
    const unsigned int t = blockIdx.x;
    const unsigned int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= p.tokens || i >= p.num_heads * p.half_dim) {
        return;
    }
    const unsigned int head = i / p.half_dim;
    const unsigned int j = i % p.half_dim;
    const size_t at = ((size_t)t * p.num_heads + head) * p.head_dim + j;
    const size_t angle = (size_t)positions[t] * p.half_dim + j;
    const float c = cos_table[angle];
    const float s = sin_table[angle];
    const float x1 = x[at];
    const float x2 = x[at + p.half_dim];
    x[at] = x1 * c - x2 * s;
    x[at + p.half_dim] = x2 * c + x1 * s;
}
