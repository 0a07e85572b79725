//! OTLP/gRPC receiver (:4317) for traces and metrics.
//!
//! The services are written against tonic's generic `Grpc` with a codec that hands over raw
//! bytes, so a malformed protobuf is answered with `InvalidArgument` naming the decode error
//! (tonic's stock codec would say `Internal`), and the request is rejected whole: nothing of
//! it is stored, nothing already stored is touched.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::convert;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::store::{Store, Table};

/// Largest accepted request (after decompression), as the OpenTelemetry Collector's default.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// One OTLP signal: its gRPC service, how a request becomes rows, and the table they go to.
pub trait Signal: Send + Sync + 'static {
    const SERVICE: &'static str;
    type Request: Message + Default;
    type Response: Message + Default + Send + 'static;
    fn to_batch(request: &Self::Request) -> Result<RecordBatch, ArrowError>;
    fn table(store: &Store) -> &Table;
}

/// Traces: `opentelemetry.proto.collector.trace.v1.TraceService`.
#[derive(Debug)]
pub enum Traces {}

/// Metrics: `opentelemetry.proto.collector.metrics.v1.MetricsService`.
#[derive(Debug)]
pub enum Metrics {}

impl Signal for Traces {
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    type Request = ExportTraceServiceRequest;
    type Response = ExportTraceServiceResponse;

    fn to_batch(request: &ExportTraceServiceRequest) -> Result<RecordBatch, ArrowError> {
        convert::spans_to_batch(request)
    }

    fn table(store: &Store) -> &Table {
        &store.spans
    }
}

impl Signal for Metrics {
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    type Request = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;

    fn to_batch(request: &ExportMetricsServiceRequest) -> Result<RecordBatch, ArrowError> {
        convert::metrics_to_batch(request)
    }

    fn table(store: &Store) -> &Table {
        &store.metrics
    }
}

/// The gRPC service of one signal.
#[derive(Debug)]
pub struct OtlpGrpc<S> {
    store: Arc<Store>,
    _signal: PhantomData<fn() -> S>,
}

impl<S> Clone for OtlpGrpc<S> {
    fn clone(&self) -> Self {
        OtlpGrpc {
            store: self.store.clone(),
            _signal: PhantomData,
        }
    }
}

impl<S: Signal> OtlpGrpc<S> {
    pub fn new(store: Arc<Store>) -> Self {
        OtlpGrpc {
            store,
            _signal: PhantomData,
        }
    }
}

impl<S: Signal> NamedService for OtlpGrpc<S> {
    const NAME: &'static str = S::SERVICE;
}

/// Decodes the raw request body of an Export call and stores it.
pub fn export<S: Signal>(store: &Store, body: &[u8]) -> Result<S::Response, Status> {
    let request = S::Request::decode(body).map_err(|e| {
        Status::invalid_argument(format!("malformed OTLP protobuf for {}: {e}", S::SERVICE))
    })?;
    let table = S::table(store);
    let batch = S::to_batch(&request)
        .map_err(|e| Status::internal(format!("converting {} rows: {e}", table.name)))?;
    let rows = batch.num_rows();
    table
        .append(batch)
        .map_err(|e| Status::internal(e.to_string()))?;
    tracing::trace!(service = S::SERVICE, rows, "otlp export stored");
    Ok(S::Response::default())
}

struct ExportCall<S> {
    store: Arc<Store>,
    _signal: PhantomData<fn() -> S>,
}

impl<S: Signal> UnaryService<Bytes> for ExportCall<S> {
    type Response = S::Response;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<S::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let store = self.store.clone();
        Box::pin(async move { export::<S>(&store, request.get_ref()).map(Response::new) })
    }
}

impl<S, B> tower::Service<http::Request<B>> for OtlpGrpc<S>
where
    S: Signal,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let store = self.store.clone();
        let is_export = req.uri().path() == format!("/{}/Export", S::SERVICE);
        Box::pin(async move {
            if !is_export {
                return Ok(
                    Status::unimplemented(format!("{} has only Export", S::SERVICE)).into_http(),
                );
            }
            let mut grpc = Grpc::new(RawCodec::<S::Response>::default())
                .accept_compressed(CompressionEncoding::Gzip)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), None);
            let call = ExportCall::<S> {
                store,
                _signal: PhantomData,
            };
            Ok(grpc.unary(call, req).await)
        })
    }
}

/// Encodes prost responses, hands request bodies over as bytes.
struct RawCodec<E>(PhantomData<fn() -> E>);

impl<E> Default for RawCodec<E> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

impl<E: Message + Send + 'static> Codec for RawCodec<E> {
    type Encode = E;
    type Decode = Bytes;
    type Encoder = ProstEncoder<E>;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder
    }
}

struct ProstEncoder<E>(PhantomData<fn() -> E>);

impl<E: Message> Encoder for ProstEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding response: {e}")))
    }
}

struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
