//! The adapter registry: every known adapter by (tenant, name), its weights in a bounded
//! host-memory LRU cache, its residency in the unified device pool, and who uses it.
//!
//! - Host cache: weights of `Ready` adapters count against `host_capacity` bytes; an adapter no
//!   request uses (and not pinned) can be evicted back to `Evicted`, keeping its source and
//!   digest so it is reloaded on demand. The bound always holds (`host_used <= host_capacity`).
//! - Device residency: an adapter a running request uses is copied into pool pages; once no
//!   running request uses it, its pages are evictable (least recently used first) whenever the
//!   pool needs room for KV or another adapter.
//! - Uses are guards ([`lease`]): a request holds an [`AdapterLease`] from submission to its
//!   end and a [`ResidentReservation`] while it runs. Counts are read off the live guards, so
//!   they cannot drift; an adapter with leases is never replaced or forgotten, one with
//!   reservations is never evicted from the pool.
//!
//! Synchronous and runtime-free: the engine actor owns it. Fields are private; every change
//! goes through a method that keeps the invariants above.

mod device;
pub mod lease;
mod placement;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::lora::Module;
use crate::lora::host::HostAdapter;
use crate::lora::ids::{AdapterKey, Digest};

pub use device::DeviceAdapter;
pub use lease::{AdapterLease, ResidentReservation};
pub use placement::{Placement, plan_placement};
pub use verify::Verified;

use lease::Holders;

/// Where an adapter's weights are in host memory.
#[derive(Debug, Clone)]
pub enum HostState {
    /// A load is in flight.
    Loading,
    Ready(Arc<HostAdapter>),
    /// Known and verified, weights dropped; reloaded from `source` on demand.
    Evicted,
}

/// What the admin API reports about an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    pub key: AdapterKey,
    pub digest: Option<Digest>,
    pub rank: usize,
    pub target_modules: Vec<Module>,
    pub bytes: usize,
    pub source: PathBuf,
    pub pinned: bool,
    pub residency: Residency,
    pub active_requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    Loading,
    Registered,
    HostCache,
    DevicePool,
}

/// Counters of the caches' behaviour, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Requests whose adapter was in host memory or the pool when they arrived.
    pub host_hits: u64,
    /// Reloads of evicted adapters that a request needed.
    pub host_misses: u64,
    pub device_loads: u64,
    pub device_evictions: u64,
    pub host_evictions: u64,
}

/// Why the registry refused a change. Each one means the caller's view of the registry was
/// wrong (a bug), except [`RegistryError::InUse`], which the admin API reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("adapter {0} is not registered")]
    Unknown(AdapterKey),
    #[error("adapter {key} is in use by {uses} requests")]
    InUse { key: AdapterKey, uses: usize },
    #[error("adapter {0} is not resident in the pool")]
    NotResident(AdapterKey),
    #[error("adapter {0} is already resident in the pool")]
    AlreadyResident(AdapterKey),
    #[error("adapter {key} is reserved by {running} running requests")]
    Reserved { key: AdapterKey, running: usize },
    #[error("the lease on {0} was issued by an entry since replaced")]
    StaleLease(AdapterKey),
    /// A re-read of the source finished after another load replaced or removed the entry.
    #[error("adapter {0} was replaced or unloaded while its source was re-read")]
    Superseded(AdapterKey),
}

/// One adapter. Read through its accessors; changed only through [`Registry`].
#[derive(Debug)]
pub struct Entry {
    key: AdapterKey,
    source: PathBuf,
    expected_digest: Option<Digest>,
    pinned: bool,
    host: HostState,
    device: Option<DeviceAdapter>,
    /// Digest, rank, targets and size once loaded once.
    known: Option<(Digest, usize, Vec<Module>, usize)>,
    /// Pool pages placing the host weights takes (`None` before a load, or when a row does
    /// not fit a page).
    placement: Option<usize>,
    last_used: u64,
    /// Requests admitted on it since it was registered (the operator derives request rates
    /// from successive reads, `GetStats.adapter_requests`).
    requests_total: u64,
    /// Set by unload while requests still use it: new requests are refused, the entry goes
    /// with its last lease.
    unloading: bool,
    leases: Holders,
    reservations: Holders,
}

