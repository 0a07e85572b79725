//! ADS client: subscribes to listeners and clusters, then to the routes and endpoints they
//! name; converts each response at the edge, ACKs what it accepted and NACKs (with the reason)
//! what it could not use, keeping the last good configuration in force.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lumen_api::pb::envoy::config::cluster::v3 as xcluster;
use lumen_api::pb::envoy::config::core::v3::Node;
use lumen_api::pb::envoy::config::endpoint::v3 as xendpoint;
use lumen_api::pb::envoy::config::listener::v3 as xlistener;
use lumen_api::pb::envoy::config::route::v3 as xroute;
use lumen_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use lumen_api::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use lumen_api::pb::google::rpc::Status as RpcStatus;
use lumen_api::type_url;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::routing::{self, Cluster, ConfigError, MeshConfig, RouteConfig};

/// What the proxy has accepted so far, published to the data path.
pub type ConfigRx = watch::Receiver<Arc<MeshConfig>>;

/// The control plane connection as `/ready` and `/stats/prometheus` report it.
#[derive(Debug, Default)]
pub struct XdsHealth {
    /// An ADS stream is open now.
    pub connected: AtomicBool,
    /// Streams that ended (closed, failed or never opened) since the start.
    pub disconnects: AtomicU64,
    /// When the stream last went away (seconds since the epoch; 0: never).
    pub lost_at_unix: AtomicU64,
    /// When a response was last accepted (seconds since the epoch; 0: never).
    pub updated_at_unix: AtomicU64,
}

impl XdsHealth {
    /// Seconds the control plane has been away (`None` while a stream is open).
    pub fn away_secs(&self) -> Option<u64> {
        if self.connected.load(Ordering::Relaxed) {
            return None;
        }
        let lost = self.lost_at_unix.load(Ordering::Relaxed);
        Some(if lost == 0 {
            0
        } else {
            unix_now().saturating_sub(lost)
        })
    }

    /// The connection in Prometheus text.
    pub fn prometheus(&self, out: &mut String) {
        let updated = self.updated_at_unix.load(Ordering::Relaxed);
        for (name, help, kind, v) in [
            (
                "lumen_proxy_xds_connected",
                "1 while an ADS stream to the control plane is open.",
                "gauge",
                u64::from(self.connected.load(Ordering::Relaxed)),
            ),
            (
                "lumen_proxy_xds_disconnects_total",
                "ADS streams that ended or could not be opened.",
                "counter",
                self.disconnects.load(Ordering::Relaxed),
            ),
            (
                "lumen_proxy_xds_config_age_seconds",
                "Seconds since the configuration in force was last updated (0: never updated).",
                "gauge",
                if updated == 0 {
                    0
                } else {
                    unix_now().saturating_sub(updated)
                },
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The largest xDS response taken: a state-of-the-world CDS response carries every
/// cluster at once (about 550 bytes each), so gRPC's default 4 MiB would stop a mesh of some
/// 8,000 services from reaching its proxies. Envoy sets no limit; the control plane is
/// trusted, but not to the point of any size.
const MAX_RESPONSE_BYTES: usize = 256 << 20;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs the ADS client until shutdown, reconnecting with jittered exponential backoff, which
/// starts over after a session that delivered configuration. The last good configuration
/// stays in force while the control plane is away.
pub async fn run(
    endpoint: String,
    node: Node,
    tx: watch::Sender<Arc<MeshConfig>>,
    ready: watch::Sender<bool>,
    health: Arc<XdsHealth>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let mut delivered = false;
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&endpoint, &node, &tx, &ready, &health, &mut delivered) => r,
        };
        // When the control plane went away: the end of a working stream, or the first try.
        if health.connected.swap(false, Ordering::Relaxed)
            || health.lost_at_unix.load(Ordering::Relaxed) == 0
        {
            health.lost_at_unix.store(unix_now(), Ordering::Relaxed);
        }
        health.disconnects.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                tracing::warn!(endpoint = %endpoint, "xds stream closed by the control plane, reconnecting; the last good configuration stays in force")
            }
            Err(e) => {
                tracing::warn!(endpoint = %endpoint, error = %e, "xds stream failed, reconnecting; the last good configuration stays in force")
            }
        }
        if delivered {
            backoff = BACKOFF_START;
        }
        // Full jitter, so proxies cut off together do not come back together.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[derive(Default)]
struct TypeState {
    version: String,
    nonce: String,
    names: Vec<String>,
    requested: bool,
    received: bool,
}

/// One ADS stream: from connect to the stream's end.
async fn session(
    endpoint: &str,
    node: &Node,
    tx: &watch::Sender<Arc<MeshConfig>>,
    ready: &watch::Sender<bool>,
    health: &XdsHealth,
    delivered: &mut bool,
) -> Result<(), tonic::Status> {
    // HTTP/2 pings find a control plane that vanished without closing the connection.
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| tonic::Status::invalid_argument(format!("xds endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting to {endpoint}: {e}")))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let (req_tx, req_rx) = mpsc::channel::<DiscoveryRequest>(16);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    health.connected.store(true, Ordering::Relaxed);

