//! The proxy's routing configuration as plain Rust: route tables, clusters and endpoints,
//! converted from xDS at the edge (`TryFrom`), and the routing decision made per request.

use std::collections::HashMap;

use crate::FastMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use lumen_api::pb::envoy::config::cluster::v3 as xcluster;
use lumen_api::pb::envoy::config::core::v3 as xcore;
use lumen_api::pb::envoy::config::endpoint::v3 as xendpoint;
use lumen_api::pb::envoy::config::listener::v3 as xlistener;
use lumen_api::pb::envoy::config::route::v3 as xroute;
use lumen_api::pb::envoy::extensions::filters::network::http_connection_manager::v3 as xhcm;
use lumen_api::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use lumen_api::pb::google::protobuf::value::Kind;
use lumen_api::{cluster_name, endpoint_meta, type_url};
use prost::Message;

use crate::lb::Balancer;
pub use crate::lb::{LbPolicy, OutlierPolicy};
use crate::stack::breaker::{Breaker, Thresholds};

/// Why an xDS resource was rejected (the text goes back to the control plane in the NACK).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{type_url}: cannot decode resource: {message}")]
    Decode { type_url: String, message: String },
    #[error("{kind} {name:?}: {message}")]
    Unsupported {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// Everything routing needs, replaced as a whole on each xDS update.
#[derive(Debug, Default, Clone)]
pub struct MeshConfig {
    /// Route configurations by name (`"9080"`).
    pub routes: FastMap<String, Arc<RouteConfig>>,
    /// Clusters by name.
    pub clusters: FastMap<String, Arc<Cluster>>,
    /// Route configuration names the listeners refer to (what to ask RDS for).
    pub rds_names: Vec<String>,
    /// Outbound TCP listeners (Envoy's TCP proxy), for captured connections.
    pub tcp_routes: Vec<TcpRoute>,
    /// Versions of each type as last accepted, for `/config_dump`.
    pub versions: HashMap<&'static str, String>,
}

/// An outbound listener of opaque TCP: a captured connection to `address` (a service's
/// cluster IP, or `0.0.0.0` for any address on the port) goes to `cluster` as bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpRoute {
    pub listener: String,
    pub address: SocketAddr,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Each domain's first virtual host, so a host is found in one lookup however many
    /// services the mesh has (built by [`RouteConfig::new`]).
    by_domain: FastMap<String, usize>,
    /// The first virtual host with the `*` domain.
    wildcard: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    /// The service the name says, as metric label values (made once, at config time).
    pub labels: ServiceLabels,
}

/// A virtual host's service as Istio's `destination_service*` labels: the host of its name
/// (`reviews.default.svc.cluster.local`), and when it has a dot, the service's name and
/// namespace (`reviews`, `default`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceLabels {
    pub service: crate::telemetry::Label,
    pub name_and_namespace: Option<(crate::telemetry::Label, crate::telemetry::Label)>,
}

impl ServiceLabels {
    pub fn of(virtual_host: &str) -> ServiceLabels {
        let service = crate::http::host_only(virtual_host);
        ServiceLabels {
            service: Arc::from(service),
            name_and_namespace: service.split_once('.').map(|(name, rest)| {
                (
                    Arc::from(name),
                    Arc::from(rest.split('.').next().unwrap_or_default()),
                )
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    /// Query parameters (the first value of each name, as sent), all of which must match.
    pub query: Vec<HeaderMatch>,
    pub backends: Vec<WeightedBackend>,
    /// The route's fault injection (Envoy's fault filter, configured per route).
    pub fault: Option<Arc<RouteFault>>,
    /// How long the upstream gets to answer (`RouteAction.timeout`; zero: no limit); the
    /// connector's default (15 s, Envoy's) when unset.
    pub timeout: Option<std::time::Duration>,
    /// The route's retry policy (`RouteAction.retry_policy`).
    pub retry: Option<Arc<RetryPolicy>>,
    /// Header changes for the request and the response.
    pub header_rules: Option<Arc<HeaderRules>>,
    /// Answer the request here instead of forwarding it (Envoy's redirect and direct
    /// response actions).
    pub answer: Option<Answer>,
    /// The route's CORS policy (Envoy's CORS filter, configured per route).
    pub cors: Option<Arc<CorsPolicy>>,
    /// Change the request's path or host on its way upstream.
    pub rewrite: Option<Arc<Rewrite>>,
    /// Clusters a copy of a share of requests goes to (Envoy's request mirror policies).
    pub mirrors: Vec<Mirror>,
    /// What of the request a consistent-hash cluster hashes (`RouteAction.hash_policy`).
    pub hash_policy: Vec<HashPolicy>,
}

/// One thing a request is hashed by, for session affinity (Envoy's `HashPolicy`).
#[derive(Debug, Clone, PartialEq)]
pub enum HashPolicy {
    Header(http::HeaderName),
    /// A cookie; with a time to live the proxy makes one up when the request has none and
    /// sets it on the response (zero: a session cookie).
    Cookie {
        name: String,
        ttl: Option<std::time::Duration>,
        path: String,
    },
    SourceIp,
    QueryParameter(String),
}

/// The first policy of a cluster's `load_balancing_policy` lumen-proxy carries out (as
/// Envoy, which stops at the first it supports): Lumen's peak EWMA, or Envoy's least
/// request, round robin or random; a list with none of them is a NACK.
fn load_balancing_policy(
    cluster: &str,
    p: &xcluster::LoadBalancingPolicy,
) -> Result<LbPolicy, ConfigError> {
    use lumen_api::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
    use lumen_api::peak_ewma;
    let mut seen = Vec::new();
    for policy in &p.policies {
        let Some(any) = policy
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        match any.type_url.as_str() {
            peak_ewma::TYPED_STRUCT_URL | peak_ewma::OLD_TYPED_STRUCT_URL => {
                let ts = peak_ewma::TypedStruct::decode(any.value.as_slice()).map_err(|e| {
                    unsupported(
                        "cluster",
                        cluster,
                        format!("a TypedStruct does not decode: {e}"),
                    )
                })?;
                if ts.type_url == peak_ewma::TYPE_URL {
                    let s = peak_ewma::Settings::from_struct(ts.value.as_ref()).map_err(|e| {
                        unsupported("cluster", cluster, format!("peak EWMA settings: {e}"))
                    })?;
                    return Ok(LbPolicy::PeakEwma {
                        decay: std::time::Duration::from_millis(s.decay_ms),
                        default_rtt: std::time::Duration::from_millis(s.default_rtt_ms),
                    });
                }
                seen.push(ts.type_url);
            }
            "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest" =>
            {
                let lr = LeastRequest::decode(any.value.as_slice()).map_err(|e| {
                    unsupported(
                        "cluster",
                        cluster,
                        format!("LeastRequest does not decode: {e}"),
                    )
                })?;
                let choices = lr.choice_count.as_ref().map_or(2, |v| v.value);
                if choices == 2 {
                    return Ok(LbPolicy::LeastRequest);
                }
                seen.push(format!("least request of {choices} choices"));
            }
            "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin" =>
            {
                return Ok(LbPolicy::RoundRobin);
            }
            "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random" => {
                return Ok(LbPolicy::Random);
            }
            other => seen.push(other.to_string()),
        }
    }
    Err(unsupported(
        "cluster",
        cluster,
        format!("load_balancing_policy has no policy lumen-proxy carries out: {seen:?}"),
    ))
}

/// A cluster's circuit breakers (the default-priority thresholds; Envoy's defaults for what
/// is unset); none when the cluster sets none.
fn circuit_breakers(
    cluster: &str,
    cb: Option<&xcluster::CircuitBreakers>,
    http2: bool,
) -> Result<Option<Arc<Breaker>>, ConfigError> {
    use lumen_api::pb::envoy::config::core::v3::RoutingPriority;
    let Some(cb) = cb else {
        return Ok(None);
    };
    let mut thresholds = None;
    for t in &cb.thresholds {
        if t.priority != RoutingPriority::Default as i32 {
            return Err(unsupported(
                "cluster",
                cluster,
                "circuit_breakers for the HIGH routing priority are not supported",
            ));
        }
        if t.retry_budget.is_some() || t.max_connection_pools.is_some() {
            return Err(unsupported(
                "cluster",
                cluster,
                "circuit_breakers retry_budget and max_connection_pools are not supported",
            ));
        }
        let d = Thresholds::default();
        thresholds = Some(Thresholds {
            max_connections: t
                .max_connections
                .as_ref()
                .map_or(d.max_connections, |v| v.value),
            max_pending: t
                .max_pending_requests
                .as_ref()
                .map_or(d.max_pending, |v| v.value),
            max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
            max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
        });
    }
    Ok(thresholds.map(|t| Arc::new(Breaker::new(t, http2))))
}

/// A cluster's outlier detection: consecutive 5xx and gateway failures, each on when its
/// enforcement is (Envoy's defaults: 5 in a row; 5xx enforced, gateway failures not), with
/// the ejection times and share; the panic threshold from `common_lb_config` (Envoy's 50%).
fn outlier_policy(
    cluster: &str,
    od: Option<&xcluster::OutlierDetection>,
    common: Option<&xcluster::cluster::CommonLbConfig>,
) -> Result<Option<OutlierPolicy>, ConfigError> {
    let Some(od) = od else {
        return Ok(None);
    };
    let enforced = |what: &str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
        0 => Ok(false),
        100 => Ok(true),
        other => Err(unsupported(
            "cluster",
            cluster,
            format!("outlier_detection.{what} {other}: only 0 or 100 is supported"),
        )),
    };
    let duration = |what: &str, d: Option<lumen_api::pb::google::protobuf::Duration>, default| {
        d.map_or(Ok(default), |d| {
            std_duration(d).ok_or_else(|| {
                unsupported(
                    "cluster",
                    cluster,
                    format!("outlier_detection.{what} is negative"),
                )
            })
        })
    };
    let five = enforced(
        "enforcing_consecutive_5xx",
        od.enforcing_consecutive_5xx.as_ref().map(|v| v.value),
        100,
    )?;
    let gateway = enforced(
        "enforcing_consecutive_gateway_failure",
        od.enforcing_consecutive_gateway_failure
            .as_ref()
            .map(|v| v.value),
        0,
    )?;
    let panic = common
        .and_then(|c| c.healthy_panic_threshold.as_ref())
        .map_or(50.0, |p| p.value);
    Ok(Some(OutlierPolicy {
        consecutive_5xx: if five {
            od.consecutive_5xx.as_ref().map_or(5, |v| v.value)
        } else {
            0
        },
        consecutive_gateway: if gateway {
            od.consecutive_gateway_failure
                .as_ref()
                .map_or(5, |v| v.value)
        } else {
            0
        },
        base_ejection: duration(
            "base_ejection_time",
            od.base_ejection_time,
            std::time::Duration::from_secs(30),
        )?,
        max_ejection: duration(
            "max_ejection_time",
            od.max_ejection_time,
            std::time::Duration::from_secs(300),
        )?,
        max_ejection_percent: od.max_ejection_percent.as_ref().map_or(10, |v| v.value),
        panic_threshold_percent: panic.clamp(0.0, 100.0) as u32,
    }))
}

fn hash_policies(
    route: &str,
    policies: Vec<xroute::route_action::HashPolicy>,
) -> Result<Vec<HashPolicy>, ConfigError> {
    use xroute::route_action::hash_policy::PolicySpecifier as P;
    policies
        .into_iter()
        .map(|p| match p.policy_specifier {
            Some(P::Header(h)) => {
                if h.regex_rewrite.is_some() {
                    return Err(unsupported(
                        "route",
                        route,
                        "hash_policy.header.regex_rewrite is not supported",
                    ));
                }
                http::HeaderName::from_bytes(h.header_name.as_bytes())
                    .map(HashPolicy::Header)
                    .map_err(|e| {
                        unsupported(
                            "route",
                            route,
                            format!("hash_policy header {:?}: {e}", h.header_name),
                        )
                    })
            }
            Some(P::Cookie(c)) => Ok(HashPolicy::Cookie {
                ttl: match c.ttl {
                    None => None,
                    Some(d) => Some(std_duration(d).ok_or_else(|| {
                        unsupported("route", route, "a negative cookie ttl")
                    })?),
                },
                name: c.name,
                path: c.path,
            }),
            Some(P::ConnectionProperties(c)) if c.source_ip => Ok(HashPolicy::SourceIp),
            Some(P::QueryParameter(q)) => Ok(HashPolicy::QueryParameter(q.name)),
            other => Err(unsupported(
                "route",
                route,
                format!("hash_policy {other:?} is not supported (header, cookie, source_ip, query_parameter)"),
            )),
        })
        .collect()
}

/// A copy of a share of a route's requests, sent to a cluster and never answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub cluster: String,
    /// Parts per million of requests.
    pub share: u32,
}

fn mirrors(
    route: &str,
    policies: &[xroute::route_action::RequestMirrorPolicy],
) -> Result<Vec<Mirror>, ConfigError> {
    policies
        .iter()
        .map(|p| {
            if p.cluster.is_empty()
                || !p.cluster_header.is_empty()
                || !p.request_headers_mutations.is_empty()
                || p.disable_shadow_host_suffix_append
            {
                return Err(unsupported(
                    "route",
                    route,
                    "a mirror policy names one cluster; cluster headers, header mutations and no shadow suffix are not supported",
                ));
            }
            Ok(Mirror {
                cluster: p.cluster.clone(),
                share: per_million(p.runtime_fraction.as_ref().and_then(|f| f.default_value.as_ref())),
            })
        })
        .collect()
}

/// What a route answers itself, instead of forwarding the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Envoy's redirect action.
    Redirect(Arc<Redirect>),
    /// Envoy's direct response action.
    Direct(Arc<DirectResponse>),
}

/// A fixed response: a status and a body (of at most [`MAX_DIRECT_RESPONSE_BODY`] bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct DirectResponse {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
}

