// Causal paged attention, f32, for prefill chunks and decode rows alike. Reference:
// kernels/src/cpu/attention.rs. Plan: plan/attention.rs (attention_plan), which lists the
// blocks: each takes up to 16 (row, query head) pairs of one sequence and one KV head, one warp
// per pair, and streams the keys they can see through shared memory once for all of them.
//
// Per pair the softmax is online (running max m, normaliser l, accumulator acc). A block
// whose key range was split (flash-decoding, long decodes) writes its partial (m, l, acc) and
// attention_reduce_f32 merges the splits: m = max m_k, l = sum l_k e^{m_k - m},
// out = sum acc_k e^{m_k - m} / l.

// Mirrors `AttnParams` in plan/attention.rs (64 bytes).
struct AttnParams {
    unsigned int num_heads;
    unsigned int group;
    unsigned int head_dim;
    unsigned int kv_dim;
    unsigned int block_size;
    unsigned int window;
    unsigned int tile_keys;
    unsigned int num_reduce;
    unsigned long long page_elems;
    unsigned long long values_offset;
    float scale;
    unsigned int pad[3];
};

// Mirrors `AttnSeqParams` (16 bytes).
struct AttnSeqParams {
    unsigned int q_start;
    unsigned int q_len;
    unsigned int pos_start;
    unsigned int table_start;
};

// Mirrors `AttnWorkItem` (32 bytes).
struct AttnWorkItem {
    unsigned int seq;
    unsigned int kv_head;
    unsigned int pair_start;
    unsigned int pair_count;
    unsigned int key_start;
    unsigned int key_end;
    int partial;
    unsigned int pad;
};

// Mirrors `AttnReduceItem` (32 bytes).
struct AttnReduceItem {
    unsigned int row;
    unsigned int head;
    unsigned int first_slot;
    unsigned int num_splits;
    unsigned int slot_stride;
    unsigned int pad[3];
};

// ATTN_MAX_HEAD_DIM / 32: query and accumulator values each lane keeps in registers.
#define PER_LANE 8

