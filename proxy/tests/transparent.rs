//! Transparent capture, as Istio's init container sets it up: two network namespaces made by
//! this test and joined by a veth pair. In the pod's namespace (192.0.2.1) the `lumen-proxy`
//! binary runs as uid 1337 beside `lumen control`, and Istio's iptables rules REDIRECT the
//! pod's outbound TCP to :15001 and its inbound TCP to :15006, the proxy's own traffic
//! excluded by its uid. The app knows nothing of the proxy: it connects to cluster IPs no host
//! owns, and callers in the other namespace (192.0.2.2) connect to the pod's address.
//!
//! Shown: captured HTTP routed by xDS with the original destination's port; a TCP service
//! (declared by its port name) forwarded to its endpoint, server speaking first; HTTP and TCP
//! to destinations the mesh does not know passed through to where they were going
//! (`PassthroughCluster`); inbound HTTP and TCP delivered to the app from 127.0.0.6; and no
//! loop: each request is counted once.
//!
//! Needs root, `ip` (iproute2), `iptables` and `setpriv`; the test command installs iptables.

use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use lumen_control::model::Model;
use lumen_control::source::ConfigSource;
use lumen_control::{Control, ControlOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const POD: &str = "192.0.2.1";
const PEER: &str = "192.0.2.2";
const PROXY_UID: &str = "1337";

/// Istio's `istio-iptables` rules for a sidecar in REDIRECT mode (its default), as its init
/// container writes them: inbound TCP to 15006 but for the proxy's own ports, outbound TCP to
/// 15001 but for the proxy's uid/gid, loopback, and connections from 127.0.0.6.
const ISTIO_IPTABLES: &str = "
set -e
t='iptables -w -t nat'
$t -N ISTIO_INBOUND
$t -N ISTIO_REDIRECT
$t -N ISTIO_IN_REDIRECT
$t -N ISTIO_OUTPUT
$t -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
$t -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
$t -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
$t -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
$t -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
$t -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
$t -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
$t -A PREROUTING -p tcp -j ISTIO_INBOUND
$t -A OUTPUT -p tcp -j ISTIO_OUTPUT
$t -A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
$t -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
$t -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
$t -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
$t -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
$t -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
$t -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
$t -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
$t -A ISTIO_OUTPUT -j ISTIO_REDIRECT
";

/// Fails with what to install when a tool the test needs is missing.
fn require(tool: &str, hint: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the transparent-capture test needs `{tool}` ({hint}); scripts/test-all installs it"
    );
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test's, deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Netns {
        // A namespace left by a run that was killed has this process's name only by chance.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn sh(&self, script: &str) {
        run("ip", &["netns", "exec", &self.name, "sh", "-c", script]);
    }

    /// A tokio runtime whose threads live in this namespace: every socket its tasks open is
    /// this namespace's.
    fn runtime(&self) -> NsRuntime {
        let path = format!("/run/netns/{}", self.name);
        let rt = std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open the namespace");
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("setns into the namespace");
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime")
            })
            .join()
            .expect("namespace thread")
        });
        NsRuntime(Some(rt))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct NsRuntime(Option<tokio::runtime::Runtime>);

