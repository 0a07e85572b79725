//! Stored spans back as OTLP: the inverse of `convert::spans_to_batch`, for the APIs that
//! hand traces to other tools (Jaeger's query APIs render from it). Promoted columns become
//! attributes again under their OpenTelemetry keys and with their types; the typed maps give
//! the rest. Rows are grouped into one `ResourceSpans` per resource and scope, in the order
//! they come.

use std::collections::HashMap;

use datafusion::arrow::array::{
    Array, AsArray, FixedSizeBinaryArray, Int64Array, ListArray, MapArray, StringArray,
    StructArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

use crate::convert::{
    RESOURCE_COLUMNS, SPAN_INT_COLUMNS, SPAN_MESH_COLUMNS, SPAN_STRING_COLUMNS, UNKNOWN_SERVICE,
};

fn missing(name: &str) -> ArrowError {
    ArrowError::SchemaError(format!("spans have no column {name} of the expected type"))
}

/// The columns of a spans batch that readback needs, downcast once.
struct Columns<'a> {
    trace_id: &'a FixedSizeBinaryArray,
    span_id: &'a FixedSizeBinaryArray,
    parent: &'a FixedSizeBinaryArray,
    trace_state: &'a StringArray,
    name: &'a StringArray,
    kind: &'a StringArray,
    start: &'a TimestampNanosecondArray,
    end: &'a TimestampNanosecondArray,
    status: &'a StringArray,
    status_message: &'a StringArray,
    scope_name: &'a StringArray,
    scope_version: &'a StringArray,
    promoted_text: Vec<(&'static str, &'a StringArray)>,
    promoted_int: Vec<(&'static str, &'a Int64Array)>,
    attributes: &'a MapArray,
    ints: &'a MapArray,
    doubles: &'a MapArray,
    bools: &'a MapArray,
    bytes: &'a MapArray,
    resource: &'a MapArray,
    /// The resource attributes with a column of their own (`convert::RESOURCE_COLUMNS`),
    /// which the map leaves out.
    resource_columns: Vec<(&'static str, &'a StringArray)>,
    flags: &'a Int64Array,
    dropped_attributes: &'a Int64Array,
    dropped_events: &'a Int64Array,
    dropped_links: &'a Int64Array,
    events: &'a ListArray,
    links: &'a ListArray,
}

impl<'a> Columns<'a> {
    fn new(batch: &'a RecordBatch) -> Result<Columns<'a>, ArrowError> {
        let col = |name: &str| batch.column_by_name(name).ok_or_else(|| missing(name));
        let text = |name: &'static str| -> Result<&'a StringArray, ArrowError> {
            col(name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| missing(name))
        };
        let id = |name: &str| -> Result<&'a FixedSizeBinaryArray, ArrowError> {
            col(name)?
                .as_fixed_size_binary_opt()
                .ok_or_else(|| missing(name))
        };
        let int = |name: &str| -> Result<&'a Int64Array, ArrowError> {
            col(name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| missing(name))
        };
        let time = |name: &str| -> Result<&'a TimestampNanosecondArray, ArrowError> {
            col(name)?
                .as_primitive_opt::<TimestampNanosecondType>()
                .ok_or_else(|| missing(name))
        };
        let map = |name: &str| -> Result<&'a MapArray, ArrowError> {
            col(name)?.as_map_opt().ok_or_else(|| missing(name))
        };
        let list = |name: &str| -> Result<&'a ListArray, ArrowError> {
            col(name)?.as_list_opt::<i32>().ok_or_else(|| missing(name))
        };
        let column_of = |key: &str| key.replace('.', "_");
        let mut promoted_text = Vec::new();
        for key in SPAN_STRING_COLUMNS {
            let name = column_of(key);
            let arr = col(&name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| missing(&name))?;
            promoted_text.push((key, arr));
        }
        for (key, name) in SPAN_MESH_COLUMNS {
            promoted_text.push((key, text(name)?));
        }
        let mut promoted_int = Vec::new();
        for key in SPAN_INT_COLUMNS {
            promoted_int.push((key, int(&column_of(key))?));
        }
        Ok(Columns {
            trace_id: id("trace_id")?,
            span_id: id("span_id")?,
            parent: id("parent_span_id")?,
            trace_state: text("trace_state")?,
            name: text("span_name")?,
            kind: text("span_kind")?,
            start: time("start_time")?,
            end: time("end_time")?,
            status: text("status_code")?,
            status_message: text("status_message")?,
            scope_name: text("scope_name")?,
            scope_version: text("scope_version")?,
            promoted_text,
            promoted_int,
            attributes: map("attributes")?,
            ints: map("attributes_int")?,
            doubles: map("attributes_double")?,
            bools: map("attributes_bool")?,
            bytes: map("attributes_bytes")?,
            resource: map("resource_attributes")?,
            resource_columns: RESOURCE_COLUMNS
                .iter()
                .map(|(key, name)| Ok((*key, text(name)?)))
                .collect::<Result<_, ArrowError>>()?,
            flags: int("flags")?,
            dropped_attributes: int("dropped_attributes_count")?,
            dropped_events: int("dropped_events_count")?,
            dropped_links: int("dropped_links_count")?,
            events: list("events")?,
            links: list("links")?,
        })
    }
}

