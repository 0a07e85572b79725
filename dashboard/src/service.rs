//! The service page: golden signals over time, who calls it and whom it calls, its versions
//! side by side (a canary against its baseline, with whether the difference in errors is
//! significant), and its recent failed requests, each linking to its trace.

use lumen_telemetry::detail::{FailedRequest, RouteSignals};
use lumen_telemetry::graph::{Graph, Minute, Signals};

use crate::chart::{self, Chart, Series};
use crate::view::{Figures, GraphParams, Health, RANGES};

/// A row of the callers or callees table.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRow {
    pub peer: String,
    pub figures: Figures,
    pub health: Health,
}

/// One route the service served, with its RED.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    pub method: String,
    pub route: String,
    pub figures: Figures,
    pub health: Health,
}

/// Routes the page lists (the busiest).
pub const ROUTE_ROWS: usize = 25;

/// One version beside the baseline (the first version by name).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub version: String,
    pub figures: Figures,
    pub health: Health,
    /// Error share minus the baseline's, percentage points ("" for the baseline).
    pub error_diff: String,
    pub p99_diff: String,
    /// Two-sided p-value of a two-proportion z-test on the error shares.
    pub p_value: String,
    pub significant: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailedRow {
    pub time: String,
    pub version: String,
    pub status: String,
    pub flags: String,
    pub caller: String,
    pub duration_ms: String,
    pub operation: String,
    pub message: String,
    pub trace_id: String,
    /// Whose sidecar answered: the service's own, or the caller's (it never arrived).
    pub answered_by: String,
    /// Why, in words: the sidecar's reason for a local reply, else what the app answered.
    pub reason: String,
    pub config_version: String,
}

/// Everything the service page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub params: GraphParams,
    pub summary: Figures,
    pub health: Health,
    pub charts: Vec<Chart>,
    pub inbound: Vec<PeerRow>,
    pub outbound: Vec<PeerRow>,
    pub versions: Vec<VersionRow>,
    pub baseline: String,
    pub routes: Vec<RouteRow>,
    pub failed: Vec<FailedRow>,
}

/// Failed requests the page lists.
pub const FAILED_ROWS: usize = 20;

impl ServiceView {
    /// `None` when the service has no node in the graph and no minute of data: unknown here.
    pub fn build(
        name: &str,
        graph: &Graph,
        minutes: &[Minute],
        failed: &[FailedRequest],
        routes: &[RouteSignals],
        params: &GraphParams,
    ) -> Option<ServiceView> {
        let t = params.thresholds;
        let node = graph
            .nodes
            .iter()
            .find(|n| n.kind == "service" && n.id == name);
        if node.is_none() && minutes.is_empty() {
            return None;
        }
        let signals = node.map(|n| n.signals.clone()).unwrap_or_default();
        let peers = |inbound: bool| -> Vec<PeerRow> {
            graph
                .edges
                .iter()
                .filter(|e| {
                    if inbound {
                        e.target == name
                    } else {
                        e.source == name
                    }
                })
                .map(|e| PeerRow {
                    peer: if inbound {
                        e.source.clone()
                    } else {
                        e.target.clone()
                    },
                    figures: Figures::of(&e.signals),
                    health: Health::of(&e.signals, t),
                })
                .collect()
        };
        let mut versions: Vec<&lumen_telemetry::graph::Node> = graph
            .nodes
            .iter()
            .filter(|n| n.kind == "workload" && n.service == name)
            .collect();
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        let baseline = versions.first().map(|n| n.signals.clone());
        let versions: Vec<VersionRow> = versions
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let s = &n.signals;
                let (error_diff, p99_diff, p_value, significant) = match (&baseline, i) {
                    (Some(b), i) if i > 0 => {
                        let p = two_proportion_p(b.errors, b.requests, s.errors, s.requests);
                        (
                            format!("{:+.2}", (s.error_share - b.error_share) * 100.0),
                            format!("{:+.1}", s.p99_ms - b.p99_ms),
                            p.map_or_else(|| "–".into(), |p| format!("{p:.3}")),
                            p.is_some_and(|p| p < 0.05),
                        )
                    }
                    _ => (String::new(), String::new(), String::new(), false),
                };
                VersionRow {
                    version: n.version.clone().unwrap_or_default(),
                    figures: Figures::of(s),
                    health: Health::of(s, t),
                    error_diff,
                    p99_diff,
                    p_value,
                    significant,
                }
            })
            .collect();
        let baseline = versions
            .first()
            .map(|v| v.version.clone())
            .unwrap_or_default();
        Some(ServiceView {
            name: name.to_string(),
            params: params.clone(),
            summary: Figures::of(&signals),
            health: Health::of(&signals, t),
            charts: charts(minutes, params),
            inbound: peers(true),
            outbound: peers(false),
            versions,
            baseline,
            routes: routes
                .iter()
                .map(|r| {
                    let signals = Signals {
                        requests: r.requests,
                        errors: r.errors,
                        rps: r.requests as f64 / graph.seconds.max(1.0),
                        error_share: if r.requests > 0 {
                            r.errors as f64 / r.requests as f64
                        } else {
                            0.0
                        },
                        p50_ms: r.p50_ms,
                        p95_ms: r.p95_ms,
                        p99_ms: r.p99_ms,
                        request_bytes: 0,
                        response_bytes: 0,
                    };
                    RouteRow {
                        method: r.method.clone(),
                        route: r.route.clone(),
                        figures: Figures::of(&signals),
                        health: Health::of(&signals, t),
                    }
                })
                .collect(),
            failed: failed.iter().map(failed_row).collect(),
        })
    }

    pub fn range_label(&self) -> String {
        RANGES
            .iter()
            .find(|(k, _, _)| *k == self.params.range)
            .map_or_else(|| "custom range".to_string(), |(_, _, l)| l.to_string())
    }

    pub fn action(&self) -> String {
        format!("/service/{}", self.name)
    }

    pub fn show_view(&self) -> bool {
        false
    }

    pub fn namespaces(&self) -> Vec<String> {
        Vec::new()
    }

    pub fn namespace_selected(&self, _ns: &str) -> bool {
        false
    }

    /// The graph page with this page's range and thresholds.
    pub fn graph_url(&self) -> String {
        self.params.url_with("view", &self.params.view)
    }
}

