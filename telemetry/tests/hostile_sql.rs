//! Hostile SQL and hostile HTTP against the query API: statements that would write or read
//! files, change settings or run without end are refused or cut off with a clear error that
//! says whose fault it is, no file outside the store is created, and OTLP ingest keeps
//! acknowledging all the while. Foreign Host headers and non-JSON POSTs are refused.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lumen_telemetry::QueryLimits;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::{Value, json};

async fn post(http: SocketAddr, sql: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/sql"))
        .json(&json!({ "sql": sql }))
        .send()
        .await
        .expect("sql request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sql_is_refused_or_cut_off_and_ingest_goes_on() {
    let telemetry = common::start_telemetry_with(|o| {
        o.flush_interval = Duration::from_millis(500);
        o.query = QueryLimits {
            timeout: Duration::from_secs(3),
            memory_bytes: 32 * 1024 * 1024,
            max_rows: 100,
            max_concurrent: 2,
            queue_wait: Duration::from_millis(500),
        };
    })
    .await;
    let (grpc, http) = (telemetry.grpc, telemetry.http);

    // Ingest runs beside every hostile query and must keep being acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ingest = {
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        tokio::spawn(async move {
            let mut client = TraceServiceClient::connect(format!("http://{grpc}"))
                .await
                .expect("connect");
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client.export(common::one_span("ingest")).await {
                    Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let outside = std::env::temp_dir().join(format!("lumen-hostile-{}.csv", std::process::id()));
    let _ = std::fs::remove_file(&outside);
    let outside_str = outside.to_string_lossy();
    // (statement, expected status, expected error kind, a word the message must hold)
    let copy = format!("COPY (SELECT 'x' AS x) TO '{outside_str}' STORED AS CSV");
    let cases: Vec<(&str, u16, &str, &str)> = vec![
        (&copy, 403, "refused", "COPY"),
        (
            "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'",
            403,
            "refused",
            "DDL",
        ),
        (
            "INSERT INTO spans SELECT * FROM spans",
            403,
            "refused",
            "DML",
        ),
        ("CREATE TABLE t AS SELECT 1 AS one", 403, "refused", "DDL"),
        ("CREATE VIEW v AS SELECT 1 AS one", 403, "refused", "DDL"),
        ("DROP TABLE spans", 403, "refused", "DDL"),
        (
            "SET datafusion.execution.batch_size = 1",
            403,
            "refused",
            "Statement",
        ),
        ("SELECT * FROM '/etc/passwd'", 400, "sql", "/etc/passwd"),
        ("SELECT 1; DROP TABLE spans", 400, "sql", "single"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
            422,
            "",
            "",
        ),
        (
            "SELECT count(*) FROM range(1000000) a CROSS JOIN range(1000000) b",
            422,
            "",
            "",
        ),
        (
            "SELECT sum(value) FROM range(100000000000)",
            422,
            "timeout",
            "time limit",
        ),
        (
            "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY value DESC) AS r FROM range(20000000))",
            422,
            "memory",
            "--query-memory",
        ),
    ];
    for (sql, status, kind, word) in &cases {
        let started = std::time::Instant::now();
        let (got, body) = post(http, sql).await;
        let took = started.elapsed();
        eprintln!("{got} in {:.2} s: {sql} -> {body}", took.as_secs_f64());
        assert_eq!(got, *status, "{sql}: {body}");
        if !kind.is_empty() {
            assert_eq!(body["kind"], *kind, "{sql}: {body}");
        } else {
            assert!(
                body["kind"] == "timeout" || body["kind"] == "memory",
                "{sql}: {body}"
            );
        }
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(word), "{sql}: {message}");
    }
    assert!(!outside.exists(), "COPY wrote {}", outside.display());

    // A long result is cut at the row cap and says so; a short one is whole.
    let (status, body) = post(http, "SELECT value FROM range(1000)").await;
    assert_eq!(status, 200);
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(100));
    assert_eq!(body["truncated"], true);
    assert_eq!(body["row_limit"], 100);
    let (_, body) = post(http, "SELECT value FROM range(100)").await;
    assert_eq!(body["truncated"], false, "exactly the cap is not truncated");

    // Past the concurrency bound, queries are refused with 429 and Retry-After.
    let slow = "SELECT sum(value) FROM range(100000000000)";
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("http://{http}/api/v1/sql"))
                .json(&json!({ "sql": slow }))
                .send()
                .await
                .expect("sql");
            (
                resp.status().as_u16(),
                resp.headers().get("retry-after").is_some(),
            )
        }));
    }
    let mut busy = 0;
    for h in handles {
        let (status, retry_after) = h.await.expect("join");
        if status == 429 {
            assert!(retry_after, "429 without Retry-After");
            busy += 1;
        } else {
            assert_eq!(status, 422);
        }
    }
    assert!(busy >= 2, "{busy} of 4 refused with max_concurrent 2");

    stop.store(true, Ordering::Relaxed);
    ingest.await.expect("ingest task");
    let (acked, failed) = (
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!("ingest during hostile queries: {acked} acknowledged, {failed} failed");
    assert_eq!(failed, 0, "exports failed while queries ran");
    assert!(acked > 10, "only {acked} exports acknowledged");
    let (_, body) = post(
        http,
        "SELECT count(*) AS n FROM spans WHERE service_name = 'ingest'",
    )
    .await;
    assert_eq!(
        body["rows"][0]["n"], acked as u64,
        "every acknowledged span stored"
    );
    telemetry.stop().await;
}

#[tokio::test]
async fn foreign_hosts_and_non_json_posts_are_refused() {
    let telemetry = common::start_telemetry(Duration::from_secs(5)).await;
    let http = telemetry.http;
    let client = reqwest::Client::new();
    let url = format!("http://{http}/api/v1/sql");
    let good = r#"{"sql": "SELECT 1 AS one"}"#;

    let resp = client
        .post(&url)
        .header("content-type", "application/json; charset=utf-8")
        .body(good)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200, "JSON with a charset is fine");

    for host in ["evil.example", "evil.example:16686", "127.0.0.1.nip.io"] {
        let resp = client
            .post(&url)
            .header("host", host)
            .header("content-type", "application/json")
            .body(good)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 421, "Host {host}");
        let body: Value = resp.json().await.expect("json");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("--allow-host")),
            "{body}"
        );
        let resp = client
            .get(format!("http://{http}/healthz"))
            .header("host", host)
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 421, "every route is behind the Host check");
    }
    let resp = client
        .get(format!("http://{http}/healthz"))
        .header("host", format!("localhost:{}", http.port()))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);

    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = client.post(&url).body(good);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("post");
        assert_eq!(resp.status(), 415, "{content_type:?}");
    }
    telemetry.stop().await;
}
