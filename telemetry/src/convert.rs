//! OTLP requests to Arrow record batches: one row per span, per metric data point and per
//! log record. Well-known span attributes get their own columns (and are then left out of
//! the maps, unless their type differs from the column's); the others go to the map of
//! their type (`attributes` for strings, `attributes_int`, `attributes_double`,
//! `attributes_bool`), so nothing the sender said is lost and types stay distinguishable.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, FixedSizeBinaryArray, FixedSizeBinaryBuilder,
    Float64Builder, Int32Builder, Int64Builder, ListBuilder, MapBuilder, MapFieldNames,
    StringBuilder, TimestampNanosecondBuilder,
};
use datafusion::arrow::array::{ListArray, StructArray};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::{span, status};

use crate::schema;
use crate::trace_view::{self, Attr, Value};

mod spans;

pub use spans::{RowsError, SpanRows, TraceFrame};

/// Bytes a stored row costs beyond its attributes (ids, times, names, offsets).
pub const ROW_OVERHEAD: usize = 160;

/// String span attributes promoted to their own columns, in the order the columns are built.
pub const SPAN_STRING_COLUMNS: [&str; 9] = [
    "http.request.method",
    "http.route",
    "url.path",
    "url.full",
    "server.address",
    "network.peer.address",
    "rpc.system",
    "rpc.service",
    "rpc.method",
];

/// The attributes a mesh proxy puts on every span (Istio's Envoy and lumen-proxy), each
/// promoted to its own column: (attribute key, column). In a map, the request id alone would
/// keep the map's values from dictionary encoding.
pub const SPAN_MESH_COLUMNS: [(&str, &str); 9] = [
    ("peer.service", "peer_service"),
    ("guid:x-request-id", "request_id"),
    ("upstream_cluster", "upstream_cluster"),
    ("response_flags", "response_flags"),
    ("user_agent.original", "user_agent_original"),
    ("error.type", "error_type"),
    ("istio.canonical_service", "istio_canonical_service"),
    ("istio.canonical_revision", "istio_canonical_revision"),
    ("istio.namespace", "istio_namespace"),
];

/// Integer span attributes promoted to their own columns, in the order the columns are built.
pub const SPAN_INT_COLUMNS: [&str; 3] = [
    "http.response.status_code",
    "server.port",
    "rpc.grpc.status_code",
];

/// Resource attributes with a column of their own in `spans`: (attribute key, column). The
/// `metrics` and `logs` tables have the first.
pub const RESOURCE_COLUMNS: [(&str, &str); 3] = [
    ("service.name", "service_name"),
    ("service.version", "service_version"),
    ("service.namespace", "service_namespace"),
];

/// The service name of a resource that gives none (OpenTelemetry's default).
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// The resource attributes a row's `resource_attributes` map holds: all but those its
/// table's own `columns` hold whole (of each key, the first attribute, when it is a
/// string; `readback` puts them back). Each row copies the map, so this is worth it: the
/// three service attributes were half of a mesh span's resource map.
fn resource_map<'r, A: Attr>(attrs: &'r [A], columns: &[(&str, &str)]) -> Vec<&'r A> {
    attrs
        .iter()
        .enumerate()
        .filter(|(i, kv)| {
            let key = kv.key();
            // The service name's column says `unknown_service` when there was none, so a
            // service named that stays in the map too, and readback tells the two apart.
            let whole = columns.iter().any(|(k, _)| *k == key)
                && matches!(kv.value(), Value::Str(v) if v != UNKNOWN_SERVICE)
                && attrs[..*i].iter().all(|o| o.key() != key);
            !whole
        })
        .map(|(_, kv)| kv)
        .collect()
}

/// Promoted text columns: [`SPAN_STRING_COLUMNS`] then [`SPAN_MESH_COLUMNS`].
const PROMOTED_TEXT: usize = SPAN_STRING_COLUMNS.len() + SPAN_MESH_COLUMNS.len();

/// The promoted column a span attribute key belongs to, if any: one `match` per attribute
/// instead of a scan of the attributes per column (the conversion's hottest loop). Indices
/// follow [`SPAN_STRING_COLUMNS`], [`SPAN_MESH_COLUMNS`] and [`SPAN_INT_COLUMNS`]; a test
/// checks they agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Text(usize),
    Int(usize),
}

fn slot(key: &[u8]) -> Option<Slot> {
    Some(match key {
        b"http.request.method" => Slot::Text(0),
        b"http.route" => Slot::Text(1),
        b"url.path" => Slot::Text(2),
        b"url.full" => Slot::Text(3),
        b"server.address" => Slot::Text(4),
        b"network.peer.address" => Slot::Text(5),
        b"rpc.system" => Slot::Text(6),
        b"rpc.service" => Slot::Text(7),
        b"rpc.method" => Slot::Text(8),
        b"peer.service" => Slot::Text(9),
        b"guid:x-request-id" => Slot::Text(10),
        b"upstream_cluster" => Slot::Text(11),
        b"response_flags" => Slot::Text(12),
        b"user_agent.original" => Slot::Text(13),
        b"error.type" => Slot::Text(14),
        b"istio.canonical_service" => Slot::Text(15),
        b"istio.canonical_revision" => Slot::Text(16),
        b"istio.namespace" => Slot::Text(17),
        b"http.response.status_code" => Slot::Int(0),
        b"server.port" => Slot::Int(1),
        b"rpc.grpc.status_code" => Slot::Int(2),
        _ => return None,
    })
}

