//! An OTLP trace export's bytes straight into span rows.
//!
//! Two passes over the request, neither of which allocates per span outside the Arrow
//! builders. [`TraceFrame::read`] walks the outer messages (resources, scopes and the length
//! of each span) to count the rows and estimate what they will take, so the receiver can
//! reserve that from its memory budget before building anything; [`TraceFrame::rows`] then
//! reads each span's fields and appends them to the builders as it meets them. The checks
//! are prost's: wire types of known fields, lengths, UTF-8 of strings (an attribute key that
//! is one of the promoted columns' names is known to be valid without a check); a message
//! given twice is merged as protobuf says. A request malformed anywhere is refused whole.
//!
//! Reading into the builders directly, where the request used to be read into a view first
//! (a vector of attributes per span, a vector of spans per scope) and converted from it,
//! saves the view's allocations and a second walk over every attribute.

use std::mem::size_of;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Int64Builder, StringBuilder, TimestampNanosecondBuilder,
};
use datafusion::arrow::compute::filter;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use super::{
    EventColumns, Ids, LinkColumns, PROMOTED_TEXT, Promoted, RESOURCE_COLUMNS, ROW_OVERHEAD,
    SPAN_MESH_COLUMNS, SPAN_STRING_COLUMNS, TypedAttributes, append_map, find, map_builder, nanos,
    resource_map, slot, span_kind, status_code, text_builder, times,
};
use crate::schema;
use crate::trace_view::{self, Kv, Value, bad, fields, key_value, push_kv};
use crate::wire::WireError;

/// What an attribute costs in the builders beyond its bytes (offsets, the entry itself).
const ITEM: usize = 16;
/// What an event or a link costs while read, beyond its bytes and attributes.
const ENTRY: usize = 64;

/// Why a request did not become rows.
#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    /// Not a well-formed export request: the caller's fault.
    #[error("{0}")]
    Malformed(#[from] WireError),
    /// Its rows would take more than the `limit` they were given: the amplification the
    /// frame's estimate does not see (many tiny attributes, events or links).
    #[error("its rows take more than the {0} bytes reserved for them")]
    TooBig(usize),
    /// The builders refused the rows: the server's fault.
    #[error("{0}")]
    Arrow(#[from] ArrowError),
}

/// An export request's outer structure: how many spans it holds and what their rows will
/// take, read without reading the spans.
#[derive(Debug, Clone, Copy)]
pub struct TraceFrame<'a> {
    body: &'a [u8],
    /// Spans in the request.
    pub spans: usize,
    /// Bytes the rows will take, about: each row's fixed cost and a copy of its resource
    /// and scope, twice each span's own bytes, and the resource attributes read aside.
    pub estimate: usize,
}

