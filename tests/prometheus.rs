//! The demo mesh read by the tools users already run: a real Prometheus scrapes the
//! telemetry service's `/metrics` (the mesh's `istio_*` families aggregated across every
//! sidecar), `promtool` lints the exposition, and what Prometheus stored, what SQL counts in
//! the stored spans, what the graph API reports and what the load generator sent all agree.
//!
//! Tolerance: once the load has stopped and the last exports are in, the three counts must
//! agree within 1% (or 2 requests): a sidecar drops spans (and counts the drop) only when its
//! exporter falls behind, which this light load never makes it do.

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lumen::demo::{self, DemoOptions};
use serde_json::{Value, json};

const REQUESTS: u64 = 600;

/// A binary of Debian's `prometheus` package: `LUMEN_<NAME>` or the one on PATH.
fn peer(name: &str) -> String {
    let var = format!("LUMEN_{}", name.to_ascii_uppercase());
    let path = std::env::var(&var).unwrap_or_else(|_| name.to_string());
    let ok = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "peer missing: `{path} --version` failed; run scripts/test-all (it installs Debian's \
         prometheus package) or set {var}"
    );
    path
}

/// Kills Prometheus when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn sql(http: SocketAddr, query: &str) -> Vec<Value> {
    let body: Value = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/sql"))
        .json(&json!({ "sql": query }))
        .send()
        .await
        .expect("sql request")
        .json()
        .await
        .expect("sql json");
    body["rows"].as_array().cloned().unwrap_or_default()
}

