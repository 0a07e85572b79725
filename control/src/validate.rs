//! From the resources users write (`crate::crd`, read strictly) to the model the translator
//! uses (`crate::model`), checking what the types alone cannot: one of `exact`, `prefix`,
//! `regex` in a string match, weights that add up, subsets named once, and the features
//! lumen does not carry out yet, each refused by its field path rather than ignored.

use std::collections::BTreeSet;

use crate::crd::istio as crd;
use crate::model::{
    ConnectionPool, CorsPolicy, Destination, DestinationRuleSpec, DirectResponse, FaultPolicy,
    HeaderOps, HeaderRules, HttpMatchRequest, HttpRoute, HttpRouteDestination, LoadBalancer,
    OutlierDetection, PathChange, Policy, PortSelector, Redirect, RetrySettings, Rewrite,
    StringMatch, Subset, TrafficPolicy, VirtualServiceSpec,
};

/// What is wrong, and where (`spec.http[0].route[1].weight`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

/// A path a route writes or matches: it starts with `/`.
pub(crate) fn absolute_path(value: &str, path: impl Into<String>) -> Result<(), FieldError> {
    if value.starts_with('/') {
        Ok(())
    } else {
        Err(at(path, format!("{value:?} does not start with /")))
    }
}

/// A field lumen reads but does not carry out yet: refused, so that nobody relies on a
/// policy that is not applied.
fn not_yet(path: String, what: &str) -> FieldError {
    at(
        path,
        format!(
            "{what} is not supported by lumen yet; the resource is refused rather than applied without it"
        ),
    )
}

/// A regular expression as the proxies will compile it (RE2 syntax, whole value, bounded).
pub fn regex(source: &str, path: &str) -> Result<String, FieldError> {
    regex::RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(lumen_api::MAX_REGEX_PROGRAM)
        .dfa_size_limit(lumen_api::MAX_REGEX_PROGRAM)
        .build()
        .map(|_| source.to_string())
        .map_err(|e| at(path, format!("regex {source:?} does not compile: {e}")))
}

fn string_match(m: &crd::StringMatch, path: &str) -> Result<StringMatch, FieldError> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(StringMatch::Exact(v.clone())),
        (None, Some(v), None) => Ok(StringMatch::Prefix(v.clone())),
        (None, None, Some(v)) => Ok(StringMatch::Regex(regex(v, &format!("{path}.regex"))?)),
        (None, None, None) => Err(at(
            path,
            "names none of exact, prefix, regex (a match on presence alone is not supported yet)",
        )),
        _ => Err(at(path, "names more than one of exact, prefix, regex")),
    }
}

fn destination(d: &crd::Destination, path: &str) -> Result<Destination, FieldError> {
    if d.host.is_empty() {
        return Err(at(format!("{path}.host"), "is empty"));
    }
    let port = match &d.port {
        None => None,
        Some(p) => Some(PortSelector {
            number: u16::try_from(p.number)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    at(
                        format!("{path}.port.number"),
                        format!("{} is not a port", p.number),
                    )
                })?,
        }),
    };
    Ok(Destination {
        host: d.host.clone(),
        subset: d.subset.clone(),
        port,
    })
}

fn match_request(m: &crd::HttpMatchRequest, path: &str) -> Result<HttpMatchRequest, FieldError> {
    let unsupported = [
        ("scheme", m.scheme.is_some()),
        ("authority", m.authority.is_some()),
        ("gateways", !m.gateways.is_empty()),
        ("ignoreUriCase", m.ignore_uri_case.is_some()),
        ("withoutHeaders", !m.without_headers.is_empty()),
        ("sourceNamespace", m.source_namespace.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(not_yet(
            format!("{path}.{field}"),
            &format!("matching on {field}"),
        ));
    }
    let port = m
        .port
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| at(format!("{path}.port"), format!("{p} is not a port")))
        })
        .transpose()?;
    Ok(HttpMatchRequest {
        port,
        source_labels: m.source_labels.clone(),
        query: m
            .query_params
            .iter()
            .map(|(name, v)| {
                Ok((
                    name.clone(),
                    string_match(v, &format!("{path}.queryParams.{name}"))?,
                ))
            })
            .collect::<Result<_, FieldError>>()?,
        uri: m
            .uri
            .as_ref()
            .map(|u| string_match(u, &format!("{path}.uri")))
            .transpose()?,
        headers: m
            .headers
            .iter()
            .map(|(name, v)| {
                Ok((
                    name.clone(),
                    string_match(v, &format!("{path}.headers.{name}"))?,
                ))
            })
            .collect::<Result<_, FieldError>>()?,
        method: m
            .method
            .as_ref()
            .map(|v| string_match(v, &format!("{path}.method")))
            .transpose()?,
    })
}

/// The HTTP methods a CORS policy may allow (Istio's list).
const CORS_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A CORS policy: origins as string matches, methods Istio knows (or `*`), header names (or
/// `*`), a max age in whole seconds, and what to do with unmatched preflights.
fn cors_policy(c: &crd::CorsPolicy, path: &str) -> Result<CorsPolicy, FieldError> {
    let allow_origins = c
        .allow_origins
        .iter()
        .enumerate()
        .map(|(i, m)| string_match(m, &format!("{path}.allowOrigins[{i}]")))
        .collect::<Result<_, _>>()?;
    for (i, m) in c.allow_methods.iter().enumerate() {
        if m != "*" && !CORS_METHODS.contains(&m.as_str()) {
            return Err(at(
                format!("{path}.allowMethods[{i}]"),
                format!("{m:?} is not an HTTP method ({})", CORS_METHODS.join(", ")),
            ));
        }
    }
    let names = |list: &[String], field: &str| -> Result<Vec<String>, FieldError> {
        list.iter()
            .enumerate()
            .map(|(i, h)| match h.as_str() {
                "*" => Ok(h.clone()),
                _ => header_name(h, &format!("{path}.{field}[{i}]")),
            })
            .collect()
    };
    let max_age = match &c.max_age {
        None => None,
        Some(text) => {
            let p = format!("{path}.maxAge");
            let d = crate::duration::parse(text).map_err(|e| at(&p, e))?;
            if d.subsec_nanos() != 0 {
                return Err(at(p, "is accurate to whole seconds only"));
            }
            Some(d.as_secs())
        }
    };
    let forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED" | "FORWARD") => true,
        Some("IGNORE") => false,
        Some(other) => {
            return Err(at(
                format!("{path}.unmatchedPreflights"),
                format!("{other:?} is none of FORWARD, IGNORE"),
            ));
        }
    };
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: names(&c.allow_headers, "allowHeaders")?,
        expose_headers: names(&c.expose_headers, "exposeHeaders")?,
        max_age,
        allow_credentials: c.allow_credentials,
        forward_unmatched_preflights,
    })
}

