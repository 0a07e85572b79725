//! Trace context: continue the caller's W3C trace (`traceparent`) or start one, give this
//! proxy's span its place in it, and tell the next hop this span is its parent.

use http::Request;

use super::error::ProxyError;
use super::observe::Observation;
use super::step::Step;
use crate::server::Body;
use crate::trace::SpanContext;

pub const TRACEPARENT: &str = "traceparent";

/// Continues or starts the trace; a trace it starts is sampled with probability `ratio`.
#[derive(Debug, Clone, Copy)]
pub struct TraceContext {
    pub ratio: f64,
}

impl Default for TraceContext {
    fn default() -> Self {
        TraceContext { ratio: 1.0 }
    }
}

impl Step for TraceContext {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let parent = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(SpanContext::parse_traceparent);
        // The caller's decision stands; a new trace is sampled at this proxy's ratio.
        let ctx = parent.map_or_else(
            || SpanContext {
                sampled: self.ratio >= 1.0 || rand::random::<f64>() < self.ratio,
                ..SpanContext::new_root()
            },
            |p| p.child(),
        );
        if let Some(o) = req.extensions().get::<Observation>() {
            o.update(|o| {
                o.span.context = ctx;
                o.span.parent = parent;
            });
        }
        if let Ok(v) = http::HeaderValue::from_str(&ctx.traceparent()) {
            req.headers_mut().insert(TRACEPARENT, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::observe::Direction;

    #[test]
    fn a_caller_trace_is_continued_and_a_missing_one_started() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut req = Request::new(crate::http::text_body(""));
        req.headers_mut()
            .insert(TRACEPARENT, http::HeaderValue::from_static(parent));
        let o = Observation::for_test(Direction::Inbound);
        req.extensions_mut().insert(o.clone());
        TraceContext::default().prepare(&mut req).expect("prepared");
        let sent = req.headers()[TRACEPARENT]
            .to_str()
            .expect("text")
            .to_string();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(!sent.contains("00f067aa0ba902b7"), "a new span id: {sent}");
        let mut seen = None;
        o.update(|o| seen = Some((o.span.parent, o.span.context)));
        let (parent_ctx, ctx) = seen.expect("record");
        assert_eq!(
            parent_ctx.map(|p| p.span_id),
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_eq!(ctx.traceparent(), sent);

        // No (or a malformed) traceparent: a new trace.
        let mut req = Request::new(crate::http::text_body(""));
        req.headers_mut()
            .insert(TRACEPARENT, http::HeaderValue::from_static("00-zz-bad"));
        TraceContext::default().prepare(&mut req).expect("prepared");
        let sent = req.headers()[TRACEPARENT].to_str().expect("text");
        assert!(SpanContext::parse_traceparent(sent).is_some(), "{sent}");
    }
}
