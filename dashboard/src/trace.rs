//! The trace page: every span of one trace as a waterfall (callers above their callees, bars
//! on one time axis), the critical path marked, errors highlighted, each span's attributes
//! and events a click away, and each service linking to its page.

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;

/// One span's row.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRow {
    pub span_id: String,
    pub parent_id: String,
    pub service: String,
    pub operation: String,
    pub kind: &'static str,
    pub depth: usize,
    /// Where the bar starts and how wide it is, in percent of the trace.
    pub left_pct: f64,
    pub width_pct: f64,
    pub offset_ms: f64,
    pub duration_ms: f64,
    pub error: bool,
    pub status_message: String,
    pub critical: bool,
    pub attributes: Vec<(String, String)>,
    pub events: Vec<EventRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub offset_ms: f64,
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

/// Everything the trace page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceView {
    pub trace_id: String,
    pub duration_ms: f64,
    pub start_ns: u64,
    pub spans: Vec<SpanRow>,
    pub services: Vec<String>,
    pub errors: usize,
}

struct Flat {
    id: Vec<u8>,
    parent: Vec<u8>,
    service: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An attribute value as text (arrays and maps as their JSON).
pub fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| text(Some(v))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|p| format!("{}={}", p.key, text(p.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Some(any_value::Value::StringValueStrindex(i)) => format!("#{i}"),
        None => String::new(),
    }
}

fn pairs(attrs: &[KeyValue]) -> Vec<(String, String)> {
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

impl TraceView {
    /// `None` when there is no span.
    pub fn build(trace_id: &str, resource_spans: &[ResourceSpans]) -> Option<TraceView> {
        let mut flat: Vec<Flat> = Vec::new();
        for rs in resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map_or_else(|| "unknown".to_string(), |kv| text(kv.value.as_ref()));
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    flat.push(Flat {
                        id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        service: service.clone(),
                        span: s.clone(),
                    });
                }
            }
        }
        if flat.is_empty() {
            return None;
        }
        let start = flat
            .iter()
            .map(|f| f.span.start_time_unix_nano)
            .min()
            .unwrap_or(0);
        let end = flat
            .iter()
            .map(|f| f.span.end_time_unix_nano.max(f.span.start_time_unix_nano))
            .max()
            .unwrap_or(start);
        let total = (end - start).max(1) as f64;
        // Children by parent, in start order; roots: no parent, or a parent not in the trace.
        let index: std::collections::HashMap<&[u8], usize> = flat
            .iter()
            .enumerate()
            .map(|(i, f)| (f.id.as_slice(), i))
            .collect();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); flat.len()];
        let mut roots = Vec::new();
        for (i, f) in flat.iter().enumerate() {
            match index.get(f.parent.as_slice()) {
                Some(&p) if !f.parent.is_empty() && p != i => children[p].push(i),
                _ => roots.push(i),
            }
        }
        let by_start = |a: &usize, b: &usize| {
            (flat[*a].span.start_time_unix_nano, &flat[*a].id)
                .cmp(&(flat[*b].span.start_time_unix_nano, &flat[*b].id))
        };
        roots.sort_by(by_start);
        for c in &mut children {
            c.sort_by(by_start);
        }
        // The critical path: from the root that ends last, each time the child that ends
        // last (what the end of the trace waited for).
        let end_of = |i: usize| flat[i].span.end_time_unix_nano;
        let mut critical = vec![false; flat.len()];
        let mut at = roots.iter().copied().max_by_key(|&i| end_of(i));
        let mut guard = 0;
        while let Some(i) = at {
            if critical[i] || guard > flat.len() {
                break;
            }
            critical[i] = true;
            guard += 1;
            at = children[i].iter().copied().max_by_key(|&c| end_of(c));
        }
        // Depth-first, so each span sits under its caller.
        // Spans in a parent cycle are reached from none of the roots: each starts a tree too.
        let mut order: Vec<(usize, usize)> = Vec::new();
        let mut seen = vec![false; flat.len()];
        for start in roots.iter().copied().chain(0..flat.len()) {
            let mut stack = vec![(start, 0)];
            while let Some((i, depth)) = stack.pop() {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                order.push((i, depth));
                for &c in children[i].iter().rev() {
                    stack.push((c, depth + 1));
                }
            }
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        let spans: Vec<SpanRow> = order
            .into_iter()
            .map(|(i, depth)| {
                let f = &flat[i];
                let s = &f.span;
                let duration = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano);
                let status = s.status.as_ref();
                SpanRow {
                    span_id: hex(&f.id),
                    parent_id: hex(&f.parent),
                    service: f.service.clone(),
                    operation: s.name.clone(),
                    kind: kind_name(s.kind),
                    depth,
                    left_pct: (s.start_time_unix_nano - start) as f64 / total * 100.0,
                    width_pct: (duration as f64 / total * 100.0).max(0.3),
                    offset_ms: ms(s.start_time_unix_nano - start),
                    duration_ms: ms(duration),
                    error: status.is_some_and(|st| st.code == 2),
                    status_message: status.map(|st| st.message.clone()).unwrap_or_default(),
                    critical: critical[i],
                    attributes: pairs(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| EventRow {
                            offset_ms: ms(e.time_unix_nano.saturating_sub(start)),
                            name: e.name.clone(),
                            attributes: pairs(&e.attributes),
                        })
                        .collect(),
                }
            })
            .collect();
        let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
        services.sort();
        services.dedup();
        Some(TraceView {
            trace_id: trace_id.to_string(),
            duration_ms: total / 1e6,
            start_ns: start,
            errors: spans.iter().filter(|s| s.error).count(),
            spans,
            services,
        })
    }

    /// The trace's start, UTC, to the millisecond.
    pub fn start_label(&self) -> String {
        let ms = self.start_ns / 1_000_000;
        let secs = (ms / 1000) % 86_400;
        format!(
            "{:02}:{:02}:{:02}.{:03} UTC",
            secs / 3600,
            (secs % 3600) / 60,
            secs % 60,
            ms % 1000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, Status, span};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn span(id: u8, parent: u8, start_ms: u64, end_ms: u64, error: bool) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 {
                Vec::new()
            } else {
                vec![parent; 8]
            },
            name: format!("op{id}"),
            kind: 2,
            start_time_unix_nano: start_ms * 1_000_000,
            end_time_unix_nano: end_ms * 1_000_000,
            status: error.then(|| Status {
                code: 2,
                message: "boom".into(),
            }),
            attributes: vec![kv("http.route", "/x")],
            events: vec![span::Event {
                time_unix_nano: (start_ms + 1) * 1_000_000,
                name: "retry".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn side(service: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn callers_above_callees_critical_path_and_errors() {
        // 1 (0-100) → 2 (10-40), 3 (20-95) → 4 (30-90, failed)
        let t = TraceView::build(
            "07",
            &[
                side("ratings", vec![span(4, 3, 30, 90, true)]),
                side(
                    "productpage",
                    vec![span(1, 0, 0, 100, false), span(2, 1, 10, 40, false)],
                ),
                side("reviews", vec![span(3, 1, 20, 95, false)]),
            ],
        )
        .expect("spans");
        let order: Vec<(&str, usize)> = t
            .spans
            .iter()
            .map(|s| (s.operation.as_str(), s.depth))
            .collect();
        assert_eq!(order, [("op1", 0), ("op2", 1), ("op3", 1), ("op4", 2)]);
        let critical: Vec<&str> = t
            .spans
            .iter()
            .filter(|s| s.critical)
            .map(|s| s.operation.as_str())
            .collect();
        assert_eq!(critical, ["op1", "op3", "op4"]);
        assert_eq!(t.errors, 1);
        assert_eq!(t.services, ["productpage", "ratings", "reviews"]);
        let s4 = &t.spans[3];
        assert!((s4.left_pct - 30.0).abs() < 1e-9 && (s4.width_pct - 60.0).abs() < 1e-9);
        assert_eq!(s4.status_message, "boom");
        assert_eq!(s4.events[0].name, "retry");
        assert!((s4.events[0].offset_ms - 31.0).abs() < 1e-9);
        assert_eq!(TraceView::build("x", &[]), None);
    }

    #[test]
    fn a_span_whose_parent_is_missing_is_a_root_and_cycles_end() {
        let t = TraceView::build(
            "07",
            &[side(
                "a",
                vec![
                    span(1, 9, 0, 10, false),
                    span(2, 3, 0, 5, false),
                    span(3, 2, 0, 5, false),
                ],
            )],
        )
        .expect("spans");
        assert_eq!(t.spans[0].operation, "op1");
        assert_eq!(t.spans[0].depth, 0);
        assert_eq!(t.spans.len(), 3, "every span shows, cycle or not");
    }
}
