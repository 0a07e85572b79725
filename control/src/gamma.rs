//! Gateway API routes in the mesh (GAMMA): an HTTPRoute whose parent is a Service routes that
//! Service's traffic in every sidecar, as a VirtualService for the Service's host does. Read
//! into the same model: each rule's matches become routes, ordered by Gateway API's
//! precedence (an exact path first, then the longest prefix, then a method, then the most
//! header matches, then rule order), with the backends as weighted destinations. What the
//! proxies do not carry out yet is refused by its field path.

use crate::crd::gateway as crd;
use crate::model::{
    Destination, HeaderRules, HttpMatchRequest, HttpRoute, HttpRouteDestination, PathChange,
    PortSelector, Redirect, Rewrite, StringMatch, VirtualServiceSpec,
};
use crate::validate::{
    FieldError, absolute_path, at, header_name, header_value, redirect_status, regex,
};

fn not_yet(path: String, what: &str) -> FieldError {
    at(
        path,
        format!(
            "{what} is not supported by lumen yet; the route is refused rather than applied without it"
        ),
    )
}

/// The Services a route is attached to (`group: ""`, `kind: Service`), as hosts of
/// `namespace`, and the port it is limited to, if any.
fn parents(
    parent_refs: &[crd::ParentReference],
    hostnames: &[String],
    namespace: &str,
) -> Result<(Vec<String>, Vec<u16>), FieldError> {
    if !hostnames.is_empty() {
        return Err(at(
            "spec.hostnames",
            "a route for a Service takes the Service's own names; hostnames apply to gateways",
        ));
    }
    if parent_refs.is_empty() {
        return Err(at(
            "spec.parentRefs",
            "is empty: name the Service the route is for",
        ));
    }
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for (i, p) in parent_refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        let service = p.kind.as_deref() == Some("Service")
            && p.group
                .as_deref()
                .is_none_or(|g| g.is_empty() || g == "core");
        if !service {
            return Err(at(
                path,
                format!(
                    "a {} parent is a gateway's (north-south), out of lumen's scope: lumen serves routes whose parent is a Service (GAMMA)",
                    p.kind.as_deref().unwrap_or("Gateway")
                ),
            ));
        }
        if p.section_name.is_some() {
            return Err(not_yet(
                format!("{path}.sectionName"),
                "a parent's sectionName",
            ));
        }
        let ns = p.namespace.as_deref().unwrap_or(namespace);
        hosts.push(format!("{}.{ns}.svc.cluster.local", p.name));
        if let Some(port) = p.port {
            ports.push(port);
        } else if !ports.is_empty() {
            return Err(at(
                format!("{path}.port"),
                "some parents name a port and this one does not: give each the same scope",
            ));
        }
    }
    Ok((hosts, ports))
}

/// One match of a rule, as the model's match; `None` for what is refused.
fn rule_match(m: &crd::HttpRouteMatch, path: &str) -> Result<HttpMatchRequest, FieldError> {
    let query = value_matches(&m.query_params, &format!("{path}.queryParams"), false)?;
    let uri = match &m.path {
        None => None,
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            absolute_path(&value, format!("{path}.path.value"))?;
            Some(match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => StringMatch::Exact(value),
                "PathPrefix" if value == "/" => StringMatch::Prefix(value),
                // Segment-wise: `/v2` takes `/v2` and `/v2/x`, not `/v2x`.
                "PathPrefix" => StringMatch::PathPrefix(value.trim_end_matches('/').to_string()),
                "RegularExpression" => {
                    StringMatch::Regex(regex(&value, &format!("{path}.path.value"))?)
                }
                other => {
                    return Err(at(
                        format!("{path}.path.type"),
                        format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                    ));
                }
            })
        }
    };
    let headers = header_matches(&m.headers, &format!("{path}.headers"))?;
    Ok(HttpMatchRequest {
        query,
        uri,
        headers,
        method: m.method.clone().map(StringMatch::Exact),
        ..HttpMatchRequest::default()
    })
}

/// A path modifier (of a redirect or a rewrite).
fn path_modifier(p: &crd::PathModifier, path: &str) -> Result<PathChange, FieldError> {
    Ok(match p.type_.as_str() {
        "ReplaceFullPath" => PathChange::Full(
            p.replace_full_path
                .clone()
                .ok_or_else(|| at(format!("{path}.replaceFullPath"), "is missing"))?,
        ),
        "ReplacePrefixMatch" => PathChange::Prefix(
            p.replace_prefix_match
                .clone()
                .ok_or_else(|| at(format!("{path}.replacePrefixMatch"), "is missing"))?,
        ),
        other => {
            return Err(at(
                format!("{path}.type"),
                format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
            ));
        }
    })
}