/// A direct response: a status from 200 to 599 and a body given as a string or as base64
/// bytes, of at most [`lumen_api::MAX_DIRECT_RESPONSE_BODY`] bytes (Envoy's default bound).
fn direct_response(d: &crd::HttpDirectResponse, path: &str) -> Result<DirectResponse, FieldError> {
    use base64::Engine;
    let status = u16::try_from(d.status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| {
            at(
                format!("{path}.status"),
                format!("{} is not an HTTP status from 200 to 599", d.status),
            )
        })?;
    let body = match &d.body {
        None => Vec::new(),
        Some(b) => match (&b.string, &b.bytes) {
            (Some(s), None) => s.as_bytes().to_vec(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| at(format!("{path}.body.bytes"), format!("is not base64: {e}")))?,
            _ => {
                return Err(at(format!("{path}.body"), "names one of string and bytes"));
            }
        },
    };
    if body.len() > lumen_api::MAX_DIRECT_RESPONSE_BODY {
        return Err(at(
            format!("{path}.body"),
            format!(
                "is {} bytes; at most {} (Envoy's bound)",
                body.len(),
                lumen_api::MAX_DIRECT_RESPONSE_BODY
            ),
        ));
    }
    Ok(DirectResponse { status, body })
}

/// An RE2 substitution's group references (`\\N`) checked against the pattern's groups, and
/// its backslashes (a digit or a backslash after each).
fn substitution_groups(substitution: &str, pattern: &str, path: &str) -> Result<(), FieldError> {
    let groups = regex::Regex::new(pattern)
        .map(|r| r.captures_len() - 1)
        .unwrap_or(0);
    let mut chars = substitution.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            continue;
        }
        match chars.next() {
            Some('\\') => {}
            Some(d) if d.is_ascii_digit() => {
                let n = d.to_digit(10).unwrap_or(0) as usize;
                if n > groups {
                    return Err(at(
                        path,
                        format!("names group {n}; the pattern has {groups}"),
                    ));
                }
            }
            _ => {
                return Err(at(
                    path,
                    "a backslash is followed by neither a digit nor a backslash",
                ));
            }
        }
    }
    Ok(())
}

/// A redirect status Envoy can answer with.
pub fn redirect_status(code: u32, path: &str) -> Result<u16, FieldError> {
    match code {
        301 | 302 | 303 | 307 | 308 => Ok(u16::try_from(code).unwrap_or(301)),
        other => Err(at(
            path,
            format!("{other} is not a redirect status (301, 302, 303, 307, 308)"),
        )),
    }
}

fn redirect(r: &crd::HttpRedirect, path: &str) -> Result<Redirect, FieldError> {
    let port = r
        .port
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| at(format!("{path}.port"), format!("{p} is not a port")))
        })
        .transpose()?;
    // Istio's derivePort: the scheme's default port (80, or 443 for https), or the
    // request's own (the redirect's default).
    let port = match (&r.derive_port, port) {
        (Some(_), Some(_)) => {
            return Err(at(
                format!("{path}.derivePort"),
                "a redirect names port or derivePort, not both",
            ));
        }
        (Some(crd::RedirectPortSelection::FromProtocolDefault), None) => {
            Some(if r.scheme.as_deref() == Some("https") {
                443
            } else {
                80
            })
        }
        (Some(crd::RedirectPortSelection::FromRequestPort) | None, port) => port,
    };
    if let Some(uri) = &r.uri {
        absolute_path(uri, format!("{path}.uri"))?;
    }
    Ok(Redirect {
        scheme: r.scheme.clone(),
        host: r.authority.clone(),
        port,
        path: r.uri.clone().map(PathChange::Full),
        status: redirect_status(
            r.redirect_code.unwrap_or(301),
            &format!("{path}.redirectCode"),
        )?,
    })
}

/// A header name a route may change: a valid HTTP name, not a pseudo-header.
pub fn header_name(name: &str, path: &str) -> Result<String, FieldError> {
    let lower = name.to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(at(path, format!("{name:?} is not an HTTP header name")));
    }
    Ok(lower)
}

/// A header value a route may set: visible ASCII and spaces, no line breaks.
pub fn header_value(value: &str, path: &str) -> Result<String, FieldError> {
    if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(at(path, "is not a valid header value (control characters)"));
    }
    Ok(value.to_string())
}

fn header_ops(o: &crd::HeaderOperations, path: &str) -> Result<HeaderOps, FieldError> {
    let pairs = |m: &std::collections::BTreeMap<String, String>, what: &str| {
        m.iter()
            .map(|(k, v)| {
                Ok((
                    header_name(k, &format!("{path}.{what}"))?,
                    header_value(v, &format!("{path}.{what}.{k}"))?,
                ))
            })
            .collect::<Result<Vec<_>, FieldError>>()
    };
    Ok(HeaderOps {
        remove: o
            .remove
            .iter()
            .map(|n| header_name(n, &format!("{path}.remove")))
            .collect::<Result<_, _>>()?,
        set: pairs(&o.set, "set")?,
        add: pairs(&o.add, "add")?,
    })
}