extern "C" __global__ void paged_attention_f32(
    const float* __restrict__ q,
    const float* __restrict__ pool,
    const unsigned int* __restrict__ block_tables,
    const AttnSeqParams* __restrict__ seqs,
    const AttnWorkItem* __restrict__ work,
    float* __restrict__ out,
    float* __restrict__ partial_acc,
    float* __restrict__ partial_ml,
    const AttnParams p)
{
    extern __shared__ float tile[];
    const unsigned int hd = p.head_dim;
    float* k_tile = tile;
    float* v_tile = tile + (size_t)p.tile_keys * hd;

    const AttnWorkItem w = work[blockIdx.x];
    const AttnSeqParams s = seqs[w.seq];
    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int warp = threadIdx.x / 32u;
    // Idle warps still help load tiles and reach every __syncthreads.
    const bool active = warp < w.pair_count;
    const unsigned int pair = w.pair_start + (active ? warp : 0u);
    const unsigned int row = pair / p.group;
    const unsigned int head = w.kv_head * p.group + pair % p.group;
    const unsigned int pos = s.pos_start + row;
    // Keys visible from pos: [first_visible, pos]. pos + 1 fits (the plan checks key_end).
    const unsigned int first_visible =
        (p.window != 0u && pos + 1u > p.window) ? pos + 1u - p.window : 0u;

    const float* q_row = q + ((size_t)(s.q_start + row) * p.num_heads + head) * hd;
    float q_reg[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const unsigned int d = lane + 32u * i;
        q_reg[i] = (active && d < hd) ? q_row[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF;
    float l = 0.0f;

    const unsigned int* table = block_tables + s.table_start;
    const size_t head_offset = (size_t)w.kv_head * hd;
    for (unsigned int t0 = w.key_start; t0 < w.key_end; t0 += p.tile_keys) {
        const unsigned int n = min(p.tile_keys, w.key_end - t0);
        __syncthreads(); // the previous tile has been consumed
        for (unsigned int idx = threadIdx.x; idx < n * hd; idx += blockDim.x) {
            const unsigned int key = t0 + idx / hd;
            const size_t at = (size_t)table[key / p.block_size] * p.page_elems
                + (size_t)(key % p.block_size) * p.kv_dim + head_offset + idx % hd;
            k_tile[idx] = pool[at];
            v_tile[idx] = pool[at + p.values_offset];
        }
        __syncthreads();
        if (!active) {
            continue;
        }
        const unsigned int first = max(first_visible, t0);
        const unsigned int end = min(pos + 1u, t0 + n);
        for (unsigned int key = first; key < end; ++key) {
            const float* k_row = k_tile + (size_t)(key - t0) * hd;
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                const unsigned int d = lane + 32u * i;
                if (d < hd) {
                    part = fmaf(q_reg[i], k_row[d], part);
                }
            }
            const float score = warp_sum(part) * p.scale;
            const float m_new = fmaxf(m, score);
            const float correction = m == NEG_INF ? 0.0f : expf(m - m_new);
            const float weight = expf(score - m_new);
            l = l * correction + weight;
            const float* v_row = v_tile + (size_t)(key - t0) * hd;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                const unsigned int d = lane + 32u * i;
                if (d < hd) {
                    acc[i] = fmaf(weight, v_row[d], acc[i] * correction);
                }
            }
            m = m_new;
        }
    }
    if (!active) {
        return;
    }
    if (w.partial < 0) {
        // Every pair sees at least its own key, so l > 0.
        const float inv = 1.0f / l;
        float* out_row = out + ((size_t)(s.q_start + row) * p.num_heads + head) * hd;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned int d = lane + 32u * i;
            if (d < hd) {
                out_row[d] = acc[i] * inv;
            }
        }
    } else {
        // A split may hold none of a pair's keys: then m = -inf, l = 0, acc = 0.
        const size_t slot = (size_t)w.partial + warp;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned int d = lane + 32u * i;
            if (d < hd) {
                partial_acc[slot * hd + d] = acc[i];
            }
        }
        if (lane == 0) {
            partial_ml[2 * slot] = m;
            partial_ml[2 * slot + 1] = l;
        }
    }
}

// One warp per split pair: merges its partial states into out.
extern "C" __global__ void attention_reduce_f32(
    const float* __restrict__ partial_acc,
    const float* __restrict__ partial_ml,
    const AttnReduceItem* __restrict__ items,
    float* __restrict__ out,
    const AttnParams p)
{
    const unsigned int lane = threadIdx.x % 32u;
    const unsigned int index = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u;
    if (index >= p.num_reduce) {
        return;
    }
    const AttnReduceItem it = items[index];
    float m = NEG_INF;
    for (unsigned int k = 0; k < it.num_splits; ++k) {
        m = fmaxf(m, partial_ml[2 * ((size_t)it.first_slot + (size_t)k * it.slot_stride)]);
    }
    float l = 0.0f;
    for (unsigned int k = 0; k < it.num_splits; ++k) {
        const size_t slot = (size_t)it.first_slot + (size_t)k * it.slot_stride;
        const float mk = partial_ml[2 * slot];
        if (mk != NEG_INF) {
            l += partial_ml[2 * slot + 1] * expf(mk - m);
        }
    }
    const float inv = 1.0f / l;
    float* out_row = out + ((size_t)it.row * p.num_heads + it.head) * p.head_dim;
    for (unsigned int d = lane; d < p.head_dim; d += 32u) {
        float acc = 0.0f;
        for (unsigned int k = 0; k < it.num_splits; ++k) {
            const size_t slot = (size_t)it.first_slot + (size_t)k * it.slot_stride;
            const float mk = partial_ml[2 * slot];
            if (mk != NEG_INF) {
                acc = fmaf(partial_acc[slot * p.head_dim + d], expf(mk - m), acc);
            }
        }
        out_row[d] = acc * inv;
    }
}
