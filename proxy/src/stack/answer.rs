//! What a route answers itself; nothing goes upstream.
//! - Redirects (Envoy's redirect action; Istio's `redirect`, Gateway API's
//!   `RequestRedirect`): the `Location` is the request's own URL with the parts the route
//!   names replaced (scheme, host, port, the whole path or the part its prefix matched), the
//!   query kept unless stripped.
//! - Direct responses (Envoy's direct response action; Istio's `directResponse`): the route's
//!   status and body.
//!
//! The header layer outside this one applies the route's response header changes to both.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode};

use super::error::ProxyError;
use super::observe::authority_of;
use super::step::{Around, AroundFuture, own, pass};
use crate::http::{host_only, text_body};
use crate::routing::{Answer, PathMatch, Redirect};
use crate::server::Body;

/// The route's redirect and what its path matched (for a prefix change).
#[derive(Debug, Clone)]
pub struct Redirecting {
    pub redirect: Arc<Redirect>,
    pub matched: PathMatch,
}

/// What the route answers and what its path matched, in the request's extensions (set by the
/// route layer).
#[derive(Debug, Clone)]
pub struct Answering {
    pub answer: Answer,
    pub matched: PathMatch,
}

/// Default ports, dropped from a `Location` whose scheme changes.
fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// Where `req` is redirected.
pub fn location(req: &Request<Body>, r: &Redirecting) -> String {
    let original_scheme = req.uri().scheme_str().unwrap_or("http").to_string();
    let scheme = r
        .redirect
        .scheme
        .clone()
        .unwrap_or_else(|| original_scheme.clone());
    let authority = authority_of(req);
    let port = authority
        .rsplit_once(':')
        .filter(|(_, p)| !p.contains(']'))
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let host = r
        .redirect
        .host
        .clone()
        .unwrap_or_else(|| host_only(authority).to_string());
    // As Envoy's router: a host named replaces the whole authority (with a port only if one is
    // named too); else the request's authority stays, its port replaced by a port named, or
    // dropped when the scheme changes and it was the old scheme's default port.
    let port = match (r.redirect.port, &r.redirect.host) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => {
            port.filter(|p| scheme == original_scheme || *p != default_port(&original_scheme))
        }
    };
    let path = match &r.redirect.path {
        None => req.uri().path().to_string(),
        Some(change) => change.apply(req.uri().path(), &r.matched),
    };
    let query = match req.uri().query() {
        Some(q) if !r.redirect.strip_query => format!("?{q}"),
        _ => String::new(),
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouteAnswers;

impl Around for RouteAnswers {
    fn around<S>(&self, req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Some(answering) = req.extensions().get::<Answering>() else {
            return pass(inner, req);
        };
        let r = match &answering.answer {
            Answer::Direct(d) => {
                let mut resp = Response::new(text_body(d.body.clone()));
                *resp.status_mut() = d.status;
                if !d.body.is_empty() {
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain"),
                    );
                }
                return own(std::future::ready(Ok(resp)));
            }
            Answer::Redirect(redirect) => Redirecting {
                redirect: redirect.clone(),
                matched: answering.matched.clone(),
            },
        };
        let r = &r;
        let to = location(&req, r);
        let status = r.redirect.status;
        let mut resp = Response::new(text_body(""));
        *resp.status_mut() = status;
        match HeaderValue::from_str(&to) {
            Ok(v) => {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
        }
        own(std::future::ready(Ok(resp)))
    }
}
