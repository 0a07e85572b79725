//! Jaeger's query API (v1, HTTP JSON), what Jaeger UI and Grafana's Jaeger data source call,
//! on the telemetry HTTP port (16686, Jaeger's own): `/api/services`,
//! `/api/services/{service}/operations`, `/api/operations`, `/api/traces`,
//! `/api/traces/{id}` and `/api/dependencies`, answered in Jaeger's
//! `{data, total, limit, offset, errors}` envelope; and api_v3 over HTTP (`v3`). Spans are read back from the store as
//! OTLP (`crate::readback`) and rendered as Jaeger's UI model (`model`); every query goes
//! through the [`QueryEngine`] and its limits, built as DataFusion plans (no SQL text, so no
//! parameter can change a query's shape).

pub mod grpc;
pub mod model;
pub mod params;
pub mod v3;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions_aggregate::expr_fn::{max, sum};
use datafusion::logical_expr::{Expr, col, lit};
use datafusion::prelude::SessionContext;
use serde::Serialize;
use serde_json::{Value, json};

use self::params::{BadParam, Search};
use crate::query::{QueryEngine, QueryError};

/// Routes of Jaeger's API, to be merged into the HTTP router.
pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route(
            "/api/services/{service}/operations",
            get(service_operations),
        )
        .route("/api/operations", get(operations))
        .route("/api/traces", get(find_traces))
        .route("/api/traces/{id}", get(get_trace))
        .route("/api/dependencies", get(dependencies))
        .with_state(engine.clone())
        .merge(v3::router(engine))
}

/// Jaeger's response envelope.
#[derive(Debug, Serialize)]
struct Envelope<T: Serialize> {
    data: T,
    total: usize,
    limit: usize,
    offset: usize,
    errors: Option<Vec<Value>>,
}

/// A list answer; `total` is its length for services and operations (Jaeger leaves it 0 for
/// traces and dependencies).
fn ok<T: Serialize>(data: Vec<T>) -> Response {
    let total = data.len();
    respond(data, total)
}

fn ok_untotalled<T: Serialize>(data: Vec<T>) -> Response {
    respond(data, 0)
}

fn respond<T: Serialize>(data: Vec<T>, total: usize) -> Response {
    let body = Envelope {
        data,
        total,
        limit: 0,
        offset: 0,
        errors: None,
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

/// An error in Jaeger's envelope: `{"data": null, ..., "errors": [{"code", "msg"}]}`.
fn fail(status: StatusCode, msg: impl Into<String>) -> Response {
    let body = json!({
        "data": null, "total": 0, "limit": 0, "offset": 0,
        "errors": [{ "code": status.as_u16(), "msg": msg.into() }],
    });
    (status, axum::Json(body)).into_response()
}

impl From<BadParam> for Response {
    fn from(e: BadParam) -> Response {
        fail(StatusCode::BAD_REQUEST, e.0)
    }
}

/// A store or engine failure. The plans are Lumen's own, so even what DataFusion calls a
/// planning error is the server's fault here.
fn query_failed(e: QueryError) -> Response {
    let status =
        StatusCode::from_u16(e.status_of_own_plan()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %e, "Jaeger API query failed");
    }
    let mut resp = fail(status, e.to_string());
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

fn strings(batches: &[RecordBatch], column: usize) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        if let Some(a) = b.column(column).as_string_opt::<i32>() {
            out.extend(
                (0..a.len())
                    .filter(|&i| a.is_valid(i))
                    .map(|i| a.value(i).to_string()),
            );
        }
    }
    out
}

pub(crate) async fn distinct_services(engine: &QueryEngine) -> Result<Vec<String>, QueryError> {
    let batches = engine
        .frame(|ctx: SessionContext| async move {
            ctx.table("spans")
                .await?
                .aggregate(vec![col("service_name")], vec![])?
                .sort(vec![col("service_name").sort(true, false)])
        })
        .await?;
    Ok(strings(&batches, 0))
}

