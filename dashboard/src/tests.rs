//! Handler tests with `oneshot`: every page and its bad inputs, and the graph's label
//! placement on meshes of 4, 20 and 100 services.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use lumen_telemetry::detail::FailedRequest;
use lumen_telemetry::graph::{Edge, Graph, Minute, Node, Signals};
use lumen_telemetry::query::QueryError;
use tower::ServiceExt;

use super::*;
use crate::layout::Rect;

struct Fake(Result<Graph, fn() -> QueryError>);

impl MeshQuery for Fake {
    async fn graph(&self, start_ns: i64, end_ns: i64) -> Result<Graph, QueryError> {
        match &self.0 {
            Ok(g) => Ok(Graph {
                start_ns,
                end_ns,
                ..g.clone()
            }),
            Err(e) => Err(e()),
        }
    }

    async fn service_minutes(
        &self,
        service: String,
        start_ns: i64,
        _end_ns: i64,
    ) -> Result<Vec<Minute>, QueryError> {
        let known = self
            .0
            .as_ref()
            .is_ok_and(|g| g.nodes.iter().any(|n| n.service == service));
        if !known {
            return Ok(Vec::new());
        }
        let minute = |i: i64, version: Option<&str>, errors: i64| Minute {
            minute_ns: start_ns + i * 60_000_000_000,
            version: version.map(Into::into),
            signals: signals(60, errors),
        };
        Ok((0..5)
            .flat_map(|i| {
                [
                    minute(i, None, 4),
                    minute(i, Some("v1"), 1),
                    minute(i, Some("v2"), 3),
                ]
            })
            .collect())
    }

    async fn trace(
        &self,
        id: [u8; 16],
    ) -> Result<Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>, QueryError> {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        if id[15] != 0xc0 {
            return Ok(Vec::new());
        }
        let span = |sid: u8, parent: u8, name: &str| Span {
            trace_id: id.to_vec(),
            span_id: vec![sid; 8],
            parent_span_id: if parent == 0 {
                Vec::new()
            } else {
                vec![parent; 8]
            },
            name: name.into(),
            kind: 2,
            start_time_unix_nano: 1_000_000 * u64::from(sid),
            end_time_unix_nano: 1_000_000 * (20 - u64::from(sid)),
            ..Default::default()
        };
        Ok(vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("ratings".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span(1, 0, "GET /ratings"), span(2, 1, "db <script>")],
                ..Default::default()
            }],
            ..Default::default()
        }])
    }

    async fn services(&self) -> Result<Vec<String>, QueryError> {
        Ok(vec!["productpage".into(), "ratings".into()])
    }

    async fn find_traces(
        &self,
        search: lumen_telemetry::jaeger::params::Search,
    ) -> Result<Vec<lumen_telemetry::detail::TraceSummary>, QueryError> {
        if search.service != "ratings" {
            return Ok(Vec::new());
        }
        Ok((0..4)
            .map(|i| lumen_telemetry::detail::TraceSummary {
                trace_id: format!("{:032x}", 0xf00 + i),
                root_service: "productpage".into(),
                root_operation: "GET /productpage".into(),
                start_ns: search.start_ns + (i + 1) * 60_000_000_000,
                duration_ns: 5_000_000 * (i + 1),
                spans: 5,
                errors: usize::from(i == 2),
                services: vec!["productpage".into(), "ratings".into()],
            })
            .collect())
    }

    async fn sql_table(&self, sql: String) -> Result<lumen_telemetry::query::SqlTable, QueryError> {
        use datafusion::error::DataFusionError;
        if sql.starts_with("COPY") {
            return Err(QueryError::Refused(DataFusionError::Plan(
                "COPY is not a query".into(),
            )));
        }
        if !sql.starts_with("SELECT") {
            return Err(QueryError::Sql(DataFusionError::Plan(format!(
                "cannot parse {sql:?}"
            ))));
        }
        Ok(lumen_telemetry::query::SqlTable {
            columns: vec!["service_name".into(), "n".into()],
            rows: vec![
                vec!["ratings".into(), "12".into()],
                vec!["a \"quoted\", name".into(), "3".into()],
            ],
            truncated: sql.contains("LIMIT 2"),
            row_limit: 2,
        })
    }

    async fn tables(&self) -> Vec<lumen_telemetry::query::TableInfo> {
        vec![lumen_telemetry::query::TableInfo {
            name: "spans".into(),
            columns: vec![("trace_id".into(), "FixedSizeBinary(16)".into())],
        }]
    }

    async fn routes(
        &self,
        service: String,
        _start_ns: i64,
        _end_ns: i64,
        limit: usize,
    ) -> Result<Vec<lumen_telemetry::detail::RouteSignals>, QueryError> {
        let route =
            |method: &str, route: String, requests, errors| lumen_telemetry::detail::RouteSignals {
                method: method.into(),
                route,
                requests,
                errors,
                p50_ms: 2.0,
                p95_ms: 8.0,
                p99_ms: 11.0,
            };
        Ok(vec![
            route("GET", format!("/{service}/{{id}}"), 90, 9),
            route("GET", "/health".into(), 10, 0),
        ]
        .into_iter()
        .take(limit)
        .collect())
    }

    async fn failed_requests(
        &self,
        service: String,
        start_ns: i64,
        _end_ns: i64,
        limit: usize,
    ) -> Result<Vec<FailedRequest>, QueryError> {
        Ok((0..3.min(limit))
            .map(|i| FailedRequest {
                trace_id: format!("{:032x}", 0xabc0 + i),
                span_id: format!("{:016x}", i + 1),
                start_ns: start_ns + 1_000_000_000 * i as i64,
                duration_ns: 2_500_000,
                operation: format!("{service}.default.svc.cluster.local:9080/*"),
                version: Some("v1".into()),
                // The last one: a local reply of the caller's sidecar.
                status: Some(if i == 2 { 503 } else { 500 }),
                response_flags: Some(if i == 2 { "UF" } else { "-" }.into()),
                message: None,
                caller: Some("reviews".into()),
                side: if i == 2 { "client" } else { "server" }.into(),
                reason: (i == 2).then(|| {
                    "upstream connect error or disconnect to 10.0.0.7:9080: connection refused"
                        .into()
                }),
                config_version: Some("00000000c0ffee00".into()),
            })
            .collect())
    }
}

