//! Opaque TCP: a listener whose bytes go to a cluster as they are (Envoy's TCP proxy), one
//! upstream connection per downstream one, round robin over the cluster's endpoints, with
//! Istio's TCP metrics (connections opened and closed, bytes sent and received) under the
//! listener's connection limits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::routing::Cluster;
use crate::server::{ConnStats, Limits};
use crate::stack::error::flags;
use crate::telemetry::{Reporter, RequestLabels};

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The labels of one connection to `endpoint` of `cluster` (`reporter="source"`).
fn labels(reporter: &Reporter, cluster: &Cluster, app: &str, flag: &str) -> RequestLabels {
    let me = reporter.identity();
    RequestLabels {
        reporter: "source",
        source_workload: me.workload.clone(),
        source_workload_namespace: me.namespace.clone(),
        source_app: me.app.clone(),
        source_version: me.version.clone(),
        destination_service: cluster.name.clone(),
        destination_service_name: cluster.name.clone(),
        destination_app: app.to_string(),
        request_protocol: "tcp",
        response_flags: flag.to_string(),
        ..Default::default()
    }
}

/// Carries one connection's bytes to `endpoint` both ways until either side closes, counting
/// it under `base` (its flag set: `-`, or UH without an endpoint, UF when none answers).
pub async fn forward(
    downstream: &mut TcpStream,
    peer: std::net::SocketAddr,
    endpoint: Option<crate::routing::Endpoint>,
    reporter: &Reporter,
    mut base: RequestLabels,
) {
    let connected = match &endpoint {
        None => None,
        Some(e) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(e.connect_addr))
            .await
            .ok()
            .and_then(Result::ok),
    };
    if let Some(e) = &endpoint
        && base.destination_app.is_empty()
    {
        base.destination_app = e.app.clone();
    }
    match connected {
        Some(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            base.response_flags = flags::NONE.to_string();
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
            base.response_flags = if endpoint.is_none() {
                flags::NO_HEALTHY_UPSTREAM
            } else {
                flags::UPSTREAM_CONNECT_FAILURE
            }
            .to_string();
            reporter.tcp(&base, None);
            reporter.tcp(&base, Some((0, 0)));
        }
    }
}

/// The inbound port's opaque TCP: a connection that is not HTTP goes to the local app's
/// endpoint (the inbound cluster), counted with `reporter="destination"`.
pub fn inbound_opaque(
    config: crate::xds::ConfigRx,
    reporter: Arc<Reporter>,
) -> crate::server::Opaque {
    Arc::new(move |mut stream: TcpStream| {
        let (config, reporter) = (config.clone(), reporter.clone());
        Box::pin(async move {
            let peer = stream
                .peer_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            let endpoint = config
                .borrow()
                .inbound_cluster(None)
                .and_then(|c| c.pick().cloned());
            let me = reporter.identity();
            let base = RequestLabels {
                reporter: "destination",
                source_workload: "unknown".into(),
                source_workload_namespace: "unknown".into(),
                source_app: "unknown".into(),
                source_version: "unknown".into(),
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
            forward(&mut stream, peer, endpoint, &reporter, base).await;
        })
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
            forward(&mut downstream, peer, endpoint, &reporter, base).await;
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}
