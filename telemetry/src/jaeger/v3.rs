//! Jaeger's api_v3 over HTTP (what Jaeger v2's HTTP gateway answers): `/api/v3/services`,
//! `/api/v3/operations`, `/api/v3/traces` and `/api/v3/traces/{trace_id}`, with traces as
//! OTLP JSON (`{"result": {"resourceSpans": [...]}}`) written the way protobuf's JSON
//! mapping writes them: fields at their default value left out, 64-bit integers as strings,
//! ids as hex. Errors are `{"error": {"httpCode", "message"}}`.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::params::{self, BadParam, Search};
use super::{SPAN_KINDS, distinct_services, load_spans, operations_of, search_ids};
use crate::query::{QueryEngine, QueryError};

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v3/services", get(services))
        .route("/api/v3/operations", get(operations))
        .route("/api/v3/traces", get(find_traces))
        .route("/api/v3/traces/{id}", get(get_trace))
        .with_state(engine)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response()
}

fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    json_response(
        status,
        &json!({ "error": { "httpCode": status.as_u16(), "message": message.into() } }),
    )
}

fn bad(e: BadParam) -> Response {
    fail(StatusCode::BAD_REQUEST, e.0)
}

fn failed(e: QueryError) -> Response {
    let status =
        StatusCode::from_u16(e.status_of_own_plan()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %e, "Jaeger api_v3 query failed");
    }
    fail(status, e.to_string())
}

/// Drops what protobuf's JSON mapping leaves out: scalars at their default value and empty
/// lists. Messages that are set stay, even when empty (`"resource": {}`).
fn prune(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, field| {
                prune(field);
                !matches!(field, Value::Null | Value::Bool(false))
                    && field.as_str() != Some("")
                    && field.as_str() != Some("0")
                    && field.as_i64() != Some(0)
                    && field.as_f64() != Some(0.0)
                    && field.as_array().is_none_or(|a| !a.is_empty())
            });
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// Spans as Jaeger v2's HTTP API v3 answers them: `{"result": {"resourceSpans": [...]}}` in
/// OTLP JSON, default values left out as protobuf's JSON mapping does.
pub fn otlp_json(resource_spans: &[opentelemetry_proto::tonic::trace::v1::ResourceSpans]) -> Value {
    let mut body = json!({ "result": { "resourceSpans": resource_spans } });
    prune(&mut body);
    // An empty result still says so.
    if body["result"].get("resourceSpans").is_none() {
        body["result"]["resourceSpans"] = json!([]);
    }
    body
}

fn otlp_result(
    resource_spans: Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>,
) -> Response {
    json_response(StatusCode::OK, &otlp_json(&resource_spans))
}

async fn services(State(engine): State<QueryEngine>) -> Response {
    match distinct_services(&engine).await {
        Ok(list) => json_response(StatusCode::OK, &json!({ "services": list })),
        Err(e) => failed(e),
    }
}

async fn operations(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let pairs = params::pairs(query.as_deref());
    let get = |k: &str| params::one(&pairs, k).map(str::to_string);
    let Some(service) = get("service") else {
        return fail(StatusCode::BAD_REQUEST, "parameter 'service' is required");
    };
    let kind = get("span_kind").or_else(|| get("spanKind"));
    if let Some(k) = &kind
        && !SPAN_KINDS.contains(&k.as_str())
    {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("malformed parameter span_kind: {k:?} is not one of {SPAN_KINDS:?}"),
        );
    }
    match operations_of(&engine, service, kind).await {
        Ok(ops) => json_response(
            StatusCode::OK,
            &json!({ "operations": ops.into_iter()
                .map(|(name, kind)| json!({ "name": name, "spanKind": kind }))
                .collect::<Vec<_>>() }),
        ),
        Err(e) => failed(e),
    }
}

/// An RFC 3339 time (`2017-01-26T16:46:31.639875Z`) in ns since the epoch.
fn rfc3339(param: &str, text: &str) -> Result<i64, BadParam> {
    params::rfc3339_ns(text).ok_or_else(|| {
        BadParam(format!(
            "malformed parameter {param}: {text:?} is not an RFC 3339 time between 1970 and 2262"
        ))
    })
}

/// `query.*` parameters of a v3 search as the v1 [`Search`].
fn search(pairs: &[(String, String)], now_ns: i64) -> Result<Search, BadParam> {
    let get = |k: &str| params::one(pairs, k);
    let service = get("query.service_name")
        .ok_or_else(|| BadParam("parameter 'query.service_name' is required".into()))?
        .to_string();
    let time = |name| get(name).map(|v| rfc3339(name, v)).transpose();
    let (start_ns, end_ns) = params::window(
        ("query.start_time_min", time("query.start_time_min")?),
        ("query.start_time_max", time("query.start_time_max")?),
        now_ns,
    )?;
    let (min, max) = params::durations(pairs, "query.duration_min", "query.duration_max")?;
    let limit = params::limit(pairs, &["query.search_depth", "query.num_traces"])?;
    let mut tags = Vec::new();
    for (k, v) in pairs {
        if let Some(key) = k.strip_prefix("query.attributes.") {
            tags.push((key.to_string(), v.clone()));
        }
    }
    Ok(Search {
        service,
        operation: get("query.operation_name").map(str::to_string),
        tags,
        start_ns,
        end_ns,
        min_duration_ns: min,
        max_duration_ns: max,
        limit,
    })
}

async fn find_traces(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let pairs = params::pairs(query.as_deref());
    let search = match search(&pairs, crate::now_ns()) {
        Ok(s) => s,
        Err(e) => return bad(e),
    };
    let ids = match search_ids(&engine, search).await {
        Ok(ids) => ids,
        Err(e) => return failed(e),
    };
    match load_spans(&engine, ids).await {
        Ok(spans) => otlp_result(spans),
        Err(e) => failed(e),
    }
}

async fn get_trace(State(engine): State<QueryEngine>, Path(id): Path<String>) -> Response {
    let id = match params::trace_id(&id) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    match load_spans(&engine, vec![id.to_vec()]).await {
        Ok(spans) if spans.is_empty() => fail(StatusCode::NOT_FOUND, "trace not found"),
        Ok(spans) => otlp_result(spans),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339("t", "1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            rfc3339("t", "2017-01-26T16:46:31.639875Z"),
            Ok(1_485_449_191_639_875_000)
        );
        assert_eq!(
            rfc3339("t", "2017-01-26T17:46:31+01:00"),
            Ok(1_485_449_191_000_000_000)
        );
        assert!(rfc3339("t", "2017-13-26T16:46:31Z").is_err());
        assert!(rfc3339("t", "yesterday").is_err());
        assert!(rfc3339("t", "1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn prune_leaves_out_defaults_but_keeps_set_messages() {
        let mut v = json!({"resource": {"attributes": [], "droppedAttributesCount": 0},
                           "kind": 2, "name": "", "status": {"code": 2, "message": ""},
                           "startTimeUnixNano": "0", "flags": 0});
        prune(&mut v);
        assert_eq!(v, json!({"resource": {}, "kind": 2, "status": {"code": 2}}));
    }
}