fn signals(requests: i64, errors: i64) -> Signals {
    Signals {
        requests,
        errors,
        rps: requests as f64 / 60.0,
        error_share: if requests > 0 {
            errors as f64 / requests as f64
        } else {
            0.0
        },
        p50_ms: 3.0,
        p95_ms: 9.0,
        p99_ms: 12.0,
        request_bytes: 0,
        response_bytes: requests * 120,
    }
}

fn service(name: &str, requests: i64, errors: i64) -> Node {
    Node {
        id: name.into(),
        kind: "service",
        service: name.into(),
        version: None,
        namespace: Some(namespace_of(name)),
        signals: signals(requests, errors),
    }
}

/// The demo's services live in `default`, but ratings is put in `data` here (and the
/// generated meshes spread over three namespaces) so the filter has something to do.
fn namespace_of(service: &str) -> String {
    match service
        .strip_prefix("service-")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(i) => format!("team-{}", i % 3),
        None if service == "ratings" => "data".into(),
        None => "default".into(),
    }
}

fn workload(name: &str, version: &str, requests: i64) -> Node {
    Node {
        id: format!("{name}@{version}"),
        kind: "workload",
        service: name.into(),
        version: Some(version.into()),
        namespace: Some(namespace_of(name)),
        signals: signals(requests, 0),
    }
}

fn edge(s: &str, sv: Option<&str>, t: &str, tv: Option<&str>, requests: i64, errors: i64) -> Edge {
    Edge {
        source: s.into(),
        source_version: sv.map(Into::into),
        target: t.into(),
        target_version: tv.map(Into::into),
        signals: signals(requests, errors),
    }
}

