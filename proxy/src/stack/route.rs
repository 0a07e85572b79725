//! Outbound routing: the request's authority and path through the xDS route table to a
//! route and a weighted backend cluster ([`Target`], in the request's extensions), with the
//! destination service's labels and the configuration version recorded.

use std::sync::Arc;

use http::{Request, StatusCode};

use super::error::{Fault, ProxyError, flags};
use super::observe::{Observation, authority_of};
use super::step::Step;
use crate::http::{host_only, span_attributes};
use crate::routing::{Cluster, RouteError};
use crate::server::{Accepted, Body};
use crate::tcp::{PASSTHROUGH_CLUSTER, passthrough};
use crate::telemetry::AttrValue;
use crate::xds::ConfigRx;

/// Where routing sent a request: the backend cluster and the service (FQDN) it belongs to.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    /// The service the virtual host names (`reviews.default.svc.cluster.local`).
    pub service: crate::telemetry::Label,
}

#[derive(Debug, Clone)]
pub struct Route {
    config: ConfigRx,
}

impl Route {
    pub fn new(config: ConfigRx) -> Route {
        Route { config }
    }
}

/// Rewrites the request's path (query kept) and host as the route says.
fn rewrite(
    req: &mut Request<Body>,
    rw: &crate::routing::Rewrite,
    matched: &crate::routing::PathMatch,
) -> Result<(), ProxyError> {
    let bad = |what: &str| {
        ProxyError::new(
            flags::NONE,
            StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Proxy,
            format!("the route's rewrite made an invalid {what}"),
        )
    };
    if let Some(change) = &rw.path {
        let path = change.apply(req.uri().path(), matched);
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| bad("path"))?);
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| bad("URI"))?;
    }
    if let Some(host) = &rw.host {
        let value = http::HeaderValue::from_str(host).map_err(|_| bad("host"))?;
        req.headers_mut().insert(http::header::HOST, value);
        if req.uri().authority().is_some() {
            let mut parts = req.uri().clone().into_parts();
            parts.authority = Some(host.parse().map_err(|_| bad("host"))?);
            *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| bad("URI"))?;
        }
    }
    Ok(())
}

/// The hash a consistent-hash cluster picks this request's endpoint by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHash(pub u64);

/// Hashes what the route's hash policies name (combined as Envoy does: rotate, xor) into a
/// [`RequestHash`]; nothing when the request has none of it (the cluster then picks at
/// random). A cookie policy with a time to live makes up the cookie a request lacks, hashes
/// that, and sets it on the response so the client's next requests stick.
fn affinity(req: &mut Request<Body>, policies: &[crate::routing::HashPolicy]) {
    use crate::routing::HashPolicy;
    let mut combined: Option<u64> = None;
    let mut set_cookie = None;
    for policy in policies {
        let h = match policy {
            HashPolicy::Header(name) => req
                .headers()
                .get(name)
                .map(|v| crate::lb::hash(v.as_bytes())),
            HashPolicy::SourceIp => req
                .extensions()
                .get::<Accepted>()
                .map(|a| crate::lb::hash(a.peer.ip().to_string().as_bytes())),
            HashPolicy::QueryParameter(name) => {
                query_value(req.uri().query(), name).map(|v| crate::lb::hash(v.as_bytes()))
            }
            HashPolicy::Cookie { name, ttl, path } => match cookie_value(req.headers(), name) {
                Some(v) => Some(crate::lb::hash(v.as_bytes())),
                None => ttl.map(|ttl| {
                    let value = format!("{:016x}", rand::random::<u64>());
                    let mut cookie = format!("{name}=\"{value}\"");
                    if !ttl.is_zero() {
                        cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    if !path.is_empty() {
                        cookie.push_str(&format!("; Path={path}"));
                    }
                    cookie.push_str("; HttpOnly");
                    set_cookie = Some(cookie);
                    crate::lb::hash(value.as_bytes())
                }),
            },
        };
        if let Some(h) = h {
            combined = Some(combined.map_or(h, |c| c.rotate_left(1) ^ h));
        }
    }
    if let Some(h) = combined {
        req.extensions_mut().insert(RequestHash(h));
    }
    if let Some(cookie) = set_cookie
        && let Ok(value) = http::HeaderValue::from_str(&cookie)
    {
        // The response gets it through the header layer, with the route's own changes.
        let mut rules = req
            .extensions()
            .get::<Arc<crate::routing::HeaderRules>>()
            .map(|r| (**r).clone())
            .unwrap_or_default();
        rules.response.add.push((http::header::SET_COOKIE, value));
        req.extensions_mut().insert(Arc::new(rules));
    }
}

/// The first value of query parameter `name` (as sent, not decoded).
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes kept off).
fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_string())
        })
}

/// Whether an authority carries a port (`host:port`, `[v6]:port`).
fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

