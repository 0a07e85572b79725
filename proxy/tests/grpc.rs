//! gRPC through lumen-proxy (standalone, from a static bootstrap with HTTP/2 clusters): a
//! unary call to a tonic OTLP server, whose `grpc-status` reaches the metrics, and a stream
//! both ways to lumen control's ADS server, from tonic clients speaking h2c to the proxy.

mod common;

use common::free_port;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lumen_api::pb::envoy::config::core::v3::Node;
use lumen_api::pb::envoy::service::discovery::v3::DiscoveryRequest;
use lumen_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use lumen_api::type_url;
use lumen_control::model::Model;
use lumen_control::source::ConfigSource;
use lumen_control::{Control, ControlOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio_util::sync::CancellationToken;

/// Answers OK, or UNAVAILABLE when the first span is named "fail".
struct Otlp;

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let first = req
            .get_ref()
            .resource_spans
            .first()
            .and_then(|r| r.scope_spans.first())
            .and_then(|s| s.spans.first())
            .map(|s| s.name.clone());
        if first.as_deref() == Some("fail") {
            return Err(tonic::Status::unavailable("asked to fail"));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn export(name: &str) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![1; 16],
                    span_id: vec![1; 8],
                    name: name.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn cluster(name: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {port}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_bidirectional_streams_go_through_with_their_status() {
    let stop = CancellationToken::new();
    // The upstreams: a tonic OTLP server and lumen control's ADS server.
    let otlp_port = free_port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Otlp))
            .serve(SocketAddr::from(([127, 0, 0, 1], otlp_port))),
    );
    let mut model = Model::from_yaml(
        "bookinfo.yaml",
        include_str!("../../fixtures/demo/bookinfo.yaml"),
    )
    .expect("model");
    model.move_pods([127, 0, 10], [127, 0, 85]);
    let control = Control::bind(ControlOptions {
        xds_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        source: ConfigSource::Static(model),
    })
    .await
    .expect("control");
    let ads_port = control.xds_addr().expect("xds").port();
    tokio::spawn({
        let stop = stop.clone();
        async move { control.run(stop).await }
    });

    // lumen-proxy in front of both, routing by gRPC service path.
    let (listen, admin, prom) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"node: {{id: grpc-front, cluster: test, metadata: {{LUMEN_PROMETHEUS_PORT: "{prom}"}}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: grpc
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          route_config:
            name: grpc
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /opentelemetry.}}
                route: {{cluster: otlp}}
              - match: {{prefix: /envoy.service.discovery.}}
                route: {{cluster: ads}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{}{}"#,
        cluster("otlp", otlp_port),
        cluster("ads", ads_port)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = common::start_proxy(dir.path(), "grpc.yaml", &yaml, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the proxy never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{listen}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("h2c to the proxy");

    // Unary, both outcomes.
    let mut otlp = TraceServiceClient::new(channel.clone());
    otlp.export(export("ok"))
        .await
        .expect("OK through the proxy");
    let err = otlp.export(export("fail")).await.expect_err("UNAVAILABLE");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "asked to fail");

    // Both ways on one stream: ask for clusters, ACK them, ask for listeners.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node = Node {
        id: "sidecar~127.0.85.3~reviews-v1.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let clusters = responses
        .message()
        .await
        .expect("message")
        .expect("clusters");
    assert_eq!(clusters.type_url, type_url::CLUSTER);
    assert!(!clusters.resources.is_empty());
    tx.send(DiscoveryRequest {
        type_url: type_url::CLUSTER.into(),
        version_info: clusters.version_info.clone(),
        response_nonce: clusters.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    tx.send(DiscoveryRequest {
        type_url: type_url::LISTENER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let listeners = responses
        .message()
        .await
        .expect("message")
        .expect("listeners");
    assert_eq!(listeners.type_url, type_url::LISTENER);
    drop(tx);

    // The metrics say gRPC, with each call's status.
    let stats = reqwest::get(format!("http://127.0.0.1:{admin}/stats/prometheus"))
        .await
        .expect("stats")
        .text()
        .await
        .expect("text");
    for status in ["0", "14"] {
        assert!(
            stats.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains(r#"request_protocol="grpc""#)
                && l.contains(&format!(r#"grpc_response_status="{status}""#))),
            "grpc status {status} in {stats}"
        );
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    stop.cancel();
}