/// The demo's shape: productpage → details, reviews (v1, v2) → ratings (failing 12%).
fn bookinfo() -> Graph {
    Graph {
        start_ns: 0,
        end_ns: 0,
        seconds: 60.0,
        nodes: vec![
            service("details", 100, 0),
            workload("details", "v1", 100),
            service("productpage", 100, 0),
            workload("productpage", "v1", 100),
            service("ratings", 100, 12),
            workload("ratings", "v1", 100),
            service("reviews", 100, 2),
            workload("reviews", "v1", 50),
            workload("reviews", "v2", 50),
        ],
        edges: vec![
            edge("productpage", None, "details", None, 100, 0),
            edge("productpage", None, "reviews", None, 100, 2),
            edge("reviews", None, "ratings", None, 100, 12),
        ],
        workload_edges: vec![
            edge("productpage", Some("v1"), "details", Some("v1"), 100, 0),
            edge("productpage", Some("v1"), "reviews", Some("v1"), 50, 0),
            edge("productpage", Some("v1"), "reviews", Some("v2"), 50, 2),
            edge("reviews", Some("v1"), "ratings", Some("v1"), 50, 6),
            edge("reviews", Some("v2"), "ratings", Some("v1"), 50, 6),
        ],
        namespaces: vec!["data".into(), "default".into()],
    }
}

/// `n` services, each called by one or two others.
fn mesh(n: usize) -> Graph {
    let names: Vec<String> = (0..n).map(|i| format!("service-{i:03}")).collect();
    let mut nodes = Vec::new();
    for name in &names {
        nodes.push(service(name, 100, 0));
        nodes.push(workload(name, "v1", 100));
    }
    let mut edges = Vec::new();
    for i in 1..n {
        edges.push(edge(
            &names[(i - 1) / 3],
            None,
            &names[i],
            None,
            100,
            (i % 7) as i64,
        ));
        if i % 4 == 0 {
            edges.push(edge(&names[i / 2], None, &names[i], None, 40, 0));
        }
    }
    let workload_edges = edges
        .iter()
        .map(|e| Edge {
            source_version: Some("v1".into()),
            target_version: Some("v1".into()),
            ..e.clone()
        })
        .collect();
    Graph {
        start_ns: 0,
        end_ns: 0,
        seconds: 60.0,
        nodes,
        edges,
        workload_edges,
        namespaces: (0..n.min(3)).map(|i| format!("team-{i}")).collect(),
    }
}

