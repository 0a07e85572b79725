//! The proxy's own telemetry: one span per request on each side and Istio's standard request
//! metrics, exported over OTLP/gRPC in batches by a background task, never on the request path.
//! When the telemetry service is slow or gone, spans are dropped and counted, requests are not
//! delayed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1 as otlp_metrics;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otlp_trace;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::FastMap;
use crate::trace::SpanContext;

mod span_wire;
use span_wire::SpanBatch;

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's default buckets for `istio_request_bytes` and `istio_response_bytes`.
pub const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Metric family names (Istio's standard metrics).
pub mod names {
    pub const REQUESTS_TOTAL: &str = "istio_requests_total";
    pub const REQUEST_DURATION: &str = "istio_request_duration_milliseconds";
    pub const REQUEST_BYTES: &str = "istio_request_bytes";
    pub const RESPONSE_BYTES: &str = "istio_response_bytes";
}

/// Body bytes of one request and its response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    pub request: u64,
    pub response: u64,
}

/// Who this proxy speaks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub pod: String,
}

impl Identity {
    /// A pod's identity: its workload named as the pod (a bare pod's), its app and version
    /// labels, its namespace.
    pub fn of_pod(pod: &str, app: &str, version: &str, namespace: &str) -> Identity {
        Identity {
            workload: pod.to_string(),
            namespace: namespace.to_string(),
            app: app.to_string(),
            version: version.to_string(),
            pod: pod.to_string(),
        }
    }
}

/// One finished span, as the data path hands it over.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: SpanContext,
    pub parent: Option<SpanContext>,
    pub name: String,
    pub kind: otlp_trace::span::SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
    pub attributes: Vec<(&'static str, AttrValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// A metric label's value, shared: a request's labels are reference counts on the values
/// the proxy already holds (its identity, the endpoint's workload), not copies of them.
pub type Label = Arc<str>;

/// "unknown", what Istio's labels say where a proxy cannot tell, allocated once.
pub fn unknown() -> Label {
    static UNKNOWN: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

/// The empty value, allocated once.
pub fn empty() -> Label {
    static EMPTY: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// A proxy's identity as label values (a request's `source_*` or `destination_*` labels).
#[derive(Debug, Clone)]
pub struct IdentityLabels {
    pub workload: Label,
    pub namespace: Label,
    pub app: Label,
    pub version: Label,
}

/// Istio's standard labels for one request series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The gRPC status of a gRPC call (empty for any other request, as Istio leaves it).
    pub grpc_response_status: Label,
    pub response_flags: Label,
}

impl Default for RequestLabels {
    fn default() -> RequestLabels {
        RequestLabels {
            reporter: "",
            source_workload: empty(),
            source_workload_namespace: empty(),
            source_app: empty(),
            source_version: empty(),
            destination_workload: empty(),
            destination_workload_namespace: empty(),
            destination_app: empty(),
            destination_version: empty(),
            destination_service: empty(),
            destination_service_name: empty(),
            destination_service_namespace: empty(),
            request_protocol: "",
            response_code: 0,
            grpc_response_status: empty(),
            response_flags: empty(),
        }
    }
}

/// One histogram: per-bucket counts (the last one above every bound) and the sum.
#[derive(Debug, Clone, PartialEq)]
struct Hist {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    sum: f64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Hist {
        Hist {
            bounds,
            buckets: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i] += 1;
        self.sum += v;
    }
}

/// The request metrics of one label set.
#[derive(Debug, Clone)]
struct Series {
    /// When a request last counted here (for idle eviction).
    touched: std::time::Instant,
    count: u64,
    duration_ms: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            touched: std::time::Instant::now(),
            count: 0,
            duration_ms: Hist::new(&DURATION_BUCKETS_MS),
            request_bytes: Hist::new(&SIZE_BUCKETS),
            response_bytes: Hist::new(&SIZE_BUCKETS),
        }
    }
}

/// Istio's TCP metrics of one series.
#[derive(Debug, Clone, Copy)]
struct TcpSeries {
    /// When a connection last counted here (for idle eviction).
    touched: std::time::Instant,
    opened: u64,
    closed: u64,
    /// Bytes sent to the client (`istio_tcp_sent_bytes_total`).
    sent: u64,
    /// Bytes received from the client (`istio_tcp_received_bytes_total`).
    received: u64,
}

impl Default for TcpSeries {
    fn default() -> Self {
        TcpSeries {
            touched: std::time::Instant::now(),
            opened: 0,
            closed: 0,
            sent: 0,
            received: 0,
        }
    }
}