/// Rate and error share per version (and all together), latency percentiles of all.
fn charts(minutes: &[Minute], params: &GraphParams) -> Vec<Chart> {
    let mut by_version: Vec<(String, Vec<&Minute>)> = Vec::new();
    for m in minutes {
        let name = m.version.clone().unwrap_or_else(|| "all".into());
        match by_version.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(m),
            None => by_version.push((name, vec![m])),
        }
    }
    let series = |f: &dyn Fn(&Minute) -> f64| -> Vec<Series> {
        by_version
            .iter()
            .map(|(name, list)| Series {
                name: name.clone(),
                points: list.iter().map(|m| (m.minute_ns, f(m))).collect(),
            })
            .collect()
    };
    let all: Vec<&Minute> = minutes.iter().filter(|m| m.version.is_none()).collect();
    type Pick = fn(&lumen_telemetry::graph::Signals) -> f64;
    let picks: [(&str, Pick); 3] = [
        ("p50", |s| s.p50_ms),
        ("p95", |s| s.p95_ms),
        ("p99", |s| s.p99_ms),
    ];
    let latency: Vec<Series> = picks
        .iter()
        .map(|(name, pick)| Series {
            name: (*name).to_string(),
            points: all
                .iter()
                .map(|m| (m.minute_ns, pick(&m.signals)))
                .collect(),
        })
        .collect();
    let (start, end) = (params.start_ns, params.end_ns);
    vec![
        chart::line_chart(
            "Request rate",
            "requests/s",
            &series(&|m| m.signals.rps),
            start,
            end,
        ),
        chart::line_chart(
            "Success rate",
            "% of requests",
            &series(&|m| 100.0 - m.signals.error_share * 100.0),
            start,
            end,
        ),
        chart::line_chart("Latency", "ms", &latency, start, end),
    ]
}

fn failed_row(f: &FailedRequest) -> FailedRow {
    let secs = f.start_ns.div_euclid(1_000_000_000).rem_euclid(86_400);
    FailedRow {
        time: format!(
            "{:02}:{:02}:{:02}",
            secs / 3600,
            (secs % 3600) / 60,
            secs % 60
        ),
        version: f.version.clone().unwrap_or_default(),
        status: f.status.map_or_else(String::new, |s| s.to_string()),
        flags: f.response_flags.clone().unwrap_or_default(),
        caller: f.caller.clone().unwrap_or_default(),
        duration_ms: format!("{:.1}", f.duration_ns as f64 / 1e6),
        operation: f.operation.clone(),
        message: f.message.clone().unwrap_or_default(),
        trace_id: f.trace_id.clone(),
        answered_by: if f.side == "client" {
            format!("{}'s sidecar", f.caller.as_deref().unwrap_or("the caller"))
        } else {
            "its sidecar".to_string()
        },
        reason: match (&f.reason, f.status) {
            (Some(r), _) => r.clone(),
            (None, Some(code)) => format!("the app answered {code}"),
            (None, None) => f.message.clone().unwrap_or_default(),
        },
        config_version: f.config_version.clone().unwrap_or_default(),
    }
}

/// Two-sided p-value of the two-proportion z-test (pooled), `None` when either side has no
/// requests or neither has an error.
pub fn two_proportion_p(e1: i64, n1: i64, e2: i64, n2: i64) -> Option<f64> {
    if n1 <= 0 || n2 <= 0 {
        return None;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let pooled = (e1 + e2) as f64 / (n1f + n2f);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    if se == 0.0 {
        return None;
    }
    let z = ((e1 as f64 / n1f) - (e2 as f64 / n2f)).abs() / se;
    Some((2.0 * (1.0 - normal_cdf(z))).clamp(0.0, 1.0))
}

/// Φ(z) through the complementary error function (Abramowitz and Stegun 7.1.26; error
/// below 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    let erf = if x >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_z_test_tells_a_real_difference_from_noise() {
        // 2% vs 10% over 1,000 requests each: significant.
        let p = two_proportion_p(20, 1000, 100, 1000).expect("p");
        assert!(p < 1e-6, "{p}");
        // 3% vs 3.5% over 200 each: noise.
        let p = two_proportion_p(6, 200, 7, 200).expect("p");
        assert!(p > 0.5, "{p}");
        assert_eq!(two_proportion_p(0, 100, 0, 100), None);
        assert_eq!(two_proportion_p(1, 0, 0, 100), None);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
    }
}
