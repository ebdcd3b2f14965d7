//! Prefix affinity for a decode agent's choice of prefill peer: remember which peer last
//! prefilled a prompt prefix, so that the next request with the same prefix goes where its KV
//! blocks are probably still cached (the prefill agent's own prefix cache, §3.3.1).
//!
//! A request's prefixes are keyed like the cache keys its blocks: the tenant, the `cache_salt`
//! and the adapter's digest (or the base model; every digest and scale of a composition), then the prompt's first 1, 2, 4, … full
//! blocks (up to [`MAX_BLOCKS`]), leaving the last token out as the cache does. The longest
//! prefix with a remembered peer wins. The memory is bounded: at most [`CAPACITY`] prefixes,
//! the least recently recorded forgotten first. It is only a preference: the router still
//! skips a backed-off peer and otherwise falls back to the least-loaded one.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use sha2::{Digest as _, Sha256};

use crate::engine::{Request, weights_bytes};
use crate::lora::ids::AdapterId;

/// Prefixes remembered at most.
pub const CAPACITY: usize = 4096;
/// The longest prefix considered, in blocks.
pub const MAX_BLOCKS: usize = 64;

/// One prefix's routing key (the first 16 bytes of a SHA-256; a collision only misroutes).
pub type PrefixKey = [u8; 16];

