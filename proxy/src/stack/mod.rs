//! The data path as tower stacks, one per direction, each assembled here and nowhere else.
//! Outside in:
//!
//! - outbound (the local app calling out): [`local_reply`] → [`observe`] (a client span and
//!   `reporter="source"` metrics) → [`trace_context`] → [`route`] → [`cors`] → [`headers`] →
//!   [`answer`] (redirects and direct responses) → [`fault`] → [`mirror`] → [`retry`] → [`breaker`] → [`balance`] →
//!   [`outlier`] → [`connect`];
//! - inbound (a caller reaching the local app): [`local_reply`] → [`observe`] (a server span,
//!   `reporter="destination"`) → [`trace_context`] → [`inbound`] (the caller's identity, the
//!   local endpoint) → [`connect`].
//!
//! Every layer fails with one [`error::ProxyError`]; the outermost layer turns it into the
//! proxy's own reply. A new concern (retries, timeouts, faults, authorization) is one more
//! layer here. Accepting connections and draining them is `crate::server`'s.

pub mod answer;
pub mod balance;
pub mod breaker;
pub mod connect;
pub mod cors;
pub mod error;
pub mod fault;
pub mod headers;
pub mod inbound;
pub mod kept_body;
pub mod local_reply;
pub mod mirror;
pub mod observe;
pub mod outlier;
pub mod retry;
pub mod route;
pub mod step;
pub mod trace_context;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use tower::util::BoxCloneSyncService;

use crate::server::Body;
use crate::telemetry::Reporter;
use crate::xds::ConfigRx;
use observe::Direction;
use step::{AroundLayer, StepLayer};

/// A whole stack: never fails (failures are replies).
pub type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The local app calling out.
pub fn outbound(config: ConfigRx, reporter: Arc<Reporter>, connect: connect::Connect) -> Stack {
    let me = reporter.identity().clone();
    let ratio = reporter.switches().span_ratio;
    let stack = tower::ServiceBuilder::new()
        .layer(local_reply::LocalReplyLayer)
        .layer(observe::ObserveLayer::new(reporter, Direction::Outbound))
        .layer(StepLayer(trace_context::TraceContext { ratio }))
        .layer(StepLayer(route::Route::new(config)))
        .layer(AroundLayer(cors::Cors))
        .layer(AroundLayer(headers::HeaderChanges))
        .layer(AroundLayer(answer::RouteAnswers))
        .layer(AroundLayer(fault::Faults))
        .layer(mirror::MirrorLayer::default())
        .layer(retry::RetryLayer::default())
        .layer(AroundLayer(breaker::CircuitBreakers))
        .layer(StepLayer(balance::Balance::new(me)))
        .layer(AroundLayer(outlier::Outcomes))
        .service(connect);
    BoxCloneSyncService::new(stack)
}

/// A caller reaching the local app.
pub fn inbound(config: ConfigRx, reporter: Arc<Reporter>, connect: connect::Connect) -> Stack {
    let ratio = reporter.switches().span_ratio;
    let stack = tower::ServiceBuilder::new()
        .layer(local_reply::LocalReplyLayer)
        .layer(observe::ObserveLayer::new(reporter, Direction::Inbound))
        .layer(StepLayer(trace_context::TraceContext { ratio }))
        .layer(StepLayer(inbound::Inbound::new(config)))
        .service(connect);
    BoxCloneSyncService::new(stack)
}