impl NsRuntime {
    fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("runtime").spawn(f)
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// An HTTP server that answers every request with `name` and the address the connection came
/// from, then closes.
async fn http_app(addr: &str, name: &'static str) {
    let listener = TcpListener::bind(addr).await.expect("app binds");
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("{name} saw {}", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// A TCP echo server; with `greeting`, it speaks first (as PostgreSQL or MySQL do).
async fn echo(addr: &str, greeting: Option<&'static str>) {
    let listener = TcpListener::bind(addr).await.expect("echo binds");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Some(g) = greeting
                && s.write_all(g.as_bytes()).await.is_err()
            {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One HTTP/1.1 request on a new connection to `addr`; the whole response as text.
async fn try_http_get(addr: &str, host: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn http_get(addr: &str, host: &str, path: &str) -> String {
    try_http_get(addr, host, path)
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} (Host: {host}): {e}"))
}

/// Connects to `addr`, reads `greeting` if the server speaks first, then checks that bytes
/// sent come back.
async fn tcp_round_trip(addr: &str, greeting: Option<&str>, payload: &[u8]) {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    if let Some(g) = greeting {
        let mut got = vec![0u8; g.len()];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
            .await
            .expect("the greeting within 20 s")
            .expect("read the greeting");
        assert_eq!(got, g.as_bytes(), "the server's greeting through the proxy");
    }
    s.write_all(payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .expect("the echo within 20 s")
        .expect("read the echo");
    assert_eq!(back, payload, "bytes through the proxy, unchanged");
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_capture_routes_passes_through_and_excludes_the_proxy() {
    require("ip", "iproute2");
    require("iptables", "Debian's iptables package");
    require("setpriv", "util-linux");
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the transparent-capture test makes network namespaces and iptables rules: it needs root"
    );

    let pid = std::process::id();
    let pod = Netns::add(format!("lumen-cap-{pid}-pod"));
    let peer = Netns::add(format!("lumen-cap-{pid}-peer"));
    run(
        "ip",
        &[
            "-n", &pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &peer.name,
        ],
    );
    pod.sh(&format!(
        "ip link set lo up && ip addr add {POD}/24 dev eth0 && ip link set eth0 up && ip route add default via {PEER}"
    ));
    peer.sh(&format!(
        "ip link set lo up && ip addr add {PEER}/24 dev eth0 && ip link set eth0 up"
    ));
    pod.sh(ISTIO_IPTABLES);

    let in_pod = pod.runtime();
    let in_peer = peer.runtime();
    let stop = CancellationToken::new();

    // The peer's unmeshed workloads: reviews (HTTP), db (speaks first), an echo the mesh
    // does not know, and an HTTP server it does not know either.
    in_peer.spawn(http_app("192.0.2.2:9080", "reviews-v1"));
    in_peer.spawn(http_app("192.0.2.2:8080", "external"));
    in_peer.spawn(echo("192.0.2.2:5432", Some("db ready\n")));
    in_peer.spawn(echo("192.0.2.2:7000", None));
    // The pod's own app: productpage on 9080, and a port no Service names.
    in_pod.spawn(http_app("192.0.2.1:9080", "productpage-v1"));
    in_pod.spawn(echo("192.0.2.1:7070", None));

    // The control plane, on the pod namespace's loopback (which capture leaves alone).
    let model = Model::from_yaml(
        "capture-mesh.yaml",
        include_str!("../../fixtures/proxy/capture-mesh.yaml"),
    )
    .expect("the test's mesh");
    in_pod
        .spawn({
            let stop = stop.clone();
            async move {
                let control = Control::bind(ControlOptions {
                    xds_addr: "127.0.0.1:15010".parse().expect("addr"),
                    http_addr: "127.0.0.1:15014".parse().expect("addr"),
                    source: ConfigSource::Static(model),
                })
                .await
                .expect("control binds in the pod namespace");
                tokio::spawn(async move { control.run(stop).await });
            }
        })
        .await
        .expect("control task");

    // The sidecar: the binary, as uid 1337, in the pod namespace, capturing.
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("lumen-proxy");
    std::fs::copy(env!("CARGO_BIN_EXE_lumen-proxy"), &binary).expect("copy the binary");
    let bootstrap = include_str!("../../fixtures/proxy/bootstrap.yaml")
        .replace(
            "sidecar~127.0.10.3~reviews-v1",
            &format!("sidecar~{POD}~productpage-v1"),
        )
        .replace("cluster: reviews.default", "cluster: productpage.default")
        .replace(
            "NAME: reviews-v1",
            "NAME: productpage-v1\n    INTERCEPTION_MODE: REDIRECT",
        )
        .replace("WORKLOAD_NAME: reviews-v1", "WORKLOAD_NAME: productpage-v1")
        .replace(
            "{app: reviews, version: v1}",
            "{app: productpage, version: v1}",
        )
        .replace(
            "address: 127.0.10.3, port_value: 15000",
            "address: 127.0.0.1, port_value: 15000",
        );
    assert!(
        bootstrap.contains("INTERCEPTION_MODE: REDIRECT"),
        "{bootstrap}"
    );
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, &bootstrap).expect("write the bootstrap");
    for (path, mode) in [
        (dir.path(), 0o755),
        (binary.as_path(), 0o755),
        (config.as_path(), 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let mut proxy = tokio::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "setpriv"])
        .args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
        ])
        .arg(&binary)
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy starts");

    let outcome = in_pod
        .spawn(async move {
            // Ready: configuration received from the control plane.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = try_http_get("127.0.0.1:15000", "127.0.0.1", "/ready").await;
                if ready.is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
                    break;
                }
                assert!(Instant::now() < deadline, "the proxy never became ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            // HTTP to reviews' cluster IP, Host without a port: routed by xDS on the port
            // the app connected to, to reviews-v1 in the other namespace.
            let resp = http_get("10.96.0.10:9080", "reviews", "/reviews/1").await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.ends_with(&format!("reviews-v1 saw {POD}")), "{resp}");

            // HTTP for a host the mesh does not know: through to where it was going.
            let resp = http_get("192.0.2.2:8080", "example.com", "/").await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.ends_with(&format!("external saw {POD}")), "{resp}");

            // db's cluster IP on its TCP port: the server speaks first, and the proxy does
            // not wait for the client to tell HTTP from TCP.
            tcp_round_trip("10.96.0.20:5432", Some("db ready\n"), b"SELECT 1;\0\xff").await;

            // Bytes to an address and port nobody declared: passed through.
            tcp_round_trip("192.0.2.2:7000", None, b"\x16\x03\x01 not http").await;
        })
        .await;
    if let Err(e) = outcome {
        let _ = proxy.start_kill();
        std::panic::resume_unwind(e.into_panic());
    }

    // Callers in the other namespace reach the pod's address: captured inbound, delivered to
    // the app from 127.0.0.6, on the app's HTTP port and on a port no Service names.
    in_peer
        .spawn(async move {
            let resp = http_get("192.0.2.1:9080", "productpage:9080", "/productpage").await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.ends_with("productpage-v1 saw 127.0.0.6"), "{resp}");
            tcp_round_trip("192.0.2.1:7070", None, b"\x00\x01inbound bytes").await;
        })
        .await
        .expect("inbound through the capture");

