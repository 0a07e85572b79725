//! The data path: outbound (app → mesh) and inbound (mesh → app) HTTP/1.1 handlers.
//!
//! Outbound routes by authority through the xDS route table, picks a weighted backend cluster
//! and a round-robin endpoint, and connects to the endpoint's sidecar. Inbound forwards to the
//! local app. Each side continues the W3C trace (a client span outbound, a server span inbound)
//! and counts the request with Istio's labels when the response body has been sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::routing::Endpoint;
use crate::server::Body;
use crate::telemetry::{AttrValue, Reporter, RequestLabels, Sizes, SpanRecord};
use crate::trace::SpanContext;
use crate::xds::ConfigRx;

/// Headers one sidecar passes to the next (Istio does the same with its peer metadata
/// exchange); the inbound side strips them before the app sees the request.
pub mod peer_headers {
    pub const WORKLOAD: &str = "x-lumen-peer-workload";
    pub const NAMESPACE: &str = "x-lumen-peer-namespace";
    pub const APP: &str = "x-lumen-peer-app";
    pub const VERSION: &str = "x-lumen-peer-version";
    /// The service the client addressed (FQDN), for the server's `destination_service`.
    pub const DESTINATION_SERVICE: &str = "x-lumen-destination-service";
    /// The app address the client meant (what iptables' original destination would say).
    pub const ORIGINAL_DST: &str = "x-lumen-original-dst";
    pub const ALL: [&str; 6] = [
        WORKLOAD,
        NAMESPACE,
        APP,
        VERSION,
        DESTINATION_SERVICE,
        ORIGINAL_DST,
    ];
}

/// Span attributes of Lumen's own (the caller's identity on a server span).
pub mod span_attributes {
    pub const SOURCE_WORKLOAD: &str = "lumen.source.workload";
    pub const SOURCE_VERSION: &str = "lumen.source.version";
    pub const SOURCE_NAMESPACE: &str = "lumen.source.namespace";
    /// Why the proxy answered itself (a local reply), in words.
    pub const REASON: &str = "lumen.reason";
    /// The xDS version of the configuration that handled the request: the route
    /// configuration's (RDS) outbound, the clusters' (CDS) inbound.
    pub const CONFIG_VERSION: &str = "lumen.config.version";
}

const TRACEPARENT: &str = "traceparent";
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(15);
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];

/// State shared by every request of one proxy.
#[derive(Debug)]
pub struct DataPath {
    pub config: ConfigRx,
    pub reporter: Arc<Reporter>,
    client: Client<HttpConnector, Counted<Incoming, Arc<AtomicU64>>>,
}

/// Envoy's response flags for the failures the proxy itself causes or sees.
mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    pub const NO_CLUSTER: &str = "NC";
    pub const NONE: &str = "-";
}

/// Everything to record once the response is done; recorded on drop so a response the
/// client abandons is still counted.
struct Finish {
    reporter: Arc<Reporter>,
    labels: RequestLabels,
    /// Taken (not cloned) when the request is recorded.
    span: Option<SpanRecord>,
    started: Instant,
    /// Request body bytes sent upstream (counted by [`Counted`]).
    request_bytes: Arc<AtomicU64>,
    /// Response body bytes sent back.
    response_bytes: u64,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let sizes = Sizes {
            request: self.request_bytes.load(Ordering::Relaxed),
            response: self.response_bytes,
        };
        self.reporter
            .request(std::mem::take(&mut self.labels), elapsed, sizes);
        if let Some(mut span) = self.span.take() {
            span.end = span.start + elapsed;
            for (key, n) in [
                ("http.request.body.size", sizes.request),
                ("http.response.body.size", sizes.response),
            ] {
                span.attributes
                    .push((key, AttrValue::Int(i64::try_from(n).unwrap_or(i64::MAX))));
            }
            self.reporter.span(span);
        }
    }
}

/// Where a counted body adds the bytes it passes: a shared counter (the request body, sent
/// by the client's task), or the request's [`Finish`] itself (the response body, which also
/// records the request when it is finished with).
trait CountInto: Unpin {
    fn add(&mut self, bytes: u64);
}

