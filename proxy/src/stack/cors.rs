//! Cross-origin resource sharing as the matched route's policy asks (Envoy's CORS filter with
//! its per-route `CorsPolicy`; Istio's `corsPolicy`). The route layer puts the route's
//! [`CorsPolicy`] in the request's extensions; without one, or without an `Origin`, this layer
//! does nothing.
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
//!   origin is answered here: 200 with the allowed origin, methods, headers, max age and
//!   credentials (and the exposed headers, as Envoy's answer has them). One from another origin goes on upstream, unless the policy says not to
//!   forward unmatched preflights, when it is answered 200 without any of them.
//! - Any other request from an allowed origin goes on upstream, and its response gets
//!   `Access-Control-Allow-Origin` (the origin), credentials and the exposed headers.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use super::error::ProxyError;
use super::step::{Around, AroundFuture, own, pass};
use crate::http::text_body;
use crate::routing::CorsPolicy;
use crate::server::Body;

const ALLOW_ORIGIN: &str = "access-control-allow-origin";
const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
const ALLOW_METHODS: &str = "access-control-allow-methods";
const ALLOW_HEADERS: &str = "access-control-allow-headers";
const MAX_AGE: &str = "access-control-max-age";
const EXPOSE_HEADERS: &str = "access-control-expose-headers";
const REQUEST_METHOD: &str = "access-control-request-method";
const REQUEST_HEADERS: &str = "access-control-request-headers";
const REQUEST_PRIVATE_NETWORK: &str = "access-control-request-private-network";
const ALLOW_PRIVATE_NETWORK: &str = "access-control-allow-private-network";

#[derive(Debug, Clone, Default)]
pub struct Cors;

/// `value` as a header value, when it is one (the policy's values were checked at config
/// time; the request's are header values already).
fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// What a response to an allowed origin carries: the origin, credentials, exposed headers.
fn decorate(headers: &mut HeaderMap, policy: &CorsPolicy, origin: &str) {
    set(headers, ALLOW_ORIGIN, origin);
    if policy.allow_credentials {
        headers.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if !policy.expose_headers.is_empty() {
        set(headers, EXPOSE_HEADERS, &policy.expose_headers);
    }
}

/// The answer to a preflight: 200, and what the policy allows when the origin is allowed
/// (with what any response to it carries, as Envoy's filter decorates its own answer too).
fn preflight(policy: &CorsPolicy, req: &Request<Body>, origin: Option<&str>) -> Response<Body> {
    let mut resp = Response::new(text_body(""));
    *resp.status_mut() = StatusCode::OK;
    let asked = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let headers = resp.headers_mut();
    // `*` allows what the preflight asks for, echoed back.
    let echo = |configured: &str, asked_for: &'static str| match configured {
        "*" => asked(asked_for).to_string(),
        other => other.to_string(),
    };
    if !policy.allow_methods.is_empty() {
        set(
            headers,
            ALLOW_METHODS,
            &echo(&policy.allow_methods, REQUEST_METHOD),
        );
    }
    if !policy.allow_headers.is_empty() {
        set(
            headers,
            ALLOW_HEADERS,
            &echo(&policy.allow_headers, REQUEST_HEADERS),
        );
    }
    if !policy.max_age.is_empty() {
        set(headers, MAX_AGE, &policy.max_age);
    }
    if policy.allow_private_network_access && asked(REQUEST_PRIVATE_NETWORK) == "true" {
        headers.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
    }
    if let Some(origin) = origin {
        decorate(headers, policy, origin);
    }
    resp
}

impl Around for Cors {
    fn around<S>(&self, req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(policy) = req.extensions().get::<Arc<CorsPolicy>>().cloned() else {
            return pass(inner, req);
        };
        let origin = req
            .headers()
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .filter(|o| !o.is_empty())
            .map(str::to_string);
        let Some(origin) = origin else {
            return pass(inner, req);
        };
        let allowed = policy.allows(&origin);
        let is_preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .get(REQUEST_METHOD)
                .is_some_and(|v| !v.is_empty());
        if is_preflight && (allowed || !policy.forward_not_matching_preflights) {
            let resp = preflight(&policy, &req, allowed.then_some(origin.as_str()));
            return own(std::future::ready(Ok(resp)));
        }
        let fut = inner.call(req);
        own(async move {
            let mut resp = fut.await?;
            if allowed {
                decorate(resp.headers_mut(), &policy, &origin);
            }
            Ok(resp)
        })
    }
}
