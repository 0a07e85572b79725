//! Shared by the telemetry tests: a telemetry service on ephemeral ports.

use std::net::SocketAddr;
use std::time::Duration;

use lumen_telemetry::{Telemetry, TelemetryError, TelemetryOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running telemetry service; dropped data dir goes with it.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
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
