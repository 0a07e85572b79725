//! The dashboard in a real browser: headless Chromium driven by playwright-core
//! (`tests/browser/visit.cjs`) against the running demo. The page loads with no console or
//! page error, asks no origin but its own, and draws the demo's services and calls.
//! Screenshots go to the target directory as test artifacts.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lumen::demo::{self, DemoOptions};
use serde_json::{Value, json};

/// node, playwright-core and Chromium, as `scripts/test-all` installs them; a clear failure
/// when one is missing.
fn peers() -> (String, PathBuf, String) {
    let node = std::env::var("LUMEN_NODE").unwrap_or_else(|_| "node".into());
    let modules = std::env::var_os("LUMEN_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lumen-peers/node/node_modules"));
    let chromium = std::env::var("LUMEN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let node_ok = Command::new(&node)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        node_ok,
        "peer missing: `{node} --version` failed; install Node.js or set LUMEN_NODE"
    );
    assert!(
        modules.join("playwright-core/package.json").exists(),
        "peer missing: no playwright-core in {}; run scripts/test-all (it installs \
         playwright-core@1.65.1 there) or set LUMEN_NODE_MODULES",
        modules.display()
    );
    assert!(
        std::path::Path::new(&chromium).exists(),
        "peer missing: no Chromium at {chromium}; run scripts/test-all (it installs Debian's \
         chromium) or set LUMEN_CHROMIUM"
    );
    (node, modules, chromium)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_draws_the_mesh_with_no_error_and_no_foreign_request() {
    let (node, modules, chromium) = peers();
    let data = tempfile::tempdir().expect("tempdir");
    let options = DemoOptions {
        rate_per_s: 20.0,
        load_duration: Some(Duration::from_secs(90)),
        max_requests: None,
        flush_interval: Duration::from_secs(2),
        span_export_interval: Duration::from_millis(500),
        metric_export_interval: Duration::from_secs(1),
        ..DemoOptions::ephemeral([127, 0, 80], data.path().join("lumen"))
    };
    let running = demo::start(options, |line| eprintln!("{line}"))
        .await
        .expect("demo starts");
    let base = format!("http://{}", running.telemetry_http);

    // Wait (bounded) until the page has every call of the demo, as a browser would see it.
    let calls = [
        ("productpage", "details"),
        ("productpage", "reviews"),
        ("reviews", "ratings"),
    ];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let html = reqwest::get(format!("{base}/"))
            .await
            .expect("dashboard")
            .text()
            .await
            .unwrap_or_default();
        if calls
            .iter()
            .all(|(s, d)| html.contains(&format!(r#"data-source="{s}" data-destination="{d}""#)))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // ...and until ratings has failed at least once (it fails 3% of its calls).
    let client = reqwest::Client::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let body: Value = client
            .post(format!("{base}/api/v1/sql"))
            .json(
                &json!({"sql": "SELECT count(*) AS n FROM spans WHERE service_name = 'ratings' \
                AND span_kind = 'server' AND status_code = 'error'"}),
            )
            .send()
            .await
            .expect("sql")
            .json()
            .await
            .unwrap_or_default();
        if body["rows"][0]["n"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let screenshots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    let plan = json!({
        "base": base,
        "screenshots": screenshots,
        "pages": [
            {"name": "overview-nodes", "path": "/?refresh=0", "select": "svg .node"},
            {"name": "overview-edges", "path": "/?refresh=0", "select": "svg .edge",
             "click": "svg .node[data-service=ratings]", "read": "#detail",
             "follow": [
                 {"click": "#open-service", "select": "#failed tr[data-trace]"},
                 {"click": "#failed tr[data-trace] a", "select": "#waterfall li"}
             ],
             "back": 2},
            {"name": "versioned", "path": "/?view=versioned&refresh=0", "select": "svg .node"},
            {"name": "proxies", "path": "/proxies", "select": "#proxies tr[data-node]"},
            {"name": "traces", "path": "/traces?service=ratings&lookback=15m", "select": "#found tr[data-trace]"},
            {"name": "sql", "select": "details[data-table]", "read": "#result",
             "path": "/sql?q=SELECT%20service_name%2C%20count(*)%20AS%20n%20FROM%20spans%20GROUP%20BY%20service_name%20ORDER%20BY%20service_name"},
            {"name": "mesh-config", "path": "/proxies", "select": "article.service-config",
             "read": "#svc-reviews"},
            {"name": "keyboard", "path": "/?refresh=0", "select": "svg .node",
             "keyboard": {"tab_to": "svg .node", "press": "Enter", "read": "#detail", "then": "Escape"}}
        ]
    });
    let plan_path = data.path().join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).expect("plan");
    let script = format!(
        "{}/tests/browser/visit.cjs",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    );
    let out = tokio::process::Command::new(&node)
        .arg(script)
        .arg(&plan_path)
        .env("LUMEN_NODE_MODULES", &modules)
        .env("LUMEN_CHROMIUM", &chromium)
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "the browser run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the browser's report");
    let pages = report["pages"].as_array().expect("pages");
    for page in pages {
        assert_eq!(page["status"], 200, "{page}");
        for list in ["console_errors", "page_errors", "foreign_requests"] {
            assert_eq!(page[list], json!([]), "{list} on {}", page["name"]);
        }
    }
    let mut services: Vec<&str> = pages[0]["matched"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["service"].as_str())
        .collect();
    services.sort_unstable();
    assert_eq!(services, ["details", "productpage", "ratings", "reviews"]);
    let mut edges: Vec<(&str, &str)> = pages[1]["matched"]
        .as_array()
        .expect("edges")
        .iter()
        .filter_map(|e| Some((e["source"].as_str()?, e["destination"].as_str()?)))
        .collect();
    edges.sort_unstable();
    assert_eq!(edges, calls);
    // A click on a node shows its figures.
    let detail = pages[1]["read"].as_str().unwrap_or_default();
    assert!(
        detail.contains("ratings") && detail.contains("requests/s"),
        "detail panel: {detail:?}"
    );
    // Graph → ratings' own page, which lists its failed requests (the demo's ratings fails
    // 3% of its calls), each with its trace.
    let arrived = &pages[1]["arrived"][0];
    assert!(
        arrived["url"]
            .as_str()
            .is_some_and(|u| u.contains("/service/ratings?refresh=0")),
        "{arrived}"
    );
    let failed = arrived["matched"].as_array().expect("failed rows");
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|r| r["trace"].as_str().is_some_and(|t| t.len() == 32)),
        "{arrived}"
    );
    // → the failed request's trace: a waterfall with every span of it, the failed ratings
    // span among them, then back to the graph.
    let trace = &pages[1]["arrived"][1];
    assert_eq!(trace["status"], 200, "{trace}");
    let trace_id = trace["url"]
        .as_str()
        .and_then(|u| u.rsplit('/').next())
        .unwrap_or_default()
        .to_string();
    let spans = trace["matched"].as_array().expect("waterfall rows");
    let stored: Value = client
        .post(format!("{base}/api/v1/sql"))
        .json(&json!({
            "sql": format!("SELECT count(*) AS n FROM spans WHERE trace_id = '{trace_id}'")
        }))
        .send()
        .await
        .expect("sql")
        .json()
        .await
        .expect("json");
    assert_eq!(
        spans.len() as i64,
        stored["rows"][0]["n"].as_i64().unwrap_or(-1),
        "every span of trace {trace_id}: {trace}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s["service"] == "ratings" && s["error"] == "true"),
        "{trace}"
    );
    assert!(
        pages[1]["back"]
            .as_str()
            .is_some_and(|u| u.ends_with("/?refresh=0")),
        "back on the graph: {}",
        pages[1]["back"]
    );
    // Every sidecar's configuration, as the control plane sees it: five proxies, synced.
    let proxies = pages[3]["matched"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 5, "{proxies:?}");
    assert!(
        proxies.iter().all(|p| p["healthy"] == "true"),
        "{proxies:?}"
    );
    // The routes and subsets that apply to each service: reviews split 50/50 over v1 and v2.
    let configs = pages[6]["matched"].as_array().expect("service configs");
    let names: Vec<&str> = configs
        .iter()
        .filter_map(|c| c["service"].as_str())
        .collect();
    assert_eq!(names, ["details", "productpage", "ratings", "reviews"]);
    let reviews = pages[6]["read"].as_str().unwrap_or_default();
    for words in ["subset v1 50%", "subset v2 50%", "version=v2"] {
        assert!(reviews.contains(words), "{words} in {reviews:?}");
    }
    // Keyboard alone: Tab reaches a graph node (past the skip link, the page links and the
    // controls), Enter opens its figures, Escape closes them and gives the node focus back.
    let keys = &pages[7]["keyboard"];
    assert_eq!(keys["reached"], true, "{keys}");
    let node = keys["focused"]["service"].as_str().unwrap_or_default();
    assert!(!node.is_empty(), "{keys}");
    assert!(
        keys["read"]
            .as_str()
            .is_some_and(|t| t.contains("requests/s") && t.contains(node)),
        "{keys}"
    );
    assert_eq!(keys["hidden_after"], true, "{keys}");
    assert_eq!(keys["focused_after"]["service"], node, "{keys}");
    // The trace search finds ratings' traces, each linking to its waterfall.
    let found = pages[4]["matched"].as_array().expect("found traces");
    assert!(
        !found.is_empty()
            && found
                .iter()
                .all(|t| t["trace"].as_str().is_some_and(|id| id.len() == 32)),
        "{found:?}"
    );
    // The SQL console over the same store: a result table, and the tables listed.
    let result = pages[5]["read"].as_str().unwrap_or_default();
    for service in ["details", "productpage", "ratings", "reviews"] {
        assert!(result.contains(service), "{service} in {result:?}");
    }
    let mut tables: Vec<&str> = pages[5]["matched"]
        .as_array()
        .expect("tables")
        .iter()
        .filter_map(|t| t["table"].as_str())
        .collect();
    tables.sort_unstable();
    assert_eq!(tables, ["logs", "metrics", "rollups", "spans"]);
    // Kiali's versioned-app graph: reviews v1 and v2 are two nodes of one app.
    let mut versions: Vec<&str> = pages[2]["matched"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    versions.sort_unstable();
    for id in [
        "reviews@v1",
        "reviews@v2",
        "ratings@v1",
        "productpage@v1",
        "details@v1",
    ] {
        assert!(versions.contains(&id), "{id} in {versions:?}");
    }
    assert!(
        screenshots.join("versioned.png").exists(),
        "screenshot written"
    );
    running.stop().await;
}
