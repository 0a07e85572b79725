//! Lumen's telemetry service: receives OTLP from proxies and SDKs, stores it columnar (Arrow
//! memtables flushed to Parquet), and answers SQL over it with DataFusion.

#![forbid(unsafe_code)]

pub mod budget;
pub mod conn;
pub mod convert;
pub mod detail;
pub mod exposition;
pub mod graph;
mod hex_ids;
pub mod http;
pub mod jaeger;
pub mod manifest;
pub mod meshmetrics;
pub mod otlp_http;
pub mod query;
pub mod query_string;
pub mod readback;
pub mod receiver;
pub mod remote;
pub mod rollup;
pub mod schema;
pub mod selfmetrics;
pub mod store;
pub mod table;
pub mod trace_view;
pub mod wal;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A map filled per span (the rollups' groups): hashed with foldhash, seeded per process,
/// where std's SipHash cost more than the rest of the row's work.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use http::AllowedHosts;
pub use query::{MeshQuery, QueryEngine, QueryLimits};
pub use store::{Store, StoreOptions};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

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
    #[error("starting the query runtime: {0}")]
    QueryRuntime(std::io::Error),
    #[error("final flush failed, the rows stay in the write-ahead log for the next start: {0}")]
    FinalFlush(store::StoreError),
}

/// Where the service listens and stores.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    pub data_dir: PathBuf,
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Jaeger's `jaeger.api_v3.QueryService` over gRPC.
    pub jaeger_grpc_addr: SocketAddr,
    pub flush_interval: Duration,
    /// What queries may spend.
    pub query: QueryLimits,
    /// Host names the HTTP port answers to besides loopback names and its own address.
    pub allowed_hosts: Vec<String>,
    /// Memory and WAL settings of the store.
    pub store: StoreOptions,
    /// OTLP export requests handled at once (both signals); more are refused.
    pub max_inflight_requests: usize,
    /// OTLP/gRPC streams one connection may open at once.
    pub max_streams_per_connection: u32,
    /// OTLP/gRPC connections open at once; more wait in the backlog.
    pub max_connections: usize,
    /// Largest OTLP request accepted, after decompression.
    pub max_message_bytes: usize,
    /// Longest an OTLP request may take, body included.
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in progress before it flushes.
    pub drain_timeout: Duration,
    /// A bucket to publish files to and read other writers' files from (`crate::remote`).
    pub object_store: Option<String>,
    /// This process's name in the bucket; by default the id kept in `<data>/writer-id`
    /// (made up at the first start).
    pub writer_id: Option<String>,
    /// Bounds on the mesh's metric families served on `/metrics`.
    pub mesh_metrics: meshmetrics::MeshMetricsOptions,
}

impl TelemetryOptions {
    /// Defaults for everything but where to store.
    pub fn new(data_dir: PathBuf) -> TelemetryOptions {
        TelemetryOptions {
            data_dir,
            otlp_grpc_addr: SocketAddr::from(([127, 0, 0, 1], 4317)),
            otlp_http_addr: SocketAddr::from(([127, 0, 0, 1], 4318)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 16686)),
            jaeger_grpc_addr: SocketAddr::from(([127, 0, 0, 1], 16685)),
            flush_interval: Duration::from_secs(5),
            query: QueryLimits::default(),
            allowed_hosts: Vec::new(),
            store: StoreOptions::default(),
            max_inflight_requests: 32,
            max_streams_per_connection: 32,
            max_connections: 128,
            max_message_bytes: receiver::MAX_MESSAGE_BYTES,
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            object_store: None,
            writer_id: None,
            mesh_metrics: meshmetrics::MeshMetricsOptions::default(),
        }
    }
}

/// A bound telemetry service.
#[derive(Debug)]
pub struct Telemetry {
    store: Arc<Store>,
    grpc: TcpListener,
    otlp_http: TcpListener,
    http: TcpListener,
    jaeger_grpc: TcpListener,
    flush_interval: Duration,
    engine: QueryEngine,
    receiver: Arc<receiver::Receiver>,
    allowed_hosts: AllowedHosts,
    options: TelemetryOptions,
}

