//! Opaque TCP: a listener whose bytes go to a cluster as they are (Envoy's TCP proxy), one
//! upstream connection per downstream one, round robin over the cluster's endpoints, with
//! Istio's TCP metrics (connections opened and closed, bytes sent and received) under the
//! listener's connection limits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lumen_api::cluster_name;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::routing::{Cluster, Endpoint};
use crate::server::{Accepted, ConnStats, Declared, DeclaredFn, Detect, Limits};
use crate::stack::error::flags;
use crate::telemetry::{Label, Reporter, RequestLabels, unknown};

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The labels of one connection to `endpoint` of `cluster` (`reporter="source"`).
fn labels(reporter: &Reporter, cluster: &Cluster, app: &str, flag: &str) -> RequestLabels {
    let me = reporter.me();
    let cluster_name: Label = Arc::from(cluster.name.as_str());
    RequestLabels {
        reporter: "source",
        source_workload: me.workload.clone(),
        source_workload_namespace: me.namespace.clone(),
        source_app: me.app.clone(),
        source_version: me.version.clone(),
        destination_service: cluster_name.clone(),
        destination_service_name: cluster_name,
        destination_app: Arc::from(app),
        request_protocol: "tcp",
        response_flags: Arc::from(flag),
        ..Default::default()
    }
}

