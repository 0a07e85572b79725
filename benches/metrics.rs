//! The Prometheus endpoint's ratio (issue 6), measured beside its baseline in one run: a full
//! scrape of the telemetry service's `/metrics` while the demo mesh runs (the mesh's `istio_*`
//! families aggregated across every sidecar, plus the service's own families, over HTTP with a
//! kept-alive connection) ÷ rendering the same `istio_*` families, the same label sets and
//! counts, with the `prometheus-client` crate from in-memory counters and histograms.
//!
//! A second row does the same at mesh scale: 10,000 series (200 proxies of 50 workloads, 50
//! label sets each, every family), fed in as OTLP exports, rendered by Lumen's aggregate
//! alone ÷ `prometheus-client` rendering them.
//!
//! Run with `cargo bench --bench metrics` (no external peer). Knob: `LUMEN_BENCH_SCRAPES`
//! (default 2,000 timed scrapes of each).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lumen::demo::{self, DemoOptions};
use lumen_telemetry::exposition::{Format, Writer};
use lumen_telemetry::meshmetrics::{MeshMetrics, MeshMetricsOptions, tap};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram as OtlpHistogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

const DURATION_BOUNDS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
const SIZE_BOUNDS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

fn main() {
    let scrapes: usize = std::env::var("LUMEN_BENCH_SCRAPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("metrics benchmark: {scrapes} timed scrapes of each");
    println!("| what | Lumen p50 / p99 | prometheus-client p50 / p99 | ratio p50 / p99 | goal |");
    println!("|---|---|---|---|---|");
    rt.block_on(demo_scrape(scrapes));
    mesh_scale(scrapes / 4);
}

/// The demo mesh, run until its sidecars have reported every series, then scraped.
async fn demo_scrape(scrapes: usize) {
    let data = tempfile::tempdir().expect("tempdir");
    let requests = 400;
    let options = DemoOptions {
        rate_per_s: 100.0,
        load_duration: Some(Duration::from_secs(30)),
        max_requests: Some(requests),
        flush_interval: Duration::from_secs(5),
        span_export_interval: Duration::from_secs(1),
        metric_export_interval: Duration::from_secs(1),
        ..DemoOptions::ephemeral([127, 0, 79], data.path().to_path_buf())
    };
    let running = demo::start(options, |_| {}).await.expect("demo starts");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let l = &running.load;
        if l.ok.load(Ordering::Relaxed) + l.failed.load(Ordering::Relaxed) >= requests {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two metric exports after the last request: every series is in.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let client = reqwest::Client::new();
    let url = format!("http://{}/metrics", running.telemetry_http);
    let body = client
        .get(&url)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let registry = replay(&body);
    let series = body.lines().filter(|l| l.starts_with("istio_")).count();
    let mut lumen = Vec::with_capacity(scrapes);
    let mut baseline = Vec::with_capacity(scrapes);
    let mut out = String::new();
    for _ in 0..50 {
        let _ = client.get(&url).send().await.expect("scrape").bytes().await;
    }
    for _ in 0..scrapes {
        let t = Instant::now();
        let bytes = client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .bytes()
            .await
            .expect("body");
        lumen.push(t.elapsed().as_secs_f64());
        std::hint::black_box(bytes);
        out.clear();
        let t = Instant::now();
        encode(&mut out, &registry).expect("encodes");
        baseline.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&out);
    }
    report(
        &format!(
            "scrape of the demo mesh's /metrics over HTTP ({series} istio_* samples, {} bytes)",
            body.len()
        ),
        &mut lumen,
        &mut baseline,
    );
    running.stop().await;
}

/// 10,000 series fed in as OTLP exports from 200 proxies; Lumen's render alone.
fn mesh_scale(renders: usize) {
    let mesh = MeshMetrics::new(MeshMetricsOptions {
        max_series: 100_000,
        ttl: Duration::from_secs(3600),
    });
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for proxy in 0..200 {
        mesh.apply(tap(&proxy_export(proxy, start)));
    }
    let mut w = Writer::new(Format::Text, 0);
    mesh.render(&mut w);
    let text = w.finish();
    let registry = replay(&text);
    let mut lumen = Vec::with_capacity(renders);
    let mut baseline = Vec::with_capacity(renders);
    let mut out = String::new();
    for _ in 0..renders {
        let t = Instant::now();
        let mut w = Writer::new(Format::Text, text.len());
        mesh.render(&mut w);
        std::hint::black_box(w.finish());
        lumen.push(t.elapsed().as_secs_f64());
        out.clear();
        let t = Instant::now();
        encode(&mut out, &registry).expect("encodes");
        baseline.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&out);
    }
    report(
        &format!(
            "render of 10,000 aggregated series from 200 proxies ({} bytes)",
            text.len()
        ),
        &mut lumen,
        &mut baseline,
    );
}

