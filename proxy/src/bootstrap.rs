//! The static part of an Envoy v3 bootstrap (`static_resources`): listeners with the HTTP
//! connection manager and its router, inline route configurations, and STATIC clusters with
//! their endpoints, read strictly: a field lumen-proxy does not support is an error that names
//! it (and where), never silently ignored, so one file runs Envoy and lumen-proxy side by side
//! and means the same to both. Without `dynamic_resources`, these are the whole configuration
//! (standalone mode, no control plane).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::routing::{
    Endpoint, HeaderMatch, PathMatch, Route, RouteConfig, ValueMatch, VirtualHost, WeightedBackend,
};

/// The filters supported: the HTTP connection manager with the router, and the TCP proxy.
use lumen_api::type_url::{HTTP_CONNECTION_MANAGER as HCM, ROUTER, TCP_PROXY};

/// One static listener: where it listens and the routes it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticListener {
    pub name: String,
    pub address: SocketAddr,
    /// An HTTP listener's routes (none for a TCP listener).
    pub routes: Arc<RouteConfig>,
    /// A TCP listener's cluster: the connection's bytes go there as they are.
    pub tcp_cluster: Option<String>,
}

/// One static cluster: its endpoints and whether it speaks HTTP/2 upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StaticCluster {
    pub endpoints: Vec<Endpoint>,
    pub http2: bool,
}

