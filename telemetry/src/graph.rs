//! `GET /api/v1/graph?start=&end=`: the service graph of a time window, from the one-minute
//! rollups (no scan of raw spans, no join). Nodes are services and their workload versions
//! (reviews and reviews v1 / v2, as Kiali's versioned-app graph draws them); edges are
//! caller → callee with request rate, error share, latency percentiles and bytes. `start`
//! and `end` are RFC 3339 times or seconds since the epoch; the window defaults to the last
//! ten minutes.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Int64Type, TimestampNanosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{col, lit};
use datafusion::prelude::SessionContext;
use serde::Serialize;
use serde_json::json;

use crate::query::{QueryEngine, QueryError};
use crate::rollup::quantile_ms;

const MINUTE_NS: i64 = 60_000_000_000;
/// The window when the request names none.
const DEFAULT_WINDOW_NS: i64 = 10 * MINUTE_NS;
/// The longest window one request may cover (the rollups are kept 90 days).
const MAX_WINDOW_NS: i64 = 90 * 24 * 60 * MINUTE_NS;

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/graph", get(graph))
        .with_state(engine)
}

/// Golden signals of a node or an edge over the window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Signals {
    pub requests: i64,
    pub errors: i64,
    /// Requests per second of data held in the window.
    pub rps: f64,
    /// Errors ÷ requests (0 when there were none).
    pub error_share: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub request_bytes: i64,
    pub response_bytes: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    /// `service` for a service node, `service@version` for a workload version.
    pub id: String,
    /// "service" or "workload".
    pub kind: &'static str,
    pub service: String,
    pub version: Option<String>,
    /// The service's namespace, where its spans or its callers' told it.
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

/// Calls from `source` to `target`; in `workload_edges`, from one version of the caller to
/// one version of the callee (the callee's version is known when its server span recorded
/// the call; a call that never reached it has none).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Edge {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_version: Option<String>,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Graph {
    pub start_ns: i64,
    pub end_ns: i64,
    /// Seconds of data the rates are divided by (the window, or less when the store holds
    /// less of it).
    pub seconds: f64,
    pub nodes: Vec<Node>,
    /// Service to service.
    pub edges: Vec<Edge>,
    /// Caller version to callee version (productpage@v1 → reviews@v2, reviews@v2 →
    /// ratings@v1).
    pub workload_edges: Vec<Edge>,
    /// Every namespace seen in the window, sorted (whatever filter was applied).
    pub namespaces: Vec<String>,
}

impl Graph {
    /// The part of the graph that concerns `namespaces` (Kiali's namespace selection): their
    /// services, every edge into or out of them, and the services at the far end of those
    /// edges, which stay as context. An empty selection keeps everything.
    pub fn in_namespaces(mut self, namespaces: &[String]) -> Graph {
        if namespaces.is_empty() {
            return self;
        }
        let ns_of: BTreeMap<String, Option<String>> = self
            .nodes
            .iter()
            .filter(|n| n.kind == "service")
            .map(|n| (n.service.clone(), n.namespace.clone()))
            .collect();
        let inside = |service: &str| {
            ns_of
                .get(service)
                .and_then(|ns| ns.as_ref())
                .is_some_and(|ns| namespaces.contains(ns))
        };
        let touches = |e: &Edge| inside(&e.source) || inside(&e.target);
        self.edges.retain(touches);
        self.workload_edges.retain(touches);
        let mut keep: std::collections::BTreeSet<String> =
            ns_of.keys().filter(|s| inside(s)).cloned().collect();
        for e in &self.edges {
            keep.insert(e.source.clone());
            keep.insert(e.target.clone());
        }
        self.nodes.retain(|n| keep.contains(&n.service));
        self
    }
}

