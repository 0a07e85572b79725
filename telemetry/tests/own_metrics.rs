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
