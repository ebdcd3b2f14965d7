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
