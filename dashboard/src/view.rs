//! The graph page's state (from its URL) and what it draws (from the telemetry graph).

use std::collections::{BTreeMap, BTreeSet};

use lumen_telemetry::graph::{Graph, Signals};
use lumen_telemetry::query_string;

use crate::layout::{self, NodeSpec, Rect};

/// Time ranges the picker offers, in seconds, with their URL spelling.
pub const RANGES: [(&str, i64, &str); 7] = [
    ("5m", 300, "last 5 minutes"),
    ("15m", 900, "last 15 minutes"),
    ("1h", 3600, "last hour"),
    ("6h", 21_600, "last 6 hours"),
    ("24h", 86_400, "last 24 hours"),
    ("7d", 604_800, "last 7 days"),
    ("30d", 2_592_000, "last 30 days"),
];
/// Auto-refresh choices, seconds (0: off).
pub const REFRESHES: [u64; 5] = [0, 5, 15, 30, 60];
pub const VIEWS: [(&str, &str); 3] = [
    ("service", "services"),
    ("versioned", "versioned apps"),
    ("workload", "workloads"),
];

/// Error share at which a node or edge is drawn degraded, and failing (percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub degraded_pct: f64,
    pub failing_pct: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            degraded_pct: 1.0,
            failing_pct: 10.0,
        }
    }
}

/// Health as the error share says it (no requests: idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded,
    Failing,
    Idle,
}

impl Health {
    pub fn of(s: &Signals, t: Thresholds) -> Health {
        let pct = s.error_share * 100.0;
        if s.requests == 0 {
            Health::Idle
        } else if pct >= t.failing_pct {
            Health::Failing
        } else if pct >= t.degraded_pct {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    pub fn class(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
            Health::Idle => "idle",
        }
    }
}

/// What the page's URL asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphParams {
    pub view: String,
    /// A preset of [`RANGES`], or "custom" when `start`/`end` were given.
    pub range: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub refresh_s: u64,
    pub thresholds: Thresholds,
    /// Namespaces to show (with the services their edges reach); empty: all.
    pub namespaces: Vec<String>,
}

impl GraphParams {
    /// Reads `view`, `range` (or `start` and `end`), `refresh`, `degraded` and `failing`;
    /// anything malformed is an error the page shows (a 400), never a guess.
    pub fn parse(query: Option<&str>, now_ns: i64) -> Result<GraphParams, String> {
        let pairs = query_string::pairs(query);
        let get = |k: &str| query_string::one(&pairs, k).filter(|v| !v.is_empty());
        let view = get("view").unwrap_or("service");
        if !VIEWS.iter().any(|(v, _)| *v == view) {
            return Err(format!(
                "view {view:?} is not one of: {}",
                VIEWS.map(|v| v.0).join(", ")
            ));
        }
        let (range, start_ns, end_ns) = if get("start").is_some() || get("end").is_some() {
            let (s, e) = lumen_telemetry::graph::window(query, now_ns)?;
            ("custom".to_string(), s, e)
        } else {
            let r = get("range").unwrap_or("15m");
            let Some((_, secs, _)) = RANGES.iter().find(|(k, _, _)| *k == r) else {
                return Err(format!(
                    "range {r:?} is not one of: {}",
                    RANGES.map(|r| r.0).join(", ")
                ));
            };
            (r.to_string(), now_ns - secs * 1_000_000_000, now_ns)
        };
        let refresh_s = match get("refresh") {
            None => 15,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| REFRESHES.contains(n))
                .ok_or_else(|| format!("refresh {v:?} is not one of {REFRESHES:?} seconds"))?,
        };
        let pct = |k: &str, default: f64| -> Result<f64, String> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| format!("{k} {v:?} is not a percentage from 0 to 100")),
            }
        };
        let d = Thresholds::default();
        let thresholds = Thresholds {
            degraded_pct: pct("degraded", d.degraded_pct)?,
            failing_pct: pct("failing", d.failing_pct)?,
        };
        if thresholds.degraded_pct > thresholds.failing_pct {
            return Err(format!(
                "degraded ({}%) is above failing ({}%)",
                thresholds.degraded_pct, thresholds.failing_pct
            ));
        }
        Ok(GraphParams {
            view: view.to_string(),
            range,
            start_ns,
            end_ns,
            refresh_s,
            thresholds,
            namespaces: lumen_telemetry::graph::namespaces_param(query)?,
        })
    }

    /// The page's URL with one parameter changed (links keep every other choice).
    pub fn url_with(&self, key: &str, value: &str) -> String {
        let mut pairs: Vec<(String, String)> = vec![
            ("view".into(), self.view.clone()),
            ("refresh".into(), self.refresh_s.to_string()),
            ("degraded".into(), self.thresholds.degraded_pct.to_string()),
            ("failing".into(), self.thresholds.failing_pct.to_string()),
        ];
        if !self.namespaces.is_empty() {
            pairs.push(("namespace".into(), self.namespaces.join(",")));
        }
        if self.range == "custom" {
            pairs.push(("start".into(), (self.start_ns / 1_000_000_000).to_string()));
            pairs.push(("end".into(), (self.end_ns / 1_000_000_000).to_string()));
        } else {
            pairs.push(("range".into(), self.range.clone()));
        }
        if key == "range" {
            pairs.retain(|(k, _)| k != "start" && k != "end" && k != "range");
        }
        pairs.retain(|(k, _)| k != key);
        pairs.push((key.into(), value.into()));
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        format!("/?{}", query.join("&"))
    }
}

