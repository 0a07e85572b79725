//! Lumen's sidecar proxy: carries a workload's HTTP traffic (outbound :15001, inbound :15006),
//! routes it with configuration from the control plane (ADS), continues the trace, and reports
//! spans and Istio-standard metrics over OTLP (and for scraping on :15090, as Istio's sidecars). No datafusion, no kube: it stays small.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod http;
pub mod routing;
pub mod server;
pub mod signal;
pub mod stack;
pub mod telemetry;
pub mod trace;
pub mod xds;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use lumen_api::pb::envoy::config::core::v3::Node;
use lumen_api::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::ProxyConfig;
pub use signal::shutdown_on_signal;
pub use telemetry::{ExportOptions, Identity};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A proxy with its listeners bound.
#[derive(Debug)]
pub struct Proxy {
    config: ProxyConfig,
    export: ExportOptions,
    outbound: TcpListener,
    inbound: TcpListener,
    admin: TcpListener,
    prometheus: TcpListener,
}

impl Proxy {
    /// Binds the outbound, inbound and admin listeners.
    pub async fn bind(config: ProxyConfig, export: ExportOptions) -> Result<Proxy, ProxyError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        Ok(Proxy {
            outbound: bind("outbound", config.outbound_addr).await?,
            inbound: bind("inbound", config.inbound_addr).await?,
            admin: bind("admin", config.admin_addr).await?,
            prometheus: bind("prometheus", config.prometheus_addr).await?,
            config,
            export,
        })
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound.local_addr().ok()
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus.local_addr().ok()
    }

    /// Runs until `shutdown`: drains connections, then flushes telemetry.
    pub async fn run(self, shutdown: CancellationToken) {
        let (config_tx, config_rx) = watch::channel(Arc::new(routing::MeshConfig::default()));
        let (ready_tx, ready_rx) = watch::channel(false);
        let (reporter, queue) = telemetry::Reporter::new(self.config.identity.clone(), 8192);
        let reporter = Arc::new(reporter);
        let data = Arc::new(http::DataPath::new(config_rx, reporter.clone()));

        let xds = tokio::spawn(xds::run(
            self.config.xds_endpoint.clone(),
            node(&self.config),
            config_tx,
            ready_tx,
            shutdown.clone(),
        ));
        let export_stop = CancellationToken::new();
        let exporter = {
            let reporter = reporter.clone();
            let mut options = self.export.clone();
            options.endpoint = options
                .endpoint
                .or_else(|| self.config.otlp_endpoint.clone());
            let stop = export_stop.clone();
            tokio::spawn(async move { reporter.export_loop(queue, options, stop).await })
        };
        let conns = admin::Conns::default();
        let outbound = server::serve_stack(
            self.outbound,
            data.outbound(),
            self.config.limits,
            conns.outbound.clone(),
            shutdown.clone(),
        );
        let inbound = server::serve_stack(
            self.inbound,
            data.inbound(),
            self.config.limits,
            conns.inbound.clone(),
            shutdown.clone(),
        );
        let admin_state = admin::Admin {
            data,
            conns,
            ready: ready_rx,
            node_id: self.config.node_id.clone(),
        };
        let prometheus = {
            let admin_state = admin_state.clone();
            server::serve(
                self.prometheus,
                move |req| admin_state.clone().prometheus_only(req),
                shutdown.clone(),
            )
        };
        let admin = server::serve(
            self.admin,
            move |req| admin_state.clone().handle(req),
            shutdown.clone(),
        );
        tracing::info!(node = %self.config.node_id, outbound = %self.config.outbound_addr, inbound = %self.config.inbound_addr, "proxy started");
        tokio::join!(outbound, inbound, admin, prometheus);
        export_stop.cancel();
        let _ = exporter.await;
        let _ = xds.await;
        tracing::debug!(node = %self.config.node_id, "proxy stopped");
    }
}

/// The xDS node: id, cluster and Istio's metadata keys.
fn node(config: &ProxyConfig) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let id = &config.identity;
    let labels = Struct {
        fields: [("app", id.app.as_str()), ("version", id.version.as_str())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), s(v)))
            .collect(),
    };
    let mut fields: HashMap<String, Value> = HashMap::new();
    fields.insert("NAME".into(), s(&id.pod));
    fields.insert("NAMESPACE".into(), s(&id.namespace));
    fields.insert("WORKLOAD_NAME".into(), s(&id.workload));
    fields.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    Node {
        id: config.node_id.clone(),
        cluster: config.node_cluster.clone(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        user_agent_name: "lumen-proxy".to_string(),
        ..Default::default()
    }
}
