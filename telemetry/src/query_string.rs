//! Query strings of the HTTP APIs (Jaeger's, the graph's): their pairs in order, the
//! value a parameter was given, and RFC 3339 times.

/// The pairs of a query string, in order (repeated keys kept).
pub fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The value the last `key` in the query was given, unless it is empty.
pub fn one<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// An RFC 3339 time (`2017-01-26T16:46:31.639875Z`) as ns since the epoch, if it is one
/// between 1970 and 2262.
pub fn rfc3339_ns(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .filter(|ns| *ns >= 0)
}