async fn services(State(engine): State<QueryEngine>) -> Response {
    match distinct_services(&engine).await {
        Ok(list) => ok(list),
        Err(e) => query_failed(e),
    }
}

/// 404 when `service` has no spans at all (an empty answer for a known service is 200).
async fn unknown_service(engine: &QueryEngine, service: &str) -> Option<Response> {
    match distinct_services(engine).await {
        Ok(list) if list.iter().any(|s| s == service) => None,
        Ok(_) => Some(fail(
            StatusCode::NOT_FOUND,
            format!("service {service:?} has no spans in the store"),
        )),
        Err(e) => Some(query_failed(e)),
    }
}

/// Distinct (name, kind) of a service's spans, sorted.
pub(crate) async fn operations_of(
    engine: &QueryEngine,
    service: String,
    kind: Option<String>,
) -> Result<Vec<(String, String)>, QueryError> {
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            let mut filter = col("service_name").eq(lit(service));
            if let Some(kind) = kind {
                filter = filter.and(col("span_kind").eq(lit(kind)));
            }
            ctx.table("spans")
                .await?
                .filter(filter)?
                .aggregate(vec![col("span_name"), col("span_kind")], vec![])?
                .sort(vec![
                    col("span_name").sort(true, false),
                    col("span_kind").sort(true, false),
                ])
        })
        .await?;
    Ok(strings(&batches, 0)
        .into_iter()
        .zip(strings(&batches, 1))
        .collect())
}

async fn service_operations(
    State(engine): State<QueryEngine>,
    Path(service): Path<String>,
) -> Response {
    match operations_of(&engine, service.clone(), None).await {
        Ok(ops) if ops.is_empty() => unknown_service(&engine, &service)
            .await
            .unwrap_or_else(|| ok(Vec::<String>::new())),
        Ok(ops) => {
            let mut names: Vec<String> = ops.into_iter().map(|(n, _)| n).collect();
            names.dedup();
            ok(names)
        }
        Err(e) => query_failed(e),
    }
}

pub(crate) const SPAN_KINDS: [&str; 5] = ["server", "client", "producer", "consumer", "internal"];

async fn operations(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let pairs = params::pairs(query.as_deref());
    let get = |k: &str| params::one(&pairs, k).map(str::to_string);
    let Some(service) = get("service") else {
        return fail(StatusCode::BAD_REQUEST, "parameter 'service' is required");
    };
    let kind = get("spanKind");
    if let Some(k) = &kind
        && !SPAN_KINDS.contains(&k.as_str())
    {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("malformed parameter spanKind: {k:?} is not one of {SPAN_KINDS:?}"),
        );
    }
    match operations_of(&engine, service.clone(), kind).await {
        Ok(ops) if ops.is_empty() => unknown_service(&engine, &service)
            .await
            .unwrap_or_else(|| ok(Vec::<Value>::new())),
        Ok(ops) => ok(ops
            .into_iter()
            .map(|(name, kind)| json!({ "name": name, "spanKind": kind }))
            .collect()),
        Err(e) => query_failed(e),
    }
}

fn id_literal(id: &[u8]) -> Expr {
    lit(ScalarValue::FixedSizeBinary(
        i32::try_from(id.len()).unwrap_or(16),
        Some(id.to_vec()),
    ))
}

/// Every span of the given traces, read back as OTLP (in start order).
pub(crate) async fn load_spans(
    engine: &QueryEngine,
    ids: Vec<Vec<u8>>,
) -> Result<Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>, QueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<Expr> = ids.iter().map(|id| id_literal(id)).collect();
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("spans")
                .await?
                .filter(col("trace_id").in_list(list, false))?
                .sort(vec![col("start_time").sort(true, false)])
        })
        .await?;
    crate::readback::to_otlp(&batches)
        .map_err(|e| QueryError::Internal(format!("reading spans back: {e}")))
}

