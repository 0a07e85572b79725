//! Trace context: continue the caller's trace (W3C `traceparent`, else B3 single `b3` or
//! multi `X-B3-*`) or start one, give this proxy's span its place in it, and tell the next
//! hop this span is its parent: always in `traceparent`, and in B3 too when the caller spoke
//! B3 (in the same form). `tracestate` goes through untouched; the caller's sampling
//! decision is kept.

use http::Request;

use super::error::ProxyError;
use super::observe::Observation;
use super::step::Step;
use crate::server::Body;
use crate::trace::SpanContext;

pub const TRACEPARENT: &str = "traceparent";
/// The same as a header name, made at compile time (a name built from text at run time is
/// an allocation a request).
const TRACEPARENT_NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);
pub const B3: &str = "b3";
/// Header names looked up on every request, made at compile time: a lookup by text parses
/// the name first.
const B3_NAME: http::HeaderName = http::HeaderName::from_static(B3);
const B3_TRACE_ID: http::HeaderName = http::HeaderName::from_static("x-b3-traceid");

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
        let headers = req.headers();
        let text = |name: &http::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let w3c = text(&TRACEPARENT_NAME).and_then(SpanContext::parse_traceparent);
        let b3_single = text(&B3_NAME).and_then(SpanContext::parse_b3_single);
        // B3's multiple headers start with the trace id: the rest are read only after it.
        let b3_multi = text(&B3_TRACE_ID).and_then(|_| {
            SpanContext::parse_b3_multi(|k| headers.get(k).and_then(|v| v.to_str().ok()))
        });
        let parent = w3c.or(b3_single).or(b3_multi);
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
        let (spoke_single, spoke_multi) = (b3_single.is_some(), b3_multi.is_some());
        let headers = req.headers_mut();
        if let Ok(v) = http::HeaderValue::from_bytes(&ctx.traceparent_bytes()) {
            headers.insert(TRACEPARENT_NAME, v);
        }
        if spoke_single && let Ok(v) = http::HeaderValue::from_str(&ctx.b3_single()) {
            headers.insert(B3, v);
        }
        if spoke_multi {
            let hex = crate::trace::hex;
            for (name, value) in [
                ("x-b3-traceid", hex(&ctx.trace_id)),
                ("x-b3-spanid", hex(&ctx.span_id)),
                ("x-b3-sampled", u8::from(ctx.sampled).to_string()),
            ] {
                if let Ok(v) = http::HeaderValue::from_str(&value) {
                    headers.insert(name, v);
                }
            }
            if let Some(p) = parent.filter(|_| w3c.is_none() && !spoke_single)
                && let Ok(v) = http::HeaderValue::from_str(&hex(&p.span_id))
            {
                headers.insert("x-b3-parentspanid", v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::observe::Direction;

    #[test]
    fn a_b3_caller_is_continued_in_b3_and_w3c() {
        let mut req = Request::new(crate::http::text_body(""));
        req.headers_mut().insert(
            B3,
            http::HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        );
        req.headers_mut().insert(
            "tracestate",
            http::HeaderValue::from_static("vendor=opaque"),
        );
        TraceContext::default().prepare(&mut req).expect("prepared");
        let h = req.headers();
        let b3 = h[B3].to_str().expect("text");
        assert!(
            b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-") && b3.ends_with("-0"),
            "{b3}"
        );
        assert!(!b3.contains("e457b5a2e4d86bd1"), "a new span id");
        let tp = h[TRACEPARENT].to_str().expect("text");
        assert!(
            tp.starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-") && tp.ends_with("-00"),
            "{tp}"
        );
        assert_eq!(h["tracestate"], "vendor=opaque");

        let mut req = Request::new(crate::http::text_body(""));
        for (k, v) in [
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ] {
            req.headers_mut()
                .insert(k, http::HeaderValue::from_static(v));
        }
        TraceContext::default().prepare(&mut req).expect("prepared");
        let h = req.headers();
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "1");
    }

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
