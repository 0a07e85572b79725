//! Lumen's dashboard: server-rendered pages (askama) with the service graph drawn as SVG on
//! the server, read through telemetry's [`MeshQuery`] (the graph `/api/v1/graph` answers
//! with). Every view's state is in its URL; no JavaScript framework, no CDN, no node at build
//! time: a few lines of hand-written JavaScript show a clicked node's or edge's detail.

#![forbid(unsafe_code)]

mod chart;
pub mod layout;
mod mesh;
mod service;
mod sql;
mod trace;
mod traces;
mod view;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use lumen_telemetry::MeshQuery;

pub use view::{GraphParams, GraphView, Health, Thresholds};

/// Where the dashboard reads what the store does not hold.
#[derive(Debug, Clone, Default)]
pub struct DashboardOptions {
    /// The control plane's HTTP address, for the proxy status page.
    pub control_url: Option<String>,
}

/// The dashboard's routes with no control plane to ask.
pub fn router<Q: MeshQuery>(query: Arc<Q>) -> Router {
    router_with(query, DashboardOptions::default())
}

/// The dashboard's routes: the graph, service, trace, SQL and proxy pages, its icon and
/// script; any other path is a friendly 404 page.
pub fn router_with<Q: MeshQuery>(query: Arc<Q>, options: DashboardOptions) -> Router {
    let control = Arc::new(options);
    let pages = Router::new().route(
        "/proxies",
        get(move || {
            let control = control.clone();
            async move { proxies_page(&control).await }
        }),
    );
    Router::new()
        .route("/", get(graph_page::<Q>))
        .route("/service/{name}", get(service_page::<Q>))
        .route("/trace/{id}", get(trace_page::<Q>))
        .route("/traces", get(traces_page::<Q>))
        .route("/sql", get(sql_page::<Q>))
        .route("/sql.csv", get(sql_csv::<Q>))
        .route("/favicon.svg", get(favicon))
        .route("/dashboard.js", get(script))
        .fallback(not_found)
        .with_state(query)
        .merge(pages)
}

#[derive(Template)]
#[template(path = "mesh.html")]
struct MeshPage<'a> {
    v: &'a mesh::MeshView,
}

async fn proxies_page(options: &DashboardOptions) -> Response {
    let timeout = std::time::Duration::from_secs(3);
    let (fetched, config) = match &options.control_url {
        Some(url) => tokio::join!(
            mesh::fetch(url, "/debug/syncz", "proxy status", timeout),
            mesh::fetch(url, "/debug/config", "mesh configuration", timeout),
        ),
        None => (
            Ok(Vec::new()),
            Ok(mesh::ConfigDump {
                services: Vec::new(),
                rejected: Vec::new(),
            }),
        ),
    };
    // The control plane not answering is a bad gateway, said on the page itself.
    let status = if fetched.is_err() || config.is_err() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    let view = mesh::MeshView::build(options.control_url.clone(), fetched, config);
    page(status, &MeshPage { v: &view })
}

/// Lumen's icon, drawn here (no asset copied in); the pages link it, so a browser asks for
/// nothing else.
const FAVICON: &str = concat!(
    r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">"##,
    r##"<circle cx="16" cy="16" r="14" fill="#1d2330"/>"##,
    r##"<circle cx="16" cy="16" r="6" fill="#f5c542"/>"##,
    r##"<path d="M16 3v6M16 23v6M3 16h6M23 16h6" stroke="#f5c542" stroke-width="2"/>"##,
    "</svg>"
);

async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        FAVICON,
    )
        .into_response()
}

/// Clicking (or Enter on) a node or an edge shows its figures in the detail panel.
const SCRIPT: &str = include_str!("../assets/dashboard.js");

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        SCRIPT,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
}

/// A page that says what went wrong and links back, with the matching status.
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let page = ErrorPage {
        status: status.as_u16(),
        title,
        message,
    };
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(_) => (status, message.to_string()).into_response(),
    }
}

/// A page rendered with `status`, or a 500 page saying why it could not be drawn.
fn page(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The page could not be drawn",
            &e.to_string(),
        ),
    }
}

async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Page not found",
        "There is no such page. The service graph is the dashboard's home page.",
    )
}

#[derive(Template)]
#[template(path = "graph.html")]
struct GraphPage<'a> {
    v: &'a GraphView,
}

async fn graph_page<Q: MeshQuery>(
    State(query): State<Arc<Q>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let now = lumen_telemetry::now_ns();
    let params = match GraphParams::parse(raw.as_deref(), now) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    match query.graph(params.start_ns, params.end_ns).await {
        Ok(graph) => {
            let graph = graph.in_namespaces(&params.namespaces);
            render_graph(&GraphView::build(&graph, &params))
        }
        Err(e) => query_failed(&e),
    }
}

#[derive(Template)]
#[template(path = "service.html")]
struct ServicePage<'a> {
    v: &'a service::ServiceView,
}