pub use lumen_api::MAX_DIRECT_RESPONSE_BODY;

/// A redirect the proxy answers itself: each part replaces the request's own when set.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: http::StatusCode,
    pub strip_query: bool,
}

/// How a redirect or a rewrite changes the path: the whole path, or the part the route's
/// prefix matched.
#[derive(Debug, Clone, PartialEq)]
pub enum PathChange {
    Full(String),
    Prefix(String),
    /// Every match of the pattern in the path replaced (Envoy's `regex_rewrite`: RE2's
    /// global replace, `\1` naming a capture group).
    Regex(RegexRewrite),
}

/// A regex rewrite: the pattern (unanchored, within [`lumen_api::MAX_REGEX_PROGRAM`]) and
/// the substitution in the regex crate's syntax (`\N` turned into `${N}`, `$` escaped).
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    source: String,
    regex: regex::Regex,
    substitution: String,
}

impl RegexRewrite {
    pub fn new(pattern: &str, substitution: &str) -> Result<RegexRewrite, String> {
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(lumen_api::MAX_REGEX_PROGRAM)
            .dfa_size_limit(lumen_api::MAX_REGEX_PROGRAM)
            .build()
            .map_err(|e| e.to_string())?;
        // RE2's `\N` (N a digit) is a capture group, `\\` a backslash; anything else as is.
        let mut out = String::new();
        let mut chars = substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '$' => out.push_str("$$"),
                '\\' => match chars.peek().copied() {
                    Some(d) if d.is_ascii_digit() => {
                        chars.next();
                        let group = d.to_digit(10).unwrap_or(0) as usize;
                        if group > regex.captures_len() - 1 {
                            return Err(format!(
                                "the substitution names group {group}; the pattern has {}",
                                regex.captures_len() - 1
                            ));
                        }
                        out.push_str(&format!("${{{d}}}"));
                    }
                    Some('\\') => {
                        chars.next();
                        out.push('\\');
                    }
                    _ => {
                        return Err(
                            "a backslash in the substitution is followed by neither a digit nor a backslash"
                                .to_string(),
                        );
                    }
                },
                other => out.push(other),
            }
        }
        Ok(RegexRewrite {
            source: pattern.to_string(),
            regex,
            substitution: out,
        })
    }

    pub fn apply(&self, path: &str) -> String {
        self.regex
            .replace_all(path, self.substitution.as_str())
            .into_owned()
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &RegexRewrite) -> bool {
        self.source == other.source && self.substitution == other.substitution
    }
}

impl PathChange {
    /// The new path for `path` (without its query), which the route matched with `matched`.
    pub fn apply(&self, path: &str, matched: &PathMatch) -> String {
        let new = match self {
            PathChange::Full(p) => p.clone(),
            PathChange::Regex(r) => r.apply(path),
            PathChange::Prefix(p) => {
                let prefix = match matched {
                    PathMatch::Prefix(m) | PathMatch::SeparatedPrefix(m) | PathMatch::Exact(m) => {
                        m.as_str()
                    }
                    PathMatch::Regex(_) => "",
                };
                match path.strip_prefix(prefix) {
                    // Gateway API: `/v1` → `/` on `/v1/x` gives `/x`, not `//x`.
                    Some(rest) if p.ends_with('/') && rest.starts_with('/') => {
                        format!("{p}{}", &rest[1..])
                    }
                    Some(rest) => format!("{p}{rest}"),
                    None => path.to_string(),
                }
            }
        };
        if new.is_empty() { "/".to_string() } else { new }
    }
}

/// A rewrite of the request on its way upstream: its path and its host.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub path: Option<PathChange>,
    pub host: Option<String>,
}

