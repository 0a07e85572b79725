//! Accept loop shared by every listener of the proxy: HTTP/1.1 connections served by hyper,
//! drained gracefully on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The body type every proxy response uses.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long in-flight connections get to finish after shutdown is asked for (Istio's
/// default `terminationDrainDuration`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves HTTP/1.1 on `listener` with a data-path stack until `shutdown`, then drains.
pub async fn serve_stack(
    listener: TcpListener,
    stack: crate::stack::Stack,
    shutdown: CancellationToken,
) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    serve(
        listener,
        move |req: Request<Incoming>| {
            let stack = stack.clone();
            async move {
                match stack.oneshot(req.map(BodyExt::boxed)).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        },
        shutdown,
    )
    .await;
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown`, then drains connections.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: CancellationToken)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
