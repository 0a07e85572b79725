//! Jaeger's UI model (what `/api/traces` answers) from OTLP spans, the way Jaeger v2's own
//! OTLP-to-Jaeger translation does it: the scope as `otel.scope.*` tags, attributes as typed
//! tags, `span.kind`, the status as `otel.status_code` / `error` / `otel.status_description`,
//! events as logs (their name as the `event` field), the parent as a CHILD_OF reference and
//! links as FOLLOWS_FROM, times in microseconds, one process per resource.

use serde::Serialize;
use serde_json::Value;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span, span};

/// One tag: `{"key", "type", "value"}` with Jaeger's type names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tag {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub value: Value,
}

impl Tag {
    fn string(key: &str, value: &str) -> Tag {
        Tag {
            key: key.to_string(),
            kind: "string",
            value: Value::String(value.to_string()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    #[serde(rename = "refType")]
    pub ref_type: &'static str,
    #[serde(rename = "traceID")]
    pub trace_id: String,
    #[serde(rename = "spanID")]
    pub span_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub timestamp: u64,
    pub fields: Vec<Tag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JaegerSpan {
    #[serde(rename = "traceID")]
    pub trace_id: String,
    #[serde(rename = "spanID")]
    pub span_id: String,
    #[serde(rename = "operationName")]
    pub operation_name: String,
    pub references: Vec<Reference>,
    #[serde(rename = "startTime")]
    pub start_time: u64,
    pub duration: u64,
    pub tags: Vec<Tag>,
    pub logs: Vec<Log>,
    #[serde(rename = "processID")]
    pub process_id: String,
    pub warnings: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Process {
    #[serde(rename = "serviceName")]
    pub service_name: String,
    pub tags: Vec<Tag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    #[serde(rename = "traceID")]
    pub trace_id: String,
    pub spans: Vec<JaegerSpan>,
    pub processes: serde_json::Map<String, Value>,
    pub warnings: Option<Vec<String>>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A trace id as Jaeger shows it: 16 hex digits when its high half is zero (a 64-bit id),
/// 32 otherwise.
pub fn trace_hex(id: &[u8]) -> String {
    match id.split_at_checked(8) {
        Some((high, low)) if id.len() == 16 && high.iter().all(|b| *b == 0) => hex(low),
        _ => hex(id),
    }
}

/// Largest integer a JavaScript number holds exactly; Jaeger's UI model writes bigger
/// int64 tags as strings.
const JS_SAFE_INT: i64 = (1 << 53) - 1;

/// An OTLP value as a Jaeger tag.
fn tag(key: &str, value: Option<&AnyValue>) -> Tag {
    let (kind, value) = match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => ("string", Value::String(s.clone())),
        Some(any_value::Value::BoolValue(b)) => ("bool", Value::Bool(*b)),
        Some(any_value::Value::IntValue(i)) if i.unsigned_abs() > JS_SAFE_INT as u64 => {
            ("int64", Value::String(i.to_string()))
        }
        Some(any_value::Value::IntValue(i)) => ("int64", Value::from(*i)),
        Some(any_value::Value::DoubleValue(d)) => ("float64", Value::from(*d)),
        Some(any_value::Value::BytesValue(b)) => ("binary", Value::String(base64(b))),
        Some(_) => (
            "string",
            Value::String(
                value
                    .map(crate::convert::any_value_text)
                    .unwrap_or_default(),
            ),
        ),
        None => ("string", Value::String(String::new())),
    };
    Tag {
        key: key.to_string(),
        kind,
        value,
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tags(attrs: &[KeyValue]) -> impl Iterator<Item = Tag> + '_ {
    attrs.iter().map(|kv| tag(&kv.key, kv.value.as_ref()))
}

fn kind_name(kind: i32) -> Option<&'static str> {
    match span::SpanKind::try_from(kind) {
        Ok(span::SpanKind::Server) => Some("server"),
        Ok(span::SpanKind::Client) => Some("client"),
        Ok(span::SpanKind::Producer) => Some("producer"),
        Ok(span::SpanKind::Consumer) => Some("consumer"),
        Ok(span::SpanKind::Internal) => Some("internal"),
        _ => None,
    }
}

fn micros(ns: u64) -> u64 {
    ns / 1_000
}

fn jaeger_span(s: &Span, scope: (&str, &str), process_id: &str) -> JaegerSpan {
    let trace_id = trace_hex(&s.trace_id);
    let mut references = Vec::new();
    if !s.parent_span_id.is_empty() {
        references.push(Reference {
            ref_type: "CHILD_OF",
            trace_id: trace_id.clone(),
            span_id: hex(&s.parent_span_id),
        });
    }
    references.extend(s.links.iter().map(|l| Reference {
        ref_type: "FOLLOWS_FROM",
        trace_id: trace_hex(&l.trace_id),
        span_id: hex(&l.span_id),
    }));
    let mut span_tags = Vec::with_capacity(s.attributes.len() + 5);
    if !scope.0.is_empty() {
        span_tags.push(Tag::string("otel.scope.name", scope.0));
    }
    if !scope.1.is_empty() {
        span_tags.push(Tag::string("otel.scope.version", scope.1));
    }
    // Attributes in a stable order (the store keeps some as columns, so the sender's own
    // order is not kept).
    let mut attrs: Vec<Tag> = tags(&s.attributes).collect();
    attrs.sort_by(|a, b| a.key.cmp(&b.key));
    span_tags.extend(attrs);
    if let Some(kind) = kind_name(s.kind) {
        span_tags.push(Tag::string("span.kind", kind));
    }
    if let Some(status) = &s.status {
        match status.code {
            1 => span_tags.push(Tag::string("otel.status_code", "OK")),
            2 => {
                span_tags.push(Tag::string("otel.status_code", "ERROR"));
                span_tags.push(Tag {
                    key: "error".into(),
                    kind: "bool",
                    value: Value::Bool(true),
                });
            }
            _ => {}
        }
        if !status.message.is_empty() {
            span_tags.push(Tag::string("otel.status_description", &status.message));
        }
    }
    if !s.trace_state.is_empty() {
        span_tags.push(Tag::string("w3c.tracestate", &s.trace_state));
    }
    let logs = s
        .events
        .iter()
        .map(|e| {
            let mut fields = Vec::with_capacity(e.attributes.len() + 1);
            if !e.name.is_empty() && !e.attributes.iter().any(|kv| kv.key == "event") {
                fields.push(Tag::string("event", &e.name));
            }
            fields.extend(tags(&e.attributes));
            Log {
                timestamp: micros(e.time_unix_nano),
                fields,
            }
        })
        .collect();
    JaegerSpan {
        trace_id,
        span_id: hex(&s.span_id),
        operation_name: s.name.clone(),
        references,
        start_time: micros(s.start_time_unix_nano),
        duration: micros(s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)),
        tags: span_tags,
        logs,
        process_id: process_id.to_string(),
        warnings: None,
    }
}

/// The traces among `resource_spans`, one per trace id in the order first seen, each with
/// its own process table (`p1`, `p2`, ... per distinct resource).
pub fn traces(resource_spans: &[ResourceSpans]) -> Vec<Trace> {
    let mut out: Vec<(Vec<u8>, Trace, Vec<Process>)> = Vec::new();
    // Trace id → its place in `out`.
    let mut index: std::collections::HashMap<Vec<u8>, usize> = std::collections::HashMap::new();
    for rs in resource_spans {
        let attrs = rs
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let service = attrs
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(crate::convert::any_value_text)
            .unwrap_or_else(|| "unknown_service".into());
        let process = Process {
            service_name: service,
            tags: tags(attrs).filter(|t| t.key != "service.name").collect(),
        };
        for ss in &rs.scope_spans {
            let scope = ss
                .scope
                .as_ref()
                .map_or(("", ""), |s| (s.name.as_str(), s.version.as_str()));
            for s in &ss.spans {
                let at = match index.get(&s.trace_id) {
                    Some(at) => *at,
                    None => {
                        index.insert(s.trace_id.clone(), out.len());
                        out.push((
                            s.trace_id.clone(),
                            Trace {
                                trace_id: trace_hex(&s.trace_id),
                                spans: Vec::new(),
                                processes: serde_json::Map::new(),
                                warnings: None,
                            },
                            Vec::new(),
                        ));
                        out.len() - 1
                    }
                };
                let (_, trace, processes) = &mut out[at];
                let pid = match processes
                    .iter()
                    .position(|p| p.service_name == process.service_name && p.tags == process.tags)
                {
                    Some(i) => format!("p{}", i + 1),
                    None => {
                        processes.push(process.clone());
                        format!("p{}", processes.len())
                    }
                };
                trace.spans.push(jaeger_span(s, scope, &pid));
            }
        }
    }
    out.into_iter()
        .map(|(_, mut trace, processes)| {
            for (i, p) in processes.into_iter().enumerate() {
                trace.processes.insert(
                    format!("p{}", i + 1),
                    serde_json::to_value(p).unwrap_or(Value::Null),
                );
            }
            trace
        })
        .collect()
}