fn header_rules(h: &crd::Headers, path: &str) -> Result<HeaderRules, FieldError> {
    Ok(HeaderRules {
        request: h
            .request
            .as_ref()
            .map(|o| header_ops(o, &format!("{path}.request")))
            .transpose()?
            .unwrap_or_default(),
        response: h
            .response
            .as_ref()
            .map(|o| header_ops(o, &format!("{path}.response")))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// Istio's retry conditions when a route names none, and the status it retries on.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503";

/// A route's retries (`attempts` 0: retries off, where a route without `retries` gets
/// Istio's default).
fn retries(r: &crd::HttpRetry, path: &str) -> Result<Option<RetrySettings>, FieldError> {
    let attempts = u32::try_from(r.attempts).map_err(|_| {
        at(
            format!("{path}.attempts"),
            format!("{} is negative", r.attempts),
        )
    })?;
    if attempts == 0 {
        return Ok(Some(RetrySettings::default()));
    }
    if r.retry_remote_localities == Some(true) {
        return Err(not_yet(
            format!("{path}.retryRemoteLocalities"),
            "retryRemoteLocalities",
        ));
    }
    let per_try_timeout = r
        .per_try_timeout
        .as_deref()
        .map(|t| crate::duration::parse(t).map_err(|e| at(format!("{path}.perTryTimeout"), e)))
        .transpose()?;
    let on = r
        .retry_on
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(DEFAULT_RETRY_ON);
    let mut retry_on = Vec::new();
    let mut status_codes = Vec::new();
    for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        if let Ok(code) = c.parse::<u16>() {
            if !(100..=599).contains(&code) {
                return Err(at(
                    format!("{path}.retryOn"),
                    format!("{code} is not an HTTP status"),
                ));
            }
            status_codes.push(code);
        } else if lumen_api::RETRY_ON.contains(&c) {
            retry_on.push(c.to_string());
        } else {
            return Err(at(
                format!("{path}.retryOn"),
                format!(
                    "{c:?} is not a retry condition lumen carries out ({})",
                    lumen_api::RETRY_ON.join(", ")
                ),
            ));
        }
    }
    if !status_codes.is_empty() && !retry_on.iter().any(|c| c == "retriable-status-codes") {
        retry_on.push("retriable-status-codes".to_string());
    }
    Ok(Some(RetrySettings {
        attempts,
        per_try_timeout,
        retry_on,
        status_codes,
    }))
}

/// A percentage of requests: `percentage.value`, the deprecated whole `percent`, or all.
fn percent(
    p: Option<&crd::Percent>,
    deprecated: Option<i32>,
    path: &str,
) -> Result<f64, FieldError> {
    let value = match (p, deprecated) {
        (Some(p), _) => p.value,
        (None, Some(n)) => f64::from(n),
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&value) {
        return Err(at(
            format!("{path}.percentage.value"),
            format!("{value} is not a percentage from 0 to 100"),
        ));
    }
    Ok(value)
}

fn fault(f: &crd::HttpFaultInjection, path: &str) -> Result<FaultPolicy, FieldError> {
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let p = format!("{path}.delay");
            let fixed = d
                .fixed_delay
                .as_deref()
                .ok_or_else(|| at(format!("{p}.fixedDelay"), "is missing"))?;
            let duration =
                crate::duration::parse(fixed).map_err(|e| at(format!("{p}.fixedDelay"), e))?;
            if duration < std::time::Duration::from_millis(1) {
                return Err(at(format!("{p}.fixedDelay"), "must be at least 1ms"));
            }
            Some((duration, percent(d.percentage.as_ref(), d.percent, &p)?))
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let p = format!("{path}.abort");
            if a.grpc_status.is_some() {
                return Err(not_yet(format!("{p}.grpcStatus"), "a gRPC status abort"));
            }
            let status = a
                .http_status
                .ok_or_else(|| at(format!("{p}.httpStatus"), "is missing"))?;
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| {
                    at(
                        format!("{p}.httpStatus"),
                        format!("{status} is not an HTTP status from 200 to 599"),
                    )
                })?;
            Some((status, percent(a.percentage.as_ref(), None, &p)?))
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(at(path, "names neither delay nor abort"));
    }
    Ok(FaultPolicy { delay, abort })
}

fn http_route(r: &crd::HttpRoute, path: &str) -> Result<HttpRoute, FieldError> {
    let cors = r
        .cors_policy
        .as_ref()
        .map(|c| cors_policy(c, &format!("{path}.corsPolicy")))
        .transpose()?;
    let redirect = r
        .redirect
        .as_ref()
        .map(|x| redirect(x, &format!("{path}.redirect")))
        .transpose()?;
    let direct_response = r
        .direct_response
        .as_ref()
        .map(|d| direct_response(d, &format!("{path}.directResponse")))
        .transpose()?;
    if redirect.is_some() && !r.route.is_empty() {
        return Err(at(
            format!("{path}.redirect"),
            "a route redirects or has destinations, not both",
        ));
    }
    if direct_response.is_some() && (redirect.is_some() || !r.route.is_empty()) {
        return Err(at(
            format!("{path}.directResponse"),
            "a route answers directly, redirects or has destinations: one of them",
        ));
    }
    if r.route.is_empty() && redirect.is_none() && direct_response.is_none() {
        return Err(at(
            format!("{path}.route"),
            "is empty: a route needs a destination",
        ));
    }
    let mut route = Vec::new();
    for (j, d) in r.route.iter().enumerate() {
        let p = format!("{path}.route[{j}]");
        let headers = d
            .headers
            .as_ref()
            .map(|h| header_rules(h, &format!("{p}.headers")))
            .transpose()?;
        let weight = match d.weight {
            None => None,
            Some(w) => Some(
                u32::try_from(w)
                    .map_err(|_| at(format!("{p}.weight"), format!("{w} is negative")))?,
            ),
        };
        route.push(HttpRouteDestination {
            destination: destination(&d.destination, &format!("{p}.destination"))?,
            weight,
            headers,
        });
    }
    if route.len() > 1 {
        let total: u64 = route.iter().map(|d| u64::from(d.weight.unwrap_or(0))).sum();
        if total != 100 {
            return Err(at(
                format!("{path}.route"),
                format!("the weights add up to {total}, not 100"),
            ));
        }
    }
    let timeout = r
        .timeout
        .as_deref()
        .map(|t| crate::duration::parse(t).map_err(|e| at(format!("{path}.timeout"), e)))
        .transpose()?;
    let retries = r
        .retries
        .as_ref()
        .map(|x| retries(x, &format!("{path}.retries")))
        .transpose()?
        .flatten();
    let headers = r
        .headers
        .as_ref()
        .map(|h| header_rules(h, &format!("{path}.headers")))
        .transpose()?;
    let rewrite = match &r.rewrite {
        None => None,
        Some(w) => {
            if let Some(rr) = &w.uri_regex_rewrite {
                let rp = format!("{path}.rewrite.uriRegexRewrite");
                if w.uri.is_some() {
                    return Err(at(rp, "a rewrite names uri or uriRegexRewrite, not both"));
                }
                let pattern = regex(&rr.match_, &format!("{rp}.match"))?;
                substitution_groups(&rr.rewrite, &pattern, &format!("{rp}.rewrite"))?;
                Some(Rewrite {
                    path: Some(PathChange::Regex {
                        pattern,
                        substitution: rr.rewrite.clone(),
                    }),
                    host: w.authority.clone(),
                })
            } else {
                if let Some(uri) = &w.uri {
                    absolute_path(uri, format!("{path}.rewrite.uri"))?;
                }
                // Istio's uri rewrite replaces what the match's uri matched (all of an exact
                // one).
                Some(Rewrite {
                    path: w.uri.clone().map(PathChange::Prefix),
                    host: w.authority.clone(),
                })
            }
        }
    };
    // `mirror` with `mirrorPercentage` (100 by default), and the newer `mirrors` list.
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        let share = percent(
            r.mirror_percentage.as_ref(),
            None,
            &format!("{path}.mirrorPercentage"),
        )?;
        mirrors.push((destination(m, &format!("{path}.mirror"))?, share));
    } else if r.mirror_percentage.is_some() {
        return Err(at(format!("{path}.mirrorPercentage"), "without a mirror"));
    }
    for (k, m) in r.mirrors.iter().enumerate() {
        let mp = format!("{path}.mirrors[{k}]");
        mirrors.push((
            destination(&m.destination, &format!("{mp}.destination"))?,
            percent(m.percentage.as_ref(), None, &mp)?,
        ));
    }
    Ok(HttpRoute {
        mirrors,
        rewrite,
        redirect,
        direct_response,
        cors,
        headers,
        retries,
        timeout,
        fault: r
            .fault
            .as_ref()
            .map(|f| fault(f, &format!("{path}.fault")))
            .transpose()?,
        name: r.name.clone(),
        matches: r
            .matches
            .iter()
            .enumerate()
            .map(|(k, m)| match_request(m, &format!("{path}.match[{k}]")))
            .collect::<Result<_, _>>()?,
        route,
    })
}

