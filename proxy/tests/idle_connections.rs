//! 10,000 idle connections to the `lumen-proxy` binary: past its connection limit they are
//! closed on arrival and counted, the rest are closed when the header-read time runs out, and
//! the connection counts return to their baseline while requests keep being served.

mod common;

use common::free_port;

use std::time::{Duration, Instant};

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line_start} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_are_bounded_and_cleared() {
    let (listen, admin, prom) = (free_port(), free_port(), free_port());
    let yaml = include_str!("../../fixtures/proxy/static.yaml")
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 19000", &format!("port_value: {admin}"))
        .replace(
            "  cluster: bench\n",
            &format!(
                "  cluster: bench\n  metadata: {{LUMEN_PROMETHEUS_PORT: \"{prom}\", LUMEN_MAX_CONNECTIONS: \"4000\", LUMEN_HEADER_READ_TIMEOUT_MS: \"5000\"}}\n"
            ),
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = common::start_proxy(dir.path(), "static.yaml", &yaml, "error");
    let stats_url = format!("http://127.0.0.1:{admin}/stats/prometheus");
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = || async { reqwest::get(&stats_url).await.ok()?.text().await.ok() };
    while stats().await.is_none() {
        assert!(Instant::now() < deadline, "never up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 10,000 connections that never send a byte.
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        match tokio::net::TcpStream::connect(("127.0.0.1", listen)).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {}: {e}", idle.len()),
        }
    }
    let accepted_line = r#"lumen_proxy_connections_accepted_total{listener="outbound"} "#;
    let rejected_line = r#"lumen_proxy_connections_rejected_total{listener="outbound"} "#;
    let active_line = r#"lumen_proxy_connections_active{listener="outbound"} "#;
    // Every one was accepted or closed on arrival; at most 4,000 open at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = stats().await.unwrap_or_default();
        if !text.is_empty() {
            let (a, r) = (metric(&text, accepted_line), metric(&text, rejected_line));
            assert!(metric(&text, active_line) <= 4_000, "{text}");
            if a + r >= 10_000 {
                // The limit was reached and connections past it were closed on arrival. How
                // many depends on how fast the 10,000 arrived against the header-read time
                // that frees slots, so only that some were, and that every one is counted.
                assert!(r > 0, "the connection limit was never reached: {text}");
                assert_eq!(a + r, 10_000, "{text}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "not every connection was seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The idle ones go when the header-read time runs out; the count returns to baseline.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = stats().await.unwrap_or_default();
        if !text.is_empty() && metric(&text, active_line) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle connections still open: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(idle);
    // And it still serves: a request gets its answer (the upstreams are down: a 503 UF).
    let resp = reqwest::get(format!("http://127.0.0.1:{listen}/api"))
        .await
        .expect("answers");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "UF");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
