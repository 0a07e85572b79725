//! A service's recent failed requests, for the dashboard's service page, newest first: its
//! server spans with an error status, and the calls to it its callers' sidecars answered
//! themselves (a local reply: connect failure, no healthy upstream, timeout), which never
//! reached it. Each with what the sidecar recorded (status, response flag, its reason in
//! words, the configuration version that handled it, the caller) and its trace.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Int64Type, TimestampNanosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::jaeger::model::hex;
use crate::query::{QueryEngine, QueryError};

/// One failed request as its server span recorded it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailedRequest {
    pub trace_id: String,
    pub span_id: String,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub operation: String,
    pub version: Option<String>,
    pub status: Option<i64>,
    pub response_flags: Option<String>,
    pub message: Option<String>,
    /// The caller, when its sidecar said.
    pub caller: Option<String>,
    /// `server` (the service's own sidecar answered) or `client` (the caller's sidecar
    /// answered for it: the request never arrived).
    pub side: String,
    /// Why the sidecar answered itself (`lumen.reason`).
    pub reason: Option<String>,
    /// The xDS version of the configuration that handled it (`lumen.config.version`).
    pub config_version: Option<String>,
}

/// Span attributes the mesh's sidecars write (lumen-proxy's `span_attributes`).
const REASON: &str = "lumen.reason";
const CONFIG_VERSION: &str = "lumen.config.version";

fn timestamp(ns: i64) -> datafusion::logical_expr::Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(ns),
        Some("UTC".into()),
    ))
}

/// Up to `limit` failed requests `service` served in `[start_ns, end_ns]`, newest first.
pub async fn failed_requests(
    engine: &QueryEngine,
    service: String,
    start_ns: i64,
    end_ns: i64,
    limit: usize,
) -> Result<Vec<FailedRequest>, QueryError> {
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("spans")
                .await?
                .filter(
                    col("status_code")
                        .eq(lit("error"))
                        .and(col("start_time").gt_eq(timestamp(start_ns)))
                        .and(col("start_time").lt_eq(timestamp(end_ns)))
                        .and(
                            col("service_name")
                                .eq(lit(service.clone()))
                                .and(col("span_kind").eq(lit("server")))
                                .or(col("peer_service")
                                    .eq(lit(service))
                                    .and(col("span_kind").eq(lit("client")))
                                    .and(col("response_flags").not_eq(lit("-")))),
                        ),
                )?
                .sort(vec![col("start_time").sort(false, true)])?
                .limit(0, Some(limit))?
                .select_columns(&[
                    "trace_id",
                    "span_id",
                    "start_time",
                    "duration_ns",
                    "span_name",
                    "service_version",
                    "http_response_status_code",
                    "response_flags",
                    "status_message",
                    "peer_service",
                    "span_kind",
                    "service_name",
                    "attributes",
                ])
        })
        .await?;
    let mut out = Vec::new();
    for b in &batches {
        read(b, &mut out)?;
    }
    Ok(out)
}

