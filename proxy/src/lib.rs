//! Lumen's sidecar proxy: carries a workload's HTTP traffic (outbound :15001, inbound :15006),
//! routes it with configuration from the control plane (ADS), continues the trace, and reports
//! spans and Istio-standard metrics over OTLP (and for scraping on :15090, as Istio's sidecars). No datafusion, no kube: it stays small.

#![forbid(unsafe_code)]

pub mod admin;
pub mod bootstrap;
pub mod config;
pub mod http;
pub mod lb;
pub mod routing;
pub mod server;
pub mod signal;
pub mod stack;
pub mod tcp;
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

pub use config::{Capture, ProxyConfig};

/// A map looked up on every request (routes, clusters, domains, metric series): hashed with
/// foldhash, seeded per process, where std's SipHash cost a request more than the lookup.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
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
    /// The sidecar's listeners (none in standalone mode).
    sidecar: Option<(TcpListener, TcpListener)>,
    /// Standalone mode's static listeners.
    statics: Vec<(bootstrap::StaticListener, TcpListener)>,
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
        let (sidecar, statics) = match &config.statics {
            None => (
                Some((
                    bind("outbound", config.outbound_addr).await?,
                    bind("inbound", config.inbound_addr).await?,
                )),
                Vec::new(),
            ),
            Some(st) => {
                let mut bound = Vec::new();
                for l in &st.listeners {
                    bound.push((l.clone(), bind("static", l.address).await?));
                }
                (None, bound)
            }
        };
        Ok(Proxy {
            sidecar,
            statics,
            admin: bind("admin", config.admin_addr).await?,
            prometheus: bind("prometheus", config.prometheus_addr).await?,
            config,
            export,
        })
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.sidecar.as_ref().and_then(|(o, _)| o.local_addr().ok())
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.sidecar.as_ref().and_then(|(_, i)| i.local_addr().ok())
    }

    /// Where each static listener listens (standalone mode).
    pub fn static_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.statics
            .iter()
            .filter_map(|(l, t)| Some((l.name.clone(), t.local_addr().ok()?)))
            .collect()
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
        let mut options = self.export.clone();
        options.endpoint = options
            .endpoint
            .or_else(|| self.config.otlp_endpoint.clone());
        let (mut reporter, queue) = telemetry::Reporter::with_switches(
            self.config.identity.clone(),
            8192,
            self.config.switches,
        );
        if options.endpoint.is_none() {
            tracing::info!("no OTLP endpoint (no lumen-telemetry cluster): spans are not recorded");
            reporter = reporter.without_span_export();
        }
        let reporter = Arc::new(reporter);
        let captured = self.config.capture == Capture::Redirect;
        let data = Arc::new(
            http::DataPath::new(config_rx, reporter.clone())
                .with_inbound_source(captured.then_some(http::INBOUND_SOURCE)),
        );

        let xds_health = Arc::new(xds::XdsHealth::default());
        let xds = match &self.config.statics {
            None => Some(tokio::spawn(xds::run(
                self.config.xds_endpoint.clone(),
                node(&self.config),
                config_tx,
                ready_tx,
                xds_health.clone(),
                shutdown.clone(),
            ))),
            Some(st) => {
                // Standalone: the whole configuration is here, and it is ready.
                let _ = config_tx.send(Arc::new(static_config(st, None)));
                let _ = ready_tx.send(true);
                None
            }
        };
        let export_stop = CancellationToken::new();
        let exporter = {
            let reporter = reporter.clone();
            let stop = export_stop.clone();
            tokio::spawn(async move { reporter.export_loop(queue, options, stop).await })
        };
        let conns = admin::Conns::default();
        let mut data_path = tokio::task::JoinSet::new();
        if let Some((outbound, inbound)) = self.sidecar {
            if captured {
                // Captured: the outbound port takes whatever the app connects to, HTTP or not.
                data_path.spawn(server::serve_stack_detecting(
                    outbound,
                    data.outbound(),
                    self.config.limits,
                    conns.outbound.clone(),
                    tcp::outbound_detect(data.config.clone(), reporter.clone()),
                    shutdown.clone(),
                ));
            } else {
                data_path.spawn(server::serve_stack(
                    outbound,
                    data.outbound(),
                    self.config.limits,
                    conns.outbound.clone(),
                    shutdown.clone(),
                ));
            }
            // The inbound port serves HTTP/1, HTTP/2 and opaque TCP alike.
            let mut detect = server::Detect::opaque(tcp::inbound_opaque(
                data.config.clone(),
                reporter.clone(),
                data.inbound_source,
            ));
            detect.original_dst = captured;
            detect.declared = tcp::inbound_declared(data.config.clone());
            data_path.spawn(server::serve_stack_detecting(
                inbound,
                data.inbound(),
                self.config.limits,
                conns.inbound.clone(),
                detect,
                shutdown.clone(),
            ));
        }
        if let Some(st) = &self.config.statics {
            for (listener, socket) in self.statics {
                if let Some(name) = &listener.tcp_cluster {
                    let cluster = static_config(st, None)
                        .clusters
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(routing::Cluster::new(name.clone(), Vec::new()))
                        });
                    data_path.spawn(tcp::serve(
                        socket,
                        cluster,
                        reporter.clone(),
                        self.config.limits,
                        conns.outbound.clone(),
                        shutdown.clone(),
                    ));
                    continue;
                }
                // Each listener routes with its own route configuration.
                let (_keep, rx) = watch::channel(Arc::new(static_config(st, Some(&listener))));
                let stack = stack::outbound(rx, reporter.clone(), stack::connect::Connect::new());
                data_path.spawn(server::serve_stack(
                    socket,
                    stack,
                    self.config.limits,
                    conns.outbound.clone(),
                    shutdown.clone(),
                ));
            }
        }
        let admin_state = admin::Admin {
            data,
            conns,
            xds: self.config.statics.is_none().then_some(xds_health),
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
        let listeners = async { while data_path.join_next().await.is_some() {} };
        tokio::join!(listeners, admin, prometheus);
        export_stop.cancel();
        let _ = exporter.await;
        if let Some(xds) = xds {
            let _ = xds.await;
        }
        tracing::debug!(node = %self.config.node_id, "proxy stopped");
    }
}

/// Standalone mode's routing state: every static cluster, and the route configuration of
/// `listener` (of every listener when `None`, for `/config_dump`).
fn static_config(
    st: &bootstrap::StaticConfig,
    listener: Option<&bootstrap::StaticListener>,
) -> routing::MeshConfig {
    let mut cfg = routing::MeshConfig::default();
    for l in &st.listeners {
        if listener.is_none_or(|only| only.name == l.name) {
            cfg.routes.insert(l.routes.name.clone(), l.routes.clone());
        }
    }
    cfg.apply_clusters(
        st.clusters
            .iter()
            .map(|(name, c)| {
                routing::Cluster::new(name.clone(), c.endpoints.clone()).with_http2(c.http2)
            })
            .collect(),
    );
    cfg.versions.insert("static", "bootstrap".to_string());
    cfg
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
