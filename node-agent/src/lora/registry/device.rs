//! Residency in the unified pool: recording an adapter's pool copy, keeping it while running
//! requests read it ([`ResidentReservation`]), and evicting it when they are done.

use crate::lora::batch::AdapterRows;
use crate::lora::ids::{AdapterKey, Digest};
use crate::lora::registry::{AdapterLease, Registry, RegistryError, ResidentReservation};
use crate::memory::pool::Pages;

/// A resident adapter's pool pages and row layout.
#[derive(Debug)]
pub struct DeviceAdapter {
    pub pages: Pages,
    pub rows: AdapterRows,
    pub digest: Digest,
}

impl Registry {
    /// Keeps `lease`'s adapter resident while the returned guard lives.
    ///
    /// Errors: the adapter is not resident, or the lease is not from its current entry.
    pub fn reserve_resident(
        &mut self,
        lease: &AdapterLease,
    ) -> Result<ResidentReservation, RegistryError> {
        let key = lease.key();
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| RegistryError::Unknown(key.clone()))?;
        if !lease.issued_by(&e.leases) {
            return Err(RegistryError::StaleLease(key.clone()));
        }
        if e.device.is_none() {
            return Err(RegistryError::NotResident(key.clone()));
        }
        Ok(ResidentReservation::new(key.clone(), &e.reservations))
    }

    /// Records that the adapter's rows were copied into `device`'s pages.
    ///
    /// Errors: unknown, or already resident (`device` is dropped, returning its pages).
    pub fn set_resident(
        &mut self,
        key: &AdapterKey,
        device: DeviceAdapter,
    ) -> Result<(), RegistryError> {
        let e = self
            .entries
            .get_mut(key)
            .ok_or_else(|| RegistryError::Unknown(key.clone()))?;
        if e.device.is_some() {
            return Err(RegistryError::AlreadyResident(key.clone()));
        }
        e.device = Some(device);
        self.stats.device_loads += 1;
        Ok(())
    }

    /// A resident adapter's row layout in the pool.
    pub fn resident_rows(&self, key: &AdapterKey) -> Option<&AdapterRows> {
        self.entries.get(key)?.device.as_ref().map(|d| &d.rows)
    }

    /// Evicts `key` from the pool (its pages return to the free list).
    ///
    /// Errors: not resident, or running requests hold reservations on it; nothing changes.
    pub fn evict_resident(&mut self, key: &AdapterKey) -> Result<(), RegistryError> {
        let e = self
            .entries
            .get_mut(key)
            .ok_or_else(|| RegistryError::Unknown(key.clone()))?;
        if e.device.is_none() {
            return Err(RegistryError::NotResident(key.clone()));
        }
        let running = e.running();
        if running > 0 {
            return Err(RegistryError::Reserved {
                key: key.clone(),
                running,
            });
        }
        e.device = None;
        self.stats.device_evictions += 1;
        Ok(())
    }

    /// Evicts the least recently used resident adapter that no running request uses (ties by
    /// key); returns it, or `None` when there is none.
    pub fn evict_idle_lru(&mut self) -> Option<AdapterKey> {
        let victim = self
            .entries
            .values()
            .filter(|e| e.running() == 0 && e.device.is_some())
            .min_by_key(|e| (e.last_used, &e.key))
            .map(|e| e.key.clone())?;
        self.evict_resident(&victim).ok()?;
        Some(victim)
    }
}

#[cfg(test)]
mod tests {
    use crate::lora::registry::tests::{PAGE, key, loaded, make_resident, residency};
    use crate::lora::registry::{DeviceAdapter, Entry, RegistryError, Residency, plan_placement};

    #[test]
    fn device_eviction_goes_least_recently_used_first_and_spares_running_adapters() {
        let pool = crate::memory::pool::PageAllocator::new(32);
        let mut r = loaded(1 << 20, &["a", "b", "c"], 100);
        for n in ["b", "a", "c"] {
            make_resident(&mut r, &pool, n);
        }
        assert_eq!(pool.stats().adapter, 6);
        // `b` is the least recently used, but a running request reserves it.
        let lease = r.lease(&key("b")).unwrap();
        let running = r.reserve_resident(&lease).unwrap();
        assert_eq!(
            r.evict_resident(&key("b")),
            Err(RegistryError::Reserved {
                key: key("b"),
                running: 1
            })
        );
        assert_eq!(r.evict_idle_lru(), Some(key("a")));
        r.touch(&key("b"));
        assert_eq!(r.evict_idle_lru(), Some(key("c")));
        assert_eq!(r.evict_idle_lru(), None, "only the reserved one is left");
        drop(running);
        assert_eq!(r.evict_idle_lru(), Some(key("b")));
        assert_eq!(pool.stats().adapter, 0, "evicted pages return to the pool");
        assert_eq!(r.stats().device_evictions, 3);
        assert_eq!(r.stats().device_loads, 3);
        assert_eq!(residency(&r, "b"), Residency::HostCache);
        assert_eq!(
            r.evict_resident(&key("b")),
            Err(RegistryError::NotResident(key("b")))
        );
        r.release(lease);
    }

    #[test]
    fn device_eviction_ties_go_to_the_smaller_key() {
        let pool = crate::memory::pool::PageAllocator::new(32);
        let mut r = loaded(1 << 20, &["b", "a"], 100);
        for n in ["b", "a"] {
            let k = key(n);
            let host = r.get(&k).and_then(Entry::ready).unwrap().clone();
            let (pages, rows) = plan_placement(&host, PAGE)
                .unwrap()
                .allocate(&pool, PAGE, 1)
                .unwrap();
            let device = DeviceAdapter {
                pages,
                rows,
                digest: host.digest,
            };
            r.set_resident(&k, device).unwrap(); // never touched: both at tick 0
        }
        assert_eq!(r.evict_idle_lru(), Some(key("a")));
        assert_eq!(r.evict_idle_lru(), Some(key("b")));
    }
}
