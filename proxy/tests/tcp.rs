//! Opaque TCP: a static listener with Envoy's TCP proxy filter carries a connection's bytes
//! to its cluster as they are, and counts Istio's TCP metrics. A real Envoy validates the
//! same bootstrap.

mod common;

use common::free_port;

#[path = "../../tests/peers/envoy.rs"]
mod envoy_peer;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tcp_listener(name: &str, port: u16, cluster: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#
    )
}

fn cluster(name: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

fn metric(text: &str, name: &str, flag: &str) -> u64 {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains(&format!(r#"response_flags="{flag}""#))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_carries_bytes_and_counts_them() {
    // An echo server, and a port nothing listens on.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let dead_port = free_port();
    let (tcp_port, dead_listen, admin, prom) = (free_port(), free_port(), free_port(), free_port());
    let yaml = format!(
        "node: {{id: tcp-test, cluster: test, metadata: {{LUMEN_PROMETHEUS_PORT: \"{prom}\"}}}}\n\
         admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}\n\
         static_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        tcp_listener("echo", tcp_port, "echo"),
        tcp_listener("dead", dead_listen, "dead"),
        cluster("echo", echo_port),
        cluster("dead", dead_port),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tcp.yaml");
    std::fs::write(&path, &yaml).expect("write");
    let validated = std::process::Command::new(envoy_peer::envoy())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("envoy runs");
    assert!(
        validated.status.success(),
        "Envoy rejects it: {}",
        String::from_utf8_lossy(&validated.stderr)
    );
    let mut child = common::start_proxy(dir.path(), "tcp.yaml", &yaml, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await {
            break s;
        }
        assert!(Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Bytes that are not HTTP, both ways.
    let mut sent = 0u64;
    for msg in [&b"\x00\x01binary\xff"[..], b"PING\r\n", &[7u8; 5000]] {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg);
        sent += msg.len() as u64;
    }
    drop(s);
    // The dead cluster: the connection is closed at once.
    let mut d = tokio::net::TcpStream::connect(("127.0.0.1", dead_listen))
        .await
        .expect("accepted");
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(15), d.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");

    let url = format!("http://127.0.0.1:{admin}/stats/prometheus");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(&url)
            .await
            .expect("stats")
            .text()
            .await
            .expect("text");
        let closed = metric(&text, "istio_tcp_connections_closed_total", "-");
        if closed == 1 && metric(&text, "istio_tcp_connections_closed_total", "UF") == 1 {
            assert_eq!(metric(&text, "istio_tcp_connections_opened_total", "-"), 1);
            assert_eq!(metric(&text, "istio_tcp_received_bytes_total", "-"), sent);
            assert_eq!(metric(&text, "istio_tcp_sent_bytes_total", "-"), sent);
            assert!(text.contains(r#"request_protocol="tcp""#), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
