//! Standalone mode: the `lumen-proxy` binary runs from a static Envoy bootstrap (no control
//! plane) and routes as it says, and a real Envoy 1.40 accepts the very same file.

mod common;

use common::free_port;

#[path = "../../tests/peers/envoy.rs"]
mod envoy_peer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

/// An upstream answering its own name.
async fn upstream(name: &'static str, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(lumen_proxy::server::serve(
        listener,
        move |_req: Request<Incoming>| async move { Response::new(lumen_proxy::http::text_body(name)) },
        stop,
    ));
    addr
}

/// The static fixture with this run's ports.
fn bootstrap(listen: u16, admin: u16, prometheus: u16, web: SocketAddr, api: SocketAddr) -> String {
    include_str!("../../fixtures/proxy/static.yaml")
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 19000", &format!("port_value: {admin}"))
        .replace("port_value: 18081", &format!("port_value: {}", web.port()))
        .replace("port_value: 18082", &format!("port_value: {}", api.port()))
        .replace(
            "  cluster: bench\n",
            &format!("  cluster: bench\n  metadata: {{LUMEN_PROMETHEUS_PORT: \"{prometheus}\"}}\n"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_routes_as_a_static_bootstrap_says_and_envoy_accepts_the_same_file() {
    let stop = CancellationToken::new();
    let web = upstream("web", stop.clone()).await;
    let api = upstream("api", stop.clone()).await;
    let (listen, admin, prom) = (free_port(), free_port(), free_port());
    let yaml = bootstrap(listen, admin, prom, web, api);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("static.yaml");
    std::fs::write(&path, &yaml).expect("write");

    // A real Envoy validates the same file.
    let validated = std::process::Command::new(envoy_peer::envoy())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("envoy runs");
    assert!(
        validated.status.success(),
        "Envoy rejects the bootstrap: {}",
        String::from_utf8_lossy(&validated.stderr)
    );

    // A port `free_port` picked may be taken by another socket before the proxy binds it
    // (an outgoing connection's ephemeral port): a proxy that exits at start is started
    // again on new ports, at most three times.
    let client = reqwest::Client::new();
    let (mut yaml, mut listen, mut admin, mut prom) = (yaml, listen, admin, prom);
    let mut attempts = 1;
    let mut child = common::start_proxy(dir.path(), "static.yaml", &yaml, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            assert!(
                attempts < 3,
                "lumen-proxy exited at start 3 times: {status}"
            );
            attempts += 1;
            (listen, admin, prom) = (free_port(), free_port(), free_port());
            yaml = bootstrap(listen, admin, prom, web, api);
            child = common::start_proxy(dir.path(), "static.yaml", &yaml, "warn");
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let get = |path: &'static str, canary: bool| {
        let client = client.clone();
        async move {
            let mut req = client.get(format!("http://127.0.0.1:{listen}{path}"));
            if canary {
                req = req.header("x-canary", "1");
            }
            let resp = req.send().await.expect("answer");
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            resp.text().await.expect("body")
        }
    };
    assert_eq!(get("/api/v1/items", false).await, "api");
    assert_eq!(get("/", true).await, "api", "the header route");
    // The rest: 90/10, within a wide margin over 300 requests.
    let mut web_share = 0;
    for _ in 0..300 {
        if get("/", false).await == "web" {
            web_share += 1;
        }
    }
    assert!(
        (240..=290).contains(&web_share),
        "{web_share} of 300 went to web (90% expected)"
    );
    // Every response was read to its end by the client: none is recorded as one the client
    // walked away from (DC), and all are 200s.
    let stats = client
        .get(format!("http://127.0.0.1:{prom}/stats/prometheus"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let requests: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert!(!requests.is_empty(), "{stats}");
    for line in requests {
        assert!(
            line.contains(r#"response_flags="-""#) && line.contains(r#"response_code="200""#),
            "{line}"
        );
    }
    // The admin port shows what it runs.
    let dump = client
        .get(format!("http://127.0.0.1:{admin}/config_dump"))
        .send()
        .await
        .expect("dump")
        .text()
        .await
        .expect("text");
    assert!(
        dump.contains("\"web\"") && dump.contains("\"local\""),
        "{dump}"
    );

    // An unsupported field: lumen-proxy refuses to start and says which.
    let bad = yaml.replace(
        "codec_type: AUTO",
        "codec_type: AUTO\n          use_remote_address: true",
    );
    let bad_path = dir.path().join("bad.yaml");
    std::fs::write(&bad_path, bad).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lumen-proxy"))
        .arg("-c")
        .arg(&bad_path)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("use_remote_address"), "{said}");
    eprintln!("lumen-proxy said: {said}");

    let _ = child.start_kill();
    let _ = child.wait().await;
    stop.cancel();
}
