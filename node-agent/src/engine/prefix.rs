//! The engine's side of prefix caching (`memory/prefix.rs` keeps the blocks): which chain a
//! sequence's blocks belong to, publishing its full blocks as they are computed, reusing
//! cached ones at admission, and giving its holds back when it lets go of its KV.
//!
//! A chain's root hashes the partition and the adapter identity:
//! - the partition is the tenant (so no tenant can ever hit, or time, another tenant's
//!   blocks) plus the request's optional `cache_salt`, which partitions further;
//! - the adapter identity is the SHA-256 digest of the weights the KV is computed with (a
//!   reload under the same name with other weights starts a new chain), or the base model; a
//!   request that composes adapters hashes every (digest, scale) in its order, and one adapter
//!   at a scale other than 1 hashes its scale too.
//!
//! Hashing happens once per full block: a sequence's keys are kept and extended as blocks
//! fill, and recomputed only if its adapter's digest changed while it waited.
//!
//! Decode role: before a remote prefill, [`Engine::pin_prefix`] holds the longest run of the
//! prompt's blocks this engine has cached, so the prefill agent sends only the rest; the held
//! blocks pass to the request's sequence when it is submitted and become its KV at admission.

use std::sync::Arc;

use crate::backend::Backend;
use crate::engine::core::Engine;
use crate::engine::request::Request;
use crate::engine::sequence::Sequence;
use crate::lora::ids::{AdapterKey, Digest, TenantId};
use crate::memory::kv::SeqKv;
use crate::memory::prefix::{BlockHash, CachedBlock};
use crate::scheduler::SeqId;

/// Whether and how KV blocks are shared between requests (`--prefix-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefixCaching {
    /// Every prompt is computed in full.
    Off,
    /// Blocks are reused within a tenant (and a `cache_salt`, when a request gives one).
    #[default]
    PerTenant,
}

/// The weights a sequence's KV is computed with: each adapter's digest and the bits of its
/// scale, in the request's order; empty is the base model. `None` (in
/// [`Sequence::prefix_identity`]) while an adapter's digest is not known yet.
pub(crate) type WeightsId = Vec<(Digest, u32)>;

/// Prefix-cache counters since start, in prompt tokens, counted once per request at its first
/// admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens of admitted requests (looked up in the cache).
    pub queried_tokens: u64,
    /// Of those, tokens whose KV came from the cache.
    pub hit_tokens: u64,
    /// Blocks cached (held by a running sequence or idle).
    pub blocks: usize,
}

fn root(tenant: &TenantId, cache_salt: Option<&str>, weights: &WeightsId) -> BlockHash {
    let salt: &[u8] = match cache_salt {
        Some(s) => s.as_bytes(),
        None => &[],
    };
    // The marker keeps "no salt" apart from every salt.
    let salted: &[u8] = if cache_salt.is_some() { b"1" } else { b"0" };
    BlockHash::root(&[tenant.0.as_bytes(), salted, salt, &weights_bytes(weights)])
}

/// The weights a KV is computed with, as keys hash them (the prefix cache's chains, the decode
/// router's affinity): `base` (4 bytes), one adapter at scale 1 as its digest (32 bytes), and
/// anything else as each adapter's digest and scale bits (36 bytes each), so no two can be
/// mistaken for one another.
pub fn weights_bytes(weights: &[(Digest, u32)]) -> Vec<u8> {
    match weights {
        [] => b"base".to_vec(),
        [(d, scale)] if *scale == 1f32.to_bits() => d.0.to_vec(),
        all => all
            .iter()
            .flat_map(|(d, scale)| d.0.iter().copied().chain(scale.to_le_bytes()))
            .collect(),
    }
}

impl<B: Backend> Engine<B> {
    /// The weights KV of the adapters `keys` at `scales` (none: the base model) would be
    /// computed with now; `None` when caching is off or an adapter's digest is not known
    /// (then a sequence neither reuses nor publishes blocks).
    fn weights_of(&self, keys: &[AdapterKey], scales: &[f32]) -> Option<WeightsId> {
        if self.config.prefix_caching == PrefixCaching::Off {
            return None;
        }
        keys.iter()
            .zip(scales)
            .map(|(key, scale)| Some((self.registry.get(key)?.digest()?, scale.to_bits())))
            .collect()
    }

    /// Brings every waiting sequence's keys up to date before a plan: the chain of its
    /// current weights, one key per full block of its tokens.
    pub(super) fn prepare_prefixes(&mut self) {
        if self.config.prefix_caching == PrefixCaching::Off {
            return;
        }
        let bs = self.geometry.block_size;
        for i in 0..self.waiting.len() {
            let id = self.waiting[i];
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            let weights = self.weights_of(&seq.adapter_keys, &seq.scales);
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if seq.prefix_identity != weights {
                seq.prefix_root = weights
                    .as_ref()
                    .map(|w| root(&seq.tenant, seq.cache_salt.as_deref(), w));
                seq.prefix_identity = weights;
                seq.block_keys.clear();
            }
            extend_keys(seq, seq.tokens.len() / bs, bs);
        }
    }