/// An attribute of `key` holding `value`.
pub(crate) fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn opt_text(a: &StringArray, row: usize) -> Option<&str> {
    a.is_valid(row).then(|| a.value(row))
}

fn nanos_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn count(a: &Int64Array, row: usize) -> u32 {
    if a.is_valid(row) {
        u32::try_from(a.value(row)).unwrap_or(u32::MAX)
    } else {
        0
    }
}

/// The entries of row `row` of a `Map<Utf8, _>` as key-values of their type.
fn map_entries(map: &MapArray, row: usize, out: &mut Vec<KeyValue>) {
    if map.is_null(row) {
        return;
    }
    let offsets = map.value_offsets();
    let (lo, hi) = (offsets[row] as usize, offsets[row + 1] as usize);
    let Some(keys) = map.keys().as_string_opt::<i32>() else {
        return;
    };
    let values = map.values();
    for i in lo..hi {
        if values.is_null(i) {
            continue;
        }
        let value = if let Some(s) = values.as_string_opt::<i32>() {
            any_value::Value::StringValue(s.value(i).to_string())
        } else if let Some(n) = values.as_primitive_opt::<Int64Type>() {
            any_value::Value::IntValue(n.value(i))
        } else if let Some(d) = values.as_primitive_opt::<Float64Type>() {
            any_value::Value::DoubleValue(d.value(i))
        } else if let Some(b) = values.as_boolean_opt() {
            any_value::Value::BoolValue(b.value(i))
        } else if let Some(b) = values.as_binary_opt::<i32>() {
            any_value::Value::BytesValue(b.value(i).to_vec())
        } else {
            continue;
        };
        out.push(kv(keys.value(i), value));
    }
}

/// Attributes of a nested struct (event or link) whose `attributes` is a string map.
fn struct_attributes(items: &StructArray, i: usize) -> Vec<KeyValue> {
    let mut out = Vec::new();
    if let Some(map) = items
        .column_by_name("attributes")
        .and_then(|c| c.as_map_opt())
    {
        map_entries(map, i, &mut out);
    }
    out
}

fn struct_int(items: &StructArray, name: &str, i: usize) -> i64 {
    items
        .column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .filter(|a| a.is_valid(i))
        .map_or(0, |a| a.value(i))
}

fn kind_of(name: &str) -> i32 {
    (match name {
        "server" => span::SpanKind::Server,
        "client" => span::SpanKind::Client,
        "producer" => span::SpanKind::Producer,
        "consumer" => span::SpanKind::Consumer,
        "internal" => span::SpanKind::Internal,
        _ => span::SpanKind::Unspecified,
    }) as i32
}

fn status_of(code: &str) -> i32 {
    match code {
        "ok" => 1,
        "error" => 2,
        _ => 0,
    }
}