impl Telemetry {
    /// Opens the store and binds both ports.
    pub async fn bind(options: TelemetryOptions) -> Result<Telemetry, TelemetryError> {
        let store = Arc::new(Store::open_with(
            &options.data_dir,
            options.store,
            receiver::decode_record,
        )?);
        if let Some(url) = &options.object_store {
            let writer = match &options.writer_id {
                Some(id) => id.clone(),
                None => remote::writer_id(&options.data_dir).map_err(|source| {
                    store::StoreError::Io {
                        path: options.data_dir.join("writer-id"),
                        source,
                    }
                })?,
            };
            let remote = remote::Remote::open(url, &writer).map_err(store::StoreError::Remote)?;
            tracing::info!(url = %url, writer = %writer, "publishing files to the object store");
            store.attach_remote(Arc::new(remote)).await?;
        }
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| TelemetryError::Bind { what, addr, source })
        };
        let engine = QueryEngine::with_limits(store.clone(), options.query)
            .map_err(TelemetryError::QueryRuntime)?;
        let http = bind("HTTP", options.http_addr).await?;
        let http_addr = http.local_addr().unwrap_or(options.http_addr);
        let receiver = receiver::Receiver::new(
            store.clone(),
            options.max_inflight_requests,
            options.max_message_bytes,
            options.mesh_metrics,
        );
        Ok(Telemetry {
            grpc: bind("OTLP gRPC", options.otlp_grpc_addr).await?,
            otlp_http: bind("OTLP HTTP", options.otlp_http_addr).await?,
            jaeger_grpc: bind("Jaeger gRPC", options.jaeger_grpc_addr).await?,
            receiver,
            http,
            store,
            flush_interval: options.flush_interval,
            engine,
            allowed_hosts: AllowedHosts::new(http_addr, &options.allowed_hosts),
            options,
        })
    }

    pub fn otlp_grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn otlp_http_addr(&self) -> Option<SocketAddr> {
        self.otlp_http.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    pub fn jaeger_grpc_addr(&self) -> Option<SocketAddr> {
        self.jaeger_grpc.local_addr().ok()
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The engine the HTTP API queries with; the dashboard shares it (and its limits).
    pub fn query_engine(&self) -> QueryEngine {
        self.engine.clone()
    }

    /// Serves OTLP and HTTP (with `extra` routes merged in, e.g. the dashboard) until
    /// `shutdown`; flushes every `flush_interval` (sooner when the buffer fills), then at
    /// shutdown drains requests in progress for at most `drain_timeout` and flushes once
    /// more. A final flush that fails is an error: its rows stay in the WAL.
    pub async fn run(
        self,
        extra: axum::Router,
        shutdown: CancellationToken,
    ) -> Result<(), TelemetryError> {
        let options = &self.options;
        let api = http::ApiState {
            engine: self.query_engine(),
            store: self.store.clone(),
            receiver: self.receiver.clone(),
        };
        let app = http::guard(http::router(api).merge(extra), self.allowed_hosts.clone());
        let http =
            axum::serve(self.http, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let otlp_http = axum::serve(self.otlp_http, otlp_http::router(self.receiver.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let otlp = self.receiver.clone();
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(options.max_streams_per_connection)
            .concurrency_limit_per_connection(options.max_streams_per_connection as usize)
            .timeout(options.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .http2_max_header_list_size(64 * 1024)
            .initial_connection_window_size(512 * 1024)
            .initial_stream_window_size(256 * 1024)
            .add_service(receiver::OtlpGrpc::<receiver::Traces>::new(otlp.clone()))
            .add_service(receiver::OtlpGrpc::<receiver::Metrics>::new(otlp.clone()))
            .add_service(receiver::OtlpGrpc::<receiver::Logs>::new(otlp))
            .serve_with_incoming_shutdown(
                conn::limited(self.grpc, options.max_connections),
                shutdown.clone().cancelled_owned(),
            );
        // Jaeger's query service: queries run on the engine's own runtime, within its limits.
        let jaeger_grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(options.max_streams_per_connection)
            .concurrency_limit_per_connection(options.max_streams_per_connection as usize)
            .timeout(options.request_timeout)
            .http2_max_header_list_size(64 * 1024)
            .add_service(jaeger::grpc::QueryService::new(self.engine.clone()))
            .serve_with_incoming_shutdown(
                conn::limited(self.jaeger_grpc, options.max_connections),
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
                        () = store.flush_wanted() => {}
                    }
                    if let Err(e) = store.flush().await {
                        tracing::error!(error = %e, "flush failed, rows stay in the WAL and memory and are retried");
                    }
                    let _ = store.maintain(now_ns()).await;
                }
            }
        };
        let servers = async {
            let (http, otlp_http, grpc, jaeger_grpc, ()) =
                tokio::join!(http, otlp_http, grpc, jaeger_grpc, flusher);
            (http.and(otlp_http), grpc.and(jaeger_grpc), ())
        };
        let drain_deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(options.drain_timeout).await;
        };
        let (http, grpc) = tokio::select! {
            (http, grpc, ()) = servers => (http.map_err(TelemetryError::Http), grpc.map_err(TelemetryError::Grpc)),
            () = drain_deadline => {
                tracing::warn!(timeout = ?options.drain_timeout, "requests still in progress at the drain deadline, closing them");
                (Ok(()), Ok(()))
            }
        };
        // Final flush after both servers stopped taking data.
        self.store
            .flush()
            .await
            .map_err(TelemetryError::FinalFlush)?;
        http?;
        grpc?;
        Ok(())
    }
}
