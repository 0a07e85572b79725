//! Two `lumen telemetry` processes share one S3 bucket (a real local S3: PyPI `moto[server]`,
//! installed by scripts/test-all): each publishes its Parquet files and manifest under its
//! own writer id, and each answers SQL over its own rows and the other's, exactly once.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lumen, python_with, sql_rows};
use serde_json::json;

const BUCKET: &str = "lumen-mesh";

/// A moto S3 server on a loopback port, stopped on drop.
struct S3 {
    child: Child,
    endpoint: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn start_s3() -> S3 {
    let python = python_with(&["moto.server", "boto3"]);
    let port = free_port();
    let child = Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto server starts");
    let s3 = S3 {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Creating the bucket is also the readiness probe.
        match client.put(format!("{}/{BUCKET}", s3.endpoint)).send().await {
            Ok(r) if r.status().is_success() => return s3,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("moto S3 at {} did not come up: {other:?}", s3.endpoint),
        }
    }
}

/// An OTLP/JSON export of `n` spans of one trace from `service`.
fn spans(service: &str, trace: u8, n: u8) -> serde_json::Value {
    let now = lumen_telemetry::now_ns();
    let spans: Vec<_> = (1..=n)
        .map(|i| {
            json!({
                "traceId": format!("{trace:02x}").repeat(16),
                "spanId": format!("{i:02x}").repeat(8),
                "name": format!("{service}-op"),
                "kind": 2,
                "startTimeUnixNano": (now + i64::from(i)).to_string(),
                "endTimeUnixNano": (now + i64::from(i) + 1_000_000).to_string(),
            })
        })
        .collect();
    json!({ "resourceSpans": [{
        "resource": { "attributes": [
            { "key": "service.name", "value": { "stringValue": service } }
        ]},
        "scopeSpans": [{ "spans": spans }]
    }]})
}

async fn post(otlp_http: &str, body: &serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{otlp_http}/v1/traces"))
        .json(body)
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

/// Polls (bounded) until `http` answers every service with the expected span count.
async fn wait_for_services(http: &str, want: &[(&str, i64)], who: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let want: Vec<serde_json::Value> = want
        .iter()
        .map(|(s, n)| json!({ "service_name": s, "n": n }))
        .collect();
    loop {
        let rows = sql_rows(
            http,
            "SELECT service_name, count(*) AS n FROM spans GROUP BY 1 ORDER BY 1",
        )
        .await;
        if rows == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who} never saw {want:?}; last answer {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_share_a_bucket_and_each_sees_the_others_files() {
    let s3 = start_s3().await;
    let env = [
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "lumen"),
        ("AWS_SECRET_ACCESS_KEY", "lumen-secret"),
        ("AWS_REGION", "us-east-1"),
    ];
    // A bucket that is not there stops the start with an error, before any port is served.
    let nowhere = tempfile::tempdir().expect("data");
    let mut lumen = Lumen::spawn_with_env(
        &Lumen::telemetry_args(
            nowhere.path().to_str().expect("utf-8"),
            &["--object-store", "s3://no-such-bucket/mesh"],
        ),
        &env,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = lumen.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "lumen kept running without its bucket"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success(), "exit status {status}");

    let url = format!("s3://{BUCKET}/mesh");
    let (data_a, data_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let flags = |writer: &'static str| {
        vec![
            "--object-store",
            url.as_str(),
            "--writer-id",
            writer,
            "--flush-interval",
            "1",
        ]
    };
    let (mut a, addrs_a) = Lumen::telemetry_with_env(
        data_a.path().to_str().expect("utf-8"),
        &flags("writer-a"),
        &env,
    );
    let (mut b, addrs_b) = Lumen::telemetry_with_env(
        data_b.path().to_str().expect("utf-8"),
        &flags("writer-b"),
        &env,
    );

    post(&addrs_a.otlp_http, &spans("alpha", 1, 3)).await;
    post(&addrs_b.otlp_http, &spans("beta", 2, 2)).await;
    let both = [("alpha", 3), ("beta", 2)];
    wait_for_services(&addrs_a.http, &both, "writer a").await;
    wait_for_services(&addrs_b.http, &both, "writer b").await;
    // A trace id lookup across the bucket, by hex id.
    let rows = sql_rows(
        &addrs_a.http,
        &format!(
            "SELECT count(*) AS n FROM spans WHERE trace_id = '{}'",
            "02".repeat(16)
        ),
    )
    .await;
    assert_eq!(rows[0]["n"], 2, "writer a finds writer b's trace");

    // The bucket holds each writer's own files and manifest, as S3 lists them.
    let listing = reqwest::Client::new()
        .get(format!("{}/{BUCKET}?list-type=2&prefix=mesh/", s3.endpoint))
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("listing");
    for writer in ["writer-a", "writer-b"] {
        assert!(
            listing.contains(&format!("mesh/{writer}/spans/manifest.json")),
            "{writer}'s manifest in the bucket: {listing}"
        );
        assert!(
            listing.contains(&format!("mesh/{writer}/spans/0")) && listing.contains(".parquet"),
            "{writer}'s Parquet files in the bucket: {listing}"
        );
    }
    let metrics = reqwest::get(format!("http://{}/metrics", addrs_a.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("lumen_telemetry_object_store_uploads_total{table=\"spans\"}")
            && !l.ends_with(" 0")),
        "uploads counted: {metrics}"
    );

    // More rows at b after a restart of b: a sees them too, and nothing twice.
    b.interrupt(Duration::from_secs(15));
    let (mut b, addrs_b) = Lumen::telemetry_with_env(
        data_b.path().to_str().expect("utf-8"),
        &flags("writer-b"),
        &env,
    );
    post(&addrs_b.otlp_http, &spans("beta", 3, 4)).await;
    let more = [("alpha", 3), ("beta", 6)];
    wait_for_services(&addrs_a.http, &more, "writer a after b restarted").await;
    wait_for_services(&addrs_b.http, &more, "writer b after its restart").await;
    a.interrupt(Duration::from_secs(15));
    b.interrupt(Duration::from_secs(15));
}
