//! `GET /debug/config`: the configuration that applies to each service, as the translator
//! reads the model (the same lookups build the xDS): its ports and endpoints, the routes of
//! the VirtualService that claims its host (matches and weighted destinations, in order),
//! and the subsets DestinationRules declare for it with the endpoints each selects. What
//! Kiali shows on a service's "Istio config" tab, from Lumen's own model.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{HttpMatchRequest, Model, Service, StringMatch, labels_match};
use crate::translate::{subsets_of, virtual_service_for};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConfigDump {
    pub services: Vec<ServiceConfig>,
    /// Resources refused, with the field path and why; the rest applies without them.
    pub rejected: Vec<crate::model::Rejection>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    pub host: String,
    pub ports: Vec<u16>,
    /// Pods the service selects.
    pub endpoints: usize,
    /// `VirtualService namespace/name` (or `HTTPRoute namespace/name`), when one routes this
    /// host.
    pub virtual_service: Option<String>,
    /// In the order the proxy tries them; without a VirtualService, the one default route.
    pub routes: Vec<RouteConfig>,
    pub subsets: Vec<SubsetConfig>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Each match in words (`uri prefix /api`, `header end-user exact jason`); any of them
    /// selects the route; empty: every request.
    pub matches: Vec<String>,
    pub destinations: Vec<DestinationConfig>,
    /// What the route does besides sending to its destinations, in words (redirect, direct
    /// response, rewrite, header changes, timeout, retries, faults, mirrors, CORS).
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestinationConfig {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Percent of the route's requests (a lone destination takes all).
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SubsetConfig {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Pods of the service the subset's labels select.
    pub endpoints: usize,
}

fn string_match(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(v) => format!("exact {v}"),
        StringMatch::Prefix(v) => format!("prefix {v}"),
        StringMatch::Regex(v) => format!("regex {v}"),
        StringMatch::PathPrefix(v) => format!("path prefix {v}"),
    }
}

fn match_words(m: &HttpMatchRequest) -> String {
    let mut parts = Vec::new();
    if let Some(uri) = &m.uri {
        parts.push(format!("uri {}", string_match(uri)));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {}", string_match(method)));
    }
    for (name, v) in &m.headers {
        parts.push(format!("header {name} {}", string_match(v)));
    }
    for (name, v) in &m.query {
        parts.push(format!("query {name} {}", string_match(v)));
    }
    if let Some(port) = m.port {
        parts.push(format!("port {port}"));
    }
    if !m.source_labels.is_empty() {
        let labels: Vec<String> = m
            .source_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("callers labelled {}", labels.join(",")));
    }
    if parts.is_empty() {
        "every request".to_string()
    } else {
        parts.join(", ")
    }
}

fn retry_words(r: &crate::model::RetrySettings) -> String {
    if r.attempts == 0 {
        return "no retries".to_string();
    }
    let mut on = r.retry_on.clone();
    on.extend(r.status_codes.iter().map(u16::to_string));
    let per_try = r
        .per_try_timeout
        .map(|t| format!(", {t:?} a try"))
        .unwrap_or_default();
    format!("{} retries on {}{per_try}", r.attempts, on.join(", "))
}

