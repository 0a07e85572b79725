//! The SQL API describes itself and speaks Arrow: `GET /api/v1/tables` lists every table's
//! columns with their Arrow types, and `POST /api/v1/sql` answers with an Arrow IPC stream
//! when the request's Accept asks for one (JSON otherwise).

mod common;

use std::time::Duration;

use datafusion::arrow::ipc::reader::StreamReader;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};

#[tokio::test]
async fn tables_are_listed_and_results_come_as_arrow_when_asked() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    let mut req = common::one_span("checkout");
    let first = req.resource_spans[0].scope_spans[0].spans[0].clone();
    req.resource_spans[0].scope_spans[0].spans = (1..=5u8)
        .map(|i| Span {
            span_id: vec![i; 8],
            ..first.clone()
        })
        .collect();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/traces", svc.otlp_http))
        .header("content-type", "application/x-protobuf")
        .body(req.encode_to_vec())
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status(), 200);

    let tables: Value = reqwest::get(format!("http://{}/api/v1/tables", svc.http))
        .await
        .expect("tables")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = tables["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["spans", "metrics", "logs", "rollups"]);
    let spans = &tables["tables"][0];
    assert_eq!(spans["time_column"], "start_time");
    let column = |name: &str| {
        spans["columns"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        column("trace_id"),
        json!({"name": "trace_id", "type": "FixedSizeBinary(16)", "nullable": false})
    );
    assert_eq!(column("duration_ns")["type"], "Int64");
    assert!(
        column("attributes_int")["type"]
            .as_str()
            .is_some_and(|t| t.contains("Int64"))
    );

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{}/api/v1/sql", svc.http))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(
            &json!({ "sql": "SELECT trace_id, span_id, duration_ns FROM spans ORDER BY span_id" }),
        )
        .send()
        .await
        .expect("sql");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    assert_eq!(resp.headers()["x-lumen-truncated"], "false");
    let body = resp.bytes().await.expect("body");
    let reader = StreamReader::try_new(std::io::Cursor::new(body.to_vec()), None).expect("IPC");
    let schema = reader.schema();
    assert_eq!(
        schema.field(0).data_type().to_string(),
        "FixedSizeBinary(16)"
    );
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 5);

    // Without the Accept, the same query is JSON, ids as hex.
    let json_rows: Value = client
        .post(format!("http://{}/api/v1/sql", svc.http))
        .json(&json!({ "sql": "SELECT trace_id FROM spans LIMIT 1" }))
        .send()
        .await
        .expect("sql")
        .json()
        .await
        .expect("json");
    assert_eq!(
        json_rows["rows"][0]["trace_id"].as_str().map(str::len),
        Some(32)
    );
    svc.stop().await;
}

/// One call of the graph test: which trace, who reported it, how it went.
struct Call<'a> {
    n: u8,
    service: &'a str,
    version: &'a str,
    kind: u8,
    peer: Option<&'a str>,
    start_ns: i64,
    ms: i64,
    error: bool,
}

/// One span as OTLP JSON.
fn span(call: Call<'_>) -> Value {
    let Call {
        n,
        service,
        version,
        kind,
        peer,
        start_ns,
        ms,
        error,
    } = call;
    let mut attributes =
        vec![json!({ "key": "http.response.body.size", "value": { "intValue": "100" } })];
    if let Some(p) = peer {
        attributes.push(json!({ "key": "peer.service", "value": { "stringValue": p } }));
    }
    json!({ "resource": { "attributes": [
            { "key": "service.name", "value": { "stringValue": service } },
            { "key": "service.version", "value": { "stringValue": version } }
        ]},
        "scopeSpans": [{ "spans": [{
            // n + 1: an all-zero id is not a trace.
            "traceId": format!("{:032x}", u64::from(n) + 1),
            "spanId": format!("{:016x}", (u64::from(n) + 1) * 10 + u64::from(kind)),
            "name": "call", "kind": kind,
            "startTimeUnixNano": start_ns.to_string(),
            "endTimeUnixNano": (start_ns + ms * 1_000_000).to_string(),
            "attributes": attributes,
            "status": { "code": if error { 2 } else { 0 } }
        }]}]
    })
}

#[tokio::test]
async fn the_graph_has_versioned_nodes_and_edges_with_their_signals() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    let now = lumen_telemetry::now_ns();
    let t0 = now - 120_000_000_000;
    let mut resource_spans = Vec::new();
    // 10 calls productpage → reviews: 6 served by v1 (one fails), 4 by v2 (slow).
    for n in 0..10u8 {
        let start = t0 + i64::from(n) * 1_000_000_000;
        let (version, ms, error) = if n < 6 {
            ("v1", 5, n == 0)
        } else {
            ("v2", 200, false)
        };
        resource_spans.push(span(Call {
            n,
            service: "productpage",
            version: "v1",
            kind: 3,
            peer: Some("reviews"),
            start_ns: start,
            ms: ms + 1,
            error,
        }));
        resource_spans.push(span(Call {
            n,
            service: "reviews",
            version,
            kind: 2,
            peer: None,
            start_ns: start,
            ms,
            error,
        }));
    }
    common::export_json(svc.otlp_http, &json!({ "resourceSpans": resource_spans })).await;

    let url = format!(
        "http://{}/api/v1/graph?start={}&end={}",
        svc.http,
        (t0 - 60_000_000_000) / 1_000_000_000,
        now / 1_000_000_000 + 1
    );
    let graph: Value = reqwest::get(&url)
        .await
        .expect("graph")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids, ["reviews", "reviews@v1", "reviews@v2"], "{graph:#}");
    let node = |id: &str| {
        graph["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(node("reviews")["requests"], 10);
    assert_eq!(node("reviews@v1")["requests"], 6);
    assert_eq!(node("reviews@v1")["errors"], 1);
    assert_eq!(node("reviews@v2")["requests"], 4);
    assert!(
        node("reviews@v2")["p50_ms"]
            .as_f64()
            .is_some_and(|p| p > 100.0),
        "{graph:#}"
    );
    assert!(
        node("reviews@v1")["p99_ms"]
            .as_f64()
            .is_some_and(|p| p < 10.0),
        "{graph:#}"
    );
    let edges = graph["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 1, "{graph:#}");
    let e = &edges[0];
    assert_eq!(
        (e["source"].as_str(), e["target"].as_str()),
        (Some("productpage"), Some("reviews"))
    );
    assert_eq!(e["requests"], 10);
    assert_eq!(e["error_share"], 0.1);
    assert_eq!(e["response_bytes"], 1000);
    assert!(e["rps"].as_f64().is_some_and(|r| r > 0.0));
    assert_eq!(e.get("source_version"), None, "service-level edge");
    let w = &graph["workload_edges"];
    assert_eq!(w.as_array().map(Vec::len), Some(1), "{graph:#}");
    assert_eq!(w[0]["source_version"], "v1");
    assert_eq!(w[0]["requests"], 10);

    for bad in [
        "start=200&end=100",
        "start=later",
        "start=0&end=99999999999",
    ] {
        let resp = reqwest::get(format!("http://{}/api/v1/graph?{bad}", svc.http))
            .await
            .expect("graph");
        assert_eq!(resp.status(), 400, "{bad}");
    }
    svc.stop().await;
}
