//! The adapter registry: every known adapter by (tenant, name), its weights in a bounded
//! host-memory LRU cache, and its residency in the unified device pool.
//!
//! - Host cache: weights of `Ready` adapters count against `host_capacity` bytes; an adapter no
//!   request uses (and not pinned) can be evicted back to `Evicted`, keeping its source and
//!   digest so it is reloaded on demand. The bound always holds.
//! - Device residency: an adapter a running request uses is copied into pool pages; once no
//!   running request uses it, its pages are evictable (least recently used first) whenever the
//!   pool needs room for KV or another adapter.
//!
//! Synchronous and runtime-free: the engine actor owns it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::lora::Module;
use crate::lora::batch::{AdapterRows, ModuleRows};
use crate::lora::host::HostAdapter;
use crate::lora::ids::{AdapterKey, Digest};
use crate::memory::pool::{PageAllocator, PageKind, Pages};

/// Where an adapter's weights are in host memory.
#[derive(Debug, Clone)]
pub enum HostState {
    /// A load is in flight.
    Loading,
    Ready(Arc<HostAdapter>),
    /// Known and verified, weights dropped; reloaded from `source` on demand.
    Evicted,
}

/// A resident adapter's pool pages and row layout.
#[derive(Debug)]
pub struct DeviceAdapter {
    pub pages: Pages,
    pub rows: AdapterRows,
    pub digest: Digest,
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

#[derive(Debug)]
pub struct Entry {
    pub key: AdapterKey,
    pub source: PathBuf,
    pub expected_digest: Option<Digest>,
    pub pinned: bool,
    pub host: HostState,
    pub device: Option<DeviceAdapter>,
    /// Digest, rank, targets and size once loaded once.
    pub known: Option<(Digest, usize, Vec<Module>, usize)>,
    /// Requests queued or running on it.
    pub active: usize,
    /// Requests running on it (holding its device pages).
    pub running: usize,
    last_used: u64,
    /// Set by unload while requests still run: new requests are refused, the entry goes when
    /// `active` reaches zero.
    pub unloading: bool,
}

impl Entry {
    /// The tick of its last admission (larger is more recent).
    pub fn last_used(&self) -> u64 {
        self.last_used
    }

    pub fn ready(&self) -> Option<&Arc<HostAdapter>> {
        match &self.host {
            HostState::Ready(a) => Some(a),
            HostState::Loading | HostState::Evicted => None,
        }
    }
}

/// All adapters of an agent.
#[derive(Debug)]
pub struct Registry {
    entries: HashMap<AdapterKey, Entry>,
    host_capacity: usize,
    host_used: usize,
    tick: u64,
    pub host_hits: u64,
    pub host_misses: u64,
    pub device_loads: u64,
    pub device_evictions: u64,
    pub host_evictions: u64,
}

impl Registry {
    pub fn new(host_capacity: usize) -> Self {
        Registry {
            entries: HashMap::new(),
            host_capacity,
            host_used: 0,
            tick: 0,
            host_hits: 0,
            host_misses: 0,
            device_loads: 0,
            device_evictions: 0,
            host_evictions: 0,
        }
    }

    pub fn get(&self, key: &AdapterKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn get_mut(&mut self, key: &AdapterKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    pub fn host_used(&self) -> usize {
        self.host_used
    }

    pub fn host_capacity(&self) -> usize {
        self.host_capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &AdapterKey> {
        self.entries.keys()
    }

    /// Registers (or re-points) an adapter and marks it loading. Replacing an adapter that
    /// requests still use is refused by the caller before this.
    pub fn begin_load(
        &mut self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pinned: bool,
    ) {
        self.remove_weights(&key);
        self.entries.insert(
            key.clone(),
            Entry {
                key,
                source,
                expected_digest: expected,
                pinned,
                host: HostState::Loading,
                device: None,
                known: None,
                active: 0,
                running: 0,
                last_used: 0,
                unloading: false,
            },
        );
    }

    /// Marks an evicted adapter as loading again (a request needs it).
    pub fn begin_reload(&mut self, key: &AdapterKey) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if matches!(e.host, HostState::Evicted) => {
                e.host = HostState::Loading;
                self.host_misses += 1;
                true
            }
            _ => false,
        }
    }

    /// Stores loaded weights, evicting idle adapters to respect the byte bound. When even that
    /// cannot make room, the weights are dropped (`Evicted`) and a later request reloads them.
    ///
    /// Returns `false` when the adapter is unknown (unloaded while loading) and was dropped.
    pub fn finish_load(&mut self, key: &AdapterKey, adapter: Arc<HostAdapter>) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        entry.known = Some((
            adapter.digest,
            adapter.max_rank,
            adapter.target_modules.clone(),
            adapter.bytes,
        ));
        if let Some(dev) = &entry.device
            && dev.digest != adapter.digest
        {
            entry.device = None;
        }
        let need = adapter.bytes;
        self.make_host_room(need, key);
        let entry = self
            .entries
            .get_mut(key)
            .expect("present: checked above and not removed");
        if self.host_used + need <= self.host_capacity {
            entry.host = HostState::Ready(adapter);
            self.host_used += need;
        } else {
            entry.host = HostState::Evicted;
        }
        true
    }

