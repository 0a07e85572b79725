//! The real OpenTelemetry Python SDK sends spans to `lumen telemetry` over OTLP/gRPC; they
//! come back through SQL with their attributes, kinds, status and parent link intact.

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_spans_round_trip() {
    let python = common::python_with_otel_sdk();
    let telemetry = common::start_telemetry(Duration::from_millis(300)).await;
    let (grpc, engine) = (telemetry.grpc, telemetry.engine.clone());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/otlp_send.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .arg(grpc.to_string())
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(trace_id.len(), 32, "trace id {trace_id:?}");

    // Let at least one flush happen so the read spans Parquet files too.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let result = engine
        .sql(&format!(
            "SELECT span_name, span_kind, service_name, service_version, status_code, status_message, \
                    http_request_method, url_path, http_response_status_code, rpc_system, rpc_service, rpc_method, \
                    attributes['cart.items'] AS items, attributes['cart.total'] AS total, \
                    attributes['cart.gift'] AS gift, attributes['cart.tags'] AS tags, attributes['user.note'] AS note, \
                    resource_attributes['deployment.environment'] AS env, scope_name, scope_version, \
                    parent_span_id, span_id, duration_ns \
             FROM spans WHERE trace_id = '{trace_id}' ORDER BY span_name"
        ))
        .await
        .expect("query");
    assert_eq!(result.rows.len(), 2, "{:?}", result.rows);
    let charge = &result.rows[0];
    let checkout = &result.rows[1];
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
        checkout.get("parent_span_id").is_none_or(|v| v.is_null()),
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

    telemetry.stop().await;
}
