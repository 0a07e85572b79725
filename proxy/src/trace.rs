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
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// The `traceparent` header's bytes, written on the stack (the request path's form).
    pub fn traceparent_bytes(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[u8::from(self.sampled)], &mut out[53..55]);
        out
    }
}

/// A B3 trace or span id: 16 or 32 lowercase hex digits (a 64-bit trace id is the low half of
/// a 128-bit one, zero-padded as the B3 spec says).
fn b3_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    let text = text.trim().to_ascii_lowercase();
    let digits = text.len();
    if digits == N * 2 {
        decode_hex(&text, &mut out)?;
    } else if N == 16 && digits == 16 {
        decode_hex(&text, &mut out[8..])?;
    } else {
        return None;
    }
    (out != [0; N]).then_some(out)
}

/// B3's sampling state: `1`/`true` or `d` (debug) sample, `0`/`false` does not.
fn b3_sampled(text: &str) -> Option<bool> {
    match text.trim() {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

impl SpanContext {
    /// Parses B3's single header (`{trace}-{span}[-{sampled}[-{parent}]]`); a bare
    /// sampling decision (`0`) carries no context and is `None`. Unspecified sampling is
    /// sampled.
    pub fn parse_b3_single(value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let trace_id = b3_id::<16>(parts.next()?)?;
        let span_id = b3_id::<8>(parts.next()?)?;
        let sampled = match parts.next() {
            None => true,
            Some(s) => b3_sampled(s)?,
        };
        Some(SpanContext {
            trace_id,
            span_id,
            sampled,
        })
    }

    /// Parses B3's multiple headers, given a lookup of each (`X-B3-TraceId`, `X-B3-SpanId`,
    /// `X-B3-Sampled`, `X-B3-Flags`).
    pub fn parse_b3_multi<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<SpanContext> {
        let trace_id = b3_id::<16>(header("x-b3-traceid")?)?;
        let span_id = b3_id::<8>(header("x-b3-spanid")?)?;
        let debug = header("x-b3-flags").is_some_and(|f| f.trim() == "1");
        let sampled = debug
            || header("x-b3-sampled")
                .map(b3_sampled)
                .unwrap_or(Some(true))?;
        Some(SpanContext {
            trace_id,
            span_id,
            sampled,
        })
    }

    /// The B3 single header naming this span (the next hop's parent).
    pub fn b3_single(&self) -> String {
        format!(
            "{}-{}-{}",
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
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Lowercase hex of `bytes` into `out`, two digits a byte (`out` is twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
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
    fn b3_single_and_multi_are_read_as_the_spec_writes_them() {
        let ctx = SpanContext::parse_b3_single(
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )
        .expect("valid");
        assert_eq!(hex(&ctx.span_id), "e457b5a2e4d86bd1");
        assert!(ctx.sampled);
        // A 64-bit trace id is the low half.
        let short =
            SpanContext::parse_b3_single("a3ce929d0e0e4736-00f067aa0ba902b7-0").expect("valid");
        assert_eq!(hex(&short.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(!short.sampled);
        for bad in [
            "0",
            "d",
            "zz-00f067aa0ba902b7",
            "a3ce929d0e0e4736-00f067aa0ba902b7-x",
        ] {
            assert_eq!(SpanContext::parse_b3_single(bad), None, "{bad}");
        }
        let headers = [
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ];
        let multi =
            SpanContext::parse_b3_multi(|k| headers.iter().find(|(h, _)| *h == k).map(|(_, v)| *v))
                .expect("valid");
        assert!(multi.sampled, "debug means sampled");
        assert_eq!(
            multi.b3_single(),
            "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1"
        );
    }

    #[test]
    fn roots_are_valid_and_distinct() {
        let a = SpanContext::new_root();
        let b = SpanContext::new_root();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(SpanContext::parse_traceparent(&a.traceparent()), Some(a));
    }
}
