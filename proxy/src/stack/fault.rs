//! Fault injection, as Envoy's HTTP fault filter does it for the route that matched (Istio's
//! `fault` on a VirtualService route): a share of requests is delayed by a fixed time (flag
//! DI), a share is answered at once with a status (flag FI) and never reaches an upstream.
//! The route layer puts the route's [`RouteFault`] in the request's extensions; without one
//! this layer does nothing.

use http::{Request, Response};

use super::error::{Fault, ProxyError, flags};
use super::observe::Observation;
use super::step::{Around, AroundFuture, own, pass};
use crate::routing::RouteFault;
use crate::server::Body;

/// Envoy's percentages are parts per million here (`FractionalPercent` brought to MILLION).
pub const MILLION: u32 = 1_000_000;

/// Whether a request falls in a share of `per_million`, drawing `roll` uniformly in
/// `0..MILLION`.
fn selected(per_million: u32, roll: u32) -> bool {
    roll < per_million
}

#[derive(Debug, Clone, Default)]
pub struct Faults;

/// Adds a response flag to the request's record.
fn flag(req: &Request<Body>, f: &str) {
    if let Some(o) = req.extensions().get::<Observation>() {
        o.add_flag(f);
    }
}

impl Around for Faults {
    fn around<S>(&self, req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(fault) = req.extensions().get::<RouteFault>().cloned() else {
            return pass(inner, req);
        };
        let delay = fault
            .delay
            .filter(|(_, share)| selected(*share, rand::random::<u32>() % MILLION))
            .map(|(d, _)| d);
        let abort = fault
            .abort
            .filter(|(_, share)| selected(*share, rand::random::<u32>() % MILLION))
            .map(|(status, _)| status);
        if delay.is_none() && abort.is_none() {
            return pass(inner, req);
        }
        // The inner service was made ready for this call; a clone takes it after the delay.
        let clone = inner.clone();
        let mut inner = std::mem::replace(inner, clone);
        own(async move {
            if let Some(d) = delay {
                flag(&req, flags::DELAY_INJECTED);
                tokio::time::sleep(d).await;
            }
            if let Some(status) = abort {
                return Err(ProxyError::new(
                    flags::FAULT_INJECTED,
                    status,
                    Fault::Proxy,
                    "fault filter abort",
                ));
            }
            inner.call(req).await
        })
    }
}
