//! The mesh's metric families for Prometheus, aggregated across every proxy that reports.
//!
//! Each proxy exports Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, ...) over OTLP, cumulative since it started. Lumen
//! serves them from one `/metrics`, so Prometheus, Kiali and Istio's Grafana dashboards read
//! the whole mesh from one target. Series are keyed by their labels (Istio's labels already say
//! which workload reported), so the pods of one workload add up into one series.
//!
//! Counters and histograms must stay monotonic while proxies come and go, so what is added up
//! is each proxy's *increase*: the difference from the last value that proxy reported for the
//! series. A proxy that restarted (a new start time, or a value that went down) counts its new
//! value in full. A proxy that was already running when this service started is taken as a
//! baseline on its first export (its past was counted by the previous process), and counts
//! from there. Gauges add up each proxy's latest value. A series that no proxy has reported for
//! the expiry time disappears; so does a proxy's memory of it. Only families named `istio_*`
//! are kept, at most `max_series` of them in all, and what did not fit is counted.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, metric, number_data_point,
};
use prost::Message;

use crate::exposition::{Kind, Writer, render_labels, sanitize_name, write_value};

/// Families whose name starts with this are served.
pub const PREFIX: &str = "istio_";

/// Bounds on what is kept.
#[derive(Debug, Clone, Copy)]
pub struct MeshMetricsOptions {
    /// Aggregated series kept at once; points of new series past it are dropped and counted.
    pub max_series: usize,
    /// A series (and a proxy's memory of it) expires when not reported for this long.
    pub ttl: Duration,
}

impl Default for MeshMetricsOptions {
    fn default() -> Self {
        MeshMetricsOptions {
            max_series: 50_000,
            ttl: Duration::from_secs(300),
        }
    }
}

/// Why a data point was not aggregated, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A new series past `max_series`.
    SeriesCap,
    /// A type, or histogram buckets, other than the family's.
    Conflict,
    /// A summary, an exponential histogram, or a point with no value.
    Unsupported,
}

impl Dropped {
    pub const ALL: [Dropped; 3] = [Dropped::SeriesCap, Dropped::Conflict, Dropped::Unsupported];

    pub fn label(self) -> &'static str {
        match self {
            Dropped::SeriesCap => "series_cap",
            Dropped::Conflict => "conflict",
            Dropped::Unsupported => "unsupported",
        }
    }
}

/// What one export request carries for the aggregate, taken from it before it is dropped and
/// applied once its rows are durable (so a retried export is not counted twice).
#[derive(Debug, Default)]
pub struct Tapped {
    resources: Vec<TappedResource>,
    unsupported: u64,
}

impl Tapped {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.unsupported == 0
    }
}

#[derive(Debug)]
struct TappedResource {
    /// Identifies the reporting process (its resource attributes).
    source: u64,
    metrics: Vec<TappedMetric>,
}

#[derive(Debug)]
struct TappedMetric {
    name: String,
    help: String,
    kind: Kind,
    delta: bool,
    points: Vec<TappedPoint>,
}

#[derive(Debug)]
struct TappedPoint {
    labels: String,
    start: u64,
    value: Value,
}

/// A point's value: a number, or a histogram (bounds, per-bucket counts, sum).
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Number(f64),
    Histogram(Hist),
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Hist {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative), one more than `bounds`.
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

/// Takes the `istio_*` families out of an export request. Cheap when there are none.
pub fn tap(request: &ExportMetricsServiceRequest) -> Tapped {
    let mut out = Tapped::default();
    for rm in &request.resource_metrics {
        let mut metrics = Vec::new();
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                if !m.name.starts_with(PREFIX) {
                    continue;
                }
                match tap_metric(m) {
                    Ok(t) if t.points.is_empty() => {}
                    Ok(t) => metrics.push(t),
                    Err(points) => out.unsupported += points,
                }
            }
        }
        if metrics.is_empty() {
            continue;
        }
        let mut h = DefaultHasher::new();
        if let Some(r) = &rm.resource {
            r.encode_to_vec().hash(&mut h);
        }
        out.resources.push(TappedResource {
            source: h.finish(),
            metrics,
        });
    }
    out
}

