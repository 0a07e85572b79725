//! The dashboard's pages on the running demo (issue 7's performance section, demo scale): each
//! page's server time as Chromium's Navigation Timing sees it (responseEnd − requestStart,
//! p95 of `LUMEN_BENCH_RUNS` loads, default 30) and its transferred weight, beside the same
//! data fetched straight from the query API from the same page. Goal: every page under
//! 100 ms p95 on the demo and under 200 KB.
//!
//! Run with `cargo bench --locked --bench dashboard` (needs the browser peers that
//! `scripts/test-all` installs: Chromium and playwright-core).

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
    let plan_path = data.path().join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).expect("plan");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/dashboard_timing.cjs");
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
    println!("dashboard benchmark: {runs} loads of each page on the running demo");
    println!(
        "| page | server p95 (Navigation Timing) | same data from the API, p95 | ratio | weight | goal |"
    );
    println!("|---|---|---|---|---|---|");
    for p in report["pages"].as_array().expect("pages") {
        let ms = p["p95_ms"].as_f64().unwrap_or(f64::NAN);
        let api = p["api_p95_ms"].as_f64();
        let kb = p["bytes"].as_f64().unwrap_or(0.0) / 1024.0;
        println!(
            "| {} | {ms:.1} ms | {} | {} | {kb:.1} KB | < 100 ms, < 200 KB — {} |",
            p["name"].as_str().unwrap_or_default(),
            api.map_or_else(|| "—".to_string(), |a| format!("{a:.1} ms")),
            api.map_or_else(|| "—".to_string(), |a| format!("{:.2}", ms / a)),
            if ms < 100.0 && kb < 200.0 {
                "reached"
            } else {
                "not reached"
            }
        );
    }
    running.stop().await;
}
