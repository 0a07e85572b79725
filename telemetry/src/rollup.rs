//! One-minute rollups of the mesh's requests: RED per service (from its server spans) and
//! per caller → callee edge: requests, errors, duration sum, a latency histogram fine enough
//! for p50/p95/p99, and bytes. Each call is counted once, where it is recorded: on the
//! callee's server span when that names its caller (`peer.service`, as the mesh's sidecars
//! write it, with the caller's version), else on the caller's client span (`peer.service`
//! names the callee): a sidecar's local reply, which never reached the callee, or a span from
//! an app outside the mesh.
//!
//! Written when spans are flushed, as the `rollups` table's file for the same WAL range, and
//! computed live over the spans memtable when queried, so a query sees every span exactly
//! once whether it is flushed or not. Rollup files are kept longer than raw spans.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    Array, ArrayAccessor, ArrayRef, AsArray, Int64Builder, ListBuilder, MapArray, PrimitiveArray,
    StringArray, StringBuilder, TimestampNanosecondBuilder,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimestampNanosecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::schema::timestamp;

/// Upper bounds (ms) of the latency histogram's buckets, Istio's; one more bucket counts
/// everything above the last.
pub const LATENCY_BOUNDS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

const MINUTE_NS: i64 = 60_000_000_000;
/// The caller's version on a mesh proxy's server span (as `lumen-proxy` writes it).
pub const SOURCE_VERSION: &str = "lumen.source.version";
/// The caller's namespace on a mesh proxy's server span.
pub const SOURCE_NAMESPACE: &str = "lumen.source.namespace";

/// The `rollups` table: one row per minute and service (`kind = 'service'`) or caller →
/// callee pair (`kind = 'edge'`).
pub static ROLLUPS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("minute", timestamp(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, true),
        Field::new("source_version", DataType::Utf8, true),
        Field::new("service", DataType::Utf8, false),
        Field::new("version", DataType::Utf8, true),
        Field::new("requests", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("duration_sum_ns", DataType::Int64, false),
        Field::new(
            "latency_buckets",
            DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
            false,
        ),
        Field::new("request_bytes", DataType::Int64, false),
        Field::new("response_bytes", DataType::Int64, false),
        // Start times of the first and last span counted, so a rate can be divided by the
        // seconds of data actually held rather than whole minutes.
        Field::new("first_ns", DataType::Int64, false),
        Field::new("last_ns", DataType::Int64, false),
        // Version 5: the namespaces of the service (the callee) and of the caller, where
        // the span tells them (a local reply does not know the callee's).
        Field::new("namespace", DataType::Utf8, true),
        Field::new("source_namespace", DataType::Utf8, true),
    ]))
});

/// Rows are written in this order: by minute, kind, then names. The names are borrowed
/// from the spans being rolled up: a span costs no allocation unless it opens a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key<'a> {
    minute: i64,
    kind: &'static str,
    source: Option<&'a str>,
    source_version: Option<&'a str>,
    service: &'a str,
    version: Option<&'a str>,
    namespace: Option<&'a str>,
    source_namespace: Option<&'a str>,
}

#[derive(Debug, Clone)]
struct Acc {
    first_ns: i64,
    last_ns: i64,
    requests: i64,
    errors: i64,
    duration_sum_ns: i64,
    buckets: [i64; LATENCY_BOUNDS_MS.len() + 1],
    request_bytes: i64,
    response_bytes: i64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            first_ns: i64::MAX,
            last_ns: i64::MIN,
            requests: 0,
            errors: 0,
            duration_sum_ns: 0,
            buckets: [0; LATENCY_BOUNDS_MS.len() + 1],
            request_bytes: 0,
            response_bytes: 0,
        }
    }
}

