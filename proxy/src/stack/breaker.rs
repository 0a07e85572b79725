//! Circuit breakers, per cluster (Envoy's `circuit_breakers` thresholds; Istio's
//! DestinationRule `connectionPool`): at most `max_requests` requests in flight to the
//! cluster (for an HTTP/1.1 cluster also at most `max_connections`, one request a
//! connection), up to `max_pending` more waiting for one of them to finish, and the rest
//! refused at once with 503 and flag UO (upstream overflow) rather than queued without end.
//! Retries in flight to the cluster are bounded by `max_retries` (read by the retry layer).
//! The route layer's [`Target`] names the cluster; a cluster without thresholds passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;

use super::error::{Fault, ProxyError, flags};
use super::route::Target;
use super::step::{Around, AroundFuture, own, pass};
use crate::server::Body;

/// A cluster's thresholds (Envoy's defaults where unset: 1024 each, 3 retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// A cluster's breaker: its thresholds and what is in flight against them.
#[derive(Debug)]
pub struct Breaker {
    pub thresholds: Thresholds,
    /// Permits for requests in flight.
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    retries: AtomicU32,
}

impl Breaker {
    /// A breaker for a cluster speaking HTTP/2 (`http2`: requests multiplex, so connections
    /// do not bound them) or HTTP/1.1.
    pub fn new(thresholds: Thresholds, http2: bool) -> Breaker {
        let limit = if http2 {
            thresholds.max_requests
        } else {
            thresholds.max_requests.min(thresholds.max_connections)
        };
        Breaker {
            thresholds,
            slots: Arc::new(Semaphore::new(limit.max(1) as usize)),
            waiting: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        }
    }

    /// A retry may start if fewer than `max_retries` are in flight; the guard ends it.
    pub fn retry(self: &Arc<Self>) -> Option<RetrySlot> {
        let max = self.thresholds.max_retries;
        self.retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| RetrySlot(self.clone()))
    }
}

/// A retry in flight against its cluster's `max_retries`.
#[derive(Debug)]
pub struct RetrySlot(Arc<Breaker>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

fn overflow(cluster: &str, what: String) -> ProxyError {
    ProxyError::new(
        flags::UPSTREAM_OVERFLOW,
        StatusCode::SERVICE_UNAVAILABLE,
        Fault::Upstream,
        format!("upstream overflow in cluster {cluster}: {what}"),
    )
}

#[derive(Debug, Clone, Default)]
pub struct CircuitBreakers;

impl Around for CircuitBreakers {
    fn around<S>(&self, req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(target) = req.extensions().get::<Target>().cloned() else {
            return pass(inner, req);
        };
        let Some(breaker) = target.cluster.breaker.clone() else {
            return pass(inner, req);
        };
        let name = target.cluster.name.clone();
        if let Ok(permit) = breaker.slots.clone().try_acquire_owned() {
            let fut = inner.call(req);
            return own(async move {
                let resp = fut.await;
                drop(permit);
                resp
            });
        }
        // Full: wait, if the pending queue has room.
        let max_pending = breaker.thresholds.max_pending;
        let queued = breaker
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending).then_some(n + 1)
            });
        if queued.is_err() {
            let t = breaker.thresholds;
            return own(std::future::ready(Err(overflow(
                &name,
                format!(
                    "{} requests in flight (at most {} requests, {} connections) and {max_pending} waiting",
                    t.max_requests.min(t.max_connections),
                    t.max_requests,
                    t.max_connections
                ),
            ))));
        }
        let clone = inner.clone();
        let mut inner = std::mem::replace(inner, clone);
        own(async move {
            let acquired = breaker.slots.clone().acquire_owned().await;
            breaker.waiting.fetch_sub(1, Ordering::AcqRel);
            let permit =
                acquired.map_err(|_| overflow(&name, "the cluster's breaker closed".into()))?;
            let resp = tower::ServiceExt::oneshot(&mut inner, req).await;
            drop(permit);
            resp
        })
    }
}
