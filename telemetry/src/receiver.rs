//! OTLP/gRPC receiver (:4317) for traces, metrics and logs, and the export path that
//! OTLP/HTTP (`otlp_http.rs`) shares.
//!
//! The services are written against tonic's generic `Grpc` with a codec that hands over raw
//! bytes, so a malformed protobuf is answered with `InvalidArgument` naming the decode error
//! (tonic's stock codec would say `Internal`), and the request is rejected whole: nothing of
//! it is stored, nothing already stored is touched.
//!
//! Bounds, in the order a request meets them: a request slot (`max_inflight` at once across
//! both signals, else RESOURCE_EXHAUSTED before the body is read); the message size; the
//! decoded request's expanded size, estimated before conversion (resource attributes count
//! once per row, as they are stored) and reserved from the store's memory budget (else
//! RESOURCE_EXHAUSTED with a RetryInfo, so exporters back off and retry); then the WAL: the
//! answer is sent only once the request is fsynced.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::Semaphore;

use crate::convert::{self, ROW_OVERHEAD, RowsError, TraceFrame};
use crate::meshmetrics::{MeshMetrics, MeshMetricsOptions, Tapped};
use crate::selfmetrics::{IngestStats, Refusal};
use crate::store::Store;
use crate::wire;

/// Largest accepted request (after decompression) by default: gRPC's and the OpenTelemetry
/// Collector's 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// One OTLP signal: its gRPC service, how a request becomes rows, and the table they go to.
pub trait Signal: Send + Sync + 'static {
    const SERVICE: &'static str;
    /// The id of the table its rows go to (as WAL records name it).
    const TABLE: u8;
    /// The request as a message (what OTLP/HTTP's JSON decodes into).
    type Request: Message + Default;
    /// The request as the conversion reads it: the decoded message, or a frame over the
    /// request's bytes.
    type Parsed<'a>: Send;
    type Response: Message + Default + Send + 'static;
    /// Bytes that reading the request ([`Signal::parse`]) will allocate, found on the wire
    /// without reading it (protobuf amplifies: see [`wire`]).
    fn decoded_size(body: &[u8]) -> Result<usize, wire::WireError>;
    /// Reads a request's protobuf bytes.
    fn parse(body: &[u8]) -> Result<Self::Parsed<'_>, String>;
    /// The request's rows, built within `limit` bytes where the conversion can tell.
    fn to_batch(request: &Self::Parsed<'_>, limit: usize) -> Result<Rows, RowsError>;
    /// Bytes the request's rows will take in memory, before converting it.
    fn estimate(request: &Self::Parsed<'_>) -> usize;
    /// The response saying that `rejected` records were not stored, and why.
    fn partial(rejected: i64, message: String) -> Self::Response;
    /// What the live aggregates (the mesh's Prometheus families) take from the request,
    /// before it is dropped; applied once its rows are durable.
    fn tap(_request: &Self::Parsed<'_>) -> Tapped {
        Tapped::default()
    }
}

/// Bytes records of these encoded sizes will take as rows: each carries a copy of what it
/// shares (resource and scope, `shared` bytes encoded) and costs about twice its own
/// encoded size.
fn rows_cost(shared: usize, records: impl Iterator<Item = usize>) -> usize {
    let (n, own) = records.fold((0usize, 0usize), |(n, own), len| {
        (n + 1, own.saturating_add(len))
    });
    n.saturating_mul(shared + ROW_OVERHEAD)
        .saturating_add(own.saturating_mul(2))
}

/// A request's rows, and the records left out: how many, and why (reported as a partial
/// success).
#[derive(Debug)]
pub struct Rows {
    pub batch: RecordBatch,
    pub rejected: Option<(i64, String)>,
}

impl Rows {
    fn all(batch: RecordBatch) -> Rows {
        Rows {
            batch,
            rejected: None,
        }
    }
}

/// Converts a WAL record back into rows: the same decode and conversion as a live export.
pub fn decode_record(table: u8, payload: &[u8]) -> Result<RecordBatch, String> {
    fn convert<S: Signal>(payload: &[u8]) -> Result<RecordBatch, String> {
        let request = S::parse(payload)?;
        S::to_batch(&request, usize::MAX)
            .map(|rows| rows.batch)
            .map_err(|e| e.to_string())
    }
    match table {
        Traces::TABLE => convert::<Traces>(payload),
        Metrics::TABLE => convert::<Metrics>(payload),
        Logs::TABLE => convert::<Logs>(payload),
        other => Err(format!("no signal writes table {other}")),
    }
}

/// What both signals' services share: the store and the request slots.
#[derive(Debug)]
pub struct Receiver {
    store: Arc<Store>,
    /// What it accepted and refused.
    pub stats: IngestStats,
    slots: Arc<Semaphore>,
    max_inflight: usize,
    max_message_bytes: usize,
    /// The mesh's metric families, as stored exports report them.
    pub mesh: MeshMetrics,
}

impl Receiver {
    /// A receiver that lets `max_inflight` requests of up to `max_message_bytes` (after
    /// decompression) in at once.
    pub fn new(
        store: Arc<Store>,
        max_inflight: usize,
        max_message_bytes: usize,
        mesh: MeshMetricsOptions,
    ) -> Arc<Receiver> {
        Arc::new(Receiver {
            store,
            mesh: MeshMetrics::new(mesh),
            stats: IngestStats::default(),
            slots: Arc::new(Semaphore::new(max_inflight.max(1))),
            max_inflight: max_inflight.max(1),
            max_message_bytes,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A request slot, if one is free (held for the whole request).
    pub fn try_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }
}

/// Traces: `opentelemetry.proto.collector.trace.v1.TraceService`.
#[derive(Debug)]
pub enum Traces {}

/// Metrics: `opentelemetry.proto.collector.metrics.v1.MetricsService`.
#[derive(Debug)]
pub enum Metrics {}

/// Logs: `opentelemetry.proto.collector.logs.v1.LogsService`.
#[derive(Debug)]
pub enum Logs {}

impl Signal for Traces {
    const SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const TABLE: u8 = 0;
    type Request = ExportTraceServiceRequest;
    type Parsed<'a> = TraceFrame<'a>;
    type Response = ExportTraceServiceResponse;

    /// Nothing: the frame is read without allocating, and the rows charge what they take
    /// as they are built (see [`TraceFrame::rows`]).
    fn decoded_size(_body: &[u8]) -> Result<usize, wire::WireError> {
        Ok(0)
    }

    fn parse(body: &[u8]) -> Result<TraceFrame<'_>, String> {
        TraceFrame::read(body).map_err(|e| e.to_string())
    }

    fn to_batch(request: &TraceFrame<'_>, limit: usize) -> Result<Rows, RowsError> {
        let rows = request.rows(limit)?;
        Ok(Rows {
            batch: rows.batch,
            rejected: rows
                .rejected
                .map(|(n, why)| (n, format!("{n} spans rejected: {why}"))),
        })
    }

    fn partial(rejected: i64, message: String) -> ExportTraceServiceResponse {
        ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: message,
            }),
        }
    }

    fn estimate(request: &TraceFrame<'_>) -> usize {
        request.estimate
    }
}