/// A route action's rewrite: `prefix_rewrite`, `regex_rewrite` (a whole-path one, `^/.*$`
/// or `^.*$`, as the new path itself), and `host_rewrite_literal`.
fn rewrite(route: &str, a: &xroute::RouteAction) -> Result<Option<Rewrite>, ConfigError> {
    let mut path =
        (!a.prefix_rewrite.is_empty()).then(|| PathChange::Prefix(a.prefix_rewrite.clone()));
    if let Some(r) = &a.regex_rewrite {
        let pattern = r
            .pattern
            .as_ref()
            .map(|p| p.regex.as_str())
            .unwrap_or_default();
        path = Some(if pattern == "^/.*$" || pattern == "^.*$" {
            PathChange::Full(r.substitution.clone())
        } else {
            PathChange::Regex(RegexRewrite::new(pattern, &r.substitution).map_err(|e| {
                unsupported(
                    "route",
                    route,
                    format!("regex_rewrite {pattern:?} → {:?}: {e}", r.substitution),
                )
            })?)
        });
    }
    let host = match &a.host_rewrite_specifier {
        None => None,
        Some(xroute::route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => {
            return Err(unsupported(
                "route",
                route,
                "only a literal host rewrite is supported",
            ));
        }
    };
    Ok((path.is_some() || host.is_some()).then_some(Rewrite { path, host }))
}

/// Envoy's direct response action: a status from 200 to 599 and an inline body of at most
/// [`MAX_DIRECT_RESPONSE_BODY`] bytes.
fn direct_response(
    route: &str,
    a: xroute::DirectResponseAction,
) -> Result<DirectResponse, ConfigError> {
    use lumen_api::pb::envoy::config::core::v3::data_source::Specifier;
    if a.body_format.is_some() {
        return Err(unsupported(
            "route",
            route,
            "a direct response body format is not supported yet",
        ));
    }
    let status = u16::try_from(a.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .ok_or_else(|| {
            unsupported(
                "route",
                route,
                format!("direct response status {} is not from 200 to 599", a.status),
            )
        })?;
    let body = match a.body.and_then(|b| b.specifier) {
        None => bytes::Bytes::new(),
        Some(Specifier::InlineBytes(b)) => b.into(),
        Some(Specifier::InlineString(s)) => s.into(),
        Some(_) => {
            return Err(unsupported(
                "route",
                route,
                "a direct response body from a file or the environment",
            ));
        }
    };
    if body.len() > MAX_DIRECT_RESPONSE_BODY {
        return Err(unsupported(
            "route",
            route,
            format!(
                "a direct response body of {} bytes (at most {MAX_DIRECT_RESPONSE_BODY})",
                body.len()
            ),
        ));
    }
    Ok(DirectResponse { status, body })
}

fn redirect_action(route: &str, a: xroute::RedirectAction) -> Result<Redirect, ConfigError> {
    use xroute::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let status = match C::try_from(a.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => {
            return Err(unsupported(
                "route",
                route,
                format!("redirect response code {} is unknown", a.response_code),
            ));
        }
    };
    let scheme = match a.scheme_rewrite_specifier {
        None => None,
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::HttpsRedirect(false)) => None,
        Some(S::SchemeRedirect(s)) => Some(s),
    };
    let path = match a.path_rewrite_specifier {
        None => None,
        Some(P::PathRedirect(p)) => Some(PathChange::Full(p)),
        Some(P::PrefixRewrite(p)) => Some(PathChange::Prefix(p)),
        Some(P::RegexRewrite(r)) => {
            let pattern = r.pattern.map(|p| p.regex).unwrap_or_default();
            Some(PathChange::Regex(
                RegexRewrite::new(&pattern, &r.substitution).map_err(|e| {
                    unsupported(
                        "route",
                        route,
                        format!("redirect regex_rewrite {pattern:?}: {e}"),
                    )
                })?,
            ))
        }
        Some(P::PathRewrite(_)) => {
            return Err(unsupported(
                "route",
                route,
                "a path template redirect is not supported",
            ));
        }
    };
    Ok(Redirect {
        scheme,
        host: (!a.host_redirect.is_empty()).then_some(a.host_redirect),
        port: u16::try_from(a.port_redirect).ok().filter(|p| *p != 0),
        path,
        status: http::StatusCode::from_u16(status)
            .map_err(|_| unsupported("route", route, "a redirect status"))?,
        strip_query: a.strip_query,
    })
}

/// Header changes in one direction: removed, then set (replacing), then added.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderOps {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// A route's header changes, both ways.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

/// One direction's header changes from xDS. Values are Envoy's format strings: `%%` is a
/// percent sign, and any other `%` (a substitution such as `%DOWNSTREAM_REMOTE_ADDRESS%`,
/// which lumen-proxy does not carry out) is a NACK.
fn header_ops(
    route: &str,
    to_add: &[xcore::HeaderValueOption],
    to_remove: &[String],
) -> Result<HeaderOps, ConfigError> {
    use xcore::header_value_option::HeaderAppendAction as A;
    let name = |n: &str| {
        if n.starts_with(':') {
            return Err(unsupported(
                "route",
                route,
                format!("changing the pseudo-header {n:?} is not supported"),
            ));
        }
        http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| unsupported("route", route, format!("{n:?} is not a header name")))
    };
    let mut ops = HeaderOps {
        remove: to_remove
            .iter()
            .map(|n| name(n))
            .collect::<Result<_, _>>()?,
        ..HeaderOps::default()
    };
    for option in to_add {
        let Some(h) = &option.header else {
            continue;
        };
        let mut value = String::new();
        let mut rest = h.value.as_str();
        while let Some(i) = rest.find('%') {
            value.push_str(&rest[..i]);
            if rest[i..].starts_with("%%") {
                value.push('%');
                rest = &rest[i + 2..];
            } else {
                return Err(unsupported(
                    "route",
                    route,
                    format!(
                        "header {:?}: substitutions (%...%) are not supported",
                        h.key
                    ),
                ));
            }
        }
        value.push_str(rest);
        let value = http::HeaderValue::from_str(&value).map_err(|_| {
            unsupported(
                "route",
                route,
                format!("header {:?}: not a header value", h.key),
            )
        })?;
        // The deprecated `append` flag decides when it is set (Envoy still honours it);
        // else the action does.
        #[allow(deprecated)]
        let flag = option.append;
        let append = match flag {
            Some(a) => a.value,
            None => match A::try_from(option.append_action) {
                Ok(A::AppendIfExistsOrAdd) => true,
                Ok(A::OverwriteIfExistsOrAdd) => false,
                _ => {
                    return Err(unsupported(
                        "route",
                        route,
                        format!(
                            "header {:?}: append action {} is not supported",
                            h.key, option.append_action
                        ),
                    ));
                }
            },
        };
        let entry = (name(&h.key)?, value);
        if append {
            ops.add.push(entry);
        } else {
            ops.set.push(entry);
        }
    }
    Ok(ops)
}

/// When and how often a route's requests are tried again.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<std::time::Duration>,
    /// Envoy's `retry_on` conditions (`5xx`, `gateway-error`, `connect-failure`, `reset`,
    /// `refused-stream`, `retriable-4xx`, `retriable-status-codes`, and gRPC's `cancelled`,
    /// `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`).
    pub retry_on: Vec<String>,
    pub status_codes: Vec<u16>,
    /// With Envoy's previous-hosts predicate: how many picks a retry gets in all to find an
    /// endpoint not tried yet (0: no predicate, any endpoint).
    pub host_selection_attempts: u32,
}

fn retry_policy(route: &str, p: xroute::RetryPolicy) -> Result<RetryPolicy, ConfigError> {
    let previous_hosts = match p.retry_host_predicate.as_slice() {
        [] => false,
        [one] if one.name == lumen_api::PREVIOUS_HOSTS => true,
        other => {
            return Err(unsupported(
                "route",
                route,
                format!(
                    "retry host predicates {:?}: only {} is supported",
                    other.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                    lumen_api::PREVIOUS_HOSTS
                ),
            ));
        }
    };
    if p.retry_priority.is_some()
        || !p.retriable_headers.is_empty()
        || !p.retriable_request_headers.is_empty()
        || p.rate_limited_retry_back_off.is_some()
    {
        return Err(unsupported(
            "route",
            route,
            "retry priorities, header conditions and rate-limited back-off are not supported",
        ));
    }
    let retry_on: Vec<String> = p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(c) = retry_on
        .iter()
        .find(|c| !lumen_api::RETRY_ON.contains(&c.as_str()))
    {
        return Err(unsupported(
            "route",
            route,
            format!("retry_on condition {c:?} is not supported"),
        ));
    }
    let duration = |d| {
        std_duration(d).ok_or_else(|| unsupported("route", route, "a negative per-try timeout"))
    };
    Ok(RetryPolicy {
        // Envoy's default is one retry.
        attempts: p.num_retries.map_or(1, |n| n.value),
        per_try_timeout: p.per_try_timeout.map(duration).transpose()?,
        retry_on,
        status_codes: p
            .retriable_status_codes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect(),
        // Picks in all: the first and Envoy's reattempts (one when unset; at most 16 here).
        host_selection_attempts: if previous_hosts {
            1 + u32::try_from(p.host_selection_retry_max_attempts.clamp(1, 16)).unwrap_or(1)
        } else {
            0
        },
    })
}

/// Faults to inject on a route: a fixed delay and an abort status, each for a share of
/// requests in parts per million.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteFault {
    pub delay: Option<(std::time::Duration, u32)>,
    pub abort: Option<(http::StatusCode, u32)>,
}

pub use lumen_api::{CORS_FILTER, FAULT_FILTER};

/// A route's CORS policy (Envoy's CORS filter, configured per route).
#[derive(Debug, Clone, PartialEq)]
pub struct CorsPolicy {
    /// An origin is allowed when one of these matches it (or matches `*`).
    pub allow_origins: Vec<ValueMatch>,
    /// `access-control-allow-methods` (`*`: the method the preflight asks for).
    pub allow_methods: String,
    /// `access-control-allow-headers` (`*`: the headers the preflight asks for).
    pub allow_headers: String,
    pub expose_headers: String,
    /// `access-control-max-age`, in seconds as text.
    pub max_age: String,
    pub allow_credentials: bool,
    pub allow_private_network_access: bool,
    /// A preflight from an origin not allowed goes upstream (Envoy's default) or is answered
    /// 200 without CORS headers.
    pub forward_not_matching_preflights: bool,
}

impl CorsPolicy {
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches(Some("*")) || m.matches(Some(origin)))
    }
}

/// Reads a route's CORS filter configuration; what lumen-proxy does not carry out is a NACK.
fn route_cors(
    route: &str,
    config: &std::collections::HashMap<String, lumen_api::pb::google::protobuf::Any>,
) -> Result<Option<Arc<CorsPolicy>>, ConfigError> {
    use lumen_api::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy as XCors;
    let Some(any) = config.get(CORS_FILTER) else {
        return Ok(None);
    };
    let c = XCors::decode(any.value.as_slice()).map_err(|e| {
        unsupported(
            "route",
            route,
            format!("{CORS_FILTER} does not decode: {e}"),
        )
    })?;
    if c.shadow_enabled.is_some() {
        return Err(unsupported(
            "route",
            route,
            "a CORS policy in shadow mode is not supported yet",
        ));
    }
    if let Some(enabled) = &c.filter_enabled
        && (enabled
            .default_value
            .as_ref()
            .map_or(0, |p| per_million(Some(p)))
            != 1_000_000
            || !enabled.runtime_key.is_empty())
    {
        return Err(unsupported(
            "route",
            route,
            "a CORS policy enabled for a share of requests or by a runtime key is not supported yet",
        ));
    }
    for (what, value) in [
        ("allow_methods", &c.allow_methods),
        ("allow_headers", &c.allow_headers),
        ("expose_headers", &c.expose_headers),
        ("max_age", &c.max_age),
    ] {
        if http::HeaderValue::from_str(value).is_err() {
            return Err(unsupported(
                "route",
                route,
                format!("CORS {what} {value:?} is not a header value"),
            ));
        }
    }
    Ok(Some(Arc::new(CorsPolicy {
        allow_origins: c
            .allow_origin_string_match
            .into_iter()
            .map(|m| value_match(route, "CORS", "origin", m))
            .collect::<Result<_, _>>()?,
        allow_methods: c.allow_methods,
        allow_headers: c.allow_headers,
        expose_headers: c.expose_headers,
        max_age: c.max_age,
        allow_credentials: c.allow_credentials.is_some_and(|b| b.value),
        allow_private_network_access: c.allow_private_network_access.is_some_and(|b| b.value),
        forward_not_matching_preflights: c.forward_not_matching_preflights.is_none_or(|b| b.value),
    })))
}

/// A `FractionalPercent` in parts per million.
fn per_million(p: Option<&lumen_api::pb::envoy::r#type::v3::FractionalPercent>) -> u32 {
    use lumen_api::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
    let Some(p) = p else {
        // Envoy's default for a fault without a percentage: every request.
        return 1_000_000;
    };
    let scale = match D::try_from(p.denominator) {
        Ok(D::Hundred) => 10_000,
        Ok(D::TenThousand) => 100,
        _ => 1,
    };
    p.numerator.saturating_mul(scale).min(1_000_000)
}

