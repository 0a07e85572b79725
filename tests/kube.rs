//! `lumen control --kube` against a Kubernetes API emulator (PyPI kmock, with the fixes in
//! tests/python/kube_api.py), driven by the real `kubectl`: applying a VirtualService changes
//! where a running sidecar sends requests, deleting it reverts, and an invalid edit is refused
//! with a status condition on the resource while the version before it stays in force; an
//! EndpointSlice decides a Service's endpoints (ready ones only).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Lumen;
use hyper::Response;
use lumen_proxy::{ExportOptions, Identity, Proxy, ProxyConfig};
use tokio_util::sync::CancellationToken;

/// The emulator, fed by `kubectl`; stops when dropped.
struct KubeApi {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl KubeApi {
    fn start() -> KubeApi {
        let python = common::python_with(&["kmock"]);
        let kubectl_ok = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            kubectl_ok,
            "peer missing: kubectl (1.32, on the machine per ../shared/PEERS.md) is not on PATH"
        );
        let script =
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("tests/python/kube_api.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the API emulator starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the emulator says where it listens");
        let url = line
            .trim()
            .strip_prefix("kube-api: ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: kmock, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: kmock, user: {{}}}}]\n\
             contexts: [{{name: kmock, context: {{cluster: kmock, user: kmock, namespace: default}}}}]\n\
             current-context: kmock\n"
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).expect("kubeconfig");
        KubeApi { child, dir, url }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs kubectl against the emulator; returns its stdout, panicking with its stderr.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, fixture: &str) -> String {
        let path =
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("fixtures/kube")
                .join(fixture);
        let path = path.to_string_lossy();
        self.kubectl(&["apply", "--validate=false", "-f", &path])
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control plane's count of xDS responses sent.
async fn pushes(http: &str) -> u64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix("lumen_control_xds_pushes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no push counter in {text}"))
}

/// An app answering every request with its own name.
fn app(addr: &str, name: &'static str, stop: &CancellationToken) {
    let listener = std::net::TcpListener::bind(addr).expect("app binds");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(lumen_proxy::server::serve(
        listener,
        move |_req: hyper::Request<hyper::body::Incoming>| async move {
            Response::new(lumen_proxy::http::text_body(name))
        },
        stop.clone(),
    ));
}

/// Which app answered each of `n` requests for reviews through the caller's sidecar.
async fn answers(outbound: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = match client
            .get(format!("http://{outbound}/reviews"))
            .header("host", "reviews:9080")
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            Ok(r) => format!("status {}", r.status()),
            Err(e) => format!("error {e}"),
        };
        *seen.entry(body).or_default() += 1;
    }
    seen
}