/// The rows of a request, and the spans left out.
#[derive(Debug)]
pub struct SpanRows {
    pub batch: RecordBatch,
    /// Spans that could not be stored, and the reason of the first.
    pub rejected: Option<(i64, &'static str)>,
}

impl<'a> TraceFrame<'a> {
    /// Reads the outer messages of `body`, an `ExportTraceServiceRequest`.
    pub fn read(body: &'a [u8]) -> Result<TraceFrame<'a>, WireError> {
        let mut frame = TraceFrame {
            body,
            spans: 0,
            estimate: 0,
        };
        for f in fields(body, 0) {
            if let (1, w) = f? {
                let (b, at) = w.message()?;
                frame.resource_spans(b, at)?;
            }
        }
        Ok(frame)
    }

    fn resource_spans(&mut self, buf: &[u8], base: usize) -> Result<(), WireError> {
        let (mut resource_len, mut attributes, mut spans) = (0usize, 0usize, 0usize);
        for f in fields(buf, base) {
            match f? {
                (1, w) => {
                    let (b, at) = w.message()?;
                    resource_len += b.len();
                    for f in fields(b, at) {
                        if let (1, _) = f? {
                            attributes += 1;
                        }
                    }
                }
                (2, w) => {
                    let (b, at) = w.message()?;
                    let (mut scope_len, mut n, mut own) = (0usize, 0usize, 0usize);
                    for f in fields(b, at) {
                        match f? {
                            (1, w) => scope_len += w.message()?.0.len(),
                            (2, w) => {
                                n += 1;
                                own += w.message()?.0.len();
                            }
                            _ => {}
                        }
                    }
                    spans += n;
                    let rows = n.saturating_mul(scope_len.saturating_add(ROW_OVERHEAD));
                    self.estimate = self
                        .estimate
                        .saturating_add(rows)
                        .saturating_add(own.saturating_mul(2));
                }
                _ => {}
            }
        }
        self.spans += spans;
        self.estimate = self
            .estimate
            .saturating_add(spans.saturating_mul(resource_len))
            .saturating_add(attributes.saturating_mul(size_of::<Kv<'_>>()));
        Ok(())
    }

    /// The spans as one record batch of [`schema::SPANS`]. Spans without a valid trace or
    /// span id are left out and counted. Fails with [`RowsError::TooBig`] as soon as the
    /// rows built pass `limit` bytes (as counted here, about what they take).
    pub fn rows(&self, limit: usize) -> Result<SpanRows, RowsError> {
        let mut b = Builders::new(self.spans, limit);
        let mut scratch = Scratch::default();
        for f in fields(self.body, 0) {
            if let (1, w) = f? {
                let (buf, at) = w.message()?;
                b.resource_spans(buf, at, &mut scratch)?;
            }
        }
        b.finish()
    }
}

/// Per-span reads kept between spans: a span's events and links (rare) are read aside,
/// then appended; their vectors keep their capacity.
#[derive(Default)]
struct Scratch<'a> {
    events: Vec<trace_view::Event<'a>>,
    links: Vec<trace_view::Link<'a>>,
}

/// What the spans of one resource and scope share.
struct Shared<'r, 'a> {
    /// What the row's `resource_attributes` map holds (see [`resource_map`]).
    resource: &'r [&'r Kv<'a>],
    service: &'r str,
    version: Option<&'r str>,
    namespace: Option<&'r str>,
    scope: Option<trace_view::Scope<'a>>,
    /// Bytes each row copies of the resource and scope.
    bytes: usize,
}

/// The scalar fields of a span, the last given of each kept (as protobuf merges).
#[derive(Default)]
struct Scalars<'a> {
    trace_id: &'a [u8],
    span_id: &'a [u8],
    trace_state: &'a str,
    parent_span_id: &'a [u8],
    flags: u32,
    name: &'a str,
    kind: i32,
    start: u64,
    end: u64,
    dropped_attributes: u32,
    dropped_events: u32,
    dropped_links: u32,
    status_message: &'a str,
    status_code: i32,
}

/// The spans table's builders, row by row.
struct Builders {
    trace_id: Ids,
    span_id: Ids,
    parent: Ids,
    trace_state: StringBuilder,
    service: StringBuilder,
    version: StringBuilder,
    namespace: StringBuilder,
    name: StringBuilder,
    kind: StringBuilder,
    start: TimestampNanosecondBuilder,
    end: TimestampNanosecondBuilder,
    duration: Int64Builder,
    status: StringBuilder,
    status_msg: StringBuilder,
    texts: Vec<StringBuilder>,
    http_status: Int64Builder,
    server_port: Int64Builder,
    grpc_status: Int64Builder,
    scope_name: StringBuilder,
    scope_version: StringBuilder,
    attributes: TypedAttributes,
    resource_attributes: datafusion::arrow::array::MapBuilder<StringBuilder, StringBuilder>,
    flags: Int64Builder,
    dropped: Int64Builder,
    dropped_events: Int64Builder,
    dropped_links: Int64Builder,
    events: EventColumns,
    links: LinkColumns,
    /// Per row: stored (false for a span with an invalid id, taken out at the end).
    keep: Vec<bool>,
    rejected: i64,
    why: Option<&'static str>,
    /// Bytes counted so far, and the most allowed.
    cost: usize,
    limit: usize,
}

/// Reads a `KeyValue`: its key's bytes (checked as UTF-8 only when asked), where they start,
/// and its value.
fn raw_key_value(buf: &[u8], base: usize) -> Result<(&[u8], usize, Value<'_>), WireError> {
    if let Some((key, value)) = usual_key_value(buf) {
        return Ok((key, base + 2, value));
    }
    let (mut key, mut key_at, mut value) = (&[][..], base, Value::None);
    for f in fields(buf, base) {
        match f? {
            (1, w) => (key, key_at) = w.message()?,
            (2, w) => {
                let (b, at) = w.message()?;
                value = Value::read(b, at)?;
            }
            _ => {}
        }
    }
    Ok((key, key_at, value))
}

/// The usual attribute, read without the general field loop: a key shorter than 128 bytes,
/// then a value of under 128 bytes that holds one string (valid UTF-8) or one int, in that
/// order and nothing else. `None` for any other shape, invalid ones included, which the
/// general loop then reads (and refuses with its error).
fn usual_key_value(buf: &[u8]) -> Option<(&[u8], Value<'_>)> {
    fn short(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        match buf {
            [t, len, rest @ ..] if *t == tag && *len < 0x80 && rest.len() >= usize::from(*len) => {
                Some(rest.split_at(usize::from(*len)))
            }
            _ => None,
        }
    }
    let (key, rest) = short(buf, 0x0a)?;
    let (any, rest) = short(rest, 0x12)?;
    if !rest.is_empty() {
        return None;
    }
    let value = match any {
        [0x0a, ..] => {
            let (text, rest) = short(any, 0x0a)?;
            if !rest.is_empty() {
                return None;
            }
            Value::Str(std::str::from_utf8(text).ok()?)
        }
        [0x18, rest @ ..] => {
            let mut at = 0;
            let v = crate::wire::varint(rest, &mut at, 0).ok()?;
            if at != rest.len() {
                return None;
            }
            Value::Int(v as i64)
        }
        _ => return None,
    };
    Some((key, value))
}

/// Attributes of an event or a link read aside without being charged for it (beyond their
/// place in the builders): a vector of them is a few KB.
const FREE_ASIDE: usize = 64;

/// What reading an event or a link (`buf`, its attributes at field `attributes`) will take:
/// the entry, each attribute's place in the builders, and the vector it is read into past
/// [`FREE_ASIDE`] attributes. Counted on the wire first, so a flood of tiny attributes is
/// refused before it is read.
fn entry_cost(buf: &[u8], base: usize, attributes: u32) -> Result<usize, WireError> {
    let mut n = 0usize;
    for f in fields(buf, base) {
        if f?.0 == attributes {
            n += 1;
        }
    }
    let aside = n
        .saturating_sub(FREE_ASIDE)
        .saturating_mul(size_of::<Kv<'_>>());
    Ok(ENTRY
        .saturating_add(n.saturating_mul(ITEM))
        .saturating_add(aside))
}

fn utf8(bytes: &[u8], at: usize) -> Result<&str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| bad(at, "a string that is not UTF-8"))
}

impl Builders {
    fn new(rows: usize, limit: usize) -> Builders {
        Builders {
            trace_id: Ids::new(rows, 16),
            span_id: Ids::new(rows, 8),
            parent: Ids::new(rows, 8),
            trace_state: text_builder(rows),
            service: text_builder(rows),
            version: text_builder(rows),
            namespace: text_builder(rows),
            name: text_builder(rows),
            kind: text_builder(rows),
            start: times(rows),
            end: times(rows),
            duration: Int64Builder::with_capacity(rows),
            status: text_builder(rows),
            status_msg: text_builder(rows),
            texts: (0..PROMOTED_TEXT).map(|_| text_builder(rows)).collect(),
            http_status: Int64Builder::with_capacity(rows),
            server_port: Int64Builder::with_capacity(rows),
            grpc_status: Int64Builder::with_capacity(rows),
            scope_name: text_builder(rows),
            scope_version: text_builder(rows),
            attributes: TypedAttributes::new(rows),
            resource_attributes: map_builder(rows),
            flags: Int64Builder::with_capacity(rows),
            dropped: Int64Builder::with_capacity(rows),
            dropped_events: Int64Builder::with_capacity(rows),
            dropped_links: Int64Builder::with_capacity(rows),
            events: EventColumns::default(),
            links: LinkColumns::default(),
            keep: Vec::with_capacity(rows),
            rejected: 0,
            why: None,
            cost: 0,
            limit,
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), RowsError> {
        self.cost = self.cost.saturating_add(bytes);
        if self.cost > self.limit {
            return Err(RowsError::TooBig(self.limit));
        }
        Ok(())
    }

    fn resource_spans<'a>(
        &mut self,
        buf: &'a [u8],
        base: usize,
        scratch: &mut Scratch<'a>,
    ) -> Result<(), RowsError> {
        // The resource first, wherever it is among the scopes.
        let (mut resource, mut resource_len) = (Vec::new(), 0usize);
        for f in fields(buf, base) {
            match f? {
                (1, w) => {
                    let (b, at) = w.message()?;
                    resource_len += b.len();
                    for f in fields(b, at) {
                        match f? {
                            (1, w) => push_kv(&mut resource, w)?,
                            (2, w) => {
                                w.varint()?;
                            }
                            _ => {}
                        }
                    }
                }
                (3, w) => {
                    w.string()?;
                }
                _ => {}
            }
        }
        let text = |key| find(&resource, key).map(Value::text);
        let service = text("service.name").unwrap_or_else(|| super::UNKNOWN_SERVICE.to_string());
        let version = text("service.version");
        let namespace = text("service.namespace");
        let kept = resource_map(&resource, &RESOURCE_COLUMNS);
        for f in fields(buf, base) {
            if let (2, w) = f? {
                let (b, at) = w.message()?;
                let shared = Shared {
                    resource: &kept,
                    service: &service,
                    version: version.as_deref(),
                    namespace: namespace.as_deref(),
                    scope: None,
                    bytes: resource_len,
                };
                self.scope_spans(b, at, shared, scratch)?;
            }
        }
        Ok(())
    }

