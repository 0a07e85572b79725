//! End to end: the demo mesh on its own pod subnet and ephemeral ports, checked through SQL,
//! the dashboard and the sidecars' own endpoints.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen::demo::{self, DemoOptions};
use serde_json::{Value, json};

async fn sql(http: SocketAddr, query: &str) -> Vec<serde_json::Map<String, Value>> {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/sql"))
        .json(&json!({ "sql": query }))
        .send()
        .await
        .expect("sql request");
    let status = resp.status();
    let body: Value = resp.json().await.expect("sql json");
    assert!(status.is_success(), "{query}: {status} {body}");
    body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_object().expect("row").clone())
        .collect()
}

fn int(row: &serde_json::Map<String, Value>, key: &str) -> i64 {
    row.get(key)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{key} in {row:?}"))
}

async fn page(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("get")
        .text()
        .await
        .expect("body")
}

/// The number in `data-rate="..."` of the graph edge between two services.
fn edge_rate(html: &str, source: &str, destination: &str) -> Option<f64> {
    let marker = format!(r#"data-source="{source}" data-destination="{destination}" data-rate=""#);
    let start = html.find(&marker)? + marker.len();
    let end = start + html[start..].find('"')?;
    html[start..end].parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mesh_end_to_end() {
    let data = tempfile::tempdir().expect("tempdir");
    let options = DemoOptions {
        rate_per_s: 20.0,
        load_duration: Some(Duration::from_secs(60)),
        flush_interval: Duration::from_secs(2),
        span_export_interval: Duration::from_millis(500),
        metric_export_interval: Duration::from_secs(5),
        max_requests: None,
        ..DemoOptions::ephemeral([127, 0, 77], data.path().to_path_buf())
    };
    let launched = Instant::now();
    let running = demo::start(options, |line| eprintln!("{line}"))
        .await
        .expect("demo starts");
    let http = running.telemetry_http;

    // How long until the dashboard shows the whole graph (reported, not asserted: speed
    // belongs in benchmarks, and a busy CI machine must not fail this test).
    let edges = [
        ("productpage", "details"),
        ("productpage", "reviews"),
        ("reviews", "ratings"),
    ];
    while launched.elapsed() < Duration::from_secs(40) {
        let html = page(&running.dashboard_url()).await;
        if edges
            .iter()
            .all(|(s, d)| edge_rate(&html, s, d).is_some_and(|r| r > 0.0))
        {
            eprintln!(
                "dashboard showed every edge {:.1} s after launch",
                launched.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Wait (bounded) until enough traffic has been reported through the whole chain.
    let started = Instant::now();
    let mut reviews = 0;
    while started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rows = sql(http, "SELECT count(*) AS n FROM spans WHERE service_name = 'reviews' AND span_kind = 'server'").await;
        reviews = int(&rows[0], "n");
        if reviews >= 200 {
            break;
        }
    }
    assert!(
        reviews >= 100,
        "only {reviews} reviews server spans after {:?}",
        started.elapsed()
    );

    // The graph API: exactly the demo's edges, and reviews' two versions as nodes.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(600);
    let graph: Value = reqwest::get(format!("http://{http}/api/v1/graph?start={since}"))
        .await
        .expect("graph")
        .json()
        .await
        .expect("graph json");
    let mut graph_edges: Vec<(String, String)> = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or_default().to_string(),
                e["target"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    graph_edges.sort();
    graph_edges.dedup();
    assert_eq!(
        graph_edges,
        edges
            .iter()
            .map(|(s, d)| (s.to_string(), d.to_string()))
            .collect::<Vec<_>>(),
        "{graph}"
    );
    for id in ["reviews@v1", "reviews@v2", "ratings", "details"] {
        assert!(
            graph["nodes"].as_array().is_some_and(|n| n
                .iter()
                .any(|n| n["id"] == id && n["requests"].as_i64() > Some(0))),
            "graph node {id} with requests: {graph}"
        );
    }

    // Spans from all four services, with service.version as the pods' labels say.
    let rows = sql(http, "SELECT DISTINCT service_name, service_version FROM spans ORDER BY service_name, service_version").await;
    let seen: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["service_name"].as_str().unwrap_or("").to_string(),
                r["service_version"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("details", "v1"),
        ("productpage", "v1"),
        ("ratings", "v1"),
        ("reviews", "v1"),
        ("reviews", "v2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(seen, expected);

    // One trace: productpage (server, root) → productpage client → reviews server → reviews
    // client → ratings server, linked by parent span ids across services.
    let chain = sql(
        http,
        "SELECT s1.trace_id FROM spans s3 \
         JOIN spans c2 ON s3.trace_id = c2.trace_id AND s3.parent_span_id = c2.span_id \
         JOIN spans s2 ON c2.trace_id = s2.trace_id AND c2.parent_span_id = s2.span_id \
         JOIN spans c1 ON s2.trace_id = c1.trace_id AND s2.parent_span_id = c1.span_id \
         JOIN spans s1 ON c1.trace_id = s1.trace_id AND c1.parent_span_id = s1.span_id \
         WHERE s3.service_name = 'ratings' AND s3.span_kind = 'server' \
           AND c2.service_name = 'reviews' AND c2.span_kind = 'client' \
           AND s2.service_name = 'reviews' AND s2.span_kind = 'server' \
           AND c1.service_name = 'productpage' AND c1.span_kind = 'client' \
           AND s1.service_name = 'productpage' AND s1.span_kind = 'server' AND s1.parent_span_id IS NULL \
         LIMIT 1",
    )
    .await;
    assert_eq!(chain.len(), 1, "no productpage → reviews → ratings trace");

    // The VirtualService splits reviews 50/50. Binomial: allow 4 standard deviations. Each
    // version's sidecar exports its spans on its own, so the newest seconds may hold one's
    // and not yet the other's: only spans that started 5 s ago or more are counted.
    let split = sql(http, "SELECT service_version AS v, count(*) AS n FROM spans WHERE service_name = 'reviews' AND span_kind = 'server' AND start_time < now() - INTERVAL '5 seconds' GROUP BY service_version").await;
    let count = |v: &str| {
        split
            .iter()
            .find(|r| r["v"] == v)
            .map_or(0, |r| int(r, "n"))
    };
    let (v1, v2) = (count("v1"), count("v2"));
    let n = (v1 + v2) as f64;
    let share = v1 as f64 / n;
    let tolerance = 4.0 * (0.25 / n).sqrt();
    assert!(
        (share - 0.5).abs() <= tolerance,
        "reviews split v1={v1} v2={v2}: share {share:.3} outside 0.5 ± {tolerance:.3}"
    );

    // The dashboard names every service and every edge, with non-zero rates.
    let html = page(&running.dashboard_url()).await;
    for service in ["productpage", "details", "reviews", "ratings"] {
        let marks = html
            .matches(&format!(r#"data-service="{service}""#))
            .count();
        assert_eq!(
            marks, 2,
            "dashboard should show {service} as a graph node and a table row"
        );
    }
    for (s, d) in edges {
        let rate =
            edge_rate(&html, s, d).unwrap_or_else(|| panic!("dashboard lacks edge {s} → {d}"));
        assert!(rate > 0.0, "edge {s} → {d} has rate {rate}");
    }

    // The sidecars' Istio metrics count the same traffic.
    let stats = reqwest::get("http://127.0.77.3:15090/stats/prometheus")
        .await
        .expect("stats")
        .text()
        .await
        .expect("text");
    assert!(
        stats.contains(r#"istio_requests_total{reporter="source",source_workload="reviews-v1""#),
        "{stats}"
    );

    // The sidecars' OTLP metrics reached the metrics table with Istio's labels.
    let metrics = sql(
        http,
        "SELECT count(*) AS n FROM metrics WHERE metric_name = 'istio_requests_total' \
         AND attributes['reporter'] = 'destination' AND attributes['destination_service_name'] = 'ratings'",
    )
    .await;
    assert!(
        int(&metrics[0], "n") > 0,
        "no istio_requests_total points for ratings"
    );

    // An unknown host at the outbound listener is a clear 404, not a hang.
    let resp = reqwest::Client::new()
        .get("http://127.0.77.1:15001/anything")
        .header("host", "nosuchservice:9080")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("outbound answers");
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");
    let body = resp.text().await.expect("body");
    assert!(
        body.contains(r#"no route for host "nosuchservice:9080""#)
            && body.contains("reviews.default.svc.cluster.local"),
        "{body}"
    );

    // The sidecar recorded why it answered itself, and under which configuration.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let rows = sql(
            http,
            "SELECT attributes['lumen.reason'] AS reason, attributes['lumen.config.version'] AS config \
             FROM spans WHERE response_flags = 'NR'",
        )
        .await;
        if let Some(r) = rows.into_iter().next() {
            break r;
        }
        assert!(Instant::now() < deadline, "the NR span never arrived");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let reason = reply["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(r#"no route for host "nosuchservice:9080""#),
        "{reply:?}"
    );
    let config = reply["config"].as_str().unwrap_or_default();
    assert!(
        config.len() == 16 && config.bytes().all(|b| b.is_ascii_hexdigit()),
        "the RDS version the control plane sent: {reply:?}"
    );

    // The rollups keep both ends' namespaces, and the dashboard filters by them.
    let ns = sql(
        http,
        "SELECT DISTINCT namespace, source_namespace FROM rollups \
         WHERE kind = 'edge' AND service = 'ratings'",
    )
    .await;
    assert_eq!(ns.len(), 1, "{ns:?}");
    assert_eq!(ns[0]["namespace"], "default");
    assert_eq!(ns[0]["source_namespace"], "default");
    let html = page(&format!("{}?namespace=default", running.dashboard_url())).await;
    assert!(html.contains(r#"data-service="ratings""#));
    let html = page(&format!("{}?namespace=elsewhere", running.dashboard_url())).await;
    assert!(!html.contains(r#"data-service="ratings""#));

    // ratings' failures on its page: the app's own 500s, answered through its sidecar under
    // the clusters (CDS) version the control plane sent.
    let html = page(&format!(
        "{}service/ratings?range=1h",
        running.dashboard_url()
    ))
    .await;
    assert!(
        html.contains(r#"<td class="reason">the app answered 500</td><td>its sidecar</td><td>reviews</td><td><code>"#),
        "{html}"
    );
    assert!(
        html.contains(r#"<tr data-route="GET /ratings/{id}">"#),
        "per-route RED: {html}"
    );

    // Control plane reports every sidecar in sync.
    let syncz: Value = reqwest::get(format!("http://{}/debug/syncz", running.control_http))
        .await
        .expect("syncz")
        .json()
        .await
        .expect("json");
    let proxies = syncz.as_array().expect("array");
    assert_eq!(proxies.len(), 5);
    for p in proxies {
        for ty in ["CDS", "EDS", "LDS", "RDS"] {
            assert_eq!(p["types"][ty]["state"], "SYNCED", "{p}");
        }
    }

    // Ctrl-C equivalent: everything stops within a few seconds and the data is on disk.
    let seen_spans = int(&sql(http, "SELECT count(*) AS n FROM spans").await[0], "n");
    let stopping = Instant::now();
    running.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        stopping.elapsed()
    );
    let store = std::sync::Arc::new(lumen_telemetry::Store::open(data.path()).expect("reopen"));
    let engine = lumen_telemetry::QueryEngine::new(store.clone());
    let after = engine
        .sql("SELECT count(*) AS n FROM spans")
        .await
        .expect("query");
    let flushed = after.rows[0]["n"].as_i64().expect("n");
    assert!(
        flushed >= seen_spans,
        "flushed {flushed} < seen {seen_spans}"
    );

    // DuckDB and pyarrow read the same files on their own and agree with Lumen's SQL.
    assert_eq!(
        store.spans.buffered_rows(),
        0,
        "a clean stop flushed everything"
    );
    let python = common::python_with(&["duckdb", "pyarrow"]);
    let script = format!(
        "{}/tests/python/read_parquet.py",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(data.path())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "read_parquet.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readers: Value = serde_json::from_slice(&out.stdout).expect("json");
    let one = |sql: &str| {
        let engine = engine.clone();
        let sql = sql.to_string();
        async move {
            let r = engine.sql(&sql).await.expect("query");
            r.rows[0]["v"].clone()
        }
    };
    let mut by_service = serde_json::Map::new();
    for row in engine
        .sql("SELECT service_name, count(*) AS n FROM spans GROUP BY 1 ORDER BY 1")
        .await
        .expect("query")
        .rows
    {
        by_service.insert(
            row["service_name"].as_str().expect("service").to_string(),
            row["n"].clone(),
        );
    }
    let lumen = json!({
        "rows": one("SELECT count(*) AS v FROM spans").await,
        "traces": one("SELECT count(DISTINCT trace_id) AS v FROM spans").await,
        "errors": one("SELECT count(*) AS v FROM spans WHERE status_code = 'error'").await,
        "by_service": by_service,
        "duration_sum": one("SELECT sum(duration_ns) AS v FROM spans").await,
        "events": one("SELECT coalesce(sum(cardinality(events)), 0) AS v FROM spans").await,
        "route_attr": one("SELECT count(*) AS v FROM spans WHERE upstream_cluster IS NOT NULL").await,
    });
    for reader in ["duckdb", "pyarrow"] {
        for (key, value) in lumen.as_object().expect("object") {
            // pyarrow has no map lookup to count an attribute's presence with.
            if reader == "pyarrow" && key == "route_attr" {
                continue;
            }
            let theirs = readers[reader]
                .get(key)
                .unwrap_or_else(|| panic!("{reader} did not report {key}: {readers}"));
            assert_eq!(theirs, value, "{reader} disagrees with Lumen on {key}");
        }
    }
    assert_eq!(
        readers["pyarrow"]["schema_versions"],
        json!([lumen_telemetry::schema::SCHEMA_VERSION])
    );
    assert!(
        tokio::net::TcpStream::connect("127.0.77.1:15001")
            .await
            .is_err(),
        "sidecar still listening after stop"
    );
}
