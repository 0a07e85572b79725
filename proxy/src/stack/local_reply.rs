//! The outermost layer: a [`ProxyError`] from anywhere inside becomes the proxy's own reply
//! (the status, the reason as text, Envoy's response flag in `x-lumen-response-flags`, and
//! whose fault in `x-lumen-fault`), so the stack as a whole never fails.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Response};

use super::error::ProxyError;
use crate::server::Body;

#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReplyLayer;

impl<S> tower::Layer<S> for LocalReplyLayer {
    type Service = LocalReply<S>;

    fn layer(&self, inner: S) -> LocalReply<S> {
        LocalReply { inner }
    }
}

#[derive(Debug, Clone)]
pub struct LocalReply<S> {
    inner: S,
}

/// The reply for `e`.
pub fn reply(e: &ProxyError) -> Response<Body> {
    let mut resp = Response::new(crate::http::text_body(e.body()));
    *resp.status_mut() = e.status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-lumen-response-flags", HeaderValue::from_static(e.flag));
    headers.insert("x-lumen-fault", HeaderValue::from_static(e.fault.as_str()));
    resp
}

impl<S, R> tower::Service<R> for LocalReply<S>
where
    S: tower::Service<R, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            // A service that cannot take requests fails them one by one, as replies.
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            Ok(match fut.await {
                Ok(resp) => resp,
                Err(e) => reply(&e),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::error::{Fault, flags};

    #[tokio::test]
    async fn an_error_becomes_a_reply_with_its_flag_status_and_fault() {
        let failing = tower::service_fn(|_: ()| async {
            Err::<Response<Body>, _>(ProxyError::new(
                flags::UPSTREAM_CONNECT_FAILURE,
                StatusCode::SERVICE_UNAVAILABLE,
                Fault::Upstream,
                "upstream connect error to 10.0.0.1:9080: refused",
            ))
        });
        let resp = LocalReplyLayer
            .layer(failing)
            .oneshot(())
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["x-lumen-response-flags"], "UF");
        assert_eq!(resp.headers()["x-lumen-fault"], "upstream");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            body,
            "lumen-proxy: upstream connect error to 10.0.0.1:9080: refused\n"
        );
    }

    use tower::Layer;
}