/// A series kept in one of the reporter's maps: evicted when idle.
trait Touched: Default {
    fn touch(&mut self);
    fn idle_for(&self) -> Duration;
}

impl Touched for Series {
    fn touch(&mut self) {
        self.touched = std::time::Instant::now();
    }
    fn idle_for(&self) -> Duration {
        self.touched.elapsed()
    }
}

impl Touched for TcpSeries {
    fn touch(&mut self) {
        self.touched = std::time::Instant::now();
    }
    fn idle_for(&self) -> Duration {
        self.touched.elapsed()
    }
}

/// A TCP family: name, help, and where a series keeps it.
type TcpFamily = (&'static str, &'static str, fn(&TcpSeries) -> u64);

/// Istio's TCP families.
const TCP_FAMILIES: [TcpFamily; 4] = [
    (
        "istio_tcp_connections_opened_total",
        "TCP connections opened.",
        |s| s.opened,
    ),
    (
        "istio_tcp_connections_closed_total",
        "TCP connections closed.",
        |s| s.closed,
    ),
    (
        "istio_tcp_sent_bytes_total",
        "Bytes sent to the client over TCP connections.",
        |s| s.sent,
    ),
    (
        "istio_tcp_received_bytes_total",
        "Bytes received from the client over TCP connections.",
        |s| s.received,
    ),
];

/// A histogram family: name, help, OTLP unit, and where a series keeps it.
type HistogramFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Series) -> &Hist,
);

/// The histogram families.
const HISTOGRAMS: [HistogramFamily; 3] = [
    (
        names::REQUEST_DURATION,
        "Request duration in milliseconds.",
        "ms",
        |s| &s.duration_ms,
    ),
    (
        names::REQUEST_BYTES,
        "Request body size in bytes.",
        "By",
        |s| &s.request_bytes,
    ),
    (
        names::RESPONSE_BYTES,
        "Response body size in bytes.",
        "By",
        |s| &s.response_bytes,
    ),
];

/// Collects spans and metrics and exports them.
#[derive(Debug)]
pub struct Reporter {
    identity: Identity,
    /// The identity's values as labels, made once.
    me: IdentityLabels,
    /// Whether spans go anywhere (an OTLP endpoint is configured).
    exports_spans: bool,
    switches: Switches,
    /// Bytes of spans in the queue, and the most it may hold.
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    limits: SeriesLimits,
    /// Requests not counted because the series map was full (new series only).
    dropped_series: AtomicU64,
    /// When the map, full, may next be swept for idle series (ms since `born`): at most one
    /// sweep a second, so a flood of new label values cannot make every request scan it.
    next_sweep_ms: AtomicU64,
    born: std::time::Instant,
    spans: mpsc::Sender<(SpanRecord, usize)>,
    /// Wakes the exporter when a batch's worth is queued ([`WAKE_AT_SPANS`]): it is not
    /// woken for each span.
    spans_ready: Arc<tokio::sync::Notify>,
    /// Opaque TCP connections by Istio's labels (`request_protocol="tcp"`).
    tcp: Mutex<FastMap<RequestLabels, TcpSeries>>,
    series: Mutex<FastMap<RequestLabels, Series>>,
    start: SystemTime,
    dropped_spans: AtomicU64,
}

/// Bounds on the metric series a proxy keeps: label values come from requests (the Host, a
/// caller's peer headers), so their number and size are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesLimits {
    /// Series kept at once; a request of a new series past it is not counted (and the drop
    /// is), after series idle for `idle` are evicted to make room.
    pub max_series: usize,
    /// A series no request has counted for this long is evicted (its counters restart if
    /// it comes back, which Prometheus and OTLP consumers read as a reset).
    pub idle: Duration,
    /// Longest label value, bytes; longer values are cut (at a character boundary).
    pub max_label_bytes: usize,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        SeriesLimits {
            max_series: 10_000,
            idle: Duration::from_secs(600),
            max_label_bytes: 128,
        }
    }
}

/// `v` cut to at most `max` bytes at a character boundary.
fn bound(v: &mut Label, max: usize) {
    if v.len() > max {
        let mut end = max;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        *v = Arc::from(&v[..end]);
    }
}

/// What the proxy records: spans for a share of new traces (a caller's sampling decision is
/// kept as it came), and the Istio metrics, each of which can be off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Switches {
    /// Share of the traces this proxy starts that it samples, 0 to 1 (Istio's `sampling`,
    /// as a fraction); 0 turns span export off.
    pub span_ratio: f64,
    /// Istio's request metrics.
    pub metrics: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            span_ratio: 1.0,
            metrics: true,
        }
    }
}