impl Entry {
    pub fn key(&self) -> &AdapterKey {
        &self.key
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The host weights, when loaded.
    pub fn ready(&self) -> Option<&Arc<HostAdapter>> {
        match &self.host {
            HostState::Ready(a) => Some(a),
            HostState::Loading | HostState::Evicted => None,
        }
    }

    pub fn is_loading(&self) -> bool {
        matches!(self.host, HostState::Loading)
    }

    /// The pool copy, when resident.
    pub fn resident(&self) -> Option<&DeviceAdapter> {
        self.device.as_ref()
    }

    /// Its weights are somewhere a request can use them (host memory or the pool).
    pub fn usable(&self) -> bool {
        self.ready().is_some() || self.device.is_some()
    }

    /// The digest of the weights a request would run with now: the pool copy's, else the host
    /// copy's; `None` while neither is there.
    pub fn digest(&self) -> Option<Digest> {
        match (&self.device, &self.host) {
            (Some(d), _) => Some(d.digest),
            (None, HostState::Ready(a)) => Some(a.digest),
            (None, HostState::Loading | HostState::Evicted) => None,
        }
    }

    /// Pool pages placing its host weights takes (`None`: not loaded, or cannot be placed).
    pub fn placement_pages(&self) -> Option<usize> {
        self.ready().and(self.placement)
    }

    /// Requests queued or running on it (live [`AdapterLease`]s).
    pub fn uses(&self) -> usize {
        self.leases.count()
    }

    /// Requests running on it (live [`ResidentReservation`]s).
    pub fn running(&self) -> usize {
        self.reservations.count()
    }

    pub fn is_unloading(&self) -> bool {
        self.unloading
    }

    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// The tick of its last admission (larger is more recent).
    pub fn last_used(&self) -> u64 {
        self.last_used
    }

    /// Requests admitted on it since it was registered (a counter that only grows until the
    /// entry is replaced).
    pub fn requests_total(&self) -> u64 {
        self.requests_total
    }

    /// Whether the host copy was dropped and nothing resident replaces it: a request must
    /// reload it.
    fn needs_reload(&self) -> bool {
        matches!(self.host, HostState::Evicted) && self.device.is_none()
    }
}

/// What [`Registry::register`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The same adapter is being loaded from the same source: wait for that load.
    InFlight,
    /// A new entry (or a replacement) whose weights must be loaded from its source.
    Load,
    /// The same adapter is loaded from the same source: the files may have changed since, so
    /// the caller re-reads and re-digests them and hands the result to
    /// [`Registry::finish_verify`], which keeps or replaces the weights.
    Verify,
}

/// All adapters of an agent.
#[derive(Debug)]
pub struct Registry {
    entries: HashMap<AdapterKey, Entry>,
    host_capacity: usize,
    host_used: usize,
    /// Elements of a pool page, which decides how many pages an adapter's rows take.
    page_elems: usize,
    tick: u64,
    stats: RegistryStats,
}

impl Registry {
    /// An empty registry with a host cache of `host_capacity` bytes, for a pool of
    /// `page_elems`-element pages.
    pub fn new(host_capacity: usize, page_elems: usize) -> Self {
        Registry {
            entries: HashMap::new(),
            host_capacity,
            host_used: 0,
            page_elems,
            tick: 0,
            stats: RegistryStats::default(),
        }
    }