impl CountInto for Arc<AtomicU64> {
    fn add(&mut self, bytes: u64) {
        self.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl CountInto for Finish {
    fn add(&mut self, bytes: u64) {
        self.response_bytes += bytes;
    }
}

/// A body that counts the data bytes it passes into `count`.
struct Counted<B, C> {
    inner: B,
    count: C,
}

impl<B, C> hyper::body::Body for Counted<B, C>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    C: CountInto,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.add(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A small text body.
pub fn text_body(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

impl DataPath {
    pub fn new(config: ConfigRx, reporter: Arc<Reporter>) -> DataPath {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        DataPath {
            config,
            reporter,
            client,
        }
    }

    /// Handles a request the local app sent to the outbound listener.
    pub async fn outbound(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let start = SystemTime::now();
        let authority = authority_of(&req);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let parent = incoming_parent(&req);
        let ctx = parent.map_or_else(SpanContext::new_root, |p| p.child());
        let me = self.reporter.identity();
        let mut labels = RequestLabels {
            reporter: "source",
            source_workload: me.workload.clone(),
            source_workload_namespace: me.namespace.clone(),
            source_app: me.app.clone(),
            source_version: me.version.clone(),
            request_protocol: "http",
            destination_service: host_only(&authority).to_string(),
            destination_service_name: "unknown".to_string(),
            destination_service_namespace: "unknown".to_string(),
            destination_workload: "unknown".to_string(),
            destination_workload_namespace: "unknown".to_string(),
            destination_app: "unknown".to_string(),
            destination_version: "unknown".to_string(),
            ..Default::default()
        };
        let mut span = SpanRecord {
            context: ctx,
            parent,
            name: format!("{authority}/*"),
            kind: SpanKind::Client,
            start,
            end: start,
            error: false,
            attributes: request_attributes(&req, &path, &authority),
        };
        let config = self.config.borrow().clone();
        push_config_version(&mut span, &config, "RDS");
        let decision = match config.route(&authority, &path, req.headers(), rand::random()) {
            Ok(d) => d,
            Err(e) => {
                let flag = match e {
                    crate::routing::RouteError::NoRoute { .. } => flags::NO_ROUTE,
                    crate::routing::RouteError::NoCluster { .. } => flags::NO_CLUSTER,
                };
                let known = config.known_hosts();
                let body = format!(
                    "lumen-proxy: {e}; this proxy knows {} service host(s): {}\n",
                    known.len(),
                    known.join(", ")
                );
                let status = if flag == flags::NO_ROUTE {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return self.local_reply(status, flag, body, labels, span, started);
            }
        };
        let vhost = decision
            .route_config
            .virtual_host(decision.virtual_host)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let service = host_only(&vhost).to_string();
        labels.destination_service = service.clone();
        if let Some((name, rest)) = service.split_once('.') {
            labels.destination_service_name = name.to_string();
            labels.destination_service_namespace =
                rest.split('.').next().unwrap_or_default().to_string();
        }
        span.name = format!("{vhost}/*");
        span.attributes.push((
            "upstream_cluster",
            AttrValue::Str(decision.cluster.name.clone()),
        ));
        let Some(endpoint) = decision.cluster.pick().cloned() else {
            let body = format!(
                "lumen-proxy: no healthy upstream in cluster {}\n",
                decision.cluster.name
            );
            return self.local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                flags::NO_HEALTHY_UPSTREAM,
                body,
                labels,
                span,
                started,
            );
        };
        labels.destination_workload = endpoint.workload.clone();
        labels.destination_workload_namespace = endpoint.namespace.clone();
        labels.destination_app = endpoint.app.clone();
        labels.destination_version = endpoint.version.clone();
        span.attributes
            .push(("peer.service", AttrValue::Str(endpoint.app.clone())));
        span.attributes.push((
            "network.peer.address",
            AttrValue::Str(endpoint.connect_addr.ip().to_string()),
        ));
        span.attributes.push((
            "network.peer.port",
            AttrValue::Int(i64::from(endpoint.connect_addr.port())),
        ));

        let mut upstream = req;
        strip_hop_by_hop(upstream.headers_mut());
        let headers = upstream.headers_mut();
        set_header(headers, TRACEPARENT, &ctx.traceparent());
        if endpoint.meshed {
            set_header(headers, peer_headers::WORKLOAD, &me.workload);
            set_header(headers, peer_headers::NAMESPACE, &me.namespace);
            set_header(headers, peer_headers::APP, &me.app);
            set_header(headers, peer_headers::VERSION, &me.version);
            set_header(headers, peer_headers::DESTINATION_SERVICE, &service);
            set_header(
                headers,
                peer_headers::ORIGINAL_DST,
                &endpoint.app_addr.to_string(),
            );
        }
        self.forward(upstream, &endpoint, labels, span, started)
            .await
    }

    /// Handles a request that arrived at the inbound listener for the local app.
    pub async fn inbound(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let start = SystemTime::now();
        let authority = authority_of(&req);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let parent = incoming_parent(&req);
        let ctx = parent.map_or_else(SpanContext::new_root, |p| p.child());
        let me = self.reporter.identity();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let unknown = || "unknown".to_string();
        let service = header(peer_headers::DESTINATION_SERVICE)
            .unwrap_or_else(|| host_only(&authority).to_string());
        let original_dst: Option<SocketAddr> =
            header(peer_headers::ORIGINAL_DST).and_then(|v| v.parse().ok());
        let labels = RequestLabels {
            reporter: "destination",
            source_workload: header(peer_headers::WORKLOAD).unwrap_or_else(unknown),
            source_workload_namespace: header(peer_headers::NAMESPACE).unwrap_or_else(unknown),
            source_app: header(peer_headers::APP).unwrap_or_else(unknown),
            source_version: header(peer_headers::VERSION).unwrap_or_else(unknown),
            destination_workload: me.workload.clone(),
            destination_workload_namespace: me.namespace.clone(),
            destination_app: me.app.clone(),
            destination_version: me.version.clone(),
            destination_service: service.clone(),
            destination_service_name: service.split('.').next().unwrap_or_default().to_string(),
            destination_service_namespace: service
                .split('.')
                .nth(1)
                .unwrap_or(&me.namespace)
                .to_string(),
            request_protocol: "http",
            ..Default::default()
        };
        let config = self.config.borrow().clone();
        let cluster = config.inbound_cluster(original_dst.map(|a| a.port()));
        let port = cluster
            .as_ref()
            .and_then(|c| lumen_api::cluster_name::parse_inbound(&c.name))
            .map_or_else(String::new, |p| format!(":{p}"));
        let mut span = SpanRecord {
            context: ctx,
            parent,
            name: format!("{service}{port}/*"),
            kind: SpanKind::Server,
            start,
            end: start,
            error: false,
            attributes: {
                // The caller, as its sidecar told: edges of the service graph are counted
                // here, on the server side, which also knows its own version.
                // A caller outside the mesh (no sidecar said who it is) makes no edge.
                let mut a = request_attributes(&req, &path, &authority);
                if header(peer_headers::APP).is_some() {
                    a.push(("peer.service", AttrValue::Str(labels.source_app.clone())));
                    a.push((
                        span_attributes::SOURCE_WORKLOAD,
                        AttrValue::Str(labels.source_workload.clone()),
                    ));
                    a.push((
                        span_attributes::SOURCE_VERSION,
                        AttrValue::Str(labels.source_version.clone()),
                    ));
                    a.push((
                        span_attributes::SOURCE_NAMESPACE,
                        AttrValue::Str(labels.source_workload_namespace.clone()),
                    ));
                }
                a
            },
        };
        push_config_version(&mut span, &config, "CDS");
        let Some(endpoint) = cluster.as_ref().and_then(|c| c.pick().cloned()) else {
            let body = "lumen-proxy: no inbound cluster for the local app (has the control plane sent its configuration?)\n";
            return self.local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                flags::NO_CLUSTER,
                body.to_string(),
                labels,
                span,
                started,
            );
        };
        let mut upstream = req;
        strip_hop_by_hop(upstream.headers_mut());
        let headers = upstream.headers_mut();
        for name in peer_headers::ALL {
            headers.remove(name);
        }
        set_header(headers, TRACEPARENT, &ctx.traceparent());
        self.forward(upstream, &endpoint, labels, span, started)
            .await
    }

    /// Sends the request to `endpoint.connect_addr` and wraps the response for recording.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        endpoint: &Endpoint,
        mut labels: RequestLabels,
        mut span: SpanRecord,
        started: Instant,
    ) -> Response<Body> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match Uri::builder()
            .scheme("http")
            .authority(endpoint.connect_addr.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                let body = format!("lumen-proxy: bad request path: {e}\n");
                return self.local_reply(
                    StatusCode::BAD_REQUEST,
                    flags::NONE,
                    body,
                    labels,
                    span,
                    started,
                );
            }
        }
        let request_bytes = Arc::new(AtomicU64::new(0));
        let req = req.map(|inner| Counted {
            inner,
            count: request_bytes.clone(),
        });
        match tokio::time::timeout(UPSTREAM_TIMEOUT, self.client.request(req)).await {
            Err(_) => {
                let body = format!(
                    "lumen-proxy: upstream {} did not answer within {UPSTREAM_TIMEOUT:?}\n",
                    endpoint.connect_addr
                );
                self.local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    flags::UPSTREAM_TIMEOUT,
                    body,
                    labels,
                    span,
                    started,
                )
            }
            Ok(Err(e)) => {
                let body = format!(
                    "lumen-proxy: upstream connect error or disconnect to {}: {e}\n",
                    endpoint.connect_addr
                );
                self.local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    flags::UPSTREAM_CONNECT_FAILURE,
                    body,
                    labels,
                    span,
                    started,
                )
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                labels.response_code = status.as_u16();
                labels.response_flags = flags::NONE.to_string();
                span.error = is_error(span.kind, status);
                span.attributes.push((
                    "http.response.status_code",
                    AttrValue::Int(i64::from(status.as_u16())),
                ));
                span.attributes
                    .push(("response_flags", AttrValue::Str(flags::NONE.to_string())));
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let finish = Finish {
                    reporter: self.reporter.clone(),
                    labels,
                    span: Some(span),
                    started,
                    request_bytes,
                    response_bytes: 0,
                };
                Response::from_parts(
                    parts,
                    Counted {
                        inner: body,
                        count: finish,
                    }
                    .boxed(),
                )
            }
        }
    }

    /// A response the proxy makes itself, with Envoy's response flag in `x-lumen-response-flags`.
    fn local_reply(
        &self,
        status: StatusCode,
        flag: &str,
        body: String,
        mut labels: RequestLabels,
        mut span: SpanRecord,
        started: Instant,
    ) -> Response<Body> {
        labels.response_code = status.as_u16();
        labels.response_flags = flag.to_string();
        span.error = is_error(span.kind, status);
        span.attributes.push((
            "http.response.status_code",
            AttrValue::Int(i64::from(status.as_u16())),
        ));
        span.attributes
            .push(("response_flags", AttrValue::Str(flag.to_string())));
        let reason = body.trim_end().trim_start_matches("lumen-proxy: ");
        span.attributes
            .push((span_attributes::REASON, AttrValue::Str(reason.to_string())));
        let finish = Finish {
            reporter: self.reporter.clone(),
            labels,
            span: Some(span),
            started,
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: body.len() as u64,
        };
        drop(finish);
        let mut resp = Response::new(text_body(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        set_header(headers, "x-lumen-response-flags", flag);
        resp
    }
}

/// Records which configuration version (of xDS type `ty`) handled the request.
fn push_config_version(span: &mut SpanRecord, config: &crate::routing::MeshConfig, ty: &str) {
    if let Some(v) = config.versions.get(ty) {
        span.attributes
            .push((span_attributes::CONFIG_VERSION, AttrValue::Str(v.clone())));
    }
}

/// OpenTelemetry HTTP conventions: 4xx is an error for clients, only 5xx for servers.
fn is_error(kind: SpanKind, status: StatusCode) -> bool {
    status.is_server_error() || (kind == SpanKind::Client && status.is_client_error())
}

/// The request attributes both sides put on their span (OpenTelemetry HTTP conventions).
fn request_attributes(
    req: &Request<Incoming>,
    path: &str,
    authority: &str,
) -> Vec<(&'static str, AttrValue)> {
    vec![
        (
            "http.request.method",
            AttrValue::Str(req.method().to_string()),
        ),
        (
            "url.path",
            AttrValue::Str(path.split('?').next().unwrap_or("/").to_string()),
        ),
        (
            "server.address",
            AttrValue::Str(host_only(authority).to_string()),
        ),
    ]
}

fn authority_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

fn incoming_parent(req: &Request<Incoming>) -> Option<SpanContext> {
    req.headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(SpanContext::parse_traceparent)
}

/// `host` of `host:port` (IPv6 literals in brackets kept whole).
pub fn host_only(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &h[1..]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn set_header(headers: &mut http::HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_only_handles_ports_and_ipv6() {
        assert_eq!(host_only("reviews:9080"), "reviews");
        assert_eq!(host_only("reviews"), "reviews");
        assert_eq!(host_only("[::1]:80"), "::1");
    }

    #[test]
    fn client_and_server_error_rules() {
        assert!(is_error(SpanKind::Client, StatusCode::NOT_FOUND));
        assert!(!is_error(SpanKind::Server, StatusCode::NOT_FOUND));
        assert!(is_error(
            SpanKind::Server,
            StatusCode::INTERNAL_SERVER_ERROR
        ));
    }
}