/// The namespaces a request selects: `namespaces=a,b` (Kiali's spelling) or `namespace=a`,
/// each a Kubernetes name (DNS-1123 label).
pub fn namespaces_param(query: Option<&str>) -> Result<Vec<String>, String> {
    let pairs = crate::query_string::pairs(query);
    let mut out: Vec<String> = Vec::new();
    for (k, v) in &pairs {
        if k != "namespaces" && k != "namespace" {
            continue;
        }
        for ns in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let valid = ns.len() <= 63
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !ns.starts_with('-')
                && !ns.ends_with('-');
            if !valid {
                return Err(format!(
                    "{k}: {ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
                ));
            }
            if !out.iter().any(|o| o == ns) {
                out.push(ns.to_string());
            }
        }
    }
    Ok(out)
}

/// (caller, caller's version, callee, callee's version).
type EdgeKey = (String, Option<String>, String, Option<String>);

#[derive(Default)]
struct Acc {
    requests: i64,
    errors: i64,
    buckets: Vec<i64>,
    request_bytes: i64,
    response_bytes: i64,
}

impl Acc {
    fn add(&mut self, other: &Acc) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.request_bytes += other.request_bytes;
        self.response_bytes += other.response_bytes;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (b, c) in self.buckets.iter_mut().zip(&other.buckets) {
            *b += c;
        }
    }

    fn signals(&self, seconds: f64) -> Signals {
        Signals {
            requests: self.requests,
            errors: self.errors,
            rps: self.requests as f64 / seconds,
            error_share: if self.requests > 0 {
                self.errors as f64 / self.requests as f64
            } else {
                0.0
            },
            p50_ms: quantile_ms(&self.buckets, 0.50),
            p95_ms: quantile_ms(&self.buckets, 0.95),
            p99_ms: quantile_ms(&self.buckets, 0.99),
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
        }
    }
}

/// A time parameter: RFC 3339, or seconds since the epoch.
fn time_param(name: &str, text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.trim().parse::<i64>() {
        return secs
            .checked_mul(1_000_000_000)
            .filter(|ns| *ns >= 0)
            .ok_or_else(|| format!("{name}: {secs} s is outside 1970 to 2262"));
    }
    crate::query_string::rfc3339_ns(text)
        .ok_or_else(|| format!("{name}: {text:?} is neither RFC 3339 nor seconds since the epoch"))
}

/// The window a request asks for: `[start, end]` in ns.
pub fn window(query: Option<&str>, now_ns: i64) -> Result<(i64, i64), String> {
    let pairs = crate::query_string::pairs(query);
    let get = |k: &str| crate::query_string::one(&pairs, k);
    let end = get("end")
        .map(|v| time_param("end", v))
        .transpose()?
        .unwrap_or(now_ns);
    let start = get("start")
        .map(|v| time_param("start", v))
        .transpose()?
        .unwrap_or(end.saturating_sub(DEFAULT_WINDOW_NS));
    if start >= end {
        return Err("the window is empty or inverted: start must be before end".into());
    }
    if end - start > MAX_WINDOW_NS {
        return Err("the window is longer than the 90 days rollups are kept".into());
    }
    Ok((start, end))
}

fn timestamp(ns: i64) -> datafusion::logical_expr::Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(ns),
        Some("UTC".into()),
    ))
}

