//! The ADS gRPC service: both methods of
//! `envoy.service.discovery.v3.AggregatedDiscoveryService`, routed here and framed by
//! [`super::wire`] (not tonic's codec, whose per-stream buffers keep the size of the
//! largest message a stream ever carried).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::server::NamedService;

use super::XdsState;
use super::wire::{Requests, Responses};

const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS service over the shared xDS state.
#[derive(Clone)]
pub struct AdsServer {
    state: Arc<XdsState>,
}

impl AdsServer {
    pub fn new(state: Arc<XdsState>) -> AdsServer {
        AdsServer { state }
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> tower::Service<http::Request<B>> for AdsServer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        let response = match req.uri().path() {
            SOTW => Responses::into_http(super::stream_aggregated_resources(
                state,
                Requests::new(req.into_body()),
            )),
            DELTA => Responses::into_http(super::delta_aggregated_resources(
                state,
                Requests::new(req.into_body()),
            )),
            _ => Status::unimplemented("no such method").into_http(),
        };
        Box::pin(async move { Ok(response) })
    }
}