/// Static listeners and clusters (by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StaticConfig {
    pub listeners: Vec<StaticListener>,
    pub clusters: BTreeMap<String, StaticCluster>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaticResources {
    #[serde(default)]
    listeners: Vec<ListenerCfg>,
    #[serde(default)]
    pub(crate) clusters: Vec<ClusterCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerCfg {
    name: String,
    address: AddressCfg,
    filter_chains: Vec<FilterChainCfg>,
    #[serde(default)]
    stat_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddressCfg {
    pub(crate) socket_address: SocketAddressCfg,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SocketAddressCfg {
    pub(crate) address: String,
    pub(crate) port_value: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterChainCfg {
    filters: Vec<NetworkFilterCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFilterCfg {
    name: String,
    /// The HTTP connection manager or the TCP proxy, told apart by `@type`.
    typed_config: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpProxyCfg {
    #[serde(rename = "@type")]
    #[allow(dead_code)]
    type_url: String,
    #[serde(default)]
    #[allow(dead_code)]
    stat_prefix: Option<String>,
    cluster: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HcmCfg {
    /// Checked before this is read (the HTTP connection manager's).
    #[serde(rename = "@type")]
    #[allow(dead_code)]
    type_url: String,
    #[serde(default)]
    stat_prefix: Option<String>,
    #[serde(default)]
    codec_type: Option<String>,
    route_config: RouteConfigCfg,
    #[serde(default)]
    http_filters: Vec<HttpFilterCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFilterCfg {
    name: String,
    #[serde(default)]
    typed_config: Option<TypedCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedCfg {
    #[serde(rename = "@type")]
    type_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteConfigCfg {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    virtual_hosts: Vec<VirtualHostCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VirtualHostCfg {
    name: String,
    domains: Vec<String>,
    #[serde(default)]
    routes: Vec<RouteCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteCfg {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "match")]
    matcher: RouteMatchCfg,
    route: RouteActionCfg,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteMatchCfg {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    headers: Vec<HeaderMatcherCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatcherCfg {
    name: String,
    #[serde(default)]
    present_match: Option<bool>,
    #[serde(default)]
    string_match: Option<StringMatcherCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatcherCfg {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteActionCfg {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    weighted_clusters: Option<WeightedClustersCfg>,
    /// How long the upstream gets to answer, as protobuf's JSON writes a duration (`2s`,
    /// `0.5s`); `0s` is no limit, as in Envoy.
    #[serde(default)]
    timeout: Option<String>,
}

/// A duration as protobuf's JSON mapping writes it: seconds with an `s` (`2s`, `0.250s`).
fn proto_duration(text: &str) -> Option<std::time::Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| std::time::Duration::from_secs_f64(seconds))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedClustersCfg {
    clusters: Vec<ClusterWeightCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterWeightCfg {
    name: String,
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterCfg {
    pub(crate) name: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    lb_policy: Option<String>,
    pub(crate) load_assignment: LoadAssignmentCfg,
    /// The ADS and OTLP clusters say HTTP/2 here (gRPC); read by their clients.
    #[serde(default)]
    typed_extension_protocol_options: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadAssignmentCfg {
    #[serde(default)]
    cluster_name: Option<String>,
    pub(crate) endpoints: Vec<LocalityEndpointsCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocalityEndpointsCfg {
    pub(crate) lb_endpoints: Vec<LbEndpointCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LbEndpointCfg {
    pub(crate) endpoint: EndpointCfg,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointCfg {
    pub(crate) address: AddressCfg,
}

impl SocketAddressCfg {
    pub(crate) fn socket_addr(&self, at: &str) -> Result<SocketAddr, String> {
        if let Some(p) = &self.protocol
            && p != "TCP"
        {
            return Err(format!("{at}.protocol: {p} is not supported (TCP only)"));
        }
        let ip = self.address.parse().map_err(|_| {
            format!(
                "{at}.address: {:?} is not an IP address (no DNS names)",
                self.address
            )
        })?;
        Ok(SocketAddr::new(ip, self.port_value))
    }
}

impl ClusterCfg {
    /// HTTP/2 upstream, as `typed_extension_protocol_options` says it (Envoy's
    /// `HttpProtocolOptions` with `explicit_http_config`).
    fn http2(&self, at: &str) -> Result<bool, String> {
        const KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
        let Some(options) = &self.typed_extension_protocol_options else {
            return Ok(false);
        };
        let Some(map) = options.as_mapping() else {
            return Err(format!("{at}.typed_extension_protocol_options: not a map"));
        };
        if let Some(key) = map.keys().find(|k| k.as_str() != Some(KEY)) {
            return Err(format!(
                "{at}.typed_extension_protocol_options: {key:?} is not supported ({KEY} only)"
            ));
        }
        let Some(value) = map.get(KEY) else {
            return Ok(false);
        };
        let explicit = value.get("explicit_http_config");
        let h2 = explicit
            .and_then(|e| e.get("http2_protocol_options"))
            .is_some();
        let h1 = explicit
            .and_then(|e| e.get("http_protocol_options"))
            .is_some();
        if !h2 && !h1 {
            return Err(format!(
                "{at}.typed_extension_protocol_options.{KEY}: only explicit_http_config with http2_protocol_options or http_protocol_options is supported"
            ));
        }
        Ok(h2)
    }

    /// The cluster's endpoints; only STATIC clusters with ROUND_ROBIN are supported.
    fn endpoints(&self, at: &str) -> Result<Vec<Endpoint>, String> {
        if let Some(k) = self.kind.as_deref().filter(|k| *k != "STATIC") {
            return Err(format!("{at}.type: {k} is not supported (STATIC only)"));
        }
        if let Some(p) = self.lb_policy.as_deref().filter(|p| *p != "ROUND_ROBIN") {
            return Err(format!(
                "{at}.lb_policy: {p} is not supported (ROUND_ROBIN only)"
            ));
        }
        let _ = (&self.connect_timeout, &self.load_assignment.cluster_name);
        let mut out = Vec::new();
        for (i, group) in self.load_assignment.endpoints.iter().enumerate() {
            for (j, lb) in group.lb_endpoints.iter().enumerate() {
                let addr = lb.endpoint.address.socket_address.socket_addr(&format!(
                    "{at}.load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address.socket_address"
                ))?;
                out.push(Endpoint {
                    app_addr: addr,
                    connect_addr: addr,
                    meshed: false,
                    workload: "unknown".into(),
                    namespace: "unknown".into(),
                    app: self.name.as_str().into(),
                    version: "unknown".into(),
                });
            }
        }
        Ok(out)
    }
}

impl StaticResources {
    /// The listeners and clusters as the proxy runs them, checked as Envoy would: each
    /// listener has exactly one HTTP connection manager whose only filter is the router, and
    /// every route names a cluster that exists.
    pub fn resolve(&self) -> Result<StaticConfig, String> {
        let mut clusters = BTreeMap::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = format!("static_resources.clusters[{i}] ({})", c.name);
            let cluster = StaticCluster {
                endpoints: c.endpoints(&at)?,
                http2: c.http2(&at)?,
            };
            if clusters.insert(c.name.clone(), cluster).is_some() {
                return Err(format!("{at}: a second cluster named {:?}", c.name));
            }
        }
        let mut listeners = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("static_resources.listeners[{i}] ({})", l.name);
            let _ = &l.stat_prefix;
            let address = l
                .address
                .socket_address
                .socket_addr(&format!("{at}.address.socket_address"))?;
            let [chain] = l.filter_chains.as_slice() else {
                return Err(format!(
                    "{at}.filter_chains: exactly one filter chain is supported"
                ));
            };
            let [filter] = chain.filters.as_slice() else {
                return Err(format!(
                    "{at}.filter_chains[0].filters: exactly one filter (the HTTP connection manager or the TCP proxy) is supported"
                ));
            };
            let at_hcm = format!("{at}.filter_chains[0].filters[0] ({})", filter.name);
            let type_url = filter
                .typed_config
                .get("@type")
                .and_then(|t| t.as_str())
                .unwrap_or_default();
            if type_url == TCP_PROXY {
                let tcp: TcpProxyCfg = serde_yaml::from_value(filter.typed_config.clone())
                    .map_err(|e| format!("{at_hcm}.typed_config: {e}"))?;
                if !clusters.contains_key(&tcp.cluster) {
                    return Err(format!(
                        "{at_hcm}.typed_config.cluster: {:?} is not in static_resources.clusters",
                        tcp.cluster
                    ));
                }
                listeners.push(StaticListener {
                    name: l.name.clone(),
                    address,
                    routes: Arc::new(RouteConfig::new(l.name.clone(), Vec::new())),
                    tcp_cluster: Some(tcp.cluster),
                });
                continue;
            }
            if type_url != HCM {
                return Err(format!(
                    "{at_hcm}.typed_config: {type_url:?} is not supported (the HTTP connection manager or the TCP proxy)"
                ));
            }
            let hcm: HcmCfg = serde_yaml::from_value(filter.typed_config.clone())
                .map_err(|e| format!("{at_hcm}.typed_config: {e}"))?;
            let hcm = &hcm;
            let _ = (&hcm.stat_prefix, &hcm.codec_type);
            for (k, f) in hcm.http_filters.iter().enumerate() {
                let url = f.typed_config.as_ref().map(|t| t.type_url.as_str());
                if url != Some(ROUTER) && f.name != "envoy.filters.http.router" {
                    return Err(format!(
                        "{at_hcm}.typed_config.http_filters[{k}]: {} is not supported (the router only)",
                        f.name
                    ));
                }
            }
            let rc = &hcm.route_config;
            let at_rc = format!("{at_hcm}.typed_config.route_config");
            let mut virtual_hosts = Vec::new();
            for (v, vh) in rc.virtual_hosts.iter().enumerate() {
                let mut routes = Vec::new();
                for (r, route) in vh.routes.iter().enumerate() {
                    let at_r = format!("{at_rc}.virtual_hosts[{v}].routes[{r}]");
                    let m = &route.matcher;
                    let path = match (&m.prefix, &m.path) {
                        (Some(p), None) => PathMatch::Prefix(p.clone()),
                        (None, Some(p)) => PathMatch::Exact(p.clone()),
                        _ => {
                            return Err(format!(
                                "{at_r}.match: exactly one of prefix and path is supported"
                            ));
                        }
                    };
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| {
                            let value = match (&h.present_match, &h.string_match) {
                                (Some(p), None) => ValueMatch::Present(*p),
                                (None, Some(StringMatcherCfg { exact: Some(e), prefix: None })) => ValueMatch::Exact(e.clone()),
                                (None, Some(StringMatcherCfg { exact: None, prefix: Some(p) })) => ValueMatch::Prefix(p.clone()),
                                _ => return Err(format!("{at_r}.match.headers ({}): one of present_match, string_match.exact and string_match.prefix", h.name)),
                            };
                            Ok(HeaderMatch { name: h.name.to_ascii_lowercase(), value })
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    let backends = match (&route.route.cluster, &route.route.weighted_clusters) {
                        (Some(c), None) => vec![WeightedBackend {
                            cluster: c.clone(),
                            weight: 1,
                            header_rules: None,
                        }],
                        (None, Some(w)) => w
                            .clusters
                            .iter()
                            .map(|c| WeightedBackend {
                                cluster: c.name.clone(),
                                weight: c.weight,
                                header_rules: None,
                            })
                            .collect(),
                        _ => {
                            return Err(format!(
                                "{at_r}.route: exactly one of cluster and weighted_clusters is supported"
                            ));
                        }
                    };
                    let timeout = match &route.route.timeout {
                        None => None,
                        Some(t) => Some(proto_duration(t).ok_or_else(|| {
                            format!("{at_r}.route.timeout: {t:?} is not a duration like 2s or 0.5s")
                        })?),
                    };
                    if let Some(b) = backends.iter().find(|b| !clusters.contains_key(&b.cluster)) {
                        return Err(format!(
                            "{at_r}.route: cluster {:?} is not in static_resources.clusters",
                            b.cluster
                        ));
                    }
                    routes.push(Route {
                        name: route
                            .name
                            .clone()
                            .unwrap_or_else(|| format!("{}-{r}", vh.name)),
                        path,
                        headers,
                        query: Vec::new(),
                        backends,
                        fault: None,
                        timeout,
                        retry: None,
                        header_rules: None,
                        answer: None,
                        cors: None,
                        rewrite: None,
                        mirrors: Vec::new(),
                        hash_policy: Vec::new(),
                    });
                }
                virtual_hosts.push(VirtualHost {
                    labels: crate::routing::ServiceLabels::of(&vh.name),
                    name: vh.name.clone(),
                    domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                    routes,
                });
            }
            listeners.push(StaticListener {
                name: l.name.clone(),
                address,
                routes: Arc::new(RouteConfig::new(
                    rc.name.clone().unwrap_or_else(|| l.name.clone()),
                    virtual_hosts,
                )),
                tcp_cluster: None,
            });
        }
        Ok(StaticConfig {
            listeners,
            clusters,
        })
    }
}
