//! OTLP/HTTP on its own port: Jaeger's own OTLP JSON fixture goes in as JSON, protobuf goes
//! in gzipped, a request with invalid spans is a partial success naming them, logs arrive as
//! JSON, and bad requests get the status OTLP/HTTP exporters act on (400, 413, 415) with a
//! `google.rpc.Status` body.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde_json::{Value, json};

async fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    req.send().await.expect("post")
}

async fn sql(http: SocketAddr, query: &str) -> Vec<Value> {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/sql"))
        .json(&json!({ "sql": query }))
        .send()
        .await
        .expect("sql");
    assert_eq!(resp.status(), 200, "{query}");
    let body: Value = resp.json().await.expect("json");
    body["rows"].as_array().expect("rows").clone()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_takes_json_and_gzipped_protobuf_and_refuses_clearly() {
    let telemetry = common::start_telemetry(Duration::from_secs(5)).await;
    let (otlp, http) = (telemetry.otlp_http, telemetry.http);

    // Jaeger's fixture, as OTLP JSON.
    let fixture =
        std::fs::read(common::conformance("jaeger/otlp2jaeger-in.json")).expect("fixture");
    let expected: Value = serde_json::from_slice(&fixture).expect("fixture json");
    let spans_in_fixture: usize = expected["resourceSpans"]
        .as_array()
        .expect("resourceSpans")
        .iter()
        .flat_map(|rs| rs["scopeSpans"].as_array().into_iter().flatten())
        .map(|ss| ss["spans"].as_array().map_or(0, Vec::len))
        .sum();
    let resp = post(otlp, "/v1/traces", "application/json", None, fixture).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "answered in the request's encoding"
    );
    let rows = sql(
        http,
        "SELECT trace_id, span_id, parent_span_id, span_name, span_kind, service_name, \
                peer_service AS peer FROM spans WHERE service_name = 'telemetrygen'",
    )
    .await;
    assert_eq!(rows.len(), spans_in_fixture, "{rows:?}");
    let first = &expected["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert!(rows.iter().any(|r| {
        r["trace_id"] == first["traceId"]
            && r["span_id"] == first["spanId"]
            && r["parent_span_id"] == first["parentSpanId"]
            && r["span_name"] == first["name"]
            && r["span_kind"] == "server"
            && r["peer"] == "telemetrygen-client"
    }));

    // Gzipped protobuf, with one span of three invalid: a partial success naming it.
    let mut request = common::one_span("gz");
    let mut spans = request.resource_spans[0].scope_spans[0].spans.clone();
    let mut second = spans[0].clone();
    second.span_id = vec![9; 8];
    let mut bad = spans[0].clone();
    bad.trace_id = vec![0; 16];
    spans.extend([second, bad]);
    request.resource_spans[0].scope_spans[0].spans = spans;
    let resp = post(
        otlp,
        "/v1/traces",
        "application/x-protobuf",
        Some("gzip"),
        gzip(&request.encode_to_vec()),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
    let answer =
        ExportTraceServiceResponse::decode(resp.bytes().await.expect("body")).expect("decodes");
    let partial = answer.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(partial.error_message.contains("trace id"), "{partial:?}");
    let rows = sql(
        http,
        "SELECT count(*) AS n FROM spans WHERE service_name = 'gz'",
    )
    .await;
    assert_eq!(rows[0]["n"], 2, "the two valid spans are stored");

    // Logs as JSON.
    let logs = json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-logs"}}]},
        "scopeLogs": [{"scope": {"name": "test"}, "logRecords": [{
            "timeUnixNano": "1700000000000000000",
            "severityNumber": 17,
            "severityText": "ERROR",
            "body": {"stringValue": "disk full"},
            "attributes": [{"key": "disk", "value": {"intValue": "3"}}],
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174"
        }]}]
    }]});
    let resp = post(
        otlp,
        "/v1/logs",
        "application/json",
        None,
        serde_json::to_vec(&logs).expect("json"),
    )
    .await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let rows = sql(
        http,
        "SELECT body, severity_number, trace_id, span_id, attributes_int['disk'] AS disk FROM logs",
    )
    .await;
    assert_eq!(
        rows,
        vec![json!({
            "body": "disk full", "severity_number": 17, "disk": 3,
            "trace_id": "5b8efff798038103d269b633813fc60c", "span_id": "eee19b7ec3c1b174"
        })]
    );

    // Refusals: what, and how exporters are told.
    // (path, content type, content encoding, body, expected status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        ("/v1/traces", "text/plain", None, b"hello".to_vec(), 415),
        (
            "/v1/traces",
            "application/json",
            None,
            b"{\"resourceSpans\": 3}".to_vec(),
            400,
        ),
        (
            "/v1/traces",
            "application/x-protobuf",
            None,
            vec![0x0a, 0xff, 0xff],
            400,
        ),
        (
            "/v1/traces",
            "application/x-protobuf",
            Some("gzip"),
            b"not gzip".to_vec(),
            400,
        ),
        (
            "/v1/traces",
            "application/x-protobuf",
            Some("br"),
            vec![],
            415,
        ),
        (
            "/v1/traces",
            "application/x-protobuf",
            Some("gzip"),
            gzip(&vec![0u8; 8 * 1024 * 1024]),
            413,
        ),
        (
            "/v1/traces",
            "application/x-protobuf",
            None,
            vec![0u8; 5 * 1024 * 1024],
            413,
        ),
    ];
    for (path, ct, enc, body, status) in cases {
        let resp = post(otlp, path, ct, enc, body).await;
        assert_eq!(resp.status().as_u16(), status, "{ct} {enc:?}");
    }
    let resp = post(
        otlp,
        "/v1/metrics",
        "application/x-protobuf",
        None,
        vec![0x0a, 0xff],
    )
    .await;
    assert_eq!(resp.status(), 400);
    let status = common::RpcStatus::decode(resp.bytes().await.expect("body")).expect("status");
    assert!(status.message.contains("malformed"), "{status:?}");

    // Nothing was lost to any of that.
    let rows = sql(http, "SELECT count(*) AS n FROM spans").await;
    assert_eq!(rows[0]["n"], (spans_in_fixture + 2) as u64);
    telemetry.stop().await;
}

#[test]
fn json_ids_and_integers_follow_the_otlp_json_mapping() {
    let json = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{
        "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
        "startTimeUnixNano":"1544712660000000000","kind":2,
        "attributes":[{"key":"n","value":{"intValue":"7"}}]}]}]}]}"#;
    let req: ExportTraceServiceRequest = serde_json::from_str(json).expect("OTLP JSON");
    let span = &req.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(span.trace_id[0], 0x5b);
    assert_eq!(span.span_id.len(), 8);
    assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
}