/// The bucket a duration falls in.
pub fn bucket(duration_ns: i64) -> usize {
    let ms = duration_ns as f64 / 1e6;
    LATENCY_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// The rollup rows of some spans batches; `None` when they hold no server or client span.
pub fn rollup(batches: &[RecordBatch]) -> Result<Option<RecordBatch>, ArrowError> {
    let mut groups: crate::FastMap<Key<'_>, Acc> = crate::FastMap::default();
    for batch in batches {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| ArrowError::SchemaError(format!("spans have no {name}")))
        };
        let strings = |name: &str| -> Result<&StringArray, ArrowError> {
            col(name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| ArrowError::SchemaError(format!("{name} is not text")))
        };
        let start = col("start_time")?
            .as_primitive_opt::<TimestampNanosecondType>()
            .ok_or_else(|| ArrowError::SchemaError("start_time".into()))?;
        let duration = col("duration_ns")?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| ArrowError::SchemaError("duration_ns".into()))?;
        let (kind, service, version, status) = (
            strings("span_kind")?,
            strings("service_name")?,
            strings("service_version")?,
            strings("status_code")?,
        );
        let map = |name: &str| -> Result<&MapArray, ArrowError> {
            col(name)?
                .as_any()
                .downcast_ref::<MapArray>()
                .ok_or_else(|| ArrowError::SchemaError(format!("{name} is not a map")))
        };
        let (attributes, ints) = (
            Entries::<StringArray>::of(map("attributes")?)?,
            Entries::<PrimitiveArray<Int64Type>>::of(map("attributes_int")?)?,
        );
        let peer = strings("peer_service")?;
        let namespace = strings("service_namespace")?;
        let flags = strings("response_flags")?;
        for row in 0..batch.num_rows() {
            let minute = start.value(row).div_euclid(MINUTE_NS) * MINUTE_NS;
            let mut keys = [None, None];
            match kind.value(row) {
                "server" => {
                    keys[0] = Some(Key {
                        minute,
                        kind: "service",
                        source: None,
                        source_version: None,
                        service: service.value(row),
                        version: text(version, row),
                        namespace: text(namespace, row),
                        source_namespace: None,
                    });
                    // A server span that names its caller is the edge's record of the call.
                    if let Some(caller) = text(peer, row) {
                        keys[1] = Some(Key {
                            minute,
                            kind: "edge",
                            source: Some(caller),
                            source_version: attributes.get(row, SOURCE_VERSION),
                            service: service.value(row),
                            version: text(version, row),
                            namespace: text(namespace, row),
                            source_namespace: attributes.get(row, SOURCE_NAMESPACE),
                        });
                    }
                }
                // A client span is the record of a call only when no server span will be:
                // a mesh proxy's local reply (a response flag other than "-": the request
                // never reached the callee), or a span from outside the mesh (no flags).
                "client" if flags.is_null(row) || flags.value(row) != "-" => {
                    if let Some(callee) = text(peer, row) {
                        keys[0] = Some(Key {
                            minute,
                            kind: "edge",
                            source: Some(service.value(row)),
                            source_version: text(version, row),
                            service: callee,
                            version: None,
                            namespace: None,
                            source_namespace: text(namespace, row),
                        });
                    }
                }
                _ => continue,
            }
            if keys.iter().all(Option::is_none) {
                continue;
            }
            // Sizes are ints by the semantic conventions; some senders write them as text.
            let size = |k| {
                ints.get(row, k)
                    .or_else(|| attributes.get(row, k).and_then(|v| v.parse::<i64>().ok()))
                    .unwrap_or(0)
            };
            let (request_bytes, response_bytes) = (
                size("http.request.body.size"),
                size("http.response.body.size"),
            );
            for key in keys.into_iter().flatten() {
                let acc = groups.entry(key).or_default();
                let d = duration.value(row);
                acc.first_ns = acc.first_ns.min(start.value(row));
                acc.last_ns = acc.last_ns.max(start.value(row));
                acc.requests += 1;
                acc.errors += i64::from(status.value(row) == "error");
                acc.duration_sum_ns = acc.duration_sum_ns.saturating_add(d);
                acc.buckets[bucket(d)] += 1;
                acc.request_bytes += request_bytes;
                acc.response_bytes += response_bytes;
            }
        }
    }
    if groups.is_empty() {
        return Ok(None);
    }
    let mut rows: Vec<(Key, Acc)> = groups.into_iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let n = rows.len();
    let mut minute = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut kind = StringBuilder::with_capacity(n, n * 8);
    let mut source = StringBuilder::with_capacity(n, n * 16);
    let mut source_version = StringBuilder::with_capacity(n, n * 4);
    let mut service = StringBuilder::with_capacity(n, n * 16);
    let mut version = StringBuilder::with_capacity(n, n * 4);
    let mut namespace = StringBuilder::with_capacity(n, n * 8);
    let mut source_namespace = StringBuilder::with_capacity(n, n * 8);
    let mut ints: Vec<Int64Builder> = (0..7).map(|_| Int64Builder::with_capacity(n)).collect();
    let mut buckets = ListBuilder::with_capacity(
        Int64Builder::with_capacity(n * (LATENCY_BOUNDS_MS.len() + 1)),
        n,
    );
    for (k, a) in &rows {
        minute.append_value(k.minute);
        kind.append_value(k.kind);
        source.append_option(k.source);
        source_version.append_option(k.source_version);
        service.append_value(k.service);
        version.append_option(k.version);
        namespace.append_option(k.namespace);
        source_namespace.append_option(k.source_namespace);
        for (b, v) in ints.iter_mut().zip([
            a.requests,
            a.errors,
            a.duration_sum_ns,
            a.request_bytes,
            a.response_bytes,
            a.first_ns,
            a.last_ns,
        ]) {
            b.append_value(v);
        }
        buckets.append_value(a.buckets.iter().map(|c| Some(*c)));
    }
    let mut ints = ints
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut next = || {
        ints.next()
            .ok_or_else(|| ArrowError::SchemaError("rollup columns".into()))
    };
    let (requests, errors, duration_sum, request_bytes, response_bytes) =
        (next()?, next()?, next()?, next()?, next()?);
    let (first_ns, last_ns) = (next()?, next()?);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(minute.finish()),
        Arc::new(kind.finish()),
        Arc::new(source.finish()),
        Arc::new(source_version.finish()),
        Arc::new(service.finish()),
        Arc::new(version.finish()),
        requests,
        errors,
        duration_sum,
        Arc::new(buckets.finish()),
        request_bytes,
        response_bytes,
        first_ns,
        last_ns,
        Arc::new(namespace.finish()),
        Arc::new(source_namespace.finish()),
    ];
    RecordBatch::try_new(ROLLUPS.clone(), columns).map(Some)
}