/// A header's or a query parameter's string match: exact, prefix or regex, case-sensitive.
fn value_match(
    route: &str,
    what: &str,
    name: &str,
    m: StringMatcher,
) -> Result<ValueMatch, ConfigError> {
    match m {
        StringMatcher {
            match_pattern: Some(MatchPattern::Exact(v)),
            ignore_case: false,
        } => Ok(ValueMatch::Exact(v)),
        StringMatcher {
            match_pattern: Some(MatchPattern::Prefix(v)),
            ignore_case: false,
        } => Ok(ValueMatch::Prefix(v)),
        StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(re)),
            ignore_case: false,
        } => Pattern::new(&re.regex).map(ValueMatch::Regex).map_err(|e| {
            unsupported(
                "route",
                route,
                format!("{what} {name:?} regex {:?}: {e}", re.regex),
            )
        }),
        other => Err(unsupported(
            "route",
            route,
            format!("{what} {name:?} match {other:?} is not supported yet"),
        )),
    }
}

/// A protobuf duration as a std one; `None` when negative.
fn std_duration(d: lumen_api::pb::google::protobuf::Duration) -> Option<std::time::Duration> {
    u64::try_from(d.seconds)
        .ok()
        .zip(u32::try_from(d.nanos).ok())
        .map(|(s, n)| std::time::Duration::new(s, n))
}

/// Reads a route's fault filter configuration; what lumen-proxy does not carry out is a NACK.
fn route_fault(
    route: &str,
    config: &std::collections::HashMap<String, lumen_api::pb::google::protobuf::Any>,
) -> Result<Option<Arc<RouteFault>>, ConfigError> {
    use lumen_api::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use lumen_api::pb::envoy::extensions::filters::http::fault::v3::{
        HttpFault, fault_abort::ErrorType,
    };
    let Some(any) = config.get(FAULT_FILTER) else {
        return Ok(None);
    };
    let f = HttpFault::decode(any.value.as_slice()).map_err(|e| {
        unsupported(
            "route",
            route,
            format!("{FAULT_FILTER} does not decode: {e}"),
        )
    })?;
    if !f.headers.is_empty() || !f.downstream_nodes.is_empty() || !f.upstream_cluster.is_empty() {
        return Err(unsupported(
            "route",
            route,
            "fault injection limited to headers, nodes or an upstream cluster is not supported",
        ));
    }
    let delay = match f.delay {
        None => None,
        Some(d) => match d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(fixed)) => Some((
                std_duration(fixed)
                    .ok_or_else(|| unsupported("route", route, "a negative fault delay"))?,
                per_million(d.percentage.as_ref()),
            )),
            _ => {
                return Err(unsupported(
                    "route",
                    route,
                    "only a fixed fault delay is supported",
                ));
            }
        },
    };
    let abort = match f.abort {
        None => None,
        Some(a) if !a.response_body.is_empty() => {
            return Err(unsupported(
                "route",
                route,
                "a fault abort's own response body is not supported",
            ));
        }
        Some(a) => match a.error_type {
            Some(ErrorType::HttpStatus(code)) => {
                let status = u16::try_from(code)
                    .ok()
                    .and_then(|c| http::StatusCode::from_u16(c).ok())
                    .filter(|s| s.as_u16() >= 200)
                    .ok_or_else(|| {
                        unsupported(
                            "route",
                            route,
                            format!("abort status {code} is not an HTTP status"),
                        )
                    })?;
                Some((status, per_million(a.percentage.as_ref())))
            }
            _ => {
                return Err(unsupported(
                    "route",
                    route,
                    "only an HTTP status abort is supported (not gRPC or header-driven)",
                ));
            }
        },
    };
    Ok(Some(Arc::new(RouteFault { delay, abort })))
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// The path is this or goes on below it (`/v2` takes `/v2` and `/v2/x`, not `/v2x`):
    /// Envoy's `path_separated_prefix`, Gateway API's `PathPrefix`.
    SeparatedPrefix(String),
    Regex(Pattern),
}

/// A regular expression matched against a whole value (Envoy's `safe_regex`: RE2 syntax,
/// full match), compiled within [`lumen_api::MAX_REGEX_PROGRAM`].
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, String> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(lumen_api::MAX_REGEX_PROGRAM)
            .dfa_size_limit(lumen_api::MAX_REGEX_PROGRAM)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// The expression as configured.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Present(bool),
    Regex(Pattern),
}

impl ValueMatch {
    /// Whether a header's or a query parameter's value (`None`: absent) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (ValueMatch::Exact(want), Some(v)) => v == want,
            (ValueMatch::Prefix(want), Some(v)) => v.starts_with(want.as_str()),
            (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
            (_, None) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightedBackend {
    pub cluster: String,
    pub weight: u32,
    /// Header changes for requests sent to this backend and its responses (Envoy's
    /// `ClusterWeight` headers; Istio's destination-level `headers`).
    pub header_rules: Option<Arc<HeaderRules>>,
}

/// A cluster: endpoints (from EDS or inline), how one is chosen, and that policy's state
/// over them (rebuilt with every new endpoint set: see [`Cluster::balanced`]).
#[derive(Debug, Default)]
pub struct Cluster {
    pub name: String,
    pub eds: bool,
    /// HTTP/2 to the upstream (Envoy's explicit HTTP/2 protocol options); HTTP/1.1 otherwise.
    pub http2: bool,
    pub lb: LbPolicy,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Arc<Balancer>,
    /// Circuit-breaker thresholds and what is in flight against them (kept across EDS
    /// updates: it counts the cluster's requests, not its endpoints').
    pub breaker: Option<Arc<Breaker>>,
    /// When endpoints are ejected for failing in a row.
    pub outlier: Option<OutlierPolicy>,
    /// An inbound cluster's declared protocol (Lumen's cluster metadata): connections to its
    /// port are not sniffed.
    pub declared: Option<crate::server::Declared>,
}

/// One upstream host with what the control plane told about its workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Where the workload's app listens (EDS address).
    pub app_addr: SocketAddr,
    /// Where to connect: the sidecar's inbound port when the endpoint is meshed, else the app.
    pub connect_addr: SocketAddr,
    pub meshed: bool,
    /// Label values (shared with every request's metric labels).
    pub workload: crate::telemetry::Label,
    pub namespace: crate::telemetry::Label,
    pub app: crate::telemetry::Label,
    pub version: crate::telemetry::Label,
}

/// What the router decided for one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub route_config: Arc<RouteConfig>,
    pub virtual_host: usize,
    pub route: usize,
    pub cluster: Arc<Cluster>,
    /// The chosen backend's own header changes.
    pub backend_headers: Option<Arc<HeaderRules>>,
}

/// Why no upstream was chosen; each maps to an Envoy response flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("route points at unknown cluster {cluster:?}")]
    NoCluster { cluster: String },
}

impl MeshConfig {
    /// Finds the virtual host and route for a request, then the weighted backend cluster.
    pub fn route(
        &self,
        authority: &str,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
        random: u32,
    ) -> Result<Decision, RouteError> {
        let host = authority.to_ascii_lowercase();
        let port = host.rsplit_once(':').map(|(_, p)| p);
        let no_route = || RouteError::NoRoute {
            host: authority.to_string(),
            path: path.to_string(),
        };
        // The common case: the port names the route configuration (no allocation, no sort).
        if let Some(rc) = port.and_then(|p| self.routes.get(p)) {
            return self
                .route_in(
                    rc,
                    &host,
                    port.is_some(),
                    (method, path, headers),
                    random,
                    &no_route,
                )
                .unwrap_or_else(|| Err(no_route()));
        }
        let mut all: Vec<&Arc<RouteConfig>> = self.routes.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
            .find_map(|rc| {
                self.route_in(
                    rc,
                    &host,
                    port.is_some(),
                    (method, path, headers),
                    random,
                    &no_route,
                )
            })
            .unwrap_or_else(|| Err(no_route()))
    }

    /// Routes within one route configuration; `None` when no virtual host takes the host.
    fn route_in(
        &self,
        rc: &Arc<RouteConfig>,
        host: &str,
        has_port: bool,
        (method, path, headers): (&http::Method, &str, &http::HeaderMap),
        random: u32,
        no_route: &dyn Fn() -> RouteError,
    ) -> Option<Result<Decision, RouteError>> {
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let vh_index = rc.virtual_host_for(host, bare, has_port)?;
        let vh = rc.virtual_hosts.get(vh_index)?;
        let Some((route_index, route)) = vh
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(method, path, headers))
        else {
            return Some(Err(no_route()));
        };
        if let Some(answer) = &route.answer {
            // Answered by the proxy itself: no upstream cluster.
            let kind = match answer {
                Answer::Redirect(_) => "redirect",
                Answer::Direct(_) => "direct",
            };
            return Some(Ok(Decision {
                route_config: rc.clone(),
                virtual_host: vh_index,
                route: route_index,
                cluster: Arc::new(Cluster::new(format!("{kind}|{}", route.name), Vec::new())),
                backend_headers: None,
            }));
        }
        let Some(backend) = route.pick_backend(random) else {
            return Some(Err(no_route()));
        };
        let Some(cluster) = self.clusters.get(&backend.cluster).cloned() else {
            return Some(Err(RouteError::NoCluster {
                cluster: backend.cluster.clone(),
            }));
        };
        Some(Ok(Decision {
            route_config: rc.clone(),
            virtual_host: vh_index,
            route: route_index,
            cluster,
            backend_headers: backend.header_rules.clone(),
        }))
    }

    /// The TCP listener for a captured connection's original destination: the one on its
    /// exact address first, then the one for any address on its port.
    pub fn tcp_route(&self, dst: SocketAddr) -> Option<&TcpRoute> {
        self.tcp_routes
            .iter()
            .find(|t| t.address == dst)
            .or_else(|| {
                self.tcp_routes
                    .iter()
                    .find(|t| t.address.port() == dst.port() && t.address.ip().is_unspecified())
            })
    }

    /// The local app's inbound cluster for a port, or the only one there is.
    pub fn inbound_cluster(&self, port: Option<u16>) -> Option<Arc<Cluster>> {
        if let Some(c) = port.and_then(|p| self.clusters.get(&cluster_name::inbound(p))) {
            return Some(c.clone());
        }
        self.clusters
            .values()
            .filter(|c| cluster_name::parse_inbound(&c.name).is_some())
            .min_by(|a, b| a.name.cmp(&b.name))
            .cloned()
    }

    /// Host names the proxy can route, for error messages.
    pub fn known_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .routes
            .values()
            .flat_map(|rc| rc.virtual_hosts.iter().map(|vh| vh.name.clone()))
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Applies a CDS response: replaces the cluster set, keeping known endpoints.
    pub fn apply_clusters(&mut self, clusters: Vec<Cluster>) {
        let old = std::mem::take(&mut self.clusters);
        for mut c in clusters {
            if let Some(prev) = old.get(&c.name).filter(|_| c.eds) {
                c.endpoints = prev.endpoints.clone();
                c = c.balanced_from(prev);
            }
            self.clusters.insert(c.name.clone(), Arc::new(c));
        }
    }

    /// Applies an EDS response to the named clusters.
    pub fn apply_endpoints(&mut self, assignments: Vec<(String, Vec<Endpoint>)>) {
        for (name, endpoints) in assignments {
            if let Some(c) = self.clusters.get(&name) {
                let updated = Cluster {
                    name: c.name.clone(),
                    eds: c.eds,
                    http2: c.http2,
                    lb: c.lb,
                    endpoints,
                    balancer: Arc::default(),
                    breaker: c.breaker.clone(),
                    outlier: c.outlier,
                    declared: c.declared,
                }
                .balanced_from(c);
                self.clusters.insert(name, Arc::new(updated));
            }
        }
    }

    /// Names of EDS clusters (what to ask EDS for).
    pub fn eds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .clusters
            .values()
            .filter(|c| c.eds)
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    }
}