/// A route's policies in words, in the order the proxy applies them.
fn policy_words(http: &crate::model::HttpRoute) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = &http.cors {
        out.push(format!(
            "CORS for {} origin pattern{}",
            c.allow_origins.len(),
            if c.allow_origins.len() == 1 { "" } else { "s" }
        ));
    }
    if let Some(h) = &http.headers {
        let n = |o: &crate::model::HeaderOps| o.set.len() + o.add.len() + o.remove.len();
        out.push(format!(
            "header changes: {} on requests, {} on responses",
            n(&h.request),
            n(&h.response)
        ));
    }
    if let Some(r) = &http.redirect {
        out.push(format!("redirect ({})", r.status));
    }
    if let Some(d) = &http.direct_response {
        out.push(format!(
            "direct response {} ({} bytes)",
            d.status,
            d.body.len()
        ));
    }
    if let Some(rw) = &http.rewrite {
        out.push(match (&rw.path, &rw.host) {
            (Some(_), Some(h)) => format!("rewrite path and host ({h})"),
            (Some(_), None) => "rewrite path".to_string(),
            (None, Some(h)) => format!("rewrite host ({h})"),
            (None, None) => "rewrite".to_string(),
        });
    }
    if let Some(f) = &http.fault {
        if let Some((d, p)) = f.delay {
            out.push(format!("fault: {d:?} delay for {p}%"));
        }
        if let Some((s, p)) = f.abort {
            out.push(format!("fault: abort {s} for {p}%"));
        }
    }
    for (d, p) in &http.mirrors {
        out.push(format!("mirror {p}% to {}", d.host));
    }
    if let Some(t) = http.timeout {
        out.push(format!("timeout {t:?}"));
    }
    if http.redirect.is_none() && http.direct_response.is_none() {
        out.push(retry_words(
            &http
                .retries
                .clone()
                .unwrap_or_else(crate::model::RetrySettings::istio_default),
        ));
    }
    out
}

fn service_config(model: &Model, svc: &Service) -> ServiceConfig {
    let host = svc.fqdn();
    let endpoints = model.endpoint_labels(svc);
    let vs = virtual_service_for(model, svc, None, None);
    let routes = match vs {
        None => vec![RouteConfig {
            name: "default".to_string(),
            matches: Vec::new(),
            destinations: vec![DestinationConfig {
                host: host.clone(),
                subset: None,
                port: None,
                weight: 100,
            }],
            policies: vec![retry_words(&crate::model::RetrySettings::istio_default())],
        }],
        Some(vs) => vs
            .spec
            .http
            .iter()
            .enumerate()
            .map(|(i, http)| RouteConfig {
                name: http
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}.{}.{i}", vs.meta.name, vs.meta.namespace)),
                matches: http.matches.iter().map(match_words).collect(),
                policies: policy_words(http),
                destinations: http
                    .route
                    .iter()
                    .map(|d| DestinationConfig {
                        host: Model::fqdn(&d.destination.host, &vs.meta.namespace),
                        subset: d.destination.subset.clone(),
                        port: d.destination.port.as_ref().map(|p| p.number),
                        weight: d
                            .weight
                            .unwrap_or(if http.route.len() == 1 { 100 } else { 0 }),
                    })
                    .collect(),
            })
            .collect(),
    };
    ServiceConfig {
        name: svc.meta.name.clone(),
        namespace: svc.meta.namespace.clone(),
        host,
        ports: svc.ports.iter().map(|p| p.port).collect(),
        endpoints: endpoints.len(),
        virtual_service: vs.map(|vs| format!("{} {}/{}", vs.kind, vs.meta.namespace, vs.meta.name)),
        routes,
        subsets: subsets_of(model, svc)
            .into_iter()
            .map(|(name, labels)| SubsetConfig {
                endpoints: endpoints
                    .iter()
                    .filter(|l| labels_match(&labels, l))
                    .count(),
                name,
                labels,
            })
            .collect(),
    }
}

