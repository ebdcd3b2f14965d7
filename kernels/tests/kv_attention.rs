//! The paged KV cache kernels (`write_kv`, `gather_kv_pages`, `scatter_kv_pages`) and
//! `paged_attention`, checked against naive f64 implementations on asymmetric data: head_dim ≠
//! block_size, grouped-query heads, pages in scrambled order, the rest of the pool poisoned
//! with NaN so that any misplaced read shows up.
//!
//! Tolerance for attention outputs: |got − want| <= 1e-5 + 1e-5·|want| (values in [-1, 1]).

mod common;

use common::{Rng, assert_close};
use loraplane_kernels::KernelError;
use loraplane_kernels::cpu::{
    AttnSeq, KvLayout, gather_kv_pages, paged_attention, scatter_kv_pages, write_kv,
};

const TOL: f64 = 1e-5;

/// block_size 5, 2 KV heads of dim 12, and 7 padding elements per page beyond the KV block.
fn layout() -> KvLayout {
    let (block_size, num_kv_heads, head_dim) = (5, 2, 12);
    KvLayout {
        page_elems: 2 * block_size * num_kv_heads * head_dim + 7,
        block_size,
        num_kv_heads,
        head_dim,
    }
}

/// One sequence's logical cache (`[context, kv_dim]` keys and values) and its pages.
struct SeqCache {
    k: Vec<f32>,
    v: Vec<f32>,
    pages: Vec<u32>,
}

/// Builds `contexts.len()` sequences with random K/V, placed by the naive formula into pages
/// handed out in a shuffled order from a pool with `spare` unused pages; everything else is NaN.
fn build_cache(
    rng: &mut Rng,
    l: &KvLayout,
    contexts: &[usize],
    spare: usize,
) -> (Vec<f32>, Vec<SeqCache>) {
    let kv_dim = l.num_kv_heads * l.head_dim;
    let needed: usize = contexts.iter().map(|c| c.div_ceil(l.block_size)).sum();
    let num_pages = needed + spare;
    let mut free = rng.permutation(num_pages).into_iter();
    let mut pool = vec![f32::NAN; num_pages * l.page_elems];
    let mut seqs = Vec::new();
    for &context in contexts {
        let pages: Vec<u32> = (0..context.div_ceil(l.block_size))
            .map(|_| free.next().expect("enough pages") as u32)
            .collect();
        let seq = SeqCache {
            k: rng.vec(context * kv_dim),
            v: rng.vec(context * kv_dim),
            pages,
        };
        place(l, &mut pool, &seq, 0..context);
        seqs.push(seq);
    }
    (pool, seqs)
}

/// The layout written out longhand: key of position `p` at page start + slot·kv_dim, its value
/// `block_size·kv_dim` further on.
fn place(l: &KvLayout, pool: &mut [f32], seq: &SeqCache, positions: std::ops::Range<usize>) {
    let kv_dim = l.num_kv_heads * l.head_dim;
    for p in positions {
        let page = seq.pages[p / l.block_size] as usize;
        let slot = p % l.block_size;
        for e in 0..kv_dim {
            pool[page * l.page_elems + slot * kv_dim + e] = seq.k[p * kv_dim + e];
            pool[page * l.page_elems + l.block_size * kv_dim + slot * kv_dim + e] =
                seq.v[p * kv_dim + e];
        }
    }
}

/// Where a sequence's query rows sit in the batch.
#[derive(Clone, Copy)]
struct Rows {
    q_start: usize,
    q_len: usize,
    pos_start: usize,
}