/// Polls until `n` requests in a row all reach `only` (None: both versions answer); returns
/// how long that took. Bounded: a control plane that never pushes fails here.
async fn until_routed(outbound: SocketAddr, only: Option<&str>, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let seen = answers(outbound, 8).await;
        let done = match only {
            Some(name) => seen.len() == 1 && seen.contains_key(name),
            None => seen.contains_key("reviews-v1") && seen.contains_key("reviews-v2"),
        };
        if done {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: still {seen:?} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `Accepted` condition of the VirtualService `reviews`, as kubectl shows it.
fn accepted(api: &KubeApi) -> Option<serde_json::Value> {
    let text = api.kubectl(&["get", "virtualservices", "reviews", "-o", "json"]);
    let vs: serde_json::Value = serde_json::from_str(&text).expect("kubectl's JSON");
    vs.pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
        .cloned()
}

fn until_accepted(api: &KubeApi, status: &str, what: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Some(c) = accepted(api)
            && c["status"] == status
        {
            return c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: condition {:?} after 20 s",
            accepted(api)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_and_delete_change_routing_and_invalid_edits_change_nothing() {
    let api = KubeApi::start();
    let applied = api.apply("mesh.yaml");
    assert!(
        applied.contains("destinationrule.networking.istio.io/reviews created"),
        "{applied}"
    );

    let stop = CancellationToken::new();
    app("127.0.86.11:9080", "reviews-v1", &stop);
    app("127.0.86.12:9080", "reviews-v2", &stop);

    let kubeconfig = api.kubeconfig();
    let cache = api.dir.path().join("cache");
    let mut control = Lumen::spawn_with_env(
        &[
            "control",
            "--kube",
            "--xds",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        &[
            ("KUBECONFIG", &kubeconfig.to_string_lossy()),
            ("KUBECACHEDIR", &cache.to_string_lossy()),
            ("RUST_LOG", "info"),
        ],
    );
    let addrs = control.wait_for_line("control: xDS ", Duration::from_secs(30));
    let (xds, http) = addrs.split_once(", HTTP ").expect("both addresses");

    let identity = Identity::of_pod("productpage-v1", "productpage", "v1", "default");
    let config = ProxyConfig::sidecar(
        [127, 0, 86, 1].into(),
        identity,
        format!("http://{xds}"),
        None,
    );
    let proxy = Proxy::bind(config, ExportOptions::default())
        .await
        .expect("the sidecar binds");
    let outbound = proxy.outbound_addr().expect("outbound");
    tokio::spawn(proxy.run(stop.clone()));

    // No VirtualService: reviews' two versions share the traffic.
    until_routed(outbound, None, "both versions before any VirtualService").await;

    // kubectl apply: every request goes to v2.
    let out = api.apply("reviews-v2.yaml");
    assert!(
        out.contains("virtualservice.networking.istio.io/reviews created"),
        "{out}"
    );
    let took = until_routed(outbound, Some("reviews-v2"), "after kubectl apply").await;
    eprintln!("kubectl apply to routing changed in the sidecar: {took:?}");
    let condition = until_accepted(&api, "True", "the applied VirtualService");
    assert_eq!(condition["reason"], "Accepted", "{condition}");
    assert_eq!(condition["observedGeneration"], 1, "{condition}");

    // An invalid edit: refused by name and field path, on the resource and on /debug/config;
    // the version before it still routes.
    let out = api.apply("reviews-invalid.yaml");
    assert!(
        out.contains("virtualservice.networking.istio.io/reviews configured"),
        "{out}"
    );
    let condition = until_accepted(&api, "False", "the invalid edit");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.http[0].route[0].destination.hots")
            && message.contains("unknown field")
            && message.contains("the last accepted version of it stays in force"),
        "{condition}"
    );
    assert_eq!(condition["observedGeneration"], 2, "{condition}");
    let seen = answers(outbound, 20).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["reviews-v2"], "{seen:?}");
    let debug = reqwest::get(format!("http://{http}/debug/config"))
        .await
        .expect("/debug/config")
        .text()
        .await
        .expect("body");
    assert!(debug.contains("destination.hots"), "{debug}");

    // A flood: 100 edits as fast as the API takes them, alternating v1 and v2, the last to
    // v1. The last one wins, in a handful of pushes rather than one an edit.
    let before = pushes(http).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let flood_started = Instant::now();
    for i in 0..100 {
        let subset = if i % 2 == 0 { "v2" } else { "v1" };
        let patch = serde_json::json!({"spec": {"http": [{"route": [
            {"destination": {"host": "reviews", "subset": subset}}
        ]}]}});
        let resp = client
            .patch(format!(
                "{}/apis/networking.istio.io/v1/namespaces/default/virtualservices/reviews",
                api.url
            ))
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .expect("patch");
        assert!(resp.status().is_success(), "patch {i}: {}", resp.status());
    }
    let flood = flood_started.elapsed();
    until_routed(outbound, Some("reviews-v1"), "after the flood").await;
    until_accepted(&api, "True", "the flood's last edit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushed = pushes(http).await - before;
    eprintln!("100 edits in {flood:?}: {pushed} xDS responses pushed");
    // At most one push (one route configuration to the one sidecar) per gathering window
    // (lumen_control::cluster::MAX_DELAY), however slow the machine made the flood.
    let windows = flood.as_millis() / lumen_control::cluster::MAX_DELAY.as_millis() + 4;
    assert!(
        pushed as u128 <= windows && pushed < 50,
        "a flood of 100 edits in {flood:?} made {pushed} pushes"
    );

    // kubectl delete: back to both versions.
    let path =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("fixtures/kube/reviews-v2.yaml");
    let out = api.kubectl(&["delete", "-f", &path.to_string_lossy()]);
    assert!(out.contains("deleted"), "{out}");
    let took = until_routed(outbound, None, "after kubectl delete").await;
    eprintln!("kubectl delete to routing reverted in the sidecar: {took:?}");

    // An EndpointSlice for reviews with v2 not ready: the endpoints come from it, ready ones
    // only; v2 ready again brings it back.
    let out = api.apply("reviews-slice.yaml");
    assert!(
        out.contains("endpointslice.discovery.k8s.io/reviews-abc12 created"),
        "{out}"
    );
    until_routed(outbound, Some("reviews-v1"), "with reviews-v2 not ready").await;
    let out = api.kubectl(&[
        "patch",
        "endpointslice",
        "reviews-abc12",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/endpoints/1/conditions/ready", "value": true}]"#,
    ]);
    assert!(out.contains("patched"), "{out}");
    until_routed(outbound, None, "with reviews-v2 ready again").await;

    stop.cancel();
    control.interrupt(Duration::from_secs(10));
}