/// Every service's configuration, by namespace and name.
pub fn dump(model: &Model) -> ConfigDump {
    let mut services: Vec<ServiceConfig> = model
        .services
        .iter()
        .map(|s| service_config(model, s))
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    ConfigDump {
        services,
        rejected: model.rejected.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../fixtures/demo/bookinfo.yaml");
    const ROUTING: &str = include_str!("../../fixtures/demo/routing.yaml");

    #[test]
    fn the_demo_reviews_split_and_subsets_are_reported() {
        let mut model = Model::from_yaml("bookinfo.yaml", DEMO).expect("demo parses");
        model
            .add_yaml("routing.yaml", ROUTING)
            .expect("routing parses");
        let dump = dump(&model);
        let names: Vec<&str> = dump.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["details", "productpage", "ratings", "reviews"]);
        let reviews = &dump.services[3];
        assert_eq!(reviews.host, "reviews.default.svc.cluster.local");
        assert_eq!(reviews.ports, [9080]);
        assert_eq!(reviews.endpoints, 2);
        assert_eq!(
            reviews.virtual_service.as_deref(),
            Some("VirtualService default/reviews")
        );
        let split: Vec<(Option<&str>, u32)> = reviews.routes[0]
            .destinations
            .iter()
            .map(|d| (d.subset.as_deref(), d.weight))
            .collect();
        assert_eq!(split, [(Some("v1"), 50), (Some("v2"), 50)]);
        let subsets: Vec<(&str, usize)> = reviews
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.endpoints))
            .collect();
        assert_eq!(subsets, [("v1", 1), ("v2", 1)]);
        // A service nobody routes gets the default route to all its endpoints.
        let details = &dump.services[0];
        assert_eq!(details.virtual_service, None);
        assert_eq!(details.routes[0].name, "default");
        assert_eq!(details.routes[0].destinations[0].weight, 100);
        // What each route does besides its destinations, in words: Istio's default
        // retries, here.
        assert_eq!(
            details.routes[0].policies,
            [
                "2 retries on connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, 503"
            ]
        );
    }

    #[test]
    fn endpoints_are_counted_from_endpoint_slices_when_a_service_has_them() {
        let mut model = Model::from_yaml("bookinfo.yaml", DEMO).expect("demo parses");
        model
            .add_yaml("routing.yaml", ROUTING)
            .expect("routing parses");
        // reviews' slice: v1 ready, v2 not, and an address without a pod.
        model
            .add_yaml(
                "slice.yaml",
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 9080}]\nendpoints:\n- {addresses: [10.1.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1}}\n- {addresses: [10.1.0.2], conditions: {ready: false}, targetRef: {kind: Pod, name: reviews-v2}}\n- {addresses: [10.1.0.9]}\n",
            )
            .expect("a slice");
        let dump = dump(&model);
        let reviews = dump
            .services
            .iter()
            .find(|s| s.name == "reviews")
            .expect("reviews");
        assert_eq!(reviews.endpoints, 2);
        let subsets: Vec<(&str, usize)> = reviews
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.endpoints))
            .collect();
        assert_eq!(subsets, [("v1", 1), ("v2", 0)]);
    }

    #[test]
    fn a_route_s_policies_are_written_in_words() {
        let mut model = Model::from_yaml("bookinfo.yaml", DEMO).expect("demo parses");
        model
            .add_yaml(
                "vs.yaml",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new}\n  - corsPolicy: {allowOrigins: [{exact: 'https://a.example'}]}\n    timeout: 2s\n    retries: {attempts: 0}\n    route: [{destination: {host: ratings}}]\n",
            )
            .expect("a VirtualService");
        let dump = dump(&model);
        let ratings = dump
            .services
            .iter()
            .find(|s| s.name == "ratings")
            .expect("ratings");
        assert_eq!(ratings.routes[0].policies, ["redirect (301)"]);
        assert_eq!(
            ratings.routes[1].policies,
            ["CORS for 1 origin pattern", "timeout 2s", "no retries"]
        );
    }

    #[test]
    fn matches_are_written_in_words() {
        let m = HttpMatchRequest {
            uri: Some(StringMatch::Prefix("/api".into())),
            headers: [("end-user".to_string(), StringMatch::Exact("jason".into()))].into(),
            method: Some(StringMatch::Regex("GET|HEAD".into())),
            query: [("v".to_string(), StringMatch::Exact("2".into()))].into(),
            ..HttpMatchRequest::default()
        };
        assert_eq!(
            match_words(&m),
            "uri prefix /api, method regex GET|HEAD, header end-user exact jason, query v exact 2"
        );
        assert_eq!(match_words(&HttpMatchRequest::default()), "every request");
    }
}
