//! A pass over OTLP protobuf bytes before decoding them: how much memory will decoding take?
//!
//! Protobuf amplifies: an empty log record is 2 bytes on the wire and a few hundred bytes as a
//! decoded struct, so a 4 MiB request of empty records would decode into half a gigabyte
//! before any other check could run. This walk reads only tags and lengths, follows the
//! nested messages OTLP repeats (resources, scopes, metrics, log records, attributes, data
//! points) and adds up the size of each decoded struct plus the bytes strings and packed
//! numbers copy, so the receiver can reserve that much, or refuse, before it decodes. (Trace exports are not
//! decoded into prost's messages: `convert::spans` reads them straight into rows.)

use std::mem::size_of;

use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    Exemplar, ExponentialHistogramDataPoint, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, SummaryDataPoint, exponential_histogram_data_point,
    summary_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// Deepest nesting followed (prost's own recursion limit is 100).
const MAX_DEPTH: usize = 64;

/// What a length-delimited field decodes into.
#[derive(Debug, Clone, Copy)]
enum Field {
    /// A nested message of this shape, taking this many bytes as a struct.
    Message(&'static Shape, usize),
    /// Packed varints: up to 8 bytes decoded per byte on the wire.
    PackedVarint,
}

/// The fields of a message worth following; any other field costs its wire length.
#[derive(Debug)]
pub struct Shape(&'static [(u32, Field)]);

/// Why the walk stopped: the bytes are not well-formed protobuf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf at byte {offset}: {what}")]
pub struct WireError {
    pub offset: usize,
    pub what: &'static str,
}

const fn msg(shape: &'static Shape, size: usize) -> Field {
    Field::Message(shape, size)
}

static ANY_VALUE: Shape = Shape(&[
    (5, msg(&ARRAY_VALUE, size_of::<ArrayValue>())),
    (6, msg(&KV_LIST, size_of::<KeyValueList>())),
]);
static ARRAY_VALUE: Shape = Shape(&[(1, msg(&ANY_VALUE, size_of::<AnyValue>()))]);
static KV_LIST: Shape = Shape(&[(1, msg(&KEY_VALUE, size_of::<KeyValue>()))]);
static KEY_VALUE: Shape = Shape(&[(2, msg(&ANY_VALUE, size_of::<AnyValue>()))]);
const KV: Field = msg(&KEY_VALUE, size_of::<KeyValue>());
static ATTRIBUTES_AT_1: Shape = Shape(&[(1, KV)]);
static ATTRIBUTES_AT_3: Shape = Shape(&[(3, KV)]);
const RESOURCE: Field = msg(&ATTRIBUTES_AT_1, size_of::<Resource>());
const SCOPE: Field = msg(&ATTRIBUTES_AT_3, size_of::<InstrumentationScope>());

/// `ExportMetricsServiceRequest`.
pub static METRICS: Shape = Shape(&[(1, msg(&RESOURCE_METRICS, size_of::<ResourceMetrics>()))]);
static RESOURCE_METRICS: Shape = Shape(&[
    (1, RESOURCE),
    (2, msg(&SCOPE_METRICS, size_of::<ScopeMetrics>())),
]);
static SCOPE_METRICS: Shape = Shape(&[(1, SCOPE), (2, msg(&METRIC, size_of::<Metric>()))]);
static METRIC: Shape = Shape(&[
    (5, msg(&NUMBER_POINTS, 0)),
    (7, msg(&NUMBER_POINTS, 0)),
    (9, msg(&HISTOGRAM_POINTS, 0)),
    (10, msg(&EXP_HISTOGRAM_POINTS, 0)),
    (11, msg(&SUMMARY_POINTS, 0)),
    (12, KV),
]);
static NUMBER_POINTS: Shape = Shape(&[(1, msg(&NUMBER_POINT, size_of::<NumberDataPoint>()))]);
static NUMBER_POINT: Shape = Shape(&[(7, KV), (5, msg(&EXEMPLAR, size_of::<Exemplar>()))]);
static EXEMPLAR: Shape = Shape(&[(7, KV)]);
static HISTOGRAM_POINTS: Shape =
    Shape(&[(1, msg(&HISTOGRAM_POINT, size_of::<HistogramDataPoint>()))]);
static HISTOGRAM_POINT: Shape = Shape(&[(9, KV), (8, msg(&EXEMPLAR, size_of::<Exemplar>()))]);
static EXP_HISTOGRAM_POINTS: Shape = Shape(&[(
    1,
    msg(
        &EXP_HISTOGRAM_POINT,
        size_of::<ExponentialHistogramDataPoint>(),
    ),
)]);
static EXP_HISTOGRAM_POINT: Shape = Shape(&[
    (1, KV),
    (
        8,
        msg(
            &BUCKETS,
            size_of::<exponential_histogram_data_point::Buckets>(),
        ),
    ),
    (
        9,
        msg(
            &BUCKETS,
            size_of::<exponential_histogram_data_point::Buckets>(),
        ),
    ),
    (11, msg(&EXEMPLAR, size_of::<Exemplar>())),
]);
static BUCKETS: Shape = Shape(&[(2, Field::PackedVarint)]);
static SUMMARY_POINTS: Shape = Shape(&[(1, msg(&SUMMARY_POINT, size_of::<SummaryDataPoint>()))]);
static SUMMARY_POINT: Shape = Shape(&[
    (7, KV),
    (
        6,
        msg(&EMPTY, size_of::<summary_data_point::ValueAtQuantile>()),
    ),
]);
static EMPTY: Shape = Shape(&[]);

/// `ExportLogsServiceRequest`.
pub static LOGS: Shape = Shape(&[(1, msg(&RESOURCE_LOGS, size_of::<ResourceLogs>()))]);
static RESOURCE_LOGS: Shape =
    Shape(&[(1, RESOURCE), (2, msg(&SCOPE_LOGS, size_of::<ScopeLogs>()))]);
static SCOPE_LOGS: Shape = Shape(&[(1, SCOPE), (2, msg(&LOG_RECORD, size_of::<LogRecord>()))]);
static LOG_RECORD: Shape = Shape(&[(5, msg(&ANY_VALUE, size_of::<AnyValue>())), (6, KV)]);

/// Bytes that decoding `buf` as a message of `shape` will allocate, at most (struct sizes of
/// every followed message, plus what strings, bytes and packed fields copy).
pub fn decoded_size(buf: &[u8], shape: &Shape) -> Result<usize, WireError> {
    walk(buf, 0, shape, 0)
}

fn walk(buf: &[u8], base: usize, shape: &Shape, depth: usize) -> Result<usize, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError {
            offset: base,
            what: "nested too deep",
        });
    }
    let mut total = 0usize;
    let mut at = 0usize;
    while at < buf.len() {
        let tag = varint(buf, &mut at, base)?;
        let field = u32::try_from(tag >> 3).unwrap_or(u32::MAX);
        match tag & 7 {
            0 => {
                varint(buf, &mut at, base)?;
            }
            1 => at = skip(buf, at, 8, base)?,
            5 => at = skip(buf, at, 4, base)?,
            2 => {
                let len = usize::try_from(varint(buf, &mut at, base)?).unwrap_or(usize::MAX);
                let end = skip(buf, at, len, base)?;
                let body = &buf[at..end];
                let cost = match shape.0.iter().find(|(f, _)| *f == field) {
                    Some((_, Field::Message(inner, size))) => {
                        size.saturating_add(walk(body, base + at, inner, depth + 1)?)
                    }
                    Some((_, Field::PackedVarint)) => len.saturating_mul(8),
                    None => len,
                };
                total = total.saturating_add(cost);
                at = end;
            }
            _ => {
                return Err(WireError {
                    offset: base + at,
                    what: "group or unknown wire type",
                });
            }
        }
    }
    Ok(total)
}

