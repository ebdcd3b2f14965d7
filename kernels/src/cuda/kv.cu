// The paged KV cache in the unified pool. Reference: kernels/src/cpu/kv.rs (write_kv,
// gather_kv_pages, scatter_kv_pages). A page starts at page * page_elems; keys
// [block_size, kv_dim] first, values values_offset = block_size * kv_dim further on.
// Plans: plan/pointwise.rs (write_kv_plan, kv_pages_plan).

// Mirrors `WriteKvParams` in plan/pointwise.rs (32 bytes).
struct WriteKvParams {
    unsigned int entries;
    unsigned int kv_dim;
    unsigned int block_size;
    unsigned int pad;
    unsigned long long page_elems;
    unsigned long long values_offset;
};

// Mirrors `KvPagesParams` in plan/pointwise.rs (24 bytes).
struct KvPagesParams {
    unsigned int pages;
    unsigned int pad;
    unsigned long long page_kv_elems;
    unsigned long long page_elems;
};

// entries: (token, slot) pairs, slot = page * block_size + slot_in_page. The host keeps only
// the last token of each slot, so no two blocks write the same element.
extern "C" __global__ void write_kv_f32(
    const float* __restrict__ k,
    const float* __restrict__ v,
    const unsigned long long* __restrict__ entries,
    float* __restrict__ pool,
    const WriteKvParams p)
{
    const unsigned int e = blockIdx.x;
    const unsigned int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= p.entries || i >= p.kv_dim) {
        return;
    }
    const unsigned long long token = entries[2 * (size_t)e];
    const unsigned long long slot = entries[2 * (size_t)e + 1];
    const size_t dst = (size_t)(slot / p.block_size) * p.page_elems
        + (size_t)(slot % p.block_size) * p.kv_dim + i;
    const size_t src = (size_t)token * p.kv_dim + i;
    pool[dst] = k[src];
    pool[dst + p.values_offset] = v[src];
}

extern "C" __global__ void gather_kv_pages_f32(
    const float* __restrict__ pool,
    const unsigned int* __restrict__ pages,
    float* __restrict__ out,
    const KvPagesParams p)
{
    const unsigned int b = blockIdx.x;
    if (b >= p.pages) {
        return;
    }
    const float* src = pool + (size_t)pages[b] * p.page_elems;
    float* dst = out + (size_t)b * p.page_kv_elems;
    for (unsigned long long e = (unsigned long long)blockIdx.y * blockDim.x + threadIdx.x;
         e < p.page_kv_elems; e += (unsigned long long)gridDim.y * blockDim.x) {
        dst[e] = src[e];
    }
}

// entries: (chunk, page) pairs: chunk `chunk` of `data` goes into page `page`. The host keeps
// only the last chunk of each page (as the CPU reference's later-wins order), so no two blocks
// write the same page.
extern "C" __global__ void scatter_kv_pages_f32(
    const float* __restrict__ data,
    const unsigned int* __restrict__ entries,
    float* __restrict__ pool,
    const KvPagesParams p)
{
    const unsigned int b = blockIdx.x;
    if (b >= p.pages) {
        return;
    }
    const float* src = data + (size_t)entries[2 * b] * p.page_kv_elems;
    float* dst = pool + (size_t)entries[2 * b + 1] * p.page_elems;
    for (unsigned long long e = (unsigned long long)blockIdx.y * blockDim.x + threadIdx.x;
         e < p.page_kv_elems; e += (unsigned long long)gridDim.y * blockDim.x) {
        dst[e] = src[e];
    }
}