/// The keys of `request`'s prefixes, longest first.
pub fn prefix_keys(request: &Request, adapters: &[AdapterId], block: usize) -> Vec<PrefixKey> {
    if block == 0 {
        return Vec::new();
    }
    let mut h = Sha256::new();
    for part in [
        request.tenant.0.as_bytes(),
        request.cache_salt.as_deref().unwrap_or_default().as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update([u8::from(request.cache_salt.is_some())]);
    // As the prefix cache keys the weights (adapters whose digest is not known yet are left
    // out: this only steers the choice of peer).
    let weights: Vec<_> = adapters
        .iter()
        .zip(&request.adapters)
        .filter_map(|(a, u)| Some((a.digest?, u.scale.to_bits())))
        .collect();
    h.update(weights_bytes(&weights));
    let blocks = (request.prompt.len().saturating_sub(1) / block).min(MAX_BLOCKS);
    let mut keys = Vec::new();
    let mut next = 1;
    for (b, tokens) in request.prompt.chunks_exact(block).take(blocks).enumerate() {
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        if b + 1 == next {
            let digest: [u8; 32] = h.clone().finalize().into();
            let mut key = [0u8; 16];
            key.copy_from_slice(&digest[..16]);
            keys.push(key);
            next *= 2;
        }
    }
    keys.reverse();
    keys
}

/// Which peer last prefilled each remembered prefix.
#[derive(Debug, Default)]
pub struct Affinity {
    peers: HashMap<PrefixKey, (SocketAddr, u64)>,
    /// Recording order, with the recording's number (older duplicates are skipped).
    order: VecDeque<(PrefixKey, u64)>,
    next: u64,
}

impl Affinity {
    /// The peer that last prefilled the longest of `keys` (longest first).
    pub fn lookup(&self, keys: &[PrefixKey]) -> Option<SocketAddr> {
        keys.iter()
            .find_map(|k| self.peers.get(k).map(|(addr, _)| *addr))
    }

    /// Remembers that `peer` prefilled every prefix of `keys`.
    pub fn record(&mut self, keys: &[PrefixKey], peer: SocketAddr) {
        for key in keys {
            self.next += 1;
            self.peers.insert(*key, (peer, self.next));
            self.order.push_back((*key, self.next));
        }
        while self.peers.len() > CAPACITY {
            let Some((key, n)) = self.order.pop_front() else {
                break;
            };
            if self.peers.get(&key).is_some_and(|(_, m)| *m == n) {
                self.peers.remove(&key);
            }
        }
        // Re-recorded prefixes leave stale entries behind; drop them once they dominate.
        if self.order.len() > 2 * CAPACITY {
            let peers = &self.peers;
            self.order
                .retain(|(k, n)| peers.get(k).is_some_and(|(_, m)| m == n));
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{AdapterUse, SamplingParams};
    use crate::lora::ids::{AdapterKey, Digest, TenantId};

    fn request(tenant: &str, prompt: Vec<u32>, salt: Option<&str>) -> Request {
        Request {
            id: "r".into(),
            tenant: TenantId(tenant.into()),
            adapters: Vec::new(),
            prompt,
            params: SamplingParams::default(),
            cache_salt: salt.map(str::to_owned),
        }
    }

    #[test]
    fn the_longest_remembered_prefix_wins_within_its_partition() {
        let (p1, p2): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let system: Vec<u32> = (0..64).collect();
        let ask = |tail: u32| {
            let mut p = system.clone();
            p.extend([tail; 20]);
            request("a", p, None)
        };
        let keys = |r: &Request| prefix_keys(r, &[], 16);
        // 84 tokens: blocks 1, 2 and 4 of the 5 full ones (the last token stays out).
        assert_eq!(keys(&ask(1)).len(), 3);
        let mut aff = Affinity::default();
        aff.record(&keys(&ask(1)), p1);
        assert_eq!(aff.lookup(&keys(&ask(2))), Some(p1), "same system prompt");
        aff.record(&keys(&ask(2))[..1], p2);
        // The first four blocks are shared by both; p2 was recorded for them last.
        assert_eq!(aff.lookup(&keys(&ask(3))), Some(p2));
        assert_eq!(aff.lookup(&keys(&request("b", ask(1).prompt, None))), None);
        assert_eq!(
            aff.lookup(&keys(&request("a", ask(1).prompt, Some("s")))),
            None
        );
        let id = |name: &str, d: u8| AdapterId {
            key: AdapterKey::new("a", name),
            digest: Some(Digest([d; 32])),
        };
        let on = |uses: &[(&str, f32)]| {
            let mut r = ask(1);
            r.adapters = uses
                .iter()
                .map(|(name, scale)| AdapterUse {
                    name: (*name).to_owned(),
                    scale: *scale,
                })
                .collect();
            r
        };
        let x = [id("x", 7)];
        assert_eq!(aff.lookup(&prefix_keys(&on(&[("x", 1.0)]), &x, 16)), None);
        // Every (digest, scale) of a composition is part of the key.
        let xy = [id("x", 7), id("y", 8)];
        let composed = prefix_keys(&on(&[("x", 1.0), ("y", 0.5)]), &xy, 16);
        aff.record(&composed, p1);
        assert_eq!(aff.lookup(&composed), Some(p1));
        for other in [
            prefix_keys(&on(&[("x", 1.0), ("y", 0.25)]), &xy, 16),
            prefix_keys(&on(&[("x", 0.5)]), &x, 16),
            prefix_keys(&on(&[("x", 1.0)]), &x, 16),
        ] {
            assert_ne!(other, composed);
        }
        assert_ne!(
            prefix_keys(&on(&[("x", 0.5)]), &x, 16),
            prefix_keys(&on(&[("x", 1.0)]), &x, 16)
        );
        assert!(prefix_keys(&request("a", vec![1; 16], None), &[], 16).is_empty());
    }

    #[test]
    fn memory_is_bounded_and_forgets_the_oldest_first() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut aff = Affinity::default();
        let key = |i: usize| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            k
        };
        for round in 0..3 {
            for i in 0..CAPACITY + 10 {
                aff.record(&[key(i)], peer);
                assert!(aff.len() <= CAPACITY, "round {round}");
            }
        }
        assert_eq!(aff.lookup(&[key(5)]), None, "forgotten");
        assert_eq!(aff.lookup(&[key(CAPACITY + 9)]), Some(peer));
        assert!(aff.order.len() <= 2 * CAPACITY + 1);
    }
}
