//! The trace search page: Jaeger's search parameters (service, operation, `tag=key:value`,
//! lookback, minDuration, maxDuration, limit), the traces found as a duration-over-time
//! scatter and a table, each linking to its waterfall.

use lumen_telemetry::detail::TraceSummary;

use crate::chart::{self, Chart, Series};

/// Lookbacks the form offers (Jaeger's spelling).
pub const LOOKBACKS: [(&str, &str); 6] = [
    ("5m", "last 5 minutes"),
    ("15m", "last 15 minutes"),
    ("1h", "last hour"),
    ("6h", "last 6 hours"),
    ("24h", "last 24 hours"),
    ("168h", "last 7 days"),
];

/// One found trace, formatted.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    pub trace_id: String,
    pub time: String,
    pub root: String,
    pub duration_ms: String,
    pub spans: usize,
    pub errors: usize,
    pub services: String,
    /// Its dot in the scatter.
    pub x: f64,
    pub y: f64,
}

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesView {
    pub services: Vec<String>,
    /// The form's values, as given.
    pub service: String,
    pub operation: String,
    pub tag: String,
    pub lookback: String,
    pub min_duration: String,
    pub max_duration: String,
    pub limit: String,
    /// None until a search ran.
    pub rows: Option<Vec<TraceRow>>,
    pub scatter: Option<Chart>,
}

fn hms(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

impl TracesView {
    pub fn form(pairs: &[(String, String)], services: Vec<String>) -> TracesView {
        let get = |k: &str| {
            lumen_telemetry::query_string::one(pairs, k)
                .unwrap_or_default()
                .to_string()
        };
        let lookback = get("lookback");
        TracesView {
            services,
            service: get("service"),
            operation: get("operation"),
            tag: get("tag"),
            lookback: if lookback.is_empty() {
                "1h".into()
            } else {
                lookback
            },
            min_duration: get("minDuration"),
            max_duration: get("maxDuration"),
            limit: get("limit"),
            rows: None,
            scatter: None,
        }
    }

    /// Adds the search's results over `[start_ns, end_ns]`.
    pub fn with_results(mut self, found: &[TraceSummary], start_ns: i64, end_ns: i64) -> Self {
        let mut by_time: Vec<&TraceSummary> = found.iter().collect();
        by_time.sort_by_key(|t| t.start_ns);
        let series = Series {
            name: "traces".into(),
            points: by_time
                .iter()
                .map(|t| (t.start_ns, t.duration_ns as f64 / 1e6))
                .collect(),
        };
        let chart = chart::line_chart("Duration of each trace", "ms", &[series], start_ns, end_ns);
        let dots = chart
            .lines
            .first()
            .map(|l| l.dots.clone())
            .unwrap_or_default();
        let rows = by_time
            .iter()
            .zip(dots)
            .map(|(t, (x, y))| TraceRow {
                trace_id: t.trace_id.clone(),
                time: hms(t.start_ns),
                root: format!("{}: {}", t.root_service, t.root_operation),
                duration_ms: format!("{:.2}", t.duration_ns as f64 / 1e6),
                spans: t.spans,
                errors: t.errors,
                services: t.services.join(", "),
                x,
                y,
            })
            .rev()
            .collect();
        self.rows = Some(rows);
        self.scatter = Some(chart);
        self
    }
}