/// Textbook attention in f64 for one sequence: `[q_len, num_heads, head_dim]`.
fn naive_attention(
    l: &KvLayout,
    q: &[f32],
    num_heads: usize,
    seq: &SeqCache,
    r: Rows,
    scale: f32,
    window: Option<usize>,
) -> Vec<f64> {
    let (hd, kv_dim) = (l.head_dim, l.num_kv_heads * l.head_dim);
    let group = num_heads / l.num_kv_heads;
    let mut out = vec![0.0; r.q_len * num_heads * hd];
    for i in 0..r.q_len {
        let p = r.pos_start + i;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..num_heads {
            let kvh = h / group;
            let qv = &q[((r.q_start + i) * num_heads + h) * hd..][..hd];
            let scores: Vec<f64> = (lo..=p)
                .map(|t| {
                    let kv = &seq.k[t * kv_dim + kvh * hd..][..hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let acc: f64 = (lo..=p)
                    .zip(&w)
                    .map(|(t, w)| w * f64::from(seq.v[t * kv_dim + kvh * hd + d]))
                    .sum();
                out[(i * num_heads + h) * hd + d] = acc / z;
            }
        }
    }
    out
}

/// Runs `paged_attention` on a batch of `rows` rows and checks every sequence against the naive
/// version, and that rows of no sequence keep their sentinel value.
fn check_batch(seed: u64, num_heads: usize, rows: usize, specs: &[Rows], window: Option<usize>) {
    let l = layout();
    let mut rng = Rng::new(seed);
    let contexts: Vec<usize> = specs.iter().map(|r| r.pos_start + r.q_len).collect();
    let (pool, mut caches) = build_cache(&mut rng, &l, &contexts, 3);
    if let Some(w) = window {
        // Blocks before every row's window are never read: they may hold any page id.
        for (cache, r) in caches.iter_mut().zip(specs) {
            let first = (r.pos_start + 1).saturating_sub(w) / l.block_size;
            cache.pages[..first].fill(u32::MAX);
        }
    }
    let width = num_heads * l.head_dim;
    let q = rng.vec(rows * width);
    let seqs: Vec<AttnSeq<'_>> = specs
        .iter()
        .zip(&caches)
        .map(|(r, c)| AttnSeq {
            q_start: r.q_start,
            q_len: r.q_len,
            pos_start: r.pos_start,
            block_table: &c.pages,
        })
        .collect();
    let scale = 1.0 / (l.head_dim as f32).sqrt();
    let mut out = vec![7.5f32; rows * width];
    paged_attention(&l, &q, num_heads, &pool, &seqs, scale, window, &mut out).expect("valid batch");

    let mut covered = vec![false; rows];
    for (r, c) in specs.iter().zip(&caches) {
        let want = naive_attention(&l, &q, num_heads, c, *r, scale, window);
        let got = &out[r.q_start * width..(r.q_start + r.q_len) * width];
        assert_close(got, &want, TOL, TOL, &format!("seq at row {}", r.q_start));
        covered[r.q_start..r.q_start + r.q_len].fill(true);
    }
    for (row, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        assert!(
            out[row * width..(row + 1) * width]
                .iter()
                .all(|&x| x == 7.5),
            "row {row} touched"
        );
    }
}

/// A mixed Sarathi-style batch: a prefill chunk resuming at position 13 (cached prefix + chunk),
/// decode rows at positions 30 and 0, a prefill from scratch, and uncovered padding rows.
fn mixed_batch() -> Vec<Rows> {
    vec![
        Rows {
            q_start: 1,
            q_len: 9,
            pos_start: 13,
        },
        Rows {
            q_start: 10,
            q_len: 1,
            pos_start: 30,
        },
        Rows {
            q_start: 12,
            q_len: 1,
            pos_start: 0,
        },
        Rows {
            q_start: 13,
            q_len: 7,
            pos_start: 0,
        },
    ]
}

#[test]
fn attention_mixed_prefill_chunk_and_decode_rows_match_naive() {
    check_batch(1, 6, 21, &mixed_batch(), None);
}

#[test]
fn attention_multi_query_and_equal_heads_match_naive() {
    // num_heads == num_kv_heads (plain MHA) and a large group (each KV head serves 4 queries).
    check_batch(2, 2, 21, &mixed_batch(), None);
    check_batch(3, 8, 21, &mixed_batch(), None);
}

#[test]
fn attention_sliding_window_matches_naive_and_ignores_out_of_window_blocks() {
    for window in [1, 4, 7, 12, 100] {
        check_batch(4 + window as u64, 6, 21, &mixed_batch(), Some(window));
    }
}

#[test]
fn attention_large_batch_takes_the_parallel_path_and_matches_naive() {
    let specs = vec![
        Rows {
            q_start: 0,
            q_len: 64,
            pos_start: 150,
        },
        Rows {
            q_start: 64,
            q_len: 1,
            pos_start: 211,
        },
        Rows {
            q_start: 66,
            q_len: 40,
            pos_start: 0,
        },
    ];
    check_batch(5, 6, 110, &specs, None);
    check_batch(6, 6, 110, &specs, Some(33));
}

#[test]
fn attention_long_context_splits_a_chunk_into_shorter_tiles() {
    // 180k visible positions: the kernel's per-item score budget forces one row per tile.
    let specs = vec![Rows {
        q_start: 0,
        q_len: 3,
        pos_start: 180_000,
    }];
    check_batch(10, 6, 3, &specs, None);
}

#[test]
fn chunked_prefill_after_write_kv_sees_prefix_and_own_chunk() {
    // The engine's flow: prefix cached by earlier steps, the chunk's K/V written with write_kv
    // through slots, then attention over prefix + chunk.
    let l = layout();
    let mut rng = Rng::new(7);
    let (prefix, chunk, num_heads) = (13, 6, 6);
    let (mut pool, caches) = build_cache(&mut rng, &l, &[prefix + chunk], 2);
    let cache = &caches[0];
    let kv_dim = l.num_kv_heads * l.head_dim;
    // Forget the chunk's K/V in the pool, then write them through the kernel.
    for p in prefix..prefix + chunk {
        let page = cache.pages[p / l.block_size] as usize;
        let at = page * l.page_elems + (p % l.block_size) * kv_dim;
        pool[at..at + kv_dim].fill(f32::NAN);
        pool[at + l.block_size * kv_dim..][..kv_dim].fill(f32::NAN);
    }
    let slots: Vec<usize> = (prefix..prefix + chunk)
        .map(|p| cache.pages[p / l.block_size] as usize * l.block_size + p % l.block_size)
        .collect();
    let k = &cache.k[prefix * kv_dim..(prefix + chunk) * kv_dim];
    let v = &cache.v[prefix * kv_dim..(prefix + chunk) * kv_dim];
    write_kv(&l, k, v, &slots, &mut pool).unwrap();

    let q = rng.vec(chunk * num_heads * l.head_dim);
    let r = Rows {
        q_start: 0,
        q_len: chunk,
        pos_start: prefix,
    };
    let seqs = [AttnSeq {
        q_start: 0,
        q_len: chunk,
        pos_start: prefix,
        block_table: &cache.pages,
    }];
    let mut out = vec![0.0; q.len()];
    paged_attention(&l, &q, num_heads, &pool, &seqs, 0.3, None, &mut out).unwrap();
    assert_close(
        &out,
        &naive_attention(&l, &q, num_heads, cache, r, 0.3, None),
        TOL,
        TOL,
        "chunk",
    );
}

#[test]
fn write_kv_places_rows_exactly_like_the_naive_layout() {
    let l = layout();
    let mut rng = Rng::new(8);
    let (expected, caches) = build_cache(&mut rng, &l, &[11, 4], 2);
    let mut pool = expected.clone();
    let kv_dim = l.num_kv_heads * l.head_dim;
    for c in &caches {
        for p in 0..c.k.len() / kv_dim {
            let page = c.pages[p / l.block_size] as usize;
            let at = page * l.page_elems + (p % l.block_size) * kv_dim;
            pool[at..at + kv_dim].fill(0.0);
            pool[at + l.block_size * kv_dim..][..kv_dim].fill(0.0);
        }
    }
    for c in &caches {
        let slots: Vec<usize> = (0..c.k.len() / kv_dim)
            .map(|p| c.pages[p / l.block_size] as usize * l.block_size + p % l.block_size)
            .collect();
        write_kv(&l, &c.k, &c.v, &slots, &mut pool).unwrap();
    }
    // NaN != NaN, so compare bit patterns (the unused parts stay NaN in both).
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&pool), bits(&expected));
}

