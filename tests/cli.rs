//! The user's paths through the `lumen` binary: `lumen demo` starts, says where the dashboard
//! is, serves it and stops cleanly on Ctrl-C; `lumen telemetry` takes spans from the real
//! OpenTelemetry Python SDK over OTLP/gRPC and gives them back through SQL intact.

mod common;

use std::time::Duration;

use common::Lumen;
use serde_json::{Value, json};

#[test]
fn demo_binary_starts_serves_and_stops_on_ctrl_c() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let mut lumen = Lumen::spawn(&[
        "demo",
        "--pod-subnet",
        "127.0.78",
        "--otlp-grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--xds",
        "127.0.0.1:0",
        "--control-http",
        "127.0.0.1:0",
        "--duration",
        "120",
        "--data",
        &data_dir,
    ]);
    let url = lumen.wait_for_line("dashboard: ", Duration::from_secs(30));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Some traffic, and a dashboard that answers.
    std::thread::sleep(Duration::from_secs(4));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let html = rt.block_on(async {
        reqwest::get(&url)
            .await
            .expect("dashboard")
            .text()
            .await
            .expect("html")
    });
    assert!(html.contains("Lumen service mesh"));

    let took = lumen.interrupt(Duration::from_secs(15));
    eprintln!("lumen demo exited {:.2} s after SIGINT", took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    let files = std::fs::read_dir(data.path().join("spans"))
        .expect("spans dir")
        .count();
    assert!(files > 0, "no Parquet files flushed");
    let lines: Vec<String> = lumen.lines.try_iter().collect();
    assert!(lines.iter().any(|l| l == "stopped"), "{lines:?}");
}

#[test]
fn telemetry_binary_round_trips_python_sdk_spans() {
    let python = common::python_with_otel_sdk();
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let (mut lumen, grpc, http, _wal) = Lumen::telemetry(&data_dir, &["--flush-interval", "1"]);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/otlp_send.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(grpc)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(trace_id.len(), 32, "trace id {trace_id:?}");

    // Let a flush happen so the read covers Parquet files too.
    std::thread::sleep(Duration::from_millis(1500));
    let query = format!(
        "SELECT span_name, span_kind, service_name, service_version, status_code, status_message, \
                http_request_method, url_path, http_response_status_code, rpc_system, rpc_service, rpc_method, \
                attributes['cart.items'] AS items, attributes['cart.total'] AS total, \
                attributes['cart.gift'] AS gift, attributes['cart.tags'] AS tags, attributes['user.note'] AS note, \
                resource_attributes['deployment.environment'] AS env, scope_name, scope_version, \
                parent_span_id, span_id, duration_ns \
         FROM spans WHERE trace_id = '{trace_id}' ORDER BY span_name"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let body: Value = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("http://{http}/api/v1/sql"))
            .json(&json!({ "sql": query }))
            .send()
            .await
            .expect("sql");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("json")
    });
    let rows = body["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{body}");
    let (charge, checkout) = (&rows[0], &rows[1]);
    assert_eq!(checkout["span_name"], "checkout");
    assert_eq!(checkout["span_kind"], "server");
    assert_eq!(checkout["service_name"], "sdk-checkout");
    assert_eq!(checkout["service_version"], "1.2.3");
    assert_eq!(checkout["http_request_method"], "POST");
    assert_eq!(checkout["url_path"], "/checkout");
    assert_eq!(checkout["http_response_status_code"], 200);
    assert_eq!(checkout["items"], "3");
    assert_eq!(checkout["total"], "12.5");
    assert_eq!(checkout["gift"], "true");
    assert_eq!(checkout["tags"], r#"["a","b"]"#);
    assert_eq!(checkout["note"], "ünïcode ✓");
    assert_eq!(checkout["env"], "test");
    assert_eq!(checkout["scope_name"], "lumen-conformance");
    assert_eq!(checkout["scope_version"], "0.1");
    assert!(
        checkout.get("parent_span_id").is_none_or(Value::is_null),
        "root has no parent"
    );
    assert_eq!(charge["span_name"], "charge card");
    assert_eq!(charge["span_kind"], "client");
    assert_eq!(charge["status_code"], "error");
    assert_eq!(charge["status_message"], "card declined");
    assert_eq!(charge["rpc_system"], "grpc");
    assert_eq!(charge["rpc_service"], "payments.Charger");
    assert_eq!(charge["rpc_method"], "Charge");
    assert_eq!(charge["parent_span_id"], checkout["span_id"]);
    assert!(charge["duration_ns"].as_i64().is_some_and(|d| d >= 0));

    lumen.interrupt(Duration::from_secs(15));
    assert!(
        std::fs::read_dir(data.path().join("spans"))
            .expect("spans dir")
            .count()
            > 0,
        "spans flushed to Parquet"
    );
}