/// A span's promoted attributes, as they are read (the first of a key wins). A promoted key
/// whose value has another type than its column's stays in the map of its type (an int
/// column also takes an int written as text, which then stays in the string map too).
struct Promoted<'a> {
    texts: [Option<&'a str>; PROMOTED_TEXT],
    ints: [Option<i64>; SPAN_INT_COLUMNS.len()],
}

impl<'a> Promoted<'a> {
    fn new() -> Promoted<'a> {
        Promoted {
            texts: [None; PROMOTED_TEXT],
            ints: [None; SPAN_INT_COLUMNS.len()],
        }
    }

    /// Takes an attribute of this slot into its column; false when it goes to the map of
    /// its type (as well).
    fn take(&mut self, slot: Option<Slot>, value: Value<'a>) -> bool {
        match (slot, value) {
            (Some(Slot::Text(i)), Value::Str(v)) => {
                self.texts[i].get_or_insert(v);
                true
            }
            (Some(Slot::Int(i)), Value::Int(v)) => {
                self.ints[i].get_or_insert(v);
                true
            }
            (Some(Slot::Int(i)), _) => {
                if self.ints[i].is_none() {
                    self.ints[i] = value.int();
                }
                false
            }
            _ => false,
        }
    }
}

/// Converts an OTLP string / int / bool / double / bytes / array / kvlist to text.
pub fn any_value_text(v: &AnyValue) -> String {
    match &v.value {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Some(any_value::Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(any_value_json).collect()).to_string()
        }
        Some(any_value::Value::KvlistValue(kv)) => serde_json::Value::Object(
            kv.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        kv.value
                            .as_ref()
                            .map_or(serde_json::Value::Null, any_value_json),
                    )
                })
                .collect(),
        )
        .to_string(),
        Some(_) => String::new(),
    }
}

fn any_value_json(v: &AnyValue) -> serde_json::Value {
    match &v.value {
        Some(any_value::Value::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => serde_json::Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => serde_json::Value::from(*d),
        _ => serde_json::Value::String(any_value_text(v)),
    }
}

/// The value of the first attribute named `key` (none when it has no value).
fn find<'a, A: Attr>(attrs: &'a [A], key: &str) -> Option<Value<'a>> {
    attrs
        .iter()
        .find(|kv| kv.key() == key)
        .map(Attr::value)
        .filter(|v| *v != Value::None)
}

/// Appends a value as text: a string as it is, any other value as [`Value::text`] writes it.
fn append_text(builder: &mut StringBuilder, value: Value<'_>) {
    match value {
        Value::Str(s) => builder.append_value(s),
        other => builder.append_value(other.text()),
    }
}

fn append_map<'x, A: Attr + 'x>(
    builder: &mut MapBuilder<StringBuilder, StringBuilder>,
    attrs: impl IntoIterator<Item = &'x A>,
) -> Result<(), ArrowError> {
    for kv in attrs {
        builder.keys().append_value(kv.key());
        append_text(builder.values(), kv.value());
    }
    builder.append(true)
}

/// Typed attribute maps: `attributes` (strings, and arrays and maps as JSON text),
/// `attributes_int`, `attributes_double`, `attributes_bool`, `attributes_bytes`.
struct TypedAttributes {
    strings: MapBuilder<StringBuilder, StringBuilder>,
    ints: MapBuilder<StringBuilder, Int64Builder>,
    doubles: MapBuilder<StringBuilder, Float64Builder>,
    bools: MapBuilder<StringBuilder, BooleanBuilder>,
    bytes: MapBuilder<StringBuilder, BinaryBuilder>,
}

impl TypedAttributes {
    fn new(rows: usize) -> TypedAttributes {
        let names = || Some(MapFieldNames::default());
        let keys = |n: usize| StringBuilder::with_capacity(n, n.saturating_mul(16));
        TypedAttributes {
            strings: map_builder(rows),
            ints: MapBuilder::with_capacity(names(), keys(rows), Int64Builder::new(), rows),
            doubles: MapBuilder::with_capacity(names(), keys(0), Float64Builder::new(), rows),
            bools: MapBuilder::with_capacity(names(), keys(0), BooleanBuilder::new(), rows),
            bytes: MapBuilder::with_capacity(names(), keys(0), BinaryBuilder::new(), rows),
        }
    }

