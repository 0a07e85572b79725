//! The upstream connector, innermost: sends the request to the chosen endpoint
//! ([`Endpoint::connect_addr`]) over a pooled HTTP/1.1 client, with hop-by-hop headers
//! removed both ways (the fixed list and any header the `Connection` header names), the
//! request body counted for the record, and connect failures and timeouts as [`ProxyError`]s.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::{Fault, ProxyError, flags};
use super::observe::{Counted, Observation};
use crate::routing::Endpoint;
use crate::server::Body;

/// How long an upstream gets to answer (until the response head).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(15);

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "trailer",
    "upgrade",
    "transfer-encoding",
    "proxy-authenticate",
];

/// Removes hop-by-hop headers: those the `Connection` header lists, then the fixed ones, and
/// `TE` unless it only says `trailers` (which gRPC needs end to end, as Envoy keeps it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the message's few names finds the hop-by-hop ones present (most
    // responses carry `Connection: keep-alive`, most requests none); only those are looked
    // up again, to be removed.
    let mut present: [Option<HeaderName>; 8] = Default::default();
    let mut found = 0;
    for name in headers.keys() {
        if found < present.len() && is_hop_by_hop(name) {
            present[found] = Some(name.clone());
            found += 1;
        }
    }
    if found == 0 {
        return;
    }
    // What `Connection` names besides `close` and the fixed ones (usually nothing).
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h))
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in present.into_iter().flatten() {
        if name != http::header::TE {
            headers.remove(name);
        }
    }
    let te_trailers = headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(http::header::TE);
    }
}

/// Whether `strip_hop_by_hop` may remove a header of this name (`TE` included: it decides).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [
        CONNECTION,
        PROXY_AUTHENTICATE,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ]
    .contains(name)
        || HOP_BY_HOP.contains(&name.as_str())
}

