//! Lumen's dashboard: a server-rendered service graph (SVG) and per-service RED table, read
//! through telemetry's [`MeshQuery`]. No JavaScript framework, no CDN, no node at build time.

#![forbid(unsafe_code)]

pub mod layout;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use lumen_telemetry::{MeshOverview, MeshQuery};

/// How far back the dashboard looks.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How often the page reloads itself.
pub const REFRESH_S: u64 = 5;

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    window_s: u64,
    refresh_s: u64,
    error: Option<String>,
    width: u32,
    height: u32,
    nodes: Vec<NodeView>,
    edges: Vec<EdgeView>,
    services: Vec<ServiceRow>,
}

struct NodeView {
    name: String,
    x: i32,
    y: i32,
    errors: i64,
}

struct EdgeView {
    source: String,
    destination: String,
    x1: i32,
    y1: i32,
    x2: i32,
    y2: i32,
    lx: i32,
    ly: i32,
    rate: String,
    error_pct: String,
    p99: String,
    errors: i64,
    requests: i64,
}

struct ServiceRow {
    name: String,
    rate: String,
    success_pct: String,
    p50: String,
    p99: String,
    errors: i64,
    requests: i64,
}

/// The dashboard's routes (`/`).
pub fn router<Q: MeshQuery>(query: Arc<Q>) -> Router {
    Router::new()
        .route("/", get(index::<Q>))
        .route("/favicon.svg", get(favicon))
        .with_state(query)
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
            (axum::http::header::CONTENT_TYPE, "image/svg+xml"),
            (axum::http::header::CACHE_CONTROL, "max-age=86400"),
        ],
        FAVICON,
    )
        .into_response()
}

async fn index<Q: MeshQuery>(State(query): State<Arc<Q>>) -> Response {
    let (overview, error) = match query.overview(WINDOW).await {
        Ok(o) => (o, None),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard query failed");
            (MeshOverview::default(), Some(e.to_string()))
        }
    };
    match render(&overview, error) {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering dashboard: {e}"),
        )
            .into_response(),
    }
}

/// Renders the page for an overview.
pub fn render(overview: &MeshOverview, error: Option<String>) -> Result<String, askama::Error> {
    let mut names: Vec<String> = overview
        .services
        .iter()
        .map(|s| s.service.clone())
        .collect();
    for e in &overview.edges {
        names.push(e.source.clone());
        names.push(e.destination.clone());
    }
    names.sort();
    names.dedup();
    let pairs: Vec<(String, String)> = overview
        .edges
        .iter()
        .map(|e| (e.source.clone(), e.destination.clone()))
        .collect();
    let layout = layout::layered(&names, &pairs);
    let errors: BTreeMap<&str, i64> = overview
        .services
        .iter()
        .map(|s| (s.service.as_str(), s.errors))
        .collect();
    let nodes = layout
        .positions
        .iter()
        .map(|(name, (x, y))| NodeView {
            name: name.clone(),
            x: *x,
            y: *y,
            errors: errors.get(name.as_str()).copied().unwrap_or(0),
        })
        .collect();
    let edges = overview
        .edges
        .iter()
        .filter_map(|e| {
            let (sx, sy) = *layout.positions.get(&e.source)?;
            let (dx, dy) = *layout.positions.get(&e.destination)?;
            let (x1, y1, x2, y2) = layout::shorten(sx, sy, dx, dy, 30.0);
            Some(EdgeView {
                source: e.source.clone(),
                destination: e.destination.clone(),
                x1,
                y1,
                x2,
                y2,
                lx: (sx + dx) / 2,
                ly: (sy + dy) / 2 - 6,
                rate: format!("{:.2}", e.rate_per_s),
                error_pct: format!("{:.1}", e.error_rate * 100.0),
                p99: format!("{:.1}", e.p99_ms),
                errors: e.errors,
                requests: e.requests,
            })
        })
        .collect();
    let services = overview
        .services
        .iter()
        .map(|s| ServiceRow {
            name: s.service.clone(),
            rate: format!("{:.2}", s.rate_per_s),
            success_pct: format!("{:.1}", s.success_rate * 100.0),
            p50: format!("{:.1}", s.p50_ms),
            p99: format!("{:.1}", s.p99_ms),
            errors: s.errors,
            requests: s.requests,
        })
        .collect();
    IndexPage {
        window_s: overview.window_s,
        refresh_s: REFRESH_S,
        error,
        width: layout.width,
        height: layout.height,
        nodes,
        edges,
        services,
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_telemetry::{EdgeStats, ServiceStats};

    fn service(name: &str, errors: i64) -> ServiceStats {
        ServiceStats {
            service: name.into(),
            requests: 100,
            errors,
            rate_per_s: 1.67,
            success_rate: (100 - errors) as f64 / 100.0,
            p50_ms: 1.2,
            p99_ms: 9.5,
        }
    }

    #[test]
    fn renders_nodes_edges_and_table() {
        let overview = MeshOverview {
            window_s: 60,
            services: vec![
                service("productpage", 0),
                service("reviews", 0),
                service("ratings", 3),
            ],
            edges: vec![
                EdgeStats {
                    source: "productpage".into(),
                    destination: "reviews".into(),
                    requests: 100,
                    errors: 0,
                    rate_per_s: 1.67,
                    error_rate: 0.0,
                    p99_ms: 8.0,
                },
                EdgeStats {
                    source: "reviews".into(),
                    destination: "ratings".into(),
                    requests: 100,
                    errors: 3,
                    rate_per_s: 1.67,
                    error_rate: 0.03,
                    p99_ms: 40.0,
                },
            ],
        };
        let html = render(&overview, None).expect("renders");
        assert!(html.contains(r#"data-service="ratings""#));
        assert!(
            html.contains(r#"data-source="reviews" data-destination="ratings" data-rate="1.67""#)
        );
        assert!(html.contains("3.0% err"));
        assert!(html.contains("97.0%"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external requests"
        );
    }

    #[test]
    fn empty_mesh_says_so() {
        let html = render(
            &MeshOverview {
                window_s: 60,
                ..Default::default()
            },
            Some("boom".into()),
        )
        .expect("renders");
        assert!(html.contains("No traffic seen"));
        assert!(html.contains("query failed: boom"));
    }
}