    /// One row: the attributes `keep` accepts, each in the map of its type.
    fn push<A: Attr>(&mut self, attrs: &[A], keep: impl Fn(&A) -> bool) -> Result<(), ArrowError> {
        for kv in attrs.iter().filter(|kv| keep(kv)) {
            self.add(kv);
        }
        self.end_row()
    }

    /// One attribute of the current row, in the map of its type.
    fn add<A: Attr>(&mut self, kv: &A) {
        let key = kv.key();
        match kv.value() {
            Value::Int(i) => {
                self.ints.keys().append_value(key);
                self.ints.values().append_value(i);
            }
            Value::Double(d) => {
                self.doubles.keys().append_value(key);
                self.doubles.values().append_value(d);
            }
            Value::Bool(b) => {
                self.bools.keys().append_value(key);
                self.bools.values().append_value(b);
            }
            Value::Bytes(b) => {
                self.bytes.keys().append_value(key);
                self.bytes.values().append_value(b);
            }
            other => {
                self.strings.keys().append_value(key);
                append_text(self.strings.values(), other);
            }
        }
    }

    /// Ends the current row.
    fn end_row(&mut self) -> Result<(), ArrowError> {
        self.strings.append(true)?;
        self.ints.append(true)?;
        self.doubles.append(true)?;
        self.bools.append(true)?;
        self.bytes.append(true)
    }

    /// The five map columns: strings first, then int, double, bool and bytes.
    fn finish(mut self) -> [ArrayRef; 5] {
        [
            Arc::new(self.strings.finish()),
            Arc::new(self.ints.finish()),
            Arc::new(self.doubles.finish()),
            Arc::new(self.bools.finish()),
            Arc::new(self.bytes.finish()),
        ]
    }
}

/// An id column's builder and the id width it takes.
struct Ids {
    builder: FixedSizeBinaryBuilder,
    width: usize,
}

impl Ids {
    fn new(rows: usize, width: u8) -> Ids {
        Ids {
            builder: FixedSizeBinaryBuilder::with_capacity(rows, i32::from(width)),
            width: usize::from(width),
        }
    }

    /// Appends an id, or null when it is empty or of another length (spans' own ids are
    /// checked before, see [`span_problem`]).
    fn append(&mut self, id: &[u8]) -> Result<(), ArrowError> {
        if id.len() == self.width {
            self.builder.append_value(id)
        } else {
            self.builder.append_null();
            Ok(())
        }
    }

    fn finish(&mut self) -> FixedSizeBinaryArray {
        self.builder.finish()
    }
}

fn nanos(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

// Builders are sized by the rows they will hold: a batch keeps its builders' allocations
// until it is flushed, and the default 1,024-row capacity of ~30 columns would make a
// 25-span batch hold ~190 KB.

fn map_builder(rows: usize) -> MapBuilder<StringBuilder, StringBuilder> {
    let entries = rows.saturating_mul(4);
    MapBuilder::with_capacity(
        None,
        StringBuilder::with_capacity(entries, entries.saturating_mul(16)),
        StringBuilder::with_capacity(entries, entries.saturating_mul(16)),
        rows,
    )
}

fn text_builder(rows: usize) -> StringBuilder {
    StringBuilder::with_capacity(rows, rows.saturating_mul(16))
}

fn times(rows: usize) -> TimestampNanosecondBuilder {
    TimestampNanosecondBuilder::with_capacity(rows).with_timezone("UTC")
}

fn span_kind(kind: i32) -> &'static str {
    match span::SpanKind::try_from(kind) {
        Ok(span::SpanKind::Server) => "server",
        Ok(span::SpanKind::Client) => "client",
        Ok(span::SpanKind::Producer) => "producer",
        Ok(span::SpanKind::Consumer) => "consumer",
        Ok(span::SpanKind::Internal) => "internal",
        _ => "unspecified",
    }
}

fn status_code(code: i32) -> &'static str {
    match status::StatusCode::try_from(code) {
        Ok(status::StatusCode::Ok) => "ok",
        Ok(status::StatusCode::Error) => "error",
        _ => "unset",
    }
}

