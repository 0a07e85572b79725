//! Header changes the matched route asks for (Envoy's `request_headers_to_add` / `_remove`
//! and `response_headers_to_add` / `_remove`; Istio's `headers`, Gateway API's header
//! modifier filters): applied to the request on its way to the upstream, and to the
//! upstream's response on its way back. The route layer puts the route's [`HeaderRules`] in
//! the request's extensions; without them this layer does nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};

use super::error::ProxyError;
use crate::routing::{HeaderOps, HeaderRules};
use crate::server::Body;

/// Applies one direction's changes: removals, then sets (replacing), then additions.
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value) in &ops.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &ops.add {
        headers.append(name.clone(), value.clone());
    }
}

#[derive(Debug, Clone, Default)]
pub struct HeadersLayer;

impl<S> tower::Layer<S> for HeadersLayer {
    type Service = HeadersService<S>;

    fn layer(&self, inner: S) -> HeadersService<S> {
        HeadersService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct HeadersService<S> {
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for HeadersService<S>
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
        let Some(rules) = req.extensions().get::<Arc<HeaderRules>>().cloned() else {
            return Box::pin(self.inner.call(req));
        };
        apply(&rules.request, req.headers_mut());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            apply(&rules.response, resp.headers_mut());
            Ok(resp)
        })
    }
}