type Upstream = Client<HttpConnector, Counted<Body, super::observe::AttemptBytes>>;

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and `Upgrade`).
fn upgrade_of(headers: &HeaderMap) -> Option<http::HeaderValue> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Joins an upgraded downstream connection to the upgraded upstream one until either ends.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    addr: std::net::SocketAddr,
) {
    match tokio::try_join!(downstream, upstream) {
        Ok((d, u)) => {
            let (mut d, mut u) = (
                hyper_util::rt::TokioIo::new(d),
                hyper_util::rt::TokioIo::new(u),
            );
            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                tracing::debug!(%addr, error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(%addr, error = %e, "upgrade did not complete"),
    }
}

/// The matched route's timeout for the upstream's answer (Envoy's `RouteAction.timeout`;
/// zero: none), overriding the connector's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTimeout(pub Duration);

/// Which protocol the chosen cluster speaks upstream (set by the layer that picked it):
/// HTTP/2 with prior knowledge when true, HTTP/1.1 otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamHttp2(pub bool);

#[derive(Debug, Clone)]
pub struct Connect {
    http1: Upstream,
    /// One multiplexed connection per upstream carries every request.
    http2: Upstream,
    timeout: Duration,
}

impl Connect {
    pub fn new() -> Connect {
        Connect::from_source(None)
    }

    /// Connections made from `source` (under capture, the inbound side reaches the app from
    /// an address the capture rules let through).
    pub fn from_source(source: Option<std::net::IpAddr>) -> Connect {
        let mut connector = HttpConnector::new();
        connector.set_local_address(source);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Connect {
            http1,
            http2,
            timeout: UPSTREAM_TIMEOUT,
        }
    }

    /// The same with another answer timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Connect {
        self.timeout = timeout;
        self
    }
}

impl Default for Connect {
    fn default() -> Self {
        Connect::new()
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl tower::Service<Request<Body>> for Connect {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let Some(endpoint) = req.extensions_mut().remove::<Endpoint>() else {
            return Box::pin(std::future::ready(Err(ProxyError::internal(
                "no endpoint chosen before connecting",
            ))));
        };
        // Held until the response (or the failure) comes: the endpoint's request in flight.
        let in_flight = req.extensions_mut().remove::<Arc<crate::lb::InFlight>>();
        let counter = req
            .extensions()
            .get::<Observation>()
            .map_or_else(|| Arc::new(AtomicU64::new(0)), |o| o.request_bytes.clone());
        // An HTTP/2 request names its authority in the URI only: keep it as the Host the
        // upstream sees (and that HTTP/1.1 needs) before the URI names the endpoint.
        if !req.headers().contains_key(http::header::HOST)
            && let Some(a) = req.uri().authority().cloned()
            && let Ok(v) = http::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match Uri::builder()
            .scheme("http")
            .authority(endpoint.connect_addr.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                return Box::pin(std::future::ready(Err(ProxyError::new(
                    flags::DOWNSTREAM_PROTOCOL_ERROR,
                    StatusCode::BAD_REQUEST,
                    Fault::Downstream,
                    format!("bad request path: {e}"),
                ))));
            }
        }
        // An upgrade (WebSocket and the like) keeps its Upgrade and Connection headers, goes
        // over HTTP/1.1, and once both sides agree (101) the two connections are joined.
        let upgrade = upgrade_of(req.headers());
        let downstream = upgrade
            .as_ref()
            .and_then(|_| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>());
        strip_hop_by_hop(req.headers_mut());
        if let Some(protocol) = &upgrade {
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            req.headers_mut()
                .insert(http::header::UPGRADE, protocol.clone());
        }
        let mut req = req.map(|inner| {
            Counted::new(
                inner,
                super::observe::AttemptBytes {
                    request: counter,
                    sent: 0,
                },
            )
        });
        let http2 =
            upgrade.is_none() && req.extensions().get::<UpstreamHttp2>().is_some_and(|h| h.0);
        let timeout = req
            .extensions()
            .get::<RouteTimeout>()
            .map_or(self.timeout, |t| t.0);
        // The client's request future owns what it needs (no clone of the client here).
        let request = if http2 {
            *req.version_mut() = http::Version::HTTP_2;
            self.http2.request(req)
        } else {
            *req.version_mut() = http::Version::HTTP_11;
            self.http1.request(req)
        };
        Box::pin(async move {
            let addr = endpoint.connect_addr;
            // A zero timeout is none, as Envoy's.
            let limit = if timeout.is_zero() {
                Duration::MAX
            } else {
                timeout
            };
            let answered = tokio::time::timeout(limit, request).await;
            drop(in_flight);
            match answered {
                Err(_) => Err(ProxyError::new(
                    flags::UPSTREAM_TIMEOUT,
                    StatusCode::GATEWAY_TIMEOUT,
                    Fault::Upstream,
                    format!("upstream {addr} did not answer within {timeout:?}"),
                )),
                Ok(Err(e)) => Err(ProxyError::new(
                    flags::UPSTREAM_CONNECT_FAILURE,
                    StatusCode::SERVICE_UNAVAILABLE,
                    Fault::Upstream,
                    format!("upstream connect error or disconnect to {addr}: {e}"),
                )),
                Ok(Ok(mut resp)) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let (Some(protocol), Some(downstream)) = (upgrade, downstream)
                    {
                        let upstream = hyper::upgrade::on(&mut resp);
                        tokio::spawn(tunnel(downstream, upstream, addr));
                        let (mut parts, body) = resp.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        parts.headers.insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("upgrade"),
                        );
                        parts.headers.insert(http::header::UPGRADE, protocol);
                        return Ok(Response::from_parts(parts, body.boxed()));
                    }
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, body.boxed()))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().expect("value"));
        h.insert("x-secret", "1".parse().expect("value"));
        h.insert("keep-alive", "timeout=5".parse().expect("value"));
        h.insert("te", "gzip".parse().expect("value"));
        h.insert("x-kept", "yes".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers", "gRPC's TE: trailers goes through");
        // Every hop-by-hop name at once, and Connection naming `close` and a fixed one.
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain(&["te", "x-kept"]) {
            h.append(*name, "1".parse().expect("value"));
        }
        h.append(
            "connection",
            "close, Upgrade, X-Gone".parse().expect("value"),
        );
        h.insert("x-gone", "1".parse().expect("value"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        // Nothing hop-by-hop: nothing changes.
        let mut h = HeaderMap::new();
        h.insert("x-kept", "yes".parse().expect("value"));
        h.insert("content-length", "3".parse().expect("value"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
