//! Bad input gets a clear error and loses nothing: malformed OTLP protobuf is answered with
//! InvalidArgument and the service keeps serving; bad SQL and bad JSON bodies get a 400.
//! Hostile SQL, foreign Host headers and non-JSON POSTs: see `hostile_sql.rs`.

mod common;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_rejected_and_nothing_is_lost() {
    let telemetry = common::start_telemetry(Duration::from_millis(200)).await;
    let (grpc, http) = (telemetry.grpc, telemetry.http);

    // A good export first.
    let mut client = TraceServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    client
        .export(common::one_span("before"))
        .await
        .expect("good export");

    // Garbage: a truncated varint field header, then an invalid wire type.
    for garbage in [&[0x0a, 0xff, 0xff][..], &[0x0f, 0x01, 0x02, 0x03][..]] {
        let (status, message) = common::raw_export(grpc, garbage).await;
        assert_eq!(
            status, "3",
            "InvalidArgument expected, got {status} {message}"
        );
        assert!(message.contains("malformed OTLP protobuf"), "{message}");
    }

    // The service still works, and both good exports are there (memtable or Parquet).
    client
        .export(common::one_span("after"))
        .await
        .expect("export after garbage");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sql = |q: &str| {
        reqwest::Client::new()
            .post(format!("http://{http}/api/v1/sql"))
            .header("content-type", "application/json")
            .body(q.to_string())
            .send()
    };
    let resp = sql(r#"{"sql": "SELECT service_name FROM spans ORDER BY service_name"}"#)
        .await
        .expect("sql");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["columns"], serde_json::json!(["service_name"]));
    assert_eq!(
        body["rows"],
        serde_json::json!([{"service_name": "after"}, {"service_name": "before"}])
    );

    // Bad SQL and bad bodies: 400 with a JSON error naming the problem.
    let resp = sql(r#"{"sql": "SELECT nope FROM spans"}"#)
        .await
        .expect("sql");
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{body}"
    );
    for bad in [
        "not json",
        r#"{"query": "SELECT 1"}"#,
        r#"{"sql": "SELECT 1", "extra": 1}"#,
    ] {
        let resp = sql(bad).await.expect("sql");
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let huge = format!(r#"{{"sql": "SELECT '{}'"}}"#, "x".repeat(100 * 1024));
    assert_eq!(sql(&huge).await.expect("sql").status(), 413);

    telemetry.stop().await;
}