impl RouteConfig {
    pub fn new(name: impl Into<String>, virtual_hosts: Vec<VirtualHost>) -> RouteConfig {
        let mut by_domain = FastMap::default();
        let mut wildcard = None;
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                if d == "*" {
                    wildcard.get_or_insert(i);
                } else {
                    by_domain.entry(d.clone()).or_insert(i);
                }
            }
        }
        RouteConfig {
            name: name.into(),
            virtual_hosts,
            by_domain,
            wildcard,
        }
    }

    pub fn virtual_host(&self, index: usize) -> Option<&VirtualHost> {
        self.virtual_hosts.get(index)
    }

    /// The virtual host for `host` (lowercase; `bare` is it without its port, tried only
    /// when the request named no port): the first in order whose domains take it, exact or
    /// `*`, as Envoy's lookup in configuration order would find.
    fn virtual_host_for(&self, host: &str, bare: &str, has_port: bool) -> Option<usize> {
        let exact = self.by_domain.get(host).copied();
        let without_port = (!has_port)
            .then(|| self.by_domain.get(bare).copied())
            .flatten();
        [exact, without_port, self.wildcard]
            .into_iter()
            .flatten()
            .min()
    }
}

impl Route {
    fn matches(&self, method: &http::Method, path: &str, headers: &http::HeaderMap) -> bool {
        let path_only = path.split('?').next().unwrap_or(path);
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path_only.starts_with(p.as_str()),
            PathMatch::Exact(p) => path_only == p,
            PathMatch::SeparatedPrefix(p) => path_only
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(re) => re.is_match(path_only),
        };
        let query_ok = self.query.is_empty() || {
            let params: Vec<(&str, &str)> = path
                .split_once('?')
                .map(|(_, q)| q)
                .unwrap_or_default()
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect();
            self.query.iter().all(|q| {
                let value = params.iter().find(|(k, _)| *k == q.name).map(|(_, v)| *v);
                q.value.matches(value)
            })
        };
        path_ok
            && query_ok
            && self.headers.iter().all(|h| {
                // HTTP/2's pseudo-headers, as Envoy matches them: `:method` is the method.
                let value = if h.name == ":method" {
                    Some(method.as_str())
                } else {
                    headers.get(h.name.as_str()).and_then(|v| v.to_str().ok())
                };
                h.value.matches(value)
            })
    }

    /// Weighted choice of a backend cluster; `random` is uniform over u32.
    pub fn pick_backend(&self, random: u32) -> Option<&WeightedBackend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = u64::from(random) % total;
        for b in &self.backends {
            if point < u64::from(b.weight) {
                return Some(b);
            }
            point -= u64::from(b.weight);
        }
        None
    }
}

impl Cluster {
    /// A cluster with these endpoints (inline, not from EDS), HTTP/1.1 upstream.
    pub fn new(name: impl Into<String>, endpoints: Vec<Endpoint>) -> Cluster {
        Cluster {
            name: name.into(),
            endpoints,
            ..Default::default()
        }
        .balanced()
    }

    /// The cluster with its policy's state built over its endpoints (a ring or Maglev
    /// table, in-flight counters).
    pub fn balanced(mut self) -> Cluster {
        let addresses: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.app_addr.to_string())
            .collect();
        self.balancer = Arc::new(Balancer::with_outlier_detection(
            self.lb,
            &addresses,
            self.outlier,
        ));
        self
    }

    /// As [`Cluster::balanced`], keeping what `previous`'s balancer learnt about the
    /// endpoints both have (ejections, failures in a row, latency estimates).
    pub fn balanced_from(self, previous: &Cluster) -> Cluster {
        let c = self.balanced();
        let addresses = |c: &Cluster| -> Vec<String> {
            c.endpoints.iter().map(|e| e.app_addr.to_string()).collect()
        };
        c.balancer
            .carry_from(&previous.balancer, &addresses(previous), &addresses(&c));
        c
    }

    /// The same cluster speaking HTTP/2 upstream (or not).
    pub fn with_http2(mut self, http2: bool) -> Cluster {
        self.http2 = http2;
        self
    }

    /// An endpoint, chosen by the cluster's policy.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.pick_for(None).map(|(_, e)| e)
    }

    /// An endpoint and its index, chosen by the cluster's policy for a request with this
    /// hash (from the route's hash policy; `None` without one).
    pub fn pick_for(&self, request_hash: Option<u64>) -> Option<(usize, &Endpoint)> {
        let i = self
            .balancer
            .pick(self.lb, self.endpoints.len(), request_hash)?;
        self.endpoints.get(i).map(|e| (i, e))
    }
}

fn unsupported(kind: &'static str, name: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        kind,
        name: name.to_string(),
        message: message.into(),
    }
}

/// Decodes a resource packed in an `Any`, checking its type.
pub fn decode<T: Message + Default>(
    any: &lumen_api::pb::google::protobuf::Any,
    expected: &str,
) -> Result<T, ConfigError> {
    if any.type_url != expected {
        return Err(ConfigError::Decode {
            type_url: any.type_url.clone(),
            message: format!("expected {expected}"),
        });
    }
    T::decode(any.value.as_slice()).map_err(|e| ConfigError::Decode {
        type_url: expected.to_string(),
        message: e.to_string(),
    })
}

fn socket_addr(
    addr: Option<&xcore::Address>,
    kind: &'static str,
    name: &str,
) -> Result<SocketAddr, ConfigError> {
    let Some(xcore::address::Address::SocketAddress(sa)) = addr.and_then(|a| a.address.as_ref())
    else {
        return Err(unsupported(
            kind,
            name,
            "only socket addresses are supported",
        ));
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| unsupported(kind, name, format!("address {:?} is not an IP", sa.address)))?;
    let Some(xcore::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return Err(unsupported(kind, name, "named ports are not supported"));
    };
    let port = u16::try_from(port)
        .map_err(|_| unsupported(kind, name, format!("port {port} out of range")))?;
    Ok(SocketAddr::new(ip, port))
}

/// What an LDS listener asks of the proxy: the route configurations its HTTP connection
/// manager refers to, or the cluster its TCP proxy forwards to.
#[derive(Debug, Default, PartialEq)]
pub struct ListenerUse {
    pub rds_names: Vec<String>,
    pub tcp: Option<TcpRoute>,
}

