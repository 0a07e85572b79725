//! Request telemetry: one span and one metrics sample per request, whatever happens to it.
//! The layer starts the record (Istio's labels with this proxy's side filled in, the span
//! with the request's HTTP attributes) and puts an [`Observation`] in the request's
//! extensions; the layers inside fill in what they learn (the trace context, the route, the
//! endpoint, the caller). When the response body is done (or dropped), or when an inner layer
//! fails, the record is finished with the status, the response flag, the sizes and, for a
//! failure, the reason.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use super::error::{ProxyError, flags};
use crate::http::{host_only, span_attributes};
use crate::server::Body;
use crate::telemetry::{AttrValue, Label, Reporter, RequestLabels, Sizes, SpanRecord, unknown};
use crate::trace::SpanContext;

/// Which side of the pod a stack serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The local app calling out (a client span, `reporter="source"`).
    Outbound,
    /// A caller reaching the local app (a server span, `reporter="destination"`).
    Inbound,
}

/// What one request's record holds while it is being served.
#[derive(Debug)]
pub struct Observed {
    pub labels: RequestLabels,
    pub span: SpanRecord,
    /// Whether the proxy records spans at all (it exports them, and samples some): when it
    /// does not, a request's span is never filled in.
    pub records_span: bool,
}

impl Observed {
    /// Whether this request's span will be recorded: spans are, and its trace is sampled
    /// (known once the trace context layer has run). Layers fill the span in only then, so
    /// an unsampled request costs no attribute.
    pub fn keeps_span(&self) -> bool {
        self.records_span && self.span.context.sampled
    }
}

/// The request's record, shared by the layers that fill it in (in the request's extensions).
#[derive(Debug, Clone)]
pub struct Observation {
    record: Arc<Mutex<Option<Observed>>>,
    /// Request body bytes sent upstream (counted by the connector).
    pub request_bytes: Arc<AtomicU64>,
}

impl Observation {
    /// Changes the record (nothing once it is finished).
    pub fn update(&self, f: impl FnOnce(&mut Observed)) {
        if let Ok(mut guard) = self.record.lock()
            && let Some(o) = guard.as_mut()
        {
            f(o);
        }
    }

    /// Adds a response flag to the record, after any an earlier layer set (Envoy joins
    /// several with commas: "DI,URX").
    pub fn add_flag(&self, f: &str) {
        self.update(|o| {
            let flags = &mut o.labels.response_flags;
            if flags.is_empty() || &**flags == super::error::flags::NONE {
                *flags = flag_label(f);
            } else {
                *flags = Arc::from(format!("{flags},{f}"));
            }
        });
    }

    fn take(&self) -> Option<Observed> {
        self.record.lock().ok().and_then(|mut g| g.take())
    }