    /// Evicts host copies until `need` more bytes fit. Victims, least recently used first
    /// within each class: adapters no request uses; then adapters whose weights are also in the
    /// device pool (running requests read those); then adapters that only queued requests wait
    /// for (reloaded when their turn comes). Pinned adapters stay.
    fn make_host_room(&mut self, need: usize, keep: &AdapterKey) {
        while self.host_used + need > self.host_capacity {
            let victim = self
                .entries
                .values()
                .filter(|e| &e.key != keep && !e.pinned && e.ready().is_some())
                .filter(|e| e.active == 0 || e.device.is_some() || e.running == 0)
                .min_by_key(|e| {
                    let class = if e.active == 0 {
                        0
                    } else if e.device.is_some() {
                        1
                    } else {
                        2
                    };
                    (class, e.last_used)
                })
                .map(|e| e.key.clone());
            let Some(victim) = victim else { break };
            self.drop_host(&victim);
            self.host_evictions += 1;
        }
    }

    fn drop_host(&mut self, key: &AdapterKey) {
        if let Some(e) = self.entries.get_mut(key)
            && let HostState::Ready(a) = &e.host
        {
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

    /// Forgets an adapter entirely (its pages and host memory are released).
    pub fn remove(&mut self, key: &AdapterKey) -> Option<Entry> {
        self.remove_weights(key);
        self.entries.remove(key)
    }

    /// Marks a use (for LRU order).
    pub fn touch(&mut self, key: &AdapterKey) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(key) {
            e.last_used = tick;
        }
    }

    /// Pool pages held by resident adapters that no running request uses.
    pub fn idle_device_pages(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.running == 0)
            .filter_map(|e| e.device.as_ref())
            .map(|d| d.pages.len())
            .sum()
    }

    /// Evicts the least recently used idle resident adapter; `false` when there is none.
    pub fn evict_idle_device(&mut self) -> bool {
        let victim = self
            .entries
            .values()
            .filter(|e| e.running == 0 && e.device.is_some())
            .min_by_key(|e| e.last_used)
            .map(|e| e.key.clone());
        match victim.and_then(|k| self.entries.get_mut(&k)) {
            Some(e) => {
                e.device = None;
                self.device_evictions += 1;
                true
            }
            None => false,
        }
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
        active_requests: e.active,
    }
}

/// One module's rows in a [`Placement`], as (page index within the allocation, element offset).
#[derive(Debug)]
struct PlannedModule {
    layer: usize,
    module: Module,
    rank: usize,
    scale: f32,
    a: Vec<(usize, usize)>,
    b: Vec<(usize, usize)>,
}

/// Where each row of an adapter goes: rows never straddle a page boundary.
#[derive(Debug)]
pub struct Placement {
    pub pages: usize,
    modules: Vec<PlannedModule>,
}

/// Plans how `adapter` packs into pages of `page_elems` elements.
///
/// Errors: a row longer than a page (the pool's page size is configured too small).
pub fn plan_placement(adapter: &HostAdapter, page_elems: usize) -> Result<Placement, String> {
    let (mut page, mut used) = (0usize, 0usize);
    let mut place = |len: usize| -> Result<(usize, usize), String> {
        if len > page_elems {
            return Err(format!(
                "an adapter row of {len} elements exceeds the page of {page_elems}"
            ));
        }
        if used + len > page_elems {
            page += 1;
            used = 0;
        }
        let at = (page, used);
        used += len;
        Ok(at)
    };
    let mut modules = Vec::new();
    for (layer, module, w) in adapter.modules() {
        let (in_dim, out_dim) = (w.a.len() / w.rank, w.bt.len() / w.rank);
        let a = (0..w.rank)
            .map(|_| place(in_dim))
            .collect::<Result<Vec<_>, _>>()?;
        let b = (0..w.rank)
            .map(|_| place(out_dim))
            .collect::<Result<Vec<_>, _>>()?;
        modules.push(PlannedModule {
            layer,
            module,
            rank: w.rank,
            scale: w.scale,
            a,
            b,
        });
    }
    let pages = if modules.is_empty() { 0 } else { page + 1 };
    Ok(Placement { pages, modules })
}

impl Placement {
    /// Allocates the pages and returns them with the absolute pool offset of every row; the
    /// caller copies row `r` of each module's A and Bᵀ to `rows.a[r]` / `rows.b[r]`.
    pub fn allocate(
        &self,
        pool: &PageAllocator,
        page_elems: usize,
        num_layers: usize,
    ) -> Option<(Pages, AdapterRows)> {
        let pages = pool.allocate(self.pages, PageKind::Adapter)?;
        let abs = |&(p, off): &(usize, usize)| pages.ids()[p] as usize * page_elems + off;
        let mut rows = AdapterRows {
            layers: vec![Default::default(); num_layers],
        };
        for m in &self.modules {
            rows.layers[m.layer][m.module.index()] = Some(ModuleRows {
                rank: m.rank,
                scale: m.scale,
                a: m.a.iter().map(abs).collect(),
                b: m.b.iter().map(abs).collect(),
            });
        }
        Some((pages, rows))
    }
}