/// The spans of a prost export request as one record batch of [`schema::SPANS`]: its bytes
/// through [`TraceFrame::rows`] (for tests, and the same rows as the receiver makes).
#[cfg(test)]
pub fn spans_to_batch(
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Result<RecordBatch, ArrowError> {
    use prost::Message;
    let bytes = req.encode_to_vec();
    let frame = TraceFrame::read(&bytes).map_err(|e| ArrowError::ParseError(e.to_string()))?;
    match frame.rows(usize::MAX) {
        Ok(rows) => Ok(rows.batch),
        Err(RowsError::Arrow(e)) => Err(e),
        Err(e) => Err(ArrowError::ParseError(e.to_string())),
    }
}

/// The `events` column: a list of event structs per span, built flat and assembled at the end.
struct EventColumns {
    time: TimestampNanosecondBuilder,
    name: StringBuilder,
    attributes: MapBuilder<StringBuilder, StringBuilder>,
    dropped: Int64Builder,
    lengths: Vec<usize>,
}

impl Default for EventColumns {
    fn default() -> Self {
        EventColumns {
            time: times(0),
            name: text_builder(0),
            attributes: map_builder(0),
            dropped: Int64Builder::new(),
            lengths: Vec::new(),
        }
    }
}

impl EventColumns {
    fn push(&mut self, events: &[trace_view::Event<'_>]) -> Result<(), ArrowError> {
        for e in events {
            self.time.append_value(nanos(e.time_unix_nano));
            self.name.append_value(e.name);
            append_map(&mut self.attributes, &e.attributes)?;
            self.dropped
                .append_value(i64::from(e.dropped_attributes_count));
        }
        self.lengths.push(events.len());
        Ok(())
    }

    fn finish(mut self) -> Result<ArrayRef, ArrowError> {
        let items: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(self.dropped.finish()),
        ];
        list_of_structs(schema::EVENT_FIELDS.clone(), items, &self.lengths)
    }
}

/// The `links` column, as [`EventColumns`].
struct LinkColumns {
    trace_id: Ids,
    span_id: Ids,
    trace_state: StringBuilder,
    attributes: MapBuilder<StringBuilder, StringBuilder>,
    dropped: Int64Builder,
    flags: Int64Builder,
    lengths: Vec<usize>,
}

impl Default for LinkColumns {
    fn default() -> Self {
        LinkColumns {
            trace_id: Ids::new(0, 16),
            span_id: Ids::new(0, 8),
            trace_state: text_builder(0),
            attributes: map_builder(0),
            dropped: Int64Builder::new(),
            flags: Int64Builder::new(),
            lengths: Vec::new(),
        }
    }
}

impl LinkColumns {
    fn push(&mut self, links: &[trace_view::Link<'_>]) -> Result<(), ArrowError> {
        // A link to a malformed id cannot be stored in the non-null id columns; it is left
        // out (and counted as dropped by the caller's dropped_links_count, which OTLP
        // defines as links the sender dropped, so it is logged instead).
        let valid = |l: &&trace_view::Link<'_>| l.trace_id.len() == 16 && l.span_id.len() == 8;
        let kept = links.iter().filter(valid).count();
        if kept != links.len() {
            tracing::debug!(
                dropped = links.len() - kept,
                "span links with malformed ids left out"
            );
        }
        for l in links.iter().filter(valid) {
            self.trace_id.append(l.trace_id)?;
            self.span_id.append(l.span_id)?;
            self.trace_state
                .append_option(Some(l.trace_state).filter(|t| !t.is_empty()));
            append_map(&mut self.attributes, &l.attributes)?;
            self.dropped
                .append_value(i64::from(l.dropped_attributes_count));
            self.flags.append_value(i64::from(l.flags));
        }
        self.lengths.push(kept);
        Ok(())
    }

    fn finish(mut self) -> Result<ArrayRef, ArrowError> {
        let items: Vec<ArrayRef> = vec![
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.trace_state.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(self.dropped.finish()),
            Arc::new(self.flags.finish()),
        ];
        list_of_structs(schema::LINK_FIELDS.clone(), items, &self.lengths)
    }
}

/// A `List<Struct>` column from the struct's flat columns and each row's item count.
fn list_of_structs(
    fields: Fields,
    columns: Vec<ArrayRef>,
    lengths: &[usize],
) -> Result<ArrayRef, ArrowError> {
    let items = StructArray::try_new(fields.clone(), columns, None)?;
    let field = Arc::new(Field::new("item", DataType::Struct(fields), false));
    let list = ListArray::try_new(
        field,
        OffsetBuffer::from_lengths(lengths.iter().copied()),
        Arc::new(items),
        None,
    )?;
    Ok(Arc::new(list))
}

/// One metric data point, whatever its kind, as the columns of [`schema::METRICS`] see it.
struct Point<'a> {
    time: u64,
    start: u64,
    kind: &'static str,
    temporality: Option<&'static str>,
    monotonic: Option<bool>,
    attributes: &'a [KeyValue],
    value: Option<f64>,
    count: Option<u64>,
    sum: Option<f64>,
    buckets: Option<&'a [u64]>,
    bounds: Option<&'a [f64]>,
}

impl<'a> Point<'a> {
    fn new(kind: &'static str, time: u64, start: u64, attributes: &'a [KeyValue]) -> Point<'a> {
        Point {
            time,
            start,
            kind,
            temporality: None,
            monotonic: None,
            attributes,
            value: None,
            count: None,
            sum: None,
            buckets: None,
            bounds: None,
        }
    }
}