    /// A record for a layer tested on its own: a request whose span is recorded (sampled,
    /// as the trace context layer would have decided).
    pub fn for_test(direction: Direction) -> Observation {
        let start = SystemTime::now();
        Observation {
            record: Arc::new(Mutex::new(Some(Observed {
                records_span: true,
                labels: RequestLabels::default(),
                span: SpanRecord {
                    context: SpanContext {
                        sampled: true,
                        ..UNSET
                    },
                    parent: None,
                    name: String::new(),
                    kind: kind_of(direction),
                    start,
                    end: start,
                    error: false,
                    attributes: Vec::new(),
                },
            }))),
            request_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The record as it stands (for tests).
    pub fn snapshot(&self) -> Option<(RequestLabels, Vec<(&'static str, AttrValue)>)> {
        self.record.lock().ok().and_then(|g| {
            g.as_ref()
                .map(|o| (o.labels.clone(), o.span.attributes.clone()))
        })
    }
}

/// Sets a span attribute, replacing the one of that key a layer set before (a retried request
/// passes the same layers again).
pub fn set_attribute(
    attributes: &mut Vec<(&'static str, AttrValue)>,
    key: &'static str,
    value: AttrValue,
) {
    match attributes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => attributes.push((key, value)),
    }
}

/// The span context before the trace layer sets it.
const UNSET: SpanContext = SpanContext {
    trace_id: [0; 16],
    span_id: [0; 8],
    sampled: false,
};

fn kind_of(direction: Direction) -> SpanKind {
    match direction {
        Direction::Outbound => SpanKind::Client,
        Direction::Inbound => SpanKind::Server,
    }
}

/// OpenTelemetry HTTP conventions: 4xx is an error for clients, only 5xx for servers.
pub fn is_error(kind: SpanKind, status: StatusCode) -> bool {
    status.is_server_error() || (kind == SpanKind::Client && status.is_client_error())
}

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    reporter: Arc<Reporter>,
    direction: Direction,
}

impl ObserveLayer {
    pub fn new(reporter: Arc<Reporter>, direction: Direction) -> ObserveLayer {
        ObserveLayer {
            reporter,
            direction,
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            reporter: self.reporter.clone(),
            direction: self.direction,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    reporter: Arc<Reporter>,
    direction: Direction,
}

/// Attributes a request's span gets room for at once: the layers add their own (route,
/// cluster, endpoint, config version, status, flags), about a dozen in all.
const SPAN_ATTRIBUTES: usize = 16;

/// A flag an inner layer set on the way (DI) stays, joined with a later one as Envoy writes
/// several ("DI,FI").
fn join_flags(set: &Label, flag: &str) -> Label {
    match (&**set, flag) {
        ("" | "-", f) => flag_label(f),
        (_, flags::NONE) => set.clone(),
        (set, f) => Arc::from(format!("{set},{f}")),
    }
}

/// A response flag as a label value: the common "-" shared, any other made.
fn flag_label(f: &str) -> Label {
    static NONE: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Arc::from(flags::NONE));
    if f == flags::NONE {
        NONE.clone()
    } else {
        Arc::from(f)
    }
}

/// The `Host` (or the URI's authority).
pub fn authority_of<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

impl<S> Observe<S> {
    fn start<B>(&self, req: &Request<B>) -> Observed {
        let start = SystemTime::now();
        let authority = authority_of(req);
        let path = req.uri().path();
        let me = self.reporter.me();
        let service: Label = Arc::from(host_only(authority));
        let labels = match self.direction {
            Direction::Outbound => RequestLabels {
                reporter: "source",
                source_workload: me.workload.clone(),
                source_workload_namespace: me.namespace.clone(),
                source_app: me.app.clone(),
                source_version: me.version.clone(),
                request_protocol: "http",
                destination_service: service,
                destination_service_name: unknown(),
                destination_service_namespace: unknown(),
                destination_workload: unknown(),
                destination_workload_namespace: unknown(),
                destination_app: unknown(),
                destination_version: unknown(),
                ..Default::default()
            },
            Direction::Inbound => RequestLabels {
                reporter: "destination",
                source_workload: unknown(),
                source_workload_namespace: unknown(),
                source_app: unknown(),
                source_version: unknown(),
                destination_workload: me.workload.clone(),
                destination_workload_namespace: me.namespace.clone(),
                destination_app: me.app.clone(),
                destination_version: me.version.clone(),
                destination_service: service,
                destination_service_name: unknown(),
                destination_service_namespace: me.namespace.clone(),
                request_protocol: "http",
                ..Default::default()
            },
        };
        let records_span = self.reporter.records_spans();
        let mut span = SpanRecord {
            context: UNSET,
            parent: None,
            name: String::new(),
            kind: kind_of(self.direction),
            start,
            end: start,
            error: false,
            attributes: Vec::new(),
        };
        if records_span {
            span.name = format!("{authority}/*");
            span.attributes.reserve(SPAN_ATTRIBUTES);
            span.attributes.extend([
                (
                    "http.request.method",
                    AttrValue::Str(req.method().to_string()),
                ),
                ("url.path", AttrValue::Str(path.to_string())),
                (
                    "server.address",
                    AttrValue::Str(host_only(authority).to_string()),
                ),
            ]);
        }
        let mut o = Observed {
            labels,
            span,
            records_span,
        };
        // gRPC: Istio's request_protocol, and the RPC's conventions on the span.
        let grpc = is_grpc(req);
        if grpc {
            o.labels.request_protocol = "grpc";
        }
        if grpc && records_span {
            o.span
                .attributes
                .push(("rpc.system", AttrValue::Str("grpc".into())));
            let mut parts = path.trim_start_matches('/').splitn(2, '/');
            if let (Some(service), Some(method)) = (parts.next(), parts.next()) {
                o.span
                    .attributes
                    .push(("rpc.service", AttrValue::Str(service.to_string())));
                o.span
                    .attributes
                    .push(("rpc.method", AttrValue::Str(method.to_string())));
            }
        }
        o
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc[+proto|...]`).
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The status codes that make a gRPC server span an error (OpenTelemetry's RPC conventions);
/// for a client every non-OK status is.
fn grpc_server_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

impl<S> tower::Service<Request<Body>> for Observe<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // Telemetry off: nothing to record, nothing to fill in.
        if !self.reporter.records() {
            return Box::pin(self.inner.call(req));
        }
        let started = Instant::now();
        let observation = Observation {
            record: Arc::new(Mutex::new(Some(self.start(&req)))),
            request_bytes: Arc::new(AtomicU64::new(0)),
        };
        req.extensions_mut().insert(observation.clone());
        let fut = self.inner.call(req);
        let reporter = self.reporter.clone();
        Box::pin(async move {
            // Dropped before the response head when the client goes away: recorded as
            // Envoy records it, response code 0 and flag DC.
            let abandoned = Abandoned {
                held: Some((observation, reporter)),
                started,
            };
            let result = fut.await;
            let (observation, reporter) = abandoned.disarm();
            let Some(observed) = observation.take() else {
                return result;
            };
            let keep = observed.keeps_span();
            let Observed {
                mut labels,
                mut span,
                ..
            } = observed;
            let (status, flag) = match &result {
                Ok(resp) => (resp.status(), flags::NONE),
                Err(e) => (e.status, e.flag),
            };
            labels.response_code = status.as_u16();
            let joined = join_flags(&labels.response_flags, flag);
            labels.response_flags = joined.clone();
            let flag = &*joined;
            if keep {
                span.error = is_error(span.kind, status);
                span.attributes.push((
                    "http.response.status_code",
                    AttrValue::Int(i64::from(status.as_u16())),
                ));
                span.attributes
                    .push(("response_flags", AttrValue::Str(flag.to_string())));
            }
            let grpc = labels.request_protocol == "grpc";
            let mut finish = Finish {
                reporter,
                labels,
                // Not kept: the span is neither filled in nor queued.
                span: keep.then_some(span),
                started,
                request_bytes: observation.request_bytes,
                response_bytes: 0,
                grpc,
            };
            match result {
                Ok(resp) => Ok({
                    // A trailers-only gRPC response carries its status in the headers.
                    if grpc {
                        finish.grpc_status(resp.headers());
                    }
                    resp
                }
                .map(|inner| Counted::new(inner, finish).boxed())),
                Err(e) => {
                    // The local reply: its body is what the client gets.
                    finish.response_bytes = e.body().len() as u64;
                    if let Some(span) = finish.span.as_mut() {
                        span.attributes
                            .push((span_attributes::REASON, AttrValue::Str(e.reason.clone())));
                    }
                    drop(finish);
                    Err(e)
                }
            }
        })
    }
}

/// A request in flight: if its future is dropped before the response head (the client
/// closed the connection), it is recorded on drop with response code 0 and flag DC
/// (downstream connection termination), as Envoy records it.
struct Abandoned {
    /// The request's observation and the reporter; taken back by `disarm`.
    held: Option<(Observation, Arc<Reporter>)>,
    started: Instant,
}

impl Abandoned {
    /// The response head came (or the failure): the caller records the request.
    fn disarm(mut self) -> (Observation, Arc<Reporter>) {
        self.held
            .take()
            .unwrap_or_else(|| unreachable!("disarmed once, by the call that armed it"))
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some((observation, reporter)) = self.held.take() else {
            return;
        };
        let Some(observed) = observation.take() else {
            return;
        };
        let keep = observed.keeps_span();
        let Observed {
            mut labels,
            mut span,
            ..
        } = observed;
        labels.response_code = 0;
        labels.response_flags = join_flags(
            &labels.response_flags,
            flags::DOWNSTREAM_CONNECTION_TERMINATION,
        );
        if keep {
            span.error = true;
            span.attributes.push((
                "response_flags",
                AttrValue::Str(labels.response_flags.to_string()),
            ));
            span.attributes.push((
                span_attributes::REASON,
                AttrValue::Str("the client closed the connection before the response".into()),
            ));
        }
        drop(Finish {
            reporter,
            grpc: labels.request_protocol == "grpc",
            labels,
            span: keep.then_some(span),
            started: self.started,
            request_bytes: observation.request_bytes,
            response_bytes: 0,
        });
    }
}

/// Everything to record once the response is done; recorded on drop so a response the
/// client abandons is still counted.
struct Finish {
    reporter: Arc<Reporter>,
    labels: RequestLabels,
    /// Taken (not cloned) when the request is recorded.
    span: Option<SpanRecord>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    /// Response body bytes sent back.
    response_bytes: u64,
    /// A gRPC call: its status comes in the trailers (or a trailers-only response's head).
    grpc: bool,
}

impl Finish {
    /// A response that ended before its end: its flags become `flags` (label and span),
    /// and the span says why (and is an error, if `error`).
    fn cut_off(&mut self, flags: Label, error: bool, reason: String) {
        self.labels.response_flags = flags;
        if let Some(span) = self.span.as_mut() {
            span.error |= error;
            let flags = self.labels.response_flags.to_string();
            for (k, v) in span.attributes.iter_mut() {
                if *k == "response_flags" {
                    *v = AttrValue::Str(flags.clone());
                }
            }
            span.attributes
                .push((span_attributes::REASON, AttrValue::Str(reason)));
        }
    }

    /// Records `grpc-status` when `headers` carry it.
    fn grpc_status(&mut self, headers: &http::HeaderMap) {
        let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
        else {
            return;
        };
        self.labels.grpc_response_status = Arc::from(code.to_string());
        if let Some(span) = self.span.as_mut() {
            span.attributes
                .push(("rpc.grpc.status_code", AttrValue::Int(code)));
            let failed = match span.kind {
                SpanKind::Server => grpc_server_error(code),
                _ => code != 0,
            };
            span.error |= failed;
        }
    }
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
pub trait CountInto: Unpin {
    fn add(&mut self, bytes: u64);

    /// The body's trailers went by.
    fn trailers(&mut self, _trailers: &http::HeaderMap) {}

    /// The body failed: the upstream reset or broke off the response.
    fn failed(&mut self, _error: &hyper::Error) {}

    /// The body was dropped before its end and without failing: whoever read it stopped
    /// (for a response, the client went away mid-body).
    fn abandoned(&mut self) {}
}

/// One attempt's request body bytes, recorded into the request's count as the most any of
/// its attempts sent: a body sent again by a retry (or copied to a mirror) counts once, as
/// Envoy counts the bytes a request came with.
pub struct AttemptBytes {
    pub request: Arc<AtomicU64>,
    pub sent: u64,
}

impl CountInto for AttemptBytes {
    fn add(&mut self, bytes: u64) {
        self.sent += bytes;
        self.request.fetch_max(self.sent, Ordering::Relaxed);
    }
}

impl CountInto for Finish {
    fn add(&mut self, bytes: u64) {
        self.response_bytes += bytes;
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.grpc {
            self.grpc_status(trailers);
        }
    }

    /// A response cut off after its head: Envoy's UR (upstream reset), an error.
    fn failed(&mut self, error: &hyper::Error) {
        let reason = format!(
            "upstream reset the response after {} body bytes: {error}",
            self.response_bytes
        );
        self.cut_off(flag_label(flags::UPSTREAM_RESET), true, reason);
    }

    /// The client went away after the response head, before its end: Envoy's DC, the
    /// upstream's status kept (Envoy's access log reads `200 DC`).
    fn abandoned(&mut self) {
        let flags = join_flags(
            &self.labels.response_flags,
            flags::DOWNSTREAM_CONNECTION_TERMINATION,
        );
        let reason = format!(
            "the client closed the connection after {} body bytes of the response",
            self.response_bytes
        );
        self.cut_off(flags, false, reason);
    }
}

/// A body that counts the data bytes it passes into `count`, and tells it when it is
/// dropped before its end.
pub struct Counted<B: hyper::body::Body, C: CountInto> {
    pub inner: B,
    pub count: C,
    /// Its end (or a failure) went by.
    ended: bool,
}

impl<B: hyper::body::Body, C: CountInto> Counted<B, C> {
    pub fn new(inner: B, count: C) -> Counted<B, C> {
        Counted {
            inner,
            count,
            ended: false,
        }
    }
}

impl<B: hyper::body::Body, C: CountInto> Drop for Counted<B, C> {
    fn drop(&mut self) {
        // An empty body (a HEAD response, a 204) ends without a frame being asked for.
        if !self.ended && !self.inner.is_end_stream() {
            self.count.abandoned();
        }
    }
}

impl<B, C> hyper::body::Body for Counted<B, C>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    C: CountInto,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.add(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref() {
                    self.count.trailers(trailers);
                }
                if self.inner.is_end_stream() {
                    self.ended = true;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                self.count.failed(e);
                self.ended = true;
            }
            Poll::Ready(None) => self.ended = true,
            Poll::Pending => {}
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
