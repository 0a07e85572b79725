//! The dashboard's pages on the running demo (issue 7's performance section, demo scale): each
//! page's server time as Chromium's Navigation Timing sees it (responseEnd − requestStart,
//! p95 of `LUMEN_BENCH_RUNS` loads, default 30) and its transferred weight, beside the same
//! data fetched straight from the query API from the same page. Goal: every page under
//! 100 ms p95 on the demo and under 200 KB.
//!
//! Run with `cargo bench --locked --bench dashboard` (needs the browser peers that
//! `scripts/test-all` installs: Chromium and playwright-core).
//!
//! At scale: with `LUMEN_BENCH_STORE=DIR` naming a store the telemetry benchmark left
//! (`LUMEN_BENCH_DATA=DIR LUMEN_BENCH_SPANS=10000000 scripts/bench-telemetry`: ten million
//! spans of the demo's shape over 2025-10-09), the same pages are timed again over that store,
//! served as `lumen telemetry` serves it, with windows inside that day. Goal: under 300 ms p95.

use std::time::{Duration, Instant};

use lumen::demo::{self, DemoOptions};
use serde_json::{Value, json};

fn main() {
    let runs: usize = std::env::var("LUMEN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(runs));
    if let Some(store) = std::env::var_os("LUMEN_BENCH_STORE") {
        rt.block_on(bench_store(std::path::PathBuf::from(store), runs));
    }
}

/// Loads each page of `plan` in Chromium and prints the table; `goal_ms` is the p95 goal.
async fn time_pages(plan: &Value, dir: &std::path::Path, title: &str, goal_ms: f64) {
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).expect("plan");
    let script = format!(
        "{}/benches/dashboard_timing.cjs",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    );
    let out =
        tokio::process::Command::new(std::env::var("LUMEN_NODE").unwrap_or_else(|_| "node".into()))
            .arg(script)
            .arg(&plan_path)
            .output()
            .await
            .expect("node runs (install Node.js, or set LUMEN_NODE)");
    assert!(
        out.status.success(),
        "the browser run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    println!("{title}");
    println!(
        "| page | server p95 (Navigation Timing) | same data from the API, p95 | ratio | weight | goal |"
    );
    println!("|---|---|---|---|---|---|");
    for p in report["pages"].as_array().expect("pages") {
        let ms = p["p95_ms"].as_f64().unwrap_or(f64::NAN);
        let api = p["api_p95_ms"].as_f64();
        let kb = p["bytes"].as_f64().unwrap_or(0.0) / 1024.0;
        println!(
            "| {} | {ms:.1} ms | {} | {} | {kb:.1} KB | < {goal_ms:.0} ms, < 200 KB — {} |",
            p["name"].as_str().unwrap_or_default(),
            api.map_or_else(|| "—".to_string(), |a| format!("{a:.1} ms")),
            api.map_or_else(|| "—".to_string(), |a| format!("{:.2}", ms / a)),
            if ms < goal_ms && kb < 200.0 {
                "reached"
            } else {
                "not reached"
            }
        );
    }
}

/// The pages over a large store (the telemetry benchmark's corpus of 2025-10-09).
async fn bench_store(dir: std::path::PathBuf, runs: usize) {
    use lumen_telemetry::{Telemetry, TelemetryOptions};
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut options = TelemetryOptions::new(dir.clone());
    options.otlp_grpc_addr = any;
    options.otlp_http_addr = any;
    options.http_addr = any;
    options.jaeger_grpc_addr = any;
    // The corpus is a year old: keep it whatever its age.
    options.store.retention_age = None;
    options.store.rollup_retention_age = None;
    let telemetry = Telemetry::bind(options)
        .await
        .expect("telemetry on the store");
    let spans: u64 = telemetry.store().spans.files().iter().map(|f| f.rows).sum();
    let base = format!("http://{}", telemetry.http_addr().expect("http"));
    let dashboard = lumen_dashboard::router(std::sync::Arc::new(telemetry.query_engine()));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move { telemetry.run(dashboard, stop).await }
    });
    // 2025-10-09: the whole day, and its noon hour.
    let day = 1_759_968_000i64;
    let (noon, one) = (day + 12 * 3600, day + 13 * 3600);
    let body: Value = reqwest::Client::new()
        .post(format!("{base}/api/v1/sql"))
        .json(&json!({"sql": format!(
            "SELECT trace_id FROM spans WHERE service_name = 'ratings' AND http_response_status_code = 500 \
             AND start_time >= to_timestamp({noon}) AND start_time < to_timestamp({one}) LIMIT 1"
        )}))
        .send()
        .await
        .expect("sql")
        .json()
        .await
        .expect("json");
    let trace = body["rows"][0]["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no ratings request that answered 500 at noon: {body}"))
        .to_string();
    let (us0, us1) = (noon * 1_000_000, one * 1_000_000);
    let plan = json!({
        "base": base,
        "runs": runs,
        "pages": [
            {"name": "graph, services, 24 h", "path": format!("/?start={day}&end={}&refresh=0", day + 86_400), "api": format!("/api/v1/graph?start={day}&end={}", day + 86_400)},
            {"name": "graph, versioned apps, 24 h", "path": format!("/?view=versioned&start={day}&end={}&refresh=0", day + 86_400), "api": format!("/api/v1/graph?start={day}&end={}", day + 86_400)},
            {"name": "service ratings, 1 h", "path": format!("/service/ratings?start={noon}&end={one}&refresh=0"), "api": format!("/api/traces?service=ratings&start={us0}&end={us1}&limit=20&tags=%7B%22error%22%3A%22true%22%7D")},
            {"name": "trace", "path": format!("/trace/{trace}"), "api": format!("/api/traces/{trace}")},
            {"name": "trace search, 1 h", "path": format!("/traces?service=ratings&start={us0}&end={us1}"), "api": format!("/api/traces?service=ratings&start={us0}&end={us1}&limit=20")},
            {"name": "SQL console (count by service, whole store)", "path": "/sql?q=SELECT%20service_name%2C%20count(*)%20FROM%20spans%20GROUP%20BY%201", "api": null}
        ]
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    time_pages(
        &plan,
        tmp.path(),
        &format!(
            "dashboard benchmark at scale: {runs} loads of each page over {spans} stored spans"
        ),
        300.0,
    )
    .await;
    stop.cancel();
    let _ = server.await;
}

async fn bench(runs: usize) {
    let data = tempfile::tempdir().expect("tempdir");
    let options = DemoOptions {
        rate_per_s: 20.0,
        load_duration: Some(Duration::from_secs(600)),
        flush_interval: Duration::from_secs(2),
        span_export_interval: Duration::from_millis(500),
        metric_export_interval: Duration::from_secs(1),
        ..DemoOptions::ephemeral([127, 0, 81], data.path().to_path_buf())
    };
    let running = demo::start(options, |_| {}).await.expect("demo starts");
    let base = format!("http://{}", running.telemetry_http);
    // A minute of traffic, and a failed ratings request to open.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut trace = String::new();
    while started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let body: Value = client
            .post(format!("{base}/api/v1/sql"))
            .json(
                &json!({"sql": "SELECT trace_id FROM spans WHERE service_name = 'ratings' \
                AND status_code = 'error' ORDER BY start_time DESC LIMIT 1"}),
            )
            .send()
            .await
            .expect("sql")
            .json()
            .await
            .unwrap_or_default();
        if let Some(id) = body["rows"][0]["trace_id"].as_str() {
            trace = id.to_string();
        }
        if !trace.is_empty() && started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    assert!(!trace.is_empty(), "no failed ratings request to open");
    let now = lumen_telemetry::now_ns() / 1_000_000_000;
    let plan = json!({
        "base": base,
        "runs": runs,
        "pages": [
            {"name": "graph, services", "path": "/?refresh=0", "api": format!("/api/v1/graph?start={}", now - 900)},
            {"name": "graph, versioned apps", "path": "/?view=versioned&refresh=0", "api": format!("/api/v1/graph?start={}", now - 900)},
            {"name": "service ratings", "path": "/service/ratings?refresh=0", "api": "/api/traces?service=ratings&lookback=15m&limit=20&tags=%7B%22error%22%3A%22true%22%7D"},
            {"name": "trace", "path": format!("/trace/{trace}"), "api": format!("/api/traces/{trace}")},
            {"name": "trace search", "path": "/traces?service=ratings&lookback=15m", "api": "/api/traces?service=ratings&lookback=15m&limit=20"},
            {"name": "proxies", "path": "/proxies", "api": null},
            {"name": "SQL console", "path": "/sql?q=SELECT%20service_name%2C%20count(*)%20FROM%20spans%20GROUP%20BY%201", "api": null}
        ]
    });
    time_pages(
        &plan,
        data.path(),
        &format!("dashboard benchmark: {runs} loads of each page on the running demo"),
        100.0,
    )
    .await;
    running.stop().await;
}