/// The metric's points, or how many points it has that cannot be served.
fn tap_metric(m: &Metric) -> Result<TappedMetric, u64> {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let Some(data) = m.data.as_ref() else {
        return Err(0);
    };
    let (kind, delta, points) = match data {
        metric::Data::Sum(s) => {
            let kind = if s.is_monotonic {
                Kind::Counter
            } else {
                Kind::Gauge
            };
            let points = s
                .data_points
                .iter()
                .filter_map(|p| {
                    Some(TappedPoint {
                        labels: labels_of(&p.attributes),
                        start: p.start_time_unix_nano,
                        value: Value::Number(number(p.value.as_ref()?)),
                    })
                })
                .collect();
            (
                kind,
                s.is_monotonic && s.aggregation_temporality != cumulative,
                points,
            )
        }
        metric::Data::Gauge(g) => {
            let points = g
                .data_points
                .iter()
                .filter_map(|p| {
                    Some(TappedPoint {
                        labels: labels_of(&p.attributes),
                        start: p.start_time_unix_nano,
                        value: Value::Number(number(p.value.as_ref()?)),
                    })
                })
                .collect();
            (Kind::Gauge, false, points)
        }
        metric::Data::Histogram(h) => {
            let points = h
                .data_points
                .iter()
                .filter(|p| p.bucket_counts.len() == p.explicit_bounds.len() + 1)
                .map(|p| TappedPoint {
                    labels: labels_of(&p.attributes),
                    start: p.start_time_unix_nano,
                    value: Value::Histogram(Hist {
                        bounds: p.explicit_bounds.clone(),
                        counts: p.bucket_counts.clone(),
                        count: p.count,
                        sum: p.sum.unwrap_or(0.0),
                    }),
                })
                .collect();
            (
                Kind::Histogram,
                h.aggregation_temporality != cumulative,
                points,
            )
        }
        metric::Data::ExponentialHistogram(h) => return Err(h.data_points.len() as u64),
        metric::Data::Summary(h) => return Err(h.data_points.len() as u64),
    };
    Ok(TappedMetric {
        name: sanitize_name(&m.name, true),
        help: m.description.clone(),
        kind,
        delta,
        points,
    })
}

fn number(v: &number_data_point::Value) -> f64 {
    match v {
        number_data_point::Value::AsDouble(d) => *d,
        number_data_point::Value::AsInt(i) => *i as f64,
    }
}

