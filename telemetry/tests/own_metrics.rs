//! The telemetry service's own `/metrics`: what it ingested and refused, its WAL, flushes,
//! files and queries, counted as they happen, in an exposition a real `promtool` accepts.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::json;

/// `promtool`: `LUMEN_PROMTOOL`, else the one on PATH (Debian's `prometheus` package, which
/// the test command installs). Panics with what to do when it is missing.
fn promtool() -> String {
    let path = std::env::var("LUMEN_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let ok = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "peer missing: {path} does not run; run scripts/test-all (it installs Debian's \
         prometheus package) or set LUMEN_PROMTOOL"
    );
    path
}

/// The value of one sample line `name{labels} value` (labels as written).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
}

async fn get_metrics(http: SocketAddr) -> String {
    let resp = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_metrics_count_what_happened_and_promtool_accepts_them() {
    let promtool = promtool();
    let telemetry = common::start_telemetry(Duration::from_millis(200)).await;
    let (grpc, http) = (telemetry.grpc, telemetry.http);
    let mut client = TraceServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    for service in ["a", "b", "c", "d"] {
        client
            .export(common::one_span(service))
            .await
            .expect("export");
    }
    // One malformed request, one query of each kind of outcome.
    let (status, _) = common::raw_export(grpc, &[0x0a, 0xff, 0xff]).await;
    assert_eq!(status, "3");
    let sql = |q: &'static str| {
        reqwest::Client::new()
            .post(format!("http://{http}/api/v1/sql"))
            .json(&json!({ "sql": q }))
            .send()
    };
    assert_eq!(sql("SELECT 1").await.expect("sql").status(), 200);
    assert_eq!(sql("SELECT nope").await.expect("sql").status(), 400);
    assert_eq!(sql("DROP TABLE spans").await.expect("sql").status(), 403);
    tokio::time::sleep(Duration::from_millis(800)).await;

    let body = get_metrics(http).await;
    assert_eq!(
        sample(
            &body,
            r#"lumen_telemetry_otlp_requests_accepted_total{signal="traces"}"#
        ),
        4.0
    );
    assert_eq!(
        sample(
            &body,
            r#"lumen_telemetry_otlp_requests_refused_total{signal="traces",reason="malformed"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"lumen_telemetry_rows_ingested_total{table="spans"}"#
        ),
        4.0
    );
    assert!(sample(&body, "lumen_telemetry_wal_fsyncs_total") >= 1.0);
    assert!(sample(&body, "lumen_telemetry_wal_written_bytes_total") > 0.0);
    assert!(sample(&body, "lumen_telemetry_wal_disk_bytes") > 0.0);
    assert!(
        sample(
            &body,
            r#"lumen_telemetry_flush_duration_seconds_count{table="spans"}"#
        ) >= 1.0
    );
    assert!(sample(&body, r#"lumen_telemetry_files{table="spans"}"#) >= 1.0);
    assert_eq!(
        sample(&body, r#"lumen_telemetry_file_rows{table="spans"}"#),
        4.0,
        "every row flushed"
    );
    assert_eq!(
        sample(&body, r#"lumen_telemetry_queries_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"lumen_telemetry_queries_total{outcome="sql"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"lumen_telemetry_queries_total{outcome="refused"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, "lumen_telemetry_query_duration_seconds_count"),
        3.0
    );

    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    telemetry.stop().await;
}

/// OTLP/JSON metrics export of `n` `istio_requests_total` series (one per response code) from
/// one pod, each at `value`.
fn istio_export(pod: &str, n: usize, value: i64) -> serde_json::Value {
    let points: Vec<_> = (0..n)
        .map(|i| {
            json!({
                "attributes": [
                    {"key": "reporter", "value": {"stringValue": "destination"}},
                    {"key": "response_code", "value": {"stringValue": format!("{}", 100 + i)}}
                ],
                "startTimeUnixNano": format!("{}", lumen_telemetry::now_ns()),
                "timeUnixNano": format!("{}", lumen_telemetry::now_ns()),
                "asInt": format!("{value}")
            })
        })
        .collect();
    json!({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "k8s.pod.name", "value": {"stringValue": pod}}]},
        "scopeMetrics": [{"metrics": [{
            "name": "istio_requests_total",
            "description": "Total requests.",
            "sum": {"dataPoints": points, "aggregationTemporality": 2, "isMonotonic": true}
        }]}]
    }]})
}

#[tokio::test]
async fn the_series_cap_holds_against_a_flood_of_label_sets_and_counts_what_it_drops() {
    let svc = common::start_telemetry_with(|o| {
        o.mesh_metrics.max_series = 10;
    })
    .await;
    let client = reqwest::Client::new();
    for pod in ["a", "b"] {
        let resp = client
            .post(format!("http://{}/v1/metrics", svc.otlp_http))
            .json(&istio_export(pod, 1000, 3))
            .send()
            .await
            .expect("export");
        assert_eq!(
            resp.status(),
            200,
            "the export is stored even when its series are not served"
        );
    }
    let body = get_metrics(svc.http).await;
    let served = body
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .count();
    assert_eq!(served, 10, "{body}");
    assert!(
        body.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .all(|l| l.ends_with(" 6")),
        "two pods' series add up: {body}"
    );
    assert_eq!(sample(&body, "lumen_telemetry_mesh_series"), 10.0);
    assert_eq!(
        sample(
            &body,
            "lumen_telemetry_mesh_points_dropped_total{reason=\"series_cap\"}"
        ),
        1980.0
    );
    // The rows themselves are all stored.
    let rows: serde_json::Value = client
        .post(format!("http://{}/api/v1/sql", svc.http))
        .json(&json!({"sql": "SELECT count(*) AS n FROM metrics"}))
        .send()
        .await
        .expect("sql")
        .json()
        .await
        .expect("json");
    assert_eq!(rows["rows"][0]["n"], 2000, "{rows}");

    // Prometheus asks for OpenMetrics first; it gets it, ending in # EOF.
    let resp = client
        .get(format!("http://{}/metrics", svc.http))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("metrics");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    let om = resp.text().await.expect("body");
    assert!(om.contains("# TYPE istio_requests counter\n"), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    svc.stop().await;
}