fn read(b: &RecordBatch, out: &mut Vec<FailedRequest>) -> Result<(), QueryError> {
    let bad = |name: &str| QueryError::Internal(format!("spans column {name} missing"));
    let ids = |i: usize, name: &str| {
        b.column(i)
            .as_fixed_size_binary_opt()
            .ok_or_else(|| bad(name))
    };
    let (trace, span) = (ids(0, "trace_id")?, ids(1, "span_id")?);
    let start = b
        .column(2)
        .as_primitive_opt::<TimestampNanosecondType>()
        .ok_or_else(|| bad("start_time"))?;
    let int = |i: usize, name: &str| {
        b.column(i)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| bad(name))
    };
    let (duration, status) = (int(3, "duration_ns")?, int(6, "http_response_status_code")?);
    let text = |i: usize, name: &str| b.column(i).as_string_opt::<i32>().ok_or_else(|| bad(name));
    let (name, version, flags, message, caller) = (
        text(4, "span_name")?,
        text(5, "service_version")?,
        text(7, "response_flags")?,
        text(8, "status_message")?,
        text(9, "peer_service")?,
    );
    let (kind, reporter) = (text(10, "span_kind")?, text(11, "service_name")?);
    let attributes = b.column(12).as_map_opt().ok_or_else(|| bad("attributes"))?;
    let opt = |a: &datafusion::arrow::array::StringArray, i: usize| {
        (a.is_valid(i) && !a.value(i).is_empty()).then(|| a.value(i).to_string())
    };
    for i in 0..b.num_rows() {
        let server = kind.value(i) == "server";
        out.push(FailedRequest {
            trace_id: hex(trace.value(i)),
            span_id: hex(span.value(i)),
            start_ns: start.value(i),
            duration_ns: duration.value(i),
            operation: name.value(i).to_string(),
            status: status.is_valid(i).then(|| status.value(i)),
            response_flags: opt(flags, i),
            message: opt(message, i),
            // On a client span, the peer is the callee and the reporter the caller.
            caller: if server {
                opt(caller, i)
            } else {
                opt(reporter, i)
            },
            version: if server { opt(version, i) } else { None },
            side: if server { "server" } else { "client" }.to_string(),
            reason: crate::rollup::attribute(attributes, i, REASON),
            config_version: crate::rollup::attribute(attributes, i, CONFIG_VERSION),
        });
    }
    Ok(())
}

/// One trace a search found, summarised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceSummary {
    pub trace_id: String,
    pub root_service: String,
    pub root_operation: String,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub spans: usize,
    pub errors: usize,
    pub services: Vec<String>,
}

/// The traces a Jaeger-style search finds (latest first), summarised from their spans.
pub async fn find_traces(
    engine: &QueryEngine,
    search: crate::jaeger::params::Search,
) -> Result<Vec<TraceSummary>, QueryError> {
    let ids = crate::jaeger::search_ids(engine, search).await?;
    let spans = crate::jaeger::load_spans(engine, ids.clone()).await?;
    let mut out: Vec<TraceSummary> = ids
        .iter()
        .map(|id| TraceSummary {
            trace_id: hex(id),
            root_service: String::new(),
            root_operation: String::new(),
            start_ns: i64::MAX,
            duration_ns: 0,
            spans: 0,
            errors: 0,
            services: Vec::new(),
        })
        .collect();
    let mut ends = vec![i64::MIN; out.len()];
    // (has a parent, start) of each trace's root so far.
    let mut roots: Vec<Option<(bool, i64)>> = vec![None; out.len()];
    for rs in &spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            let Some(i) = ids.iter().position(|id| *id == s.trace_id) else {
                continue;
            };
            let t = &mut out[i];
            let start = i64::try_from(s.start_time_unix_nano).unwrap_or(i64::MAX);
            let end = i64::try_from(s.end_time_unix_nano).unwrap_or(i64::MAX);
            t.spans += 1;
            t.errors += usize::from(s.status.as_ref().is_some_and(|st| st.code == 2));
            if !t.services.contains(&service) {
                t.services.push(service.clone());
            }
            // The root: the earliest span without a parent; failing that, the earliest span.
            let candidate = (!s.parent_span_id.is_empty(), start);
            if roots[i].is_none_or(|best| candidate < best) {
                roots[i] = Some(candidate);
                t.root_service = service.clone();
                t.root_operation = s.name.clone();
            }
            t.start_ns = t.start_ns.min(start);
            ends[i] = ends[i].max(end);
        }
    }
    for (t, end) in out.iter_mut().zip(ends) {
        t.duration_ns = end.saturating_sub(t.start_ns).max(0);
        t.services.sort();
    }
    out.retain(|t| t.spans > 0);
    Ok(out)
}

/// Per-route RED of one service over a window, from its server spans.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteSignals {
    pub method: String,
    /// `http.route` where the app or proxy recorded one; else the path with each id-like
    /// segment (digits, long hex, a UUID) written `{id}`, so `/reviews/0` and `/reviews/7`
    /// are one route.
    pub route: String,
    pub requests: i64,
    pub errors: i64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// An id-like path segment: digits, 8+ hex digits, or a UUID; and what follows it.