pub(crate) fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One drawn node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub service: String,
    pub version: String,
    pub label: String,
    pub rect: Rect,
    pub health: Health,
    pub figures: Figures,
}

/// An app's box around its versions (versioned view).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub name: String,
    pub rect: Rect,
}

/// One drawn edge and its label.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeView {
    pub source: String,
    pub target: String,
    pub line: (f64, f64, f64, f64),
    pub label: Rect,
    pub lines: [String; 3],
    pub health: Health,
    pub figures: Figures,
}

/// A node's or edge's figures, formatted.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub requests: i64,
    pub rps: String,
    pub error_pct: String,
    pub p50: String,
    pub p95: String,
    pub p99: String,
    pub request_bytes: String,
    pub response_bytes: String,
}

impl Figures {
    pub(crate) fn of(s: &Signals) -> Figures {
        let per_request = |total: i64| {
            if s.requests > 0 {
                human_bytes(total as f64 / s.requests as f64)
            } else {
                "0 B".into()
            }
        };
        Figures {
            requests: s.requests,
            rps: format!("{:.2}", s.rps),
            error_pct: format!("{:.1}", s.error_share * 100.0),
            p50: ms(s.p50_ms),
            p95: ms(s.p95_ms),
            p99: ms(s.p99_ms),
            request_bytes: per_request(s.request_bytes),
            response_bytes: per_request(s.response_bytes),
        }
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn human_bytes(b: f64) -> String {
    if b >= 1_048_576.0 {
        format!("{:.1} MiB", b / 1_048_576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Everything the graph page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphView {
    pub params: GraphParams,
    pub width: f64,
    pub height: f64,
    pub groups: Vec<GroupView>,
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
    /// Service-level rows for the table, whatever the view.
    pub services: Vec<NodeView>,
    pub calls: Vec<EdgeView>,
    pub seconds: f64,
    /// Every namespace the window holds, for the filter.
    pub namespace_choices: Vec<String>,
}

/// Label text size: 11 px font, three lines.
const LABEL_CHAR_PX: f64 = 6.4;
const LABEL_H: f64 = 46.0;
const NODE_CHAR_PX: f64 = 7.6;
const NODE_H: f64 = 32.0;
/// An app box's title: 11 px bold.
const GROUP_CHAR_PX: f64 = 7.0;

impl GraphView {
    pub fn build(g: &Graph, params: &GraphParams) -> GraphView {
        let t = params.thresholds;
        let services: Vec<NodeView> = g
            .nodes
            .iter()
            .filter(|n| n.kind == "service")
            .map(|n| node(&n.id, &n.service, "", &n.service, &n.signals, t))
            .collect();
        let service_edges: Vec<(String, String, &Signals)> = g
            .edges
            .iter()
            .map(|e| (e.source.clone(), e.target.clone(), &e.signals))
            .collect();
        let (nodes, edges): (Vec<NodeView>, Vec<(String, String, &Signals)>) =
            if params.view == "service" {
                (services.clone(), service_edges.clone())
            } else {
                versioned_nodes(g, params.view == "workload", t)
            };
        // Labels are placed greedily in edge order: one order for the same data keeps the
        // picture still between refreshes.
        let mut edges = edges;
        edges.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let specs: Vec<NodeSpec> = nodes
            .iter()
            .map(|n| NodeSpec {
                id: n.id.clone(),
                group: n.service.clone(),
                w: layout::text_width(&n.label, NODE_CHAR_PX) + 24.0,
                h: NODE_H,
            })
            .collect();
        let texts: Vec<[String; 3]> = edges.iter().map(|(_, _, s)| label_lines(s)).collect();
        let sizes: Vec<(f64, f64)> = texts
            .iter()
            .map(|lines| {
                let widest = lines
                    .iter()
                    .map(|l| layout::text_width(l, LABEL_CHAR_PX))
                    .fold(0.0, f64::max);
                (widest + 12.0, LABEL_H)
            })
            .collect();
        let pairs: Vec<(String, String)> = edges
            .iter()
            .map(|(s, d, _)| (s.clone(), d.clone()))
            .collect();
        let boxes: layout::GroupBoxes = (params.view == "versioned").then(|| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n.service.clone(),
                        layout::text_width(&n.service, GROUP_CHAR_PX),
                    )
                })
                .collect()
        });
        let placed = layout::layout(&specs, &pairs, &sizes, &boxes);
        let mut nodes = nodes;
        for n in &mut nodes {
            if let Some(r) = placed.nodes.get(&n.id) {
                n.rect = *r;
            }
        }
        let groups: Vec<GroupView> = placed
            .groups
            .iter()
            .map(|(name, rect)| GroupView {
                name: name.clone(),
                rect: *rect,
            })
            .collect();
        let edges: Vec<EdgeView> = edges
            .iter()
            .zip(texts)
            .zip(&placed.labels)
            .filter_map(|(((s, d, signals), lines), label)| {
                let (a, b) = (placed.nodes.get(s)?, placed.nodes.get(d)?);
                let (x1, y1) = layout::exit_point(a, b);
                let (x2, y2) = layout::exit_point(b, a);
                Some(EdgeView {
                    source: s.clone(),
                    target: d.clone(),
                    line: (x1, y1, x2, y2),
                    label: *label,
                    lines,
                    health: Health::of(signals, t),
                    figures: Figures::of(signals),
                })
            })
            .collect();
        let calls = service_edges
            .iter()
            .map(|(s, d, signals)| EdgeView {
                source: s.clone(),
                target: d.clone(),
                line: (0.0, 0.0, 0.0, 0.0),
                label: Rect::centered(0.0, 0.0, 0.0, 0.0),
                lines: label_lines(signals),
                health: Health::of(signals, t),
                figures: Figures::of(signals),
            })
            .collect();
        GraphView {
            params: params.clone(),
            width: placed.width,
            height: placed.height,
            groups,
            nodes,
            edges,
            services: services
                .into_iter()
                .filter(|s| s.figures.requests > 0)
                .collect(),
            calls,
            seconds: g.seconds,
            namespace_choices: g.namespaces.clone(),
        }
    }

    pub fn action(&self) -> String {
        "/".to_string()
    }

    pub fn show_view(&self) -> bool {
        true
    }

    /// The namespaces to offer: those held, and any the URL asks for.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = self.namespace_choices.clone();
        all.extend(self.params.namespaces.iter().cloned());
        all.sort();
        all.dedup();
        all
    }