    fn scope_spans<'a>(
        &mut self,
        buf: &'a [u8],
        base: usize,
        mut shared: Shared<'_, 'a>,
        scratch: &mut Scratch<'a>,
    ) -> Result<(), RowsError> {
        // The scope first, wherever it is among the spans.
        for f in fields(buf, base) {
            match f? {
                (1, w) => {
                    let (b, at) = w.message()?;
                    shared.bytes += b.len();
                    let scope = shared.scope.get_or_insert_with(Default::default);
                    for f in fields(b, at) {
                        match f? {
                            (1, w) => scope.name = w.string()?,
                            (2, w) => scope.version = w.string()?,
                            // Not stored, but checked as prost's decode checks them.
                            (3, w) => {
                                let (b, at) = w.message()?;
                                key_value(b, at)?;
                            }
                            (4, w) => {
                                w.varint()?;
                            }
                            _ => {}
                        }
                    }
                }
                (3, w) => {
                    w.string()?;
                }
                _ => {}
            }
        }
        for f in fields(buf, base) {
            if let (2, w) = f? {
                let (b, at) = w.message()?;
                self.span(b, at, &shared, scratch)?;
            }
        }
        Ok(())
    }

    /// One span: attributes go to their columns as they are read, the rest when the span
    /// ends.
    fn span<'a>(
        &mut self,
        buf: &'a [u8],
        base: usize,
        shared: &Shared<'_, 'a>,
        scratch: &mut Scratch<'a>,
    ) -> Result<(), RowsError> {
        self.charge(
            ROW_OVERHEAD
                .saturating_add(shared.bytes)
                .saturating_add(buf.len()),
        )?;
        let mut s = Scalars::default();
        let mut promoted = Promoted::new();
        scratch.events.clear();
        scratch.links.clear();
        for f in fields(buf, base) {
            let (n, w) = f?;
            match n {
                1 => s.trace_id = w.bytes()?,
                2 => s.span_id = w.bytes()?,
                3 => s.trace_state = w.string()?,
                4 => s.parent_span_id = w.bytes()?,
                16 => s.flags = w.fixed32()?,
                5 => s.name = w.string()?,
                6 => s.kind = w.varint()? as i32,
                7 => s.start = w.fixed64()?,
                8 => s.end = w.fixed64()?,
                9 => {
                    self.charge(ITEM)?;
                    let (b, at) = w.message()?;
                    let (key, key_at, value) = raw_key_value(b, at)?;
                    let slot = slot(key);
                    if !promoted.take(slot, value) {
                        let key = utf8(key, key_at)?;
                        self.attributes.add(&Kv { key, value });
                    }
                }
                10 => s.dropped_attributes = w.varint()? as u32,
                11 => {
                    let (b, at) = w.message()?;
                    // Charged before it is read: its attributes are read into a vector.
                    self.charge(entry_cost(b, at, 3)?)?;
                    scratch.events.push(trace_view::event(b, at)?);
                }
                12 => s.dropped_events = w.varint()? as u32,
                13 => {
                    let (b, at) = w.message()?;
                    self.charge(entry_cost(b, at, 4)?)?;
                    scratch.links.push(trace_view::link(b, at)?);
                }
                14 => s.dropped_links = w.varint()? as u32,
                15 => {
                    let (b, at) = w.message()?;
                    for f in fields(b, at) {
                        match f? {
                            (2, w) => s.status_message = w.string()?,
                            (3, w) => s.status_code = w.varint()? as i32,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let problem = problem(s.trace_id, s.span_id);
        if let Some(why) = problem {
            self.rejected += 1;
            self.why.get_or_insert(why);
        }
        self.keep.push(problem.is_none());
        self.end_span(&s, promoted, shared, scratch)
    }

    fn end_span(
        &mut self,
        s: &Scalars<'_>,
        promoted: Promoted<'_>,
        shared: &Shared<'_, '_>,
        scratch: &Scratch<'_>,
    ) -> Result<(), RowsError> {
        self.attributes.end_row()?;
        self.trace_id.append(s.trace_id)?;
        self.span_id.append(s.span_id)?;
        self.parent.append(s.parent_span_id)?;
        if s.trace_state.is_empty() {
            self.trace_state.append_null();
        } else {
            self.trace_state.append_value(s.trace_state);
        }
        self.service.append_value(shared.service);
        self.version.append_option(shared.version);
        self.namespace.append_option(shared.namespace);
        self.name.append_value(s.name);
        self.kind.append_value(span_kind(s.kind));
        self.start.append_value(nanos(s.start));
        self.end.append_value(nanos(s.end));
        self.duration
            .append_value(nanos(s.end.saturating_sub(s.start)));
        self.status.append_value(status_code(s.status_code));
        self.status_msg
            .append_option(Some(s.status_message).filter(|m| !m.is_empty()));
        for (builder, value) in self.texts.iter_mut().zip(promoted.texts) {
            builder.append_option(value);
        }
        let [status_int, port, grpc] = promoted.ints;
        self.http_status.append_option(status_int);
        self.server_port.append_option(port);
        self.grpc_status.append_option(grpc);
        self.scope_name.append_option(shared.scope.map(|s| s.name));
        self.scope_version
            .append_option(shared.scope.map(|s| s.version));
        append_map(
            &mut self.resource_attributes,
            shared.resource.iter().copied(),
        )?;
        self.flags.append_value(i64::from(s.flags));
        self.dropped.append_value(i64::from(s.dropped_attributes));
        self.dropped_events
            .append_value(i64::from(s.dropped_events));
        self.dropped_links.append_value(i64::from(s.dropped_links));
        self.events.push(&scratch.events)?;
        self.links.push(&scratch.links)?;
        Ok(())
    }

    fn finish(mut self) -> Result<SpanRows, RowsError> {
        let mut texts = self
            .texts
            .into_iter()
            .map(|mut b| Arc::new(b.finish()) as ArrayRef);
        let mut next = || {
            texts
                .next()
                .ok_or_else(|| ArrowError::SchemaError("span text columns".into()))
        };
        let mut strings = Vec::with_capacity(SPAN_STRING_COLUMNS.len());
        for _ in SPAN_STRING_COLUMNS {
            strings.push(next()?);
        }
        let mut mesh = Vec::with_capacity(SPAN_MESH_COLUMNS.len());
        for _ in SPAN_MESH_COLUMNS {
            mesh.push(next()?);
        }
        let [
            method,
            route,
            path,
            full,
            address,
            peer,
            rpc_system,
            rpc_service,
            rpc_method,
        ] = <[ArrayRef; SPAN_STRING_COLUMNS.len()]>::try_from(strings)
            .map_err(|_| ArrowError::SchemaError("span string columns".into()))?;
        let [
            attributes,
            attributes_int,
            attributes_double,
            attributes_bool,
            attributes_bytes,
        ] = self.attributes.finish();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.parent.finish()),
            Arc::new(self.trace_state.finish()),
            Arc::new(self.service.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.namespace.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.start.finish()),
            Arc::new(self.end.finish()),
            Arc::new(self.duration.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.status_msg.finish()),
            method,
            Arc::new(self.http_status.finish()),
            route,
            path,
            full,
            address,
            Arc::new(self.server_port.finish()),
            peer,
            rpc_system,
            rpc_service,
            rpc_method,
            Arc::new(self.grpc_status.finish()),
        ];
        columns.extend(mesh);
        columns.extend::<[ArrayRef; 2]>([
            Arc::new(self.scope_name.finish()),
            Arc::new(self.scope_version.finish()),
        ]);
        columns.extend([
            attributes,
            Arc::new(self.resource_attributes.finish()),
            Arc::new(self.flags.finish()),
            Arc::new(self.dropped.finish()),
            Arc::new(self.dropped_events.finish()),
            Arc::new(self.dropped_links.finish()),
            self.events.finish()?,
            self.links.finish()?,
            attributes_int,
            attributes_double,
            attributes_bool,
            attributes_bytes,
        ]);
        if self.rejected > 0 {
            let keep = BooleanArray::from(std::mem::take(&mut self.keep));
            for column in &mut columns {
                *column = filter(column, &keep)?;
            }
        }
        // The builders reserve for long values; the rows stay in the memtable until flushed,
        // and its bytes decide when a flush is due: at about 1.7 KB a span as built, flushes
        // came every 38,000 spans, in row groups too small for compaction to copy.
        for column in &mut columns {
            datafusion::arrow::array::Array::shrink_to_fit(column);
        }
        let batch = RecordBatch::try_new(schema::SPANS.clone(), columns)?;
        Ok(SpanRows {
            batch,
            rejected: self.why.map(|why| (self.rejected, why)),
        })
    }
}

/// Why a span cannot be stored, if it cannot: OTLP requires a 16-byte trace id and an
/// 8-byte span id, neither all zeros.
fn problem(trace_id: &[u8], span_id: &[u8]) -> Option<&'static str> {
    if trace_id.len() != 16 || trace_id.iter().all(|b| *b == 0) {
        Some("trace id must be 16 bytes, not all zero")
    } else if span_id.len() != 8 || span_id.iter().all(|b| *b == 0) {
        Some("span id must be 8 bytes, not all zero")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray, MapArray};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1 as t;
    use prost::Message;

    use crate::readback::{kv, to_otlp};

    fn rows_of(bytes: &[u8], limit: usize) -> Result<SpanRows, RowsError> {
        TraceFrame::read(bytes)?.rows(limit)
    }

    fn rich() -> ExportTraceServiceRequest {
        use any_value::Value as V;
        let attrs = vec![
            kv("s", V::StringValue("text ✓".into())),
            kv("b", V::BoolValue(true)),
            kv("i", V::IntValue(-42)),
            kv("d", V::DoubleValue(2.5)),
            kv("y", V::BytesValue(vec![0, 1, 255])),
            kv(
                "a",
                V::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(V::IntValue(7)),
                    }],
                }),
            ),
            kv(
                "m",
                V::KvlistValue(KeyValueList {
                    values: vec![kv("k", V::StringValue("v".into()))],
                }),
            ),
            kv("http.route", V::StringValue("/x/{id}".into())),
            kv("server.port", V::StringValue("8080".into())),
        ];
        let span = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "a=b".into(),
            parent_span_id: vec![3; 8],
            flags: 0x301,
            name: "GET /x".into(),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_100_000_000,
            attributes: attrs.clone(),
            dropped_attributes_count: 3,
            events: vec![t::span::Event {
                time_unix_nano: 5,
                name: "ev".into(),
                attributes: attrs.clone(),
                dropped_attributes_count: 1,
            }],
            dropped_events_count: 4,
            links: vec![t::span::Link {
                trace_id: vec![9; 16],
                span_id: vec![8; 8],
                trace_state: "c=d".into(),
                attributes: attrs,
                dropped_attributes_count: 2,
                flags: 1,
            }],
            dropped_links_count: 5,
            status: Some(t::Status {
                message: "boom".into(),
                code: 2,
            }),
        };
        let second = t::Span {
            span_id: vec![4; 8],
            ..span.clone()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![t::ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", V::StringValue("svc".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![
                    t::ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "lib".into(),
                            version: "1.0".into(),
                            ..Default::default()
                        }),
                        spans: vec![span, t::Span::default()],
                        schema_url: "https://x".into(),
                    },
                    t::ScopeSpans {
                        scope: None,
                        spans: vec![second],
                        schema_url: String::new(),
                    },
                ],
                schema_url: String::new(),
            }],
        }
    }

    /// Attributes as readback gives them, by key (arrays and lists come back as JSON text).
    fn sorted(mut attrs: Vec<KeyValue>) -> Vec<KeyValue> {
        attrs.sort_by_key(|a| (a.key.clone(), format!("{:?}", a.value)));
        attrs
    }

    fn as_stored(attrs: &[KeyValue]) -> Vec<KeyValue> {
        let text = |s: &str| {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(s.into())),
            })
        };
        // An int column also takes an int written as text, which stays in the string map.
        let port = attrs
            .iter()
            .find(|a| a.key == "server.port")
            .map(|a| KeyValue {
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(8080)),
                }),
                ..a.clone()
            });
        sorted(
            attrs
                .iter()
                .chain(port.as_ref())
                .map(|a| match a.key.as_str() {
                    "a" => KeyValue {
                        value: text("[7]"),
                        ..a.clone()
                    },
                    "m" => KeyValue {
                        value: text(r#"{"k":"v"}"#),
                        ..a.clone()
                    },
                    _ => a.clone(),
                })
                .collect(),
        )
    }

    /// Event and link attributes as stored: every value as text.
    fn as_text(attrs: &[KeyValue]) -> Vec<KeyValue> {
        sorted(
            attrs
                .iter()
                .map(|a| KeyValue {
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(super::super::any_value_text(
                            &a.value.clone().unwrap_or_default(),
                        ))),
                    }),
                    ..a.clone()
                })
                .collect(),
        )
    }

    #[test]
    fn every_field_prost_decodes_is_stored_and_comes_back() {
        let bytes = rich().encode_to_vec();
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let frame = TraceFrame::read(&bytes).expect("frame");
        assert_eq!(frame.spans, 3);
        let rows = frame.rows(frame.estimate).expect("within its own estimate");
        assert_eq!(
            rows.rejected,
            Some((1, "trace id must be 16 bytes, not all zero"))
        );
        assert_eq!(rows.batch.num_rows(), 2, "the empty span is left out");
        let back = to_otlp(&[rows.batch]).expect("reads back");
        let sent: Vec<&t::Span> = decoded.resource_spans[0]
            .scope_spans
            .iter()
            .flat_map(|s| &s.spans)
            .filter(|s| !s.trace_id.is_empty())
            .collect();
        let got: Vec<&t::Span> = back
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        assert_eq!(got.len(), sent.len());
        for want in sent {
            let got = got
                .iter()
                .find(|g| g.span_id == want.span_id)
                .expect("span back");
            assert_eq!(sorted(got.attributes.clone()), as_stored(&want.attributes));
            assert_eq!(got.events.len(), 1);
            assert_eq!(
                sorted(got.events[0].attributes.clone()),
                as_text(&want.events[0].attributes)
            );
            assert_eq!(got.links.len(), 1);
            assert_eq!(
                sorted(got.links[0].attributes.clone()),
                as_text(&want.links[0].attributes)
            );
            let bare = |s: &t::Span| {
                let mut s = s.clone();
                s.attributes.clear();
                s.events.iter_mut().for_each(|e| e.attributes.clear());
                s.links.iter_mut().for_each(|l| l.attributes.clear());
                s
            };
            assert_eq!(bare(got), bare(want));
        }
    }

    #[test]
    fn the_usual_attribute_shape_reads_as_the_general_loop_does() {
        use any_value::Value as V;
        let long = "x".repeat(200);
        let values = [
            Some(V::StringValue("GET".into())),
            Some(V::StringValue(String::new())),
            Some(V::StringValue(long.clone())),
            Some(V::IntValue(0)),
            Some(V::IntValue(-1)),
            Some(V::IntValue(9080)),
            Some(V::BoolValue(true)),
            Some(V::DoubleValue(0.5)),
            None,
        ];
        for key in ["http.route", "", long.as_str()] {
            for value in &values {
                let kv = KeyValue {
                    key: key.into(),
                    value: value.clone().map(|v| AnyValue { value: Some(v) }),
                    ..Default::default()
                };
                let bytes = kv.encode_to_vec();
                let general = {
                    let (mut k, mut v) = (&[][..], Value::None);
                    for f in fields(&bytes, 0) {
                        match f.expect("field") {
                            (1, w) => k = w.message().expect("key").0,
                            (2, w) => {
                                let (b, at) = w.message().expect("value");
                                v = Value::read(b, at).expect("value");
                            }
                            _ => {}
                        }
                    }
                    (k, v)
                };
                let (k, _, v) = raw_key_value(&bytes, 0).expect("reads");
                assert_eq!((k, v), general, "{kv:?}");
                if let Some((k, v)) = usual_key_value(&bytes) {
                    assert_eq!((k, v), general, "{kv:?}");
                }
            }
        }
        // Not UTF-8: left to the general loop, which refuses it.
        let mut bytes = kv("k", V::StringValue("ab".into())).encode_to_vec();
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        assert_eq!(usual_key_value(&bytes), None);
        assert!(raw_key_value(&bytes, 0).is_err());
        // A value with a second field after the string: the general loop's answer.
        let mut any = Vec::new();
        prost::encoding::string::encode(1, &"a".to_string(), &mut any);
        prost::encoding::int64::encode(3, &5, &mut any);
        let mut bytes = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut bytes);
        prost::encoding::bytes::encode(2, &any, &mut bytes);
        assert_eq!(usual_key_value(&bytes), None);
        assert_eq!(raw_key_value(&bytes, 0).expect("reads").2, Value::Int(5));
    }

    #[test]
    fn resource_attributes_with_a_column_are_not_repeated_in_the_map_and_come_back() {
        use any_value::Value as V;
        let text = |k: &str, v: &str| kv(k, V::StringValue(v.into()));
        let span = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        };
        let request = |attributes: Vec<KeyValue>| ExportTraceServiceRequest {
            resource_spans: vec![t::ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    ..Default::default()
                }),
                scope_spans: vec![t::ScopeSpans {
                    spans: vec![span.clone()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let cases = [
            // The service attributes go to their columns, the rest stay in the map.
            (
                vec![
                    text("service.name", "reviews"),
                    text("k8s.pod.name", "reviews-1"),
                    text("service.version", "v2"),
                    kv("service.namespace", V::IntValue(7)),
                ],
                vec!["k8s.pod.name", "service.namespace"],
            ),
            // Named as the default: kept in the map, so it is told from no name at all.
            (
                vec![text("service.name", "unknown_service")],
                vec!["service.name"],
            ),
            (vec![], vec![]),
        ];
        for (attributes, in_map) in cases {
            let bytes = request(attributes.clone()).encode_to_vec();
            let batch = rows_of(&bytes, usize::MAX).expect("rows").batch;
            let map = batch
                .column_by_name("resource_attributes")
                .and_then(|c| c.as_any().downcast_ref::<MapArray>())
                .expect("map");
            let entries = map.value(0);
            let keys = entries.column(0).as_string::<i32>();
            let keys: Vec<&str> = (0..keys.len()).map(|i| keys.value(i)).collect();
            assert_eq!(keys, in_map);
            let back = to_otlp(&[batch]).expect("reads back");
            let resource = back[0].resource.clone().unwrap_or_default();
            // The same attributes, values as the map keeps them (text).
            let want: Vec<(String, String)> = attributes
                .iter()
                .map(|a| {
                    let v = super::super::any_value_text(&a.value.clone().unwrap_or_default());
                    (a.key.clone(), v)
                })
                .collect();
            let mut got: Vec<(String, String)> = resource
                .attributes
                .iter()
                .map(|a| {
                    let v = super::super::any_value_text(&a.value.clone().unwrap_or_default());
                    (a.key.clone(), v)
                })
                .collect();
            let mut want_sorted = want.clone();
            want_sorted.sort();
            got.sort();
            assert_eq!(got, want_sorted);
        }
    }

    #[test]
    fn a_message_given_twice_is_merged_as_protobuf_says() {
        // Two `resource` fields: their attributes add up. Two `name` fields in a span: the
        // last wins. prost agrees.
        let one = Resource {
            attributes: vec![kv("a", any_value::Value::IntValue(1))],
            ..Default::default()
        };
        let two = Resource {
            attributes: vec![kv("b", any_value::Value::IntValue(2))],
            ..Default::default()
        };
        let span = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "first".into(),
            ..Default::default()
        };
        let mut span_bytes = span.encode_to_vec();
        prost::encoding::string::encode(5, &"second".to_string(), &mut span_bytes);
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &span_bytes, &mut ss);
        let mut rs = Vec::new();
        for r in [one, two] {
            prost::encoding::message::encode(1, &r, &mut rs);
        }
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let rs = &decoded.resource_spans[0];
        let resource = rs.resource.clone().unwrap_or_default();
        assert_eq!(resource.attributes.len(), 2);
        assert_eq!(rs.scope_spans[0].spans[0].name, "second");

        let batch = rows_of(&bytes, usize::MAX).expect("rows").batch;
        let map = batch
            .column_by_name("resource_attributes")
            .and_then(|c| c.as_any().downcast_ref::<MapArray>())
            .expect("map");
        let entries = map.value(0);
        let keys = entries.column(0).as_string::<i32>();
        assert_eq!((keys.value(0), keys.value(1)), ("a", "b"));
        let names = batch.column_by_name("span_name").expect("name");
        assert_eq!(names.as_string::<i32>().value(0), "second");
    }

    #[test]
    fn what_prost_refuses_is_refused() {
        let good = rich().encode_to_vec();
        // Cut short anywhere inside: refused by both (or read the same, at a field edge).
        for cut in [1, 2, 10, good.len() / 2, good.len() - 1] {
            let bytes = &good[..cut];
            let prost = ExportTraceServiceRequest::decode(bytes);
            let ours = rows_of(bytes, usize::MAX);
            assert_eq!(prost.is_err(), ours.is_err(), "cut at {cut}");
        }
        let wrap = |span_bytes: &[u8]| {
            let mut ss = Vec::new();
            prost::encoding::bytes::encode(2, &span_bytes.to_vec(), &mut ss);
            let mut rs = Vec::new();
            prost::encoding::bytes::encode(2, &ss, &mut rs);
            let mut bytes = Vec::new();
            prost::encoding::bytes::encode(1, &rs, &mut bytes);
            bytes
        };
        // A span name that is not UTF-8.
        let span = t::Span {
            name: "x".into(),
            ..Default::default()
        };
        let mut span_bytes = span.encode_to_vec();
        let last = span_bytes.len() - 1;
        span_bytes[last] = 0xff;
        let bytes = wrap(&span_bytes);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        let err = rows_of(&bytes, usize::MAX).expect_err("not UTF-8");
        assert!(matches!(err, RowsError::Malformed(_)), "{err}");
        assert!(err.to_string().contains("UTF-8"), "{err}");
        // An attribute key that is not UTF-8, and one that is a promoted column's name
        // with a byte changed.
        for key in [&b"\xffkey"[..], &b"http.rout\xe5"[..]] {
            let mut attr = Vec::new();
            prost::encoding::bytes::encode(1, &key.to_vec(), &mut attr);
            let mut span_bytes = Vec::new();
            prost::encoding::bytes::encode(9, &attr, &mut span_bytes);
            let bytes = wrap(&span_bytes);
            assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
            assert!(rows_of(&bytes, usize::MAX).is_err(), "{key:?}");
        }
        // A string that is not UTF-8 inside an array value.
        let inner = AnyValue {
            value: Some(any_value::Value::StringValue("x".into())),
        };
        let mut inner_bytes = inner.encode_to_vec();
        let last = inner_bytes.len() - 1;
        inner_bytes[last] = 0xff;
        let mut array = Vec::new();
        prost::encoding::bytes::encode(1, &inner_bytes, &mut array);
        let mut value = Vec::new();
        prost::encoding::bytes::encode(5, &array, &mut value);
        let mut attr = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut attr);
        prost::encoding::bytes::encode(2, &value, &mut attr);
        let mut span_bytes = Vec::new();
        prost::encoding::bytes::encode(9, &attr, &mut span_bytes);
        let bytes = wrap(&span_bytes);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        assert!(
            rows_of(&bytes, usize::MAX).is_err(),
            "a bad array is refused, not emptied"
        );
        // A known field with the wrong wire type: `name` (5) as a varint.
        let bytes = wrap(&[0x28u8, 0x01]);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        assert!(rows_of(&bytes, usize::MAX).is_err());
    }

    #[test]
    fn rows_that_amplify_past_their_estimate_are_refused_while_built() {
        // One span of 100,000 empty attributes: 2 bytes each on the wire, more in the
        // builders than the frame's estimate allows.
        let mut span_bytes = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        }
        .encode_to_vec();
        for _ in 0..100_000 {
            span_bytes.extend_from_slice(&[0x4a, 0x00]);
        }
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &span_bytes, &mut ss);
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        let frame = TraceFrame::read(&bytes).expect("frame");
        let err = frame.rows(frame.estimate).expect_err("too big");
        assert!(matches!(err, RowsError::TooBig(_)), "{err}");
        // The same inside an event (read aside before its row is built): refused too.
        let mut event = Vec::new();
        for _ in 0..100_000 {
            event.extend_from_slice(&[0x1a, 0x00]);
        }
        let mut span_bytes = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(11, &event, &mut span_bytes);
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &span_bytes, &mut ss);
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        let frame = TraceFrame::read(&bytes).expect("frame");
        let err = frame.rows(frame.estimate).expect_err("too big");
        assert!(matches!(err, RowsError::TooBig(_)), "{err}");
        // The same attributes with keys and values worth their bytes stay within it.
        let attrs = (0..2_000)
            .map(|i| {
                kv(
                    &format!("key.{i}"),
                    any_value::Value::StringValue(format!("v{i}")),
                )
            })
            .collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![t::ResourceSpans {
                scope_spans: vec![t::ScopeSpans {
                    spans: vec![t::Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        attributes: attrs,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let bytes = req.encode_to_vec();
        let frame = TraceFrame::read(&bytes).expect("frame");
        let rows = frame.rows(frame.estimate).expect("within its estimate");
        assert_eq!(rows.batch.num_rows(), 1);
        assert!(rows.batch.get_array_memory_size() <= frame.estimate * 2);
    }
}
