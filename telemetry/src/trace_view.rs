//! An OTLP trace export read in place: every string, id and byte field borrows the request's
//! bytes, so turning a request into rows copies each value once (into the Arrow builders),
//! where decoding it into prost's message tree first allocated a `String` per attribute key
//! and value, a `Vec` per id, and then freed them all. The same checks as prost's decode: wire
//! types of known fields, lengths, UTF-8 of strings; unknown fields are skipped. A message
//! field given twice is merged as protobuf says (repeated fields appended, the last scalar
//! kept). Arrays and key-value lists inside attribute values (rare) stay as bytes until
//! [`Value::text`] turns them into JSON text.

use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValueList, any_value};
use prost::Message;

use crate::wire::{WireError, skip, varint};

/// One field: its number and value as the wire carries it.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8], usize),
}

/// The fields of one message, in order; `base` is its offset in the whole request (for
/// errors).
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    base: usize,
}

fn fields(buf: &[u8], base: usize) -> Fields<'_> {
    Fields { buf, at: 0, base }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u32, Wire<'a>), WireError> {
        let (buf, base) = (self.buf, self.base);
        let tag = varint(buf, &mut self.at, base)?;
        let number = u32::try_from(tag >> 3).unwrap_or(u32::MAX);
        let wire = match tag & 7 {
            0 => Wire::Varint(varint(buf, &mut self.at, base)?),
            1 => {
                let end = skip(buf, self.at, 8, base)?;
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[self.at..end]);
                self.at = end;
                Wire::Fixed64(u64::from_le_bytes(b))
            }
            5 => {
                let end = skip(buf, self.at, 4, base)?;
                let mut b = [0u8; 4];
                b.copy_from_slice(&buf[self.at..end]);
                self.at = end;
                Wire::Fixed32(u32::from_le_bytes(b))
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut self.at, base)?).unwrap_or(usize::MAX);
                let end = skip(buf, self.at, len, base)?;
                let body = &buf[self.at..end];
                let offset = base + self.at;
                self.at = end;
                Wire::Len(body, offset)
            }
            _ => return Err(bad(base + self.at, "group or unknown wire type")),
        };
        Ok((number, wire))
    }
}

fn bad(offset: usize, what: &'static str) -> WireError {
    WireError { offset, what }
}

/// The field's wire type is not the one its number calls for.
fn mistyped(w: &Wire<'_>) -> WireError {
    let offset = match w {
        Wire::Len(_, at) => *at,
        _ => 0,
    };
    bad(offset, "a known field with the wrong wire type")
}

impl<'a> Wire<'a> {
    fn bytes(self) -> Result<&'a [u8], WireError> {
        match self {
            Wire::Len(b, _) => Ok(b),
            w => Err(mistyped(&w)),
        }
    }

    fn message(self) -> Result<(&'a [u8], usize), WireError> {
        match self {
            Wire::Len(b, at) => Ok((b, at)),
            w => Err(mistyped(&w)),
        }
    }

    fn string(self) -> Result<&'a str, WireError> {
        match self {
            Wire::Len(b, at) => {
                std::str::from_utf8(b).map_err(|_| bad(at, "a string that is not UTF-8"))
            }
            w => Err(mistyped(&w)),
        }
    }

    fn varint(self) -> Result<u64, WireError> {
        match self {
            Wire::Varint(v) => Ok(v),
            w => Err(mistyped(&w)),
        }
    }

    fn fixed64(self) -> Result<u64, WireError> {
        match self {
            Wire::Fixed64(v) => Ok(v),
            w => Err(mistyped(&w)),
        }
    }

    fn fixed32(self) -> Result<u32, WireError> {
        match self {
            Wire::Fixed32(v) => Ok(v),
            w => Err(mistyped(&w)),
        }
    }
}

