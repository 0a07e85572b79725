//! The `lumen-proxy` binary with its control plane and telemetry service both gone: it starts
//! from an Envoy bootstrap, says it is not ready, answers requests with a clear no-route error
//! instead of hanging, and stops cleanly on SIGINT.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One HTTP/1.1 request; returns the raw response, or None if nothing answers.
fn get(addr: &str, host: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn proxy_without_control_plane_fails_clearly_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = include_str!("../../fixtures/proxy/bootstrap.yaml")
        .replace("127.0.10.3", "127.0.81.3")
        .replace(
            "port_value: 15010",
            &format!("port_value: {}", closed_port()),
        )
        .replace(
            "port_value: 4317",
            &format!("port_value: {}", closed_port()),
        );
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, bootstrap).expect("write");
    // One thread, as a sidecar on one core runs (tokio's current-thread runtime); the
    // SIGTERM test runs it with the default, a thread a CPU.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen-proxy"))
        .args(["--concurrency", "1", "-c"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("lumen-proxy starts");

    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Some(r) = get("127.0.81.3:15000", "admin", "/ready") {
            break r;
        }
        assert!(Instant::now() < deadline, "admin never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("PRE_INITIALIZING"), "{ready}");

    let resp = get("127.0.81.3:15001", "reviews:9080", "/reviews/0").expect("outbound answers");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(resp.contains("x-lumen-response-flags: NR"), "{resp}");
    assert!(
        resp.contains(r#"no route for host "reviews:9080""#),
        "{resp}"
    );

    let resp = get("127.0.81.3:15006", "reviews:9080", "/").expect("inbound answers");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("no inbound cluster"), "{resp}");

    let scrape = get("127.0.81.3:15090", "prom", "/stats/prometheus").expect("prometheus answers");
    assert!(
        scrape.contains(r#"istio_requests_total{reporter="source""#),
        "{scrape}"
    );
    // The listeners' connection counters: one outbound and one inbound connection so far.
    for line in [
        r#"lumen_proxy_connections_accepted_total{listener="outbound"} 1"#,
        r#"lumen_proxy_connections_accepted_total{listener="inbound"} 1"#,
        r#"lumen_proxy_connections_rejected_total{listener="outbound"} 0"#,
    ] {
        assert!(scrape.contains(line), "{line} in {scrape}");
    }
    assert!(
        scrape.contains(r#"response_code="404",grpc_response_status="",response_flags="NR""#),
        "{scrape}"
    );

    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if stopping.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("lumen-proxy still running 15 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_concurrency_of_zero_is_refused_before_anything_starts() {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen-proxy"))
        .args(["--concurrency", "0", "-c", "/nonexistent.yaml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--concurrency"), "{err}");
}