/// A VirtualService's spec as the translator takes it.
pub fn virtual_service(spec: &crd::VirtualServiceSpec) -> Result<VirtualServiceSpec, FieldError> {
    if spec.hosts.is_empty() {
        return Err(at("spec.hosts", "is empty: name at least one host"));
    }
    if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
        return Err(at(
            "spec.gateways",
            format!(
                "{:?} are ingress or egress gateways, which lumen does not serve (only `mesh`, the sidecars, is supported)",
                spec.gateways
            ),
        ));
    }
    Ok(VirtualServiceSpec {
        hosts: spec.hosts.clone(),
        gateways: spec.gateways.clone(),
        http: spec
            .http
            .iter()
            .enumerate()
            .map(|(i, r)| http_route(r, &format!("spec.http[{i}]")))
            .collect::<Result<_, _>>()?,
        ports: Vec::new(),
    })
}

/// Envoy's limits on a ring's size (`RingHashLbConfig.minimum_ring_size`).
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Maglev's default table size (Envoy's and Istio's).
pub const MAGLEV_DEFAULT_TABLE: u64 = 65_537;
/// Istio's default minimum ring size.
pub const RING_DEFAULT_SIZE: u64 = 1024;

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// `loadBalancer.consistentHash`: exactly one key; a ring (the default) or Maglev.
fn consistent_hash(
    ch: &crd::ConsistentHashLb,
    path: &str,
) -> Result<crate::model::ConsistentHash, FieldError> {
    use crate::model::{ConsistentHash, HashKey, HashTable};
    let mut keys = Vec::new();
    if let Some(h) = &ch.http_header_name {
        keys.push(HashKey::Header(header_name(
            h,
            &format!("{path}.httpHeaderName"),
        )?));
    }
    if let Some(c) = &ch.http_cookie {
        if c.name.is_empty() {
            return Err(at(format!("{path}.httpCookie.name"), "is empty"));
        }
        let ttl = match &c.ttl {
            None => None,
            Some(t) => Some(
                crate::duration::parse(t).map_err(|e| at(format!("{path}.httpCookie.ttl"), e))?,
            ),
        };
        keys.push(HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl,
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &ch.http_query_parameter_name {
        keys.push(HashKey::QueryParameter(q.clone()));
    }
    let key = match keys.len() {
        1 => keys.remove(0),
        0 => {
            return Err(at(
                path,
                "names nothing to hash: one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            ));
        }
        _ => {
            return Err(at(
                path,
                "names more than one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            ));
        }
    };
    let table = match (&ch.ring_hash, &ch.maglev) {
        (Some(_), Some(_)) => {
            return Err(at(path, "sets both ringHash and maglev"));
        }
        (None, Some(m)) => {
            let size = m.table_size.unwrap_or(MAGLEV_DEFAULT_TABLE);
            if !is_prime(size) || size > 5_000_011 {
                return Err(at(
                    format!("{path}.maglev.tableSize"),
                    format!("{size} is not a prime up to 5000011 (Envoy's rule)"),
                ));
            }
            HashTable::Maglev { table_size: size }
        }
        (ring, None) => {
            let size = ring
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(RING_DEFAULT_SIZE);
            if size == 0 || size > MAX_RING_SIZE {
                return Err(at(
                    format!("{path}.ringHash.minimumRingSize"),
                    format!("{size} is outside 1..={MAX_RING_SIZE}"),
                ));
            }
            HashTable::Ring {
                minimum_ring_size: size,
            }
        }
    };
    Ok(ConsistentHash { key, table })
}

/// `loadBalancer`: the policies the proxies carry out.
fn load_balancer(lb: &crd::LoadBalancerSettings, path: &str) -> Result<LoadBalancer, FieldError> {
    if let Some(ch) = &lb.consistent_hash {
        if lb.simple.is_some() {
            return Err(at(path, "sets both simple and consistentHash"));
        }
        return Ok(LoadBalancer::ConsistentHash(consistent_hash(
            ch,
            &format!("{path}.consistentHash"),
        )?));
    }
    if lb.warmup_duration_secs.is_some() {
        return Err(not_yet(
            format!("{path}.warmupDurationSecs"),
            "warmupDurationSecs",
        ));
    }
    match lb.simple {
        None | Some(crd::SimpleLb::Unspecified) => Ok(LoadBalancer::MeshDefault),
        Some(crd::SimpleLb::RoundRobin) => Ok(LoadBalancer::RoundRobin),
        Some(crd::SimpleLb::Random) => Ok(LoadBalancer::Random),
        Some(crd::SimpleLb::LeastRequest) => Ok(LoadBalancer::LeastRequest),
        // Istio: "Deprecated. Use LEAST_REQUEST instead", and treated as it.
        Some(crd::SimpleLb::LeastConn) => {
            tracing::warn!(
                path,
                "LEAST_CONN is deprecated: carried out as LEAST_REQUEST, as Istio does"
            );
            Ok(LoadBalancer::LeastRequest)
        }
        Some(other) => Err(not_yet(format!("{path}.simple"), &format!("{other:?}"))),
    }
}

/// `connectionPool`: the thresholds the proxies enforce; the pool's other settings are
/// refused by path until carried out.
fn connection_pool(
    pool: &crd::ConnectionPoolSettings,
    path: &str,
) -> Result<ConnectionPool, FieldError> {
    let count = |v: Option<i32>, field: &str| -> Result<Option<u32>, FieldError> {
        v.map(|n| {
            u32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                at(
                    format!("{path}.{field}"),
                    format!("{n} is not a positive count"),
                )
            })
        })
        .transpose()
    };
    let mut out = ConnectionPool::default();
    if let Some(tcp) = &pool.tcp {
        out.max_connections = count(tcp.max_connections, "tcp.maxConnections")?;
        for (field, set) in [
            ("connectTimeout", tcp.connect_timeout.is_some()),
            (
                "maxConnectionDuration",
                tcp.max_connection_duration.is_some(),
            ),
            ("idleTimeout", tcp.idle_timeout.is_some()),
        ] {
            if set {
                return Err(not_yet(format!("{path}.tcp.{field}"), field));
            }
        }
    }
    if let Some(http) = &pool.http {
        out.http1_max_pending_requests = count(
            http.http1_max_pending_requests,
            "http.http1MaxPendingRequests",
        )?;
        out.http2_max_requests = count(http.http2_max_requests, "http.http2MaxRequests")?;
        out.max_retries = match http.max_retries {
            // Zero retries is a valid bound.
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                at(
                    format!("{path}.http.maxRetries"),
                    format!("{n} is negative"),
                )
            })?),
            None => None,
        };
        for (field, set) in [
            (
                "maxRequestsPerConnection",
                http.max_requests_per_connection.is_some(),
            ),
            ("idleTimeout", http.idle_timeout.is_some()),
            ("h2UpgradePolicy", http.h2_upgrade_policy.is_some()),
            ("useClientProtocol", http.use_client_protocol.is_some()),
            (
                "maxConcurrentStreams",
                http.max_concurrent_streams.is_some(),
            ),
        ] {
            if set {
                return Err(not_yet(format!("{path}.http.{field}"), field));
            }
        }
    }
    Ok(out)
}

/// `outlierDetection`: consecutive 5xx and gateway errors, the ejection times and shares.
fn outlier_detection(
    od: &crd::OutlierDetection,
    path: &str,
) -> Result<OutlierDetection, FieldError> {
    for (field, set) in [
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures.is_some(),
        ),
        (
            "splitExternalLocalOriginErrors",
            od.split_external_local_origin_errors == Some(true),
        ),
    ] {
        if set {
            return Err(not_yet(format!("{path}.{field}"), field));
        }
    }
    let duration = |v: &Option<String>, field: &str| {
        v.as_deref()
            .map(|t| crate::duration::parse(t).map_err(|e| at(format!("{path}.{field}"), e)))
            .transpose()
    };
    let percent = |v: Option<i32>, field: &str| {
        v.map(|p| {
            u32::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
                at(
                    format!("{path}.{field}"),
                    format!("{p} is not a percentage"),
                )
            })
        })
        .transpose()
    };
    // The deprecated `consecutiveErrors` counted 502, 503 and 504: gateway errors.
    let gateway = match (od.consecutive_gateway_errors, od.consecutive_errors) {
        (Some(n), _) => Some(n),
        (None, Some(n)) => Some(u32::try_from(n).map_err(|_| {
            at(
                format!("{path}.consecutiveErrors"),
                format!("{n} is negative"),
            )
        })?),
        (None, None) => None,
    };
    Ok(OutlierDetection {
        consecutive_5xx_errors: od.consecutive_5xx_errors,
        consecutive_gateway_errors: gateway,
        interval: duration(&od.interval, "interval")?,
        base_ejection_time: duration(&od.base_ejection_time, "baseEjectionTime")?,
        max_ejection_percent: percent(od.max_ejection_percent, "maxEjectionPercent")?,
        min_health_percent: percent(od.min_health_percent, "minHealthPercent")?.unwrap_or(0),
    })
}

