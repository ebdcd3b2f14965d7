//! The agent's serving lifecycle: readiness, in-flight request tracking and drain.
//!
//! Drain (SIGTERM, SIGINT or the admin API's `Drain`): readiness fails at once, every new
//! request is refused with a retryable error (HTTP 503 + `Retry-After`, gRPC `UNAVAILABLE`),
//! and requests already accepted keep streaming; [`Lifecycle::wait_idle`] resolves when the
//! last one ends or the timeout passes. Each accepted request holds an [`InFlight`] guard for
//! as long as its response is being produced, so a client that disconnects stops counting the
//! moment its stream is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::api::error::ApiError;

#[derive(Debug)]
struct Inner {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    drain: Notify,
    drain_timeout: Duration,
}

/// Shared lifecycle state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

/// One accepted request; dropping it ends its count.
#[derive(Debug)]
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// `drain_timeout` bounds how long a drain waits for in-flight requests.
    pub fn new(drain_timeout: Duration) -> Self {
        Lifecycle {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
                drain: Notify::new(),
                drain_timeout,
            }),
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        self.inner.drain_timeout
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Whether the agent should receive traffic (`/readyz`, gRPC health).
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Starts draining. Returns `true` the first time, `false` if already draining.
    pub fn start_drain(&self) -> bool {
        let first = !self.inner.draining.swap(true, Ordering::AcqRel);
        if first {
            self.inner.drain.notify_waiters();
        }
        first
    }

    /// Resolves once a drain has started (immediately if it already has).
    pub async fn drain_started(&self) {
        loop {
            let notified = self.inner.drain.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }

    /// Counts a new request in, unless draining.
    ///
    /// Errors: [`ApiError::Draining`] once a drain has started.
    pub fn track(&self) -> Result<InFlight, ApiError> {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            inner: self.inner.clone(),
        };
        if self.is_draining() {
            return Err(ApiError::Draining {
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(guard)
    }

    /// Waits until no request is in flight or `timeout` passes; returns how many remain.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let idle = async {
            loop {
                let notified = self.inner.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, idle).await;
        self.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_refuses_new_work_and_waits_for_old() {
        let l = Lifecycle::new(Duration::from_secs(5));
        let a = l.track().unwrap();
        assert!(l.start_drain());
        assert!(!l.start_drain());
        assert!(!l.is_ready());
        assert!(matches!(l.track(), Err(ApiError::Draining { .. })));
        assert_eq!(l.in_flight(), 1);
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.wait_idle(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(a);
        assert_eq!(waiter.await.unwrap(), 0);
        l.drain_started().await;
    }

    #[tokio::test(start_paused = true)]
    async fn wait_idle_gives_up_at_the_timeout() {
        let l = Lifecycle::new(Duration::from_secs(5));
        let _a = l.track().unwrap();
        assert_eq!(l.wait_idle(Duration::from_secs(3)).await, 1);
    }
}
