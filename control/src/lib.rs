//! Lumen control plane: reads Kubernetes resources (from a config directory or a Kubernetes
//! API server), builds a model, translates it to xDS and serves it over ADS.

#![forbid(unsafe_code)]

pub mod ads;
pub mod cluster;
pub mod crd;
pub mod debug;
pub mod duration;
pub mod gamma;
pub mod model;
pub mod source;
pub mod translate;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use ads::{ProxyStatus, XdsState};
pub use cluster::KubeSource;
pub use model::Model;
pub use source::ConfigSource;

/// Why the control plane could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("loading configuration: {0}")]
    Config(#[from] model::ModelError),
    #[error("xDS server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Addresses of a bound control plane.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub xds_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub source: ConfigSource,
}

/// A control plane whose sockets are bound and whose configuration is loaded.
#[derive(Debug)]
pub struct Control {
    xds: TcpListener,
    http: TcpListener,
    source: ConfigSource,
    model_tx: watch::Sender<Arc<Model>>,
    state: Arc<XdsState>,
}

impl Control {
    /// Loads the configuration and binds both ports; nothing is served until [`Control::run`].
    pub async fn bind(options: ControlOptions) -> Result<Control, ControlError> {
        let model = options.source.load().await?;
        let (model_tx, model_rx) = watch::channel(Arc::new(model));
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ControlError::Bind { what, addr, source })
        };
        Ok(Control {
            xds: bind("xDS", options.xds_addr).await?,
            http: bind("HTTP", options.http_addr).await?,
            source: options.source,
            state: XdsState::new(model_rx),
            model_tx,
        })
    }

    pub fn xds_addr(&self) -> Option<SocketAddr> {
        self.xds.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// The shared xDS state (connected proxies and their sync status).
    pub fn state(&self) -> Arc<XdsState> {
        self.state.clone()
    }

    /// Publishes a new model to every connected proxy.
    pub fn model_sender(&self) -> watch::Sender<Arc<Model>> {
        self.model_tx.clone()
    }

    /// Serves ADS and the HTTP debug endpoints until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ControlError> {
        let watcher = tokio::spawn(
            self.source
                .clone()
                .watch(self.model_tx.clone(), shutdown.clone()),
        );
        let closing = {
            let state = self.state.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                state.closing.cancel();
            })
        };
        let http = axum::serve(self.http, router(self.state.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let grpc = tonic::transport::Server::builder()
            .add_service(ads::service::AdsServer::new(self.state.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.xds),
                shutdown.clone().cancelled_owned(),
            );
        let (http, grpc) = tokio::join!(http, grpc);
        watcher.abort();
        closing.abort();
        http.map_err(ControlError::Http)?;
        grpc?;
        Ok(())
    }
}

/// The control plane's HTTP endpoints: `/debug/syncz`, `/debug/config`, `/metrics`,
/// `/healthz`, `/ready`.
pub fn router(state: Arc<XdsState>) -> Router {
    Router::new()
        .route("/debug/syncz", get(syncz))
        .route("/metrics", get(metrics))
        .route("/debug/config", get(config))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn config(State(state): State<Arc<XdsState>>) -> Json<debug::ConfigDump> {
    Json(debug::dump(&state.model()))
}

/// The control plane's own counters, in Prometheus' text format.
async fn metrics(State(state): State<Arc<XdsState>>) -> String {
    let pushes = state.pushes.load(std::sync::atomic::Ordering::Relaxed);
    let bytes = state
        .pushed_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let connected = state.proxy_status().len();
    format!(
        "# HELP lumen_control_xds_pushes_total xDS responses sent, every proxy and type.\n\
         # TYPE lumen_control_xds_pushes_total counter\n\
         lumen_control_xds_pushes_total {pushes}\n\
         # HELP lumen_control_xds_pushed_bytes_total Bytes of the xDS responses sent.\n\
         # TYPE lumen_control_xds_pushed_bytes_total counter\n\
         lumen_control_xds_pushed_bytes_total {bytes}\n\
         # HELP lumen_control_xds_connected Proxies with an open ADS stream.\n\
         # TYPE lumen_control_xds_connected gauge\n\
         lumen_control_xds_connected {connected}\n"
    )
}

async fn syncz(State(state): State<Arc<XdsState>>) -> Json<Vec<ProxyStatus>> {
    Json(state.proxy_status())
}
