//! Outlier detection's eyes: what each attempt to an endpoint came to (its status, or no
//! response at all) is told to the cluster's balancer, which ejects an endpoint that keeps
//! failing (see `crate::lb`). The balance layer names the endpoint with [`Picked`] only for
//! clusters that detect outliers; without it this layer does nothing.

use std::sync::Arc;

use http::{Request, Response};

use super::error::{ProxyError, flags};
use super::step::{Around, AroundFuture, own, pass};
use crate::lb::{Balancer, Outcome};
use crate::server::Body;

/// The endpoint an attempt goes to, in its cluster's balancer.
#[derive(Debug, Clone)]
pub struct Picked {
    pub balancer: Arc<Balancer>,
    pub index: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Outcomes;

impl Around for Outcomes {
    fn around<S>(&self, mut req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(picked) = req.extensions_mut().remove::<Picked>() else {
            return pass(inner, req);
        };
        let fut = inner.call(req);
        own(async move {
            let result = fut.await;
            let outcome = match &result {
                Ok(resp) => Some(Outcome::Status(resp.status().as_u16())),
                Err(e)
                    if [
                        flags::UPSTREAM_CONNECT_FAILURE,
                        flags::UPSTREAM_TIMEOUT,
                        flags::UPSTREAM_RESET,
                    ]
                    .contains(&e.flag) =>
                {
                    Some(Outcome::NoResponse)
                }
                Err(_) => None,
            };
            if let Some(outcome) = outcome
                && picked.balancer.observe(picked.index, outcome)
            {
                tracing::warn!(
                    endpoint = picked.index,
                    ?outcome,
                    "endpoint ejected: it failed too many times in a row"
                );
            }
            result
        })
    }
}