    pub fn get(&self, key: &AdapterKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn host_used(&self) -> usize {
        self.host_used
    }

    pub fn host_capacity(&self) -> usize {
        self.host_capacity
    }

    pub fn stats(&self) -> RegistryStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registers an adapter from `source`. The same source (and digest, when one is expected)
    /// for an adapter that is already known changes nothing but `pin` (which only ever turns
    /// pinning on): a load in flight is joined ([`Registration::InFlight`]), a finished one is
    /// verified against the files as they are now ([`Registration::Verify`]). Otherwise the
    /// entry is (re)created, marked loading, and the caller starts the load.
    ///
    /// Errors: [`RegistryError::InUse`] when replacing an adapter that requests still use.
    pub fn register(
        &mut self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> Result<Registration, RegistryError> {
        if let Some(e) = self.entries.get_mut(&key) {
            if e.source == source
                && !e.unloading
                && (expected.is_none() || e.known.as_ref().map(|k| k.0) == expected)
            {
                e.pinned |= pin;
                return Ok(if e.is_loading() {
                    Registration::InFlight
                } else {
                    Registration::Verify
                });
            }
            let uses = e.uses();
            if uses > 0 {
                return Err(RegistryError::InUse { key, uses });
            }
        }
        self.remove_weights(&key);
        self.entries.insert(
            key.clone(),
            Entry {
                key,
                source,
                expected_digest: expected,
                pinned: pin,
                host: HostState::Loading,
                device: None,
                known: None,
                placement: None,
                last_used: 0,
                requests_total: 0,
                unloading: false,
                leases: Holders::default(),
                reservations: Holders::default(),
            },
        );
        Ok(Registration::Load)
    }

    /// The digest a load of `key` must produce, if one was given.
    pub fn expected_digest(&self, key: &AdapterKey) -> Option<Digest> {
        self.entries.get(key).and_then(|e| e.expected_digest)
    }

    /// Marks an evicted adapter (host copy dropped, nothing resident) as loading again and
    /// returns its source for the caller to reload; `None` when no reload is needed.
    pub fn reload_if_evicted(&mut self, key: &AdapterKey) -> Option<PathBuf> {
        let e = self.entries.get_mut(key).filter(|e| e.needs_reload())?;
        e.host = HostState::Loading;
        self.stats.host_misses += 1;
        Some(e.source.clone())
    }

    /// Stores loaded weights, evicting idle adapters to respect the byte bound. When even that
    /// cannot make room, the weights are dropped (`Evicted`) and a later request reloads them.
    ///
    /// Returns `false` when the adapter is unknown (unloaded while loading) and was dropped.
    pub fn finish_load(&mut self, key: &AdapterKey, adapter: Arc<HostAdapter>) -> bool {
        let placement = plan_placement(&adapter, self.page_elems)
            .ok()
            .map(|p| p.pages);
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        entry.known = Some((
            adapter.digest,
            adapter.max_rank,
            adapter.target_modules.clone(),
            adapter.bytes,
        ));
        entry.placement = placement;
        if entry
            .device
            .as_ref()
            .is_some_and(|d| d.digest != adapter.digest)
        {
            entry.device = None;
        }
        let need = adapter.bytes;
        self.make_host_room(need, key);
        let fits = self.host_used + need <= self.host_capacity;
        let Some(entry) = self.entries.get_mut(key) else {
            return false; // not reachable: `make_host_room` never removes entries
        };
        if fits {
            entry.host = HostState::Ready(adapter);
            self.host_used += need;
        } else {
            entry.host = HostState::Evicted;
        }
        true
    }

    /// Evicts host copies until `need` more bytes fit. Victims, least recently used first
    /// within each class (then by key): adapters no request uses; then adapters whose weights
    /// are also in the device pool (running requests read those); then adapters that only
    /// queued requests wait for (reloaded when their turn comes). Pinned adapters stay.
    fn make_host_room(&mut self, need: usize, keep: &AdapterKey) {
        while self.host_used + need > self.host_capacity {
            let victim = self
                .entries
                .values()
                .filter(|e| &e.key != keep && !e.pinned && e.ready().is_some())
                .filter(|e| e.uses() == 0 || e.device.is_some() || e.running() == 0)
                .min_by_key(|e| {
                    let class = if e.uses() == 0 {
                        0
                    } else if e.device.is_some() {
                        1
                    } else {
                        2
                    };
                    (class, e.last_used, &e.key)
                })
                .map(|e| e.key.clone());
            let Some(victim) = victim else { break };
            self.drop_host(&victim);
            self.stats.host_evictions += 1;
        }
    }

    fn drop_host(&mut self, key: &AdapterKey) {
        if let Some(e) = self.entries.get_mut(key)
            && let HostState::Ready(a) = &e.host
        {
            // `host_used` is the sum of the `Ready` entries' bytes, so it holds `a.bytes`.
            self.host_used -= a.bytes;
            e.host = HostState::Evicted;
        }
    }

    fn remove_weights(&mut self, key: &AdapterKey) {
        self.drop_host(key);
        if let Some(e) = self.entries.get_mut(key) {
            e.device = None;
        }
    }

    /// Forgets an adapter whose load failed (its pages and host memory are released).
    ///
    /// Errors: [`RegistryError::InUse`] while requests still hold leases on it (the caller
    /// ends them first); nothing changes then.
    pub fn forget(&mut self, key: &AdapterKey) -> Result<(), RegistryError> {
        let Some(e) = self.entries.get(key) else {
            return Ok(());
        };
        let uses = e.uses();
        if uses > 0 {
            debug_assert!(false, "forgetting {key} with {uses} leases");
            return Err(RegistryError::InUse {
                key: key.clone(),
                uses,
            });
        }
        self.remove_weights(key);
        self.entries.remove(key);
        Ok(())
    }

    /// Unloads an adapter: at once when no request uses it, otherwise new requests are
    /// refused and it goes with its last lease. `false` if unknown.
    pub fn unload(&mut self, key: &AdapterKey) -> bool {
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if e.uses() > 0 {
            e.unloading = true;
        } else {
            self.remove_weights(key);
            self.entries.remove(key);
        }
        true
    }

    /// A request starts using `key`. Counts a host-cache hit when its weights are in host
    /// memory or the pool (a miss is counted by the reload, [`Registry::reload_if_evicted`]).
    ///
    /// Returns `None` for an unknown adapter or one being unloaded.
    pub fn lease(&mut self, key: &AdapterKey) -> Option<AdapterLease> {
        let e = self.entries.get_mut(key).filter(|e| !e.unloading)?;
        e.requests_total = e.requests_total.saturating_add(1);
        if e.usable() {
            self.stats.host_hits += 1;
        }
        Some(AdapterLease::new(key.clone(), &e.leases))
    }

    /// Gives a lease back; an adapter being unloaded goes with its last lease.
    pub fn release(&mut self, lease: AdapterLease) {
        let key = lease.key().clone();
        drop(lease);
        if self
            .entries
            .get(&key)
            .is_some_and(|e| e.unloading && e.uses() == 0)
        {
            self.remove_weights(&key);
            self.entries.remove(&key);
        }
    }

    /// Marks a use (for LRU order).
    pub fn touch(&mut self, key: &AdapterKey) {
        let tick = self.stamp();
        if let Some(e) = self.entries.get_mut(key) {
            e.last_used = tick;
        }
    }

    /// The next tick of the clock adapters' last uses are stamped with; the engine stamps
    /// prefix-cache blocks with it too, so that both are evicted in one LRU order.
    pub fn stamp(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    pub fn summaries(&self) -> Vec<AdapterSummary> {
        let mut out: Vec<AdapterSummary> = self.entries.values().map(summary).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    pub fn summary(&self, key: &AdapterKey) -> Option<AdapterSummary> {
        self.entries.get(key).map(summary)
    }
}

fn summary(e: &Entry) -> AdapterSummary {
    let (digest, rank, targets, bytes) = match &e.known {
        Some((d, r, t, b)) => (Some(*d), *r, t.clone(), *b),
        None => (None, 0, Vec::new(), 0),
    };
    let residency = match (&e.host, &e.device) {
        (_, Some(_)) => Residency::DevicePool,
        (HostState::Ready(_), None) => Residency::HostCache,
        (HostState::Loading, None) => Residency::Loading,
        (HostState::Evicted, None) => Residency::Registered,
    };
    AdapterSummary {
        key: e.key.clone(),
        digest,
        rank,
        target_modules: targets,
        bytes,
        source: e.source.clone(),
        pinned: e.pinned,
        residency,
        active_requests: e.uses(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::lora::host::ModuleWeights;

    /// Host weights that the cache counts as `bytes` bytes: one rank-1 module whose A and Bᵀ
    /// rows are one [`PAGE`] each, so placing it takes two pages.
    pub fn host(seed: u8, bytes: usize) -> Arc<HostAdapter> {
        let config = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1.0, "target_modules": ["q_proj"]
        }))
        .unwrap();
        let mut layer: [Option<ModuleWeights>; 7] = Default::default();
        layer[Module::Q.index()] = Some(ModuleWeights {
            rank: 1,
            scale: 1.0,
            a: vec![0.5; PAGE],
            bt: vec![0.25; PAGE],
        });
        Arc::new(HostAdapter {
            digest: Digest([seed; 32]),
            config,
            layers: vec![layer],
            bytes,
            max_rank: 1,
            target_modules: vec![Module::Q],
        })
    }

    pub const PAGE: usize = 8;

    pub fn key(name: &str) -> AdapterKey {
        AdapterKey::new("t", name)
    }

    /// A registry with `names` loaded (each `bytes` bytes, two pages), in order.
    pub fn loaded(capacity: usize, names: &[&str], bytes: usize) -> Registry {
        let mut r = Registry::new(capacity, PAGE);
        for (i, n) in names.iter().enumerate() {
            let k = key(n);
            assert_eq!(
                r.register(k.clone(), PathBuf::from(n), None, false),
                Ok(Registration::Load)
            );
            assert!(r.finish_load(&k, host(i as u8, bytes)));
        }
        r
    }

    /// Makes `name` resident the way the engine does: placement pages from `pool`.
    pub fn make_resident(r: &mut Registry, pool: &crate::memory::pool::PageAllocator, name: &str) {
        let k = key(name);
        let host = r.get(&k).and_then(Entry::ready).unwrap().clone();
        let placement = plan_placement(&host, PAGE).unwrap();
        assert_eq!(Some(placement.pages), r.get(&k).unwrap().placement_pages());
        let (pages, rows) = placement.allocate(pool, PAGE, 1).unwrap();
        let device = DeviceAdapter {
            pages,
            rows,
            digest: host.digest,
        };
        r.set_resident(&k, device).unwrap();
        r.touch(&k);
    }

    pub fn residency(r: &Registry, name: &str) -> Residency {
        r.summary(&key(name)).unwrap().residency
    }

    #[test]
    fn the_host_cache_bound_holds_and_evicts_by_class_then_lru() {
        let pool = crate::memory::pool::PageAllocator::new(32);
        // Room for three adapters of 100 bytes.
        let mut r = loaded(300, &["idle", "resident", "queued"], 100);
        // `resident` runs (host copy also in the pool); `queued` only has a waiting request.
        make_resident(&mut r, &pool, "resident");
        let running = r.lease(&key("resident")).unwrap();
        let queued = r.lease(&key("queued")).unwrap();
        r.touch(&key("idle")); // the most recently used, but nobody uses it now
        let mut loads = 3u8;
        let mut load = |r: &mut Registry, name: &str| {
            let k = key(name);
            assert_eq!(
                r.register(k.clone(), PathBuf::from(name), None, false),
                Ok(Registration::Load)
            );
            loads += 1;
            assert!(r.finish_load(&k, host(loads, 100)));
            assert!(r.host_used() <= r.host_capacity());
        };
        load(&mut r, "d1");
        assert_eq!(
            residency(&r, "idle"),
            Residency::Registered,
            "class 0 first"
        );
        load(&mut r, "d2");
        // d1 has no requests: class 0 again, before anything in use.
        assert_eq!(residency(&r, "d1"), Residency::Registered);
        let d2 = r.lease(&key("d2")).unwrap();
        load(&mut r, "d3");
        // Nothing idle but d3 itself: the one also resident goes before the queued one.
        assert_eq!(residency(&r, "resident"), Residency::DevicePool);
        assert!(r.get(&key("resident")).unwrap().ready().is_none());
        assert!(r.get(&key("queued")).unwrap().ready().is_some());
        assert_eq!(r.host_used(), 300);
        assert_eq!(r.stats().host_evictions, 3);
        // Too big for the cache even when empty of evictable copies: kept as `Registered`.
        let k = key("huge");
        r.register(k.clone(), PathBuf::from("huge"), None, true)
            .unwrap();
        assert!(r.finish_load(&k, host(9, 1000)));
        assert_eq!(residency(&r, "huge"), Residency::Registered);
        assert!(r.host_used() <= r.host_capacity());
        for lease in [running, queued, d2] {
            r.release(lease);
        }
    }

    #[test]
    fn pinned_adapters_stay_in_the_host_cache() {
        let mut r = Registry::new(200, PAGE);
        let (p, q) = (key("pinned"), key("other"));
        r.register(p.clone(), "p".into(), None, true).unwrap();
        assert!(r.finish_load(&p, host(1, 100)));
        r.register(q.clone(), "q".into(), None, false).unwrap();
        assert!(r.finish_load(&q, host(2, 100)));
        let k = key("third");
        r.register(k.clone(), "k".into(), None, false).unwrap();
        assert!(r.finish_load(&k, host(3, 100)));
        assert_eq!(residency(&r, "pinned"), Residency::HostCache);
        assert_eq!(residency(&r, "other"), Residency::Registered);
    }

    #[test]
    fn evicted_adapters_reload_on_demand() {
        let mut r = loaded(100, &["a"], 100);
        let b = key("b");
        r.register(b.clone(), "b".into(), None, false).unwrap();
        assert!(r.finish_load(&b, host(7, 100)));
        let a = key("a");
        assert_eq!(residency(&r, "a"), Residency::Registered);
        assert!(!r.get(&a).unwrap().usable());
        let hits = r.stats().host_hits;
        let lease = r.lease(&a).unwrap();
        assert_eq!(r.stats().host_hits, hits, "an evicted adapter is no hit");
        assert_eq!(r.reload_if_evicted(&a), Some(PathBuf::from("a")));
        assert_eq!(r.stats().host_misses, 1);
        assert_eq!(residency(&r, "a"), Residency::Loading);
        assert_eq!(r.reload_if_evicted(&a), None, "already loading");
        assert!(r.finish_load(&a, host(0, 100)));
        // `b` had no requests: it made room for `a`, whose request waits.
        assert_eq!(residency(&r, "a"), Residency::HostCache);
        assert_eq!(residency(&r, "b"), Residency::Registered);
        assert!(r.get(&a).unwrap().usable());
        assert_eq!(r.get(&a).unwrap().placement_pages(), Some(2));
        assert_eq!(r.reload_if_evicted(&a), None);
        let summary = r.summary(&a).unwrap();
        assert_eq!(
            (summary.digest, summary.bytes),
            (Some(Digest([0; 32])), 100)
        );
        r.release(lease);
    }

    #[test]
    fn register_is_idempotent_and_refuses_to_replace_an_adapter_in_use() {
        let mut r = Registry::new(1000, PAGE);
        let a = key("a");
        assert_eq!(
            r.register(a.clone(), "src".into(), None, false),
            Ok(Registration::Load)
        );
        assert_eq!(
            r.register(a.clone(), "src".into(), None, true),
            Ok(Registration::InFlight)
        );
        assert!(r.get(&a).unwrap().is_pinned());
        assert!(r.finish_load(&a, host(1, 10)));
        assert_eq!(
            r.register(a.clone(), "src".into(), Some(Digest([1; 32])), false),
            Ok(Registration::Verify),
            "a loaded adapter's source is read again: its files may have changed"
        );
        let lease = r.lease(&a).unwrap();
        assert_eq!(
            r.register(a.clone(), "elsewhere".into(), None, false),
            Err(RegistryError::InUse {
                key: a.clone(),
                uses: 1
            })
        );
        assert_eq!(
            r.register(a.clone(), "src".into(), Some(Digest([2; 32])), false),
            Err(RegistryError::InUse {
                key: a.clone(),
                uses: 1
            }),
            "another digest is another adapter"
        );
        r.release(lease);
        assert_eq!(
            r.register(a.clone(), "elsewhere".into(), None, false),
            Ok(Registration::Load)
        );
        assert_eq!(r.host_used(), 0, "the replaced weights left the cache");
        assert!(!r.finish_load(&key("never-registered"), host(3, 10)));
    }
}