#[test]
fn gather_then_scatter_moves_kv_blocks_between_pools() {
    let l = layout();
    let mut rng = Rng::new(9);
    let (src, caches) = build_cache(&mut rng, &l, &[14], 4);
    let pages = &caches[0].pages; // 3 pages, scrambled
    let mut wire = vec![42.0; 5]; // gather clears whatever was there
    gather_kv_pages(&l, &src, pages, &mut wire).unwrap();
    assert_eq!(wire.len(), pages.len() * l.page_kv_elems());

    // A decode node with its own page ids and a pool full of 1.0.
    let mut dst = vec![1.0f32; 6 * l.page_elems];
    let dst_pages = [4u32, 0, 5];
    scatter_kv_pages(&l, &wire, &dst_pages, &mut dst).unwrap();
    let kv = l.page_kv_elems();
    for (i, (&s, &d)) in pages.iter().zip(&dst_pages).enumerate() {
        let (s, d) = (s as usize * l.page_elems, d as usize * l.page_elems);
        let (got, want) = (&dst[d..d + kv], &src[s..s + kv]);
        // The tail of the last block was never written (NaN in src): compare bits.
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "page {i}"
        );
        assert!(
            dst[d + kv..d + l.page_elems].iter().all(|&x| x == 1.0),
            "padding of page {i}"
        );
    }
    for untouched in [1usize, 2, 3] {
        assert!(
            dst[untouched * l.page_elems..][..l.page_elems]
                .iter()
                .all(|&x| x == 1.0)
        );
    }
}