/// One stored span row as OTLP.
fn span_at(c: &Columns<'_>, row: usize) -> Span {
    let mut attributes = Vec::new();
    for (key, arr) in &c.promoted_text {
        if let Some(v) = opt_text(arr, row) {
            attributes.push(kv(key, any_value::Value::StringValue(v.to_string())));
        }
    }
    for (key, arr) in &c.promoted_int {
        if arr.is_valid(row) {
            attributes.push(kv(key, any_value::Value::IntValue(arr.value(row))));
        }
    }
    for map in [c.attributes, c.ints, c.doubles, c.bools, c.bytes] {
        map_entries(map, row, &mut attributes);
    }
    let mut events = Vec::new();
    if c.events.is_valid(row) {
        let list = c.events.value(row);
        if let Some(items) = list.as_struct_opt() {
            let times = items
                .column_by_name("time")
                .and_then(|t| t.as_primitive_opt::<TimestampNanosecondType>());
            let names = items
                .column_by_name("name")
                .and_then(|n| n.as_string_opt::<i32>());
            for i in 0..items.len() {
                events.push(span::Event {
                    time_unix_nano: times.map_or(0, |t| nanos_u64(t.value(i))),
                    name: names.map_or(String::new(), |n| n.value(i).to_string()),
                    attributes: struct_attributes(items, i),
                    dropped_attributes_count: u32::try_from(struct_int(
                        items,
                        "dropped_attributes_count",
                        i,
                    ))
                    .unwrap_or(0),
                });
            }
        }
    }
    let mut links = Vec::new();
    if c.links.is_valid(row) {
        let list = c.links.value(row);
        if let Some(items) = list.as_struct_opt() {
            let id = |name: &str, i: usize| {
                items
                    .column_by_name(name)
                    .and_then(|c| c.as_fixed_size_binary_opt())
                    .map_or_else(Vec::new, |a| a.value(i).to_vec())
            };
            let states = items
                .column_by_name("trace_state")
                .and_then(|n| n.as_string_opt::<i32>());
            for i in 0..items.len() {
                links.push(span::Link {
                    trace_id: id("trace_id", i),
                    span_id: id("span_id", i),
                    trace_state: states
                        .and_then(|s| opt_text(s, i))
                        .unwrap_or_default()
                        .to_string(),
                    attributes: struct_attributes(items, i),
                    dropped_attributes_count: u32::try_from(struct_int(
                        items,
                        "dropped_attributes_count",
                        i,
                    ))
                    .unwrap_or(0),
                    flags: u32::try_from(struct_int(items, "flags", i)).unwrap_or(0),
                });
            }
        }
    }
    Span {
        trace_id: c.trace_id.value(row).to_vec(),
        span_id: c.span_id.value(row).to_vec(),
        trace_state: opt_text(c.trace_state, row).unwrap_or_default().to_string(),
        parent_span_id: if c.parent.is_valid(row) {
            c.parent.value(row).to_vec()
        } else {
            Vec::new()
        },
        flags: count(c.flags, row),
        name: c.name.value(row).to_string(),
        kind: kind_of(c.kind.value(row)),
        start_time_unix_nano: nanos_u64(c.start.value(row)),
        end_time_unix_nano: nanos_u64(c.end.value(row)),
        attributes,
        dropped_attributes_count: count(c.dropped_attributes, row),
        events,
        dropped_events_count: count(c.dropped_events, row),
        links,
        dropped_links_count: count(c.dropped_links, row),
        status: Some(Status {
            message: opt_text(c.status_message, row)
                .unwrap_or_default()
                .to_string(),
            code: status_of(c.status.value(row)),
        }),
    }
}

/// What rows are grouped by: resource attributes (as text), scope name and version.
type GroupKey = (Vec<(String, String)>, String, String);

