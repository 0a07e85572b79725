//! The user's paths through the `lumen` binary: `lumen demo` starts, says where the dashboard
//! is, serves it and stops cleanly on Ctrl-C; `lumen telemetry` takes traces, metrics and
//! logs from the real OpenTelemetry Python SDK over OTLP/gRPC and OTLP/HTTP and gives them
//! back through SQL intact.

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
        "--otlp-http",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--jaeger-grpc",
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

/// Runs SQL against a `lumen telemetry` HTTP address; returns the rows.
fn sql_rows(http: &str, query: &str) -> Vec<Value> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(common::sql_rows(http, query))
}

#[test]
fn telemetry_binary_round_trips_python_sdk_traces_metrics_and_logs_over_grpc_and_http() {
    let python = common::python_with_otel_sdk();
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let (mut lumen, addrs) = Lumen::telemetry(&data_dir, &["--flush-interval", "1"]);
    let http = addrs.http.clone();
    let script = format!(
        "{}/tests/python/otlp_send.py",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    );
    for (protocol, endpoint) in [("grpc", &addrs.grpc), ("http", &addrs.otlp_http)] {
        let service = format!("sdk-checkout-{protocol}");
        let out = std::process::Command::new(&python)
            .args([script.as_str(), protocol, endpoint, &service])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python SDK over {protocol} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(trace_id.len(), 32, "trace id {trace_id:?}");
        check_sdk_trace(&http, &trace_id, &service);
        check_sdk_metrics_and_logs(&http, &trace_id, &service);
    }
    // Once more after a flush, so the reads cover Parquet files too.
    std::thread::sleep(Duration::from_millis(1500));
    let rows = sql_rows(
        &http,
        "SELECT service_name, count(*) AS n FROM spans GROUP BY service_name ORDER BY service_name",
    );
    assert_eq!(
        rows,
        vec![
            json!({"service_name": "sdk-checkout-grpc", "n": 3}),
            json!({"service_name": "sdk-checkout-http", "n": 3})
        ]
    );
    lumen.interrupt(Duration::from_secs(15));
    let manifest =
        std::fs::read_to_string(data.path().join("spans/manifest.json")).expect("spans manifest");
    assert!(manifest.contains(".parquet"), "spans flushed to Parquet");
}

/// The SDK's spans came through intact: kinds, status, parent link, semconv columns,
/// attributes in the map of their type, resource and scope.
fn check_sdk_trace(http: &str, trace_id: &str, service: &str) {
    let query = format!(
        "SELECT span_name, span_kind, service_name, service_version, status_code, status_message, \
                http_request_method, url_path, http_response_status_code, rpc_system, rpc_service, rpc_method, \
                attributes_int['cart.items'] AS items, attributes_double['cart.total'] AS total, \
                attributes_bool['cart.gift'] AS gift, attributes['cart.tags'] AS tags, attributes['user.note'] AS note, \
                attributes['cart.items'] AS items_as_text, arrow_typeof(attributes_int['cart.items']) AS items_type, \
                resource_attributes['deployment.environment'] AS env, scope_name, scope_version, \
                parent_span_id, span_id, duration_ns, events, links, flags \
         FROM spans WHERE trace_id = '{trace_id}' ORDER BY span_name"
    );
    let rows = sql_rows(http, &query);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (charge, checkout) = (&rows[0], &rows[1]);
    assert_eq!(checkout["span_name"], "checkout");
    assert_eq!(checkout["span_kind"], "server");
    assert_eq!(checkout["service_name"], service);
    assert_eq!(checkout["service_version"], "1.2.3");
    assert_eq!(checkout["http_request_method"], "POST");
    assert_eq!(checkout["url_path"], "/checkout");
    assert_eq!(checkout["http_response_status_code"], 200);
    assert_eq!(checkout["items"], 3);
    assert_eq!(checkout["items_type"], "Int64");
    assert!(
        checkout.get("items_as_text").is_none_or(Value::is_null),
        "an int attribute is not also in the string map: {checkout}"
    );
    assert_eq!(checkout["total"], 12.5);
    assert_eq!(checkout["gift"], true);
    assert_eq!(checkout["tags"], r#"["a","b"]"#);
    assert_eq!(checkout["note"], "ünïcode ✓");
    assert_eq!(checkout["env"], "test");
    assert_eq!(checkout["scope_name"], "lumen-conformance");
    assert_eq!(checkout["scope_version"], "0.1");
    assert!(
        checkout.get("parent_span_id").is_none_or(Value::is_null),
        "root has no parent"
    );
    let events = checkout["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{checkout}");
    assert_eq!(events[0]["name"], "cart validated");
    assert_eq!(events[0]["attributes"]["cart.items"], "3");
    let links = checkout["links"].as_array().expect("links");
    assert_eq!(links.len(), 1, "{checkout}");
    assert_eq!(links[0]["attributes"]["link.kind"], "follows");
    assert_eq!(links[0]["trace_id"].as_str().map(str::len), Some(32));
    assert!(checkout["flags"].as_i64().is_some(), "{checkout}");
    assert_eq!(charge["events"], json!([]));
    assert_eq!(charge["span_name"], "charge card");
    assert_eq!(charge["span_kind"], "client");
    assert_eq!(charge["status_code"], "error");
    assert_eq!(charge["status_message"], "card declined");
    assert_eq!(charge["rpc_system"], "grpc");
    assert_eq!(charge["rpc_service"], "payments.Charger");
    assert_eq!(charge["rpc_method"], "Charge");
    assert_eq!(charge["parent_span_id"], checkout["span_id"]);
    assert!(charge["duration_ns"].as_i64().is_some_and(|d| d >= 0));
}

/// The SDK's metrics (a counter and a histogram; cumulative, so the SDK sends the same
/// points at its flush and again at shutdown) and its two log records, one of them inside
/// the trace, came through.
fn check_sdk_metrics_and_logs(http: &str, trace_id: &str, service: &str) {
    let rows = sql_rows(
        http,
        &format!(
            "SELECT DISTINCT metric_name, metric_type, unit, value, count, sum, attributes['payment'] AS payment \
             FROM metrics WHERE service_name = '{service}' ORDER BY metric_name"
        ),
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["metric_name"], "checkout.duration");
    assert_eq!(rows[0]["metric_type"], "histogram");
    assert_eq!(rows[0]["count"], 3);
    assert_eq!(rows[0]["sum"], 267.0);
    assert_eq!(rows[1]["metric_name"], "orders");
    assert_eq!(rows[1]["metric_type"], "sum");
    assert_eq!(rows[1]["value"], 2.0);
    assert_eq!(rows[1]["payment"], "card");
    let rows = sql_rows(
        http,
        &format!(
            "SELECT body, severity_text, severity_number, trace_id, attributes_int['order.id'] AS order_id \
             FROM logs WHERE service_name = '{service}' ORDER BY severity_number"
        ),
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["body"], "order placed");
    assert_eq!(rows[0]["severity_text"], "INFO");
    assert_eq!(rows[0]["severity_number"], 9);
    assert_eq!(rows[0]["trace_id"], trace_id, "logged inside the span");
    assert_eq!(rows[0]["order_id"], 42);
    assert_eq!(rows[1]["body"], "card declined");
    assert_eq!(rows[1]["severity_text"], "ERROR");
}