impl Signal for Metrics {
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const TABLE: u8 = 1;
    type Request = ExportMetricsServiceRequest;
    type Parsed<'a> = ExportMetricsServiceRequest;
    type Response = ExportMetricsServiceResponse;

    fn parse(body: &[u8]) -> Result<ExportMetricsServiceRequest, String> {
        ExportMetricsServiceRequest::decode(body).map_err(|e| e.to_string())
    }

    fn decoded_size(body: &[u8]) -> Result<usize, wire::WireError> {
        wire::decoded_size(body, &wire::METRICS)
    }

    fn to_batch(request: &ExportMetricsServiceRequest, _limit: usize) -> Result<Rows, RowsError> {
        Ok(Rows::all(convert::metrics_to_batch(request)?))
    }

    fn partial(rejected: i64, message: String) -> ExportMetricsServiceResponse {
        ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: rejected,
                error_message: message,
            }),
        }
    }

    fn tap(request: &ExportMetricsServiceRequest) -> Tapped {
        crate::meshmetrics::tap(request)
    }

    fn estimate(request: &ExportMetricsServiceRequest) -> usize {
        let mut total = 0usize;
        for rm in &request.resource_metrics {
            let resource = rm.resource.as_ref().map_or(0, Message::encoded_len);
            for sm in &rm.scope_metrics {
                let scope = sm.scope.as_ref().map_or(0, Message::encoded_len);
                for m in &sm.metrics {
                    let points = convert::metric_points(m);
                    let per_point = resource + scope + m.name.len() + m.unit.len() + ROW_OVERHEAD;
                    total = total
                        .saturating_add(points.saturating_mul(per_point))
                        .saturating_add(m.encoded_len().saturating_mul(2));
                }
            }
        }
        total
    }
}