/// One proxy's cumulative export: 50 label sets of every family (its workload is one of 50,
/// so four proxies share each workload's series).
fn proxy_export(proxy: usize, start: u64) -> ExportMetricsServiceRequest {
    let workload = proxy % 50;
    let labels = |i: usize| -> Vec<KeyValue> {
        let mut l = vec![
            (
                "reporter",
                if i.is_multiple_of(2) {
                    "source"
                } else {
                    "destination"
                }
                .to_string(),
            ),
            ("source_workload", format!("app{workload}-v1")),
            ("source_app", format!("app{workload}")),
            ("source_version", "v1".to_string()),
            ("destination_workload", format!("app{}-v1", i / 2)),
            ("destination_app", format!("app{}", i / 2)),
            ("destination_version", "v1".to_string()),
            (
                "destination_service",
                format!("app{}.default.svc.cluster.local", i / 2),
            ),
            ("request_protocol", "http".to_string()),
            ("response_code", "200".to_string()),
            ("response_flags", "-".to_string()),
        ];
        for k in [
            "source_workload_namespace",
            "destination_workload_namespace",
        ] {
            l.push((k, "default".to_string()));
        }
        l.into_iter()
            .map(|(k, v)| KeyValue {
                key: k.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v)),
                }),
                ..Default::default()
            })
            .collect()
    };
    let cumulative = AggregationTemporality::Cumulative as i32;
    let hist = |name: &str, bounds: &[f64]| Metric {
        name: name.to_string(),
        description: "A histogram.".to_string(),
        data: Some(metric::Data::Histogram(OtlpHistogram {
            data_points: (0..50)
                .map(|i| {
                    let mut counts = vec![0u64; bounds.len() + 1];
                    counts[i % bounds.len()] = 10 + i as u64;
                    counts[(i + 3) % bounds.len()] += 5;
                    HistogramDataPoint {
                        attributes: labels(i),
                        start_time_unix_nano: start,
                        count: counts.iter().sum(),
                        sum: Some(1234.5),
                        bucket_counts: counts,
                        explicit_bounds: bounds.to_vec(),
                        ..Default::default()
                    }
                })
                .collect(),
            aggregation_temporality: cumulative,
        })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "k8s.pod.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(format!("pod-{proxy}"))),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "istio_requests_total".into(),
                        description: "Total requests.".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: (0..50)
                                .map(|i| NumberDataPoint {
                                    attributes: labels(i),
                                    start_time_unix_nano: start,
                                    value: Some(number_data_point::Value::AsInt(100 + i as i64)),
                                    ..Default::default()
                                })
                                .collect(),
                            aggregation_temporality: cumulative,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    },
                    hist("istio_request_duration_milliseconds", &DURATION_BOUNDS),
                    hist("istio_request_bytes", &SIZE_BOUNDS),
                    hist("istio_response_bytes", &SIZE_BOUNDS),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The `istio_*` families of an exposition, rebuilt in a `prometheus-client` registry: the
/// same label sets, counter values and bucket counts (each bucket's count observed at its
/// upper bound).
fn replay(exposition: &str) -> Registry {
    let mut counters: BTreeMap<Labels, u64> = BTreeMap::new();
    let mut buckets: BTreeMap<(String, Labels), Vec<(f64, u64)>> = BTreeMap::new();
    for line in exposition.lines() {
        let Some((sample, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = sample.split_once('{') else {
            continue;
        };
        let mut labels = parse_labels(labels.trim_end_matches('}'));
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if name == "istio_requests_total" {
            counters.insert(labels, value as u64);
        } else if let Some(family) = name.strip_suffix("_bucket")
            && family.starts_with("istio_")
        {
            let le = labels
                .iter()
                .position(|(k, _)| k == "le")
                .map(|i| labels.remove(i).1)
                .unwrap_or_default();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            buckets
                .entry((family.to_string(), labels))
                .or_default()
                .push((le, value as u64));
        }
    }
    let mut registry = Registry::default();
    let requests = Family::<Labels, Counter>::default();
    for (labels, n) in counters {
        requests.get_or_create(&labels).inc_by(n);
    }
    registry.register("istio_requests", "Total requests.", requests);
    for (family, bounds) in [
        ("istio_request_duration_milliseconds", &DURATION_BOUNDS[..]),
        ("istio_request_bytes", &SIZE_BOUNDS[..]),
        ("istio_response_bytes", &SIZE_BOUNDS[..]),
    ] {
        let bounds = bounds.to_vec();
        let hist = Family::<Labels, Histogram, _>::new_with_constructor(move || {
            Histogram::new(bounds.clone())
        });
        for ((name, labels), cumulative) in &buckets {
            if name != family {
                continue;
            }
            let h = hist.get_or_create(labels);
            let mut below = 0;
            for (le, c) in cumulative {
                let at = if le.is_finite() { *le } else { 1e12 };
                for _ in below..*c {
                    h.observe(at);
                }
                below = *c;
            }
        }
        registry.register(family, "A histogram.", hist);
    }
    registry
}

fn parse_labels(text: &str) -> Labels {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end..];
    }
    out
}

fn percentile(times: &mut [f64], q: f64) -> f64 {
    times.sort_by(f64::total_cmp);
    let i = ((times.len() as f64 - 1.0) * q).round() as usize;
    times[i.min(times.len() - 1)]
}

fn report(what: &str, lumen: &mut [f64], baseline: &mut [f64]) {
    let (l50, l99) = (percentile(lumen, 0.5), percentile(lumen, 0.99));
    let (b50, b99) = (percentile(baseline, 0.5), percentile(baseline, 0.99));
    println!(
        "| {what} | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.2} / {:.2} | ≤ 2.0 |",
        l50 * 1e6,
        l99 * 1e6,
        b50 * 1e6,
        b99 * 1e6,
        l50 / b50,
        l99 / b99
    );
}