/// An attribute value.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Value<'a> {
    #[default]
    None,
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    /// An `ArrayValue`'s bytes.
    Array(&'a [u8]),
    /// A `KeyValueList`'s bytes.
    Kvlist(&'a [u8]),
    /// An array or key-value list already decoded (attributes of a prost message).
    Any(&'a AnyValue),
}

impl<'a> Value<'a> {
    fn read(buf: &'a [u8], base: usize) -> Result<Value<'a>, WireError> {
        let mut v = Value::None;
        for f in fields(buf, base) {
            let (n, w) = f?;
            v = match n {
                1 => Value::Str(w.string()?),
                2 => Value::Bool(w.varint()? != 0),
                3 => Value::Int(w.varint()? as i64),
                4 => Value::Double(f64::from_bits(w.fixed64()?)),
                // Rare: checked whole here (strings inside included), as prost's decode
                // checks them, and kept as bytes until written as text.
                5 => {
                    let (b, at) = w.message()?;
                    ArrayValue::decode(b)
                        .map_err(|_| bad(at, "an array value that does not decode"))?;
                    Value::Array(b)
                }
                6 => {
                    let (b, at) = w.message()?;
                    KeyValueList::decode(b)
                        .map_err(|_| bad(at, "a key-value list that does not decode"))?;
                    Value::Kvlist(b)
                }
                7 => Value::Bytes(w.bytes()?),
                _ => continue,
            };
        }
        Ok(v)
    }

    /// The value as prost's `AnyValue` (arrays and lists decoded), for the rare values
    /// that are not a plain scalar.
    pub fn to_any(self) -> AnyValue {
        let value = match self {
            Value::None => None,
            Value::Str(s) => Some(any_value::Value::StringValue(s.to_string())),
            Value::Bool(b) => Some(any_value::Value::BoolValue(b)),
            Value::Int(i) => Some(any_value::Value::IntValue(i)),
            Value::Double(d) => Some(any_value::Value::DoubleValue(d)),
            Value::Bytes(b) => Some(any_value::Value::BytesValue(b.to_vec())),
            // Checked when read (see `Value::read`).
            Value::Array(b) => ArrayValue::decode(b).ok().map(any_value::Value::ArrayValue),
            Value::Kvlist(b) => KeyValueList::decode(b)
                .ok()
                .map(any_value::Value::KvlistValue),
            Value::Any(a) => return a.clone(),
        };
        AnyValue { value }
    }

    /// A prost `AnyValue` as a value (scalars borrowed, arrays and lists as they are).
    pub fn of(v: Option<&'a AnyValue>) -> Value<'a> {
        match v.and_then(|v| v.value.as_ref().map(|x| (v, x))) {
            None => Value::None,
            Some((_, any_value::Value::StringValue(s))) => Value::Str(s),
            Some((_, any_value::Value::BoolValue(b))) => Value::Bool(*b),
            Some((_, any_value::Value::IntValue(i))) => Value::Int(*i),
            Some((_, any_value::Value::DoubleValue(d))) => Value::Double(*d),
            Some((_, any_value::Value::BytesValue(b))) => Value::Bytes(b),
            Some((v, _)) => Value::Any(v),
        }
    }

    /// The value as text (arrays and key-value lists as JSON), as
    /// [`crate::convert::any_value_text`] writes it.
    pub fn text(self) -> String {
        match self {
            Value::Str(s) => s.to_string(),
            Value::Any(a) => crate::convert::any_value_text(a),
            other => crate::convert::any_value_text(&other.to_any()),
        }
    }

    /// The value as an integer: an int, a string holding one, or a double cut to one.
    pub fn int(self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(i),
            Value::Str(s) => s.parse().ok(),
            Value::Double(d) => Some(d as i64),
            _ => None,
        }
    }
}

/// A key and its value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kv<'a> {
    pub key: &'a str,
    pub value: Value<'a>,
}

/// An attribute, read in place or from a prost `KeyValue`: what the conversions take.
pub trait Attr {
    fn key(&self) -> &str;
    fn value(&self) -> Value<'_>;
}

impl Attr for Kv<'_> {
    fn key(&self) -> &str {
        self.key
    }

    fn value(&self) -> Value<'_> {
        self.value
    }
}

impl Attr for opentelemetry_proto::tonic::common::v1::KeyValue {
    fn key(&self) -> &str {
        &self.key
    }

    fn value(&self) -> Value<'_> {
        Value::of(self.value.as_ref())
    }
}

fn key_value(buf: &[u8], base: usize) -> Result<Kv<'_>, WireError> {
    let mut kv = Kv {
        key: "",
        value: Value::None,
    };
    for f in fields(buf, base) {
        match f? {
            (1, w) => kv.key = w.string()?,
            (2, w) => {
                let (b, at) = w.message()?;
                kv.value = Value::read(b, at)?;
            }
            _ => {}
        }
    }
    Ok(kv)
}

