//! The control plane goes away and comes back: the proxy keeps serving its last good
//! configuration meanwhile and says so on `/ready` (still 200) and in its metrics, then
//! reconnects on its own and is in sync again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen_control::model::Model;
use lumen_control::source::ConfigSource;
use lumen_control::{Control, ControlOptions};
use lumen_proxy::{ExportOptions, Identity, Proxy, ProxyConfig};
use tokio_util::sync::CancellationToken;

const POD: [u8; 3] = [127, 0, 84];

async fn start_control(xds: SocketAddr) -> CancellationToken {
    serve(xds, demo(String::new())).await
}

/// The demo mesh, with `more` YAML after it.
fn demo(more: String) -> Model {
    let yaml = format!(
        "{}\n---\n{more}",
        include_str!("../../fixtures/demo/bookinfo.yaml")
    );
    let mut model = Model::from_yaml("bookinfo.yaml", &yaml).expect("demo model");
    model.move_pods([127, 0, 10], POD);
    model
}

async fn serve(xds: SocketAddr, model: Model) -> CancellationToken {
    let control = Control::bind(ControlOptions {
        xds_addr: xds,
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        source: ConfigSource::Static(model),
    })
    .await
    .expect("control binds");
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move { control.run(stop).await }
    });
    stop
}

/// reviews-v1's sidecar, from the control plane at `xds`: its admin address, and what stops it.
async fn start_proxy(xds: SocketAddr) -> (SocketAddr, CancellationToken) {
    let identity = Identity::of_pod("reviews-v1", "reviews", "v1", "default");
    let ip = std::net::IpAddr::from([POD[0], POD[1], POD[2], 3]);
    let config = ProxyConfig::sidecar(ip, identity, format!("http://{xds}"), None);
    let proxy = Proxy::bind(config, ExportOptions::default())
        .await
        .expect("proxy binds");
    let admin = proxy.admin_addr().expect("admin");
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(stop.clone()));
    (admin, stop)
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until `f` holds (at most 30 s).
async fn until(url: &str, what: &str, f: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(url).await;
        if f(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: last {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_rides_out_a_control_plane_restart() {
    let xds: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let control = start_control(xds).await;
    let (admin, stop) = start_proxy(xds).await;
    let ready = format!("http://{admin}/ready");
    let stats = format!("http://{admin}/stats/prometheus");
    until(&ready, "ready", |s, b| s == 200 && b == "LIVE\n").await;
    until(&stats, "connected", |_, b| {
        b.contains("lumen_proxy_xds_connected 1")
    })
    .await;
    let before = get(&format!("http://{admin}/config_dump")).await.1;
    assert!(
        before.contains("ratings.default.svc.cluster.local"),
        "{before}"
    );

    // The control plane goes away: still ready, says so, same configuration.
    control.cancel();
    let body = until(&ready, "unreachable said", |s, b| {
        s == 200 && b.contains("control plane unreachable")
    })
    .await;
    assert!(
        body.contains("serving the last good configuration"),
        "{body}"
    );
    let text = until(&stats, "disconnected", |_, b| {
        b.contains("lumen_proxy_xds_connected 0")
    })
    .await;
    assert!(
        !text.contains("lumen_proxy_xds_disconnects_total 0"),
        "{text}"
    );
    let during = get(&format!("http://{admin}/config_dump")).await.1;
    assert_eq!(during, before, "the last good configuration stays in force");

    // It comes back on the same address: the proxy reconnects by itself.
    let control = start_control(xds).await;
    until(&ready, "back in sync", |s, b| s == 200 && b == "LIVE\n").await;
    until(&stats, "reconnected", |_, b| {
        b.contains("lumen_proxy_xds_connected 1")
    })
    .await;
    control.cancel();
    stop.cancel();
}

/// A mesh whose clusters are more than the 4 MiB a gRPC client takes in one message by
/// default: the state-of-the-world CDS response still reaches the proxy whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_list_bigger_than_grpcs_default_message_limit_reaches_the_proxy() {
    const SERVICES: usize = 9000;
    let mut more = String::new();
    for s in 0..SERVICES {
        more.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: default}}\nspec:\n  selector: {{app: svc-{s}}}\n  ports: [{{name: http, port: 9080}}]\n---\n"
        ));
    }
    let model = demo(more);
    let node = lumen_control::translate::ProxyNode::parse(
        "sidecar~127.0.84.3~reviews-v1.default~default.svc.cluster.local",
    )
    .expect("node id");
    let cds: usize = lumen_control::translate::translate(&model, &node)
        .of_type(lumen_api::type_url::CLUSTER)
        .iter()
        .map(|r| r.wire.len())
        .sum();
    assert!(cds > 4 << 20, "CDS is only {cds} bytes");

    let xds: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let control = serve(xds, model).await;
    let (admin, stop) = start_proxy(xds).await;
    until(&format!("http://{admin}/ready"), "ready", |s, b| {
        s == 200 && b == "LIVE\n"
    })
    .await;
    let last = format!("svc-{}.default.svc.cluster.local", SERVICES - 1);
    until(
        &format!("http://{admin}/config_dump"),
        "every cluster",
        |_, b| b.contains(&last),
    )
    .await;
    control.cancel();
    stop.cancel();
}