async fn get(q: Fake, uri: &str) -> (StatusCode, String) {
    let app = router(Arc::new(q));
    let resp = app
        .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Every `data-box="x y w h"` of elements with `class="<class> ..."`.
fn boxes(html: &str, class: &str) -> Vec<Rect> {
    let mut out = Vec::new();
    for piece in html.split("<g class=\"").skip(1) {
        if !(piece.starts_with(&format!("{class} ")) || piece.starts_with(&format!("{class}\""))) {
            continue;
        }
        let Some(start) = piece.find("data-box=\"") else {
            continue;
        };
        let rest = &piece[start + 10..];
        let nums: Vec<f64> = rest[..rest.find('"').unwrap_or(0)]
            .split(' ')
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [x, y, w, h] = nums[..] {
            out.push(Rect { x, y, w, h });
        }
    }
    out
}

#[tokio::test]
async fn the_graph_page_draws_services_with_health_from_thresholds() {
    let (status, html) = get(Fake(Ok(bookinfo())), "/").await;
    assert_eq!(status, StatusCode::OK);
    for s in ["productpage", "details", "reviews", "ratings"] {
        assert!(html.contains(&format!(r#"data-service="{s}""#)), "{s}");
    }
    assert!(
        html.contains(r#"class="node failing""#),
        "ratings at 12% is failing"
    );
    assert!(
        html.contains(r#"class="node degraded""#),
        "reviews at 2% is degraded"
    );
    assert!(
        html.contains(r#"data-source="productpage" data-destination="details" data-rate="1.67""#)
    );
    assert!(
        html.contains("p50 3.0 · p95 9.0 · p99 12.0 ms"),
        "edge labels say the latencies"
    );
    assert!(
        html.contains("0 B in · 120 B out per request"),
        "and the bytes"
    );
    assert!(html.contains(r#"<meta http-equiv="refresh" content="15">"#));
    // Thresholds come from the URL.
    let (_, html) = get(Fake(Ok(bookinfo())), "/?degraded=5&failing=50").await;
    assert!(!html.contains(r#"class="node failing""#));
    assert!(
        html.contains(r#"class="node degraded" tabindex="0" role="button" aria-label="ratings"#)
    );
    assert!(
        html.contains(r#"class="node healthy" tabindex="0" role="button" aria-label="reviews"#)
    );
    // No auto-refresh when it is off.
    let (_, html) = get(Fake(Ok(bookinfo())), "/?refresh=0").await;
    assert!(!html.contains("http-equiv=\"refresh\""));
}

#[tokio::test]
async fn the_namespace_filter_keeps_its_services_and_the_edges_that_reach_them() {
    let (status, html) = get(Fake(Ok(bookinfo())), "/?namespace=data&view=versioned").await;
    assert_eq!(status, StatusCode::OK);
    // ratings is in `data`; reviews calls it, so it stays as context; the rest go.
    for s in ["ratings", "reviews"] {
        assert!(html.contains(&format!(r#"data-service="{s}""#)), "{s}");
    }
    for s in ["productpage", "details"] {
        assert!(!html.contains(&format!(r#"data-service="{s}""#)), "{s}");
    }
    assert!(html.contains(r#"<option value="data" selected>data</option>"#));
    assert!(html.contains(r#"<option value="default">default</option>"#));
    // The service page's way back to the graph keeps the filter.
    let (status, html) = get(Fake(Ok(bookinfo())), "/service/ratings?namespace=data").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("namespace=data"), "{html}");
    // A namespace with nothing in it is an empty graph, and a bad name a 400.
    let (status, html) = get(Fake(Ok(bookinfo())), "/?namespace=nowhere").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No traffic in this range."));
    let (status, html) = get(Fake(Ok(bookinfo())), "/?namespace=Bad_Name").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("not a namespace name"), "{html}");
}

#[tokio::test]
async fn versioned_and_workload_views_draw_each_version() {
    let (status, html) = get(Fake(Ok(bookinfo())), "/?view=versioned").await;
    assert_eq!(status, StatusCode::OK);
    for id in ["reviews@v1", "reviews@v2", "ratings@v1", "productpage@v1"] {
        assert!(html.contains(&format!(r#"data-id="{id}""#)), "{id}");
    }
    assert!(html.contains(r#"<g class="group" data-app="reviews" data-box="#));
    assert!(html.contains(r#"data-source="productpage@v1" data-destination="reviews@v2""#));
    assert!(html.contains(r#"data-source="reviews@v2" data-destination="ratings@v1""#));
    let (_, html) = get(Fake(Ok(bookinfo())), "/?view=workload").await;
    assert!(html.contains(">reviews-v2</text>"));
    assert!(!html.contains(r#"class="group""#));
}

#[tokio::test]
async fn labels_never_overlap_nodes_or_each_other_on_4_20_and_100_services() {
    for n in [4, 20, 100] {
        for view in ["service", "versioned"] {
            let (status, html) = get(Fake(Ok(mesh(n))), &format!("/?view={view}")).await;
            assert_eq!(status, StatusCode::OK);
            let nodes = boxes(&html, "node");
            let labels = boxes(&html, "label");
            let groups = boxes(&html, "group");
            assert_eq!(groups.len(), if view == "versioned" { n } else { 0 });
            for g in &groups {
                for l in &labels {
                    assert!(
                        !g.overlaps(l, 0.0),
                        "{n} {view}: label {l:?} in app box {g:?}"
                    );
                }
            }
            assert_eq!(nodes.len(), n, "{n} {view}");
            assert_eq!(labels.len(), mesh(n).edges.len(), "{n} {view}");
            for (i, a) in labels.iter().enumerate() {
                for b in &labels[i + 1..] {
                    assert!(!a.overlaps(b, 0.0), "{n} {view}: labels {a:?} {b:?}");
                }
                for node in &nodes {
                    assert!(
                        !a.overlaps(node, 0.0),
                        "{n} {view}: label {a:?} on {node:?}"
                    );
                }
            }
            for (i, a) in nodes.iter().enumerate() {
                for b in &nodes[i + 1..] {
                    assert!(!a.overlaps(b, 0.0), "{n} {view}: nodes {a:?} {b:?}");
                }
            }
        }
    }
}

#[tokio::test]
async fn the_same_data_draws_the_same_picture() {
    let (_, a) = get(Fake(Ok(bookinfo())), "/?refresh=0").await;
    let mut shuffled = bookinfo();
    shuffled.nodes.reverse();
    shuffled.edges.reverse();
    let (_, b) = get(Fake(Ok(shuffled)), "/?refresh=0").await;
    let positions = |h: &str| [boxes(h, "node"), boxes(h, "label")];
    let (mut pa, mut pb) = (positions(&a), positions(&b));
    for p in pa.iter_mut().chain(pb.iter_mut()) {
        p.sort_by(|x, y| {
            (x.x, x.y)
                .partial_cmp(&(y.x, y.y))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    assert_eq!(
        pa, pb,
        "a refresh with the same data keeps every node and label in place"
    );
}

#[tokio::test]
async fn bad_input_gets_a_friendly_page_with_the_right_status() {
    for uri in [
        "/?view=galaxy",
        "/?range=3y",
        "/?refresh=7",
        "/?degraded=abc",
        "/?degraded=50&failing=10",
        "/?failing=101",
        "/?start=2030-01-01T00:00:00Z&end=2020-01-01T00:00:00Z",
        "/?start=yesterday",
        "/?start=0&end=99999999999",
    ] {
        let (status, html) = get(Fake(Ok(bookinfo())), uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(html.contains("<h1>Bad request"), "{uri}: {html}");
        assert!(html.contains(r#"<a href="/">"#), "{uri}");
    }
    let (status, html) = get(Fake(Ok(bookinfo())), "/no/such/page").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(html.contains("Page not found"));
    let (status, html) = get(
        Fake(Err(|| {
            QueryError::Timeout(std::time::Duration::from_secs(30))
        })),
        "/",
    )
    .await;
    assert_eq!(status.as_u16(), 422);
    assert!(html.contains("time limit"), "{html}");
    let (status, _) = get(Fake(Err(|| QueryError::Internal("disk gone".into()))), "/").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn an_empty_mesh_says_so_and_the_assets_are_served() {
    let empty = Graph {
        start_ns: 0,
        end_ns: 0,
        seconds: 1.0,
        nodes: Vec::new(),
        edges: Vec::new(),
        workload_edges: Vec::new(),
        namespaces: Vec::new(),
    };
    let (status, html) = get(Fake(Ok(empty)), "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No traffic in this range."));
    let (status, js) = get(Fake(Ok(bookinfo())), "/dashboard.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(js.contains("getElementById('detail')"));
    let (status, svg) = get(Fake(Ok(bookinfo())), "/favicon.svg").await;
    assert_eq!(status, StatusCode::OK);
    assert!(svg.starts_with("<svg"));
}

#[tokio::test]
async fn the_service_page_shows_signals_versions_calls_and_failed_requests() {
    let mut g = bookinfo();
    // reviews v2 fails 10% against v1's 0.5%, over enough requests to tell.
    g.nodes
        .retain(|n| n.service != "reviews" || n.kind == "service");
    g.nodes.push(Node {
        signals: signals(2000, 10),
        ..workload("reviews", "v1", 0)
    });
    g.nodes.push(Node {
        signals: signals(2000, 200),
        ..workload("reviews", "v2", 0)
    });
    let (status, html) = get(Fake(Ok(g)), "/service/reviews?range=1h&refresh=0").await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(
        html.matches("<figure class=\"chart\"").count(),
        3,
        "rate, success, latency"
    );
    for series in ["all", "v1", "v2", "p50", "p95", "p99"] {
        assert!(
            html.contains(&format!(r#"data-series="{series}""#)),
            "{series}"
        );
    }
    assert!(
        html.contains(r#"<tr data-version="v2" data-significant="true">"#),
        "{html}"
    );
    assert!(html.contains(r#"<tr data-version="v1" data-significant="false">"#));
    assert!(html.contains("+9.50 pp"), "v2's error share against v1's");
    assert!(html.contains(r#"<tr data-peer="productpage"><td><a href="/service/productpage">"#));
    assert!(html.contains(r#"<tr data-peer="ratings"><td><a href="/service/ratings">"#));
    assert_eq!(html.matches("<tr data-trace=").count(), 3);
    assert!(html.contains(r#"<a href="/trace/0000000000000000000000000000abc0">"#));
    // Each says whose sidecar answered, why, and under which configuration.
    assert!(
        html.contains(r#"<td class="reason">the app answered 500</td><td>its sidecar</td>"#),
        "{html}"
    );
    assert!(html.contains(r#"<td class="reason">upstream connect error or disconnect to 10.0.0.7:9080: connection refused</td><td>reviews&#39;s sidecar</td>"#), "{html}");
    assert!(html.contains("<code>00000000c0ffee00</code>"));
    // Per-route RED, busiest first.
    assert!(
        html.contains(r#"<tr data-route="GET /reviews/{id}"><td>GET</td><td><code>/reviews/{id}</code></td><td>1.50</td><td class="failing">10.0%</td><td>2.0</td><td>8.0</td><td>11.0</td><td>90</td></tr>"#),
        "{html}"
    );
    assert!(html.contains(r#"<tr data-route="GET /health">"#));
    let crumbs = html
        .split("<nav class=\"crumbs\"")
        .nth(1)
        .and_then(|s| s.split("</nav>").next())
        .unwrap_or_default();
    assert!(
        crumbs.contains("range=1h") && crumbs.contains("service graph</a>"),
        "back to the graph, same range: {crumbs}"
    );

    let (status, html) = get(Fake(Ok(bookinfo())), "/service/nonesuch").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(html.contains("No such service"));
    let (status, _) = get(Fake(Ok(bookinfo())), "/service/reviews?range=forever").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_trace_page_draws_the_waterfall_and_refuses_bad_ids() {
    let (status, html) = get(
        Fake(Ok(bookinfo())),
        "/trace/000000000000000000000000000000c0",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(html.matches("<li class=\"span").count(), 2);
    assert!(
        html.contains("db &#60;script&#62;") || html.contains("db &lt;script&gt;"),
        "escaped"
    );
    assert!(html.contains(r#"data-critical="true""#));
    assert!(html.contains(r#"<a href="/service/ratings">ratings</a>"#));
    for (uri, status) in [
        ("/trace/xyz", StatusCode::BAD_REQUEST),
        (
            "/trace/0123456789abcdef0123456789abcdef00",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/trace/000000000000000000000000000000c1",
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (got, html) = get(Fake(Ok(bookinfo())), uri).await;
        assert_eq!(got, status, "{uri}");
        assert!(html.contains(r#"<a href="/">"#), "{uri}");
    }
}

#[tokio::test]
async fn the_sql_console_runs_queries_lists_tables_and_downloads_csv() {
    let (status, html) = get(Fake(Ok(bookinfo())), "/sql").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("FROM spans"), "an example to start from");
    assert!(html.contains(r#"<details data-table="spans">"#));
    let (status, html) = get(
        Fake(Ok(bookinfo())),
        "/sql?q=SELECT%20service_name%2C%20count(*)%20AS%20n%20FROM%20spans%20LIMIT%202",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("<td>ratings</td><td>12</td>"), "{html}");
    assert!(html.contains("cut at the 2-row limit"));
    assert!(
        html.contains(r#"href="/sql.csv?q=SELECT%20service_name"#),
        "{html}"
    );
    for (q, status) in [
        ("COPY%20x%20TO%20%27%2Ftmp%2Fx%27", StatusCode::FORBIDDEN),
        ("SELEKT", StatusCode::BAD_REQUEST),
    ] {
        let (got, html) = get(Fake(Ok(bookinfo())), &format!("/sql?q={q}")).await;
        assert_eq!(got, status, "{q}");
        assert!(
            html.contains(r#"id="sql-error""#),
            "{q}: the error on the page"
        );
        assert!(html.contains("<textarea"), "{q}: with the query to fix");
    }
    let (status, csv) = get(Fake(Ok(bookinfo())), "/sql.csv?q=SELECT%201").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        csv,
        "service_name,n\r\nratings,12\r\n\"a \"\"quoted\"\", name\",3\r\n"
    );
    let (status, _) = get(Fake(Ok(bookinfo())), "/sql.csv").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_proxy_page_reads_the_control_plane_and_says_when_it_cannot() {
    let get_with = |control: Option<String>| async move {
        let app = router_with(
            Arc::new(Fake(Ok(bookinfo()))),
            DashboardOptions {
                control_url: control,
            },
        );
        let resp = app
            .oneshot(
                Request::get("/proxies")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    };
    let (status, html) = get_with(None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("No control plane is configured"));

    // A control plane on loopback answering /debug/syncz as lumen control does.
    let syncz = r#"[{"node_id":"sidecar~127.0.10.3~reviews-v1.default~default.svc.cluster.local","connected_at_unix":1,
        "types":{"CDS":{"state":"SYNCED","sent_version":"a","acked_version":"a","resources":3,"nack":null},
                 "EDS":{"state":"SYNCED","sent_version":"b","acked_version":"b","resources":3,"nack":null},
                 "LDS":{"state":"NACK","sent_version":"c","acked_version":"","resources":1,"nack":"bad route"}}}]"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // And /debug/config from the control plane's own code over the demo's resources.
    let mut model = lumen_control::model::Model::from_yaml(
        "bookinfo.yaml",
        include_str!("../../fixtures/demo/bookinfo.yaml"),
    )
    .expect("demo");
    model
        .add_yaml(
            "routing.yaml",
            include_str!("../../fixtures/demo/routing.yaml"),
        )
        .expect("routing");
    // And one resource refused: the page says which and why.
    model
        .add_yaml(
            "typo.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec: {hosts: [ratings], http: [{route: [{destination: {hots: ratings}}]}]}\n",
        )
        .expect("read");
    let config = serde_json::to_string(&lumen_control::debug::dump(&model)).expect("json");
    let control = axum::Router::new()
        .route(
            "/debug/syncz",
            axum::routing::get(
                move || async move { ([("content-type", "application/json")], syncz) },
            ),
        )
        .route(
            "/debug/config",
            axum::routing::get(
                move || async move { ([("content-type", "application/json")], config) },
            ),
        );
    tokio::spawn(async move { axum::serve(listener, control).await });
    let (status, html) = get_with(Some(format!("http://{addr}"))).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains(r#"data-healthy="false""#));
    assert!(html.contains(r#"data-state="NACKED""#) && html.contains("bad route"));
    assert!(html.contains(r#"data-state="NOT SENT""#), "RDS never sent");
    // The routes and subsets that apply to each service.
    let reviews = html
        .split(r#"<article class="service-config" id="svc-reviews""#)
        .nth(1)
        .and_then(|rest| rest.split("</article>").next())
        .expect("a reviews section");
    assert!(
        reviews.contains("VirtualService default/reviews"),
        "{reviews}"
    );
    assert!(reviews.contains(
        r#"<span class="destination">reviews.default.svc.cluster.local subset v1 50%</span><br><span class="destination">reviews.default.svc.cluster.local subset v2 50%</span>"#
    ), "{reviews}");
    assert!(reviews.contains(r#"<tr data-subset="v2"><td>v2</td><td><code>version=v2</code></td><td class="healthy">1</td></tr>"#), "{reviews}");
    assert!(html.contains(r#"id="svc-details""#) && html.contains("every request"));
    assert!(html.contains("1 resource refused"), "{html}");
    assert!(
        html.contains(r#"<tr data-rejected="VirtualService/default/ratings"><td>VirtualService default/ratings</td><td><code>typo.yaml</code></td><td>spec.http[0].route[0].destination.hots: unknown field `hots`"#),
        "{html}"
    );

    // Nothing listening there any more: a 502 page that says so.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gone = closed.local_addr().expect("addr");
    drop(closed);
    let (status, html) = get_with(Some(format!("http://{gone}"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(html.contains("could not be read"), "{html}");
}

#[tokio::test]
async fn the_trace_search_finds_traces_and_draws_their_durations() {
    let (status, html) = get(Fake(Ok(bookinfo())), "/traces").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Choose a service"));
    assert!(html.contains(r#"<option value="ratings">ratings</option>"#));
    let (status, html) = get(
        Fake(Ok(bookinfo())),
        "/traces?service=ratings&operation=&tag=&lookback=1h&minDuration=&maxDuration=&limit=",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(html.matches("<tr data-trace=").count(), 4);
    assert_eq!(
        html.matches("<circle class=").count(),
        4,
        "one dot per trace"
    );
    assert_eq!(
        html.matches(r#"<circle class="c4""#).count(),
        1,
        "the one with errors in red"
    );
    assert!(html.contains(r#"<a href="/trace/00000000000000000000000000000f02">"#));
    assert!(
        html.contains(r#"<option value="ratings" selected>"#),
        "the form keeps its values"
    );
    for uri in [
        "/traces?service=ratings&minDuration=fast",
        "/traces?service=ratings&lookback=1h&minDuration=2s&maxDuration=1s",
        "/traces?service=ratings&limit=999999",
        "/traces?service=ratings&tag=novalue",
    ] {
        let (status, html) = get(Fake(Ok(bookinfo())), uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {html}");
    }
}

/// The theme's custom properties (`--name: #hex`) in a CSS block.
fn css_colors(block: &str) -> BTreeMap<String, [f64; 3]> {
    let mut out = BTreeMap::new();
    for piece in block.split("--").skip(1) {
        let Some((name, rest)) = piece.split_once(':') else {
            continue;
        };
        let value = rest.trim_start();
        let Some(hex) = value.strip_prefix('#') else {
            continue;
        };
        let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
        let full: String = match hex.len() {
            3 | 4 => hex.chars().take(3).flat_map(|c| [c, c]).collect(),
            6 | 8 => hex[..6].to_string(),
            _ => continue,
        };
        let channel =
            |i: usize| f64::from(u8::from_str_radix(&full[i..i + 2], 16).unwrap_or(0)) / 255.0;
        out.insert(
            name.trim().to_string(),
            [channel(0), channel(2), channel(4)],
        );
    }
    out
}

/// WCAG 2 contrast ratio of two sRGB colours.
fn contrast(a: [f64; 3], b: [f64; 3]) -> f64 {
    let lum = |c: [f64; 3]| {
        let lin = |x: f64| {
            if x <= 0.039_28 {
                x / 12.92
            } else {
                ((x + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])
    };
    let (la, lb) = (lum(a), lum(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[test]
fn both_themes_have_sufficient_contrast() {
    let css = include_str!("../templates/base.html");
    let dark_at = css
        .find("@media (prefers-color-scheme: dark)")
        .expect("a dark theme");
    let light = css_colors(&css[css.find(":root").expect(":root")..dark_at]);
    let mut dark = light.clone();
    dark.extend(css_colors(&css[dark_at..]));
    // Text (WCAG AA, 4.5:1) and what it is drawn on.
    let text = [
        ("fg", "bg"),
        ("fg", "card"),
        ("fg", "node"),
        ("fg", "group"),
        ("fg", "label-bg"),
        ("fg", "degraded-bg"),
        ("fg", "failing-bg"),
        ("muted", "bg"),
        ("muted", "card"),
        ("muted", "group"),
        ("degraded", "card"),
        ("degraded", "degraded-bg"),
        ("failing", "card"),
        ("failing", "failing-bg"),
        ("link", "card"),
        ("link", "bg"),
    ];
    // Lines, outlines and chart series (non-text contrast, 3:1).
    let graphics = [
        ("node-line", "card"),
        ("edge", "card"),
        ("idle", "card"),
        ("focus", "card"),
        ("focus", "bg"),
        ("c0", "card"),
        ("c1", "card"),
        ("c2", "card"),
        ("c3", "card"),
        ("c4", "card"),
        ("c5", "card"),
    ];
    for (theme, colors) in [("light", &light), ("dark", &dark)] {
        let get = |name: &str| {
            *colors
                .get(name)
                .unwrap_or_else(|| panic!("{theme} theme has no --{name}"))
        };
        for (pairs, min) in [(&text[..], 4.5), (&graphics[..], 3.0)] {
            for (fg, bg) in pairs {
                let ratio = contrast(get(fg), get(bg));
                assert!(
                    ratio >= min,
                    "{theme}: --{fg} on --{bg} is {ratio:.2}:1, below {min}:1"
                );
            }
        }
    }
}