    let mut config: MeshConfig = (**tx.borrow()).clone();
    let mut state: HashMap<&'static str, TypeState> = HashMap::new();
    let mut send_node = true;
    let mut request = |ty: &'static str, st: &TypeState, error: Option<String>| {
        let req = DiscoveryRequest {
            version_info: st.version.clone(),
            node: send_node.then(|| node.clone()),
            resource_names: st.names.clone(),
            type_url: ty.to_string(),
            response_nonce: st.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: vec![],
            }),
            ..Default::default()
        };
        send_node = false;
        req
    };
    for ty in [type_url::CLUSTER, type_url::LISTENER] {
        let st = state.entry(ty).or_default();
        st.requested = true;
        send(&req_tx, request(ty, st, None)).await?;
    }

    while let Some(resp) = responses.message().await? {
        let Some(ty) = [
            type_url::CLUSTER,
            type_url::LISTENER,
            type_url::ROUTE,
            type_url::ENDPOINT,
        ]
        .into_iter()
        .find(|t| *t == resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "ignoring response of an unrequested type");
            continue;
        };
        let mut next = config.clone();
        let outcome = apply(&mut next, ty, &resp);
        let st = state.entry(ty).or_default();
        st.nonce = resp.nonce.clone();
        match outcome {
            Ok(()) => {
                st.version = resp.version_info.clone();
                st.received = true;
                next.versions
                    .insert(type_url::short(ty), resp.version_info.clone());
                config = next;
                *delivered = true;
                health.updated_at_unix.store(unix_now(), Ordering::Relaxed);
                tracing::debug!(type_url = type_url::short(ty), version = %resp.version_info, resources = resp.resources.len(), "xds update accepted");
                send(&req_tx, request(ty, st, None)).await?;
                tx.send_replace(Arc::new(config.clone()));
            }
            Err(e) => {
                tracing::warn!(type_url = type_url::short(ty), version = %resp.version_info, error = %e, "xds update rejected (NACK)");
                send(&req_tx, request(ty, st, Some(e.to_string()))).await?;
                continue;
            }
        }
        // Follow-up subscriptions: endpoints of EDS clusters, routes named by listeners.
        for (dep, names) in [
            (type_url::ENDPOINT, config.eds_names()),
            (type_url::ROUTE, config.rds_names.clone()),
        ] {
            let dst = state.entry(dep).or_default();
            // Never subscribe to nothing: an empty first request would mean "no resources".
            if (dst.requested || !names.is_empty()) && dst.names != names {
                dst.names = names;
                dst.requested = true;
                send(&req_tx, request(dep, dst, None)).await?;
            }
        }
        if is_ready(&state) {
            ready.send_replace(true);
        }
    }
    Ok(())
}

/// Clusters and listeners are in, and so are the routes and endpoints they asked for.
fn is_ready(state: &HashMap<&'static str, TypeState>) -> bool {
    let got = |t: &str| state.get(t).is_some_and(|s| s.received);
    let idle = |t: &str| state.get(t).is_none_or(|s| !s.requested);
    got(type_url::CLUSTER)
        && got(type_url::LISTENER)
        && (got(type_url::ROUTE) || idle(type_url::ROUTE))
        && (got(type_url::ENDPOINT) || idle(type_url::ENDPOINT))
}

async fn send(
    tx: &mpsc::Sender<DiscoveryRequest>,
    req: DiscoveryRequest,
) -> Result<(), tonic::Status> {
    tx.send(req)
        .await
        .map_err(|_| tonic::Status::cancelled("xds request stream closed"))
}

/// Converts one response into the new configuration; any bad resource rejects the response.
fn apply(
    config: &mut MeshConfig,
    ty: &'static str,
    resp: &DiscoveryResponse,
) -> Result<(), ConfigError> {
    match ty {
        type_url::CLUSTER => {
            let clusters = resp
                .resources
                .iter()
                .map(|any| {
                    routing::decode::<xcluster::Cluster>(any, ty).and_then(Cluster::try_from)
                })
                .collect::<Result<Vec<_>, _>>()?;
            config.apply_clusters(clusters);
        }
        type_url::ENDPOINT => {
            let assignments = resp
                .resources
                .iter()
                .map(|any| {
                    let cla = routing::decode::<xendpoint::ClusterLoadAssignment>(any, ty)?;
                    Ok((cla.cluster_name.clone(), routing::endpoints_from(&cla)?))
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            config.apply_endpoints(assignments);
        }
        type_url::LISTENER => {
            let mut names = Vec::new();
            let mut tcp = Vec::new();
            for any in &resp.resources {
                let listener = routing::decode::<xlistener::Listener>(any, ty)?;
                let used = routing::listener_use(&listener)?;
                names.extend(used.rds_names);
                tcp.extend(used.tcp);
            }
            names.sort();
            names.dedup();
            tcp.sort_by(|a, b| a.listener.cmp(&b.listener));
            config.rds_names = names;
            config.tcp_routes = tcp;
        }
        type_url::ROUTE => {
            let mut routes = crate::FastMap::default();
            for any in &resp.resources {
                let rc =
                    RouteConfig::try_from(routing::decode::<xroute::RouteConfiguration>(any, ty)?)?;
                routes.insert(rc.name.clone(), Arc::new(rc));
            }
            config.routes = routes;
        }
        _ => {}
    }
    Ok(())
}