const ID_SEGMENT: &str = r"/([0-9]+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27})(/|$)";

/// The `limit` busiest routes `service` served in `[start_ns, end_ns]`, busiest first.
pub async fn routes(
    engine: &QueryEngine,
    service: String,
    start_ns: i64,
    end_ns: i64,
    limit: usize,
) -> Result<Vec<RouteSignals>, QueryError> {
    use datafusion::functions::expr_fn::{coalesce, regexp_replace};
    use datafusion::functions_aggregate::expr_fn::{approx_percentile_cont, count, sum};
    use datafusion::logical_expr::{Expr, cast};

    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            // Twice, as a match takes the slash after it: `/a/1/2` needs both passes.
            let id = |e: Expr| regexp_replace(e, lit(ID_SEGMENT), lit("/{id}\\2"), Some(lit("g")));
            let route = coalesce(vec![col("http_route"), id(id(col("url_path"))), lit("/")]);
            let method = coalesce(vec![col("http_request_method"), lit("")]);
            let pct =
                |q: f64| approx_percentile_cont(col("duration_ns").sort(true, false), lit(q), None);
            ctx.table("spans")
                .await?
                .filter(
                    col("service_name")
                        .eq(lit(service))
                        .and(col("span_kind").eq(lit("server")))
                        .and(col("start_time").gt_eq(timestamp(start_ns)))
                        .and(col("start_time").lt_eq(timestamp(end_ns))),
                )?
                .aggregate(
                    vec![method.alias("method"), route.alias("route")],
                    vec![
                        count(lit(1)).alias("requests"),
                        sum(cast(
                            col("status_code").eq(lit("error")),
                            datafusion::arrow::datatypes::DataType::Int64,
                        ))
                        .alias("errors"),
                        cast(pct(0.5), datafusion::arrow::datatypes::DataType::Float64)
                            .alias("p50"),
                        cast(pct(0.95), datafusion::arrow::datatypes::DataType::Float64)
                            .alias("p95"),
                        cast(pct(0.99), datafusion::arrow::datatypes::DataType::Float64)
                            .alias("p99"),
                    ],
                )?
                .sort(vec![
                    col("requests").sort(false, true),
                    col("route").sort(true, true),
                    col("method").sort(true, true),
                ])?
                .limit(0, Some(limit))
        })
        .await?;
    let mut out = Vec::new();
    for b in &batches {
        let bad = |name: &str| QueryError::Internal(format!("routes column {name} missing"));
        let text = |name: &'static str| {
            b.column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| bad(name))
        };
        let int = |name: &'static str| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .ok_or_else(|| bad(name))
        };
        let float = |name: &'static str| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::Float64Type>())
                .ok_or_else(|| bad(name))
        };
        let (method, route, requests, errors) = (
            text("method")?,
            text("route")?,
            int("requests")?,
            int("errors")?,
        );
        let (p50, p95, p99) = (float("p50")?, float("p95")?, float("p99")?);
        let ms = |a: &datafusion::arrow::array::Float64Array, i: usize| {
            if a.is_valid(i) { a.value(i) / 1e6 } else { 0.0 }
        };
        for i in 0..b.num_rows() {
            out.push(RouteSignals {
                method: method.value(i).to_string(),
                route: route.value(i).to_string(),
                requests: requests.value(i),
                errors: if errors.is_valid(i) {
                    errors.value(i)
                } else {
                    0
                },
                p50_ms: ms(p50, i),
                p95_ms: ms(p95, i),
                p99_ms: ms(p99, i),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;

    use super::*;
    use crate::Store;
    use crate::convert::spans_to_batch;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn side(service: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service), kv("service.version", "v1")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Span `i` of kind `kind` at `t0 + i` ms lasting `ms`, with `attrs`.
    fn span(i: u8, kind: i32, t0: u64, ms: u64, error: bool, attrs: &[(&str, &str)]) -> Span {
        let start = t0 + u64::from(i) * 1_000_000;
        Span {
            trace_id: vec![i + 1; 16],
            span_id: vec![i + 1; 8],
            name: "reviews:9080/*".into(),
            kind,
            start_time_unix_nano: start,
            end_time_unix_nano: start + ms * 1_000_000,
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(Status {
                code: if error { 2 } else { 1 },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn store_with(req: ExportTraceServiceRequest) -> (tempfile::TempDir, QueryEngine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        let batch = spans_to_batch(&req).expect("converts");
        let reservation = store
            .budget()
            .try_reserve(batch.get_array_memory_size())
            .expect("room");
        store
            .ingest(0, Bytes::from(req.encode_to_vec()), batch, reservation)
            .await
            .expect("ingest");
        (dir, QueryEngine::new(store))
    }

    #[tokio::test]
    async fn routes_group_paths_by_their_shape_and_failures_say_who_answered_and_why() {
        let t0 = u64::try_from(crate::now_ns()).expect("now") - 60_000_000_000;
        let get = |path: &'static str| [("http.request.method", "GET"), ("url.path", path)];
        let mut reviews = Vec::new();
        for (i, path) in [
            "/reviews/0",
            "/reviews/17",
            "/reviews/deadbeef01",
            "/reviews/0/ratings/3",
            "/health",
        ]
        .into_iter()
        .enumerate()
        {
            let i = u8::try_from(i).expect("small");
            reviews.push(span(i, 2, t0, 10 + u64::from(i), i == 1, &get(path)));
        }
        // http.route wins over the path when the span names one.
        reviews.push(span(
            5,
            2,
            t0,
            3,
            false,
            &[
                ("http.request.method", "POST"),
                ("url.path", "/reviews/9"),
                ("http.route", "/reviews/:id"),
            ],
        ));
        // productpage's sidecar could not reach reviews: a local reply for it.
        let local = span(
            6,
            3,
            t0,
            1,
            true,
            &[
                ("peer.service", "reviews"),
                ("response_flags", "UF"),
                ("lumen.reason", "upstream connect error: connection refused"),
                ("lumen.config.version", "00000000000000aa"),
            ],
        );
        // One that reached reviews (flag "-") is reviews' own record, not repeated.
        let reached = span(
            7,
            3,
            t0,
            1,
            true,
            &[("peer.service", "reviews"), ("response_flags", "-")],
        );
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                side("reviews", reviews),
                side("productpage", vec![local, reached]),
            ],
        };
        let (_dir, engine) = store_with(req).await;
        let now = crate::now_ns();
        let found = routes(&engine, "reviews".into(), now - 3_600_000_000_000, now, 10)
            .await
            .expect("routes");
        let rows: Vec<(&str, &str, i64, i64)> = found
            .iter()
            .map(|r| (r.method.as_str(), r.route.as_str(), r.requests, r.errors))
            .collect();
        assert_eq!(
            rows,
            [
                ("GET", "/reviews/{id}", 3, 1),
                ("GET", "/health", 1, 0),
                ("POST", "/reviews/:id", 1, 0),
                ("GET", "/reviews/{id}/ratings/{id}", 1, 0),
            ]
        );
        assert!(
            found[0].p50_ms >= 10.0 && found[0].p99_ms <= 13.0,
            "{:?}",
            found[0]
        );

        let failed = failed_requests(&engine, "reviews".into(), now - 3_600_000_000_000, now, 10)
            .await
            .expect("failed");
        type Said<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let sides: Vec<Said> = failed
            .iter()
            .map(|f| {
                (
                    f.side.as_str(),
                    f.caller.as_deref(),
                    f.reason.as_deref(),
                    f.config_version.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            sides,
            [
                (
                    "client",
                    Some("productpage"),
                    Some("upstream connect error: connection refused"),
                    Some("00000000000000aa")
                ),
                ("server", None, None, None),
            ],
            "newest first: the local reply, then reviews' own 500"
        );
    }
}
