//! Bad input gets a clear error and loses nothing: malformed OTLP protobuf is answered with
//! InvalidArgument and the service keeps serving; bad SQL and bad JSON bodies get a 400.
//! Hostile SQL, foreign Host headers and non-JSON POSTs: see `hostile_sql.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

/// Posts one gRPC frame with `payload` as an Export call; returns (grpc-status, grpc-message).
async fn raw_export(addr: SocketAddr, payload: &[u8]) -> (String, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(payload);
    let req = http::Request::post(format!(
        "http://{addr}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(frame)))
    .expect("request");
    let resp = client.request(req).await.expect("response");
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        headers
            .get(name)
            .or_else(|| trailers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    (get("grpc-status"), percent_decode(&get("grpc-message")))
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
        let (status, message) = raw_export(grpc, garbage).await;
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