/// Column builders of the `metrics` table.
struct MetricColumns {
    time: TimestampNanosecondBuilder,
    start: TimestampNanosecondBuilder,
    service: StringBuilder,
    name: StringBuilder,
    kind: StringBuilder,
    unit: StringBuilder,
    temporality: StringBuilder,
    monotonic: BooleanBuilder,
    value: Float64Builder,
    count: Int64Builder,
    sum: Float64Builder,
    buckets: ListBuilder<Int64Builder>,
    bounds: ListBuilder<Float64Builder>,
    attributes: MapBuilder<StringBuilder, StringBuilder>,
    resource_attributes: MapBuilder<StringBuilder, StringBuilder>,
    scope: StringBuilder,
}

impl MetricColumns {
    fn new(rows: usize) -> MetricColumns {
        MetricColumns {
            time: times(rows),
            start: times(rows),
            service: text_builder(rows),
            name: text_builder(rows),
            kind: text_builder(rows),
            unit: text_builder(rows),
            temporality: text_builder(rows),
            monotonic: BooleanBuilder::with_capacity(rows),
            value: Float64Builder::with_capacity(rows),
            count: Int64Builder::with_capacity(rows),
            sum: Float64Builder::with_capacity(rows),
            buckets: ListBuilder::with_capacity(
                Int64Builder::with_capacity(rows.saturating_mul(16)),
                rows,
            ),
            bounds: ListBuilder::with_capacity(
                Float64Builder::with_capacity(rows.saturating_mul(16)),
                rows,
            ),
            attributes: map_builder(rows),
            resource_attributes: map_builder(rows),
            scope: text_builder(rows),
        }
    }

    fn push(
        &mut self,
        service: &str,
        metric: &opentelemetry_proto::tonic::metrics::v1::Metric,
        resource: &[&KeyValue],
        scope: Option<&str>,
        p: Point<'_>,
    ) -> Result<(), ArrowError> {
        self.time.append_value(nanos(p.time));
        if p.start == 0 {
            self.start.append_null();
        } else {
            self.start.append_value(nanos(p.start));
        }
        self.service.append_value(service);
        self.name.append_value(&metric.name);
        self.kind.append_value(p.kind);
        self.unit
            .append_option(Some(metric.unit.as_str()).filter(|u| !u.is_empty()));
        self.temporality.append_option(p.temporality);
        self.monotonic.append_option(p.monotonic);
        self.value.append_option(p.value);
        self.count
            .append_option(p.count.map(|c| i64::try_from(c).unwrap_or(i64::MAX)));
        self.sum.append_option(p.sum);
        self.buckets.append_option(p.buckets.map(|b| {
            b.iter()
                .map(|c| Some(i64::try_from(*c).unwrap_or(i64::MAX)))
        }));
        self.bounds
            .append_option(p.bounds.map(|b| b.iter().map(|x| Some(*x))));
        append_map(&mut self.attributes, p.attributes)?;
        append_map(&mut self.resource_attributes, resource.iter().copied())?;
        self.scope.append_option(scope);
        Ok(())
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.start.finish()),
            Arc::new(self.service.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.temporality.finish()),
            Arc::new(self.monotonic.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.sum.finish()),
            Arc::new(self.buckets.finish()),
            Arc::new(self.bounds.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(self.resource_attributes.finish()),
            Arc::new(self.scope.finish()),
        ];
        RecordBatch::try_new(schema::METRICS.clone(), columns)
    }
}