/// The graph of `[start_ns, end_ns]` from the rollups whose minute overlaps it.
pub async fn graph_of(
    engine: &QueryEngine,
    start_ns: i64,
    end_ns: i64,
    now_ns: i64,
) -> Result<Graph, QueryError> {
    let first_minute = start_ns.div_euclid(MINUTE_NS) * MINUTE_NS;
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("rollups").await?.filter(
                col("minute")
                    .gt_eq(timestamp(first_minute))
                    .and(col("minute").lt_eq(timestamp(end_ns)))
                    .and(col("last_ns").gt_eq(lit(start_ns)))
                    .and(col("first_ns").lt_eq(lit(end_ns))),
            )
        })
        .await?;
    let mut services: BTreeMap<String, Acc> = BTreeMap::new();
    let mut workloads: BTreeMap<(String, String), Acc> = BTreeMap::new();
    let mut edges: BTreeMap<EdgeKey, Acc> = BTreeMap::new();
    let mut ns_of: BTreeMap<String, String> = BTreeMap::new();
    let mut first_ns = i64::MAX;
    for batch in &batches {
        accumulate(
            batch,
            &mut services,
            &mut workloads,
            &mut edges,
            &mut ns_of,
            &mut first_ns,
        )?;
    }
    // Service-level edges: the versioned ones summed over the caller's versions.
    let mut service_edges: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for ((source, _, target, _), acc) in &edges {
        service_edges
            .entry((source.clone(), target.clone()))
            .or_default()
            .add(acc);
    }
    let held_end = end_ns.min(now_ns.max(start_ns + 1));
    let seconds = ((held_end - first_ns.max(start_ns)) as f64 / 1e9)
        .clamp(1.0, ((end_ns - start_ns) as f64 / 1e9).max(1.0));
    let mut nodes: Vec<Node> = Vec::new();
    for (service, acc) in &services {
        nodes.push(Node {
            id: service.clone(),
            kind: "service",
            service: service.clone(),
            version: None,
            namespace: ns_of.get(service).cloned(),
            signals: acc.signals(seconds),
        });
        for ((s, version), acc) in workloads.range((service.clone(), String::new())..) {
            if s != service {
                break;
            }
            nodes.push(Node {
                id: format!("{service}@{version}"),
                kind: "workload",
                service: service.clone(),
                version: Some(version.clone()),
                namespace: ns_of.get(service).cloned(),
                signals: acc.signals(seconds),
            });
        }
    }
    // A callee seen only as an edge's target (no server spans of its own) is still a node.
    for (_, _, target, _) in edges.keys() {
        if !services.contains_key(target) && !nodes.iter().any(|n| &n.id == target) {
            nodes.push(Node {
                id: target.clone(),
                kind: "service",
                service: target.clone(),
                version: None,
                namespace: ns_of.get(target).cloned(),
                signals: Acc::default().signals(seconds),
            });
        }
    }
    let workload_edges = edges
        .into_iter()
        .map(
            |((source, source_version, target, target_version), acc)| Edge {
                source,
                source_version,
                target,
                target_version,
                signals: acc.signals(seconds),
            },
        )
        .collect();
    let edges = service_edges
        .into_iter()
        .map(|((source, target), acc)| Edge {
            source,
            source_version: None,
            target,
            target_version: None,
            signals: acc.signals(seconds),
        })
        .collect();
    let mut namespaces: Vec<String> = ns_of.into_values().collect();
    namespaces.sort();
    namespaces.dedup();
    Ok(Graph {
        start_ns,
        end_ns,
        seconds,
        nodes,
        edges,
        workload_edges,
        namespaces,
    })
}

/// One minute of one service (one version of it, or all when `version` is `None`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Minute {
    pub minute_ns: i64,
    pub version: Option<String>,
    /// Per second of the minute.
    #[serde(flatten)]
    pub signals: Signals,
}

/// A service's RED per minute over `[start_ns, end_ns]` from the rollups: all versions
/// together (`version: None`), then each version, each in time order.
pub async fn service_minutes(
    engine: &QueryEngine,
    service: String,
    start_ns: i64,
    end_ns: i64,
) -> Result<Vec<Minute>, QueryError> {
    let first_minute = start_ns.div_euclid(MINUTE_NS) * MINUTE_NS;
    let batches = engine
        .frame(move |ctx: SessionContext| async move {
            ctx.table("rollups").await?.filter(
                col("kind")
                    .eq(lit("service"))
                    .and(col("service").eq(lit(service)))
                    .and(col("minute").gt_eq(timestamp(first_minute)))
                    .and(col("minute").lt_eq(timestamp(end_ns))),
            )
        })
        .await?;
    let mut by: BTreeMap<(Option<String>, i64), (Acc, i64)> = BTreeMap::new();
    for batch in &batches {
        for row in rows(batch)? {
            // The all-versions entry, and the row's own version's.
            for version in std::iter::once(None).chain(row.version.clone().map(Some)) {
                let e = by
                    .entry((version, row.minute_ns))
                    .or_insert_with(|| (Acc::default(), i64::MAX));
                e.0.add(&row.acc);
                e.1 = e.1.min(row.first_ns);
            }
        }
    }
    // A rate per second of the minute actually covered: the current minute is not over, and
    // the first minute of data may have started late.
    Ok(by
        .into_iter()
        .map(|((version, minute_ns), (acc, first_ns))| {
            let until = (minute_ns + MINUTE_NS).min(end_ns.max(minute_ns + 1));
            let from = minute_ns.max(first_ns.min(until - 1));
            let seconds = ((until - from) as f64 / 1e9).clamp(1.0, 60.0);
            Minute {
                minute_ns,
                version,
                signals: acc.signals(seconds),
            }
        })
        .collect())
}