    pub fn namespace_selected(&self, ns: &str) -> bool {
        self.params.namespaces.iter().any(|n| n == ns)
    }

    pub fn range_label(&self) -> String {
        RANGES
            .iter()
            .find(|(k, _, _)| *k == self.params.range)
            .map_or_else(|| "custom range".to_string(), |(_, _, l)| l.to_string())
    }
}

fn node(
    id: &str,
    service: &str,
    version: &str,
    label: &str,
    s: &Signals,
    t: Thresholds,
) -> NodeView {
    NodeView {
        id: id.to_string(),
        service: service.to_string(),
        version: version.to_string(),
        label: label.to_string(),
        rect: Rect::centered(0.0, 0.0, 0.0, 0.0),
        health: Health::of(s, t),
        figures: Figures::of(s),
    }
}

fn label_lines(s: &Signals) -> [String; 3] {
    let f = Figures::of(s);
    [
        format!("{} rps · {}% errors", f.rps, f.error_pct),
        format!("p50 {} · p95 {} · p99 {} ms", f.p50, f.p95, f.p99),
        format!(
            "{} in · {} out per request",
            f.request_bytes, f.response_bytes
        ),
    ]
}

/// Version nodes (and services with no version: callers outside the mesh, callees never
/// reached) with caller-version → callee-version edges.
fn versioned_nodes(
    g: &Graph,
    workload_names: bool,
    t: Thresholds,
) -> (Vec<NodeView>, Vec<(String, String, &Signals)>) {
    let mut nodes = Vec::new();
    let mut versions_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in g.nodes.iter().filter(|n| n.kind == "workload") {
        let version = n.version.as_deref().unwrap_or_default();
        versions_of.entry(&n.service).or_default().push(version);
        let label = if workload_names {
            format!("{}-{version}", n.service)
        } else {
            version.to_string()
        };
        nodes.push(node(&n.id, &n.service, version, &label, &n.signals, t));
    }
    let id_of = |service: &str, version: Option<&str>| match version {
        Some(v) if versions_of.get(service).is_some_and(|vs| vs.contains(&v)) => {
            format!("{service}@{v}")
        }
        _ => service.to_string(),
    };
    let mut edges = Vec::new();
    let mut bare: BTreeSet<String> = BTreeSet::new();
    for e in &g.workload_edges {
        let s = id_of(&e.source, e.source_version.as_deref());
        let d = id_of(&e.target, e.target_version.as_deref());
        for (id, service) in [(&s, &e.source), (&d, &e.target)] {
            if !id.contains('@') {
                bare.insert(service.clone());
            }
        }
        edges.push((s, d, &e.signals));
    }
    for service in bare {
        if let Some(n) = g
            .nodes
            .iter()
            .find(|n| n.kind == "service" && n.id == service)
        {
            nodes.push(node(&n.id, &n.service, "", &n.service, &n.signals, t));
        }
    }
    (nodes, edges)
}
