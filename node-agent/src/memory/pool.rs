//! The unified page pool's allocator (S-LoRA, "Unified Paging").
//!
//! One pool per device, one page size. KV-cache blocks of every sequence and the weight rows of
//! every resident adapter are allocated from the same free list; nothing splits the pool between
//! the two. The pool's memory itself lives in the backend; this module only hands out page ids.
//!
//! Invariants:
//! - every page id is in exactly one place: the free list or one live [`Pages`] allocation;
//! - an allocation is a guard that returns its pages on `Drop`, so an early return, a cancelled
//!   request or a panic in a step never leaks pages;
//! - `free + kv + adapter == total` at all times ([`PoolStats::is_consistent`]). The engine
//!   reports the KV pages of idle prefix-cache blocks apart (`cached`, taken out of `kv`), so
//!   `free + kv + cached + adapter == total` holds for its figures too.
//!
//! Design after TGI's `BlockAllocation` and mistral.rs' block pool. The free list is shared
//! with the guards through an `Arc<Mutex<_>>` so a guard can be dropped on any thread; the lock
//! is only taken to move page ids, never across a compute step.

use std::sync::{Arc, Mutex, MutexGuard};

/// What a page holds, for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    Kv,
    Adapter,
}

/// Page counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub total: u32,
    pub free: u32,
    pub kv: u32,
    pub adapter: u32,
    /// KV pages of prefix-cache blocks no running sequence holds (evictable). The allocator
    /// counts them as `kv`; the engine moves them here when it reports (always 0 here).
    pub cached: u32,
}

impl PoolStats {
    pub fn is_consistent(&self) -> bool {
        u64::from(self.free) + u64::from(self.kv) + u64::from(self.adapter) + u64::from(self.cached)
            == u64::from(self.total)
    }

    /// Fraction of pages in use.
    pub fn utilisation(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            f64::from(self.total - self.free) / f64::from(self.total)
        }
    }
}

#[derive(Debug)]
struct FreeList {
    /// Free page ids; allocation pops from the end (recently freed pages first, cache-warm).
    free: Vec<u32>,
    stats: PoolStats,
}

impl FreeList {
    fn take(&mut self, n: usize, kind: PageKind) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut pages = self.free.split_off(self.free.len() - n);
        // The stack's tail is in descending id order; handed out ascending, an allocation from
        // a fresh pool (an adapter's rows, a sequence's blocks) lies at increasing addresses,
        // the order it is read in.
        pages.reverse();
        self.count(kind, n as i64);
        Some(pages)
    }

    fn give_back(&mut self, pages: &[u32], kind: PageKind) {
        self.free.extend_from_slice(pages);
        self.count(kind, -(pages.len() as i64));
    }

    fn count(&mut self, kind: PageKind, delta: i64) {
        let slot = match kind {
            PageKind::Kv => &mut self.stats.kv,
            PageKind::Adapter => &mut self.stats.adapter,
        };
        *slot = (i64::from(*slot) + delta) as u32;
        self.stats.free = self.free.len() as u32;
    }
}

/// Hands out page ids of one pool. Cheap to clone (shares the free list).
#[derive(Debug, Clone)]
pub struct PageAllocator {
    inner: Arc<Mutex<FreeList>>,
}