/// A RequestRedirect filter (status 302 unless said, Gateway API's default).
fn request_redirect(r: &crd::RequestRedirect, path: &str) -> Result<Redirect, FieldError> {
    let change = r
        .path
        .as_ref()
        .map(|p| path_modifier(p, &format!("{path}.path")))
        .transpose()?;
    Ok(Redirect {
        scheme: r.scheme.clone(),
        host: r.hostname.clone(),
        port: r.port,
        path: change,
        status: redirect_status(
            u32::from(r.status_code.unwrap_or(302)),
            &format!("{path}.statusCode"),
        )?,
    })
}

/// Header matches, by lower-case name.
fn header_matches(
    list: &[crd::HeaderMatch],
    path: &str,
) -> Result<std::collections::BTreeMap<String, StringMatch>, FieldError> {
    value_matches(list, path, true)
}

/// Header or query parameter matches (`Exact` or `RegularExpression`) by name (header names
/// folded to lower case, query parameter names kept as sent); a name twice refused.
fn value_matches(
    list: &[crd::HeaderMatch],
    path: &str,
    fold_case: bool,
) -> Result<std::collections::BTreeMap<String, StringMatch>, FieldError> {
    let mut headers = std::collections::BTreeMap::new();
    for (j, h) in list.iter().enumerate() {
        let hp = format!("{path}[{j}]");
        let value = match h.type_.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch::Exact(h.value.clone()),
            "RegularExpression" => StringMatch::Regex(regex(&h.value, &format!("{hp}.value"))?),
            other => {
                return Err(at(
                    format!("{hp}.type"),
                    format!("{other:?} is not Exact or RegularExpression"),
                ));
            }
        };
        let name = if fold_case {
            h.name.to_ascii_lowercase()
        } else {
            h.name.clone()
        };
        if headers.insert(name, value).is_some() {
            return Err(at(
                format!("{hp}.name"),
                format!("{:?} is matched twice", h.name),
            ));
        }
    }
    Ok(headers)
}

/// One model route per match of rule `i` (Gateway API orders matches, not rules), each
/// `template` with that match; a rule without matches takes every request.
fn per_match(
    i: usize,
    matches: Vec<HttpMatchRequest>,
    template: &HttpRoute,
    out: &mut Vec<(usize, HttpRoute)>,
) {
    let matches = if matches.is_empty() {
        vec![HttpMatchRequest {
            uri: Some(StringMatch::Prefix("/".to_string())),
            ..HttpMatchRequest::default()
        }]
    } else {
        matches
    };
    for m in matches {
        out.push((
            i,
            HttpRoute {
                matches: vec![m],
                ..template.clone()
            },
        ));
    }
}

/// The routes in Gateway API's order (precedence first, then rule order: a stable sort
/// keeps it), for the parents' hosts and ports.
fn ordered(
    hosts: Vec<String>,
    ports: Vec<u16>,
    mut routes: Vec<(usize, HttpRoute)>,
) -> VirtualServiceSpec {
    let key = |r: &HttpRoute| r.matches.first().map(precedence).unwrap_or_default();
    routes.sort_by(|a, b| key(&b.1).cmp(&key(&a.1)).then(a.0.cmp(&b.0)));
    VirtualServiceSpec {
        hosts,
        gateways: Vec::new(),
        http: routes.into_iter().map(|(_, r)| r).collect(),
        ports,
    }
}

