//! The agent's serving lifecycle: readiness, in-flight request tracking and drain.
//!
//! Drain (SIGTERM, SIGINT or the admin API's `Drain`): readiness fails at once, every new
//! request is refused with a retryable error (HTTP 503 + `Retry-After`, gRPC `UNAVAILABLE`),
//! and requests already accepted keep streaming; [`Lifecycle::wait_idle`] resolves when the
//! last one ends or the timeout passes. Each accepted request holds an [`InFlight`] guard for
//! as long as its response is being produced, so a client that disconnects stops counting the
//! moment its stream is dropped.
//!
//! When the drain timeout passes with requests still in flight, [`Lifecycle::end_in_flight`]
//! ends each of them explicitly: its event stream yields a last `Finished` event with an error
//! (so HTTP streams get an error event and `[DONE]`, gRPC streams a last message with finish
//! reason `ERROR` and the message), instead of the connection being cut at exit.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::api::error::ApiError;
use crate::disagg::prefill::DrainTicket;

#[derive(Debug)]
struct Inner {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    drain: Notify,
    drain_timeout: Duration,
    /// Set once in-flight requests must end (the drain timeout passed).
    ended: AtomicBool,
    end: Notify,
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

impl InFlight {
    /// Resolves once [`Lifecycle::end_in_flight`] was called: the request must end now.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            loop {
                let notified = inner.end.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.ended.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        }
    }
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
                ended: AtomicBool::new(false),
                end: Notify::new(),
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

    /// A prefill stream's place in this lifecycle (`PrefillService::with_drain`): counted in
    /// flight while held, ended with the others at the drain timeout; `None` while draining.
    pub fn drain_ticket(&self) -> Option<DrainTicket> {
        let flight = self.track().ok()?;
        let ended = flight.ended();
        Some(DrainTicket::new(flight, ended))
    }

    /// Ends every request in flight (and any accepted later) with an explicit error event: the
    /// drain timeout has passed and the agent is about to stop.
    pub fn end_in_flight(&self) {
        self.inner.ended.store(true, Ordering::Release);
        self.inner.end.notify_waiters();
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
    async fn ending_in_flight_requests_wakes_them() {
        let l = Lifecycle::new(Duration::from_secs(5));
        let a = l.track().unwrap();
        let ended = tokio::spawn(a.ended());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!ended.is_finished());
        l.end_in_flight();
        ended.await.unwrap();
        // A request that looks after the fact ends at once too.
        a.ended().await;
    }

    #[tokio::test(start_paused = true)]
    async fn wait_idle_gives_up_at_the_timeout() {
        let l = Lifecycle::new(Duration::from_secs(5));
        let _a = l.track().unwrap();
        assert_eq!(l.wait_idle(Duration::from_secs(3)).await, 1);
    }
}
