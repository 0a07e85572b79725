//! Shared by the telemetry tests: a telemetry service on ephemeral ports, and finding the
//! external test peers the test command installs (see `scripts/test-all`).
// Each test crate uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lumen_telemetry::{QueryEngine, Telemetry, TelemetryError, TelemetryOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running telemetry service; dropped data dir goes with it.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub engine: QueryEngine,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), TelemetryError>>,
    pub _data: tempfile::TempDir,
}

/// Starts `lumen telemetry` in-process on 127.0.0.1 ephemeral ports with a temporary store.
pub async fn start_telemetry(flush_interval: Duration) -> Running {
    let data = tempfile::tempdir().expect("tempdir");
    let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let telemetry = Telemetry::bind(TelemetryOptions {
        data_dir: data.path().to_path_buf(),
        otlp_grpc_addr: local,
        http_addr: local,
        flush_interval,
    })
    .await
    .expect("bind");
    let stop = CancellationToken::new();
    Running {
        grpc: telemetry.otlp_grpc_addr().expect("grpc addr"),
        http: telemetry.http_addr().expect("http addr"),
        engine: telemetry.query_engine(),
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

/// The Python interpreter with the OpenTelemetry SDK: `LUMEN_PYTHON`, else the venv the test
/// command creates. Panics with what to do when it is missing: a missing peer fails loudly.
pub fn python_with_otel_sdk() -> PathBuf {
    let path = std::env::var_os("LUMEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lumen-peers/venv/bin/python"));
    let ok = std::process::Command::new(&path)
        .args([
            "-c",
            "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "peer missing: {} cannot import the OpenTelemetry Python SDK; run scripts/test-all (it installs \
         the pinned SDK) or set LUMEN_PYTHON to a python with opentelemetry-sdk==1.45.2 and \
         opentelemetry-exporter-otlp-proto-grpc==1.45.2",
        path.display()
    );
    path
}