fn query_failed(e: &lumen_telemetry::query::QueryError) -> Response {
    tracing::warn!(error = %e, "dashboard query failed");
    let status =
        StatusCode::from_u16(e.status_of_own_plan()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_page(status, "The store could not answer", &e.to_string())
}

async fn service_page<Q: MeshQuery>(
    State(query): State<Arc<Q>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let now = lumen_telemetry::now_ns();
    let params = match GraphParams::parse(raw.as_deref(), now) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Bad request", &e),
    };
    let (start, end) = (params.start_ns, params.end_ns);
    let (graph, minutes, failed, routes) = tokio::join!(
        query.graph(start, end),
        query.service_minutes(name.clone(), start, end),
        query.failed_requests(name.clone(), start, end, service::FAILED_ROWS),
        query.routes(name.clone(), start, end, service::ROUTE_ROWS),
    );
    let (graph, minutes, failed, routes) = match (graph, minutes, failed, routes) {
        (Ok(g), Ok(m), Ok(f), Ok(r)) => (g, m, f, r),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            return query_failed(&e);
        }
    };
    let Some(view) =
        service::ServiceView::build(&name, &graph, &minutes, &failed, &routes, &params)
    else {
        return error_page(
            StatusCode::NOT_FOUND,
            "No such service",
            &format!("No service named {name:?} reported any request in this time range."),
        );
    };
    page(StatusCode::OK, &ServicePage { v: &view })
}

#[derive(Template)]
#[template(path = "trace.html")]
struct TracePage<'a> {
    v: &'a trace::TraceView,
}

async fn trace_page<Q: MeshQuery>(
    State(query): State<Arc<Q>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let bytes = match lumen_telemetry::jaeger::params::trace_id(&id) {
        Ok(b) => b,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Bad trace id", &e.0),
    };
    let spans = match query.trace(bytes).await {
        Ok(s) => s,
        Err(e) => return query_failed(&e),
    };
    let hex = lumen_telemetry::jaeger::model::hex(&bytes);
    let Some(view) = trace::TraceView::build(&hex, &spans) else {
        return error_page(
            StatusCode::NOT_FOUND,
            "No such trace",
            &format!("The store holds no span of trace {hex}."),
        );
    };
    page(StatusCode::OK, &TracePage { v: &view })
}

#[derive(Template)]
#[template(path = "traces.html")]
struct TracesPage<'a> {
    v: &'a traces::TracesView,
}

async fn traces_page<Q: MeshQuery>(
    State(query): State<Arc<Q>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let pairs = lumen_telemetry::query_string::pairs(raw.as_deref());
    let services = match query.services().await {
        Ok(s) => s,
        Err(e) => return query_failed(&e),
    };
    let mut view = traces::TracesView::form(&pairs, services);
    if !view.service.is_empty() {
        // The form's lookback unless the URL gave start/end (as Jaeger UI links do).
        let mut search_pairs = pairs.clone();
        if lumen_telemetry::query_string::one(&pairs, "lookback").is_none() {
            search_pairs.push(("lookback".into(), view.lookback.clone()));
        }
        search_pairs.retain(|(k, v)| !(v.is_empty() && k != "service"));
        let now = lumen_telemetry::now_ns();
        let search = match lumen_telemetry::jaeger::params::search(&search_pairs, now) {
            Ok(s) => s,
            Err(e) => return error_page(StatusCode::BAD_REQUEST, "Bad search", &e.0),
        };
        let (start, end) = (search.start_ns, search.end_ns);
        match query.find_traces(search).await {
            Ok(found) => view = view.with_results(&found, start, end),
            Err(e) => return query_failed(&e),
        }
    }
    page(StatusCode::OK, &TracesPage { v: &view })
}

#[derive(Template)]
#[template(path = "sql.html")]
struct SqlPage<'a> {
    v: &'a sql::SqlView,
}

/// The `q` parameter: the query to run (none: the console with an example).
fn sql_param(raw: Option<&str>) -> Option<String> {
    let pairs = lumen_telemetry::query_string::pairs(raw);
    lumen_telemetry::query_string::one(&pairs, "q")
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_string)
}

async fn sql_page<Q: MeshQuery>(State(query): State<Arc<Q>>, RawQuery(raw): RawQuery) -> Response {
    let tables = query.tables().await;
    let (status, view) = match sql_param(raw.as_deref()) {
        None => (
            StatusCode::OK,
            sql::SqlView {
                query: sql::EXAMPLE.to_string(),
                result: None,
                error: None,
                tables,
            },
        ),
        Some(q) => match query.sql_table(q.clone()).await {
            Ok(t) => (
                StatusCode::OK,
                sql::SqlView {
                    query: q,
                    result: Some(t),
                    error: None,
                    tables,
                },
            ),
            Err(e) => (
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                sql::SqlView {
                    query: q,
                    result: None,
                    error: Some(e.to_string()),
                    tables,
                },
            ),
        },
    };
    page(status, &SqlPage { v: &view })
}

async fn sql_csv<Q: MeshQuery>(State(query): State<Arc<Q>>, RawQuery(raw): RawQuery) -> Response {
    let Some(q) = sql_param(raw.as_deref()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "parameter q (the query) is required",
        );
    };
    match query.sql_table(q).await {
        Ok(t) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"lumen-query.csv\"",
                ),
            ],
            sql::csv(&t),
        )
            .into_response(),
        Err(e) => error_page(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            "The query failed",
            &e.to_string(),
        ),
    }
}

/// The graph page for a built view.
pub fn render_graph(view: &GraphView) -> Response {
    page(StatusCode::OK, &GraphPage { v: view })
}

#[cfg(test)]
mod tests;