impl Signal for Logs {
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const TABLE: u8 = 2;
    type Request = ExportLogsServiceRequest;
    type Parsed<'a> = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;

    fn parse(body: &[u8]) -> Result<ExportLogsServiceRequest, String> {
        ExportLogsServiceRequest::decode(body).map_err(|e| e.to_string())
    }

    fn decoded_size(body: &[u8]) -> Result<usize, wire::WireError> {
        wire::decoded_size(body, &wire::LOGS)
    }

    fn to_batch(request: &ExportLogsServiceRequest, _limit: usize) -> Result<Rows, RowsError> {
        Ok(Rows::all(convert::logs_to_batch(request)?))
    }

    fn partial(rejected: i64, message: String) -> ExportLogsServiceResponse {
        ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: message,
            }),
        }
    }

    fn estimate(request: &ExportLogsServiceRequest) -> usize {
        let mut total = 0usize;
        for rl in &request.resource_logs {
            let resource = rl.resource.as_ref().map_or(0, Message::encoded_len);
            for sl in &rl.scope_logs {
                let scope = sl.scope.as_ref().map_or(0, Message::encoded_len);
                let own = sl.log_records.iter().map(Message::encoded_len);
                total = total.saturating_add(rows_cost(resource + scope, own));
            }
        }
        total
    }
}

/// The gRPC service of one signal.
#[derive(Debug)]
pub struct OtlpGrpc<S> {
    receiver: Arc<Receiver>,
    _signal: PhantomData<fn() -> S>,
}

impl<S> Clone for OtlpGrpc<S> {
    fn clone(&self) -> Self {
        OtlpGrpc {
            receiver: self.receiver.clone(),
            _signal: PhantomData,
        }
    }
}

impl<S: Signal> OtlpGrpc<S> {
    pub fn new(receiver: Arc<Receiver>) -> Self {
        OtlpGrpc {
            receiver,
            _signal: PhantomData,
        }
    }
}

impl<S: Signal> NamedService for OtlpGrpc<S> {
    const NAME: &'static str = S::SERVICE;
}

/// Decodes the raw request body of an Export call, budgets and converts it, and returns
/// once its rows are durable in the WAL.
///
/// Memory is reserved in three steps, each refused with RESOURCE_EXHAUSTED when it does not
/// fit: the body plus what decoding it will allocate (walked on the wire before decoding),
/// then the estimated rows on top, then the rows as built, which stay reserved in the
/// memtable until flushed.
pub async fn export<S: Signal>(
    receiver: &Receiver,
    body: Bytes,
) -> Result<S::Response, (Refusal, Status)> {
    let signal = usize::from(S::TABLE);
    let result = export_unrecorded::<S>(receiver, body).await;
    match &result {
        Ok(_) => receiver.stats.accepted(signal),
        Err((why, _)) => receiver.stats.refused(signal, *why),
    }
    result
}

