//! Spans encoded for export as the exporter takes them off the queue: each straight into the
//! bytes of an OTLP `ExportTraceServiceRequest`, in a buffer the exporter keeps, and sent as
//! they are. Building prost's message tree for each span (a `String` for every attribute's
//! key and value, three id vectors) only for tonic's codec to walk it twice and free it cost
//! more than everything else a recorded span costs.

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::{AttrValue, SpanRecord, unix_nanos};

/// The spans of the next export request, encoded, and the request's fixed parts.
#[derive(Debug)]
pub struct SpanBatch {
    /// `ResourceSpans.resource` (field 1), encoded once.
    resource: Bytes,
    /// `ScopeSpans.scope` (field 1), encoded once.
    scope: Bytes,
    /// Each span as `ScopeSpans.spans` (field 2).
    spans: BytesMut,
    /// One span's fields, before its length is known.
    scratch: BytesMut,
    count: usize,
}

/// `ExportTraceServiceRequest.resource_spans`, `ResourceSpans.scope_spans`,
/// `ScopeSpans.spans`: the nesting a batch is written in.
const RESOURCE_SPANS: u32 = 1;
const SCOPE_SPANS: u32 = 2;
const SPANS: u32 = 2;

impl SpanBatch {
    pub fn new(resource: &Resource, scope: &InstrumentationScope) -> SpanBatch {
        SpanBatch {
            resource: field(1, resource),
            scope: field(1, scope),
            spans: BytesMut::new(),
            scratch: BytesMut::new(),
            count: 0,
        }
    }

    /// Spans in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes of the spans in the batch.
    pub fn bytes(&self) -> usize {
        self.spans.len()
    }

    pub fn push(&mut self, s: &SpanRecord) {
        self.scratch.clear();
        span_fields(s, &mut self.scratch);
        length_delimited(SPANS, &self.scratch, &mut self.spans);
        self.count += 1;
    }

    /// The request message for the spans pushed since the last one; the batch is empty
    /// after, and keeps its buffer.
    pub fn take(&mut self) -> Bytes {
        let scope_spans = self.scope.len() + self.spans.len();
        let resource_spans = self.resource.len() + delimited_len(SCOPE_SPANS, scope_spans);
        let mut out = BytesMut::with_capacity(delimited_len(RESOURCE_SPANS, resource_spans));
        encode_key(RESOURCE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        out.put_slice(&self.resource);
        encode_key(SCOPE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(scope_spans as u64, &mut out);
        out.put_slice(&self.scope);
        out.put_slice(&self.spans);
        self.spans.clear();
        self.count = 0;
        out.freeze()
    }
}

/// A message's encoding as field `tag` of its parent.
fn field(tag: u32, message: &impl Message) -> Bytes {
    let mut out = BytesMut::with_capacity(delimited_len(tag, message.encoded_len()));
    prost::encoding::message::encode(tag, message, &mut out);
    out.freeze()
}

fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn length_delimited(tag: u32, value: &[u8], out: &mut BytesMut) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

fn varint_field(tag: u32, value: u64, out: &mut BytesMut) {
    encode_key(tag, WireType::Varint, out);
    encode_varint(value, out);
}

fn fixed64_field(tag: u32, value: u64, out: &mut BytesMut) {
    encode_key(tag, WireType::SixtyFourBit, out);
    out.put_u64_le(value);
}

fn fixed32_field(tag: u32, value: u32, out: &mut BytesMut) {
    encode_key(tag, WireType::ThirtyTwoBit, out);
    out.put_u32_le(value);
}

/// `opentelemetry.proto.trace.v1.Span`'s fields for `s` (as `to_otlp_span` builds it).
fn span_fields(s: &SpanRecord, out: &mut BytesMut) {
    length_delimited(1, &s.context.trace_id, out);
    length_delimited(2, &s.context.span_id, out);
    if let Some(p) = &s.parent {
        length_delimited(4, &p.span_id, out);
    }
    if !s.name.is_empty() {
        length_delimited(5, s.name.as_bytes(), out);
    }
    let kind = s.kind as i32;
    if kind != 0 {
        varint_field(6, kind as u64, out);
    }
    let (start, end) = (unix_nanos(s.start), unix_nanos(s.end));
    if start != 0 {
        fixed64_field(7, start, out);
    }
    if end != 0 {
        fixed64_field(8, end, out);
    }
    for (key, value) in &s.attributes {
        key_value(key, value, out);
    }
    // `Status`: its code (field 3) when an error; present, and empty, when not.
    encode_key(15, WireType::LengthDelimited, out);
    if s.error {
        let code = StatusCode::Error as u64;
        encode_varint((key_len(3) + encoded_len_varint(code)) as u64, out);
        varint_field(3, code, out);
    } else {
        encode_varint(0, out);
    }
    if s.context.sampled {
        fixed32_field(16, 1, out);
    }
}

/// `Span.attributes` (field 9): a `KeyValue` of `key` (1) and an `AnyValue` (2) holding a
/// string (1) or an int (3).
fn key_value(key: &str, value: &AttrValue, out: &mut BytesMut) {
    // A oneof's value is written even when it is its type's default, as prost writes it.
    let any = match value {
        AttrValue::Str(v) => delimited_len(1, v.len()),
        AttrValue::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
    };
    let key_part = if key.is_empty() {
        0
    } else {
        delimited_len(1, key.len())
    };
    encode_key(9, WireType::LengthDelimited, out);
    encode_varint((key_part + delimited_len(2, any)) as u64, out);
    if !key.is_empty() {
        length_delimited(1, key.as_bytes(), out);
    }
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(any as u64, out);
    match value {
        AttrValue::Str(v) => length_delimited(1, v.as_bytes(), out),
        AttrValue::Int(i) => varint_field(3, *i as u64, out),
    }
}

/// tonic's codec for a request already encoded (`SpanBatch::take`) and its response.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreEncoded;

impl tonic::codec::Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> PreEncoded {
        PreEncoded
    }
}

impl tonic::codec::Encoder for PreEncoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for PreEncoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| {
                tonic::Status::internal(format!("an export response that does not decode: {e}"))
            })
    }
}

