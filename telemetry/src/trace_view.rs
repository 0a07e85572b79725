//! OTLP's protobuf read in place: the fields of a message, attribute values, key-value
//! pairs, span events and links, every string, id and byte field borrowing the request's
//! bytes (see `convert::spans`, which reads a trace export with these straight into rows).
//! The same checks as prost's decode: wire types of known fields, lengths, UTF-8 of strings;
//! unknown fields are skipped. A message field given twice is merged as protobuf says
//! (repeated fields appended, the last scalar kept). Arrays and key-value lists inside
//! attribute values (rare) stay as bytes until [`Value::text`] turns them into JSON text.

use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValueList, any_value};
use prost::Message;

use crate::wire::{WireError, skip, varint};

/// One field: its number and value as the wire carries it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8], usize),
}

/// The fields of one message, in order; `base` is its offset in the whole request (for
/// errors).
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    base: usize,
}

pub(crate) fn fields(buf: &[u8], base: usize) -> Fields<'_> {
    Fields { buf, at: 0, base }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    #[inline]
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

pub(crate) fn bad(offset: usize, what: &'static str) -> WireError {
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
    pub(crate) fn bytes(self) -> Result<&'a [u8], WireError> {
        match self {
            Wire::Len(b, _) => Ok(b),
            w => Err(mistyped(&w)),
        }
    }

    pub(crate) fn message(self) -> Result<(&'a [u8], usize), WireError> {
        match self {
            Wire::Len(b, at) => Ok((b, at)),
            w => Err(mistyped(&w)),
        }
    }

    pub(crate) fn string(self) -> Result<&'a str, WireError> {
        match self {
            Wire::Len(b, at) => {
                std::str::from_utf8(b).map_err(|_| bad(at, "a string that is not UTF-8"))
            }
            w => Err(mistyped(&w)),
        }
    }

    pub(crate) fn varint(self) -> Result<u64, WireError> {
        match self {
            Wire::Varint(v) => Ok(v),
            w => Err(mistyped(&w)),
        }
    }

    pub(crate) fn fixed64(self) -> Result<u64, WireError> {
        match self {
            Wire::Fixed64(v) => Ok(v),
            w => Err(mistyped(&w)),
        }
    }

    pub(crate) fn fixed32(self) -> Result<u32, WireError> {
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
    pub(crate) fn read(buf: &'a [u8], base: usize) -> Result<Value<'a>, WireError> {
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

pub(crate) fn key_value(buf: &[u8], base: usize) -> Result<Kv<'_>, WireError> {
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

pub(crate) fn push_kv<'a>(out: &mut Vec<Kv<'a>>, w: Wire<'a>) -> Result<(), WireError> {
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

pub(crate) fn event(buf: &[u8], base: usize) -> Result<Event<'_>, WireError> {
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

pub(crate) fn link(buf: &[u8], base: usize) -> Result<Link<'_>, WireError> {
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