/// Reads one LDS listener.
pub fn listener_use(l: &xlistener::Listener) -> Result<ListenerUse, ConfigError> {
    use lumen_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier,
    };
    let mut out = ListenerUse::default();
    for chain in &l.filter_chains {
        for filter in &chain.filters {
            let Some(xlistener::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                continue;
            };
            match any.type_url.as_str() {
                type_url::HTTP_CONNECTION_MANAGER => {
                    let manager: xhcm::HttpConnectionManager =
                        decode(any, type_url::HTTP_CONNECTION_MANAGER)?;
                    if let Some(xhcm::http_connection_manager::RouteSpecifier::Rds(rds)) =
                        manager.route_specifier
                    {
                        out.rds_names.push(rds.route_config_name);
                    }
                }
                type_url::TCP_PROXY => {
                    let tcp: TcpProxy = decode(any, type_url::TCP_PROXY)?;
                    let Some(ClusterSpecifier::Cluster(cluster)) = tcp.cluster_specifier else {
                        return Err(unsupported(
                            "listener",
                            &l.name,
                            "a TCP proxy needs one cluster (weighted_clusters is not supported)",
                        ));
                    };
                    out.tcp = Some(TcpRoute {
                        listener: l.name.clone(),
                        address: socket_addr(l.address.as_ref(), "listener", &l.name)?,
                        cluster,
                    });
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Whether a cluster's `HttpProtocolOptions` ask for HTTP/2 upstream.
fn upstream_http2(
    cluster: &str,
    options: &std::collections::HashMap<String, lumen_api::pb::google::protobuf::Any>,
) -> Result<bool, ConfigError> {
    use lumen_api::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    use lumen_api::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    const KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    let Some(any) = options.get(KEY) else {
        return Ok(false);
    };
    let o = HttpProtocolOptions::decode(any.value.as_slice())
        .map_err(|e| unsupported("cluster", cluster, format!("{KEY} does not decode: {e}")))?;
    Ok(match o.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(c)) => {
            matches!(
                c.protocol_config,
                Some(ProtocolConfig::Http2ProtocolOptions(_))
            )
        }
        _ => false,
    })
}

impl TryFrom<xcluster::Cluster> for Cluster {
    type Error = ConfigError;

    fn try_from(c: xcluster::Cluster) -> Result<Cluster, ConfigError> {
        use xcluster::cluster::{ClusterDiscoveryType, DiscoveryType};
        let kind = match c.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(t)) => {
                DiscoveryType::try_from(t).unwrap_or(DiscoveryType::Static)
            }
            None => DiscoveryType::Static,
            Some(_) => {
                return Err(unsupported(
                    "cluster",
                    &c.name,
                    "custom cluster types are not supported",
                ));
            }
        };
        let eds = match kind {
            DiscoveryType::Eds => true,
            DiscoveryType::Static => false,
            other => {
                return Err(unsupported(
                    "cluster",
                    &c.name,
                    format!("discovery type {other:?} is not supported"),
                ));
            }
        };
        let endpoints = match c.load_assignment {
            Some(cla) if !eds => endpoints_from(&cla)?,
            _ => Vec::new(),
        };
        let http2 = upstream_http2(&c.name, &c.typed_extension_protocol_options)?;
        use xcluster::cluster::LbConfig;
        use xcluster::cluster::LbPolicy as X;
        let typed = c
            .load_balancing_policy
            .as_ref()
            .map(|p| load_balancing_policy(&c.name, p))
            .transpose()?;
        let lb = match X::try_from(c.lb_policy) {
            // `load_balancing_policy`, when set, is the policy (Envoy ignores `lb_policy`).
            _ if typed.is_some() => typed.unwrap_or_default(),
            Ok(X::RoundRobin) => LbPolicy::RoundRobin,
            Ok(X::Random) => LbPolicy::Random,
            Ok(X::LeastRequest) => {
                if let Some(LbConfig::LeastRequestLbConfig(cfg)) = &c.lb_config {
                    let choices = cfg.choice_count.as_ref().map_or(2, |v| v.value);
                    if choices != 2 {
                        return Err(unsupported(
                            "cluster",
                            &c.name,
                            format!(
                                "least_request_lb_config.choice_count {choices}: only 2 (power of two choices) is supported"
                            ),
                        ));
                    }
                }
                LbPolicy::LeastRequest
            }
            Ok(X::RingHash) => {
                let minimum_ring_size = match &c.lb_config {
                    Some(LbConfig::RingHashLbConfig(cfg)) => {
                        cfg.minimum_ring_size.as_ref().map_or(1024, |v| v.value)
                    }
                    _ => 1024,
                };
                LbPolicy::RingHash { minimum_ring_size }
            }
            Ok(X::Maglev) => {
                let table_size = match &c.lb_config {
                    Some(LbConfig::MaglevLbConfig(cfg)) => {
                        cfg.table_size.as_ref().map_or(65_537, |v| v.value)
                    }
                    _ => 65_537,
                };
                LbPolicy::Maglev { table_size }
            }
            Ok(other) => {
                return Err(unsupported(
                    "cluster",
                    &c.name,
                    format!(
                        "lb_policy {other:?} is not supported (ROUND_ROBIN, RANDOM, LEAST_REQUEST, RING_HASH, MAGLEV)"
                    ),
                ));
            }
            Err(_) => {
                return Err(unsupported(
                    "cluster",
                    &c.name,
                    format!("lb_policy {} is unknown", c.lb_policy),
                ));
            }
        };
        let breaker = circuit_breakers(&c.name, c.circuit_breakers.as_ref(), http2)?;
        let outlier = outlier_policy(
            &c.name,
            c.outlier_detection.as_ref(),
            c.common_lb_config.as_ref(),
        )?;
        let declared = declared_protocol(&c.name, c.metadata.as_ref())?;
        Ok(Cluster {
            name: c.name,
            eds,
            http2,
            breaker,
            outlier,
            lb,
            endpoints,
            balancer: Arc::default(),
            declared,
        }
        .balanced())
    }
}

/// The protocol Lumen's cluster metadata declares for the cluster's port, if any.
fn declared_protocol(
    cluster: &str,
    metadata: Option<&lumen_api::pb::envoy::config::core::v3::Metadata>,
) -> Result<Option<crate::server::Declared>, ConfigError> {
    use crate::server::Declared;
    use lumen_api::cluster_meta::{FILTER, HTTP, PROTOCOL, TCP};
    use lumen_api::pb::google::protobuf::value::Kind;
    let Some(value) = metadata
        .and_then(|m| m.filter_metadata.get(FILTER))
        .and_then(|s| s.fields.get(PROTOCOL))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(p)) if p == HTTP => Ok(Some(Declared::Http)),
        Some(Kind::StringValue(p)) if p == TCP => Ok(Some(Declared::Tcp)),
        other => Err(unsupported(
            "cluster",
            cluster,
            format!(
                "metadata.filter_metadata.{FILTER}.{PROTOCOL} {other:?} is neither \"{HTTP}\" nor \"{TCP}\""
            ),
        )),
    }
}

/// Endpoints of a load assignment, with Lumen's endpoint metadata read.
pub fn endpoints_from(
    cla: &xendpoint::ClusterLoadAssignment,
) -> Result<Vec<Endpoint>, ConfigError> {
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        for lb in &locality.lb_endpoints {
            let Some(xendpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier
            else {
                continue;
            };
            let app_addr = socket_addr(ep.address.as_ref(), "endpoint", &cla.cluster_name)?;
            let meta = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(endpoint_meta::FILTER));
            let w = match meta
                .and_then(|s| s.fields.get(endpoint_meta::FIELD))
                .and_then(|v| v.kind.as_ref())
            {
                Some(Kind::StringValue(packed)) => endpoint_meta::Workload::unpack(packed),
                _ => endpoint_meta::Workload::default(),
            };
            out.push(Endpoint {
                app_addr,
                connect_addr: w
                    .inbound_port
                    .map_or(app_addr, |p| SocketAddr::new(app_addr.ip(), p)),
                meshed: w.inbound_port.is_some(),
                workload: w.workload.into(),
                namespace: w.namespace.into(),
                app: w.app.into(),
                version: w.version.into(),
            });
        }
    }
    Ok(out)
}

impl TryFrom<xroute::RouteConfiguration> for RouteConfig {
    type Error = ConfigError;