    /// Publishes `id`'s newly completed blocks into the prefix cache (after a step computed
    /// them); a block already cached replaces the sequence's own copy.
    pub(super) fn publish(&mut self, id: SeqId) {
        let bs = self.geometry.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if seq.prefix_root.is_none() {
            return;
        }
        let full = seq.computed / bs;
        extend_keys(seq, full, bs);
        let Some(kv) = seq.kv.as_mut() else { return };
        while kv.shared().len() < full {
            let b = kv.shared().len();
            let (Some(key), Some(pages)) = (seq.block_keys.get(b), kv.take_first_private()) else {
                return;
            };
            kv.push_shared(self.prefix.insert(*key, pages, b));
        }
    }

    /// A new KV cache for an admitted sequence that starts with its first `cached` blocks
    /// from the prefix cache. `None` when one of them is gone (the plan disagreed).
    pub(super) fn reuse_prefix(&mut self, id: SeqId, cached: usize) -> Option<SeqKv> {
        let seq = self.seqs.get(&id)?;
        let keys = seq.block_keys.get(..cached)?;
        let mut blocks = Vec::with_capacity(cached);
        for key in keys {
            match self.prefix.acquire(key) {
                Some(b) => blocks.push(b),
                None => {
                    self.release_blocks(blocks);
                    return None;
                }
            }
        }
        Some(SeqKv::with_shared(&self.pages, self.geometry, blocks))
    }

    /// Lets go of a sequence's KV: private pages return to the pool, shared blocks nobody
    /// else reads become idle (evictable) in the cache, stamped now.
    pub(super) fn release_kv(&mut self, kv: Option<SeqKv>) {
        if let Some(kv) = kv {
            self.release_blocks(kv.into_shared());
        }
    }

    /// Counts a request's first admission: its prompt tokens were looked up, `hit` of them
    /// reused.
    pub(super) fn count_prefix_query(&mut self, id: SeqId, hit_tokens: usize) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if seq.queried {
            return;
        }
        seq.queried = true;
        let hit = hit_tokens.min(seq.prompt_len);
        seq.cached_prompt_tokens = hit;
        if self.config.prefix_caching != PrefixCaching::Off {
            self.prefix_stats.queried_tokens += seq.prompt_len as u64;
            self.prefix_stats.hit_tokens += hit as u64;
        }
    }

    /// Decode role, before a remote prefill: holds the longest run of `req`'s prompt blocks
    /// this engine has cached (never the block of its last token, whose logits the prefill
    /// agent computes anyway) until `req` is submitted, when its sequence takes them, or
    /// [`Engine::unpin`]. Returns how many; 0 when caching is off or the adapter is unknown.
    /// Pinning again under the same request id lets go of the earlier pin.
    pub fn pin_prefix(&mut self, req: &Request) -> usize {
        self.unpin(&req.id);
        let Some(weights) = self.weights_of(&req.adapter_keys(), &req.adapter_scales()) else {
            return 0;
        };
        let bs = self.geometry.block_size;
        let most = req.prompt.len().saturating_sub(1) / bs;
        let root = root(&req.tenant, req.cache_salt.as_deref(), &weights);
        let mut held = Vec::new();
        for key in chain(root, &req.prompt[..most * bs], bs) {
            match self.prefix.acquire(&key) {
                Some(b) => held.push(b),
                None => break,
            }
        }
        let n = held.len();
        if n > 0 {
            self.pins.insert(req.id.clone(), held);
        }
        n
    }

    /// Lets go of what [`Engine::pin_prefix`] holds for `request_id` and no sequence took.
    pub fn unpin(&mut self, request_id: &str) {
        if let Some(blocks) = self.pins.remove(request_id) {
            self.release_blocks(blocks);
        }
    }

    /// Gives back holds on cached blocks (idle ones become evictable, stamped now).
    pub(super) fn release_blocks(&mut self, blocks: Vec<Arc<CachedBlock>>) {
        if !blocks.is_empty() {
            let stamp = self.registry.stamp();
            self.prefix.release(blocks, stamp);
        }
    }

    /// Evicts every idle cached block (their pages return to the pool); returns how many.
    pub fn clear_prefix_cache(&mut self) -> usize {
        self.prefix.clear_idle()
    }
}

/// The keys of the full blocks of `tokens`, chained from `from` (a root, or the key of the
/// block before `tokens`).
fn chain(from: BlockHash, tokens: &[u32], bs: usize) -> impl Iterator<Item = BlockHash> + '_ {
    tokens.chunks_exact(bs).scan(from, |prev, block| {
        *prev = prev.next(block);
        Some(*prev)
    })
}

/// Extends `seq`'s keys to cover its first `blocks` full blocks.
fn extend_keys(seq: &mut Sequence, blocks: usize, bs: usize) {
    let Some(root) = seq.prefix_root else { return };
    let have = seq.block_keys.len();
    if have >= blocks {
        return;
    }
    let from = seq.block_keys.last().copied().unwrap_or(root);
    let end = (blocks * bs).min(seq.tokens.len());
    let tokens = seq.tokens.get(have * bs..end).unwrap_or_default();
    seq.block_keys.extend(chain(from, tokens, bs));
}