/// One rollup row, read out of its batch.
struct Row {
    minute_ns: i64,
    edge: bool,
    source: Option<String>,
    source_version: Option<String>,
    service: String,
    version: Option<String>,
    namespace: Option<String>,
    source_namespace: Option<String>,
    first_ns: i64,
    acc: Acc,
}

/// The rows of a `rollups` batch.
fn rows(batch: &RecordBatch) -> Result<Vec<Row>, QueryError> {
    let bad = |name: &str| QueryError::Internal(format!("rollups column {name} missing"));
    let text = |name: &'static str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| bad(name))
    };
    let int = |name: &'static str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| bad(name))
    };
    let (kind, source, source_version, service, version) = (
        text("kind")?,
        text("source")?,
        text("source_version")?,
        text("service")?,
        text("version")?,
    );
    let (namespace, source_namespace) = (text("namespace")?, text("source_namespace")?);
    let (requests, errors, req_bytes, resp_bytes, first) = (
        int("requests")?,
        int("errors")?,
        int("request_bytes")?,
        int("response_bytes")?,
        int("first_ns")?,
    );
    let minute = batch
        .column_by_name("minute")
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        .ok_or_else(|| bad("minute"))?;
    let buckets = batch
        .column_by_name("latency_buckets")
        .and_then(|c| c.as_list_opt::<i32>())
        .ok_or_else(|| bad("latency_buckets"))?;
    let opt = |a: &datafusion::arrow::array::StringArray, i: usize| {
        a.is_valid(i).then(|| a.value(i).to_string())
    };
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let row = buckets.value(i);
        let counts = row
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| bad("latency_buckets"))?;
        out.push(Row {
            minute_ns: minute.value(i),
            edge: kind.value(i) == "edge",
            source: opt(source, i),
            source_version: opt(source_version, i),
            service: service.value(i).to_string(),
            version: opt(version, i),
            namespace: opt(namespace, i),
            source_namespace: opt(source_namespace, i),
            first_ns: first.value(i),
            acc: Acc {
                requests: requests.value(i),
                errors: errors.value(i),
                buckets: counts.values().to_vec(),
                request_bytes: req_bytes.value(i),
                response_bytes: resp_bytes.value(i),
            },
        });
    }
    Ok(out)
}

fn accumulate(
    batch: &RecordBatch,
    services: &mut BTreeMap<String, Acc>,
    workloads: &mut BTreeMap<(String, String), Acc>,
    edges: &mut BTreeMap<EdgeKey, Acc>,
    ns_of: &mut BTreeMap<String, String>,
    first_ns: &mut i64,
) -> Result<(), QueryError> {
    for row in rows(batch)? {
        *first_ns = (*first_ns).min(row.first_ns);
        // A service's namespace from its own rows, else from what its callers told.
        if let Some(ns) = row.namespace.clone() {
            ns_of.insert(row.service.clone(), ns);
        }
        if let (Some(src), Some(ns)) = (&row.source, &row.source_namespace) {
            ns_of.entry(src.clone()).or_insert_with(|| ns.clone());
        }
        if row.edge {
            let Some(src) = row.source else { continue };
            edges
                .entry((src, row.source_version, row.service, row.version))
                .or_default()
                .add(&row.acc);
        } else {
            services
                .entry(row.service.clone())
                .or_default()
                .add(&row.acc);
            if let Some(v) = row.version {
                workloads.entry((row.service, v)).or_default().add(&row.acc);
            }
        }
    }
    Ok(())
}