/// Gateway API's precedence among matches: a larger key is tried first.
fn precedence(m: &HttpMatchRequest) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.uri {
        Some(StringMatch::Exact(p)) => (3, p.len()),
        Some(StringMatch::Regex(p)) => (2, p.len()),
        Some(StringMatch::PathPrefix(p) | StringMatch::Prefix(p)) => (1, p.len()),
        None => (1, 1),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

/// What a rule's filters ask for.
#[derive(Default)]
struct RuleFilters {
    headers: Option<HeaderRules>,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
    mirrors: Vec<(Destination, f64)>,
}

/// A rule's filters: header changes both ways, a redirect, a rewrite, mirrors; others refused.
fn rule_filters(
    filters: &[crd::HttpRouteFilter],
    path: &str,
    namespace: &str,
) -> Result<RuleFilters, FieldError> {
    let mut headers = HeaderRules::default();
    let mut redirect = None;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    for (k, f) in filters.iter().enumerate() {
        let fp = format!("{path}.filters[{k}]");
        if f.type_ == "RequestMirror" {
            let m = f
                .request_mirror
                .as_ref()
                .ok_or_else(|| at(format!("{fp}.requestMirror"), "is missing"))?;
            mirrors.push(request_mirror(
                m,
                &format!("{fp}.requestMirror"),
                namespace,
            )?);
            continue;
        }
        if f.type_ == "URLRewrite" {
            let w = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| at(format!("{fp}.urlRewrite"), "is missing"))?;
            let wp = format!("{fp}.urlRewrite");
            rewrite = Some(Rewrite {
                path: w
                    .path
                    .as_ref()
                    .map(|p| path_modifier(p, &format!("{wp}.path")))
                    .transpose()?,
                host: w.hostname.clone(),
            });
            continue;
        }
        if f.type_ == "RequestRedirect" {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or_else(|| at(format!("{fp}.requestRedirect"), "is missing"))?;
            redirect = Some(request_redirect(r, &format!("{fp}.requestRedirect"))?);
            continue;
        }
        let (ops, modifier, field) = match f.type_.as_str() {
            "RequestHeaderModifier" => (
                &mut headers.request,
                &f.request_header_modifier,
                "requestHeaderModifier",
            ),
            "ResponseHeaderModifier" => (
                &mut headers.response,
                &f.response_header_modifier,
                "responseHeaderModifier",
            ),
            other => return Err(not_yet(fp, &format!("the {other} filter"))),
        };
        let m = modifier
            .as_ref()
            .ok_or_else(|| at(format!("{fp}.{field}"), "is missing"))?;
        let mp = format!("{fp}.{field}");
        for (n, name) in m.remove.iter().enumerate() {
            ops.remove
                .push(header_name(name, &format!("{mp}.remove[{n}]"))?);
        }
        for (list, out, what) in [(&m.set, &mut ops.set, "set"), (&m.add, &mut ops.add, "add")] {
            for (n, h) in list.iter().enumerate() {
                let hp = format!("{mp}.{what}[{n}]");
                out.push((
                    header_name(&h.name, &format!("{hp}.name"))?,
                    header_value(&h.value, &format!("{hp}.value"))?,
                ));
            }
        }
    }
    let headers = (headers != HeaderRules::default()).then_some(headers);
    Ok(RuleFilters {
        headers,
        redirect,
        rewrite,
        mirrors,
    })
}

/// A RequestMirror filter: its backend as a destination, and its share (`percent`, or
/// `fraction`, or all).
fn request_mirror(
    m: &crd::RequestMirror,
    path: &str,
    namespace: &str,
) -> Result<(Destination, f64), FieldError> {
    let b = &m.backend_ref;
    if b.kind.as_deref().is_some_and(|k| k != "Service") {
        return Err(at(
            format!("{path}.backendRef.kind"),
            "only a Service is supported",
        ));
    }
    if b.namespace.as_deref().is_some_and(|ns| ns != namespace) {
        return Err(not_yet(
            format!("{path}.backendRef.namespace"),
            "a mirror in another namespace (it needs a ReferenceGrant)",
        ));
    }
    let port = b.port.ok_or_else(|| {
        at(
            format!("{path}.backendRef.port"),
            "is required for a Service",
        )
    })?;
    let share = match (&m.percent, &m.fraction) {
        (Some(p), _) => f64::from(*p),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            if d <= 0 || f.numerator < 0 || f.numerator > d {
                return Err(at(
                    format!("{path}.fraction"),
                    "is not a fraction from 0 to 1",
                ));
            }
            100.0 * f64::from(f.numerator) / f64::from(d)
        }
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&share) {
        return Err(at(
            format!("{path}.percent"),
            format!("{share} is not from 0 to 100"),
        ));
    }
    Ok((
        Destination {
            host: b.name.clone(),
            subset: None,
            port: Some(PortSelector { number: port }),
        },
        share,
    ))
}