async fn export_unrecorded<S: Signal>(
    receiver: &Receiver,
    body: Bytes,
) -> Result<S::Response, (Refusal, Status)> {
    let store = &receiver.store;
    let malformed = |e: &dyn std::fmt::Display| {
        (
            Refusal::Malformed,
            Status::invalid_argument(format!("malformed OTLP protobuf for {}: {e}", S::SERVICE)),
        )
    };
    let full = |status| (Refusal::BufferFull, status);
    let budget = store.budget();
    let too_big = |what: &str, bytes: usize| {
        (
            Refusal::TooLarge,
            Status::resource_exhausted(format!(
                "this request {what} about {bytes} bytes, more than the {} bytes the service \
             buffers in all (--max-buffered-mib): send smaller batches",
                budget.cap()
            )),
        )
    };
    let decoded = S::decoded_size(&body).map_err(|e| malformed(&e))?;
    let held = body.len().saturating_add(decoded);
    if held > budget.cap() {
        return Err(too_big("decodes into", held));
    }
    let mut reservation = budget
        .try_reserve(held)
        .ok_or_else(|| full(buffer_full(held, budget.used(), budget.cap())))?;
    let request = S::parse(body.as_ref()).map_err(|e| malformed(&e))?;
    let estimate = S::estimate(&request);
    if estimate > budget.cap() {
        return Err(too_big("expands to", estimate));
    }
    if !reservation.resize(held.saturating_add(estimate)) {
        return Err(full(buffer_full(estimate, budget.used(), budget.cap())));
    }
    let Rows { batch, rejected } = S::to_batch(&request, estimate).map_err(|e| match e {
        RowsError::Malformed(e) => malformed(&e),
        RowsError::TooBig(limit) => too_big("expands to more than", limit),
        RowsError::Arrow(e) => (
            Refusal::Unavailable,
            Status::internal(format!("converting {} rows: {e}", S::SERVICE)),
        ),
    })?;
    let tapped = S::tap(&request);
    drop(request);
    let actual = batch.get_array_memory_size();
    // The rows keep `actual` bytes until flushed; the body's share is held until the WAL
    // has written it, then given back.
    if !reservation.resize(actual.saturating_add(body.len())) {
        return Err(full(buffer_full(actual, budget.used(), budget.cap())));
    }
    let rows_reservation = reservation.split_off(actual);
    let rows = batch.num_rows();
    store
        .ingest(S::TABLE, body, batch, rows_reservation)
        .await
        .map_err(|e| {
            (
                Refusal::Unavailable,
                Status::unavailable(format!("not stored, retry: {e}")),
            )
        })?;
    drop(reservation);
    if !tapped.is_empty() {
        receiver.mesh.apply(tapped);
    }
    tracing::trace!(service = S::SERVICE, rows, "otlp export stored");
    Ok(match rejected {
        Some((n, message)) => S::partial(n, message),
        None => S::Response::default(),
    })
}

/// RESOURCE_EXHAUSTED with a RetryInfo, which OTLP exporters take as "retry after a delay".
fn buffer_full(wanted: usize, used: usize, cap: usize) -> Status {
    retryable(
        tonic::Code::ResourceExhausted,
        format!(
            "telemetry buffer full ({used} of {cap} bytes held, {wanted} more wanted): \
             flushing is behind, retry later"
        ),
    )
}

/// A status carrying `google.rpc.RetryInfo` (one second) in its details.
pub fn retryable(code: tonic::Code, message: String) -> Status {
    let retry = RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
    };
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: retry.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, Bytes::from(details.encode_to_vec()))
}

/// A `google.rpc.Status` message, encoded (the body of an OTLP/HTTP refusal).
pub fn rpc_status(code: tonic::Code, message: &str) -> Vec<u8> {
    RpcStatus {
        code: code as i32,
        message: message.to_string(),
        details: Vec::new(),
    }
    .encode_to_vec()
}

/// `google.rpc.Status`, the form gRPC status details travel in.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<prost_types::Duration>,
}

struct ExportCall<S> {
    receiver: Arc<Receiver>,
    _signal: PhantomData<fn() -> S>,
}

impl<S: Signal> UnaryService<Bytes> for ExportCall<S> {
    type Response = S::Response;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<S::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let receiver = self.receiver.clone();
        Box::pin(async move {
            export::<S>(&receiver, request.into_inner())
                .await
                .map(Response::new)
                .map_err(|(_, status)| status)
        })
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
        let receiver = self.receiver.clone();
        let is_export = req.uri().path() == format!("/{}/Export", S::SERVICE);
        Box::pin(async move {
            if !is_export {
                return Ok(
                    Status::unimplemented(format!("{} has only Export", S::SERVICE)).into_http(),
                );
            }
            // Refused before the body is read: a flood of streams costs no memory.
            let Ok(_slot) = receiver.slots.clone().try_acquire_owned() else {
                receiver.stats.refused(usize::from(S::TABLE), Refusal::Busy);
                return Ok(retryable(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "{} export requests already in progress (--max-inflight-requests), retry later",
                        receiver.max_inflight
                    ),
                )
                .into_http());
            };
            let max_message_bytes = receiver.max_message_bytes;
            let mut grpc = Grpc::new(RawCodec::<S::Response>::default())
                .accept_compressed(CompressionEncoding::Gzip)
                .apply_max_message_size_config(Some(max_message_bytes), None);
            let call = ExportCall::<S> {
                receiver: receiver.clone(),
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