/// Stored span rows as OTLP, grouped by resource and scope (in the order first seen).
pub fn to_otlp(batches: &[RecordBatch]) -> Result<Vec<ResourceSpans>, ArrowError> {
    let mut groups: HashMap<GroupKey, usize> = HashMap::new();
    let mut out: Vec<ResourceSpans> = Vec::new();
    for batch in batches {
        let c = Columns::new(batch)?;
        for row in 0..batch.num_rows() {
            let mut resource = Vec::new();
            map_entries(c.resource, row, &mut resource);
            // First, in their usual order, those the map leaves to their columns (files
            // written before that still have them in the map).
            let mut at = 0;
            for (key, column) in &c.resource_columns {
                if let Some(v) = opt_text(column, row)
                    && !(*key == "service.name" && v == UNKNOWN_SERVICE)
                    && !resource.iter().any(|kv| kv.key == *key)
                {
                    resource.insert(at, kv(key, any_value::Value::StringValue(v.to_string())));
                    at += 1;
                }
            }
            let key_attrs: Vec<(String, String)> = resource
                .iter()
                .map(|kv| {
                    let v = kv
                        .value
                        .as_ref()
                        .map(crate::convert::any_value_text)
                        .unwrap_or_default();
                    (kv.key.clone(), v)
                })
                .collect();
            let scope_name = opt_text(c.scope_name, row).unwrap_or_default().to_string();
            let scope_version = opt_text(c.scope_version, row)
                .unwrap_or_default()
                .to_string();
            let key = (key_attrs, scope_name.clone(), scope_version.clone());
            let at = *groups.entry(key).or_insert_with(|| {
                out.push(ResourceSpans {
                    resource: Some(Resource {
                        attributes: resource,
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: scope_name,
                            version: scope_version,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                out.len() - 1
            });
            if let Some(ss) = out[at].scope_spans.first_mut() {
                ss.spans.push(span_at(&c, row));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_to_batch;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn a_span_comes_back_as_it_was_sent() {
        let attrs = vec![
            kv(
                "http.request.method",
                any_value::Value::StringValue("GET".into()),
            ),
            kv("http.response.status_code", any_value::Value::IntValue(503)),
            kv(
                "guid:x-request-id",
                any_value::Value::StringValue("r-1".into()),
            ),
            kv("retry", any_value::Value::BoolValue(true)),
            kv("ratio", any_value::Value::DoubleValue(0.25)),
            kv("blob", any_value::Value::BytesValue(vec![0, 1, 2])),
            kv("note", any_value::Value::StringValue("canary".into())),
        ];
        let span = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![1; 8],
            parent_span_id: vec![2; 8],
            trace_state: "k=v".into(),
            name: "GET /".into(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 5_000,
            attributes: attrs.clone(),
            events: vec![span::Event {
                time_unix_nano: 2_000,
                name: "retry".into(),
                attributes: vec![kv("attempt", any_value::Value::StringValue("2".into()))],
                dropped_attributes_count: 0,
            }],
            links: vec![span::Link {
                trace_id: vec![3; 16],
                span_id: vec![4; 8],
                ..Default::default()
            }],
            status: Some(Status {
                message: "boom".into(),
                code: 2,
            }),
            flags: 0x301,
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv(
                        "service.name",
                        any_value::Value::StringValue("reviews".into()),
                    )],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lib".into(),
                        version: "1".into(),
                        ..Default::default()
                    }),
                    spans: vec![span.clone()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = spans_to_batch(&req).expect("converts");
        let back = to_otlp(&[batch]).expect("reads back");
        assert_eq!(back.len(), 1);
        let got = &back[0].scope_spans[0].spans[0];
        let mut want_attrs = attrs;
        let mut got_attrs = got.attributes.clone();
        want_attrs.sort_by(|a, b| a.key.cmp(&b.key));
        got_attrs.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got_attrs, want_attrs);
        assert_eq!(
            Span {
                attributes: Vec::new(),
                ..got.clone()
            },
            Span {
                attributes: Vec::new(),
                ..span
            }
        );
        assert_eq!(
            back[0].scope_spans[0]
                .scope
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("lib")
        );
    }
}