/// The receiving end of the span channel, consumed by [`Reporter::export_loop`].
#[derive(Debug)]
pub struct SpanQueue {
    rx: mpsc::Receiver<(SpanRecord, usize)>,
    bytes: Arc<AtomicUsize>,
    ready: Arc<tokio::sync::Notify>,
}

impl SpanQueue {
    /// The next queued span, if one is waiting (for tests and tools; the exporter drains
    /// the queue itself).
    pub fn try_recv(&mut self) -> Option<SpanRecord> {
        let (span, size) = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        Some(span)
    }
}

/// Queued spans that wake the exporter before its interval: a batch's worth (the default
/// `ExportOptions::max_batch`).
pub const WAKE_AT_SPANS: usize = 512;

/// Most bytes of spans waiting for the exporter, by default (besides the count bound).
pub const SPAN_QUEUE_BYTES: usize = 8 << 20;

/// Most encoded bytes of spans in one export request (a gRPC server takes 4 MiB by default).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// About how many bytes a queued span holds.
fn span_bytes(s: &SpanRecord) -> usize {
    std::mem::size_of::<SpanRecord>()
        + s.name.len()
        + s.attributes
            .iter()
            .map(|(k, v)| {
                std::mem::size_of::<(&str, AttrValue)>()
                    + k.len()
                    + match v {
                        AttrValue::Str(t) => t.len(),
                        AttrValue::Int(_) => 0,
                    }
            })
            .sum::<usize>()
}

/// How the exporter batches.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// `http://host:port` of an OTLP/gRPC receiver; `None` keeps telemetry local.
    pub endpoint: Option<String>,
    pub span_interval: Duration,
    pub metric_interval: Duration,
    pub max_batch: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            endpoint: None,
            span_interval: Duration::from_secs(1),
            metric_interval: Duration::from_secs(5),
            max_batch: 512,
        }
    }
}

impl Reporter {
    pub fn new(identity: Identity, queue_size: usize) -> (Reporter, SpanQueue) {
        Reporter::with_switches(identity, queue_size, Switches::default())
    }

    /// A reporter recording only what `switches` allow.
    pub fn with_switches(
        identity: Identity,
        queue_size: usize,
        switches: Switches,
    ) -> (Reporter, SpanQueue) {
        let (tx, rx) = mpsc::channel(queue_size);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let spans_ready = Arc::new(tokio::sync::Notify::new());
        (
            Reporter {
                me: IdentityLabels {
                    workload: Arc::from(identity.workload.as_str()),
                    namespace: Arc::from(identity.namespace.as_str()),
                    app: Arc::from(identity.app.as_str()),
                    version: Arc::from(identity.version.as_str()),
                },
                identity,
                exports_spans: true,
                switches,
                queued_bytes: queued_bytes.clone(),
                max_queued_bytes: SPAN_QUEUE_BYTES,
                limits: SeriesLimits::default(),
                dropped_series: AtomicU64::new(0),
                next_sweep_ms: AtomicU64::new(0),
                born: std::time::Instant::now(),
                spans: tx,
                spans_ready: spans_ready.clone(),
                tcp: Mutex::new(FastMap::default()),
                series: Mutex::new(FastMap::default()),
                start: SystemTime::now(),
                dropped_spans: AtomicU64::new(0),
            },
            SpanQueue {
                rx,
                bytes: queued_bytes,
                ready: spans_ready,
            },
        )
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The proxy's own workload, namespace, app and version as label values.
    pub fn me(&self) -> &IdentityLabels {
        &self.me
    }

    pub fn switches(&self) -> Switches {
        self.switches
    }

    /// The same reporter with another bound on queued span bytes (before it is shared).
    pub fn with_span_queue_bytes(mut self, max: usize) -> Reporter {
        self.max_queued_bytes = max;
        self
    }

    /// Bytes of spans waiting for the exporter.
    pub fn queued_span_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// The same reporter with other series bounds (before it is shared).
    pub fn with_series_limits(mut self, limits: SeriesLimits) -> Reporter {
        self.limits = limits;
        self
    }

    /// Series kept now.
    pub fn series_count(&self) -> usize {
        self.series.lock().map_or(0, |s| s.len())
    }

    /// Requests of new series not counted because the map was full.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series.load(Ordering::Relaxed)
    }