#[test]
fn kv_errors_are_reported_and_nothing_is_written() {
    let l = layout();
    let kv_dim = 24;
    let mut pool = vec![0.0f32; 3 * l.page_elems];
    let row = vec![1.0f32; kv_dim];
    let kind = |r: Result<(), KernelError>| r.map_err(|e| e.kind());

    assert_eq!(
        kind(write_kv(&l, &row, &row, &[15], &mut pool)),
        Err("slot_out_of_range")
    );
    assert_eq!(
        kind(write_kv(&l, &row[1..], &row, &[0], &mut pool)),
        Err("shape_mismatch")
    );
    assert_eq!(
        kind(write_kv(&l, &row, &row, &[0, 1], &mut pool)),
        Err("shape_mismatch")
    );
    assert_eq!(
        kind(write_kv(&l, &row, &row, &[0], &mut pool[1..])),
        Err("ragged_rows")
    );
    let tiny = KvLayout {
        page_elems: 10,
        ..l
    };
    assert_eq!(
        kind(write_kv(&tiny, &row, &row, &[0], &mut pool[..30])),
        Err("invalid_argument")
    );
    assert!(pool.iter().all(|&x| x == 0.0));

    let mut out = vec![3.0];
    assert_eq!(
        kind(gather_kv_pages(&l, &pool, &[0, 3], &mut out)),
        Err("page_out_of_range")
    );
    assert_eq!(out, vec![3.0]);
    let data = vec![1.0; l.page_kv_elems()];
    assert_eq!(
        kind(scatter_kv_pages(&l, &data, &[7], &mut pool)),
        Err("page_out_of_range")
    );
    assert_eq!(
        kind(scatter_kv_pages(&l, &data, &[0, 1], &mut pool)),
        Err("shape_mismatch")
    );
    assert!(pool.iter().all(|&x| x == 0.0));
    assert_eq!(
        write_kv(&l, &row, &row, &[15], &mut pool),
        Err(KernelError::SlotOutOfRange {
            kernel: "write_kv",
            slot: 15,
            num_slots: 15
        })
    );
}

#[test]
fn attention_errors_are_reported_and_out_is_untouched() {
    let l = layout();
    let pool = vec![0.0f32; 4 * l.page_elems];
    let (num_heads, width) = (6, 6 * 12);
    let q = vec![0.1f32; 3 * width];
    let table = [2u32, 0];
    let seq = |q_start, q_len, pos_start, block_table| AttnSeq {
        q_start,
        q_len,
        pos_start,
        block_table,
    };
    let run =
        |q: &[f32], heads: usize, seqs: &[AttnSeq<'_>], window: Option<usize>, out_len: usize| {
            let mut out = vec![5.0f32; out_len];
            let r = paged_attention(&l, q, heads, &pool, seqs, 1.0, window, &mut out)
                .map_err(|e| e.kind());
            assert!(out.iter().all(|&x| x == 5.0), "out written on error");
            r
        };
    let ok = [seq(0, 2, 8, &table[..])];
    assert_eq!(run(&q, 5, &ok, None, q.len()), Err("invalid_argument")); // 5 heads over 2 KV heads
    assert_eq!(run(&q, 0, &ok, None, q.len()), Err("invalid_argument"));
    assert_eq!(
        run(&q[1..], num_heads, &ok, None, q.len() - 1),
        Err("ragged_rows")
    );
    assert_eq!(
        run(&q, num_heads, &ok, None, q.len() + 1),
        Err("shape_mismatch")
    );
    assert_eq!(
        run(&q, num_heads, &ok, Some(0), q.len()),
        Err("invalid_argument")
    );
    assert_eq!(
        run(&q, num_heads, &[seq(2, 2, 0, &table[..])], None, q.len()),
        Err("rows_out_of_range")
    );
    assert_eq!(
        run(
            &q,
            num_heads,
            &[seq(usize::MAX, 2, 0, &table[..])],
            None,
            q.len()
        ),
        Err("rows_out_of_range")
    );
    assert_eq!(
        run(
            &q,
            num_heads,
            &[seq(0, 2, 0, &table[..]), seq(1, 1, 0, &table[..])],
            None,
            q.len()
        ),
        Err("rows_overlap")
    );
    // Positions 9 and 10 need block 2; the table has 2 blocks.
    assert_eq!(
        run(&q, num_heads, &[seq(0, 2, 9, &table[..])], None, q.len()),
        Err("block_table_too_short")
    );
    assert_eq!(
        run(&q, num_heads, &[seq(0, 1, 0, &[4u32][..])], None, q.len()),
        Err("page_out_of_range")
    );
    assert_eq!(
        run(
            &q,
            num_heads,
            &[seq(0, 1, usize::MAX, &table[..])],
            None,
            q.len()
        ),
        Err("block_table_too_short")
    );
    // With valid inputs the same call succeeds; an empty sequence is allowed anywhere in range.
    let mut out = vec![5.0f32; q.len()];
    let seqs = [seq(0, 2, 8, &table[..]), seq(3, 0, 0, &[][..])];
    paged_attention(&l, &q, num_heads, &pool, &seqs, 1.0, None, &mut out).unwrap();
    assert!(
        out[..2 * width].iter().all(|&x| x == 0.0),
        "zero values give zero output"
    );
    assert!(
        out[2 * width..].iter().all(|&x| x == 5.0),
        "row 2 is in no sequence"
    );
}