/// A traffic policy: its settings and its port-level settings (each port once).
fn traffic_policy(p: &crd::TrafficPolicy, path: &str) -> Result<TrafficPolicy, FieldError> {
    if let Some(tls) = &p.tls {
        // Read, not yet carried out: the mesh's traffic stays plaintext until mTLS lands.
        tracing::warn!(path, mode = ?tls.mode, "TLS settings are read but not carried out yet: traffic stays plaintext");
    }
    let settings = policy_settings(
        p.load_balancer.as_ref(),
        p.connection_pool.as_ref(),
        p.outlier_detection.as_ref(),
        path,
    )?;
    let mut ports: Vec<(u16, Policy)> = Vec::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        let number = u16::try_from(pl.port.number)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                at(
                    format!("{pp}.port.number"),
                    format!("{} is not a port", pl.port.number),
                )
            })?;
        if ports.iter().any(|(n, _)| *n == number) {
            return Err(at(
                format!("{pp}.port.number"),
                format!("port {number} has settings twice"),
            ));
        }
        if let Some(tls) = &pl.tls {
            tracing::warn!(path = %pp, mode = ?tls.mode, "TLS settings are read but not carried out yet: traffic stays plaintext");
        }
        let settings = policy_settings(
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            &pp,
        )?;
        ports.push((number, settings));
    }
    Ok(TrafficPolicy { settings, ports })
}

/// One level's settings: load balancer, connection pool, outlier detection.
fn policy_settings(
    lb: Option<&crd::LoadBalancerSettings>,
    pool: Option<&crd::ConnectionPoolSettings>,
    od: Option<&crd::OutlierDetection>,
    path: &str,
) -> Result<Policy, FieldError> {
    Ok(Policy {
        load_balancer: lb
            .map(|lb| load_balancer(lb, &format!("{path}.loadBalancer")))
            .transpose()?,
        connection_pool: pool
            .map(|c| connection_pool(c, &format!("{path}.connectionPool")))
            .transpose()?,
        outlier_detection: od
            .map(|o| outlier_detection(o, &format!("{path}.outlierDetection")))
            .transpose()?,
    })
}

