//! The demo's load generator: a fixed request rate (open loop: requests start on schedule
//! whether or not earlier ones finished) to productpage through its sidecar, bounded in time
//! and count.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// productpage's sidecar inbound listener.
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub rate_per_s: f64,
    /// Stop after this long (None: until shutdown).
    pub duration: Option<Duration>,
    /// Stop after this many requests (None: no limit).
    pub max_requests: Option<u64>,
}

/// What was sent and how it went.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Sends requests at the configured rate until a bound is reached or shutdown.
pub async fn run(options: LoadOptions, stats: Arc<LoadStats>, shutdown: CancellationToken) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let period = Duration::from_secs_f64(1.0 / options.rate_per_s.max(0.1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let in_flight = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
            || options
                .max_requests
                .is_some_and(|m| stats.sent.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let req = Request::builder()
            .uri(format!("http://{}{}", options.target, options.path))
            .header(hyper::header::HOST, &options.host)
            .body(Empty::new());
        let client = client.clone();
        let stats = stats.clone();
        in_flight.spawn(async move {
            let ok = match req {
                Ok(req) => {
                    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                        Ok(Ok(resp)) => {
                            let success = resp.status().is_success();
                            success && resp.into_body().collect().await.is_ok()
                        }
                        _ => false,
                    }
                }
                Err(_) => false,
            };
            let counter = if ok { &stats.ok } else { &stats.failed };
            counter.fetch_add(1, Ordering::Relaxed);
        });
    }
    in_flight.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.wait()).await;
}
