//! The two ways a request holds an adapter, as guards that release themselves on drop (after
//! mistral.rs' `AdapterLease` / `ResidentReservation` and the pool's own [`Pages`] guards):
//!
//! - an [`AdapterLease`]: "this request uses adapter X", from submission to its end. While an
//!   adapter has leases it cannot be replaced, and an unload waits for the last one;
//! - a [`ResidentReservation`]: "X must stay resident in the pool", held while the request is
//!   running (admitted and not preempted). While an adapter has reservations its pool pages
//!   cannot be evicted.
//!
//! Invariant, by construction: an adapter's use count is the number of live guards. A guard
//! holds a clone of its entry's [`Holders`] handle and the count is read off the handle's
//! reference count, so there is no counter to edit by hand, and dropping a guard anywhere (a
//! finished, cancelled or failed request, an early return, another thread) releases it exactly
//! once. A guard can outlive its entry only if the entry is forgotten while in use, which the
//! registry refuses; it is then inert.
//!
//! [`Pages`]: crate::memory::pool::Pages

use std::sync::Arc;

use crate::lora::ids::AdapterKey;

/// The guards of one kind on one adapter entry; their number is the handle's reference count.
#[derive(Debug, Default)]
pub(super) struct Holders(Arc<()>);

impl Holders {
    /// Live guards. The entry's own handle is the one reference that is not a guard.
    pub(super) fn count(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }

    fn hold(&self) -> Arc<()> {
        self.0.clone()
    }

    /// Whether `hold` was taken from this handle (not from an entry since replaced).
    fn issued(&self, hold: &Arc<()>) -> bool {
        Arc::ptr_eq(&self.0, hold)
    }
}

/// A request's use of an adapter. Obtained from [`Registry::lease`]; give it back with
/// [`Registry::release`] so that an adapter being unloaded goes with its last use (merely
/// dropping it releases the use too, and the unload completes at the next release or unload).
///
/// [`Registry::lease`]: crate::lora::registry::Registry::lease
/// [`Registry::release`]: crate::lora::registry::Registry::release
#[derive(Debug)]
pub struct AdapterLease {
    key: AdapterKey,
    hold: Arc<()>,
}

impl AdapterLease {
    pub(super) fn new(key: AdapterKey, holders: &Holders) -> Self {
        AdapterLease {
            key,
            hold: holders.hold(),
        }
    }

    pub fn key(&self) -> &AdapterKey {
        &self.key
    }

    /// Whether this lease was issued by `holders` (the current entry of its adapter).
    pub(super) fn issued_by(&self, holders: &Holders) -> bool {
        holders.issued(&self.hold)
    }
}

/// Keeps an adapter's pool pages from being evicted while a running request reads them.
/// Obtained from [`Registry::reserve_resident`]; dropping it makes the adapter evictable again
/// once no other running request holds one.
///
/// [`Registry::reserve_resident`]: crate::lora::registry::Registry::reserve_resident
#[derive(Debug)]
pub struct ResidentReservation {
    key: AdapterKey,
    _hold: Arc<()>,
}

impl ResidentReservation {
    pub(super) fn new(key: AdapterKey, holders: &Holders) -> Self {
        ResidentReservation {
            key,
            _hold: holders.hold(),
        }
    }

    pub fn key(&self) -> &AdapterKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::lora::registry::tests::{host, key, loaded, make_resident};
    use crate::lora::registry::{AdapterLease, Registry, RegistryError};
    use crate::memory::pool::PageAllocator;

    fn uses(r: &Registry, name: &str) -> (usize, usize) {
        let e = r.get(&key(name)).unwrap();
        (e.uses(), e.running())
    }

    #[test]
    fn guards_count_while_alive_and_release_on_drop() {
        let pool = PageAllocator::new(8);
        let mut r = loaded(1000, &["a"], 10);
        make_resident(&mut r, &pool, "a");
        let first = r.lease(&key("a")).unwrap();
        let second = r.lease(&key("a")).unwrap();
        assert_eq!(uses(&r, "a"), (2, 0));
        let running = r.reserve_resident(&first).unwrap();
        assert_eq!(running.key(), &key("a"));
        assert_eq!(uses(&r, "a"), (2, 1));
        assert_eq!(r.summary(&key("a")).unwrap().active_requests, 2);
        drop(running); // preempted
        assert_eq!(uses(&r, "a"), (2, 0));
        drop(second); // dropped without `release`: still released
        assert_eq!(uses(&r, "a"), (1, 0));
        r.release(first);
        assert_eq!(uses(&r, "a"), (0, 0));
    }