impl Step for Route {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let config = self.config.borrow().clone();
        let observation = req.extensions().get::<Observation>().cloned();
        if let (Some(o), Some(v)) = (&observation, config.versions.get("RDS")) {
            o.update(|o| {
                if o.keeps_span() {
                    o.span
                        .attributes
                        .push((span_attributes::CONFIG_VERSION, AttrValue::Str(v.clone())));
                }
            });
        }
        let mut authority = std::borrow::Cow::Borrowed(authority_of(req));
        // Captured: the port the app connected to picks the route configuration when the
        // Host header names none (as the listener for that port does in Envoy).
        let original_dst = req
            .extensions()
            .get::<Accepted>()
            .and_then(|a| a.original_dst);
        if let Some(dst) = original_dst
            && !has_port(&authority)
        {
            authority = std::borrow::Cow::Owned(format!("{authority}:{}", dst.port()));
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let routed = config.route(
            &authority,
            req.method(),
            path,
            req.headers(),
            rand::random(),
        );
        // Captured and for a host the mesh does not know: on to where the app was going, as
        // Istio's default outbound policy (ALLOW_ANY) does.
        if let (Err(RouteError::NoRoute { .. }), Some(dst)) = (&routed, original_dst) {
            let service: crate::telemetry::Label = Arc::from(host_only(&authority));
            if let Some(o) = &observation {
                o.update(|o| {
                    o.labels.destination_service = Arc::from(PASSTHROUGH_CLUSTER);
                    o.labels.destination_service_name = Arc::from(PASSTHROUGH_CLUSTER);
                    if !o.keeps_span() {
                        return;
                    }
                    o.span.name = format!("{service}/*");
                    o.span.attributes.push((
                        "upstream_cluster",
                        AttrValue::Str(PASSTHROUGH_CLUSTER.to_string()),
                    ));
                });
            }
            req.extensions_mut().insert(Target {
                cluster: Arc::new(Cluster::new(PASSTHROUGH_CLUSTER, vec![passthrough(dst)])),
                service,
            });
            return Ok(());
        }
        let decision = routed.map_err(|e| {
            let known = config.known_hosts();
            let reason = format!(
                "{e}; this proxy knows {} service host(s): {}",
                known.len(),
                known.join(", ")
            );
            match e {
                RouteError::NoRoute { .. } => ProxyError::new(
                    flags::NO_ROUTE,
                    StatusCode::NOT_FOUND,
                    Fault::Downstream,
                    reason,
                ),
                RouteError::NoCluster { .. } => ProxyError::new(
                    flags::NO_CLUSTER,
                    StatusCode::SERVICE_UNAVAILABLE,
                    Fault::Proxy,
                    reason,
                ),
            }
        })?;
        let vhost = decision.route_config.virtual_host(decision.virtual_host);
        let service = vhost.map_or_else(crate::telemetry::empty, |v| v.labels.service.clone());
        if let Some(o) = &observation
            && let Some(vhost) = vhost
        {
            o.update(|o| {
                let labels = &vhost.labels;
                o.labels.destination_service = labels.service.clone();
                if let Some((name, namespace)) = &labels.name_and_namespace {
                    o.labels.destination_service_name = name.clone();
                    o.labels.destination_service_namespace = namespace.clone();
                }
                if !o.keeps_span() {
                    return;
                }
                o.span.name = format!("{}/*", vhost.name);
                o.span.attributes.push((
                    "upstream_cluster",
                    AttrValue::Str(decision.cluster.name.clone()),
                ));
            });
        }
        if let Some(route) = decision
            .route_config
            .virtual_host(decision.virtual_host)
            .and_then(|vh| vh.routes.get(decision.route))
        {
            if let Some(fault) = route.fault.as_deref() {
                req.extensions_mut().insert(fault.clone());
            }
            if let Some(cors) = &route.cors {
                req.extensions_mut().insert(cors.clone());
            }
            if let Some(answer) = &route.answer {
                req.extensions_mut().insert(super::answer::Answering {
                    answer: answer.clone(),
                    matched: route.path.clone(),
                });
            }
            if !route.mirrors.is_empty() {
                let clusters = route
                    .mirrors
                    .iter()
                    .filter_map(|m| {
                        config
                            .clusters
                            .get(&m.cluster)
                            .map(|c| (c.clone(), m.share))
                    })
                    .collect();
                req.extensions_mut()
                    .insert(super::mirror::Mirroring(clusters));
            }
            if let Some(rw) = &route.rewrite {
                rewrite(req, rw, &route.path)?;
            }
            if let Some(rules) = &route.header_rules {
                req.extensions_mut().insert(rules.clone());
            }
            if let Some(rules) = &decision.backend_headers {
                req.extensions_mut()
                    .insert(super::headers::BackendHeaders(rules.clone()));
            }
            if !route.hash_policy.is_empty() {
                affinity(req, &route.hash_policy);
            }
            if let Some(retry) = &route.retry {
                req.extensions_mut().insert(retry.clone());
            }
            if let Some(t) = route.timeout {
                req.extensions_mut().insert(super::connect::RouteTimeout(t));
            }
        }
        req.extensions_mut().insert(Target {
            cluster: decision.cluster,
            service,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{cookie_value, has_port, query_value};

    #[test]
    fn cookies_and_query_parameters_are_found_by_name() {
        let mut h = http::HeaderMap::new();
        h.append("cookie", "a=1; user=\"abc\"".parse().expect("value"));
        h.append("cookie", "b=2".parse().expect("value"));
        assert_eq!(cookie_value(&h, "user").as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie_value(&h, "c"), None);
        assert_eq!(query_value(Some("x=1&user=7&user=8"), "user"), Some("7"));
        assert_eq!(query_value(Some("flag&x=1"), "flag"), Some(""));
        assert_eq!(query_value(None, "user"), None);
    }

    #[test]
    fn authorities_with_and_without_ports() {
        assert!(has_port("reviews:9080"));
        assert!(has_port("[::1]:80"));
        assert!(!has_port("reviews"));
        assert!(!has_port("[::1]"));
        assert!(!has_port("reviews:"));
    }
}
