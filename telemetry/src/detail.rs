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