    #[test]
    fn a_failed_request_releases_its_guards_on_the_error_path() {
        let pool = PageAllocator::new(8);
        let mut r = loaded(1000, &["a"], 10);
        make_resident(&mut r, &pool, "a");
        // Takes both guards, then fails before handing them to anyone.
        let admit = |r: &mut Registry| -> Result<AdapterLease, &'static str> {
            let lease = r.lease(&key("a")).ok_or("unknown")?;
            let _running = r.reserve_resident(&lease).map_err(|_| "not resident")?;
            Err("the step failed")
        };
        assert_eq!(admit(&mut r).unwrap_err(), "the step failed");
        assert_eq!(uses(&r, "a"), (0, 0));
        assert_eq!(r.evict_idle_lru(), Some(key("a")), "evictable again");
        // Not resident any more: the reservation is refused and the lease still released.
        assert_eq!(admit(&mut r).unwrap_err(), "not resident");
        assert_eq!(uses(&r, "a"), (0, 0));
    }

    #[test]
    fn cancelled_requests_release_and_a_pending_unload_completes_with_the_last() {
        let pool = PageAllocator::new(8);
        let mut r = loaded(1000, &["a"], 10);
        make_resident(&mut r, &pool, "a");
        // Three requests: one running, two queued.
        let mut requests: Vec<(AdapterLease, Option<_>)> = (0..3)
            .map(|_| (r.lease(&key("a")).unwrap(), None))
            .collect();
        requests[0].1 = Some(r.reserve_resident(&requests[0].0).unwrap());
        assert!(r.unload(&key("a")), "unload waits for the requests");
        assert!(r.get(&key("a")).unwrap().is_unloading());
        assert!(
            r.lease(&key("a")).is_none(),
            "no new requests while unloading"
        );
        // Cancel the running one (its reservation and lease go with it), then the rest.
        let (lease, running) = requests.remove(0);
        drop(running);
        r.release(lease);
        assert_eq!(uses(&r, "a"), (2, 0));
        for (lease, _) in requests.drain(..) {
            r.release(lease);
        }
        assert!(r.get(&key("a")).is_none(), "gone with its last request");
        assert_eq!(pool.stats().adapter, 0, "its pool pages returned");
        assert_eq!(r.host_used(), 0, "its host copy dropped");
    }

    #[test]
    fn guards_drop_on_other_threads() {
        let mut r = loaded(1000, &["a"], 10);
        let leases: Vec<AdapterLease> = (0..4).map(|_| r.lease(&key("a")).unwrap()).collect();
        assert_eq!(uses(&r, "a"), (4, 0));
        std::thread::scope(|s| {
            for lease in leases {
                s.spawn(move || drop(lease));
            }
        });
        assert_eq!(uses(&r, "a"), (0, 0));
    }

    #[test]
    fn a_lease_from_a_replaced_entry_reserves_nothing() {
        let pool = PageAllocator::new(8);
        let mut r = loaded(1000, &["a"], 10);
        let stale = r.lease(&key("a")).unwrap();
        drop(r.lease(&key("a")));
        // Replacing needs no leases; model a replacement that slipped past with a registry
        // whose entry was re-created after this lease was issued.
        let mut other = loaded(1000, &["a"], 10);
        make_resident(&mut other, &pool, "a");
        assert_eq!(
            other.reserve_resident(&stale).unwrap_err(),
            RegistryError::StaleLease(key("a"))
        );
        assert_eq!(other.get(&key("a")).unwrap().running(), 0);
        r.release(stale);
        assert_eq!(
            r.register(key("a"), PathBuf::from("b"), None, false),
            Ok(crate::lora::registry::Registration::Load)
        );
        assert!(r.finish_load(&key("a"), host(5, 10)));
    }
}