async fn graph(State(engine): State<QueryEngine>, RawQuery(query): RawQuery) -> Response {
    let now = crate::now_ns();
    let (start, end) = match window(query.as_deref(), now) {
        Ok(w) => w,
        Err(msg) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": msg, "kind": "parameter" })),
            )
                .into_response();
        }
    };
    let namespaces = match namespaces_param(query.as_deref()) {
        Ok(n) => n,
        Err(msg) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": msg, "kind": "parameter" })),
            )
                .into_response();
        }
    };
    match graph_of(&engine, start, end, now).await {
        Ok(g) => axum::Json(g.in_namespaces(&namespaces)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "graph query failed");
            let status = StatusCode::from_u16(e.status_of_own_plan())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (
                status,
                axum::Json(json!({ "error": e.to_string(), "kind": e.kind() })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(service: &str, namespace: Option<&str>) -> Node {
        Node {
            id: service.into(),
            kind: "service",
            service: service.into(),
            version: None,
            namespace: namespace.map(Into::into),
            signals: Signals::default(),
        }
    }

    fn edge(source: &str, target: &str) -> Edge {
        Edge {
            source: source.into(),
            source_version: None,
            target: target.into(),
            target_version: None,
            signals: Signals::default(),
        }
    }

    #[test]
    fn a_namespace_keeps_its_services_their_edges_and_the_far_ends() {
        let g = Graph {
            start_ns: 0,
            end_ns: 1,
            seconds: 1.0,
            nodes: vec![
                node("web", Some("front")),
                node("api", Some("back")),
                node("db", Some("data")),
                node("cache", Some("data")),
                node("external", None),
            ],
            edges: vec![
                edge("web", "api"),
                edge("api", "db"),
                edge("api", "external"),
                edge("db", "cache"),
            ],
            workload_edges: vec![edge("api", "db")],
            namespaces: vec!["back".into(), "data".into(), "front".into()],
        };
        let back = g.clone().in_namespaces(&["back".into()]);
        let names: Vec<&str> = back.nodes.iter().map(|n| n.service.as_str()).collect();
        assert_eq!(names, ["web", "api", "db", "external"]);
        assert_eq!(back.edges.len(), 3, "web→api, api→db, api→external");
        assert_eq!(back.workload_edges.len(), 1);
        assert_eq!(back.namespaces.len(), 3, "the choices stay");
        let data = g.clone().in_namespaces(&["data".into()]);
        let names: Vec<&str> = data.nodes.iter().map(|n| n.service.as_str()).collect();
        assert_eq!(names, ["api", "db", "cache"]);
        assert_eq!(g.clone().in_namespaces(&[]), g);
    }

    #[test]
    fn namespace_parameters_are_kubernetes_names() {
        assert_eq!(
            namespaces_param(Some("namespaces=a,b-2&namespace=a")),
            Ok(vec!["a".to_string(), "b-2".to_string()])
        );
        assert_eq!(namespaces_param(Some("namespace=")), Ok(vec![]));
        for bad in [
            "namespace=A",
            "namespace=-a",
            "namespace=a%2Fb",
            "namespace=a_b",
        ] {
            assert!(namespaces_param(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("namespace={}", "a".repeat(64));
        assert!(namespaces_param(Some(&long)).is_err());
    }

    #[test]
    fn windows_parse_and_refuse() {
        let now = 1_000 * 60 * 1_000_000_000;
        assert_eq!(window(None, now), Ok((now - DEFAULT_WINDOW_NS, now)));
        assert_eq!(
            window(Some("start=100&end=160"), now),
            Ok((100_000_000_000, 160_000_000_000))
        );
        assert_eq!(
            window(
                Some("start=1970-01-01T00:01:40Z&end=1970-01-01T00:02:40%2B00:00"),
                now
            ),
            Ok((100_000_000_000, 160_000_000_000))
        );
        for bad in [
            "start=200&end=100",
            "start=soon",
            "start=-5",
            "start=0&end=99999999999",
        ] {
            assert!(window(Some(bad), now).is_err(), "{bad}");
        }
    }
}