fn push_kv<'a>(out: &mut Vec<Kv<'a>>, w: Wire<'a>) -> Result<(), WireError> {
    let (b, at) = w.message()?;
    out.push(key_value(b, at)?);
    Ok(())
}

/// A span event.
#[derive(Debug, Default)]
pub struct Event<'a> {
    pub time_unix_nano: u64,
    pub name: &'a str,
    pub attributes: Vec<Kv<'a>>,
    pub dropped_attributes_count: u32,
}

/// A span link.
#[derive(Debug, Default)]
pub struct Link<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub trace_state: &'a str,
    pub attributes: Vec<Kv<'a>>,
    pub dropped_attributes_count: u32,
    pub flags: u32,
}

/// A span.
#[derive(Debug, Default)]
pub struct Span<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub trace_state: &'a str,
    pub parent_span_id: &'a [u8],
    pub flags: u32,
    pub name: &'a str,
    pub kind: i32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub attributes: Vec<Kv<'a>>,
    pub dropped_attributes_count: u32,
    pub events: Vec<Event<'a>>,
    pub dropped_events_count: u32,
    pub links: Vec<Link<'a>>,
    pub dropped_links_count: u32,
    pub status_message: &'a str,
    pub status_code: i32,
    /// Bytes of the span on the wire.
    pub encoded_len: usize,
}

impl<'a> Span<'a> {
    fn read(buf: &'a [u8], base: usize) -> Result<Span<'a>, WireError> {
        let mut s = Span {
            encoded_len: buf.len(),
            ..Span::default()
        };
        for f in fields(buf, base) {
            let (n, w) = f?;
            match n {
                1 => s.trace_id = w.bytes()?,
                2 => s.span_id = w.bytes()?,
                3 => s.trace_state = w.string()?,
                4 => s.parent_span_id = w.bytes()?,
                16 => s.flags = w.fixed32()?,
                5 => s.name = w.string()?,
                6 => s.kind = w.varint()? as i32,
                7 => s.start_time_unix_nano = w.fixed64()?,
                8 => s.end_time_unix_nano = w.fixed64()?,
                9 => push_kv(&mut s.attributes, w)?,
                10 => s.dropped_attributes_count = w.varint()? as u32,
                11 => {
                    let (b, at) = w.message()?;
                    s.events.push(event(b, at)?);
                }
                12 => s.dropped_events_count = w.varint()? as u32,
                13 => {
                    let (b, at) = w.message()?;
                    s.links.push(link(b, at)?);
                }
                14 => s.dropped_links_count = w.varint()? as u32,
                15 => {
                    let (b, at) = w.message()?;
                    for f in fields(b, at) {
                        match f? {
                            (2, w) => s.status_message = w.string()?,
                            (3, w) => s.status_code = w.varint()? as i32,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// Why the span cannot be stored, if it cannot: OTLP requires a 16-byte trace id and an
    /// 8-byte span id, neither all zeros.
    pub fn problem(&self) -> Option<&'static str> {
        if self.trace_id.len() != 16 || self.trace_id.iter().all(|b| *b == 0) {
            Some("trace id must be 16 bytes, not all zero")
        } else if self.span_id.len() != 8 || self.span_id.iter().all(|b| *b == 0) {
            Some("span id must be 8 bytes, not all zero")
        } else {
            None
        }
    }
}

fn event(buf: &[u8], base: usize) -> Result<Event<'_>, WireError> {
    let mut e = Event::default();
    for f in fields(buf, base) {
        match f? {
            (1, w) => e.time_unix_nano = w.fixed64()?,
            (2, w) => e.name = w.string()?,
            (3, w) => push_kv(&mut e.attributes, w)?,
            (4, w) => e.dropped_attributes_count = w.varint()? as u32,
            _ => {}
        }
    }
    Ok(e)
}

fn link(buf: &[u8], base: usize) -> Result<Link<'_>, WireError> {
    let mut l = Link::default();
    for f in fields(buf, base) {
        match f? {
            (1, w) => l.trace_id = w.bytes()?,
            (2, w) => l.span_id = w.bytes()?,
            (3, w) => l.trace_state = w.string()?,
            (4, w) => push_kv(&mut l.attributes, w)?,
            (5, w) => l.dropped_attributes_count = w.varint()? as u32,
            (6, w) => l.flags = w.fixed32()?,
            _ => {}
        }
    }
    Ok(l)
}

/// The instrumentation scope of a group of spans.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scope<'a> {
    pub name: &'a str,
    pub version: &'a str,
}

/// The spans of one instrumentation scope.
#[derive(Debug, Default)]
pub struct ScopeSpans<'a> {
    /// Absent when the request gave none.
    pub scope: Option<Scope<'a>>,
    /// Bytes of the scope on the wire.
    pub scope_len: usize,
    pub spans: Vec<Span<'a>>,
}

/// The spans of one resource.
#[derive(Debug, Default)]
pub struct ResourceSpans<'a> {
    pub attributes: Vec<Kv<'a>>,
    /// Bytes of the resource on the wire.
    pub resource_len: usize,
    pub scopes: Vec<ScopeSpans<'a>>,
}

/// An `ExportTraceServiceRequest`, read in place.
#[derive(Debug, Default)]
pub struct TraceExport<'a> {
    pub resources: Vec<ResourceSpans<'a>>,
}