/// The text value of attribute `key` of row `row`, if present.
pub(crate) fn attribute(map: &MapArray, row: usize, key: &str) -> Option<String> {
    Entries::<StringArray>::of(map)
        .ok()?
        .get(row, key)
        .map(str::to_string)
}

/// Row `row` of a text column, if not null.
fn text(a: &StringArray, row: usize) -> Option<&str> {
    (!a.is_null(row)).then(|| a.value(row))
}

/// A map column's keys and values read in place: a row's entries are a range of them, found
/// by its offsets (`MapArray::value` would build a sliced struct array per call).
struct Entries<'a, V> {
    map: &'a MapArray,
    keys: &'a StringArray,
    values: &'a V,
}

impl<'a, V: Array + 'static> Entries<'a, V>
where
    &'a V: ArrayAccessor,
{
    fn of(map: &'a MapArray) -> Result<Self, ArrowError> {
        let keys = map.keys().as_string_opt::<i32>();
        let values = map.values().as_any().downcast_ref::<V>();
        match (keys, values) {
            (Some(keys), Some(values)) => Ok(Entries { map, keys, values }),
            _ => Err(ArrowError::SchemaError(format!(
                "a map of {} is not of the type expected",
                map.values().data_type()
            ))),
        }
    }

    /// The value of `key` in row `row`, if the row has it and it is not null.
    fn get(&self, row: usize, key: &str) -> Option<<&'a V as ArrayAccessor>::Item> {
        if self.map.is_null(row) {
            return None;
        }
        let offsets = self.map.value_offsets();
        let (from, to) = (offsets[row] as usize, offsets[row + 1] as usize);
        (from..to)
            .find(|&i| self.keys.value(i) == key)
            .filter(|&i| !self.values.is_null(i))
            .map(|i| ArrayAccessor::value(&self.values, i))
    }
}

