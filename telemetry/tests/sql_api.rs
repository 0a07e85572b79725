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
