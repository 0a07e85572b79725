//! Retries, as Envoy's router does them for the route that matched (Istio's `retries`): a
//! failed attempt whose failure the route's `retry_on` names is tried again, on an endpoint
//! picked again, after an exponential back-off with full jitter (25 ms doubling to 250 ms,
//! Envoy's defaults), each attempt within the per-try timeout, all of them within the route's
//! timeout, while a budget allows (retries in flight at most a fifth of requests in flight,
//! and at least three, Envoy's retry budget defaults). The last failure is answered with its
//! own flag, or URX when the retries ran out. A request is retried only if its body is known
//! and small enough to keep ([`kept_body::MAX_KEPT_BODY`]); others get one attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};

use super::connect::RouteTimeout;
use super::error::{Fault, ProxyError, flags};
use super::kept_body;
use super::observe::Observation;
use crate::routing::RetryPolicy;
use crate::server::Body;

/// Envoy's default back-off: 25 ms base, ten times that at most.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Requests and retries in flight through one stack, for the retry budget.
#[derive(Debug, Default)]
pub struct Budget {
    requests: AtomicUsize,
    retries: AtomicUsize,
}

impl Budget {
    /// Whether one more retry fits: at most 20% of the requests in flight, at least 3.
    fn allows(&self) -> bool {
        let requests = self.requests.load(Ordering::Relaxed);
        let retries = self.retries.load(Ordering::Relaxed);
        retries < (requests / 5).max(3)
    }
}

/// Counts one in-flight request (or retry) for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Default)]
pub struct RetryLayer {
    budget: Arc<Budget>,
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryService<S> {
    inner: S,
    budget: Arc<Budget>,
}

/// Whether an attempt's outcome is one `policy` retries.
pub fn retriable(policy: &RetryPolicy, outcome: &Result<Response<Body>, ProxyError>) -> bool {
    let on = |c: &str| policy.retry_on.iter().any(|r| r == c);
    match outcome {
        Err(e) => match e.flag {
            flags::UPSTREAM_CONNECT_FAILURE => {
                on("connect-failure") || on("5xx") || on("gateway-error")
            }
            flags::UPSTREAM_RESET => on("reset") || on("5xx") || on("refused-stream"),
            flags::UPSTREAM_TIMEOUT => on("5xx") || on("gateway-error"),
            _ => false,
        },
        Ok(resp) => {
            let status = resp.status();
            let grpc = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok());
            let grpc_on = match grpc {
                Some(1) => on("cancelled"),
                Some(4) => on("deadline-exceeded"),
                Some(8) => on("resource-exhausted"),
                Some(13) => on("internal"),
                Some(14) => on("unavailable"),
                _ => false,
            };
            grpc_on
                || (status.is_server_error() && on("5xx"))
                || (matches!(status.as_u16(), 502..=504) && on("gateway-error"))
                || (status == StatusCode::CONFLICT && on("retriable-4xx"))
                || (on("retriable-status-codes") && policy.status_codes.contains(&status.as_u16()))
        }
    }
}

/// A full-jitter exponential back-off before retry `n` (1-based).
fn backoff(n: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random::<u64>() % millis)
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for RetryService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let policy = req.extensions().get::<Arc<RetryPolicy>>().cloned();
        // No retries asked for, an upgrade, or a body too big or unknown to keep: one try.
        let keepable = kept_body::keepable(&req);
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        let Some(policy) = policy.filter(|p| p.attempts > 0 && keepable && !upgrade) else {
            return Box::pin(self.inner.call(req));
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let budget = self.budget.clone();
        Box::pin(async move {
            let _request = InFlight::new(&budget.requests);
            let (mut parts, body) = req.into_parts();
            let body = kept_body::keep(body, "for retries").await?;
            // Every attempt shares one record of the endpoints tried, for the balancer to
            // steer a retry away from them (Envoy's previous-hosts predicate).
            if policy.host_selection_attempts > 0 {
                parts
                    .extensions
                    .insert(super::balance::Tried::new(policy.host_selection_attempts));
            }
            let overall = parts.extensions.get::<RouteTimeout>().map(|t| t.0);
            let budget = budget.clone();
            let attempts = async move {
                let mut n = 0u32;
                // The retry in flight against the cluster's breaker, held through its attempt.
                let mut _held: Option<super::breaker::RetrySlot> = None;
                loop {
                    let mut attempt = Request::new(kept_body::replay(&body));
                    *attempt.method_mut() = parts.method.clone();
                    *attempt.uri_mut() = parts.uri.clone();
                    *attempt.version_mut() = parts.version;
                    *attempt.headers_mut() = parts.headers.clone();
                    *attempt.extensions_mut() = parts.extensions.clone();
                    if let Some(per_try) = policy.per_try_timeout {
                        attempt.extensions_mut().insert(RouteTimeout(per_try));
                    }
                    let outcome = {
                        let _retry = (n > 0).then(|| InFlight::new(&budget.retries));
                        tower::ServiceExt::oneshot(inner.clone(), attempt).await
                    };
                    if !retriable(&policy, &outcome) {
                        return outcome;
                    }
                    // The cluster's own bound on retries in flight (its circuit breaker).
                    let slot = parts
                        .extensions
                        .get::<super::route::Target>()
                        .and_then(|t| t.cluster.breaker.clone())
                        .map(|b| b.retry());
                    if n >= policy.attempts || !budget.allows() || matches!(slot, Some(None)) {
                        // Out of retries: the last failure, marked URX as Envoy marks it,
                        // whether the proxy failed it or the upstream answered it.
                        let observation = parts.extensions.get::<Observation>();
                        if let Some(o) = observation {
                            o.update(|o| {
                                if !o.keeps_span() {
                                    return;
                                }
                                o.span.attributes.push((
                                    "lumen.retries",
                                    crate::telemetry::AttrValue::Int(i64::from(n)),
                                ));
                            });
                        }
                        // Envoy records URX first, then the last try's own flag ("URX,UF").
                        if let Some(o) = observation {
                            o.add_flag(flags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                        }
                        return match outcome {
                            Err(mut e) => {
                                e.reason = format!("{} (after {n} retries)", e.reason);
                                Err(e)
                            }
                            ok => ok,
                        };
                    }
                    _held = slot.flatten();
                    n += 1;
                    tokio::time::sleep(backoff(n)).await;
                }
            };
            match overall.filter(|t| !t.is_zero()) {
                None => attempts.await,
                Some(limit) => tokio::time::timeout(limit, attempts)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ProxyError::new(
                            flags::UPSTREAM_TIMEOUT,
                            StatusCode::GATEWAY_TIMEOUT,
                            Fault::Upstream,
                            format!("no answer within the route's {limit:?}, retries included"),
                        ))
                    }),
            }
        })
    }
}
