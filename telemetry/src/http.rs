//! The telemetry service's HTTP API: `POST /api/v1/sql`, Jaeger's query API (`crate::jaeger`),
//! `/metrics` (the service's own health), `/healthz`, `/readyz`, and the guard
//! every route of that port sits behind ([`guard`]): a request must name an allowed Host (so a
//! DNS-rebinding name cannot reach the API from a browser) and a POST must be
//! `application/json` (so a web page cannot post to it with a simple form or `text/plain`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::exposition::{Format, Writer};
use crate::query::QueryEngine;
use crate::receiver::Receiver;
use crate::selfmetrics;
use crate::store::Store;

/// Largest accepted SQL request body.
pub const MAX_SQL_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub sql: String,
}

/// Host names the HTTP port answers to (compared without the port, case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// Loopback names, the listen address (unless it is a wildcard) and `extra`.
    pub fn new(listen: SocketAddr, extra: &[String]) -> AllowedHosts {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names.extend(extra.iter().map(|h| h.trim().to_ascii_lowercase()));
        names.sort();
        names.dedup();
        AllowedHosts(names)
    }

    /// Whether a Host header value (`name`, `name:port`, `[v6]:port`) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else if host.parse::<IpAddr>().is_ok() {
            host.as_str()
        } else {
            host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n)
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        self.0.iter().any(|allowed| allowed == name)
    }
}

/// What the API's handlers read.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub engine: QueryEngine,
    pub store: Arc<Store>,
    pub receiver: Arc<Receiver>,
}

/// Routes of the HTTP API (the dashboard is merged in by the binary).
pub fn router(state: ApiState) -> Router {
    let jaeger = crate::jaeger::router(state.engine.clone());
    let graph = crate::graph::router(state.engine.clone());
    Router::new()
        .route("/api/v1/sql", post(sql))
        .route("/api/v1/tables", get(tables))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_SQL_BODY))
        .with_state(state)
        .merge(jaeger)
        .merge(graph)
}

/// The mesh's families (aggregated across proxies) and the service's own, in the text format
/// or OpenMetrics as the `Accept` header prefers.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let mut w = Writer::new(Format::negotiate(accept), 64 * 1024);
    state.receiver.mesh.render(&mut w);
    selfmetrics::render(&mut w, &state.store, &state.receiver, state.engine.stats());
    let format = w.format();
    ([(header::CONTENT_TYPE, format.content_type())], w.finish()).into_response()
}

/// Puts `app` behind the Host and Content-Type checks.
pub fn guard(app: Router, hosts: AllowedHosts) -> Router {
    let hosts = Arc::new(hosts);
    app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let hosts = hosts.clone();
            async move { check(&hosts, req, next).await }
        },
    ))
}

async fn check(hosts: &AllowedHosts, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if hosts.allows(&h) => {}
        Some(h) => {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "host",
                format!(
                    "host {h:?} is not one this server answers to; allowed: {} (add names with --allow-host)",
                    hosts.0.join(", ")
                ),
            );
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "host",
                "the request names no Host".to_string(),
            );
        }
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type",
                format!(
                    "POST bodies must be application/json, not {:?}",
                    if content_type.is_empty() {
                        "(none)"
                    } else {
                        content_type
                    }
                ),
            );
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (status, Json(json!({ "error": message, "kind": kind }))).into_response()
}

/// The media type of an Arrow IPC stream, which `POST /api/v1/sql` answers in when the
/// request's Accept asks for it.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// `GET /api/v1/tables`: every table with its columns, their Arrow types and nullability.
async fn tables(State(state): State<ApiState>) -> Response {
    let tables: Vec<serde_json::Value> = state
        .store
        .tables()
        .iter()
        .map(|t| {
            let columns: Vec<serde_json::Value> = t
                .schema
                .fields()
                .iter()
                .map(|f| {
                    json!({
                        "name": f.name(),
                        "type": f.data_type().to_string(),
                        "nullable": f.is_nullable(),
                    })
                })
                .collect();
            json!({ "name": t.name, "time_column": t.time_column, "columns": columns })
        })
        .collect();
    Json(json!({ "tables": tables })).into_response()
}

/// A result as an Arrow IPC stream; `x-lumen-truncated` says whether rows were cut.
fn arrow_stream(out: &crate::query::QueryOutput) -> Response {
    use datafusion::arrow::ipc::writer::StreamWriter;
    let mut buf = Vec::new();
    let written = StreamWriter::try_new(&mut buf, &out.schema).and_then(|mut w| {
        for batch in &out.batches {
            w.write(batch)?;
        }
        w.finish()
    });
    match written {
        Ok(()) => (
            [
                (header::CONTENT_TYPE, ARROW_STREAM),
                (
                    header::HeaderName::from_static("x-lumen-truncated"),
                    if out.truncated { "true" } else { "false" },
                ),
            ],
            buf,
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding the result as Arrow IPC: {e}"),
        ),
    }
}

/// Whether the request's Accept header asks for an Arrow IPC stream.
fn wants_arrow(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(ARROW_STREAM))
        })
}

async fn sql(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let engine = &state.engine;
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return error(rejection.status(), "body", rejection.body_text()),
    };
    let req: SqlRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "body",
                format!("expected {{\"sql\": \"...\"}}: {e}"),
            );
        }
    };
    let result = if wants_arrow(&headers) {
        engine.query(&req.sql).await.map(|out| arrow_stream(&out))
    } else {
        engine
            .sql(&req.sql)
            .await
            .map(|result| Json(result).into_response())
    };
    match result {
        Ok(response) => response,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_server_error() {
                tracing::error!(error = %e, "query failed");
            }
            let mut resp = error(status, e.kind(), e.to_string());
            if status == StatusCode::TOO_MANY_REQUESTS {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_matched_without_port_and_case() {
        let listen: SocketAddr = "127.0.0.2:16686".parse().expect("addr");
        let hosts = AllowedHosts::new(listen, &["Lumen.Example".to_string()]);
        for ok in [
            "localhost",
            "LOCALHOST:16686",
            "127.0.0.1:80",
            "127.0.0.2:16686",
            "[::1]:16686",
            "::1",
            "lumen.example",
            "lumen.example.:8080",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "127.0.0.3",
            "[::2]:1",
            "",
        ] {
            assert!(!hosts.allows(bad), "{bad}");
        }
        let wildcard = AllowedHosts::new("0.0.0.0:1".parse().expect("addr"), &[]);
        assert!(!wildcard.allows("0.0.0.0"), "a wildcard is not a name");
    }
}
