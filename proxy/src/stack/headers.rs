//! Header changes the matched route asks for (Envoy's `request_headers_to_add` / `_remove`
//! and `response_headers_to_add` / `_remove`; Istio's `headers`, Gateway API's header
//! modifier filters): applied to the request on its way to the upstream, and to the
//! upstream's response on its way back. The route layer puts the route's [`HeaderRules`] in
//! the request's extensions, and the chosen backend's own ([`BackendHeaders`]: Envoy's
//! `ClusterWeight` headers, Istio's destination-level `headers`); the backend's apply first,
//! then the route's, both ways, as Envoy's router applies them. Without either this layer
//! does nothing.

use std::sync::Arc;

use http::{HeaderMap, Request, Response};

use super::error::ProxyError;
use super::step::{Around, AroundFuture, own, pass};
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

/// The chosen backend's header changes, in the request's extensions.
#[derive(Debug, Clone)]
pub struct BackendHeaders(pub Arc<HeaderRules>);

#[derive(Debug, Clone, Default)]
pub struct HeaderChanges;

impl Around for HeaderChanges {
    fn around<S>(&self, mut req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let route = req.extensions().get::<Arc<HeaderRules>>().cloned();
        let backend = req
            .extensions()
            .get::<BackendHeaders>()
            .map(|b| b.0.clone());
        if route.is_none() && backend.is_none() {
            return pass(inner, req);
        }
        let rules = [backend, route];
        for r in rules.iter().flatten() {
            apply(&r.request, req.headers_mut());
        }
        let fut = inner.call(req);
        own(async move {
            let mut resp = fut.await?;
            for r in rules.iter().flatten() {
                apply(&r.response, resp.headers_mut());
            }
            Ok(resp)
        })
    }
}