/// A DestinationRule's spec as the translator takes it.
pub fn destination_rule(
    spec: &crd::DestinationRuleSpec,
) -> Result<DestinationRuleSpec, FieldError> {
    if spec.host.is_empty() {
        return Err(at("spec.host", "is empty"));
    }
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|p| traffic_policy(p, "spec.trafficPolicy"))
        .transpose()?;
    let mut names = BTreeSet::new();
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            return Err(at(format!("{path}.name"), "is empty"));
        }
        if !names.insert(s.name.as_str()) {
            return Err(at(
                format!("{path}.name"),
                format!("subset {:?} is defined twice", s.name),
            ));
        }
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            traffic_policy: s
                .traffic_policy
                .as_ref()
                .map(|p| traffic_policy(p, &format!("{path}.trafficPolicy")))
                .transpose()?,
        });
    }
    Ok(DestinationRuleSpec {
        host: spec.host.clone(),
        subsets,
        traffic_policy: policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(yaml: &str) -> Result<VirtualServiceSpec, FieldError> {
        virtual_service(&serde_yaml::from_str(yaml).expect("spec"))
    }

    fn dr(yaml: &str) -> Result<DestinationRuleSpec, FieldError> {
        destination_rule(&serde_yaml::from_str(yaml).expect("spec"))
    }

    #[test]
    fn consistent_hash_is_read_and_its_mistakes_are_named() {
        use crate::model::{ConsistentHash, HashKey, HashTable};
        let ok = dr("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 30s, path: /}}}}")
            .expect("a cookie");
        assert_eq!(
            ok.policy_for("", 80).load_balancer,
            Some(LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::Cookie {
                    name: "user".into(),
                    path: Some("/".into()),
                    ttl: Some(std::time::Duration::from_secs(30)),
                },
                table: HashTable::Ring {
                    minimum_ring_size: RING_DEFAULT_SIZE
                },
            }))
        );
        let ok = dr("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}}")
            .expect("source IP on Maglev");
        assert!(matches!(
            ok.policy_for("", 80).load_balancer,
            Some(LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::SourceIp,
                table: HashTable::Maglev {
                    table_size: MAGLEV_DEFAULT_TABLE
                }
            }))
        ));
        let ok =
            dr("host: r\ntrafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}").expect("P2C");
        assert_eq!(
            ok.policy_for("", 80).load_balancer,
            Some(LoadBalancer::LeastRequest)
        );
        // LEAST_CONN, deprecated in Istio for LEAST_REQUEST, is carried out as it.
        let conn =
            dr("host: r\ntrafficPolicy: {loadBalancer: {simple: LEAST_CONN}}").expect("LEAST_CONN");
        assert_eq!(
            conn.policy_for("", 80).load_balancer,
            Some(LoadBalancer::LeastRequest)
        );
        for (yaml, path, words) in [
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "names nothing to hash",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "more than one",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
                "not a prime",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {}, maglev: {}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "both ringHash and maglev",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: 'bad name'}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
                "not an HTTP header name",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: soon}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
                "",
            ),
            (
                "host: r\ntrafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}",
                "spec.trafficPolicy.loadBalancer.simple",
                "not supported by lumen yet",
            ),
            (
                "host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}",
                "spec.trafficPolicy.connectionPool.tcp.maxConnections",
                "not a positive count",
            ),
            (
                "host: r\ntrafficPolicy: {connectionPool: {http: {idleTimeout: 1s}}}",
                "spec.trafficPolicy.connectionPool.http.idleTimeout",
                "not supported by lumen yet",
            ),
            (
                "host: r\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}",
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "not a percentage",
            ),
            (
                "host: r\ntrafficPolicy: {outlierDetection: {baseEjectionTime: later}}",
                "spec.trafficPolicy.outlierDetection.baseEjectionTime",
                "",
            ),
            (
                "host: r\nsubsets: [{name: v1, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}]",
                "spec.subsets[0].trafficPolicy.loadBalancer.simple",
                "not supported by lumen yet",
            ),
            (
                "host: r\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}",
                "spec.trafficPolicy.portLevelSettings[1].port.number",
                "twice",
            ),
        ] {
            let e = dr(yaml).expect_err(yaml);
            assert_eq!(e.path, path, "{yaml}: {e}");
            assert!(e.message.contains(words), "{yaml}: {e}");
        }
    }

    #[test]
    fn subset_and_port_policies_merge_as_istio_merges_them() {
        let rule = dr("host: r
trafficPolicy:
  loadBalancer: {simple: RANDOM}
  connectionPool: {tcp: {maxConnections: 10}}
  portLevelSettings:
  - port: {number: 8080}
    loadBalancer: {simple: LEAST_REQUEST}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {tcp: {maxConnections: 1}}
- name: v3
  labels: {version: v3}
")
        .expect("a rule with subset and port policies");
        let pool = |n| {
            Some(ConnectionPool {
                max_connections: Some(n),
                ..ConnectionPool::default()
            })
        };
        // The rule's settings, on a port without its own.
        let top = rule.policy_for("", 80);
        assert_eq!(top.load_balancer, Some(LoadBalancer::Random));
        assert_eq!(top.connection_pool, pool(10));
        // A port's own settings replace the rule's whole: no pool inherited.
        let port = rule.policy_for("", 8080);
        assert_eq!(port.load_balancer, Some(LoadBalancer::LeastRequest));
        assert_eq!(port.connection_pool, None);
        // A subset without a policy: the rule's (for the port).
        assert_eq!(rule.policy_for("v3", 8080), port);
        // A subset's setting is added over the rule's.
        let v1 = rule.policy_for("v1", 80);
        assert_eq!(v1.load_balancer, Some(LoadBalancer::Random));
        assert_eq!(v1.connection_pool, pool(10));
        assert_eq!(
            v1.outlier_detection.map(|o| o.consecutive_5xx_errors),
            Some(Some(2))
        );
        // A subset's own port settings replace every setting for that port.
        let v2 = rule.policy_for("v2", 80);
        assert_eq!(v2.load_balancer, Some(LoadBalancer::RoundRobin));
        assert_eq!(v2.connection_pool, pool(10));
        let v2_9090 = rule.policy_for("v2", 9090);
        assert_eq!(v2_9090.load_balancer, None);
        assert_eq!(v2_9090.connection_pool, pool(1));
    }

    #[test]
    fn string_matches_weights_and_unsupported_fields_are_named() {
        let e = vs("hosts: [r]\nhttp:\n- match: [{uri: {exact: /a, prefix: /b}}]\n  route: [{destination: {host: r}}]\n")
            .expect_err("two kinds of match");
        assert_eq!(e.path, "spec.http[0].match[0].uri");
        let e = vs("hosts: [r]\nhttp:\n- route:\n  - {destination: {host: r, subset: a}, weight: 80}\n  - {destination: {host: r, subset: b}, weight: 30}\n")
            .expect_err("110");
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("spec.http[0].route", "the weights add up to 110, not 100")
        );
        let e = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}, headers: {request: {set: {'a b': c}}}}]\n")
            .expect_err("a bad header name");
        assert_eq!(e.path, "spec.http[0].route[0].headers.request.set");
        let e = vs("hosts: [r]\nhttp:\n- match: [{sourceNamespace: other}]\n  route: [{destination: {host: r}}]\n")
            .expect_err("not yet");
        assert!(e.message.contains("not supported by lumen yet"), "{e}");
        let e = vs("hosts: ['*']\ngateways: [bookinfo-gateway]\nhttp:\n- route: [{destination: {host: r}}]\n")
            .expect_err("ingress");
        assert_eq!(e.path, "spec.gateways");
        let ok = vs("hosts: [r]\nhttp:\n- match: [{headers: {end-user: {exact: jason}}}]\n  route: [{destination: {host: r, subset: v2}}]\n- route: [{destination: {host: r, subset: v1}}]\n")
            .expect("reviews-test-v2");
        assert_eq!(ok.http.len(), 2);
        assert_eq!(
            ok.http[0].matches[0].headers["end-user"],
            StringMatch::Exact("jason".into())
        );
    }

    #[test]
    fn faults_read_with_their_shares_and_bad_ones_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- fault: {delay: {fixedDelay: 7s, percentage: {value: 100.0}}, abort: {httpStatus: 500, percentage: {value: 10}}}\n  route: [{destination: {host: r}}]\n")
            .expect("delay and abort");
        assert_eq!(
            ok.http[0].fault,
            Some(FaultPolicy {
                delay: Some((std::time::Duration::from_secs(7), 100.0)),
                abort: Some((500, 10.0)),
            })
        );
        let e = vs("hosts: [r]\nhttp:\n- fault: {delay: {fixedDelay: 7}}\n  route: [{destination: {host: r}}]\n")
            .expect_err("no unit");
        assert_eq!(e.path, "spec.http[0].fault.delay.fixedDelay");
        let e = vs("hosts: [r]\nhttp:\n- fault: {abort: {httpStatus: 700}}\n  route: [{destination: {host: r}}]\n")
            .expect_err("no such status");
        assert_eq!(e.path, "spec.http[0].fault.abort.httpStatus");
        let e = vs("hosts: [r]\nhttp:\n- fault: {abort: {httpStatus: 503, percentage: {value: 150}}}\n  route: [{destination: {host: r}}]\n")
            .expect_err("150%");
        assert_eq!(e.path, "spec.http[0].fault.abort.percentage.value");
    }

    #[test]
    fn retries_read_with_istio_s_defaults_and_bad_conditions_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,503'}\n  route: [{destination: {host: r}}]\n")
            .expect("retries");
        assert_eq!(
            ok.http[0].retries,
            Some(RetrySettings {
                attempts: 3,
                per_try_timeout: Some(std::time::Duration::from_secs(2)),
                retry_on: vec![
                    "gateway-error".into(),
                    "connect-failure".into(),
                    "retriable-status-codes".into()
                ],
                status_codes: vec![503],
            })
        );
        let default = vs(
            "hosts: [r]\nhttp:\n- retries: {attempts: 2}\n  route: [{destination: {host: r}}]\n",
        )
        .expect("Istio's default conditions");
        let d = default.http[0].retries.clone().expect("retries");
        assert!(d.retry_on.contains(&"connect-failure".to_string()) && d.status_codes == [503]);
        let off = vs(
            "hosts: [r]\nhttp:\n- retries: {attempts: 0}\n  route: [{destination: {host: r}}]\n",
        )
        .expect("off");
        assert_eq!(off.http[0].retries, Some(RetrySettings::default()));
        let e = vs("hosts: [r]\nhttp:\n- retries: {attempts: 2, retryOn: 'sometimes'}\n  route: [{destination: {host: r}}]\n")
            .expect_err("unknown condition");
        assert_eq!(e.path, "spec.http[0].retries.retryOn");
    }

    #[test]
    fn a_regex_that_does_not_compile_is_named() {
        let e = vs("hosts: [r]\nhttp:\n- match: [{uri: {regex: '/reviews/([0-9'}}]\n  route: [{destination: {host: r}}]\n")
            .expect_err("bad regex");
        assert_eq!(e.path, "spec.http[0].match[0].uri.regex");
        assert!(e.message.contains("does not compile"), "{e}");
    }

    #[test]
    fn header_changes_read_and_bad_names_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- headers: {request: {set: {X-Test: 'a b'}, remove: [x-gone]}, response: {add: {x-by: lumen}}}\n  route: [{destination: {host: r}}]\n")
            .expect("headers");
        let h = ok.http[0].headers.clone().expect("rules");
        assert_eq!(h.request.set, [("x-test".to_string(), "a b".to_string())]);
        assert_eq!(h.request.remove, ["x-gone"]);
        assert_eq!(h.response.add, [("x-by".to_string(), "lumen".to_string())]);
        let e = vs("hosts: [r]\nhttp:\n- headers: {request: {set: {'bad name': x}}}\n  route: [{destination: {host: r}}]\n")
            .expect_err("bad name");
        assert_eq!(e.path, "spec.http[0].headers.request.set");
    }

    #[test]
    fn redirects_read_and_bad_ones_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- redirect: {uri: /v2/ratings, authority: newratings, redirectCode: 308}\n")
            .expect("redirect");
        assert_eq!(
            ok.http[0].redirect,
            Some(Redirect {
                scheme: None,
                host: Some("newratings".into()),
                port: None,
                path: Some(PathChange::Full("/v2/ratings".into())),
                status: 308,
            })
        );
        let https = vs(
            "hosts: [r]\nhttp:\n- redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}\n",
        )
        .expect("derivePort");
        assert_eq!(
            https.http[0].redirect.as_ref().and_then(|r| r.port),
            Some(443)
        );
        let kept = vs("hosts: [r]\nhttp:\n- redirect: {uri: /x, derivePort: FROM_REQUEST_PORT}\n")
            .expect("derivePort");
        assert_eq!(kept.http[0].redirect.as_ref().and_then(|r| r.port), None);
        let e = vs("hosts: [r]\nhttp:\n- redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}\n")
            .expect_err("both");
        assert_eq!(e.path, "spec.http[0].redirect.derivePort");
        let e = vs("hosts: [r]\nhttp:\n- redirect: {uri: /a, redirectCode: 200}\n")
            .expect_err("not a redirect status");
        assert_eq!(e.path, "spec.http[0].redirect.redirectCode");
        let e =
            vs("hosts: [r]\nhttp:\n- redirect: {uri: /a}\n  route: [{destination: {host: r}}]\n")
                .expect_err("both");
        assert_eq!(e.path, "spec.http[0].redirect");
    }

    #[test]
    fn regex_rewrites_read_and_bad_ones_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- rewrite: {uriRegexRewrite: {match: '^/a/([0-9]+)', rewrite: '/b/\\1'}}\n  route: [{destination: {host: r}}]\n")
            .expect("a regex rewrite");
        assert_eq!(
            ok.http[0].rewrite.as_ref().and_then(|r| r.path.clone()),
            Some(PathChange::Regex {
                pattern: "^/a/([0-9]+)".into(),
                substitution: "/b/\\1".into()
            })
        );
        for (rewrite, path) in [
            (
                "{uriRegexRewrite: {match: '(', rewrite: /}}",
                "spec.http[0].rewrite.uriRegexRewrite.match",
            ),
            (
                "{uriRegexRewrite: {match: '/a', rewrite: '/\\2'}}",
                "spec.http[0].rewrite.uriRegexRewrite.rewrite",
            ),
            (
                "{uri: /x, uriRegexRewrite: {match: '/a', rewrite: /b}}",
                "spec.http[0].rewrite.uriRegexRewrite",
            ),
        ] {
            let e = vs(&format!(
                "hosts: [r]\nhttp:\n- rewrite: {rewrite}\n  route: [{{destination: {{host: r}}}}]\n"
            ))
            .expect_err(rewrite);
            assert_eq!(e.path, path, "{rewrite}: {e}");
        }
    }

    #[test]
    fn cors_policies_read_and_bad_ones_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- corsPolicy: {allowOrigins: [{exact: 'https://a.example'}, {regex: 'https://.*[.]b[.]example'}], allowMethods: [GET, PUT], allowHeaders: [X-Custom], exposeHeaders: ['*'], maxAge: 24h, allowCredentials: true, unmatchedPreflights: IGNORE}\n  route: [{destination: {host: r}}]\n")
            .expect("a CORS policy");
        assert_eq!(
            ok.http[0].cors,
            Some(CorsPolicy {
                allow_origins: vec![
                    StringMatch::Exact("https://a.example".into()),
                    StringMatch::Regex("https://.*[.]b[.]example".into())
                ],
                allow_methods: vec!["GET".into(), "PUT".into()],
                allow_headers: vec!["x-custom".into()],
                expose_headers: vec!["*".into()],
                max_age: Some(86_400),
                allow_credentials: Some(true),
                forward_unmatched_preflights: false,
            })
        );
        for (yaml, path) in [
            (
                "{allowMethods: [FETCH]}",
                "spec.http[0].corsPolicy.allowMethods[0]",
            ),
            (
                "{allowHeaders: ['bad header']}",
                "spec.http[0].corsPolicy.allowHeaders[0]",
            ),
            ("{maxAge: 1.5s}", "spec.http[0].corsPolicy.maxAge"),
            (
                "{allowOrigins: [{regex: '('}]}",
                "spec.http[0].corsPolicy.allowOrigins[0].regex",
            ),
            (
                "{unmatchedPreflights: DROP}",
                "spec.http[0].corsPolicy.unmatchedPreflights",
            ),
        ] {
            let e = vs(&format!(
                "hosts: [r]\nhttp:\n- corsPolicy: {yaml}\n  route: [{{destination: {{host: r}}}}]\n"
            ))
            .expect_err(yaml);
            assert_eq!(e.path, path, "{yaml}: {e}");
        }
    }

    #[test]
    fn direct_responses_read_and_bad_ones_are_named() {
        let ok = vs("hosts: [r]\nhttp:\n- directResponse: {status: 503, body: {string: down}}\n- directResponse: {status: 200, body: {bytes: aGk=}}\n")
            .expect("direct responses");
        assert_eq!(
            ok.http[0].direct_response,
            Some(DirectResponse {
                status: 503,
                body: b"down".to_vec()
            })
        );
        assert_eq!(
            ok.http[1].direct_response.as_ref().map(|d| &d.body[..]),
            Some(&b"hi"[..])
        );
        for (yaml, path, reason) in [
            (
                "{status: 99}",
                "spec.http[0].directResponse.status",
                "from 200 to 599",
            ),
            (
                "{status: 200, body: {bytes: '***'}}",
                "spec.http[0].directResponse.body.bytes",
                "base64",
            ),
            (
                "{status: 200, body: {string: a, bytes: YQ==}}",
                "spec.http[0].directResponse.body",
                "one of",
            ),
        ] {
            let e = vs(&format!("hosts: [r]\nhttp:\n- directResponse: {yaml}\n")).expect_err(yaml);
            assert_eq!(e.path, path, "{yaml}");
            assert!(e.message.contains(reason), "{yaml}: {}", e.message);
        }
        let big = "x".repeat(lumen_api::MAX_DIRECT_RESPONSE_BODY + 1);
        let e = vs(&format!(
            "hosts: [r]\nhttp:\n- directResponse: {{status: 200, body: {{string: {big}}}}}\n"
        ))
        .expect_err("too big");
        assert_eq!(e.path, "spec.http[0].directResponse.body");
        let e = vs("hosts: [r]\nhttp:\n- directResponse: {status: 200}\n  route: [{destination: {host: r}}]\n")
            .expect_err("both");
        assert_eq!(e.path, "spec.http[0].directResponse");
    }

    #[test]
    fn rewrites_read_as_prefix_changes() {
        let ok = vs("hosts: [r]\nhttp:\n- match: [{uri: {prefix: /v1}}]\n  rewrite: {uri: /v2, authority: r.internal}\n  route: [{destination: {host: r}}]\n")
            .expect("rewrite");
        assert_eq!(
            ok.http[0].rewrite,
            Some(Rewrite {
                path: Some(PathChange::Prefix("/v2".into())),
                host: Some("r.internal".into()),
            })
        );
    }

    #[test]
    fn mirrors_read_with_their_share() {
        let ok = vs("hosts: [r]\nhttp:\n- mirror: {host: r, subset: v2}\n  mirrorPercentage: {value: 25}\n  route: [{destination: {host: r, subset: v1}}]\n")
            .expect("mirror");
        assert_eq!(ok.http[0].mirrors.len(), 1);
        assert_eq!(ok.http[0].mirrors[0].0.subset.as_deref(), Some("v2"));
        assert_eq!(ok.http[0].mirrors[0].1, 25.0);
        let e = vs("hosts: [r]\nhttp:\n- mirrorPercentage: {value: 25}\n  route: [{destination: {host: r}}]\n")
            .expect_err("no mirror");
        assert_eq!(e.path, "spec.http[0].mirrorPercentage");
    }

    #[test]
    fn route_timeouts_read_as_durations() {
        let ok = vs("hosts: [r]\nhttp:\n- timeout: 0.5s\n  route: [{destination: {host: r}}]\n")
            .expect("timeout");
        assert_eq!(
            ok.http[0].timeout,
            Some(std::time::Duration::from_millis(500))
        );
        let e = vs("hosts: [r]\nhttp:\n- timeout: soon\n  route: [{destination: {host: r}}]\n")
            .expect_err("not a duration");
        assert_eq!(e.path, "spec.http[0].timeout");
    }

    #[test]
    fn subsets_are_named_once() {
        let spec: crd::DestinationRuleSpec = serde_yaml::from_str(
            "host: r\nsubsets: [{name: v1, labels: {version: v1}}, {name: v1}]\n",
        )
        .expect("spec");
        let e = destination_rule(&spec).expect_err("twice");
        assert_eq!(e.path, "spec.subsets[1].name");
    }
}
