//! The query parameters of Jaeger's HTTP API, parsed and checked: every malformed or absurd
//! value is the caller's error, named, before any query runs.

use std::time::Duration;

pub use crate::query_string::{one, pairs, rfc3339_ns};

/// A caller's error: a message for Jaeger's error envelope (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam(pub String);

fn bad(param: &str, why: impl std::fmt::Display) -> BadParam {
    BadParam(format!("malformed parameter {param}: {why}"))
}

/// Most traces one search may return (Jaeger UI offers up to 1,500 in its form; the store
/// answers up to this many in one response).
pub const MAX_LIMIT: usize = 1_500;
/// Traces a search returns when it does not say.
pub const DEFAULT_LIMIT: usize = 20;
/// The window a search covers when it gives neither `start` nor `lookback`.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(3600);

/// Latest time accepted, in ns: the year 2262 is where i64 nanoseconds end.
const MAX_NS: i64 = i64::MAX;

/// A trace search, as `/api/traces` takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub service: String,
    pub operation: Option<String>,
    /// `key=value` pairs every matching span must carry (span or resource attributes).
    pub tags: Vec<(String, String)>,
    pub start_ns: i64,
    pub end_ns: i64,
    pub min_duration_ns: Option<i64>,
    pub max_duration_ns: Option<i64>,
    pub limit: usize,
}

/// A Go-style duration (`1h30m`, `1.5s`, `250ms`, `100us`, `100µs`, `10ns`) in ns.
pub fn duration_ns(param: &str, text: &str) -> Result<i64, BadParam> {
    let mut total: f64 = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad(param, "empty duration"));
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad(param, format!("{text:?} has no unit (ns, us, ms, s, m, h)")))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| bad(param, format!("{text:?} is not a duration")))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad(param, format!("unknown unit {unit:?} in {text:?}"))),
        };
        total += value * scale;
        rest = next;
    }
    if !total.is_finite() || total > MAX_NS as f64 {
        return Err(bad(param, format!("{text:?} is out of range")));
    }
    Ok(total as i64)
}

/// Microseconds since the epoch (Jaeger's `start` / `end`) as ns.
fn micros_param(param: &str, text: &str) -> Result<i64, BadParam> {
    let us: i64 = text.trim().parse().map_err(|_| {
        bad(
            param,
            format!("{text:?} is not microseconds since the epoch"),
        )
    })?;
    if us < 0 {
        return Err(bad(param, format!("{us} is before 1970")));
    }
    us.checked_mul(1_000)
        .ok_or_else(|| bad(param, format!("{us} is past the year 2262")))
}

/// Milliseconds (Jaeger's `endTs` / `lookback` of `/api/dependencies`) as ns.
pub fn millis_param(param: &str, text: &str) -> Result<i64, BadParam> {
    let ms: i64 = text
        .trim()
        .parse()
        .map_err(|_| bad(param, format!("{text:?} is not milliseconds")))?;
    if ms < 0 {
        return Err(bad(param, format!("{ms} is negative")));
    }
    ms.checked_mul(1_000_000)
        .ok_or_else(|| bad(param, format!("{ms} is past the year 2262")))
}

