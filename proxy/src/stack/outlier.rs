//! Outlier detection's eyes: what each attempt to an endpoint came to (its status, or no
//! response at all) is told to the cluster's balancer, which ejects an endpoint that keeps
//! failing (see `crate::lb`). The balance layer names the endpoint with [`Picked`] only for
//! clusters that detect outliers; without it this layer does nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use super::error::{ProxyError, flags};
use crate::lb::{Balancer, Outcome};
use crate::server::Body;

/// The endpoint an attempt goes to, in its cluster's balancer.
#[derive(Debug, Clone)]
pub struct Picked {
    pub balancer: Arc<Balancer>,
    pub index: usize,
}

#[derive(Debug, Clone, Default)]
pub struct OutlierLayer;

impl<S> tower::Layer<S> for OutlierLayer {
    type Service = OutlierService<S>;

    fn layer(&self, inner: S) -> OutlierService<S> {
        OutlierService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct OutlierService<S> {
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for OutlierService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let Some(picked) = req.extensions_mut().remove::<Picked>() else {
            return Box::pin(self.inner.call(req));
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
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
