//! Mirroring, as Envoy's router does it for the route that matched (Istio's `mirror`,
//! Gateway API's `RequestMirror`): a copy of a share of requests goes to another cluster,
//! its `Host` suffixed `-shadow`, and its answer is thrown away; the request itself goes on
//! as if nothing happened. A request is mirrored only if its body is known and small enough
//! to copy ([`kept_body::MAX_KEPT_BODY`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::connect::{UPSTREAM_TIMEOUT, strip_hop_by_hop};
use super::error::ProxyError;
use super::kept_body;
use crate::routing::Cluster;
use crate::server::Body;

/// The clusters the matched route mirrors to, with their shares in parts per million (set
/// by the route layer).
#[derive(Debug, Clone)]
pub struct Mirroring(pub Vec<(Arc<Cluster>, u32)>);

#[derive(Debug, Clone)]
pub struct MirrorLayer {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for MirrorLayer {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        MirrorLayer {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl<S> tower::Layer<S> for MirrorLayer {
    type Service = MirrorService<S>;

    fn layer(&self, inner: S) -> MirrorService<S> {
        MirrorService {
            inner,
            client: self.client.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorService<S> {
    inner: S,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// `host` (or `host:port`) with `-shadow` after the host, as Envoy writes it.
pub fn shadow_host(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for MirrorService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let chosen: Vec<Arc<Cluster>> = match req.extensions().get::<Mirroring>() {
            None => Vec::new(),
            Some(m) => {
                m.0.iter()
                    .filter(|(_, share)| rand::random::<u32>() % 1_000_000 < *share)
                    .map(|(c, _)| c.clone())
                    .collect()
            }
        };
        if chosen.is_empty() || !kept_body::keepable(&req) {
            return Box::pin(self.inner.call(req));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let client = self.client.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = kept_body::keep(body, "for a mirror").await?;
            let authority = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            for cluster in chosen {
                let Some(endpoint) = cluster.pick().cloned() else {
                    continue;
                };
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let Ok(uri) =
                    format!("http://{}{path}", endpoint.connect_addr).parse::<http::Uri>()
                else {
                    continue;
                };
                let mut copy = Request::new(Full::new(body.clone()));
                *copy.method_mut() = parts.method.clone();
                *copy.uri_mut() = uri;
                *copy.headers_mut() = parts.headers.clone();
                strip_hop_by_hop(copy.headers_mut());
                if let Ok(host) = HeaderValue::from_str(&shadow_host(&authority)) {
                    copy.headers_mut().insert(http::header::HOST, host);
                }
                let client = client.clone();
                tokio::spawn(async move {
                    // Fire and forget: the answer, or its absence, changes nothing.
                    if let Ok(Ok(resp)) =
                        tokio::time::timeout(UPSTREAM_TIMEOUT, client.request(copy)).await
                    {
                        let _ = resp.into_body().collect().await;
                    }
                });
            }
            let req = Request::from_parts(parts, kept_body::replay(&body));
            tower::Service::call(&mut inner, req).await
        })
    }
}
