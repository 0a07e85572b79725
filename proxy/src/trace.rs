//! W3C trace context (`traceparent`): parse what arrives, start a trace when nothing does,
//! and hand the next hop a child.

use std::fmt;

/// One span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// Parses a `traceparent` header (version 00; future versions are read by their first
    /// four fields as the spec asks). All-zero ids are invalid.
    pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        decode_hex(trace, &mut trace_id)?;
        decode_hex(span, &mut span_id)?;
        let mut flag = [0u8; 1];
        decode_hex(flags, &mut flag)?;
        u8::from_str_radix(version, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanContext {
            trace_id,
            span_id,
            sampled: flag[0] & 1 == 1,
        })
    }

    /// A new root span.
    pub fn new_root() -> SpanContext {
        SpanContext {
            trace_id: nonzero(rand::random),
            span_id: nonzero(rand::random),
            sampled: true,
        }
    }

    /// A new span in the same trace (its parent is `self`).
    pub fn child(&self) -> SpanContext {
        SpanContext {
            span_id: nonzero(rand::random),
            ..*self
        }
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

impl fmt::Display for SpanContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

fn nonzero<const N: usize>(mut gen_fn: impl FnMut() -> [u8; N]) -> [u8; N] {
    loop {
        let v = gen_fn();
        if v != [0; N] {
            return v;
        }
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn decode_hex(s: &str, out: &mut [u8]) -> Option<()> {
    let bytes = s.as_bytes();
    if bytes.len() != out.len() * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(bytes[2 * i])? << 4) | digit(bytes[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let ctx = SpanContext::parse_traceparent(EXAMPLE).expect("valid");
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), EXAMPLE);
    }

    #[test]
    fn child_keeps_trace_and_changes_span() {
        let ctx = SpanContext::parse_traceparent(EXAMPLE).expect("valid");
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanContext::parse_traceparent(bad), None, "{bad:?}");
        }
        // A future version may carry more fields.
        assert!(SpanContext::parse_traceparent(&format!("01{}-more", &EXAMPLE[2..])).is_some());
    }

    #[test]
    fn roots_are_valid_and_distinct() {
        let a = SpanContext::new_root();
        let b = SpanContext::new_root();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(SpanContext::parse_traceparent(&a.traceparent()), Some(a));
    }
}
