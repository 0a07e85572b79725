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
            let connected = match &endpoint {
                None => None,
                Some(e) => {
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(e.connect_addr))
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            };
            match (endpoint, connected) {
                (Some(e), Some(mut upstream)) => {
                    let _ = upstream.set_nodelay(true);
                    let l = labels(&reporter, &cluster, &e.app, flags::NONE);
                    reporter.tcp(&l, None);
                    let (received, sent) =
                        match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                            Ok(counts) => counts,
                            Err(err) => {
                                tracing::debug!(%peer, error = %err, "tcp connection ended");
                                (0, 0)
                            }
                        };
                    reporter.tcp(&l, Some((sent, received)));
                }
                (endpoint, _) => {
                    // No endpoint (UH) or none reachable (UF): the connection is closed.
                    let flag = if endpoint.is_none() {
                        flags::NO_HEALTHY_UPSTREAM
                    } else {
                        flags::UPSTREAM_CONNECT_FAILURE
                    };
                    let app = endpoint.map(|e| e.app).unwrap_or_default();
                    let l = labels(&reporter, &cluster, &app, flag);
                    reporter.tcp(&l, None);
                    reporter.tcp(&l, Some((0, 0)));
                }
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}