/// The point's attributes as a label set in one canonical spelling: names made valid, sorted,
/// the first of any two that became the same name kept, `le` and `quantile` renamed (the
/// exposition's own labels).
fn labels_of(attributes: &[KeyValue]) -> String {
    let mut pairs: Vec<(String, String)> = attributes
        .iter()
        .map(|kv| {
            let mut name = sanitize_name(&kv.key, false);
            if name == "le" || name == "quantile" {
                name.insert_str(0, "exported_");
            }
            (name, text_of(kv.value.as_ref()))
        })
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs.dedup_by(|b, a| a.0 == b.0);
    render_labels(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn text_of(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Some(
            any_value::Value::ArrayValue(_)
            | any_value::Value::KvlistValue(_)
            | any_value::Value::StringValueStrindex(_),
        )
        | None => String::new(),
    }
}

/// The aggregate: families, their series, and what each proxy last reported.
#[derive(Debug)]
pub struct MeshMetrics {
    options: MeshMetricsOptions,
    /// Proxies that started before this do not count their past on their first export.
    started_unix_nanos: u64,
    state: Mutex<State>,
    dropped: [AtomicU64; Dropped::ALL.len()],
}

#[derive(Debug)]
struct State {
    families: BTreeMap<Arc<str>, Family>,
    series: usize,
    sources: HashMap<u64, Source>,
    remembered: usize,
    last_sweep: Instant,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: String,
    /// A histogram's bucket bounds, and their `le` spellings.
    bounds: Vec<f64>,
    le: Vec<String>,
    series: BTreeMap<Arc<str>, Series>,
}

impl Family {
    /// A family as its first reported metric describes it (a histogram's bounds from its
    /// first point).
    fn of(m: &TappedMetric) -> Family {
        let bounds = m
            .points
            .iter()
            .find_map(|p| match &p.value {
                Value::Histogram(h) => Some(h.bounds.clone()),
                Value::Number(_) => None,
            })
            .unwrap_or_default();
        Family {
            kind: m.kind,
            help: m.help.clone(),
            le: bounds.iter().map(|b| le_of(*b)).collect(),
            bounds,
            series: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
struct Series {
    value: f64,
    hist: Hist,
    seen: Instant,
}

#[derive(Debug, Default)]
struct Source {
    exports: u64,
    last: HashMap<(Arc<str>, Arc<str>), Last>,
}

#[derive(Debug)]
struct Last {
    start: u64,
    value: Value,
    seen: Instant,
}

impl MeshMetrics {
    pub fn new(options: MeshMetricsOptions) -> MeshMetrics {
        MeshMetrics {
            options,
            started_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            state: Mutex::new(State {
                families: BTreeMap::new(),
                series: 0,
                sources: HashMap::new(),
                remembered: 0,
                last_sweep: Instant::now(),
            }),
            dropped: Default::default(),
        }
    }

    /// Points not aggregated, by reason.
    pub fn dropped(&self, why: Dropped) -> u64 {
        let i = Dropped::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.dropped[i].load(Ordering::Relaxed)
    }

    fn drop_point(&self, why: Dropped, n: u64) {
        let i = Dropped::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.dropped[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Aggregated series held now.
    pub fn series(&self) -> usize {
        self.state.lock().map_or(0, |s| s.series)
    }

    /// Adds what an export request (already stored) reported.
    pub fn apply(&self, tapped: Tapped) {
        self.apply_at(tapped, Instant::now());
    }

    fn apply_at(&self, tapped: Tapped, now: Instant) {
        self.drop_point(Dropped::Unsupported, tapped.unsupported);
        if tapped.resources.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        self.sweep(&mut state, now);
        let max_remembered = self.options.max_series.saturating_mul(16);
        for resource in tapped.resources {
            let State {
                families,
                series,
                sources,
                remembered,
                ..
            } = &mut *state;
            let source = sources.entry(resource.source).or_default();
            let first_export = source.exports == 0;
            source.exports += 1;
            for m in resource.metrics {
                let name: Arc<str> = match families.get_key_value(m.name.as_str()) {
                    Some((name, _)) => name.clone(),
                    None => {
                        let name = Arc::<str>::from(m.name.as_str());
                        families.insert(name.clone(), Family::of(&m));
                        name
                    }
                };
                let Some(family) = families.get_mut(&name) else {
                    continue;
                };
                if family.kind != m.kind {
                    self.drop_point(Dropped::Conflict, m.points.len() as u64);
                    continue;
                }
                for p in m.points {
                    if let Value::Histogram(h) = &p.value
                        && h.bounds != family.bounds
                    {
                        self.drop_point(Dropped::Conflict, 1);
                        continue;
                    }
                    let key = (name.clone(), Arc::<str>::from(p.labels.as_str()));
                    let last = source.last.get(&key);
                    let increase = match (m.kind, last) {
                        (Kind::Gauge, Some(last)) => {
                            Value::Number(number_of(&p.value) - number_of(&last.value))
                        }
                        (Kind::Gauge, None) => p.value.clone(),
                        _ if m.delta => p.value.clone(),
                        (_, Some(last)) => increase(last, p.start, &p.value),
                        (_, None) if first_export && p.start < self.started_unix_nanos => {
                            zero_like(&p.value)
                        }
                        (_, None) => p.value.clone(),
                    };
                    let entry = match family.series.get_mut(&key.1) {
                        Some(s) => s,
                        None => {
                            if *series >= self.options.max_series
                                || (last.is_none() && *remembered >= max_remembered)
                            {
                                self.drop_point(Dropped::SeriesCap, 1);
                                continue;
                            }
                            *series += 1;
                            family.series.entry(key.1.clone()).or_insert(Series {
                                value: 0.0,
                                hist: Hist {
                                    counts: vec![0; family.bounds.len() + 1],
                                    ..Hist::default()
                                },
                                seen: now,
                            })
                        }
                    };
                    entry.seen = now;
                    match &increase {
                        Value::Number(v) => entry.value += v,
                        Value::Histogram(h) => {
                            for (a, b) in entry.hist.counts.iter_mut().zip(&h.counts) {
                                *a = a.saturating_add(*b);
                            }
                            entry.hist.count = entry.hist.count.saturating_add(h.count);
                            entry.hist.sum += h.sum;
                        }
                    }
                    if !m.delta {
                        let fresh = Last {
                            start: p.start,
                            value: p.value,
                            seen: now,
                        };
                        if source.last.insert(key, fresh).is_none() {
                            *remembered += 1;
                        }
                    }
                }
            }
        }
    }

    /// Forgets what was not reported within the expiry time: each proxy's last values (a
    /// gauge's share leaves its sum), then series no proxy reported.
    fn sweep(&self, state: &mut State, now: Instant) {
        let ttl = self.options.ttl;
        if now.saturating_duration_since(state.last_sweep) < (ttl / 8).max(Duration::from_secs(1)) {
            return;
        }
        state.last_sweep = now;
        let State {
            families,
            series,
            sources,
            remembered,
            ..
        } = state;
        for source in sources.values_mut() {
            source.last.retain(|(family, labels), last| {
                let keep = now.saturating_duration_since(last.seen) < ttl;
                if !keep {
                    *remembered -= 1;
                    if let Some(f) = families.get_mut(family)
                        && f.kind == Kind::Gauge
                        && let Some(s) = f.series.get_mut(labels)
                    {
                        s.value -= number_of(&last.value);
                    }
                }
                keep
            });
        }
        sources.retain(|_, s| !s.last.is_empty());
        for f in families.values_mut() {
            let before = f.series.len();
            f.series
                .retain(|_, s| now.saturating_duration_since(s.seen) < ttl);
            *series -= before - f.series.len();
        }
        families.retain(|_, f| !f.series.is_empty());
    }

    /// Writes every family.
    pub fn render(&self, w: &mut Writer) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        self.sweep(&mut state, Instant::now());
        for (name, f) in &state.families {
            w.family(name, f.kind, &f.help);
            for (labels, s) in &f.series {
                match f.kind {
                    Kind::Histogram => {
                        let mut cumulative = 0u64;
                        for (le, n) in f.le.iter().zip(&s.hist.counts) {
                            cumulative = cumulative.saturating_add(*n);
                            w.sample("_bucket", labels, Some(("le", le)), cumulative as f64);
                        }
                        w.sample("_bucket", labels, Some(("le", "+Inf")), s.hist.count as f64);
                        w.sample("_sum", labels, None, s.hist.sum);
                        w.sample("_count", labels, None, s.hist.count as f64);
                    }
                    _ => w.sample("", labels, None, s.value),
                }
            }
        }
    }
}

fn le_of(bound: f64) -> String {
    let mut s = String::new();
    write_value(&mut s, bound);
    s
}

fn number_of(v: &Value) -> f64 {
    match v {
        Value::Number(n) => *n,
        Value::Histogram(h) => h.count as f64,
    }
}

fn zero_like(v: &Value) -> Value {
    match v {
        Value::Number(_) => Value::Number(0.0),
        Value::Histogram(h) => Value::Histogram(Hist {
            counts: vec![0; h.counts.len()],
            ..Hist::default()
        }),
    }
}

/// What a cumulative point adds over the same proxy's last one: the difference, or the whole
/// value when the proxy restarted (another start time, or a count that went down).
fn increase(last: &Last, start: u64, now: &Value) -> Value {
    match (&last.value, now) {
        (Value::Number(a), Value::Number(b)) if last.start == start && b >= a => {
            Value::Number(b - a)
        }
        (Value::Histogram(a), Value::Histogram(b))
            if last.start == start
                && b.count >= a.count
                && a.counts.len() == b.counts.len()
                && b.counts.iter().zip(&a.counts).all(|(x, y)| x >= y) =>
        {
            Value::Histogram(Hist {
                bounds: Vec::new(),
                counts: b.counts.iter().zip(&a.counts).map(|(x, y)| x - y).collect(),
                count: b.count - a.count,
                sum: b.sum - a.sum,
            })
        }
        _ => now.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::Format;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn request(pod: &str, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("k8s.pod.name", pod)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn counter(name: &str, start: u64, points: &[(&str, i64)]) -> Metric {
        Metric {
            name: name.into(),
            description: "Total requests.".into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points
                    .iter()
                    .map(|(code, v)| NumberDataPoint {
                        attributes: vec![kv("response_code", code), kv("reporter", "source")],
                        start_time_unix_nano: start,
                        value: Some(number_data_point::Value::AsInt(*v)),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        }
    }

    fn render(m: &MeshMetrics, format: Format) -> String {
        let mut w = Writer::new(format, 0);
        m.render(&mut w);
        w.finish()
    }

    fn value(m: &MeshMetrics, sample: &str) -> Option<f64> {
        render(m, Format::Text).lines().find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == sample).then(|| v.parse().ok())?
        })
    }

    const OK: &str = r#"istio_requests_total{reporter="source",response_code="200"}"#;

    fn later(m: &MeshMetrics) -> u64 {
        m.started_unix_nanos + 1
    }

    #[test]
    fn proxies_add_up_by_their_increases() {
        let m = MeshMetrics::new(MeshMetricsOptions::default());
        let s = later(&m);
        m.apply(tap(&request(
            "a",
            vec![counter("istio_requests_total", s, &[("200", 5)])],
        )));
        m.apply(tap(&request(
            "b",
            vec![counter("istio_requests_total", s, &[("200", 7)])],
        )));
        assert_eq!(value(&m, OK), Some(12.0));
        // a reports its cumulative 9: +4; b the same 7: +0.
        m.apply(tap(&request(
            "a",
            vec![counter("istio_requests_total", s, &[("200", 9)])],
        )));
        m.apply(tap(&request(
            "b",
            vec![counter("istio_requests_total", s, &[("200", 7)])],
        )));
        assert_eq!(value(&m, OK), Some(16.0));
        // a restarts: a new start time and a smaller count, counted in full.
        m.apply(tap(&request(
            "a",
            vec![counter("istio_requests_total", s + 10, &[("200", 2)])],
        )));
        assert_eq!(value(&m, OK), Some(18.0), "the sum never goes down");
        // Only istio_* families are served.
        m.apply(tap(&request(
            "a",
            vec![counter("http_server_requests", s, &[("200", 2)])],
        )));
        assert!(!render(&m, Format::Text).contains("http_server"));
    }

    #[test]
    fn a_proxy_older_than_the_service_counts_from_its_first_export() {
        let m = MeshMetrics::new(MeshMetricsOptions::default());
        let before = m.started_unix_nanos - 1_000;
        m.apply(tap(&request(
            "a",
            vec![counter("istio_requests_total", before, &[("200", 500)])],
        )));
        assert_eq!(
            value(&m, OK),
            Some(0.0),
            "its past was counted by the previous process"
        );
        m.apply(tap(&request(
            "a",
            vec![counter(
                "istio_requests_total",
                before,
                &[("200", 503), ("500", 2)],
            )],
        )));
        assert_eq!(value(&m, OK), Some(3.0));
        assert_eq!(
            value(
                &m,
                r#"istio_requests_total{reporter="source",response_code="500"}"#
            ),
            Some(2.0),
            "a series new since its last export counts in full"
        );
    }

    #[test]
    fn series_expire_and_the_cap_counts_what_it_drops() {
        let m = MeshMetrics::new(MeshMetricsOptions {
            max_series: 2,
            ttl: Duration::from_secs(60),
        });
        let s = later(&m);
        let t0 = Instant::now();
        m.apply_at(
            tap(&request(
                "a",
                vec![counter(
                    "istio_requests_total",
                    s,
                    &[("200", 1), ("404", 1), ("500", 1)],
                )],
            )),
            t0,
        );
        assert_eq!(m.series(), 2);
        assert_eq!(m.dropped(Dropped::SeriesCap), 1);
        let gauge = Metric {
            name: "istio_build".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint {
                    value: Some(number_data_point::Value::AsInt(1)),
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        m.apply_at(tap(&request("b", vec![gauge])), t0);
        assert_eq!(
            m.dropped(Dropped::SeriesCap),
            2,
            "the cap holds for every family"
        );
        // Nothing reported for longer than the expiry time: every series goes.
        m.apply_at(Tapped::default(), t0 + Duration::from_secs(61));
        let _ = m
            .state
            .lock()
            .map(|mut s| m.sweep(&mut s, t0 + Duration::from_secs(61)));
        assert_eq!(m.series(), 0);
        assert!(
            m.state
                .lock()
                .is_ok_and(|s| s.sources.is_empty() && s.remembered == 0)
        );
    }

    #[test]
    fn gauges_sum_the_latest_values_and_lose_an_expired_proxy() {
        let m = MeshMetrics::new(MeshMetricsOptions {
            max_series: 10,
            ttl: Duration::from_secs(60),
        });
        let gauge = |v: i64| Metric {
            name: "istio_tcp_connections_open".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint {
                    value: Some(number_data_point::Value::AsInt(v)),
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        let t0 = Instant::now();
        m.apply_at(tap(&request("a", vec![gauge(3)])), t0);
        m.apply_at(
            tap(&request("b", vec![gauge(4)])),
            t0 + Duration::from_secs(30),
        );
        m.apply_at(
            tap(&request("a", vec![gauge(1)])),
            t0 + Duration::from_secs(30),
        );
        assert_eq!(value(&m, "istio_tcp_connections_open"), Some(5.0));
        let _ = m.state.lock().map(|mut s| {
            s.last_sweep = t0;
            m.sweep(&mut s, t0 + Duration::from_secs(95));
        });
        assert_eq!(value(&m, "istio_tcp_connections_open"), None);
        m.apply_at(
            tap(&request("b", vec![gauge(4)])),
            t0 + Duration::from_secs(100),
        );
        assert_eq!(value(&m, "istio_tcp_connections_open"), Some(4.0));
    }

    #[test]
    fn histograms_merge_bucket_by_bucket() {
        let m = MeshMetrics::new(MeshMetricsOptions::default());
        let s = later(&m);
        let hist = |counts: Vec<u64>, sum: f64, bounds: Vec<f64>| Metric {
            name: "istio_request_duration_milliseconds".into(),
            description: "Request duration in milliseconds.".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![kv("reporter", "destination")],
                    start_time_unix_nano: s,
                    count: counts.iter().sum(),
                    sum: Some(sum),
                    bucket_counts: counts,
                    explicit_bounds: bounds,
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        };
        m.apply(tap(&request(
            "a",
            vec![hist(vec![1, 2, 0], 30.0, vec![0.5, 10.0])],
        )));
        m.apply(tap(&request(
            "b",
            vec![hist(vec![0, 1, 1], 50.0, vec![0.5, 10.0])],
        )));
        m.apply(tap(&request(
            "a",
            vec![hist(vec![1, 3, 0], 35.0, vec![0.5, 10.0])],
        )));
        m.apply(tap(&request("c", vec![hist(vec![1, 1], 1.0, vec![1.0])])));
        assert_eq!(
            m.dropped(Dropped::Conflict),
            1,
            "other buckets than the family's"
        );
        for format in [Format::Text, Format::OpenMetrics] {
            let text = render(&m, format);
            for line in [
                "# TYPE istio_request_duration_milliseconds histogram",
                r#"istio_request_duration_milliseconds_bucket{reporter="destination",le="0.5"} 1"#,
                r#"istio_request_duration_milliseconds_bucket{reporter="destination",le="10"} 5"#,
                r#"istio_request_duration_milliseconds_bucket{reporter="destination",le="+Inf"} 6"#,
                r#"istio_request_duration_milliseconds_sum{reporter="destination"} 85"#,
                r#"istio_request_duration_milliseconds_count{reporter="destination"} 6"#,
            ] {
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
        // A counter spelt as a histogram elsewhere is a conflict, not a new family.
        m.apply(tap(&request(
            "a",
            vec![counter(
                "istio_request_duration_milliseconds",
                s,
                &[("200", 1)],
            )],
        )));
        assert_eq!(m.dropped(Dropped::Conflict), 2);
    }

    #[test]
    fn labels_are_canonical_whatever_order_and_spelling_they_come_in() {
        let attrs = vec![
            kv("z", "1"),
            kv("http.method", "GET"),
            kv("le", "x"),
            kv("a", "q\"uote"),
        ];
        assert_eq!(
            labels_of(&attrs),
            r#"a="q\"uote",exported_le="x",http_method="GET",z="1""#
        );
    }
}