/// The log records of an export request as one record batch of [`schema::LOGS`]. A record
/// with no time takes its observed time (the OTLP data model's rule for ordering).
pub fn logs_to_batch(req: &ExportLogsServiceRequest) -> Result<RecordBatch, ArrowError> {
    let rows: usize = req
        .resource_logs
        .iter()
        .flat_map(|rl| &rl.scope_logs)
        .map(|sl| sl.log_records.len())
        .sum();
    let mut time = times(rows);
    let mut observed = times(rows);
    let mut service = text_builder(rows);
    let mut severity = Int32Builder::with_capacity(rows);
    let mut severity_text = text_builder(rows);
    let mut body = text_builder(rows);
    let mut event_name = text_builder(rows);
    let mut trace_id = Ids::new(rows, 16);
    let mut span_id = Ids::new(rows, 8);
    let mut flags = Int64Builder::with_capacity(rows);
    let mut dropped = Int64Builder::with_capacity(rows);
    let mut attributes = TypedAttributes::new(rows);
    let mut resource_attributes = map_builder(rows);
    let mut scope_name = text_builder(rows);
    let mut scope_version = text_builder(rows);
    for rl in &req.resource_logs {
        let resource = rl
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let svc = find(resource, "service.name")
            .map(Value::text)
            .unwrap_or_else(|| UNKNOWN_SERVICE.to_string());
        let resource = resource_map(resource, &RESOURCE_COLUMNS[..1]);
        for sl in &rl.scope_logs {
            for r in &sl.log_records {
                let t = if r.time_unix_nano == 0 {
                    r.observed_time_unix_nano
                } else {
                    r.time_unix_nano
                };
                time.append_value(nanos(t));
                if r.observed_time_unix_nano == 0 {
                    observed.append_null();
                } else {
                    observed.append_value(nanos(r.observed_time_unix_nano));
                }
                service.append_value(&svc);
                severity.append_value(r.severity_number);
                severity_text
                    .append_option(Some(r.severity_text.as_str()).filter(|t| !t.is_empty()));
                body.append_option(r.body.as_ref().map(any_value_text));
                event_name.append_option(Some(r.event_name.as_str()).filter(|t| !t.is_empty()));
                trace_id.append(&r.trace_id)?;
                span_id.append(&r.span_id)?;
                flags.append_value(i64::from(r.flags));
                dropped.append_value(i64::from(r.dropped_attributes_count));
                attributes.push(&r.attributes, |_| true)?;
                append_map(&mut resource_attributes, resource.iter().copied())?;
                scope_name.append_option(sl.scope.as_ref().map(|s| s.name.as_str()));
                scope_version.append_option(sl.scope.as_ref().map(|s| s.version.as_str()));
            }
        }
    }
    let [
        attributes,
        attributes_int,
        attributes_double,
        attributes_bool,
        attributes_bytes,
    ] = attributes.finish();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(observed.finish()),
        Arc::new(service.finish()),
        Arc::new(severity.finish()),
        Arc::new(severity_text.finish()),
        Arc::new(body.finish()),
        Arc::new(event_name.finish()),
        Arc::new(trace_id.finish()),
        Arc::new(span_id.finish()),
        Arc::new(flags.finish()),
        Arc::new(dropped.finish()),
        attributes,
        Arc::new(resource_attributes.finish()),
        Arc::new(scope_name.finish()),
        Arc::new(scope_version.finish()),
        attributes_int,
        attributes_double,
        attributes_bool,
        attributes_bytes,
    ];
    RecordBatch::try_new(schema::LOGS.clone(), columns)
}

/// Data points in a metrics export request.
pub fn point_count(req: &ExportMetricsServiceRequest) -> usize {
    req.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .map(metric_points)
        .sum()
}

/// Data points of one metric, whatever its kind.
pub fn metric_points(m: &opentelemetry_proto::tonic::metrics::v1::Metric) -> usize {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    match &m.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

fn temporality_name(t: i32) -> Option<&'static str> {
    match t {
        1 => Some("delta"),
        2 => Some("cumulative"),
        _ => None,
    }
}