/// `tags` (a JSON object of strings) and repeated `tag=key:value`.
fn tags(pairs: &[(String, String)]) -> Result<Vec<(String, String)>, BadParam> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "tags" if !v.is_empty() => {
                let map: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(v).map_err(|e| bad("tags", e))?;
                for (key, value) in map {
                    let value = match value {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        other => {
                            return Err(bad(
                                "tags",
                                format!("the value of {key:?} must be a string, not {other}"),
                            ));
                        }
                    };
                    out.push((key, value));
                }
            }
            "tag" => {
                let (key, value) = v
                    .split_once(':')
                    .ok_or_else(|| bad("tag", format!("{v:?} is not key:value")))?;
                if key.is_empty() {
                    return Err(bad("tag", format!("{v:?} has an empty key")));
                }
                out.push((key.to_string(), value.to_string()));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A `/api/traces` search; `now_ns` is when "now" is.
pub fn search(pairs: &[(String, String)], now_ns: i64) -> Result<Search, BadParam> {
    let service = one(pairs, "service")
        .ok_or_else(|| BadParam("parameter 'service' is required".into()))?
        .to_string();
    let operation = one(pairs, "operation").map(str::to_string);
    let end_ns = match one(pairs, "end") {
        Some(v) => micros_param("end", v)?,
        None => now_ns,
    };
    let lookback = match one(pairs, "lookback").filter(|l| *l != "custom") {
        Some(v) => Some(duration_ns("lookback", v)?),
        None => None,
    };
    let start_ns = match (one(pairs, "start"), lookback) {
        (Some(v), _) => micros_param("start", v)?,
        (None, Some(l)) => end_ns.saturating_sub(l),
        (None, None) => end_ns.saturating_sub(DEFAULT_LOOKBACK.as_nanos() as i64),
    };
    ordered("start", start_ns, "end", end_ns)?;
    let (min_duration_ns, max_duration_ns) = durations(pairs, "minDuration", "maxDuration")?;
    let limit = limit(pairs, &["limit"])?;
    Ok(Search {
        service,
        operation,
        tags: tags(pairs)?,
        start_ns,
        end_ns,
        min_duration_ns,
        max_duration_ns,
        limit,
    })
}

/// A search window: `end` (default now), `start` (default the default lookback before
/// `end`), checked to be in order. Both names are for the error message.
pub fn window(
    (start_name, start): (&str, Option<i64>),
    (end_name, end): (&str, Option<i64>),
    now_ns: i64,
) -> Result<(i64, i64), BadParam> {
    let end_ns = end.unwrap_or(now_ns);
    let start_ns =
        start.unwrap_or_else(|| end_ns.saturating_sub(DEFAULT_LOOKBACK.as_nanos() as i64));
    ordered(start_name, start_ns, end_name, end_ns)?;
    Ok((start_ns, end_ns))
}

/// Refuses a time range whose start is after its end.
pub fn ordered(
    start_name: &str,
    start_ns: i64,
    end_name: &str,
    end_ns: i64,
) -> Result<(), BadParam> {
    if start_ns > end_ns {
        return Err(BadParam(format!(
            "the time range is inverted: {start_name} ({} us) is after {end_name} ({} us)",
            start_ns / 1_000,
            end_ns / 1_000
        )));
    }
    Ok(())
}

/// The duration bounds named `min` and `max` (Go-style durations), if given, in order.
pub fn durations(
    pairs: &[(String, String)],
    min: &str,
    max: &str,
) -> Result<(Option<i64>, Option<i64>), BadParam> {
    let lo = one(pairs, min).map(|v| duration_ns(min, v)).transpose()?;
    let hi = one(pairs, max).map(|v| duration_ns(max, v)).transpose()?;
    duration_bounds((min, lo), (max, hi))
}

/// Duration bounds in ns, refused when the lower is above the upper.
pub fn duration_bounds(
    (min, lo): (&str, Option<i64>),
    (max, hi): (&str, Option<i64>),
) -> Result<(Option<i64>, Option<i64>), BadParam> {
    if let (Some(lo), Some(hi)) = (lo, hi)
        && lo > hi
    {
        return Err(BadParam(format!("{min} is greater than {max}")));
    }
    Ok((lo, hi))
}

/// How many traces a search returns: the first of `names` given (0 or none: the default),
/// at most [`MAX_LIMIT`].
pub fn limit(pairs: &[(String, String)], names: &[&str]) -> Result<usize, BadParam> {
    let Some((name, v)) = names.iter().find_map(|n| one(pairs, n).map(|v| (*n, v))) else {
        return Ok(DEFAULT_LIMIT);
    };
    let n: usize = v
        .parse()
        .map_err(|_| bad(name, format!("{v:?} is not a count")))?;
    limit_of(name, n)
}

/// A count of traces as a search limit: 0 means the default, more than [`MAX_LIMIT`] is
/// refused.
pub fn limit_of(name: &str, n: usize) -> Result<usize, BadParam> {
    if n > MAX_LIMIT {
        return Err(bad(
            name,
            format!("{n} is more than the {MAX_LIMIT} traces one search returns"),
        ));
    }
    Ok(if n == 0 { DEFAULT_LIMIT } else { n })
}

/// A trace id as Jaeger writes it: 1 to 32 hex digits (64-bit ids are left-padded).
pub fn trace_id(text: &str) -> Result<[u8; 16], BadParam> {
    let t = text.trim();
    if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "traceID",
            format!("{text:?} is not 1 to 32 hex digits"),
        ));
    }
    let padded = format!("{t:0>32}");
    let mut id = [0u8; 16];
    crate::store::decode_hex(&padded, &mut id).map_err(|e| bad("traceID", e))?;
    if id == [0u8; 16] {
        return Err(bad("traceID", "the all-zero id is not a trace"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        pairs(Some(s))
    }

    #[test]
    fn durations_in_go_syntax() {
        assert_eq!(duration_ns("d", "1.5s"), Ok(1_500_000_000));
        assert_eq!(duration_ns("d", "1h30m"), Ok(5_400_000_000_000));
        assert_eq!(duration_ns("d", "250us"), Ok(250_000));
        assert_eq!(duration_ns("d", "10µs"), Ok(10_000));
        assert!(duration_ns("d", "10").is_err());
        assert!(duration_ns("d", "10 parsecs").is_err());
        assert!(duration_ns("d", "99999999999h").is_err());
    }

    #[test]
    fn a_search_with_every_parameter() {
        let s = search(
            &q("service=reviews&operation=GET&start=1000&end=5000&minDuration=1ms&maxDuration=2s&limit=5&tags=%7B%22http.status_code%22%3A%22500%22%7D&tag=error:true"),
            0,
        )
        .expect("parses");
        assert_eq!(s.service, "reviews");
        assert_eq!(s.operation.as_deref(), Some("GET"));
        assert_eq!((s.start_ns, s.end_ns), (1_000_000, 5_000_000));
        assert_eq!(
            (s.min_duration_ns, s.max_duration_ns),
            (Some(1_000_000), Some(2_000_000_000))
        );
        assert_eq!(s.limit, 5);
        assert_eq!(
            s.tags,
            vec![
                ("http.status_code".to_string(), "500".to_string()),
                ("error".to_string(), "true".to_string())
            ]
        );
    }

    #[test]
    fn bad_searches_are_named() {
        for (query, needle) in [
            ("", "service"),
            ("service=a&start=5000&end=1000", "inverted"),
            ("service=a&start=-1", "before 1970"),
            ("service=a&end=99999999999999999", "2262"),
            ("service=a&limit=100000", "limit"),
            ("service=a&limit=many", "limit"),
            ("service=a&tags=%7Bnot-json", "tags"),
            ("service=a&tags=%7B%22k%22%3A%5B1%5D%7D", "tags"),
            ("service=a&tag=novalue", "tag"),
            ("service=a&minDuration=2s&maxDuration=1s", "minDuration"),
            ("service=a&lookback=forever", "lookback"),
        ] {
            match search(&q(query), 10_000_000_000) {
                Err(BadParam(msg)) => assert!(msg.contains(needle), "{query}: {msg}"),
                Ok(s) => panic!("{query} accepted: {s:?}"),
            }
        }
    }

    #[test]
    fn trace_ids_pad_and_refuse() {
        assert_eq!(trace_id("1").expect("id")[15], 1);
        assert_eq!(
            trace_id("83a9efd15c1c98a977e0711cc93ee28b").expect("id")[0],
            0x83
        );
        assert!(trace_id("xyz").is_err());
        assert!(trace_id(&"a".repeat(33)).is_err());
        assert!(trace_id("0000").is_err());
    }
}
