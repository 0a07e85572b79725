//! Shared by the telemetry tests: a telemetry service on ephemeral ports.
// Each test crate uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lumen_telemetry::{Telemetry, TelemetryError, TelemetryOptions};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A file of the upstream conformance fixtures: `../shared/conformance`, or
/// `LUMEN_CONFORMANCE_DIR`; a missing one fails the test saying where it was looked for.
pub fn conformance(file: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("LUMEN_CONFORMANCE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(
                std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            )
            .join("../../shared/conformance")
        });
    let path = dir.join(file);
    assert!(
        path.exists(),
        "conformance fixture missing: {} (set LUMEN_CONFORMANCE_DIR to the shared conformance folder)",
        path.display()
    );
    path
}

/// Exports OTLP/JSON `body` (an ExportTraceServiceRequest) to `/v1/traces`; it must be
/// accepted whole.
pub async fn export_json(otlp_http: SocketAddr, body: &serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{otlp_http}/v1/traces"))
        .json(body)
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

/// A running telemetry service; dropped data dir goes with it.
pub struct Running {
    pub grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
    pub jaeger_grpc: SocketAddr,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), TelemetryError>>,
    pub _data: tempfile::TempDir,
}

/// Starts `lumen telemetry` in-process on 127.0.0.1 ephemeral ports with a temporary store.
pub async fn start_telemetry(flush_interval: Duration) -> Running {
    start_telemetry_with(|o| o.flush_interval = flush_interval).await
}

/// As [`start_telemetry`], with options changed by `tune`.
pub async fn start_telemetry_with(tune: impl FnOnce(&mut TelemetryOptions)) -> Running {
    let data = tempfile::tempdir().expect("tempdir");
    let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut options = TelemetryOptions {
        otlp_grpc_addr: local,
        otlp_http_addr: local,
        http_addr: local,
        jaeger_grpc_addr: local,
        ..TelemetryOptions::new(data.path().to_path_buf())
    };
    tune(&mut options);
    let telemetry = Telemetry::bind(options).await.expect("bind");
    let stop = CancellationToken::new();
    Running {
        grpc: telemetry.otlp_grpc_addr().expect("grpc addr"),
        otlp_http: telemetry.otlp_http_addr().expect("otlp http addr"),
        http: telemetry.http_addr().expect("http addr"),
        jaeger_grpc: telemetry.jaeger_grpc_addr().expect("jaeger grpc addr"),
        task: tokio::spawn(telemetry.run(axum::Router::new(), stop.clone())),
        stop,
        _data: data,
    }
}

impl Running {
    /// Stops the service and checks it ended cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("join")
            .expect("telemetry ran cleanly");
    }
}

/// An export request of one server span from `service`.
pub fn one_span(service: &str) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(service.into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    name: "op".into(),
                    kind: 2,
                    start_time_unix_nano: 1_700_000_000_000_000_000,
                    end_time_unix_nano: 1_700_000_000_001_000_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Posts one gRPC frame with `payload` as an Export call; returns (grpc-status, grpc-message).
pub async fn raw_export(addr: SocketAddr, payload: &[u8]) -> (String, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(payload);
    let req = http::Request::post(format!(
        "http://{addr}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(frame)))
    .expect("request");
    let resp = client.request(req).await.expect("response");
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        headers
            .get(name)
            .or_else(|| trailers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    (get("grpc-status"), percent_decode(&get("grpc-message")))
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `google.rpc.Status`, the body of an OTLP/HTTP refusal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}