/// Every span of the given traces, rendered; traces in the order of `ids`.
async fn load_traces(
    engine: &QueryEngine,
    ids: Vec<Vec<u8>>,
) -> Result<Vec<model::Trace>, QueryError> {
    let otlp = load_spans(engine, ids.clone()).await?;
    let mut traces = model::traces(&otlp);
    let order = |t: &model::Trace| {
        ids.iter()
            .position(|id| model::trace_hex(id) == t.trace_id)
            .unwrap_or(usize::MAX)
    };
    traces.sort_by_key(order);
    Ok(traces)
}

async fn get_trace(State(engine): State<QueryEngine>, Path(id): Path<String>) -> Response {
    let id = match params::trace_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into(),
    };
    match load_traces(&engine, vec![id.to_vec()]).await {
        Ok(traces) if traces.is_empty() => fail(StatusCode::NOT_FOUND, "trace not found"),
        Ok(traces) => ok_untotalled(traces),
        Err(e) => query_failed(e),
    }
}

/// A tag filter: the span carries `key` = `value` as an attribute of any type, a promoted
/// column, or a resource attribute; `error`, `span.kind` and `otel.status_code` mean what
/// Jaeger's own translation made of the span's kind and status.
fn tag_filter(key: &str, value: &str) -> Expr {
    match key {
        "error" => {
            let is_error = col("status_code").eq(lit("error"));
            return if value == "true" {
                is_error
            } else {
                datafusion::logical_expr::not(is_error)
            };
        }
        "span.kind" => return col("span_kind").eq(lit(value.to_ascii_lowercase())),
        "otel.status_code" => return col("status_code").eq(lit(value.to_ascii_lowercase())),
        _ => {}
    }
    let text = lit(value.to_string());
    let mut any = get_field(col("attributes"), key)
        .eq(text.clone())
        .or(get_field(col("resource_attributes"), key).eq(text.clone()));
    if crate::convert::SPAN_STRING_COLUMNS.contains(&key) {
        any = any.or(col(key.replace('.', "_")).eq(text.clone()));
    }
    if let Some((_, column)) = crate::convert::SPAN_MESH_COLUMNS
        .iter()
        .chain(&crate::convert::RESOURCE_COLUMNS)
        .find(|(k, _)| *k == key)
    {
        any = any.or(col(*column).eq(text));
    }
    if let Ok(i) = value.parse::<i64>() {
        any = any.or(get_field(col("attributes_int"), key).eq(lit(i)));
        if crate::convert::SPAN_INT_COLUMNS.contains(&key) {
            any = any.or(col(key.replace('.', "_")).eq(lit(i)));
        }
    }
    if let Ok(d) = value.parse::<f64>() {
        any = any.or(get_field(col("attributes_double"), key).eq(lit(d)));
    }
    if let Ok(b) = value.parse::<bool>() {
        any = any.or(get_field(col("attributes_bool"), key).eq(lit(b)));
    }
    // A missing key makes the comparisons null: a span without it does not match.
    any.is_true()
}

fn timestamp(ns: i64) -> Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(ns),
        Some("UTC".into()),
    ))
}

/// The trace ids a search matches, most recent first (by their latest matching span).
pub(crate) async fn search_ids(
    engine: &QueryEngine,
    s: Search,
) -> Result<Vec<Vec<u8>>, QueryError> {
    let mut filter = col("service_name")
        .eq(lit(s.service))
        .and(col("start_time").gt_eq(timestamp(s.start_ns)))
        .and(col("start_time").lt_eq(timestamp(s.end_ns)));
    if let Some(op) = s.operation {
        filter = filter.and(col("span_name").eq(lit(op)));
    }
    if let Some(min) = s.min_duration_ns {
        filter = filter.and(col("duration_ns").gt_eq(lit(min)));
    }
    if let Some(max) = s.max_duration_ns {
        filter = filter.and(col("duration_ns").lt_eq(lit(max)));
    }
    for (k, v) in &s.tags {
        filter = filter.and(tag_filter(k, v));
    }
    let limit = s.limit;
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("spans")
                .await?
                .filter(filter)?
                .aggregate(
                    vec![col("trace_id")],
                    vec![max(col("start_time")).alias("latest")],
                )?
                .sort(vec![col("latest").sort(false, true)])?
                .limit(0, Some(limit))
        })
        .await?;
    let mut ids = Vec::new();
    for b in &batches {
        if let Some(a) = b.column(0).as_fixed_size_binary_opt() {
            ids.extend((0..a.len()).map(|i| a.value(i).to_vec()));
        }
    }
    Ok(ids)
}