impl PageAllocator {
    /// A pool of `total` pages, all free.
    pub fn new(total: u32) -> Self {
        let free: Vec<u32> = (0..total).rev().collect();
        let stats = PoolStats {
            total,
            free: total,
            kv: 0,
            adapter: 0,
            cached: 0,
        };
        PageAllocator {
            inner: Arc::new(Mutex::new(FreeList { free, stats })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FreeList> {
        // A poisoned lock only means a panic elsewhere mid-update of plain integers and a Vec;
        // the data is still a valid free list, so keep going rather than cascade the panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates `n` pages of `kind`, all or nothing.
    ///
    /// Errors: returns `None` when fewer than `n` pages are free; nothing is taken then.
    pub fn allocate(&self, n: usize, kind: PageKind) -> Option<Pages> {
        let pages = self.lock().take(n, kind)?;
        Some(Pages {
            pages,
            kind,
            pool: self.inner.clone(),
        })
    }

    /// An allocation of no pages, to grow later.
    pub fn empty(&self, kind: PageKind) -> Pages {
        Pages {
            pages: Vec::new(),
            kind,
            pool: self.inner.clone(),
        }
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    pub fn free_pages(&self) -> usize {
        self.lock().free.len()
    }

    pub fn total_pages(&self) -> usize {
        self.lock().stats.total as usize
    }
}

/// An allocation of pages. Guarantees: the pages are exclusively this guard's until it is
/// dropped (or shrunk), and dropping returns every one of them to the pool.
#[derive(Debug)]
pub struct Pages {
    pages: Vec<u32>,
    kind: PageKind,
    pool: Arc<Mutex<FreeList>>,
}

impl Pages {
    pub fn ids(&self) -> &[u32] {
        &self.pages
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    pub fn kind(&self) -> PageKind {
        self.kind
    }

    fn lock(&self) -> MutexGuard<'_, FreeList> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grows the allocation by `n` pages, all or nothing; the new ids are appended.
    ///
    /// Errors: returns `false` (and changes nothing) when fewer than `n` pages are free.
    pub fn grow(&mut self, n: usize) -> bool {
        let Some(more) = self.lock().take(n, self.kind) else {
            return false;
        };
        self.pages.extend(more);
        true
    }

    /// Moves the first `n` page ids into a new allocation of the same kind (all of them when
    /// fewer are held). The pool's counts do not change: the pages stay allocated.
    pub fn take_front(&mut self, n: usize) -> Pages {
        let n = n.min(self.pages.len());
        let rest = self.pages.split_off(n);
        Pages {
            pages: std::mem::replace(&mut self.pages, rest),
            kind: self.kind,
            pool: self.pool.clone(),
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            let pages = std::mem::take(&mut self.pages);
            self.lock().give_back(&pages, self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn allocations_are_disjoint_and_return_on_drop() {
        let pool = PageAllocator::new(10);
        let a = pool.allocate(4, PageKind::Kv).unwrap();
        let b = pool.allocate(3, PageKind::Adapter).unwrap();
        let ids: HashSet<u32> = a.ids().iter().chain(b.ids()).copied().collect();
        assert_eq!(ids.len(), 7);
        assert!(ids.iter().all(|id| *id < 10));
        let s = pool.stats();
        assert_eq!((s.free, s.kv, s.adapter), (3, 4, 3));
        assert!(s.is_consistent());
        drop(a);
        assert_eq!(pool.stats().free, 7);
        drop(b);
        assert_eq!(
            pool.stats(),
            PoolStats {
                total: 10,
                free: 10,
                kv: 0,
                adapter: 0,
                cached: 0,
            }
        );
    }

    #[test]
    fn all_or_nothing() {
        let pool = PageAllocator::new(5);
        let mut a = pool.allocate(3, PageKind::Kv).unwrap();
        assert!(pool.allocate(3, PageKind::Kv).is_none());
        assert_eq!(pool.free_pages(), 2, "a failed allocation takes nothing");
        assert!(!a.grow(3));
        assert_eq!(a.len(), 3);
        assert!(a.grow(2));
        assert_eq!((a.len(), pool.free_pages()), (5, 0));
        assert!(
            pool.allocate(0, PageKind::Adapter)
                .is_some_and(|p| p.is_empty())
        );
        drop(a);
        assert_eq!(pool.free_pages(), 5);
    }

    #[test]
    fn taking_the_front_moves_ids_and_keeps_the_counts() {
        let pool = PageAllocator::new(8);
        let mut a = pool.allocate(5, PageKind::Kv).unwrap();
        let ids = a.ids().to_vec();
        let front = a.take_front(2);
        assert_eq!((front.ids(), a.ids()), (&ids[..2], &ids[2..]));
        assert_eq!((pool.stats().kv, pool.stats().free), (5, 3));
        drop(front);
        assert_eq!((pool.stats().kv, pool.stats().free), (3, 5));
        assert_eq!(a.take_front(9).len(), 3);
        assert!(a.is_empty());
    }

    #[test]
    fn guards_can_be_dropped_on_other_threads() {
        let pool = PageAllocator::new(64);
        let guards: Vec<Pages> = (0..8)
            .map(|_| pool.allocate(8, PageKind::Kv).unwrap())
            .collect();
        assert_eq!(pool.free_pages(), 0);
        std::thread::scope(|s| {
            for g in guards {
                s.spawn(move || drop(g));
            }
        });
        assert_eq!(
            pool.stats(),
            PoolStats {
                total: 64,
                free: 64,
                kv: 0,
                adapter: 0,
                cached: 0,
            }
        );
    }

    #[test]
    fn randomized_churn_keeps_accounting_exact() {
        let pool = PageAllocator::new(100);
        let mut live: Vec<Pages> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let kind = if x & 1 == 0 {
                PageKind::Kv
            } else {
                PageKind::Adapter
            };
            match (x >> 1) % 3 {
                0 | 1 => {
                    if let Some(p) = pool.allocate(((x >> 8) % 7) as usize, kind) {
                        live.push(p);
                    }
                }
                _ if !live.is_empty() => {
                    let i = ((x >> 16) as usize) % live.len();
                    live.swap_remove(i);
                }
                _ => {}
            }
            let s = pool.stats();
            assert!(s.is_consistent(), "{s:?}");
            let held: usize = live.iter().map(Pages::len).sum();
            assert_eq!(held + s.free as usize, 100);
        }
        live.clear();
        assert_eq!(pool.free_pages(), 100);
    }
}