    // Each request counted once, with Istio's labels (a loop through the proxy's own
    // connections would count more, or never end).
    let metrics = in_pod
        .spawn(async move {
            // Scraped at the pod's address, whose :15090 the rules leave alone.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = http_get("192.0.2.1:15090", "192.0.2.1", "/stats/prometheus").await;
                let done = sample(
                    &text,
                    "istio_tcp_connections_closed_total",
                    &[("reporter", "destination")],
                )
                .is_some()
                    && sample(
                        &text,
                        "istio_tcp_connections_closed_total",
                        &[("destination_service", "db.default.svc.cluster.local")],
                    )
                    .is_some();
                if done || Instant::now() > deadline {
                    break text;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("scrape");
    let requests = |labels: &[(&str, &str)]| sample(&metrics, "istio_requests_total", labels);
    assert_eq!(
        requests(&[
            ("reporter", "source"),
            ("destination_service", "reviews.default.svc.cluster.local"),
            ("destination_workload", "reviews-v1"),
            ("response_code", "200"),
        ]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        requests(&[
            ("reporter", "source"),
            ("destination_service_name", "PassthroughCluster"),
            ("response_code", "200"),
        ]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        requests(&[
            ("reporter", "destination"),
            ("destination_workload", "productpage-v1"),
            ("response_code", "200"),
        ]),
        Some(1.0),
        "{metrics}"
    );
    let tcp =
        |labels: &[(&str, &str)]| sample(&metrics, "istio_tcp_connections_opened_total", labels);
    assert_eq!(
        tcp(&[
            ("reporter", "source"),
            ("destination_service", "db.default.svc.cluster.local"),
            ("response_flags", "-"),
        ]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        tcp(&[
            ("reporter", "source"),
            ("destination_service_name", "PassthroughCluster"),
            ("response_flags", "-"),
        ]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        tcp(&[("reporter", "destination"), ("response_flags", "-")]),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "istio_tcp_received_bytes_total",
            &[("destination_service", "db.default.svc.cluster.local")]
        )
        .is_some_and(|b| b >= 11.0),
        "{metrics}"
    );

    stop.cancel();
    let _ = proxy.start_kill();
    let _ = proxy.wait().await;
}