/// Sends one encoded request to the trace service's `Export`.
pub async fn export(
    channel: &mut tonic::client::Grpc<tonic::transport::Channel>,
    request: Bytes,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    channel
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the trace service is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    channel
        .unary(tonic::Request::new(request), path, PreEncoded)
        .await
        .map(tonic::Response::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Identity, Reporter};
    use crate::trace::SpanContext;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use std::time::{Duration, SystemTime};

    fn spans() -> Vec<SpanRecord> {
        let root = SpanContext::new_root();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        vec![
            SpanRecord {
                context: root,
                parent: None,
                name: "reviews.default.svc.cluster.local:9080/*".into(),
                kind: SpanKind::Server,
                start: t0,
                end: t0 + Duration::from_micros(1500),
                error: false,
                attributes: vec![
                    ("http.request.method", AttrValue::Str("GET".into())),
                    ("url.path", AttrValue::Str("/reviews/0?ü=1".into())),
                    ("http.response.status_code", AttrValue::Int(200)),
                    ("empty", AttrValue::Str(String::new())),
                    ("zero", AttrValue::Int(0)),
                    ("negative", AttrValue::Int(-7)),
                    ("", AttrValue::Str("no key".into())),
                ],
            },
            SpanRecord {
                context: SpanContext {
                    sampled: false,
                    ..root.child()
                },
                parent: Some(root),
                name: String::new(),
                kind: SpanKind::Client,
                start: t0,
                end: t0,
                error: true,
                attributes: vec![("response_flags", AttrValue::Str("UF".into()))],
            },
        ]
    }

    #[test]
    fn a_batch_decodes_as_the_request_prost_would_build() {
        let (r, _q) = Reporter::new(
            Identity::of_pod("reviews-v1-1", "reviews", "v1", "default"),
            4,
        );
        let mut batch = SpanBatch::new(&r.resource(), &Reporter::scope());
        let spans = spans();
        for s in &spans {
            batch.push(s);
        }
        assert_eq!(batch.len(), 2);
        let request = batch.take();
        assert!(
            batch.is_empty() && batch.bytes() == 0,
            "taking empties the batch"
        );
        let decoded = ExportTraceServiceRequest::decode(request.clone()).expect("decodes");
        let built = r.trace_request(spans.clone());
        assert_eq!(decoded, built);
        assert_eq!(
            request.len(),
            built.encoded_len(),
            "nothing more, nothing less"
        );
        // The buffer is reused: the next request is the next spans alone.
        batch.push(&spans[1]);
        let again = ExportTraceServiceRequest::decode(batch.take()).expect("decodes");
        assert_eq!(again, r.trace_request(vec![spans[1].clone()]));
    }
}
