//! The ADS server spoken to by a real xDS client (tonic, envoy-types): first responses, ACK,
//! NACK, stale nonces, named subscriptions, pushes on configuration change, bad node ids.
// Test helpers outside #[test] functions unwrap too: a panic is the test report.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lumen_api::pb::envoy::config::core::v3::Node;
use lumen_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use lumen_api::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use lumen_api::pb::google::rpc::Status as RpcStatus;
use lumen_api::type_url;
use lumen_control::{ConfigSource, Control, ControlOptions, Model, XdsState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const NODE: &str = "sidecar~127.0.10.1~productpage-v1.default~default.svc.cluster.local";

fn demo_model() -> Model {
    common::demo_model([127, 0, 10])
}

struct Harness {
    state: Arc<XdsState>,
    xds: SocketAddr,
    model_tx: tokio::sync::watch::Sender<Arc<Model>>,
    stop: CancellationToken,
}

async fn start(source: ConfigSource) -> Harness {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let control = Control::bind(ControlOptions {
        xds_addr: local,
        http_addr: local,
        source,
    })
    .await
    .unwrap();
    let state = control.state();
    let xds = control.xds_addr().unwrap();
    let model_tx = control.model_sender();
    let stop = CancellationToken::new();
    tokio::spawn(control.run(stop.clone()));
    Harness {
        state,
        xds,
        model_tx,
        stop,
    }
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

async fn connect(xds: SocketAddr) -> Stream {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let rx = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Stream { tx, rx }
}

fn request(
    ty: &str,
    names: &[&str],
    version: &str,
    nonce: &str,
    node: Option<&str>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: node.map(|id| Node {
            id: id.into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: ty.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

impl Stream {
    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("response in time")
            .unwrap()
            .expect("stream open")
    }

    async fn nothing_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.rx.message()).await.is_err()
    }
}

fn cds_state(state: &XdsState) -> String {
    state
        .proxy_status()
        .first()
        .map(|p| p.types["CDS"].state.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn ack_nack_stale_nonce_and_push() {
    let h = start(ConfigSource::Static(demo_model())).await;
    let mut s = connect(h.xds).await;

    s.send(request(type_url::CLUSTER, &[], "", "", Some(NODE)))
        .await;
    let cds = s.next().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(
        cds.resources.len(),
        7,
        "6 outbound clusters and the inbound one"
    );
    assert_eq!(cds_state(&h.state), "STALE", "sent, not yet acknowledged");

    s.send(request(
        type_url::CLUSTER,
        &[],
        &cds.version_info,
        &cds.nonce,
        None,
    ))
    .await;
    assert!(
        s.nothing_for(Duration::from_millis(300)).await,
        "an ACK gets no response"
    );
    assert_eq!(cds_state(&h.state), "SYNCED");

    // EDS for two named clusters: exactly those come back.
    let names = [
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080||ratings.default.svc.cluster.local",
    ];
    s.send(request(type_url::ENDPOINT, &names, "", "", None))
        .await;
    let eds = s.next().await;
    assert_eq!(eds.resources.len(), 2);

    // A request with an old nonce is stale and ignored, even with an error attached.
    let mut stale = request(type_url::CLUSTER, &[], "", "nonce-from-the-past", None);
    stale.error_detail = Some(RpcStatus {
        code: 3,
        message: "stale".into(),
        details: vec![],
    });
    s.send(stale).await;
    assert!(s.nothing_for(Duration::from_millis(300)).await);
    assert_eq!(cds_state(&h.state), "SYNCED");

    // A configuration change pushes new clusters; the proxy rejects them (NACK).
    let mut model = demo_model();
    model.destination_rules.clear();
    h.model_tx.send_replace(Arc::new(model));
    let pushed = s.next().await;
    assert_eq!(pushed.type_url, type_url::CLUSTER);
    assert_eq!(pushed.resources.len(), 5, "subset clusters are gone");
    assert_ne!(pushed.version_info, cds.version_info);
    let eds_push = s.next().await;
    assert_eq!(
        eds_push.type_url,
        type_url::ENDPOINT,
        "endpoints follow clusters"
    );
    assert_eq!(
        eds_push.resources.len(),
        1,
        "the v1 subset cluster no longer exists"
    );
    let mut nack = request(
        type_url::CLUSTER,
        &[],
        &cds.version_info,
        &pushed.nonce,
        None,
    );
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "cluster outbound|x: unsupported".into(),
        details: vec![],
    });
    s.send(nack).await;
    assert!(
        s.nothing_for(Duration::from_millis(300)).await,
        "a NACK is not retried with the same config"
    );
    let status = h.state.proxy_status();
    assert_eq!(status[0].types["CDS"].state, "NACK");
    assert_eq!(
        status[0].types["CDS"].nack.as_deref(),
        Some("cluster outbound|x: unsupported")
    );
    assert_eq!(
        status[0].types["CDS"].acked_version, cds.version_info,
        "the last good version stays acked"
    );

    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.state.proxy_status().is_empty(),
        "closed streams leave syncz"
    );
    h.stop.cancel();
}

#[tokio::test]
async fn bad_node_id_is_invalid_argument() {
    let h = start(ConfigSource::Static(demo_model())).await;
    let mut s = connect(h.xds).await;
    s.send(request(
        type_url::CLUSTER,
        &[],
        "",
        "",
        Some("not-a-node-id"),
    ))
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("not-a-node-id"), "{}", err.message());
    h.stop.cancel();
}

#[tokio::test]
async fn config_dir_changes_are_pushed_and_bad_yaml_is_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bookinfo.yaml"),
        include_str!("../../fixtures/demo/bookinfo.yaml"),
    )
    .unwrap();
    let h = start(ConfigSource::Dir(dir.path().to_path_buf())).await;
    let mut s = connect(h.xds).await;
    s.send(request(type_url::CLUSTER, &[], "", "", Some(NODE)))
        .await;
    let first = s.next().await;
    assert_eq!(
        first.resources.len(),
        5,
        "4 services and the inbound cluster"
    );
    s.send(request(
        type_url::CLUSTER,
        &[],
        &first.version_info,
        &first.nonce,
        None,
    ))
    .await;

    // Broken YAML: the last good configuration stays, nothing is pushed.
    std::fs::write(
        dir.path().join("routing.yaml"),
        "kind: DestinationRule\nspec: [",
    )
    .unwrap();
    assert!(
        s.nothing_for(Duration::from_millis(2500)).await,
        "invalid config must not be pushed"
    );

    // Fixed: the subsets arrive.
    std::fs::write(
        dir.path().join("routing.yaml"),
        include_str!("../../fixtures/demo/routing.yaml"),
    )
    .unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pushed.resources.len(), 7);
    h.stop.cancel();
}