/// `sum by (destination_app)` of a PromQL query's instant vector.
async fn prometheus_by_app(prom: u16, query: &str) -> Vec<(String, f64)> {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await;
    let Ok(resp) = resp else { return Vec::new() };
    let body: Value = resp.json().await.unwrap_or_default();
    let mut out: Vec<(String, f64)> = body["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| {
                    let app = s["metric"]["destination_app"].as_str()?.to_string();
                    let v = s["value"][1].as_str()?.parse().ok()?;
                    Some((app, v))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= (0.01 * a.max(b)).max(2.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_and_every_count_agrees() {
    let prometheus = peer("prometheus");
    let promtool = peer("promtool");
    let data = tempfile::tempdir().expect("tempdir");
    let options = DemoOptions {
        rate_per_s: 40.0,
        load_duration: Some(Duration::from_secs(60)),
        max_requests: Some(REQUESTS),
        flush_interval: Duration::from_secs(2),
        span_export_interval: Duration::from_millis(500),
        metric_export_interval: Duration::from_secs(1),
        ..DemoOptions::ephemeral([127, 0, 78], data.path().join("lumen"))
    };
    let launched_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let running = demo::start(options, |line| eprintln!("{line}"))
        .await
        .expect("demo starts");
    let http = running.telemetry_http;

    // A real Prometheus scraping the telemetry service every second.
    let prom_port = free_port();
    let config = data.path().join("prometheus.yml");
    std::fs::File::create(&config)
        .and_then(|mut f| {
            writeln!(
                f,
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: lumen\n    static_configs:\n      - targets: ['{http}']\n"
            )
        })
        .expect("prometheus config");
    let _prometheus = Killed(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );

    // The load is bounded: wait (bounded) until every request has its answer.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        let l = &running.load;
        let done = l.ok.load(Ordering::Relaxed) + l.failed.load(Ordering::Relaxed);
        if l.sent.load(Ordering::Relaxed) >= REQUESTS && done >= REQUESTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sent = running.load.sent.load(Ordering::Relaxed);
    let ok = running.load.ok.load(Ordering::Relaxed);
    assert_eq!(sent, REQUESTS, "the load generator sent its requests");
    assert!(
        close(ok as f64, sent as f64),
        "productpage answered {ok} of {sent}"
    );

    // Prometheus (through its own query API) and SQL over the stored spans: the requests
    // each service received, by the reporter="destination" series and the server spans.
    let promql = r#"sum by (destination_app) (istio_requests_total{reporter="destination"})"#;
    let mut last = (Vec::new(), Vec::new());
    let settled = Instant::now();
    let mut agreed = false;
    while settled.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let prom = prometheus_by_app(prom_port, promql).await;
        let rows = sql(
            http,
            "SELECT service_name AS app, count(*) AS n FROM spans WHERE span_kind = 'server' \
             GROUP BY service_name ORDER BY service_name",
        )
        .await;
        let stored: Vec<(String, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["app"].as_str()?.to_string(), r["n"].as_f64()?)))
            .collect();
        agreed = prom.len() == 4
            && prom.len() == stored.len()
            && prom
                .iter()
                .zip(&stored)
                .all(|(p, s)| p.0 == s.0 && close(p.1, s.1))
            && prom.iter().all(|(_, n)| close(*n, sent as f64));
        last = (prom, stored);
        if agreed {
            break;
        }
    }
    if !agreed {
        // What the callers saw: the source side's codes and response flags say where the
        // missing requests ended.
        let seen = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
            .query(&[(
                "query",
                "sum by (source_app, destination_app, response_code, response_flags) \
                 (istio_requests_total{reporter=\"source\"})",
            )])
            .send()
            .await;
        let seen = match seen {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        // And each sidecar's own count (what it would export) and its dropped spans.
        let mut local = String::new();
        for pod in 1..=5 {
            let text =
                match reqwest::get(format!("http://127.0.78.{pod}:15090/stats/prometheus")).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
            for line in text.lines().filter(|l| {
                (l.starts_with("istio_requests_total") && l.contains("reporter=\"destination\""))
                    || l.starts_with("lumen_proxy_dropped_spans_total")
            }) {
                local.push_str(&format!("\n  127.0.78.{pod}: {line}"));
            }
        }
        panic!(
            "Prometheus {:?}, SQL {:?}, load generator {sent}: each of the four services should \
             have received every request; the callers saw {seen}; the sidecars count:{local}",
            last.0, last.1
        );
    }

    // The histogram reached Prometheus whole: its count agrees with the counter. Both are
    // read from the same scrape (the counter above may be a scrape older): asked again,
    // bounded, until one evaluation shows both.
    let histql = r#"sum by (destination_app) (istio_request_duration_milliseconds_count{reporter="destination"})"#;
    let settled = Instant::now();
    let (mut hist, mut counter) = (Vec::new(), Vec::new());
    while settled.elapsed() < Duration::from_secs(30) {
        hist = prometheus_by_app(prom_port, histql).await;
        counter = prometheus_by_app(prom_port, promql).await;
        if hist == counter && hist.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(hist, counter, "histogram counts equal the request counter");
    assert!(
        counter.iter().all(|(_, n)| close(*n, sent as f64)),
        "{counter:?}"
    );

    // The graph API: exactly the demo's edges, each carrying every request.
    let graph: Value = reqwest::get(format!(
        "http://{http}/api/v1/graph?start={}",
        launched_s.saturating_sub(60)
    ))
    .await
    .expect("graph")
    .json()
    .await
    .expect("graph json");
    let seconds = graph["seconds"].as_f64().expect("seconds");
    let mut edges: Vec<(String, String, f64, f64)> = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or_default().to_string(),
                e["target"].as_str().unwrap_or_default().to_string(),
                e["requests"].as_f64().unwrap_or_default(),
                e["rps"].as_f64().unwrap_or_default(),
            )
        })
        .collect();
    edges.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let names: Vec<(&str, &str)> = edges.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
    assert_eq!(
        names,
        [
            ("productpage", "details"),
            ("productpage", "reviews"),
            ("reviews", "ratings")
        ],
        "{graph}"
    );
    for (source, target, requests, rps) in &edges {
        assert!(
            close(*requests, sent as f64),
            "{source} → {target}: {requests} requests in the graph, {sent} sent"
        );
        assert!(
            (rps * seconds - requests).abs() <= 1e-6 * requests.max(1.0),
            "{source} → {target}: rate {rps}/s over {seconds} s is not {requests} requests"
        );
    }

    // promtool lints the exposition: nothing but the unit rule on Istio's `_milliseconds`.
    let body = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for family in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_sum",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(family)),
            "{family} in\n{body}"
        );
    }
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("body to promtool");
    let out = check.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "promtool could not parse the exposition: {said}"
    );
    let complaints: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        complaints.iter().all(|l| l.contains("_milliseconds")),
        "promtool: {complaints:#?}"
    );
    running.stop().await;
}