impl<'a> TraceExport<'a> {
    /// Reads `buf` as an `ExportTraceServiceRequest`.
    pub fn read(buf: &'a [u8]) -> Result<TraceExport<'a>, WireError> {
        let mut export = TraceExport::default();
        for f in fields(buf, 0) {
            if let (1, w) = f? {
                let (b, at) = w.message()?;
                export.resources.push(resource_spans(b, at)?);
            }
        }
        Ok(export)
    }

    /// Every span, with its resource and scope.
    pub fn spans(&self) -> impl Iterator<Item = &Span<'a>> {
        self.resources
            .iter()
            .flat_map(|r| &r.scopes)
            .flat_map(|s| &s.spans)
    }
}

fn resource_spans(buf: &[u8], base: usize) -> Result<ResourceSpans<'_>, WireError> {
    let mut rs = ResourceSpans::default();
    for f in fields(buf, base) {
        match f? {
            (1, w) => {
                let (b, at) = w.message()?;
                rs.resource_len += b.len();
                for f in fields(b, at) {
                    match f? {
                        (1, w) => push_kv(&mut rs.attributes, w)?,
                        (2, w) => {
                            w.varint()?;
                        }
                        _ => {}
                    }
                }
            }
            (2, w) => {
                let (b, at) = w.message()?;
                rs.scopes.push(scope_spans(b, at)?);
            }
            (3, w) => {
                w.string()?;
            }
            _ => {}
        }
    }
    Ok(rs)
}