    fn try_from(rc: xroute::RouteConfiguration) -> Result<RouteConfig, ConfigError> {
        let virtual_hosts = rc
            .virtual_hosts
            .into_iter()
            .map(|vh| {
                let routes = vh
                    .routes
                    .into_iter()
                    .map(Route::try_from)
                    .collect::<Result<_, _>>()?;
                Ok(VirtualHost {
                    labels: ServiceLabels::of(&vh.name),
                    name: vh.name,
                    domains: vh
                        .domains
                        .into_iter()
                        .map(|d| d.to_ascii_lowercase())
                        .collect(),
                    routes,
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(RouteConfig::new(rc.name, virtual_hosts))
    }
}

impl TryFrom<xroute::Route> for Route {
    type Error = ConfigError;

    fn try_from(r: xroute::Route) -> Result<Route, ConfigError> {
        use xroute::header_matcher::HeaderMatchSpecifier as H;
        use xroute::route_match::PathSpecifier as P;
        let m = r.r#match.unwrap_or_default();
        let path = match m.path_specifier {
            Some(P::Prefix(p)) => PathMatch::Prefix(p),
            Some(P::Path(p)) => PathMatch::Exact(p),
            Some(P::PathSeparatedPrefix(p)) => PathMatch::SeparatedPrefix(p),
            Some(P::SafeRegex(m)) => PathMatch::Regex(Pattern::new(&m.regex).map_err(|e| {
                unsupported("route", &r.name, format!("path regex {:?}: {e}", m.regex))
            })?),
            None => PathMatch::Prefix("/".to_string()),
            Some(other) => {
                return Err(unsupported(
                    "route",
                    &r.name,
                    format!("path match {other:?} is not supported yet"),
                ));
            }
        };
        let headers: Vec<HeaderMatch> = m
            .headers
            .into_iter()
            .map(|h| {
                let value = match h.header_match_specifier {
                    Some(H::PresentMatch(p)) => ValueMatch::Present(p),
                    Some(H::StringMatch(sm)) => value_match(&r.name, "header", &h.name, sm)?,
                    other => {
                        return Err(unsupported(
                            "route",
                            &r.name,
                            format!("header match {other:?} is not supported yet"),
                        ));
                    }
                };
                Ok(HeaderMatch {
                    name: h.name,
                    value,
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        let query = m
            .query_parameters
            .into_iter()
            .map(|q| {
                use xroute::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
                let value = match q.query_parameter_match_specifier {
                    Some(Q::PresentMatch(p)) => ValueMatch::Present(p),
                    Some(Q::StringMatch(sm)) => {
                        value_match(&r.name, "query parameter", &q.name, sm)?
                    }
                    None => {
                        return Err(unsupported(
                            "route",
                            &r.name,
                            format!("query parameter {:?} without a match", q.name),
                        ));
                    }
                };
                Ok(HeaderMatch {
                    name: q.name,
                    value,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let rules = HeaderRules {
            request: header_ops(
                &r.name,
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
            )?,
            response: header_ops(
                &r.name,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
            )?,
        };
        let header_rules =
            (!rules.request.is_empty() || !rules.response.is_empty()).then(|| Arc::new(rules));
        // A route that answers itself: its response header changes apply to that answer (as
        // Envoy's), nothing else of a forwarding route does.
        // The CORS filter runs before the router: its policy holds on routes that answer
        // themselves too.
        let cors = route_cors(&r.name, &r.typed_per_filter_config)?;
        let answering = |answer: Answer| Route {
            name: r.name.clone(),
            path: path.clone(),
            headers: headers.clone(),
            query: query.clone(),
            backends: Vec::new(),
            fault: None,
            timeout: None,
            retry: None,
            header_rules: header_rules.clone(),
            answer: Some(answer),
            cors: cors.clone(),
            rewrite: None,
            mirrors: Vec::new(),
            hash_policy: Vec::new(),
        };
        let action = match r.action {
            Some(xroute::route::Action::Route(a)) => a,
            Some(xroute::route::Action::Redirect(a)) => {
                let redirect = redirect_action(&r.name, a)?;
                return Ok(answering(Answer::Redirect(Arc::new(redirect))));
            }
            Some(xroute::route::Action::DirectResponse(a)) => {
                let direct = direct_response(&r.name, a)?;
                return Ok(answering(Answer::Direct(Arc::new(direct))));
            }
            None => {
                return Err(unsupported(
                    "route",
                    &r.name,
                    "only route, redirect and direct response actions are supported",
                ));
            }
            Some(other) => {
                return Err(unsupported(
                    "route",
                    &r.name,
                    format!(
                        "only route, redirect and direct response actions are supported, not {}",
                        match other {
                            xroute::route::Action::FilterAction(_) => "a filter action",
                            xroute::route::Action::NonForwardingAction(_) => {
                                "a non-forwarding action"
                            }
                            _ => "this action",
                        }
                    ),
                ));
            }
        };
        let rewrite = rewrite(&r.name, &action)?.map(Arc::new);
        let mirrors = mirrors(&r.name, &action.request_mirror_policies)?;
        let hash_policy = hash_policies(&r.name, action.hash_policy)?;
        let backends = match action.cluster_specifier {
            Some(xroute::route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedBackend {
                cluster: c,
                weight: 1,
                header_rules: None,
            }],
            Some(xroute::route_action::ClusterSpecifier::WeightedClusters(wc)) => wc
                .clusters
                .into_iter()
                .map(|c| {
                    let rules = HeaderRules {
                        request: header_ops(
                            &r.name,
                            &c.request_headers_to_add,
                            &c.request_headers_to_remove,
                        )?,
                        response: header_ops(
                            &r.name,
                            &c.response_headers_to_add,
                            &c.response_headers_to_remove,
                        )?,
                    };
                    Ok(WeightedBackend {
                        cluster: c.name,
                        weight: c.weight.map_or(0, |w| w.value),
                        header_rules: (!rules.request.is_empty() || !rules.response.is_empty())
                            .then(|| Arc::new(rules)),
                    })
                })
                .collect::<Result<_, ConfigError>>()?,
            _ => {
                return Err(unsupported(
                    "route",
                    &r.name,
                    "route action without a cluster",
                ));
            }
        };
        let fault = route_fault(&r.name, &r.typed_per_filter_config)?;
        let timeout = match action.timeout {
            None => None,
            Some(d) => Some(
                std_duration(d)
                    .ok_or_else(|| unsupported("route", &r.name, "a negative timeout"))?,
            ),
        };
        let retry = action
            .retry_policy
            .map(|p| retry_policy(&r.name, p).map(Arc::new))
            .transpose()?;
        Ok(Route {
            name: r.name,
            path,
            headers,
            query,
            backends,
            fault,
            timeout,
            retry,
            header_rules,
            answer: None,
            cors,
            rewrite,
            mirrors,
            hash_policy,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_tcp_listener_on_the_exact_address_wins_over_the_one_for_any_address() {
        let route = |listener: &str, address: &str, cluster: &str| TcpRoute {
            listener: listener.into(),
            address: address.parse().expect("addr"),
            cluster: cluster.into(),
        };
        let cfg = MeshConfig {
            tcp_routes: vec![
                route("0.0.0.0_5432", "0.0.0.0:5432", "outbound|5432||any"),
                route("10.96.0.20_5432", "10.96.0.20:5432", "outbound|5432||db"),
            ],
            ..MeshConfig::default()
        };
        let at = |a: &str| {
            cfg.tcp_route(a.parse().expect("addr"))
                .map(|t| t.cluster.as_str())
        };
        assert_eq!(at("10.96.0.20:5432"), Some("outbound|5432||db"));
        assert_eq!(at("10.96.0.99:5432"), Some("outbound|5432||any"));
        assert_eq!(at("10.96.0.20:5433"), None);
    }

    pub(crate) fn endpoint(ip: &str, workload: &str) -> Endpoint {
        let app_addr: SocketAddr = format!("{ip}:9080").parse().expect("addr");
        Endpoint {
            app_addr,
            connect_addr: SocketAddr::new(app_addr.ip(), 15006),
            meshed: true,
            workload: workload.into(),
            namespace: "default".into(),
            app: "reviews".into(),
            version: "v1".into(),
        }
    }

    /// reviews on 9080: `end-user: jason` to v2, the rest split 50/50 over v1 (two
    /// endpoints) and v2 (one).
    pub(crate) fn config() -> MeshConfig {
        let mut cfg = MeshConfig::default();
        cfg.routes.insert(
            "9080".into(),
            Arc::new(RouteConfig::new(
                "9080",
                vec![VirtualHost {
                    labels: ServiceLabels::of("reviews.default.svc.cluster.local:9080"),
                    name: "reviews.default.svc.cluster.local:9080".into(),
                    domains: vec!["reviews".into(), "reviews:9080".into()],
                    routes: vec![
                        Route {
                            query: vec![],
                            name: "jason".into(),
                            path: PathMatch::Prefix("/".into()),
                            headers: vec![HeaderMatch {
                                name: "end-user".into(),
                                value: ValueMatch::Exact("jason".into()),
                            }],
                            backends: vec![WeightedBackend {
                                cluster: "v2".into(),
                                weight: 100,
                                header_rules: None,
                            }],
                            fault: None,
                            timeout: None,
                            retry: None,
                            header_rules: None,
                            answer: None,
                            cors: None,
                            rewrite: None,
                            mirrors: vec![],
                            hash_policy: Vec::new(),
                        },
                        Route {
                            query: vec![],
                            name: "split".into(),
                            path: PathMatch::Prefix("/".into()),
                            headers: vec![],
                            backends: vec![
                                WeightedBackend {
                                    cluster: "v1".into(),
                                    weight: 50,
                                    header_rules: None,
                                },
                                WeightedBackend {
                                    cluster: "v2".into(),
                                    weight: 50,
                                    header_rules: None,
                                },
                            ],
                            fault: None,
                            timeout: None,
                            retry: None,
                            header_rules: None,
                            answer: None,
                            cors: None,
                            rewrite: None,
                            mirrors: vec![],
                            hash_policy: Vec::new(),
                        },
                    ],
                }],
            )),
        );
        cfg.apply_clusters(vec![
            Cluster {
                name: "v1".into(),
                eds: true,
                ..Default::default()
            },
            Cluster {
                name: "v2".into(),
                eds: true,
                ..Default::default()
            },
        ]);
        cfg.apply_endpoints(vec![
            (
                "v1".into(),
                vec![
                    endpoint("127.0.10.3", "reviews-v1"),
                    endpoint("127.0.10.6", "reviews-v1"),
                ],
            ),
            ("v2".into(), vec![endpoint("127.0.10.4", "reviews-v2")]),
        ]);
        cfg
    }

    #[test]
    fn routes_by_host_port_and_headers() {
        let cfg = config();
        let mut headers = http::HeaderMap::new();
        let d = cfg
            .route(
                "reviews:9080",
                &http::Method::GET,
                "/reviews/0",
                &headers,
                0,
            )
            .expect("routed");
        assert_eq!(d.cluster.name, "v1");
        let d = cfg
            .route(
                "reviews:9080",
                &http::Method::GET,
                "/reviews/0",
                &headers,
                u32::MAX,
            )
            .expect("routed");
        assert_eq!(d.cluster.name, "v2");
        headers.insert("end-user", http::HeaderValue::from_static("jason"));
        let d = cfg
            .route("reviews:9080", &http::Method::GET, "/", &headers, 0)
            .expect("routed");
        assert_eq!((d.cluster.name.as_str(), d.route), ("v2", 0));
        let d = cfg
            .route("REVIEWS", &http::Method::GET, "/", &headers, 0)
            .expect("host without port");
        assert_eq!(d.cluster.name, "v2");
    }

    #[test]
    fn unknown_host_is_no_route() {
        let err = config()
            .route(
                "nope:9080",
                &http::Method::GET,
                "/x",
                &http::HeaderMap::new(),
                0,
            )
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::NoRoute {
                host: "nope:9080".into(),
                path: "/x".into()
            }
        );
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let cfg = config();
        let route = &cfg.routes["9080"].virtual_hosts[0].routes[1];
        let mut v1 = 0;
        let n = 10_000u32;
        for i in 0..n {
            let r = (u64::from(i) * u64::from(u32::MAX) / u64::from(n)) as u32;
            if route.pick_backend(r).map(|b| b.cluster.as_str()) == Some("v1") {
                v1 += 1;
            }
        }
        assert!((4_900..=5_100).contains(&v1), "v1 got {v1} of {n}");
    }

    #[test]
    fn round_robin_cycles_endpoints() {
        let cfg = config();
        let c = &cfg.clusters["v1"];
        let picks: Vec<_> = (0..4)
            .map(|_| c.pick().map(|e| e.app_addr.to_string()))
            .collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn unsupported_xds_is_rejected_with_a_reason() {
        use lumen_api::pb::envoy::r#type::matcher::v3::RegexMatcher;
        // A regex the proxy would not compile (unbalanced) is a NACK naming it.
        let route = xroute::Route {
            name: "by-regex".into(),
            r#match: Some(xroute::RouteMatch {
                path_specifier: Some(xroute::route_match::PathSpecifier::SafeRegex(
                    RegexMatcher {
                        regex: "/v([0-9]+".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = Route::try_from(route).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("route \"by-regex\": path regex \"/v([0-9]+\""),
            "{err}"
        );
        let cluster = xcluster::Cluster {
            name: "dns".into(),
            cluster_discovery_type: Some(xcluster::cluster::ClusterDiscoveryType::Type(
                xcluster::cluster::DiscoveryType::StrictDns as i32,
            )),
            ..Default::default()
        };
        let err = Cluster::try_from(cluster).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster \"dns\": discovery type StrictDns is not supported"
        );
        let any = lumen_api::pb::google::protobuf::Any {
            type_url: type_url::CLUSTER.into(),
            value: vec![0xff, 0xff],
        };
        assert!(matches!(
            decode::<xcluster::Cluster>(&any, type_url::CLUSTER),
            Err(ConfigError::Decode { .. })
        ));
    }

    #[test]
    fn regex_rewrites_replace_every_match_with_re2_groups() {
        let r = RegexRewrite::new("/v([0-9]+)/", "/\\1/$x\\\\").expect("compiles");
        assert_eq!(r.apply("/v1/a/v22/b"), "/1/$x\\a/22/$x\\b");
        assert!(RegexRewrite::new("/a", "/\\1").is_err(), "no group 1");
        assert!(
            RegexRewrite::new("/a", "/\\q").is_err(),
            "a stray backslash"
        );
        assert!(RegexRewrite::new("(", "/").is_err());
    }

    #[test]
    fn the_load_balancer_comes_from_the_cluster_and_random_reaches_every_endpoint() {
        let with = |policy: xcluster::cluster::LbPolicy| {
            Cluster::try_from(xcluster::Cluster {
                name: "c".into(),
                lb_policy: policy as i32,
                ..Default::default()
            })
        };
        assert_eq!(
            with(xcluster::cluster::LbPolicy::RoundRobin).map(|c| c.lb),
            Ok(LbPolicy::RoundRobin)
        );
        assert_eq!(
            with(xcluster::cluster::LbPolicy::Random).map(|c| c.lb),
            Ok(LbPolicy::Random)
        );
        assert_eq!(
            with(xcluster::cluster::LbPolicy::LeastRequest).map(|c| c.lb),
            Ok(LbPolicy::LeastRequest)
        );
        assert_eq!(
            with(xcluster::cluster::LbPolicy::RingHash).map(|c| c.lb),
            Ok(LbPolicy::RingHash {
                minimum_ring_size: 1024
            })
        );
        assert_eq!(
            with(xcluster::cluster::LbPolicy::Maglev).map(|c| c.lb),
            Ok(LbPolicy::Maglev { table_size: 65_537 })
        );
        let err = with(xcluster::cluster::LbPolicy::ClusterProvided).expect_err("NACKed");
        assert!(err.to_string().contains("ClusterProvided"), "{err}");
        // `load_balancing_policy`: the first policy lumen-proxy carries out, in place of
        // `lb_policy`; none of them is a NACK naming what was there.
        use lumen_api::pb::envoy::config::core::v3::TypedExtensionConfig;
        let policy = |name: &str, any: lumen_api::pb::google::protobuf::Any| {
            xcluster::load_balancing_policy::Policy {
                typed_extension_config: Some(TypedExtensionConfig {
                    name: name.into(),
                    typed_config: Some(any),
                }),
            }
        };
        let typed = |type_url: &str, value: Vec<u8>| lumen_api::pb::google::protobuf::Any {
            type_url: type_url.into(),
            value,
        };
        let ewma = typed(
            lumen_api::peak_ewma::TYPED_STRUCT_URL,
            prost::Message::encode_to_vec(
                &lumen_api::peak_ewma::Settings {
                    decay_ms: 5_000,
                    default_rtt_ms: 10,
                }
                .to_typed_struct(),
            ),
        );
        let other = typed(
            lumen_api::peak_ewma::TYPED_STRUCT_URL,
            prost::Message::encode_to_vec(&lumen_api::peak_ewma::TypedStruct {
                type_url: "type.googleapis.com/someone.else.Balancer".into(),
                value: None,
            }),
        );
        let least = typed(
            "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
            Vec::new(),
        );
        let listed = |policies| {
            Cluster::try_from(xcluster::Cluster {
                name: "c".into(),
                lb_policy: xcluster::cluster::LbPolicy::Maglev as i32,
                load_balancing_policy: Some(xcluster::LoadBalancingPolicy { policies }),
                ..Default::default()
            })
            .map(|c| c.lb)
        };
        assert_eq!(
            listed(vec![
                policy("lumen", ewma.clone()),
                policy("least", least.clone())
            ]),
            Ok(LbPolicy::PeakEwma {
                decay: std::time::Duration::from_secs(5),
                default_rtt: std::time::Duration::from_millis(10),
            })
        );
        assert_eq!(
            listed(vec![policy("other", other.clone()), policy("least", least)]),
            Ok(LbPolicy::LeastRequest)
        );
        let err = listed(vec![policy("other", other)]).expect_err("NACKed");
        assert!(err.to_string().contains("someone.else.Balancer"), "{err}");
        let mut random = Cluster::new(
            "c",
            vec![endpoint("127.0.0.1", "a"), endpoint("127.0.0.2", "b")],
        );
        random.lb = LbPolicy::Random;
        let mut seen = std::collections::HashMap::new();
        for _ in 0..1000 {
            let e = random.pick().expect("an endpoint");
            *seen.entry(e.workload.clone()).or_insert(0) += 1;
        }
        // Each of two endpoints, 1,000 fair draws: fewer than 350 happens once in ~10^21.
        assert!(seen.values().all(|n| *n > 350), "{seen:?}");
    }

    #[test]
    fn a_route_s_fault_filter_configuration_is_read_or_nacked() {
        use lumen_api::pb::envoy::extensions::filters::common::fault::v3 as common;
        use lumen_api::pb::envoy::extensions::filters::http::fault::v3 as fault;
        use lumen_api::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
        let route_with = |f: fault::HttpFault| {
            Route::try_from(xroute::Route {
                name: "ratings".into(),
                action: Some(xroute::route::Action::Route(xroute::RouteAction {
                    cluster_specifier: Some(xroute::route_action::ClusterSpecifier::Cluster(
                        "c".into(),
                    )),
                    ..Default::default()
                })),
                typed_per_filter_config: [(FAULT_FILTER.to_string(), lumen_api::pack_any(f))]
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
        };
        let percent = |numerator, d: fractional_percent::DenominatorType| FractionalPercent {
            numerator,
            denominator: d as i32,
        };
        let r = route_with(fault::HttpFault {
            delay: Some(common::FaultDelay {
                fault_delay_secifier: Some(common::fault_delay::FaultDelaySecifier::FixedDelay(
                    lumen_api::pb::google::protobuf::Duration {
                        seconds: 7,
                        nanos: 500_000_000,
                    },
                )),
                percentage: Some(percent(100, fractional_percent::DenominatorType::Hundred)),
            }),
            abort: Some(fault::FaultAbort {
                error_type: Some(fault::fault_abort::ErrorType::HttpStatus(555)),
                percentage: Some(percent(
                    100_000,
                    fractional_percent::DenominatorType::Million,
                )),
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("read");
        let f = r.fault.expect("a fault");
        assert_eq!(
            f.delay,
            Some((std::time::Duration::from_millis(7500), 1_000_000))
        );
        assert_eq!(f.abort.map(|(s, p)| (s.as_u16(), p)), Some((555, 100_000)));
        let err = route_with(fault::HttpFault {
            abort: Some(fault::FaultAbort {
                error_type: Some(fault::fault_abort::ErrorType::GrpcStatus(14)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect_err("NACKed");
        assert!(
            err.to_string().contains("only an HTTP status abort"),
            "{err}"
        );
    }

    #[test]
    fn regex_method_and_separated_prefix_matches() {
        let route = |path: PathMatch, headers: Vec<HeaderMatch>| Route {
            name: "r".into(),
            path,
            headers,
            query: vec![],
            backends: vec![],
            fault: None,
            timeout: None,
            retry: None,
            header_rules: None,
            answer: None,
            cors: None,
            rewrite: None,
            mirrors: vec![],
            hash_policy: Vec::new(),
        };
        let get = http::Method::GET;
        let none = http::HeaderMap::new();
        let re = route(
            PathMatch::Regex(Pattern::new("/reviews/[0-9]+").expect("regex")),
            vec![],
        );
        assert!(re.matches(&get, "/reviews/12?x=1", &none));
        assert!(
            !re.matches(&get, "/reviews/12/extra", &none),
            "a whole-path match"
        );
        let prefix = route(PathMatch::SeparatedPrefix("/v2".into()), vec![]);
        assert!(prefix.matches(&get, "/v2", &none));
        assert!(prefix.matches(&get, "/v2/x", &none));
        assert!(!prefix.matches(&get, "/v2x", &none));
        let post_only = route(
            PathMatch::Prefix("/".into()),
            vec![HeaderMatch {
                name: ":method".into(),
                value: ValueMatch::Exact("POST".into()),
            }],
        );
        assert!(post_only.matches(&http::Method::POST, "/", &none));
        assert!(!post_only.matches(&get, "/", &none));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", http::HeaderValue::from_static("jason-7"));
        let by_header = route(
            PathMatch::Prefix("/".into()),
            vec![HeaderMatch {
                name: "x-user".into(),
                value: ValueMatch::Regex(Pattern::new("jason-[0-9]").expect("regex")),
            }],
        );
        assert!(by_header.matches(&get, "/", &headers));
        // Query parameters: the first value of each name, as sent.
        let mut by_query = route(PathMatch::Prefix("/".into()), vec![]);
        by_query.query = vec![HeaderMatch {
            name: "animal".into(),
            value: ValueMatch::Exact("whale".into()),
        }];
        assert!(by_query.matches(&get, "/?color=blue&animal=whale", &none));
        assert!(!by_query.matches(&get, "/?animal=dolphin", &none));
        assert!(!by_query.matches(&get, "/", &none));
        assert!(Pattern::new("(").is_err());
        // A pattern past the size bound is refused, not compiled.
        assert!(Pattern::new(&"a{1000}".repeat(100)).is_err());
    }

    #[test]
    fn header_changes_are_read_with_envoy_s_percent_escapes_and_substitutions_are_nacked() {
        use xcore::header_value_option::HeaderAppendAction as A;
        let option = |k: &str, v: &str, a: A| xcore::HeaderValueOption {
            header: Some(xcore::HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append_action: a as i32,
            ..Default::default()
        };
        let ops = header_ops(
            "r",
            &[
                option("X-Set", "100%% sure", A::OverwriteIfExistsOrAdd),
                option("x-add", "more", A::AppendIfExistsOrAdd),
            ],
            &["x-gone".to_string()],
        )
        .expect("read");
        assert_eq!(ops.set[0].0.as_str(), "x-set");
        assert_eq!(ops.set[0].1, "100% sure");
        assert_eq!(ops.add[0].1, "more");
        assert_eq!(ops.remove[0].as_str(), "x-gone");
        let err = header_ops(
            "r",
            &[option(
                "x-peer",
                "%DOWNSTREAM_REMOTE_ADDRESS%",
                A::AppendIfExistsOrAdd,
            )],
            &[],
        )
        .expect_err("NACKed");
        assert!(err.to_string().contains("substitutions"), "{err}");
        assert!(header_ops("r", &[], &[":path".to_string()]).is_err());
    }

    #[test]
    fn mirror_policies_are_read_with_their_share() {
        use lumen_api::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
        let policy = xroute::route_action::RequestMirrorPolicy {
            cluster: "outbound|9080|v2|ratings.default.svc.cluster.local".into(),
            runtime_fraction: Some(xcore::RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 25,
                    denominator: fractional_percent::DenominatorType::Hundred as i32,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = mirrors("r", std::slice::from_ref(&policy)).expect("read");
        assert_eq!(m[0].share, 250_000);
        let header = xroute::route_action::RequestMirrorPolicy {
            cluster_header: "x-mirror-to".into(),
            ..policy
        };
        assert!(mirrors("r", &[header]).is_err());
    }

    #[test]
    fn endpoints_survive_cluster_updates() {
        let mut cfg = config();
        cfg.apply_clusters(vec![Cluster {
            name: "v1".into(),
            eds: true,
            ..Default::default()
        }]);
        assert_eq!(cfg.clusters["v1"].endpoints.len(), 2);
        assert!(!cfg.clusters.contains_key("v2"));
    }
}