/// A rule's backends as weighted destinations (weight 0 left out). A backend in another
/// namespace is allowed when it is one of the route's parents (a consumer route sending its
/// Service's traffic on to that Service, as GAMMA's conformance does); any other needs a
/// ReferenceGrant, not read yet.
fn rule_backends(
    refs: &[crd::HttpBackendRef],
    path: &str,
    namespace: &str,
    parents: &[String],
) -> Result<Vec<HttpRouteDestination>, FieldError> {
    let mut destinations = Vec::new();
    for (j, b) in refs.iter().enumerate() {
        let bp = format!("{path}.backendRefs[{j}]");
        // A backend's own filters: header changes only.
        let headers = if b.filters.is_empty() {
            None
        } else {
            let f = rule_filters(&b.filters, &bp, namespace)?;
            if f.redirect.is_some() || f.rewrite.is_some() || !f.mirrors.is_empty() {
                return Err(not_yet(
                    format!("{bp}.filters"),
                    "a backend's own redirect, rewrite or mirror",
                ));
            }
            f.headers
        };
        if b.kind.as_deref().is_some_and(|k| k != "Service")
            || b.group
                .as_deref()
                .is_some_and(|g| !g.is_empty() && g != "core")
        {
            return Err(at(bp, "only Service backends are supported"));
        }
        let host = match b.namespace.as_deref() {
            Some(ns) if ns != namespace => {
                let fqdn = format!("{}.{ns}.svc.cluster.local", b.name);
                if !parents.contains(&fqdn) {
                    return Err(not_yet(
                        format!("{bp}.namespace"),
                        "a backend in another namespace that is not the route's parent (it needs a ReferenceGrant)",
                    ));
                }
                fqdn
            }
            _ => b.name.clone(),
        };
        let port = b
            .port
            .ok_or_else(|| at(format!("{bp}.port"), "is required for a Service backend"))?;
        let weight = u32::try_from(b.weight.unwrap_or(1))
            .map_err(|_| at(format!("{bp}.weight"), "is negative"))?;
        if weight == 0 {
            continue;
        }
        destinations.push(HttpRouteDestination {
            destination: Destination {
                host,
                subset: None,
                port: Some(PortSelector { number: port }),
            },
            weight: Some(weight),
            headers,
        });
    }
    Ok(destinations)
}

/// An HTTPRoute's spec as the model's routing for its parent Services.
pub fn http_route(
    spec: &crd::HttpRouteSpec,
    namespace: &str,
) -> Result<VirtualServiceSpec, FieldError> {
    let (hosts, ports) = parents(&spec.parent_refs, &spec.hostnames, namespace)?;
    let mut routes: Vec<(usize, HttpRoute)> = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let RuleFilters {
            headers,
            redirect,
            rewrite,
            mirrors,
        } = rule_filters(&rule.filters, &path, namespace)?;
        let timeout = match &rule.timeouts {
            None => None,
            Some(t) => {
                if t.backend_request.is_some() {
                    return Err(not_yet(
                        format!("{path}.timeouts.backendRequest"),
                        "backendRequest",
                    ));
                }
                t.request
                    .as_deref()
                    .map(|r| {
                        crate::duration::parse(r)
                            .map_err(|e| at(format!("{path}.timeouts.request"), e))
                    })
                    .transpose()?
            }
        };
        let destinations = rule_backends(&rule.backend_refs, &path, namespace, &hosts)?;
        if redirect.is_some() && !destinations.is_empty() {
            return Err(at(
                format!("{path}.backendRefs"),
                "a rule that redirects has no backends",
            ));
        }
        if destinations.is_empty() && redirect.is_none() {
            return Err(not_yet(
                format!("{path}.backendRefs"),
                "a rule without a backend that takes traffic (Gateway API answers it with 500)",
            ));
        }
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .map(|(k, m)| rule_match(m, &format!("{path}.matches[{k}]")))
            .collect::<Result<_, _>>()?;
        let template = HttpRoute {
            name: Some(rule.name.clone().unwrap_or_else(|| format!("rule-{i}"))),
            route: destinations,
            timeout,
            headers,
            redirect,
            rewrite,
            mirrors,
            ..HttpRoute::default()
        };
        per_match(i, matches, &template, &mut routes);
    }
    Ok(ordered(hosts, ports, routes))
}