fn scope_spans(buf: &[u8], base: usize) -> Result<ScopeSpans<'_>, WireError> {
    let mut ss = ScopeSpans::default();
    for f in fields(buf, base) {
        match f? {
            (1, w) => {
                let (b, at) = w.message()?;
                ss.scope_len += b.len();
                let scope = ss.scope.get_or_insert_with(Scope::default);
                for f in fields(b, at) {
                    match f? {
                        (1, w) => scope.name = w.string()?,
                        (2, w) => scope.version = w.string()?,
                        // Not stored, but checked as prost's decode checks them.
                        (3, w) => {
                            let (b, at) = w.message()?;
                            key_value(b, at)?;
                        }
                        (4, w) => {
                            w.varint()?;
                        }
                        _ => {}
                    }
                }
            }
            (2, w) => {
                let (b, at) = w.message()?;
                ss.spans.push(Span::read(b, at)?);
            }
            (3, w) => {
                w.string()?;
            }
            _ => {}
        }
    }
    Ok(ss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1 as t;

    use crate::readback::kv;

    fn rich() -> ExportTraceServiceRequest {
        use any_value::Value as V;
        let attrs = vec![
            kv("s", V::StringValue("text ✓".into())),
            kv("b", V::BoolValue(true)),
            kv("i", V::IntValue(-42)),
            kv("d", V::DoubleValue(2.5)),
            kv("y", V::BytesValue(vec![0, 1, 255])),
            kv(
                "a",
                V::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(V::IntValue(7)),
                    }],
                }),
            ),
            kv(
                "m",
                V::KvlistValue(KeyValueList {
                    values: vec![kv("k", V::StringValue("v".into()))],
                }),
            ),
            KeyValue {
                key: "none".into(),
                ..Default::default()
            },
        ];
        let span = t::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            trace_state: "a=b".into(),
            parent_span_id: vec![3; 8],
            flags: 0x301,
            name: "GET /x".into(),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_100_000_000,
            attributes: attrs.clone(),
            dropped_attributes_count: 3,
            events: vec![t::span::Event {
                time_unix_nano: 5,
                name: "ev".into(),
                attributes: attrs.clone(),
                dropped_attributes_count: 1,
            }],
            dropped_events_count: 4,
            links: vec![t::span::Link {
                trace_id: vec![9; 16],
                span_id: vec![8; 8],
                trace_state: "c=d".into(),
                attributes: attrs.clone(),
                dropped_attributes_count: 2,
                flags: 1,
            }],
            dropped_links_count: 5,
            status: Some(t::Status {
                message: "boom".into(),
                code: 2,
            }),
        };
        ExportTraceServiceRequest {
            resource_spans: vec![t::ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", V::StringValue("svc".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![
                    t::ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "lib".into(),
                            version: "1.0".into(),
                            ..Default::default()
                        }),
                        spans: vec![span.clone(), t::Span::default()],
                        schema_url: "https://x".into(),
                    },
                    t::ScopeSpans {
                        scope: None,
                        spans: vec![span],
                        schema_url: String::new(),
                    },
                ],
                schema_url: String::new(),
            }],
        }
    }

    fn same_attributes(view: &[Kv<'_>], prost: &[KeyValue]) {
        assert_eq!(view.len(), prost.len());
        for (v, p) in view.iter().zip(prost) {
            assert_eq!(v.key, p.key);
            assert_eq!(
                v.value.to_any(),
                p.value.clone().unwrap_or_default(),
                "{}",
                p.key
            );
        }
    }

    #[test]
    fn reads_every_field_prost_decodes() {
        let req = rich();
        let bytes = req.encode_to_vec();
        let view = TraceExport::read(&bytes).expect("reads");
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(view.resources.len(), decoded.resource_spans.len());
        for (rv, rp) in view.resources.iter().zip(&decoded.resource_spans) {
            let resource = rp.resource.clone().unwrap_or_default();
            same_attributes(&rv.attributes, &resource.attributes);
            assert_eq!(rv.resource_len, resource.encoded_len());
            assert_eq!(rv.scopes.len(), rp.scope_spans.len());
            for (sv, sp) in rv.scopes.iter().zip(&rp.scope_spans) {
                assert_eq!(
                    sv.scope.map(|s| (s.name, s.version)),
                    sp.scope
                        .as_ref()
                        .map(|s| (s.name.as_str(), s.version.as_str()))
                );
                assert_eq!(sv.spans.len(), sp.spans.len());
                for (v, p) in sv.spans.iter().zip(&sp.spans) {
                    assert_eq!(v.encoded_len, p.encoded_len());
                    assert_eq!(
                        (v.trace_id, v.span_id, v.parent_span_id, v.trace_state),
                        (
                            p.trace_id.as_slice(),
                            p.span_id.as_slice(),
                            p.parent_span_id.as_slice(),
                            p.trace_state.as_str()
                        )
                    );
                    assert_eq!(
                        (
                            v.flags,
                            v.name,
                            v.kind,
                            v.start_time_unix_nano,
                            v.end_time_unix_nano
                        ),
                        (
                            p.flags,
                            p.name.as_str(),
                            p.kind,
                            p.start_time_unix_nano,
                            p.end_time_unix_nano
                        )
                    );
                    same_attributes(&v.attributes, &p.attributes);
                    assert_eq!(
                        (
                            v.dropped_attributes_count,
                            v.dropped_events_count,
                            v.dropped_links_count
                        ),
                        (
                            p.dropped_attributes_count,
                            p.dropped_events_count,
                            p.dropped_links_count
                        )
                    );
                    let status = p.status.clone().unwrap_or_default();
                    assert_eq!(
                        (v.status_message, v.status_code),
                        (status.message.as_str(), status.code)
                    );
                    assert_eq!(v.events.len(), p.events.len());
                    for (ev, ep) in v.events.iter().zip(&p.events) {
                        assert_eq!(
                            (ev.time_unix_nano, ev.name, ev.dropped_attributes_count),
                            (
                                ep.time_unix_nano,
                                ep.name.as_str(),
                                ep.dropped_attributes_count
                            )
                        );
                        same_attributes(&ev.attributes, &ep.attributes);
                    }
                    assert_eq!(v.links.len(), p.links.len());
                    for (lv, lp) in v.links.iter().zip(&p.links) {
                        assert_eq!(
                            (
                                lv.trace_id,
                                lv.span_id,
                                lv.trace_state,
                                lv.dropped_attributes_count,
                                lv.flags
                            ),
                            (
                                lp.trace_id.as_slice(),
                                lp.span_id.as_slice(),
                                lp.trace_state.as_str(),
                                lp.dropped_attributes_count,
                                lp.flags
                            )
                        );
                        same_attributes(&lv.attributes, &lp.attributes);
                    }
                }
            }
        }
    }

    #[test]
    fn a_message_given_twice_is_merged_as_protobuf_says() {
        // Two `resource` fields: their attributes add up; two `status` fields: the last
        // value of each field wins. prost agrees.
        let one = Resource {
            attributes: vec![kv("a", any_value::Value::IntValue(1))],
            ..Default::default()
        };
        let two = Resource {
            attributes: vec![kv("b", any_value::Value::IntValue(2))],
            ..Default::default()
        };
        let mut rs = Vec::new();
        for r in [one, two] {
            prost::encoding::message::encode(1, &r, &mut rs);
        }
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        let view = TraceExport::read(&bytes).expect("reads");
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        same_attributes(
            &view.resources[0].attributes,
            &decoded.resource_spans[0]
                .resource
                .clone()
                .unwrap_or_default()
                .attributes,
        );
        assert_eq!(view.resources[0].attributes.len(), 2);
    }

    #[test]
    fn what_prost_refuses_is_refused() {
        let good = rich().encode_to_vec();
        // Cut short anywhere inside: refused by both (or read the same, at a field edge).
        for cut in [1, 2, 10, good.len() / 2, good.len() - 1] {
            let bytes = &good[..cut];
            let prost = ExportTraceServiceRequest::decode(bytes);
            let view = TraceExport::read(bytes);
            assert_eq!(prost.is_err(), view.is_err(), "cut at {cut}");
        }
        // A span name that is not UTF-8.
        let span = t::Span {
            name: "x".into(),
            ..Default::default()
        };
        let mut span_bytes = span.encode_to_vec();
        let last = span_bytes.len() - 1;
        span_bytes[last] = 0xff;
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &span_bytes, &mut ss);
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        let err = TraceExport::read(&bytes).expect_err("not UTF-8");
        assert!(err.to_string().contains("UTF-8"), "{err}");
        // A string that is not UTF-8 inside an array value.
        let inner = AnyValue {
            value: Some(any_value::Value::StringValue("x".into())),
        };
        let mut inner_bytes = inner.encode_to_vec();
        let last = inner_bytes.len() - 1;
        inner_bytes[last] = 0xff;
        let mut array = Vec::new();
        prost::encoding::bytes::encode(1, &inner_bytes, &mut array);
        let mut value = Vec::new();
        prost::encoding::bytes::encode(5, &array, &mut value);
        let mut attr = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut attr);
        prost::encoding::bytes::encode(2, &value, &mut attr);
        let mut span_bytes = Vec::new();
        prost::encoding::bytes::encode(9, &attr, &mut span_bytes);
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &span_bytes, &mut ss);
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        assert!(
            TraceExport::read(&bytes).is_err(),
            "a bad array is refused, not emptied"
        );
        // A known field with the wrong wire type: `name` (5) as a varint.
        let mut ss = Vec::new();
        prost::encoding::bytes::encode(2, &vec![0x28u8, 0x01], &mut ss);
        let mut rs = Vec::new();
        prost::encoding::bytes::encode(2, &ss, &mut rs);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &rs, &mut bytes);
        assert!(ExportTraceServiceRequest::decode(bytes.as_slice()).is_err());
        assert!(TraceExport::read(&bytes).is_err());
    }
}
