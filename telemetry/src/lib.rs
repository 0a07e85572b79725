//! Lumen's telemetry service: receives OTLP from proxies and SDKs, stores it columnar (Arrow
//! memtables flushed to Parquet), and answers SQL over it with DataFusion.

#![forbid(unsafe_code)]

pub mod convert;
pub mod http;
pub mod query;
pub mod receiver;
pub mod schema;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use query::{EdgeStats, MeshOverview, MeshQuery, QueryEngine, ServiceStats};
pub use store::Store;

/// Why the telemetry service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("OTLP gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Where the service listens and stores.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    pub data_dir: PathBuf,
    pub otlp_grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub flush_interval: Duration,
}

/// A bound telemetry service.
#[derive(Debug)]
pub struct Telemetry {
    store: Arc<Store>,
    grpc: TcpListener,
    http: TcpListener,
    flush_interval: Duration,
}

impl Telemetry {
    /// Opens the store and binds both ports.
    pub async fn bind(options: TelemetryOptions) -> Result<Telemetry, TelemetryError> {
        let store = Arc::new(Store::open(&options.data_dir)?);
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| TelemetryError::Bind { what, addr, source })
        };
        Ok(Telemetry {
            grpc: bind("OTLP gRPC", options.otlp_grpc_addr).await?,
            http: bind("HTTP", options.http_addr).await?,
            store,
            flush_interval: options.flush_interval,
        })
    }

    pub fn otlp_grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn query_engine(&self) -> QueryEngine {
        QueryEngine::new(self.store.clone())
    }

    /// Serves OTLP and HTTP (with `extra` routes merged in, e.g. the dashboard) until
    /// `shutdown`; flushes every `flush_interval` and once more at the end.
    pub async fn run(
        self,
        extra: axum::Router,
        shutdown: CancellationToken,
    ) -> Result<(), TelemetryError> {
        let app = http::router(self.query_engine()).merge(extra);
        let http =
            axum::serve(self.http, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let grpc = tonic::transport::Server::builder()
            .add_service(receiver::OtlpGrpc::<receiver::Traces>::new(
                self.store.clone(),
            ))
            .add_service(receiver::OtlpGrpc::<receiver::Metrics>::new(
                self.store.clone(),
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc),
                shutdown.clone().cancelled_owned(),
            );
        let flusher = {
            let store = self.store.clone();
            let shutdown = shutdown.clone();
            let interval = self.flush_interval;
            async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(interval) => {}
                    }
                    if let Err(e) = store.flush().await {
                        tracing::error!(error = %e, "flush failed, rows stay in memory and are retried");
                    }
                }
            }
        };
        let (http, grpc, ()) = tokio::join!(http, grpc, flusher);
        // Final flush after both servers stopped taking data.
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        http.map_err(TelemetryError::Http)?;
        grpc?;
        Ok(())
    }
}