async fn find_traces(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let pairs = params::pairs(query.as_deref());
    // Jaeger UI's "search by trace id" sends traceID=... instead of a search.
    let by_id: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "traceID")
        .map(|(_, v)| v.as_str())
        .collect();
    let ids = if by_id.is_empty() {
        let search = match params::search(&pairs, crate::now_ns()) {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        let service = search.service.clone();
        match search_ids(&engine, search).await {
            Ok(ids) if ids.is_empty() => {
                return unknown_service(&engine, &service)
                    .await
                    .unwrap_or_else(|| ok_untotalled(Vec::<model::Trace>::new()));
            }
            Ok(ids) => ids,
            Err(e) => return query_failed(e),
        }
    } else {
        let mut ids = Vec::new();
        for id in by_id {
            match params::trace_id(id) {
                Ok(id) => ids.push(id.to_vec()),
                Err(e) => return e.into(),
            }
        }
        ids
    };
    match load_traces(&engine, ids).await {
        Ok(traces) => ok_untotalled(traces),
        Err(e) => query_failed(e),
    }
}

/// Caller → callee call counts over a window, from the rollups (no scan of raw spans).
async fn dependencies(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let pairs = params::pairs(query.as_deref());
    let get = |k: &str| params::one(&pairs, k).map(str::to_string);
    let end_ns = match get("endTs")
        .map(|v| params::millis_param("endTs", &v))
        .transpose()
    {
        Ok(v) => v.unwrap_or_else(crate::now_ns),
        Err(e) => return e.into(),
    };
    let lookback = match get("lookback")
        .map(|v| params::millis_param("lookback", &v))
        .transpose()
    {
        Ok(v) => v.unwrap_or(24 * 3600 * 1_000_000_000),
        Err(e) => return e.into(),
    };
    let start_ns = end_ns.saturating_sub(lookback);
    match dependency_counts(&engine, start_ns, end_ns).await {
        Ok(counts) => ok_untotalled(
            counts
                .into_iter()
                .map(|(parent, child, calls)| {
                    json!({ "parent": parent, "child": child, "callCount": calls })
                })
                .collect(),
        ),
        Err(e) => query_failed(e),
    }
}

/// (caller, callee, calls) over a window, from the rollups' edges.
pub(crate) async fn dependency_counts(
    engine: &QueryEngine,
    start_ns: i64,
    end_ns: i64,
) -> Result<Vec<(String, String, i64)>, QueryError> {
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("rollups")
                .await?
                .filter(
                    col("kind")
                        .eq(lit("edge"))
                        .and(col("minute").gt_eq(timestamp(start_ns)))
                        .and(col("minute").lt_eq(timestamp(end_ns))),
                )?
                .aggregate(
                    vec![col("source"), col("service")],
                    vec![sum(col("requests")).alias("calls")],
                )?
                .sort(vec![
                    col("source").sort(true, false),
                    col("service").sort(true, false),
                ])
        })
        .await?;
    let mut deps = Vec::new();
    for b in &batches {
        let (Some(parent), Some(child)) = (
            b.column(0).as_string_opt::<i32>(),
            b.column(1).as_string_opt::<i32>(),
        ) else {
            continue;
        };
        let calls = b.column(2).as_primitive_opt::<Int64Type>();
        for i in 0..b.num_rows() {
            if parent.is_null(i) || child.is_null(i) {
                continue;
            }
            deps.push((
                parent.value(i).to_string(),
                child.value(i).to_string(),
                calls.map_or(0, |c| c.value(i)),
            ));
        }
    }
    Ok(deps)
}