    /// Evicts the series idle for longer than the limit; returns how many went.
    pub fn evict_idle(&self) -> usize {
        fn sweep<V: Touched>(map: &Mutex<FastMap<RequestLabels, V>>, idle: Duration) -> usize {
            map.lock().map_or(0, |mut m| {
                let before = m.len();
                m.retain(|_, s| s.idle_for() < idle);
                before - m.len()
            })
        }
        sweep(&self.series, self.limits.idle) + sweep(&self.tcp, self.limits.idle)
    }

    /// Whether anything of a request is recorded at all.
    pub fn records(&self) -> bool {
        self.switches.metrics || self.switches.span_ratio > 0.0
    }

    /// Whether spans are recorded at all: some are sampled, and there is somewhere to send
    /// them (a proxy without an OTLP endpoint builds none; the trace context still goes on
    /// with the configured sampling, for the proxies after it).
    pub fn records_spans(&self) -> bool {
        self.exports_spans && self.switches.span_ratio > 0.0
    }

    /// Spans will not be exported (no OTLP endpoint): none are built.
    pub fn without_span_export(mut self) -> Reporter {
        self.exports_spans = false;
        self
    }

    /// Queues a span; drops it (and counts the drop) when the exporter is behind. An
    /// unsampled span is not recorded.
    pub fn span(&self, span: SpanRecord) {
        if !span.context.sampled || !self.records_spans() {
            return;
        }
        let size = span_bytes(&span);
        let queued = self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if queued + size > self.max_queued_bytes || self.spans.try_send((span, size)).is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped_spans.fetch_add(1, Ordering::Relaxed);
            self.spans_ready.notify_one();
            return;
        }
        let queued_spans = self.spans.max_capacity() - self.spans.capacity();
        if queued_spans >= WAKE_AT_SPANS || queued + size >= MAX_BATCH_BYTES {
            self.spans_ready.notify_one();
        }
    }

    /// Counts a TCP connection opened (`closed: None`) or closed with its byte counts.
    pub fn tcp(&self, labels: &RequestLabels, closed: Option<(u64, u64)>) {
        if !self.switches.metrics {
            return;
        }
        if let Ok(mut tcp) = self.tcp.lock()
            && let Some(s) = self.admit(&mut tcp, labels.clone())
        {
            match closed {
                None => s.opened += 1,
                Some((sent, received)) => {
                    s.closed += 1;
                    s.sent += sent;
                    s.received += received;
                }
            }
        }
    }

    /// The series of `labels` in `map` (their values cut to the bound), made if there is
    /// room: a full map is swept for idle series at most once a second, and a request that
    /// still finds no room is counted as dropped.
    fn admit<'m, V: Touched>(
        &self,
        map: &'m mut FastMap<RequestLabels, V>,
        mut labels: RequestLabels,
    ) -> Option<&'m mut V> {
        let max = self.limits.max_label_bytes;
        for v in [
            &mut labels.source_workload,
            &mut labels.source_workload_namespace,
            &mut labels.source_app,
            &mut labels.source_version,
            &mut labels.destination_workload,
            &mut labels.destination_workload_namespace,
            &mut labels.destination_app,
            &mut labels.destination_version,
            &mut labels.destination_service,
            &mut labels.destination_service_name,
            &mut labels.destination_service_namespace,
            &mut labels.grpc_response_status,
            &mut labels.response_flags,
        ] {
            bound(v, max);
        }
        if !map.contains_key(&labels) && map.len() >= self.limits.max_series {
            let now_ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
            if now_ms >= self.next_sweep_ms.load(Ordering::Relaxed) {
                self.next_sweep_ms.store(now_ms + 1000, Ordering::Relaxed);
                let idle = self.limits.idle;
                map.retain(|_, s| s.idle_for() < idle);
            }
            if map.len() >= self.limits.max_series {
                self.dropped_series.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let s = map.entry(labels).or_default();
        s.touch();
        Some(s)
    }

    /// Counts one finished request.
    pub fn request(&self, labels: RequestLabels, duration: Duration, sizes: Sizes) {
        if !self.switches.metrics {
            return;
        }
        let ms = duration.as_secs_f64() * 1000.0;
        if let Ok(mut series) = self.series.lock()
            && let Some(s) = self.admit(&mut series, labels)
        {
            s.count += 1;
            s.duration_ms.observe(ms);
            s.request_bytes.observe(sizes.request as f64);
            s.response_bytes.observe(sizes.response as f64);
        }
    }

    pub fn dropped_spans(&self) -> u64 {
        self.dropped_spans.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Vec<(RequestLabels, Series)> {
        let mut out: Vec<_> = self
            .series
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Prometheus text exposition (0.0.4) of the request metrics.
    pub fn prometheus_text(&self) -> String {
        let series = self.snapshot();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP {} Total requests.", names::REQUESTS_TOTAL);
        let _ = writeln!(out, "# TYPE {} counter", names::REQUESTS_TOTAL);
        for (labels, s) in &series {
            let _ = writeln!(
                out,
                "{}{{{}}} {}",
                names::REQUESTS_TOTAL,
                prom_labels(labels, None),
                s.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP lumen_proxy_metric_series Request metric series kept.\n# TYPE lumen_proxy_metric_series gauge\nlumen_proxy_metric_series {}",
            series.len()
        );
        let _ = writeln!(
            out,
            "# HELP lumen_proxy_metric_series_dropped_total Requests not counted because the series map was full.\n# TYPE lumen_proxy_metric_series_dropped_total counter\nlumen_proxy_metric_series_dropped_total {}",
            self.dropped_series()
        );
        let tcp: Vec<(RequestLabels, TcpSeries)> = self
            .tcp
            .lock()
            .map(|t| t.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        if !tcp.is_empty() {
            for (name, help, value) in TCP_FAMILIES {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (labels, s) in &tcp {
                    let _ = writeln!(out, "{name}{{{}}} {}", prom_labels(labels, None), value(s));
                }
            }
        }
        for (name, help, _, hist) in HISTOGRAMS {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (labels, s) in &series {
                let h = hist(s);
                let mut cumulative = 0;
                for (i, bound) in h.bounds.iter().enumerate() {
                    cumulative += h.buckets[i];
                    let le = format!("{bound}");
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{}}} {cumulative}",
                        prom_labels(labels, Some(&le))
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{}}} {}",
                    prom_labels(labels, Some("+Inf")),
                    s.count
                );
                let _ = writeln!(out, "{name}_sum{{{}}} {}", prom_labels(labels, None), h.sum);
                let _ = writeln!(
                    out,
                    "{name}_count{{{}}} {}",
                    prom_labels(labels, None),
                    s.count
                );
            }
        }
        out
    }

    fn resource(&self) -> Resource {
        let id = &self.identity;
        Resource {
            attributes: vec![
                kv("service.name", AttrValue::Str(id.app.clone())),
                kv("service.version", AttrValue::Str(id.version.clone())),
                kv("service.namespace", AttrValue::Str(id.namespace.clone())),
                kv("k8s.namespace.name", AttrValue::Str(id.namespace.clone())),
                kv("k8s.pod.name", AttrValue::Str(id.pod.clone())),
                kv("lumen.workload", AttrValue::Str(id.workload.clone())),
            ],
            ..Default::default()
        }
    }

    fn scope() -> InstrumentationScope {
        InstrumentationScope {
            name: "lumen-proxy".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    /// The export request as prost's messages (what `SpanBatch` writes directly).
    #[cfg(test)]
    fn trace_request(
        &self,
        spans: Vec<SpanRecord>,
    ) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans: vec![otlp_trace::ResourceSpans {
                resource: Some(self.resource()),
                scope_spans: vec![otlp_trace::ScopeSpans {
                    scope: Some(Self::scope()),
                    spans: spans.into_iter().map(to_otlp_span).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Cumulative OTLP metrics of every series seen so far.
    pub fn metrics_request(&self) -> ExportMetricsServiceRequest {
        let now = unix_nanos(SystemTime::now());
        let start = unix_nanos(self.start);
        let series = self.snapshot();
        let counts = series
            .iter()
            .map(|(labels, s)| otlp_metrics::NumberDataPoint {
                attributes: metric_attributes(labels),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(otlp_metrics::number_data_point::Value::AsInt(
                    i64::try_from(s.count).unwrap_or(i64::MAX),
                )),
                ..Default::default()
            })
            .collect();
        let cumulative = otlp_metrics::AggregationTemporality::Cumulative as i32;
        let histograms = HISTOGRAMS.map(|(name, help, unit, hist)| otlp_metrics::Metric {
            name: name.to_string(),
            description: help.to_string(),
            unit: unit.to_string(),
            data: Some(otlp_metrics::metric::Data::Histogram(
                otlp_metrics::Histogram {
                    data_points: series
                        .iter()
                        .map(|(labels, s)| {
                            let h = hist(s);
                            otlp_metrics::HistogramDataPoint {
                                attributes: metric_attributes(labels),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: s.count,
                                sum: Some(h.sum),
                                bucket_counts: h.buckets.clone(),
                                explicit_bounds: h.bounds.to_vec(),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                },
            )),
            ..Default::default()
        });
        // Istio's TCP families, as cumulative sums (only when there were TCP connections).
        let tcp: Vec<(RequestLabels, TcpSeries)> = self
            .tcp
            .lock()
            .map(|t| t.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        let tcp_metrics: Vec<otlp_metrics::Metric> = if tcp.is_empty() {
            Vec::new()
        } else {
            TCP_FAMILIES
                .iter()
                .map(|(name, help, value)| otlp_metrics::Metric {
                    name: name.to_string(),
                    description: help.to_string(),
                    unit: if name.ends_with("bytes_total") {
                        "By"
                    } else {
                        "1"
                    }
                    .to_string(),
                    data: Some(otlp_metrics::metric::Data::Sum(otlp_metrics::Sum {
                        data_points: tcp
                            .iter()
                            .map(|(labels, s)| otlp_metrics::NumberDataPoint {
                                attributes: metric_attributes(labels),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                value: Some(otlp_metrics::number_data_point::Value::AsInt(
                                    i64::try_from(value(s)).unwrap_or(i64::MAX),
                                )),
                                ..Default::default()
                            })
                            .collect(),
                        aggregation_temporality: cumulative,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                })
                .collect()
        };
        ExportMetricsServiceRequest {
            resource_metrics: vec![otlp_metrics::ResourceMetrics {
                resource: Some(self.resource()),
                scope_metrics: vec![otlp_metrics::ScopeMetrics {
                    scope: Some(Self::scope()),
                    metrics: std::iter::once(otlp_metrics::Metric {
                        name: names::REQUESTS_TOTAL.to_string(),
                        description: "Total requests.".to_string(),
                        unit: "1".to_string(),
                        data: Some(otlp_metrics::metric::Data::Sum(otlp_metrics::Sum {
                            data_points: counts,
                            aggregation_temporality: cumulative,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    })
                    .chain(histograms)
                    .chain(tcp_metrics)
                    .collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Batches queued spans and periodic metrics to the OTLP endpoint until shutdown, then
    /// flushes what is left (bounded by a short timeout).
    pub async fn export_loop(
        &self,
        mut queue: SpanQueue,
        options: ExportOptions,
        shutdown: CancellationToken,
    ) {
        let channel = options.endpoint.as_deref().and_then(|e| match tonic::transport::Endpoint::from_shared(e.to_string()) {
            Ok(ep) => Some(ep.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)).connect_lazy()),
            Err(err) => {
                tracing::error!(endpoint = e, error = %err, "invalid OTLP endpoint, telemetry stays local");
                None
            }
        });
        let mut traces = channel.clone().map(tonic::client::Grpc::new);
        let mut metrics = channel.map(MetricsServiceClient::new);
        let mut batch = SpanBatch::new(&self.resource(), &Self::scope());
        let mut span_tick = tokio::time::interval(options.span_interval);
        let mut metric_tick = tokio::time::interval(options.metric_interval);
        metric_tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                // A batch's worth queued (or a span refused for want of room).
                () = queue.ready.notified() => {
                    self.drain(&mut queue, &mut batch, &mut traces, options.max_batch, WAKE_AT_SPANS * 4).await;
                }
                _ = span_tick.tick() => {
                    self.drain(&mut queue, &mut batch, &mut traces, options.max_batch, usize::MAX).await;
                    if !batch.is_empty() {
                        self.export_spans(&mut traces, &mut batch).await;
                    }
                }
                _ = metric_tick.tick() => {
                    self.evict_idle();
                    self.export_metrics(&mut metrics).await;
                }
            }
        }
        let flush = async {
            self.drain(
                &mut queue,
                &mut batch,
                &mut traces,
                options.max_batch,
                usize::MAX,
            )
            .await;
            if !batch.is_empty() {
                self.export_spans(&mut traces, &mut batch).await;
            }
            self.export_metrics(&mut metrics).await;
        };
        if tokio::time::timeout(Duration::from_secs(3), flush)
            .await
            .is_err()
        {
            tracing::warn!("telemetry flush at shutdown timed out");
        }
    }

    /// Takes up to `most` queued spans into the batch, exporting each full batch on the way.
    async fn drain(
        &self,
        queue: &mut SpanQueue,
        batch: &mut SpanBatch,
        client: &mut Option<tonic::client::Grpc<tonic::transport::Channel>>,
        max_batch: usize,
        most: usize,
    ) {
        for _ in 0..most {
            let Some(span) = queue.try_recv() else { break };
            batch.push(&span);
            if batch.len() >= max_batch || batch.bytes() >= MAX_BATCH_BYTES {
                self.export_spans(client, batch).await;
            }
        }
    }

    /// Sends the batch's spans (the batch is empty after, sent or not).
    async fn export_spans(
        &self,
        client: &mut Option<tonic::client::Grpc<tonic::transport::Channel>>,
        batch: &mut SpanBatch,
    ) {
        let n = batch.len() as u64;
        let request = batch.take();
        let Some(client) = client else { return };
        if let Err(status) = span_wire::export(client, request).await {
            self.dropped_spans.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(spans = n, error = %status.message(), "span export failed, batch dropped");
        }
    }

    async fn export_metrics(
        &self,
        client: &mut Option<MetricsServiceClient<tonic::transport::Channel>>,
    ) {
        let Some(client) = client else { return };
        if let Err(status) = client.export(self.metrics_request()).await {
            tracing::warn!(error = %status.message(), "metric export failed");
        }
    }
}

fn kv(key: &str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
fn to_otlp_span(s: SpanRecord) -> otlp_trace::Span {
    otlp_trace::Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.context.span_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.span_id.to_vec()).unwrap_or_default(),
        flags: u32::from(s.context.sampled),
        name: s.name,
        kind: s.kind as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
        status: Some(otlp_trace::Status {
            code: if s.error {
                otlp_trace::status::StatusCode::Error as i32
            } else {
                otlp_trace::status::StatusCode::Unset as i32
            },
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// Istio's cluster name when none is configured (`--set values.global.multiCluster.clusterName`).
const CLUSTER: &str = "Kubernetes";
/// Principals are SPIFFE ids from mTLS peer certificates; without mTLS Istio says "unknown".
const NO_PRINCIPAL: &str = "unknown";

/// Every label of Istio's standard request metrics, in Istio's order. Canonical service and
/// revision are the app and version labels (Istio falls back to them when the
/// `service.istio.io/canonical-*` labels are absent); principals stay "unknown" and the
/// connection security policy "unknown" (client side) or "none" (server side) until the
/// proxies speak mTLS.
fn label_pairs<'a>(l: &'a RequestLabels, code: &'a str) -> [(&'static str, &'a str); 25] {
    let security = if l.reporter == "destination" {
        "none"
    } else {
        "unknown"
    };
    [
        ("reporter", l.reporter),
        ("source_workload", &l.source_workload),
        ("source_workload_namespace", &l.source_workload_namespace),
        ("source_principal", NO_PRINCIPAL),
        ("source_app", &l.source_app),
        ("source_version", &l.source_version),
        ("source_canonical_service", &l.source_app),
        ("source_canonical_revision", &l.source_version),
        ("source_cluster", CLUSTER),
        ("destination_workload", &l.destination_workload),
        (
            "destination_workload_namespace",
            &l.destination_workload_namespace,
        ),
        ("destination_principal", NO_PRINCIPAL),
        ("destination_app", &l.destination_app),
        ("destination_version", &l.destination_version),
        ("destination_service", &l.destination_service),
        ("destination_service_name", &l.destination_service_name),
        (
            "destination_service_namespace",
            &l.destination_service_namespace,
        ),
        ("destination_canonical_service", &l.destination_app),
        ("destination_canonical_revision", &l.destination_version),
        ("destination_cluster", CLUSTER),
        ("request_protocol", l.request_protocol),
        ("response_code", code),
        ("grpc_response_status", &l.grpc_response_status),
        ("response_flags", &l.response_flags),
        ("connection_security_policy", security),
    ]
}

fn metric_attributes(l: &RequestLabels) -> Vec<KeyValue> {
    let code = l.response_code.to_string();
    label_pairs(l, &code)
        .into_iter()
        .map(|(k, v)| kv(k, AttrValue::Str(v.to_string())))
        .collect()
}

fn prom_labels(l: &RequestLabels, le: Option<&str>) -> String {
    let mut out = String::new();
    let code = l.response_code.to_string();
    for (i, (k, v)) in label_pairs(l, &code).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    if let Some(le) = le {
        let _ = write!(out, ",le=\"{le}\"");
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: u16) -> RequestLabels {
        RequestLabels {
            reporter: "source",
            source_workload: "productpage-v1".into(),
            destination_workload: "reviews-v1".into(),
            destination_service: "reviews.default.svc.cluster.local".into(),
            request_protocol: "http",
            response_code: code,
            ..Default::default()
        }
    }

    #[test]
    fn histogram_buckets_and_counts() {
        let (r, _q) = Reporter::new(Identity::default(), 8);
        let sizes = Sizes {
            request: 0,
            response: 250,
        };
        r.request(labels(200), Duration::from_micros(300), sizes);
        r.request(labels(200), Duration::from_millis(7), sizes);
        r.request(labels(500), Duration::from_secs(2), sizes);
        let req = r.metrics_request();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let Some(otlp_metrics::metric::Data::Histogram(h)) = &metrics[1].data else {
            panic!("histogram expected");
        };
        let ok = h
            .data_points
            .iter()
            .find(|p| p.count == 2)
            .expect("200 series");
        assert_eq!(ok.bucket_counts[0], 1, "0.3 ms in the 0.5 ms bucket");
        assert_eq!(ok.bucket_counts[3], 1, "7 ms in the 10 ms bucket");
        assert_eq!(ok.bucket_counts.len(), ok.explicit_bounds.len() + 1);
        let text = r.prometheus_text();
        assert!(text.contains(
            "istio_requests_total{reporter=\"source\",source_workload=\"productpage-v1\""
        ));
        assert!(text.contains("response_code=\"500\""));
        assert!(text.contains("le=\"+Inf\"} 2"));
        // 250-byte responses, in the (100, 1000] bucket of istio_response_bytes.
        let Some(otlp_metrics::metric::Data::Histogram(h)) = &metrics[3].data else {
            panic!("response bytes histogram expected");
        };
        assert_eq!(metrics[3].name, names::RESPONSE_BYTES);
        assert_eq!(h.data_points[0].bucket_counts[3], h.data_points[0].count);
        assert!(text.contains("istio_request_bytes_bucket{"));
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (r, _q) = Reporter::new(Identity::default(), 1);
        let span = SpanRecord {
            context: SpanContext::new_root(),
            parent: None,
            name: "x".into(),
            kind: otlp_trace::span::SpanKind::Server,
            start: SystemTime::now(),
            end: SystemTime::now(),
            error: false,
            attributes: vec![],
        };
        r.span(span.clone());
        r.span(span);
        assert_eq!(r.dropped_spans(), 1);
    }

    #[test]
    fn the_span_queue_is_bounded_in_bytes_and_frees_what_the_exporter_takes() {
        let big = SpanRecord {
            context: SpanContext::new_root(),
            parent: None,
            name: "x".into(),
            kind: otlp_trace::span::SpanKind::Server,
            start: SystemTime::now(),
            end: SystemTime::now(),
            error: false,
            attributes: vec![("url.path", AttrValue::Str("p".repeat(10_000)))],
        };
        // Room for a thousand by count, for two by bytes.
        let (r, mut q) = Reporter::new(Identity::default(), 1000);
        let r = r.with_span_queue_bytes(25_000);
        for _ in 0..10 {
            r.span(big.clone());
        }
        assert_eq!(r.dropped_spans(), 8);
        assert!(r.queued_span_bytes() <= 25_000);
        assert!(q.try_recv().is_some() && q.try_recv().is_some() && q.try_recv().is_none());
        assert_eq!(r.queued_span_bytes(), 0, "taken spans free their bytes");
        r.span(big);
        assert_eq!(r.dropped_spans(), 8, "room again");
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;

    #[test]
    fn tcp_connections_are_exported_over_otlp_as_istio_families() {
        let (r, _q) = Reporter::new(Identity::default(), 4);
        let labels = RequestLabels {
            reporter: "destination",
            request_protocol: "tcp",
            response_flags: "-".into(),
            ..Default::default()
        };
        r.tcp(&labels, None);
        r.tcp(&labels, Some((120, 80)));
        let req = r.metrics_request();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let value = |name: &str| {
            metrics
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| match &m.data {
                    Some(otlp_metrics::metric::Data::Sum(s)) => s.data_points.first().cloned(),
                    _ => None,
                })
                .and_then(|p| match p.value {
                    Some(otlp_metrics::number_data_point::Value::AsInt(v)) => Some(v),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(value("istio_tcp_connections_opened_total"), 1);
        assert_eq!(value("istio_tcp_connections_closed_total"), 1);
        assert_eq!(value("istio_tcp_sent_bytes_total"), 120);
        assert_eq!(value("istio_tcp_received_bytes_total"), 80);
    }
}