/// The `q` quantile (0..1) of a latency histogram, in ms, interpolated linearly inside its
/// bucket (as Prometheus' `histogram_quantile`).
pub fn quantile_ms(buckets: &[i64], q: f64) -> f64 {
    let total: i64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0i64;
    for (i, count) in buckets.iter().enumerate() {
        if *count > 0 && (seen + count) as f64 >= rank {
            let lower = if i == 0 {
                0.0
            } else {
                LATENCY_BOUNDS_MS[i - 1]
            };
            let Some(upper) = LATENCY_BOUNDS_MS.get(i).copied() else {
                return lower;
            };
            let within = (rank - seen as f64) / *count as f64;
            return lower + (upper - lower) * within.clamp(0.0, 1.0);
        }
        seen += count;
    }
    LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_to_batch;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn span(i: u8, kind: i32, start_s: u64, ms: u64, error: bool, peer: Option<&str>) -> Span {
        Span {
            trace_id: vec![i; 16],
            span_id: vec![i; 8],
            kind,
            start_time_unix_nano: start_s * 1_000_000_000,
            end_time_unix_nano: start_s * 1_000_000_000 + ms * 1_000_000,
            attributes: peer
                .map(|p| vec![kv("peer.service", p)])
                .unwrap_or_default(),
            status: error.then(|| Status {
                code: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn server_spans_roll_up_by_service_and_client_spans_by_edge() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "reviews"), kv("service.version", "v2")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(1, 2, 60, 3, false, None),
                        span(2, 2, 61, 30, true, None),
                        span(3, 2, 125, 3, false, None),
                        span(4, 3, 62, 2, false, Some("ratings")),
                        span(5, 3, 62, 700, true, Some("ratings")),
                        span(6, 1, 62, 1, false, None),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let batch = spans_to_batch(&req).expect("converts");
        let rolled = rollup(&[batch]).expect("rolls up").expect("rows");
        assert_eq!(rolled.num_rows(), 3, "two minutes of reviews, one edge");
        let ints = |name: &str| {
            rolled
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .map(|a| a.values().to_vec())
                .expect(name)
        };
        let kinds = rolled.column(1).as_string::<i32>();
        let services = rolled.column(4).as_string::<i32>();
        // Sorted by minute, kind: minute 1 edge, minute 1 service, minute 2 service.
        assert_eq!(kinds.value(0), "edge");
        assert_eq!(services.value(0), "ratings");
        assert_eq!(rolled.column(2).as_string::<i32>().value(0), "reviews");
        assert_eq!(ints("requests"), vec![2, 2, 1]);
        assert_eq!(ints("errors"), vec![1, 1, 0]);
        assert_eq!(rolled.column(5).as_string::<i32>().value(1), "v2");
        let buckets = rolled.column(9).as_list::<i32>();
        let first = buckets.value(0);
        let edge: Vec<i64> = first.as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(edge[bucket(2_000_000)], 1);
        assert_eq!(edge[bucket(700_000_000)], 1);
    }

    #[test]
    fn mesh_calls_are_counted_once_on_the_server_span_that_names_its_caller() {
        let with = |mut s: Span, attrs: &[(&str, &str)]| {
            s.attributes.extend(attrs.iter().map(|(k, v)| kv(k, v)));
            s
        };
        let side = |service: &str, version: &str, spans: Vec<Span>| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", service),
                    kv("service.version", version),
                    kv(
                        "service.namespace",
                        if service == "ratings" { "data" } else { "web" },
                    ),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                // reviews v2's sidecar: two calls to ratings, one a local reply (UF).
                side(
                    "reviews",
                    "v2",
                    vec![
                        with(
                            span(1, 3, 60, 3, false, Some("ratings")),
                            &[("response_flags", "-")],
                        ),
                        with(
                            span(2, 3, 60, 1, true, Some("ratings")),
                            &[("response_flags", "UF")],
                        ),
                    ],
                ),
                // ratings' sidecar: the call that arrived, naming its caller.
                side(
                    "ratings",
                    "v1",
                    vec![with(
                        span(3, 2, 60, 2, false, Some("reviews")),
                        &[
                            ("response_flags", "-"),
                            (SOURCE_VERSION, "v2"),
                            (SOURCE_NAMESPACE, "web"),
                        ],
                    )],
                ),
            ],
        };
        let batch = spans_to_batch(&req).expect("converts");
        let rolled = rollup(&[batch]).expect("rolls up").expect("rows");
        let text = |i: usize, row: usize| {
            let c = rolled.column(i).as_string::<i32>();
            (!c.is_null(row)).then(|| c.value(row).to_string())
        };
        let requests = rolled
            .column_by_name("requests")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .map(|a| a.values().to_vec())
            .expect("requests");
        let edges: Vec<_> = (0..rolled.num_rows())
            .filter(|&r| text(1, r).as_deref() == Some("edge"))
            .map(|r| (text(2, r), text(3, r), text(4, r), text(5, r), requests[r]))
            .collect();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            edges,
            vec![
                (some("reviews"), some("v2"), some("ratings"), None, 1),
                (some("reviews"), some("v2"), some("ratings"), some("v1"), 1),
            ],
            "the local reply from the client side, the call that arrived from the server side"
        );
        // Namespaces: the callee's where its span says it, the caller's on both records.
        let ns: Vec<_> = (0..rolled.num_rows())
            .map(|r| (text(1, r), text(14, r), text(15, r)))
            .collect();
        assert_eq!(
            ns,
            vec![
                (some("edge"), None, some("web")),
                (some("edge"), some("data"), some("web")),
                (some("service"), some("data"), None),
            ]
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut buckets = vec![0i64; LATENCY_BOUNDS_MS.len() + 1];
        buckets[bucket(3_000_000)] = 50; // (1, 5] ms
        buckets[bucket(40_000_000)] = 50; // (25, 50] ms
        assert!((quantile_ms(&buckets, 0.5) - 5.0).abs() < 1e-9);
        assert!((quantile_ms(&buckets, 0.25) - 3.0).abs() < 1e-9);
        assert!((quantile_ms(&buckets, 0.99) - 49.5).abs() < 1e-9);
        assert_eq!(quantile_ms(&[0; 20], 0.5), 0.0);
    }
}