/// A GRPCRoute's spec as the model's routing for its parent Services: a method match is a
/// path match (`/service/method` exactly, `/service/` as a prefix, a method of any service as
/// a regex), headers as for HTTP; filters and backends as an HTTPRoute's (no redirects or
/// rewrites, which GRPCRoute has not).
pub fn grpc_route(
    spec: &crd::GrpcRouteSpec,
    namespace: &str,
) -> Result<VirtualServiceSpec, FieldError> {
    let (hosts, ports) = parents(&spec.parent_refs, &spec.hostnames, namespace)?;
    let mut routes: Vec<(usize, HttpRoute)> = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let RuleFilters {
            headers,
            redirect,
            rewrite,
            mirrors,
        } = rule_filters(&rule.filters, &path, namespace)?;
        if redirect.is_some() || rewrite.is_some() {
            return Err(at(
                format!("{path}.filters"),
                "GRPCRoute has no redirects or rewrites",
            ));
        }
        let destinations = rule_backends(&rule.backend_refs, &path, namespace, &hosts)?;
        if destinations.is_empty() {
            return Err(not_yet(
                format!("{path}.backendRefs"),
                "a rule without a backend that takes traffic",
            ));
        }
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .map(|(k, m)| grpc_match(m, &format!("{path}.matches[{k}]")))
            .collect::<Result<_, _>>()?;
        let template = HttpRoute {
            name: Some(rule.name.clone().unwrap_or_else(|| format!("rule-{i}"))),
            route: destinations,
            headers,
            mirrors,
            ..HttpRoute::default()
        };
        per_match(i, matches, &template, &mut routes);
    }
    Ok(ordered(hosts, ports, routes))
}

/// A name gRPC allows in a path segment (a service or a method), for exact matches.
fn grpc_name(name: &str, path: &str) -> Result<String, FieldError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if !ok {
        return Err(at(
            path,
            format!("{name:?} is not a gRPC service or method name"),
        ));
    }
    Ok(name.to_string())
}