fn number(p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> Option<f64> {
    match p.value {
        Some(number_data_point::Value::AsDouble(d)) => Some(d),
        Some(number_data_point::Value::AsInt(i)) => Some(i as f64),
        None => None,
    }
}

/// The data points of an export request as one record batch of [`schema::METRICS`].
pub fn metrics_to_batch(req: &ExportMetricsServiceRequest) -> Result<RecordBatch, ArrowError> {
    let mut cols = MetricColumns::new(point_count(req));
    for rm in &req.resource_metrics {
        let resource = rm
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let svc =
            find(resource, "service.name").map_or_else(|| UNKNOWN_SERVICE.to_string(), Value::text);
        let resource = resource_map(resource, &RESOURCE_COLUMNS[..1]);
        for sm in &rm.scope_metrics {
            let scope = sm.scope.as_ref().map(|s| s.name.as_str());
            for m in &sm.metrics {
                let mut push = |p: Point<'_>| cols.push(&svc, m, &resource, scope, p);
                match &m.data {
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            push(Point {
                                value: number(p),
                                ..Point::new(
                                    "gauge",
                                    p.time_unix_nano,
                                    p.start_time_unix_nano,
                                    &p.attributes,
                                )
                            })?;
                        }
                    }
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            push(Point {
                                value: number(p),
                                temporality: temporality_name(s.aggregation_temporality),
                                monotonic: Some(s.is_monotonic),
                                ..Point::new(
                                    "sum",
                                    p.time_unix_nano,
                                    p.start_time_unix_nano,
                                    &p.attributes,
                                )
                            })?;
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(Point {
                                temporality: temporality_name(h.aggregation_temporality),
                                count: Some(p.count),
                                sum: p.sum,
                                buckets: Some(&p.bucket_counts),
                                bounds: Some(&p.explicit_bounds),
                                ..Point::new(
                                    "histogram",
                                    p.time_unix_nano,
                                    p.start_time_unix_nano,
                                    &p.attributes,
                                )
                            })?;
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            push(Point {
                                temporality: temporality_name(h.aggregation_temporality),
                                count: Some(p.count),
                                sum: p.sum,
                                ..Point::new(
                                    "exponential_histogram",
                                    p.time_unix_nano,
                                    p.start_time_unix_nano,
                                    &p.attributes,
                                )
                            })?;
                        }
                    }
                    Some(metric::Data::Summary(s)) => {
                        for p in &s.data_points {
                            push(Point {
                                count: Some(p.count),
                                sum: Some(p.sum),
                                ..Point::new(
                                    "summary",
                                    p.time_unix_nano,
                                    p.start_time_unix_nano,
                                    &p.attributes,
                                )
                            })?;
                        }
                    }
                    None => {}
                }
            }
        }
    }
    cols.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray, Int64Array, MapArray, StringArray};
    use datafusion::arrow::datatypes::TimestampNanosecondType;
    use opentelemetry_proto::tonic::metrics::v1 as m;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    use crate::readback::kv;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    fn map_entries(map: &MapArray, row: usize) -> Vec<(String, String)> {
        let entries = map.value(row);
        let keys = entries.column(0).as_string::<i32>();
        let values = entries.column(1).as_string::<i32>();
        (0..entries.len())
            .map(|i| (keys.value(i).to_string(), values.value(i).to_string()))
            .collect()
    }

    #[test]
    fn slots_agree_with_the_column_lists() {
        for (i, key) in SPAN_STRING_COLUMNS.iter().enumerate() {
            assert_eq!(slot(key.as_bytes()), Some(Slot::Text(i)), "{key}");
        }
        for (i, (key, _)) in SPAN_MESH_COLUMNS.iter().enumerate() {
            assert_eq!(
                slot(key.as_bytes()),
                Some(Slot::Text(SPAN_STRING_COLUMNS.len() + i)),
                "{key}"
            );
        }
        for (i, key) in SPAN_INT_COLUMNS.iter().enumerate() {
            assert_eq!(slot(key.as_bytes()), Some(Slot::Int(i)), "{key}");
        }
        assert_eq!(slot(b"cart.items"), None);
    }

    #[test]
    fn span_becomes_one_row_with_promoted_columns() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv(
                            "service.name",
                            any_value::Value::StringValue("reviews".into()),
                        ),
                        kv(
                            "service.version",
                            any_value::Value::StringValue("v2".into()),
                        ),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![0x01; 8],
                        parent_span_id: vec![0x02; 8],
                        name: "reviews.default.svc.cluster.local:9080/*".into(),
                        kind: span::SpanKind::Server as i32,
                        start_time_unix_nano: 1_000,
                        end_time_unix_nano: 4_500,
                        attributes: vec![
                            kv(
                                "http.request.method",
                                any_value::Value::StringValue("GET".into()),
                            ),
                            kv("http.response.status_code", any_value::Value::IntValue(503)),
                            kv("retry", any_value::Value::BoolValue(true)),
                            kv("attempts", any_value::Value::IntValue(3)),
                            kv("ratio", any_value::Value::DoubleValue(0.5)),
                            kv("note", any_value::Value::StringValue("canary".into())),
                            // A promoted key of another type than its column's stays typed.
                            kv("http.route", any_value::Value::IntValue(7)),
                            kv(
                                "guid:x-request-id",
                                any_value::Value::StringValue("r-1".into()),
                            ),
                        ],
                        status: Some(Status {
                            code: status::StatusCode::Error as i32,
                            message: "upstream failed".into(),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = spans_to_batch(&req).expect("converts");
        assert_eq!(batch.num_rows(), 1);
        let text = |name: &str| {
            batch
                .column_by_name(name)
                .expect(name)
                .as_string::<i32>()
                .value(0)
                .to_string()
        };
        let id = |name: &str| {
            batch
                .column_by_name(name)
                .expect(name)
                .as_fixed_size_binary()
                .value(0)
                .to_vec()
        };
        assert_eq!(id("trace_id"), vec![0xab; 16]);
        assert_eq!(id("span_id"), vec![0x01; 8]);
        assert_eq!(id("parent_span_id"), vec![0x02; 8]);
        assert_eq!(text("service_name"), "reviews");
        assert_eq!(text("service_version"), "v2");
        assert_eq!(text("span_kind"), "server");
        assert_eq!(text("status_code"), "error");
        assert_eq!(text("status_message"), "upstream failed");
        assert_eq!(text("http_request_method"), "GET");
        let int = |name: &str| {
            batch
                .column_by_name(name)
                .expect(name)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0)
        };
        assert_eq!(int("duration_ns"), 3_500);
        assert_eq!(int("http_response_status_code"), 503);
        let start = batch
            .column_by_name("start_time")
            .expect("start")
            .as_primitive::<TimestampNanosecondType>();
        assert_eq!(start.value(0), 1_000);
        assert!(batch.column_by_name("rpc_system").expect("rpc").is_null(0));
        assert_eq!(text("request_id"), "r-1");
        assert!(
            batch
                .column_by_name("http_route")
                .expect("route")
                .is_null(0)
        );
        // Promoted attributes are not repeated in the maps; the rest keep their types.
        let attrs = batch.column_by_name("attributes").expect("attrs").as_map();
        assert_eq!(
            map_entries(attrs, 0),
            vec![("note".to_string(), "canary".to_string())]
        );
        let typed = |name: &str| {
            let map = batch.column_by_name(name).expect(name).as_map();
            let entries = map.value(0);
            let keys = entries.column(0).as_string::<i32>();
            (0..entries.len())
                .map(|i| keys.value(i).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(typed("attributes_int"), ["attempts", "http.route"]);
        assert_eq!(typed("attributes_double"), ["ratio"]);
        assert_eq!(typed("attributes_bool"), ["retry"]);
        let ints = batch
            .column_by_name("attributes_int")
            .expect("ints")
            .as_map()
            .value(0);
        assert_eq!(
            ints.column(1)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values()
                .to_vec(),
            [3, 7]
        );
    }

    #[test]
    fn events_links_flags_and_dropped_counts_are_kept() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            flags: 0x301,
            dropped_attributes_count: 4,
            dropped_events_count: 5,
            events: vec![span::Event {
                time_unix_nano: 7,
                name: "retry".into(),
                attributes: vec![kv("attempt", any_value::Value::IntValue(2))],
                dropped_attributes_count: 1,
            }],
            links: vec![span::Link {
                trace_id: vec![0xab; 16],
                span_id: vec![0xcd; 8],
                trace_state: "k=v".into(),
                attributes: vec![kv(
                    "link.kind",
                    any_value::Value::StringValue("follows".into()),
                )],
                flags: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let plain = Span {
            trace_id: vec![3; 16],
            span_id: vec![4; 8],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span, plain],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = spans_to_batch(&req).expect("converts");
        let int = |name: &str, row: usize| {
            batch
                .column_by_name(name)
                .and_then(|c| {
                    c.as_any()
                        .downcast_ref::<Int64Array>()
                        .map(|a| a.value(row))
                })
                .expect(name)
        };
        assert_eq!(int("flags", 0), 0x301);
        assert_eq!(int("dropped_attributes_count", 0), 4);
        assert_eq!(int("dropped_events_count", 0), 5);
        let events = batch
            .column_by_name("events")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .expect("events");
        assert_eq!(events.value_length(0), 1);
        assert_eq!(
            events.value_length(1),
            0,
            "a span without events has an empty list"
        );
        let first = events.value(0);
        let event = first
            .as_any()
            .downcast_ref::<StructArray>()
            .expect("struct");
        let names = event
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("names");
        assert_eq!(names.value(0), "retry");
        let attrs = event
            .column(2)
            .as_any()
            .downcast_ref::<MapArray>()
            .expect("map");
        assert_eq!(
            map_entries(attrs, 0),
            vec![("attempt".to_string(), "2".to_string())]
        );
        let links = batch
            .column_by_name("links")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .expect("links");
        let first = links.value(0);
        let link = first
            .as_any()
            .downcast_ref::<StructArray>()
            .expect("struct");
        assert_eq!(link.column(0).as_fixed_size_binary().value(0), [0xab; 16]);
        assert_eq!(link.column(1).as_fixed_size_binary().value(0), [0xcd; 8]);
        let state = link
            .column(2)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("state");
        assert_eq!(state.value(0), "k=v");
    }

    #[test]
    fn root_span_has_null_parent_and_unknown_service_defaults() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = spans_to_batch(&req).expect("converts");
        assert!(
            batch
                .column_by_name("parent_span_id")
                .expect("parent")
                .is_null(0)
        );
        assert_eq!(
            batch
                .column_by_name("service_name")
                .expect("svc")
                .as_string::<i32>()
                .value(0),
            "unknown_service"
        );
        assert_eq!(
            batch
                .column_by_name("span_kind")
                .expect("kind")
                .as_string::<i32>()
                .value(0),
            "unspecified"
        );
    }

    #[test]
    fn histogram_point_keeps_buckets() {
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![m::ResourceMetrics {
                scope_metrics: vec![m::ScopeMetrics {
                    metrics: vec![m::Metric {
                        name: "istio_request_duration_milliseconds".into(),
                        unit: "ms".into(),
                        data: Some(metric::Data::Histogram(m::Histogram {
                            data_points: vec![m::HistogramDataPoint {
                                time_unix_nano: 5,
                                count: 3,
                                sum: Some(7.5),
                                bucket_counts: vec![1, 2, 0],
                                explicit_bounds: vec![1.0, 5.0],
                                ..Default::default()
                            }],
                            aggregation_temporality: 2,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = metrics_to_batch(&req).expect("converts");
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(
            batch
                .column_by_name("metric_type")
                .expect("type")
                .as_string::<i32>()
                .value(0),
            "histogram"
        );
        assert_eq!(
            batch
                .column_by_name("temporality")
                .expect("t")
                .as_string::<i32>()
                .value(0),
            "cumulative"
        );
        let buckets = batch
            .column_by_name("bucket_counts")
            .expect("buckets")
            .as_list::<i32>()
            .value(0);
        assert_eq!(
            buckets
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values()
                .to_vec(),
            vec![1, 2, 0]
        );
    }
}
