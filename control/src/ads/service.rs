//! The ADS gRPC service as the generated one routes it, but with a codec whose buffers start
//! small and are handed to the transport after every message. tonic keeps one encoding and
//! one decoding buffer per stream for the stream's life, each as large as the most it ever
//! held at once: with the generated codec's settings (8 KiB to start, messages gathered
//! until 32 KiB before a write) a stream that once took a large push kept ~100 KB after it.
//! Written messages are at most `delta::CHUNK_BYTES` of resources on delta streams, so
//! a connected proxy costs the control plane what it subscribed to, not its largest push.
//! Requests are handed to the decoder in pieces of at most [`PIECE`] bytes
//! ([`Pieces`]): the decoder decodes a message as soon as it has one whole, so its buffer
//! stays near the largest single request, where whole HTTP/2 frames of many ACKs at once
//! (16 KiB each) had it keep ~30 KB a stream.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lumen_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use lumen_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::codec::{BufferSettings, Codec};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The most request bytes handed to the decoder at once.
const PIECE: usize = 1024;

/// A request body whose data comes in pieces of at most [`PIECE`] bytes (cut without
/// copying).
struct Pieces<B> {
    body: Pin<Box<B>>,
    rest: bytes::Bytes,
}

impl<B> http_body::Body for Pieces<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        if self.rest.is_empty() {
            match self.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
        let n = self.rest.len().min(PIECE);
        let piece = self.rest.split_to(n);
        Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }
}

/// Buffers of 1 KiB to start; every message written as soon as it is encoded.
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 1)
}

/// Prost encoding and decoding with [`buffers`].
struct SmallBuffers<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffers())
    }
}

fn codec<T, U>() -> SmallBuffers<T, U> {
    SmallBuffers(std::marker::PhantomData)
}

const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS service: both methods of `envoy.service.discovery.v3.AggregatedDiscoveryService`
/// over `ads`, with [`SmallBuffers`].
pub struct AdsServer<A> {
    ads: Arc<A>,
}

impl<A> AdsServer<A> {
    pub fn new(ads: A) -> AdsServer<A> {
        AdsServer { ads: Arc::new(ads) }
    }
}

impl<A> Clone for AdsServer<A> {
    fn clone(&self) -> AdsServer<A> {
        AdsServer {
            ads: self.ads.clone(),
        }
    }
}

impl<A> NamedService for AdsServer<A> {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Sotw<A>(Arc<A>);

impl<A: AggregatedDiscoveryService> StreamingService<DiscoveryRequest> for Sotw<A> {
    type Response = DiscoveryResponse;
    type ResponseStream = A::StreamAggregatedResourcesStream;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.stream_aggregated_resources(request).await })
    }
}

struct Delta<A>(Arc<A>);

impl<A: AggregatedDiscoveryService> StreamingService<DeltaDiscoveryRequest> for Delta<A> {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = A::DeltaAggregatedResourcesStream;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.delta_aggregated_resources(request).await })
    }
}

impl<A, B> tower::Service<http::Request<B>> for AdsServer<A>
where
    A: AggregatedDiscoveryService,
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
        let ads = self.ads.clone();
        let req = req.map(|body| Pieces {
            body: Box::pin(body),
            rest: bytes::Bytes::new(),
        });
        match req.uri().path() {
            SOTW => Box::pin(async move { Ok(Grpc::new(codec()).streaming(Sotw(ads), req).await) }),
            DELTA => {
                Box::pin(async move { Ok(Grpc::new(codec()).streaming(Delta(ads), req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}