fn grpc_match(m: &crd::GrpcRouteMatch, path: &str) -> Result<HttpMatchRequest, FieldError> {
    let uri = match &m.method {
        None => None,
        Some(method) => {
            let mp = format!("{path}.method");
            match method.type_.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    let service = method
                        .service
                        .as_deref()
                        .map(|s| grpc_name(s, &format!("{mp}.service")))
                        .transpose()?;
                    let name = method
                        .method
                        .as_deref()
                        .map(|s| grpc_name(s, &format!("{mp}.method")))
                        .transpose()?;
                    match (service, name) {
                        (Some(s), Some(n)) => Some(StringMatch::Exact(format!("/{s}/{n}"))),
                        (Some(s), None) => Some(StringMatch::Prefix(format!("/{s}/"))),
                        (None, Some(n)) => Some(StringMatch::Regex(format!("/[^/]+/{n}"))),
                        (None, None) => {
                            return Err(at(mp, "names neither a service nor a method"));
                        }
                    }
                }
                "RegularExpression" => {
                    let service = method.service.as_deref().unwrap_or("[^/]+");
                    let name = method.method.as_deref().unwrap_or("[^/]+");
                    Some(StringMatch::Regex(regex(
                        &format!("/{service}/{name}"),
                        &mp,
                    )?))
                }
                other => {
                    return Err(at(
                        format!("{mp}.type"),
                        format!("{other:?} is not Exact or RegularExpression"),
                    ));
                }
            }
        }
    };
    let headers = header_matches(&m.headers, &format!("{path}.headers"))?;
    Ok(HttpMatchRequest {
        uri,
        headers,
        ..HttpMatchRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> crd::HttpRouteSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn matches_are_ordered_by_gateway_api_precedence() {
        let s = spec(
            "parentRefs: [{group: '', kind: Service, name: echo, port: 80}]\nrules:\n- matches: [{path: {type: PathPrefix, value: /}}]\n  backendRefs: [{name: echo-v1, port: 8080}]\n- matches: [{path: {type: PathPrefix, value: /v2/}}, {path: {type: Exact, value: /v2/exact}}]\n  backendRefs: [{name: echo-v2, port: 8080, weight: 3}, {name: echo-v3, port: 8080, weight: 0}]\n- matches: [{path: {type: PathPrefix, value: /}, method: POST, headers: [{name: Version, value: two}]}]\n  backendRefs: [{name: echo-v2, port: 8080}]\n",
        );
        let vs = http_route(&s, "mesh").expect("read");
        assert_eq!(vs.hosts, ["echo.mesh.svc.cluster.local"]);
        assert_eq!(vs.ports, [80]);
        let order: Vec<Option<StringMatch>> =
            vs.http.iter().map(|r| r.matches[0].uri.clone()).collect();
        assert_eq!(
            order,
            [
                Some(StringMatch::Exact("/v2/exact".into())),
                Some(StringMatch::PathPrefix("/v2".into())),
                Some(StringMatch::Prefix("/".into())),
                Some(StringMatch::Prefix("/".into())),
            ]
        );
        // Of the two `/` prefixes, the one with a method and a header comes first.
        assert_eq!(
            vs.http[2].matches[0].method,
            Some(StringMatch::Exact("POST".into()))
        );
        assert_eq!(
            vs.http[2].matches[0].headers["version"],
            StringMatch::Exact("two".into())
        );
        // A weight of 0 takes no traffic.
        assert_eq!(vs.http[0].route.len(), 1);
        assert_eq!(vs.http[0].route[0].weight, Some(3));
    }

    #[test]
    fn grpc_methods_become_paths() {
        let s: crd::GrpcRouteSpec = serde_yaml::from_str(
            "parentRefs: [{kind: Service, name: echo, port: 7070}]\nrules:\n- matches: [{method: {service: grpc.Echo, method: Ping}}, {method: {service: grpc.Echo}}, {method: {method: Ping}}]\n  backendRefs: [{name: echo-v1, port: 7070, weight: 70}, {name: echo-v2, port: 7070, weight: 30}]\n",
        )
        .expect("spec");
        let vs = grpc_route(&s, "mesh").expect("read");
        let uris: Vec<Option<StringMatch>> =
            vs.http.iter().map(|r| r.matches[0].uri.clone()).collect();
        assert_eq!(
            uris,
            [
                Some(StringMatch::Exact("/grpc.Echo/Ping".into())),
                Some(StringMatch::Regex("/[^/]+/Ping".into())),
                Some(StringMatch::Prefix("/grpc.Echo/".into())),
            ]
        );
        assert_eq!(vs.http[0].route.len(), 2);
    }

    #[test]
    fn what_is_out_of_scope_or_not_yet_is_named() {
        let e = http_route(
            &spec("parentRefs: [{name: gw}]\nrules: [{backendRefs: [{name: a, port: 80}]}]\n"),
            "mesh",
        )
        .expect_err("a Gateway parent");
        assert_eq!(e.path, "spec.parentRefs[0]");
        let e = http_route(
            &spec(
                "parentRefs: [{kind: Service, name: echo}]\nrules: [{backendRefs: [{name: a}]}]\n",
            ),
            "mesh",
        )
        .expect_err("no port");
        assert_eq!(e.path, "spec.rules[0].backendRefs[0].port");
        let e = http_route(
            &spec("parentRefs: [{kind: Service, name: echo}]\nrules:\n- matches: [{path: {type: RegularExpression, value: '/v(['}}]\n  backendRefs: [{name: a, port: 80}]\n"),
            "mesh",
        )
        .expect_err("bad regex");
        assert_eq!(e.path, "spec.rules[0].matches[0].path.value");
        let e = http_route(
            &spec("parentRefs: [{kind: Service, name: echo}]\nrules:\n- backendRefs: [{name: a, port: 80, filters: [{type: URLRewrite, urlRewrite: {hostname: b}}]}]\n"),
            "mesh",
        )
        .expect_err("a backend's own rewrite");
        assert_eq!(e.path, "spec.rules[0].backendRefs[0].filters");
    }

    #[test]
    fn a_backend_s_own_header_filters_reach_its_destination() {
        let s = spec(
            "parentRefs: [{kind: Service, name: echo, port: 80}]\nrules:\n- backendRefs:\n  - name: echo-v1\n    port: 80\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Backend, value: v1}]}}, {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [server]}}]\n  - {name: echo-v2, port: 80}\n",
        );
        let vs = http_route(&s, "mesh").expect("read");
        let route = &vs.http[0].route;
        let v1 = route[0].headers.as_ref().expect("v1's headers");
        assert_eq!(
            v1.request.set,
            [("x-backend".to_string(), "v1".to_string())]
        );
        assert_eq!(v1.response.remove, ["server"]);
        assert_eq!(route[1].headers, None);
    }
}