/// Connects to `to` within [`CONNECT_TIMEOUT`], from `source` when given (the address the
/// capture rules let through, for connections to the local app).
pub async fn connect(to: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let attempt = async {
        match source {
            None => TcpStream::connect(to).await,
            Some(ip) => {
                let socket = match to {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(to).await
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Carries one connection's bytes to `endpoint` both ways until either side closes, counting
/// it under `base` (its flag set: `-`, or UH without an endpoint, UF when none answers).
pub async fn forward(
    downstream: &mut TcpStream,
    peer: SocketAddr,
    endpoint: Option<Endpoint>,
    source: Option<IpAddr>,
    reporter: &Reporter,
    mut base: RequestLabels,
) {
    let connected = match &endpoint {
        None => None,
        Some(e) => connect(e.connect_addr, source).await.ok(),
    };
    if let Some(e) = &endpoint
        && base.destination_workload.is_empty()
    {
        base.destination_workload = e.workload.clone();
        base.destination_workload_namespace = e.namespace.clone();
        base.destination_app = e.app.clone();
        base.destination_version = e.version.clone();
    }
    match connected {
        Some(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            base.response_flags = Arc::from(flags::NONE);
            reporter.tcp(&base, None);
            let (received, sent) =
                match tokio::io::copy_bidirectional(downstream, &mut upstream).await {
                    Ok(counts) => counts,
                    Err(err) => {
                        tracing::debug!(%peer, error = %err, "tcp connection ended");
                        (0, 0)
                    }
                };
            reporter.tcp(&base, Some((sent, received)));
        }
        None => {
            base.response_flags = Arc::from(if endpoint.is_none() {
                flags::NO_HEALTHY_UPSTREAM
            } else {
                flags::UPSTREAM_CONNECT_FAILURE
            });
            reporter.tcp(&base, None);
            reporter.tcp(&base, Some((0, 0)));
        }
    }
}

/// Where a captured connection goes when no configuration claims its destination: to that
/// destination as it is (Istio's `PassthroughCluster` outbound, `InboundPassthroughCluster`
/// inbound).
pub fn passthrough(to: SocketAddr) -> Endpoint {
    Endpoint {
        app_addr: to,
        connect_addr: to,
        meshed: false,
        workload: "unknown".into(),
        namespace: "unknown".into(),
        app: "unknown".into(),
        version: "unknown".into(),
    }
}

/// Istio's name for the outbound passthrough, as its metrics and Kiali show it.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// The inbound port's opaque TCP: a connection that is not HTTP goes to the local app's
/// endpoint (the inbound cluster of the port it was meant for, when capture says), counted
/// with `reporter="destination"`. A captured connection to a port no inbound cluster names
/// goes to that port of the app as it is; `source` is the address the proxy connects from.
pub fn inbound_opaque(
    config: crate::xds::ConfigRx,
    reporter: Arc<Reporter>,
    source: Option<IpAddr>,
) -> crate::server::OpaqueFn {
    Arc::new(move |mut stream: TcpStream, accepted: Accepted| {
        let (config, reporter) = (config.clone(), reporter.clone());
        Box::pin(async move {
            let endpoint = {
                let config = config.borrow();
                match accepted.original_dst {
                    Some(dst) => Some(
                        config
                            .clusters
                            .get(&cluster_name::inbound(dst.port()))
                            .and_then(|c| c.pick().cloned())
                            .unwrap_or_else(|| passthrough(dst)),
                    ),
                    None => config.inbound_cluster(None).and_then(|c| c.pick().cloned()),
                }
            };
            let me = reporter.me();
            let base = RequestLabels {
                reporter: "destination",
                source_workload: unknown(),
                source_workload_namespace: unknown(),
                source_app: unknown(),
                source_version: unknown(),
                destination_workload: me.workload.clone(),
                destination_workload_namespace: me.namespace.clone(),
                destination_app: me.app.clone(),
                destination_version: me.version.clone(),
                destination_service: me.app.clone(),
                destination_service_name: me.app.clone(),
                destination_service_namespace: me.namespace.clone(),
                request_protocol: "tcp",
                ..Default::default()
            };
            forward(
                &mut stream,
                accepted.peer,
                endpoint,
                source,
                &reporter,
                base,
            )
            .await;
        })
    })
}

/// The outbound port under capture: a connection to a destination the configuration declares
/// TCP goes to that listener's cluster without waiting for its first bytes; any other that is
/// not HTTP goes to its original destination as it is (Istio's default `ALLOW_ANY`).
pub fn outbound_detect(config: crate::xds::ConfigRx, reporter: Arc<Reporter>) -> Detect {
    let declared = {
        let config = config.clone();
        // Only TCP is declared here: a port with HTTP routes may also carry TLS to a host
        // outside the mesh (`https` on 443), which sniffing tells apart.
        Arc::new(move |a: &Accepted| {
            let dst = a.original_dst?;
            config.borrow().tcp_route(dst).map(|_| Declared::Tcp)
        })
    };
    let opaque: crate::server::OpaqueFn = Arc::new(move |mut stream, accepted: Accepted| {
        let (config, reporter) = (config.clone(), reporter.clone());
        Box::pin(async move {
            let (cluster, endpoint) = {
                let config = config.borrow();
                match accepted.original_dst {
                    None => (None, None),
                    Some(dst) => match config.tcp_route(dst) {
                        Some(route) => {
                            let cluster = config.clusters.get(&route.cluster).cloned();
                            let endpoint = cluster.as_ref().and_then(|c| c.pick().cloned());
                            (cluster, endpoint)
                        }
                        None => (None, Some(passthrough(dst))),
                    },
                }
            };
            let mut base = match &cluster {
                Some(c) => labels(&reporter, c, "", flags::NONE),
                None => labels(
                    &reporter,
                    &Cluster::new(PASSTHROUGH_CLUSTER, Vec::new()),
                    "",
                    flags::NONE,
                ),
            };
            if let Some(c) = &cluster
                && let Some(fqdn) = c.name.rsplit('|').next().filter(|f| !f.is_empty())
            {
                base.destination_service = Arc::from(fqdn);
                let mut parts = fqdn.split('.');
                base.destination_service_name = Arc::from(parts.next().unwrap_or_default());
                base.destination_service_namespace = Arc::from(parts.next().unwrap_or_default());
            }
            if accepted.original_dst.is_none() {
                // Made to the listener itself and not HTTP: nowhere to send it.
                base.response_flags = Arc::from(flags::NO_ROUTE);
                reporter.tcp(&base, None);
                reporter.tcp(&base, Some((0, 0)));
                return;
            }
            forward(&mut stream, accepted.peer, endpoint, None, &reporter, base).await;
        })
    });
    Detect {
        opaque,
        declared,
        original_dst: true,
    }
}

/// The inbound port's protocol, as the inbound cluster of the port a connection was meant for
/// (or the only one, without capture) declares it.
pub fn inbound_declared(config: crate::xds::ConfigRx) -> DeclaredFn {
    Arc::new(move |a: &Accepted| {
        let config = config.borrow();
        match a.original_dst {
            Some(dst) => config
                .clusters
                .get(&cluster_name::inbound(dst.port()))
                .and_then(|c| c.declared),
            None => config.inbound_cluster(None).and_then(|c| c.declared),
        }
    })
}

/// Forwards every connection `listener` accepts to `cluster` until `shutdown`; connections
/// open then are left to end on their own.
pub async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    reporter: Arc<Reporter>,
    limits: Limits,
    stats: Arc<ConnStats>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (mut downstream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let (cluster, reporter, stats) = (cluster.clone(), reporter.clone(), stats.clone());
        tokio::spawn(async move {
            let endpoint = cluster.pick().cloned();
            let base = labels(&reporter, &cluster, "", flags::NONE);
            forward(&mut downstream, peer, endpoint, None, &reporter, base).await;
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}