#[inline]
pub(crate) fn skip(buf: &[u8], at: usize, n: usize, base: usize) -> Result<usize, WireError> {
    at.checked_add(n)
        .filter(|&end| end <= buf.len())
        .ok_or(WireError {
            offset: base + at,
            what: "field runs past the end",
        })
}

#[inline]
pub(crate) fn varint(buf: &[u8], at: &mut usize, base: usize) -> Result<u64, WireError> {
    // Most varints on the wire (tags, lengths of short fields, small counts) are one byte:
    // read where they are met, the rest out of line.
    if let Some(&byte) = buf.get(*at)
        && byte < 0x80
    {
        *at += 1;
        return Ok(u64::from(byte));
    }
    long_varint(buf, at, base)
}

#[inline(never)]
fn long_varint(buf: &[u8], at: &mut usize, base: usize) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = buf.get(*at) else {
            return Err(WireError {
                offset: base + *at,
                what: "truncated varint",
            });
        };
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError {
        offset: base + *at,
        what: "varint longer than 10 bytes",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use prost::Message;

    use crate::readback::kv;

    fn logs(resource: Option<Resource>, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource,
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn empty_records_cost_their_struct_size_not_their_wire_size() {
        let n = 20_000;
        let bytes = logs(None, vec![LogRecord::default(); n]).encode_to_vec();
        assert!(bytes.len() < 3 * n, "2 bytes a record on the wire");
        let decoded = decoded_size(&bytes, &LOGS).expect("walks");
        assert!(decoded >= n * size_of::<LogRecord>(), "{decoded}");
        assert!(
            decoded < n * (size_of::<LogRecord>() + 8) + 1024,
            "{decoded}"
        );
    }

    #[test]
    fn attributes_nested_values_and_strings_are_counted() {
        let nested = any_value::Value::ArrayValue(ArrayValue {
            values: vec![
                AnyValue {
                    value: Some(any_value::Value::StringValue("x".repeat(100))),
                };
                10
            ],
        });
        let resource = Resource {
            attributes: vec![kv(
                "service.name",
                any_value::Value::StringValue("a".into()),
            )],
            ..Default::default()
        };
        let record = LogRecord {
            attributes: vec![kv("list", nested)],
            ..Default::default()
        };
        let bytes = logs(Some(resource), vec![record]).encode_to_vec();
        let decoded = decoded_size(&bytes, &LOGS).expect("walks");
        let floor =
            size_of::<LogRecord>() + 2 * size_of::<KeyValue>() + 11 * size_of::<AnyValue>() + 1000;
        assert!(decoded >= floor, "{decoded} < {floor}");
    }

    #[test]
    fn malformed_bytes_are_refused_not_walked() {
        for bad in [
            &[0x0a, 0xff, 0xff][..],
            &[0x0f, 0x01][..],
            &[0x0a, 0x05, 0x01][..],
            &[0x80; 11][..],
        ] {
            assert!(decoded_size(bad, &LOGS).is_err(), "{bad:?}");
        }
        // Nesting past the limit: array values inside array values.
        let mut value = AnyValue::default();
        for _ in 0..100 {
            value = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![value],
                })),
            };
        }
        let bytes = value.encode_to_vec();
        let err = decoded_size(&bytes, &ANY_VALUE).expect_err("too deep");
        assert_eq!(err.what, "nested too deep");
    }
}
