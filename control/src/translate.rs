//! Translates the resource model into xDS v3 resources for one proxy.
//!
//! Naming follows Istio so `istioctl`-trained eyes and a real Envoy both feel at home:
//! outbound clusters `outbound|<port>|<subset>|<fqdn>`, one route configuration per service
//! port named after the port, per-port listeners `0.0.0.0_<port>`, and the inbound
//! `virtualInbound` listener on 15006 in front of `inbound|<port>||` clusters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use lumen_api::pb::envoy::config::cluster::v3 as cluster;
use lumen_api::pb::envoy::config::core::v3 as core;
use lumen_api::pb::envoy::config::endpoint::v3 as endpoint;
use lumen_api::pb::envoy::config::listener::v3 as listener;
use lumen_api::pb::envoy::config::route::v3 as route;
use lumen_api::pb::envoy::extensions::filters::http::router::v3::Router;
use lumen_api::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use lumen_api::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use lumen_api::pb::google::protobuf::{
    Any, Duration, Struct, UInt32Value, UInt64Value, Value, value::Kind,
};
use lumen_api::{cluster_name, endpoint_meta, pack_any, ports, type_url};

use crate::ads::wire::{Wire, encode_list};
use crate::model::{
    DestinationRuleSpec, FaultPolicy, HashKey, HashTable, HeaderOps, HeaderRules, HttpMatchRequest,
    LoadBalancer, Model, PathChange, Pod, Redirect, Service, StringMatch, VirtualService,
    labels_match,
};

/// The proxy a configuration is generated for, parsed from its xDS node id
/// (`sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, as Istio's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyNode {
    pub id: String,
    pub ip: String,
    pub pod: String,
    pub namespace: String,
}

/// `DiscoveryResponse.resources`' field number.
const DISCOVERY_RESPONSE_RESOURCES: u32 = 2;

/// `DeltaDiscoveryResponse.resources`' field number.
const DELTA_DISCOVERY_RESPONSE_RESOURCES: u32 = 2;

/// One resource, already packed, with its name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedResource {
    pub name: String,
    /// A hash of the resource's bytes, computed once (what delta xDS compares).
    pub version: u64,
    /// The resource as an entry of a `DiscoveryResponse`'s `resources`, encoded once with
    /// the rest of its list and shared by every state-of-the-world response that carries it.
    pub wire: Wire,
    /// The resource as an entry of a `DeltaDiscoveryResponse`'s `resources` (a `Resource`
    /// with its name and version), likewise.
    pub delta_wire: Wire,
}

impl NamedResource {
    pub fn new(name: String, resource: Any) -> NamedResource {
        NamedResource::list(vec![(name, resource)])
            .pop()
            .unwrap_or_else(|| unreachable!("a list of one encodes to one"))
    }

    /// A list's resources, each list's encodings in one block per protocol (see [`Wire`]).
    pub fn list(items: Vec<(String, Any)>) -> Vec<NamedResource> {
        use prost::encoding::{WireType, encode_key, encode_varint, message, string};
        use std::hash::{Hash, Hasher};
        let versions: Vec<u64> = items
            .iter()
            .map(|(_, any)| {
                let mut h = std::hash::DefaultHasher::new();
                any.value.hash(&mut h);
                h.finish()
            })
            .collect();
        let wires = encode_list(items.len(), |i, out| {
            message::encode(DISCOVERY_RESPONSE_RESOURCES, &items[i].1, out);
        });
        let delta_wires = encode_list(items.len(), |i, out| {
            let (name, any) = &items[i];
            let version = format!("{:016x}", versions[i]);
            // `Resource`: version (1), resource (2), name (3).
            let len = string::encoded_len(1, &version)
                + message::encoded_len(2, any)
                + string::encoded_len(3, name);
            encode_key(
                DELTA_DISCOVERY_RESPONSE_RESOURCES,
                WireType::LengthDelimited,
                out,
            );
            encode_varint(len as u64, out);
            string::encode(1, &version, out);
            message::encode(2, any, out);
            string::encode(3, name, out);
        });
        items
            .into_iter()
            .zip(versions)
            .zip(wires.into_iter().zip(delta_wires))
            .map(|(((name, _), version), (wire, delta_wire))| NamedResource {
                name,
                version,
                wire,
                delta_wire,
            })
            .collect()
    }

    /// The packed resource, read back from its encoding.
    pub fn any(&self) -> Any {
        use prost::Message;
        let mut buf = self.wire.as_slice();
        // The entry's key is one byte (field 2, length-delimited).
        buf = buf.get(1..).unwrap_or_default();
        Any::decode_length_delimited(buf).unwrap_or_default()
    }
}

/// Every resource of every type for one proxy, by type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyResources {
    outbound: Arc<Outbound>,
    routes: Arc<Vec<NamedResource>>,
    inbound_clusters: Vec<NamedResource>,
    inbound_listener: Option<NamedResource>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "node id {id:?} is not of the form sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local"
)]
pub struct NodeIdError {
    pub id: String,
}

impl ProxyNode {
    pub fn parse(id: &str) -> Result<ProxyNode, NodeIdError> {
        let err = || NodeIdError { id: id.to_string() };
        let mut parts = id.split('~');
        let (Some(kind), Some(ip), Some(pod_ns), Some(_domain), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        if kind != "sidecar" {
            return Err(err());
        }
        let (pod, namespace) = pod_ns.rsplit_once('.').ok_or_else(err)?;
        Ok(ProxyNode {
            id: id.to_string(),
            ip: ip.to_string(),
            pod: pod.to_string(),
            namespace: namespace.to_string(),
        })
    }
}

impl ProxyResources {
    /// One type's resources shared by every proxy of the model (the outbound part, with the
    /// index of its names; routes are shared by a namespace and carry none).
    pub fn shared(&self, type_url: &str) -> (&[NamedResource], Option<&Arc<NameIndex>>) {
        match type_url {
            t if t == type_url::CLUSTER => {
                (&self.outbound.clusters, Some(&self.outbound.indexes[0]))
            }
            t if t == type_url::ENDPOINT => {
                (&self.outbound.endpoints, Some(&self.outbound.indexes[1]))
            }
            t if t == type_url::LISTENER => {
                (&self.outbound.listeners, Some(&self.outbound.indexes[2]))
            }
            t if t == type_url::ROUTE => (&self.routes, None),
            _ => (&[], None),
        }
    }

    /// One type's resources of this proxy's own (its pod's inbound part).
    pub fn own(&self, type_url: &str) -> Vec<&NamedResource> {
        match type_url {
            t if t == type_url::CLUSTER => self.inbound_clusters.iter().collect(),
            t if t == type_url::LISTENER => self.inbound_listener.iter().collect(),
            _ => Vec::new(),
        }
    }

    /// A resource of type `ty` by name, with its position among the shared ones (`hint`:
    /// where it is in a list indexed by that index, when it is the same).
    pub fn find(
        &self,
        ty: &str,
        name: &str,
        hint: Option<(usize, &Arc<NameIndex>)>,
    ) -> Option<(&NamedResource, Option<usize>)> {
        let (shared, index) = self.shared(ty);
        if let Some(index) = index {
            let at = match hint {
                Some((i, h)) if Arc::ptr_eq(h, index) => Some(i),
                _ => index.position(name),
            };
            if let Some(r) = at.and_then(|i| shared.get(i)) {
                return Some((r, at));
            }
        } else if let Some(r) = shared.iter().find(|r| r.name == name) {
            return Some((r, None));
        }
        self.own(ty)
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| (r, None))
    }

    /// The resources of one type, in the order they are sent.
    pub fn of_type(&self, type_url: &str) -> Vec<&NamedResource> {
        match type_url {
            t if t == type_url::CLUSTER => self
                .outbound
                .clusters
                .iter()
                .chain(&self.inbound_clusters)
                .collect(),
            t if t == type_url::ENDPOINT => self.outbound.endpoints.iter().collect(),
            t if t == type_url::LISTENER => self
                .outbound
                .listeners
                .iter()
                .chain(&self.inbound_listener)
                .collect(),
            t if t == type_url::ROUTE => self.routes.iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// Builds every xDS resource the given proxy should see.
pub fn translate(model: &Model, node: &ProxyNode) -> ProxyResources {
    let outbound = Arc::new(outbound(model));
    let routes = Arc::new(routes(
        model,
        &node.namespace,
        pod_labels(model, node).filter(|_| model.uses_source_labels()),
    ));
    assemble(&outbound, &routes, inbound(model, node))
}

/// What every sidecar is sent alike: the outbound clusters, their endpoints and listeners,
/// and each list's [`NameIndex`].
#[derive(Debug, Default, PartialEq)]
pub struct Outbound {
    clusters: Vec<NamedResource>,
    endpoints: Vec<NamedResource>,
    listeners: Vec<NamedResource>,
    indexes: [Arc<NameIndex>; 3],
}

impl Outbound {
    /// Takes `previous`'s name indexes where its lists have the same names in the same order
    /// (a change of endpoints only, say), so delta streams' subscriptions, kept as positions
    /// in them, carry over as they are.
    pub fn reuse_indexes(&mut self, previous: &Outbound) {
        let same = |a: &[NamedResource], b: &[NamedResource]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name)
        };
        for (k, (now, before)) in [
            (&self.clusters, &previous.clusters),
            (&self.endpoints, &previous.endpoints),
            (&self.listeners, &previous.listeners),
        ]
        .into_iter()
        .enumerate()
        {
            if same(now, before) {
                self.indexes[k] = previous.indexes[k].clone();
            }
        }
    }
}

/// The position of each name in one list of shared resources.
#[derive(Debug, Default, PartialEq)]
pub struct NameIndex {
    position: HashMap<String, u32>,
}

impl NameIndex {
    fn of(items: &[NamedResource]) -> Arc<NameIndex> {
        Arc::new(NameIndex {
            position: items
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.clone(), i as u32))
                .collect(),
        })
    }

    /// An index of `items`, for tests elsewhere.
    #[cfg(test)]
    pub fn for_tests(items: &[NamedResource]) -> Arc<NameIndex> {
        NameIndex::of(items)
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.position.get(name).map(|p| *p as usize)
    }
}

fn pack_named<T: prost::Name>(items: Vec<T>, name: impl Fn(&T) -> String) -> Vec<NamedResource> {
    NamedResource::list(
        items
            .into_iter()
            .map(|item| (name(&item), pack_any(item)))
            .collect(),
    )
}

/// The outbound part of the configuration, the same for every sidecar.
pub fn outbound(model: &Model) -> Outbound {
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    let mut http_ports: BTreeSet<u16> = BTreeSet::new();
    // TCP ports: listener name → (address, cluster), the first service to claim a name kept.
    let mut tcp_listeners: BTreeMap<String, (String, u16, String)> = BTreeMap::new();
    // Each service's endpoints, found once, instead of every pod for every service.
    let endpoints_of = endpoints_by_service(model);
    for (s, svc) in model.services.iter().enumerate() {
        let fqdn = svc.fqdn();
        let subsets = subsets_of(model, svc);
        let dr = destination_rule_for(model, &fqdn);
        for port in &svc.ports {
            for (subset, labels) in
                std::iter::once((String::new(), BTreeMap::new())).chain(subsets.clone())
            {
                let name = cluster_name::outbound(port.port, &subset, &fqdn);
                let policy = dr
                    .map(|dr| dr.policy_for(&subset, port.port))
                    .unwrap_or_default();
                let lb = policy.load_balancer.clone().unwrap_or_default();
                let mut cluster = eds_cluster(&name, port.http2(), &lb);
                resilience(&mut cluster, &policy);
                clusters.push(cluster);
                endpoints.push(load_assignment(
                    &endpoints_of[s],
                    svc,
                    port.port,
                    &labels,
                    &name,
                ));
            }
            if port.tcp() {
                // Opaque TCP: a captured connection to the service's cluster IP (or, without
                // one, to any address on the port) goes to its cluster, as Istio's
                // `<clusterIP>_<port>` listeners.
                let ip = svc
                    .cluster_ip
                    .map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_string());
                let listener = format!("{ip}_{}", port.port);
                let cluster = cluster_name::outbound(port.port, "", &fqdn);
                match tcp_listeners.get(&listener) {
                    Some((_, _, first)) => tracing::warn!(
                        %listener, kept = %first, dropped = %cluster,
                        "two TCP services claim one listener: give them cluster IPs"
                    ),
                    None => {
                        tcp_listeners.insert(listener, (ip, port.port, cluster));
                    }
                }
                continue;
            }
            http_ports.insert(port.port);
        }
    }
    let mut listeners: Vec<listener::Listener> = http_ports
        .iter()
        .map(|port| outbound_listener(*port))
        .collect();
    for (name, (ip, port, cluster)) in tcp_listeners {
        if listeners.iter().any(|l| l.name == name) {
            tracing::warn!(listener = %name, %cluster, "an HTTP port and a TCP port share one listener: the HTTP one is kept");
            continue;
        }
        listeners.push(tcp_listener(&name, &ip, port, &cluster));
    }
    let clusters = pack_named(clusters, |c| c.name.clone());
    let endpoints = pack_named(endpoints, |e| e.cluster_name.clone());
    let listeners = pack_named(listeners, |l| l.name.clone());
    Outbound {
        indexes: [
            NameIndex::of(&clusters),
            NameIndex::of(&endpoints),
            NameIndex::of(&listeners),
        ],
        clusters,
        endpoints,
        listeners,
    }
}

/// Where a service's endpoints come from.
enum Endpoints<'m> {
    /// The pods its selector picks (a config directory without EndpointSlices).
    Pods(Vec<&'m Pod>),
    /// Its EndpointSlices, each endpoint with the pod behind it when the model has it.
    Slices(Vec<(&'m crate::model::EndpointSlice, Vec<Option<&'m Pod>>)>),
}

/// For each service (in model order), its endpoints: from its EndpointSlices when it has
/// some, else the pods its selector picks.
fn endpoints_by_service(model: &Model) -> Vec<Endpoints<'_>> {
    // Index pods by each label pair; a service's pods are those of its rarest pair that
    // match all of its selector.
    let mut by_label: HashMap<(&str, &str), Vec<&Pod>> = HashMap::new();
    let mut by_name: HashMap<(&str, &str), &Pod> = HashMap::new();
    for pod in &model.pods {
        by_name.insert((pod.meta.namespace.as_str(), pod.meta.name.as_str()), pod);
        for (k, v) in &pod.meta.labels {
            by_label
                .entry((k.as_str(), v.as_str()))
                .or_default()
                .push(pod);
        }
    }
    let mut slices: HashMap<(&str, &str), Vec<&crate::model::EndpointSlice>> = HashMap::new();
    for slice in &model.endpoint_slices {
        slices
            .entry((slice.meta.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    model
        .services
        .iter()
        .map(|svc| {
            if let Some(own) = slices.get(&(svc.meta.namespace.as_str(), svc.meta.name.as_str())) {
                return Endpoints::Slices(
                    own.iter()
                        .map(|slice| {
                            let pods = slice
                                .endpoints
                                .iter()
                                .map(|e| {
                                    e.pod.as_deref().and_then(|name| {
                                        by_name.get(&(slice.meta.namespace.as_str(), name)).copied()
                                    })
                                })
                                .collect();
                            (*slice, pods)
                        })
                        .collect(),
                );
            }
            let rarest = svc
                .selector
                .iter()
                .filter_map(|(k, v)| by_label.get(&(k.as_str(), v.as_str())))
                .min_by_key(|pods| pods.len());
            let some_pair_missing = svc
                .selector
                .iter()
                .any(|(k, v)| !by_label.contains_key(&(k.as_str(), v.as_str())));
            Endpoints::Pods(match rarest {
                _ if svc.selector.is_empty() || some_pair_missing => Vec::new(),
                None => Vec::new(),
                Some(pods) => pods.iter().copied().filter(|p| svc.selects(p)).collect(),
            })
        })
        .collect()
}

/// The route configurations, one a port, as a sidecar in `namespace` is sent them (short
/// host names resolve in its own namespace).
/// The route tables for the sidecars of `namespace` (whose pod has `labels`, when routes
/// match on their callers' labels; `None`: a caller without a known pod).
pub fn routes(
    model: &Model,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<NamedResource> {
    let mut route_hosts: BTreeMap<u16, Vec<route::VirtualHost>> = BTreeMap::new();
    for svc in &model.services {
        for port in svc.ports.iter().filter(|p| !p.tcp()) {
            route_hosts
                .entry(port.port)
                .or_default()
                .push(virtual_host(model, svc, port.port, namespace, labels));
        }
    }
    let routes: Vec<route::RouteConfiguration> = route_hosts
        .into_iter()
        .map(|(port, virtual_hosts)| route::RouteConfiguration {
            name: port.to_string(),
            virtual_hosts,
            validate_clusters: Some(lumen_api::pb::google::protobuf::BoolValue { value: false }),
            ..Default::default()
        })
        .collect();
    pack_named(routes, |r| r.name.clone())
}

/// The proxy's own part: its pod's inbound clusters and listener.
#[derive(Debug, Default)]
pub struct Inbound {
    clusters: Vec<NamedResource>,
    listener: Option<NamedResource>,
}

/// The labels of the proxy's pod, if the model has it.
pub fn pod_labels<'m>(model: &'m Model, node: &ProxyNode) -> Option<&'m BTreeMap<String, String>> {
    model
        .pods
        .iter()
        .find(|p| p.meta.name == node.pod && p.meta.namespace == node.namespace)
        .map(|p| &p.meta.labels)
}

pub fn inbound(model: &Model, node: &ProxyNode) -> Inbound {
    let mut clusters = Vec::new();
    let mut listener = None;
    if let Some(pod) = model
        .pods
        .iter()
        .find(|p| p.meta.name == node.pod && p.meta.namespace == node.namespace)
    {
        let ports: BTreeSet<u16> = pod
            .container_ports
            .iter()
            .map(|p| p.container_port)
            .collect();
        for port in &ports {
            let targeting: Vec<&crate::model::ServicePort> = model
                .services
                .iter()
                .filter(|s| s.selects(pod))
                .flat_map(|s| &s.ports)
                .filter(|sp| pod.target_port(sp) == Some(*port))
                .collect();
            // HTTP/2 to the app when a service port that targets this one speaks it.
            let http2 = targeting.iter().any(|sp| sp.http2());
            // The port's protocol when every service port targeting it declares the same one.
            let declared = targeting.first().and_then(|first| {
                let p = first.declared()?;
                targeting
                    .iter()
                    .all(|sp| sp.declared() == Some(p))
                    .then_some(p)
            });
            clusters.push(inbound_cluster(pod, *port, http2, declared));
        }
        listener = Some(inbound_listener(&pod.ip.to_string(), &ports));
    }
    Inbound {
        clusters: pack_named(clusters, |c| c.name.clone()),
        listener: listener.map(|l| NamedResource::new(l.name.clone(), pack_any(l))),
    }
}

/// One proxy's resources: the shared outbound part and its namespace's routes (both behind
/// `Arc`s, so a thousand proxies hold one copy), then its own inbound part.
pub fn assemble(
    outbound: &Arc<Outbound>,
    routes: &Arc<Vec<NamedResource>>,
    inbound: Inbound,
) -> ProxyResources {
    ProxyResources {
        outbound: outbound.clone(),
        routes: routes.clone(),
        inbound_clusters: inbound.clusters,
        inbound_listener: inbound.listener,
    }
}

/// Subsets declared for a service by DestinationRules (host resolved in the rule's namespace).
pub(crate) fn subsets_of(model: &Model, svc: &Service) -> Vec<(String, BTreeMap<String, String>)> {
    let fqdn = svc.fqdn();
    model
        .destination_rules
        .iter()
        .filter(|dr| Model::fqdn(&dr.spec.host, &dr.meta.namespace) == fqdn)
        .flat_map(|dr| {
            dr.spec
                .subsets
                .iter()
                .map(|s| (s.name.clone(), s.labels.clone()))
        })
        .collect()
}

fn ads_source() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// HTTP/2 to the upstream (Envoy's `HttpProtocolOptions` with an explicit HTTP/2 config),
/// for a port that speaks it.
fn http2_options(http2: bool) -> HashMap<String, Any> {
    use lumen_api::pb::envoy::config::core::v3::Http2ProtocolOptions;
    use lumen_api::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    use lumen_api::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    if !http2 {
        return HashMap::new();
    }
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        pack_any(options),
    )])
}

/// The DestinationRule for a host (a service's FQDN), if any.
fn destination_rule_for<'m>(model: &'m Model, fqdn: &str) -> Option<&'m DestinationRuleSpec> {
    model
        .destination_rules
        .iter()
        .find(|dr| Model::fqdn(&dr.spec.host, &dr.meta.namespace) == fqdn)
        .map(|dr| &dr.spec)
}

/// The load balancer the DestinationRule for the host (a service's FQDN) chose for one
/// subset's cluster (`""`: the service's) on one port (round robin without one).
fn load_balancer_for(model: &Model, fqdn: &str, subset: &str, port: u16) -> LoadBalancer {
    destination_rule_for(model, fqdn)
        .and_then(|dr| dr.policy_for(subset, port).load_balancer)
        .unwrap_or_default()
}

/// A DestinationRule's circuit breakers and outlier detection on a cluster, as Istio writes
/// them: thresholds not given are unbounded; the consecutive-error counts given are
/// enforced (a zero count turns its kind off); success-rate ejection off; the panic
/// threshold is `minHealthPercent` (0: ejections hold until every endpoint is out).
fn resilience(c: &mut cluster::Cluster, dr: &crate::model::Policy) {
    let u32v = |v: u32| Some(UInt32Value { value: v });
    if let Some(pool) = &dr.connection_pool {
        let max = |v: Option<u32>| u32v(v.unwrap_or(u32::MAX));
        c.circuit_breakers = Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: max(pool.max_connections),
                max_pending_requests: max(pool.http1_max_pending_requests),
                max_requests: max(pool.http2_max_requests),
                max_retries: max(pool.max_retries),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(od) = &dr.outlier_detection {
        let enforcing = |v: Option<u32>| v.and_then(|n| u32v(if n > 0 { 100 } else { 0 }));
        c.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: od.consecutive_5xx_errors.and_then(u32v),
            enforcing_consecutive_5xx: enforcing(od.consecutive_5xx_errors),
            consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(u32v),
            enforcing_consecutive_gateway_failure: enforcing(od.consecutive_gateway_errors),
            interval: od.interval.map(pb_duration),
            base_ejection_time: od.base_ejection_time.map(pb_duration),
            max_ejection_percent: od.max_ejection_percent.and_then(u32v),
            enforcing_success_rate: u32v(0),
            ..Default::default()
        });
        c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(lumen_api::pb::envoy::r#type::v3::Percent {
                value: f64::from(od.min_health_percent),
            }),
            ..Default::default()
        });
    }
}

/// The route-side half of a consistent-hash load balancer (Envoy's `RouteAction.hash_policy`,
/// as Istio writes it on every route to the host): what to hash. Empty for other policies.
fn hash_policy(lb: &LoadBalancer) -> Vec<route::route_action::HashPolicy> {
    use route::route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    let LoadBalancer::ConsistentHash(ch) = lb else {
        return Vec::new();
    };
    let specifier = match &ch.key {
        HashKey::Header(name) => PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        HashKey::Cookie { name, path, ttl } => PolicySpecifier::Cookie(Cookie {
            name: name.clone(),
            path: path.clone().unwrap_or_default(),
            ttl: ttl.map(pb_duration),
            ..Default::default()
        }),
        HashKey::SourceIp => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        HashKey::QueryParameter(name) => {
            PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
        }
    };
    vec![route::route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }]
}

/// Lumen's default balancer as a cluster's `load_balancing_policy`: peak EWMA first, which
/// lumen-proxy carries out, then least request (Istio's default), where Envoy, which stops
/// at the first policy it supports, lands.
fn mesh_default_balancer() -> cluster::LoadBalancingPolicy {
    use lumen_api::pb::envoy::config::core::v3::TypedExtensionConfig;
    use lumen_api::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
    let ewma = lumen_api::peak_ewma::Settings::default().to_typed_struct();
    let policy = |name: &str, typed_config: Any| cluster::load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_string(),
            typed_config: Some(typed_config),
        }),
    };
    cluster::LoadBalancingPolicy {
        policies: vec![
            policy(
                lumen_api::peak_ewma::NAME,
                Any {
                    type_url: lumen_api::peak_ewma::TYPED_STRUCT_URL.to_string(),
                    value: prost::Message::encode_to_vec(&ewma),
                },
            ),
            policy(
                "envoy.load_balancing_policies.least_request",
                pack_any(LeastRequest {
                    choice_count: Some(UInt32Value { value: 2 }),
                    ..Default::default()
                }),
            ),
        ],
    }
}

fn eds_cluster(name: &str, http2: bool, lb: &LoadBalancer) -> cluster::Cluster {
    use cluster::cluster::{
        LbConfig, LbPolicy, LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig,
    };
    let (lb_policy, lb_config) = match lb {
        // Set in `load_balancing_policy` below, which Envoy reads in place of `lb_policy`.
        LoadBalancer::MeshDefault => (LbPolicy::RoundRobin, None),
        LoadBalancer::RoundRobin => (LbPolicy::RoundRobin, None),
        LoadBalancer::Random => (LbPolicy::Random, None),
        LoadBalancer::LeastRequest => (
            LbPolicy::LeastRequest,
            Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                choice_count: Some(UInt32Value { value: 2 }),
                ..Default::default()
            })),
        ),
        LoadBalancer::ConsistentHash(ch) => match ch.table {
            HashTable::Ring { minimum_ring_size } => (
                LbPolicy::RingHash,
                Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value {
                        value: minimum_ring_size,
                    }),
                    ..Default::default()
                })),
            ),
            HashTable::Maglev { table_size } => (
                LbPolicy::Maglev,
                Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                    table_size: Some(UInt64Value { value: table_size }),
                })),
            ),
        },
    };
    cluster::Cluster {
        name: name.to_string(),
        load_balancing_policy: matches!(lb, LoadBalancer::MeshDefault).then(mesh_default_balancer),
        typed_extension_protocol_options: http2_options(http2),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        lb_policy: lb_policy as i32,
        lb_config,
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: name.to_string(),
        }),
        ..Default::default()
    }
}

fn socket_address(ip: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// An endpoint at `ip:port`, described by the pod behind it (without one: a workload
/// without a sidecar in `namespace`, known by its address only).
fn lb_endpoint(
    ip: std::net::IpAddr,
    port: u16,
    pod: Option<&Pod>,
    namespace: &str,
) -> endpoint::LbEndpoint {
    let workload = match pod {
        Some(pod) => {
            let label = |name: &str| pod.meta.labels.get(name).cloned().unwrap_or_default();
            endpoint_meta::Workload {
                workload: Model::workload_name(pod),
                namespace: pod.meta.namespace.clone(),
                app: label("app"),
                version: label("version"),
                service_account: pod.service_account.clone(),
                inbound_port: pod.has_sidecar.then_some(ports::PROXY_INBOUND),
            }
        }
        None => endpoint_meta::Workload {
            namespace: namespace.to_string(),
            ..Default::default()
        },
    };
    let fields = [(
        endpoint_meta::FIELD.to_string(),
        string_value(&workload.pack()),
    )];
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert(
        endpoint_meta::FILTER.to_string(),
        Struct {
            fields: fields.into_iter().collect(),
        },
    );
    endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: Some(socket_address(&ip.to_string(), port)),
                ..Default::default()
            },
        )),
        metadata: Some(core::Metadata {
            filter_metadata,
            ..Default::default()
        }),
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }
}

fn load_assignment(
    endpoints: &Endpoints<'_>,
    svc: &Service,
    port: u16,
    subset_labels: &BTreeMap<String, String>,
    name: &str,
) -> endpoint::ClusterLoadAssignment {
    let Some(svc_port) = svc.ports.iter().find(|p| p.port == port) else {
        return endpoint::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            ..Default::default()
        };
    };
    let no_labels = BTreeMap::new();
    let lb_endpoints = match endpoints {
        Endpoints::Pods(pods) => pods
            .iter()
            .filter(|pod| labels_match(subset_labels, &pod.meta.labels))
            .filter_map(|pod| {
                pod.target_port(svc_port)
                    .map(|p| lb_endpoint(pod.ip, p, Some(pod), &pod.meta.namespace))
            })
            .collect(),
        Endpoints::Slices(slices) => {
            // Ready endpoints, on the slice's port of the service port's name; an address
            // two slices list (as while Kubernetes moves it) once.
            let mut seen = BTreeSet::new();
            let mut out = Vec::new();
            for (slice, pods) in slices {
                let Some(&(_, port)) = slice.ports.iter().find(|(n, _)| *n == svc_port.name) else {
                    continue;
                };
                for (e, pod) in slice.endpoints.iter().zip(pods) {
                    let labels = pod.map_or(&no_labels, |p| &p.meta.labels);
                    if !e.ready || !labels_match(subset_labels, labels) {
                        continue;
                    }
                    for ip in &e.addresses {
                        if seen.insert((*ip, port)) {
                            out.push(lb_endpoint(*ip, port, *pod, &slice.meta.namespace));
                        }
                    }
                }
            }
            out
        }
    };
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Host names a client in `client_ns` may use for the service, with and without the port.
fn domains(svc: &Service, port: u16, client_ns: &str) -> Vec<String> {
    let name = &svc.meta.name;
    let ns = &svc.meta.namespace;
    let mut hosts = vec![
        svc.fqdn(),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}"),
    ];
    if ns == client_ns {
        hosts.push(name.clone());
    }
    hosts
        .into_iter()
        .flat_map(|h| [format!("{h}:{port}"), h])
        .collect()
}

/// The VirtualService that routes a service's host for sidecars (no gateways, or `mesh`).
///
/// For clients of `client_ns` (None: the Service's own view), a route in that namespace comes
/// first. A Gateway API route in another namespace than its Service's is a consumer route
/// (GAMMA): it applies to clients of its own namespace only, before the Service's producer
/// routes.
pub(crate) fn virtual_service_for<'m>(
    model: &'m Model,
    svc: &Service,
    port: Option<u16>,
    client_ns: Option<&str>,
) -> Option<&'m VirtualService> {
    let fqdn = svc.fqdn();
    let applies = |vs: &&VirtualService| {
        (vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh"))
            && (vs.spec.ports.is_empty() || port.is_none_or(|p| vs.spec.ports.contains(&p)))
            && vs
                .spec
                .hosts
                .iter()
                .any(|h| Model::fqdn(h, &vs.meta.namespace) == fqdn)
    };
    let consumer = |vs: &VirtualService| {
        vs.kind != "VirtualService" && vs.meta.namespace != svc.meta.namespace
    };
    let client_ns = client_ns.unwrap_or(&svc.meta.namespace);
    let mut candidates = model.virtual_services.iter().filter(applies);
    candidates
        .clone()
        .find(|vs| vs.meta.namespace == client_ns)
        .or_else(|| candidates.find(|vs| !consumer(vs)))
}

fn virtual_host(
    model: &Model,
    svc: &Service,
    port: u16,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> route::VirtualHost {
    let fqdn = svc.fqdn();
    let vs = virtual_service_for(model, svc, Some(port), Some(namespace));
    let default_route = || route::Route {
        name: "default".to_string(),
        r#match: Some(prefix_match("/")),
        action: Some(route::route::Action::Route(route::RouteAction {
            hash_policy: hash_policy(&load_balancer_for(model, &fqdn, "", port)),
            retry_policy: retry_policy(None),
            ..route_action(route::route_action::ClusterSpecifier::Cluster(
                cluster_name::outbound(port, "", &fqdn),
            ))
        })),
        ..Default::default()
    };
    let routes = match vs {
        None => vec![default_route()],
        Some(vs) => {
            let mut routes = Vec::new();
            for (i, http) in vs.spec.http.iter().enumerate() {
                let name = http
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}.{}.{i}", vs.meta.name, vs.meta.namespace));
                let clusters: Vec<route::weighted_cluster::ClusterWeight> = http
                    .route
                    .iter()
                    .map(|d| {
                        let host = Model::fqdn(&d.destination.host, &vs.meta.namespace);
                        let dport = d.destination.port.as_ref().map_or(port, |p| p.number);
                        route::weighted_cluster::ClusterWeight {
                            name: cluster_name::outbound(
                                dport,
                                d.destination.subset.as_deref().unwrap_or(""),
                                &host,
                            ),
                            // A lone destination without weight takes everything (Istio's rule).
                            weight: Some(UInt32Value {
                                value: d.weight.unwrap_or(if http.route.len() == 1 {
                                    100
                                } else {
                                    0
                                }),
                            }),
                            ..header_options(&[d.headers.as_ref()]).cluster_weight()
                        }
                    })
                    .collect();
                // A lone destination is the route's cluster; its header changes follow the
                // route's own (Istio's rule).
                let lone = match http.route.as_slice() {
                    [only] => only.headers.as_ref(),
                    _ => None,
                };
                let specifier = if let [only] = clusters.as_slice() {
                    route::route_action::ClusterSpecifier::Cluster(only.name.clone())
                } else {
                    route::route_action::ClusterSpecifier::WeightedClusters(
                        route::WeightedCluster {
                            clusters,
                            ..Default::default()
                        },
                    )
                };
                // A match limited to another port, or to callers with labels this one's pod
                // has not, does not apply here; a route none of whose matches apply is left
                // out.
                let no_labels = BTreeMap::new();
                let applicable: Vec<&HttpMatchRequest> = http
                    .matches
                    .iter()
                    .filter(|m| {
                        m.port.is_none_or(|p| p == port)
                            && labels_match(&m.source_labels, labels.unwrap_or(&no_labels))
                    })
                    .collect();
                if !http.matches.is_empty() && applicable.is_empty() {
                    continue;
                }
                let matches: Vec<route::RouteMatch> = if http.matches.is_empty() {
                    vec![prefix_match("/")]
                } else {
                    applicable.into_iter().map(route_match).collect()
                };
                let per_filter: HashMap<String, Any> = http
                    .fault
                    .as_ref()
                    .map(|f| (FAULT_FILTER.to_string(), pack_any(http_fault(f))))
                    .into_iter()
                    .chain(
                        http.cors
                            .as_ref()
                            .map(|c| (CORS_FILTER.to_string(), pack_any(cors_policy(c)))),
                    )
                    .collect();
                let mut action = route_action(specifier);
                // Affinity as the first destination's DestinationRule asks (Istio's rule).
                if let Some(first) = http.route.first() {
                    let host = Model::fqdn(&first.destination.host, &vs.meta.namespace);
                    let subset = first.destination.subset.as_deref().unwrap_or("");
                    let dport = first.destination.port.as_ref().map_or(port, |p| p.number);
                    action.hash_policy =
                        hash_policy(&load_balancer_for(model, &host, subset, dport));
                }
                action.request_mirror_policies = http
                    .mirrors
                    .iter()
                    .map(|(d, percent)| route::route_action::RequestMirrorPolicy {
                        cluster: cluster_name::outbound(
                            d.port.as_ref().map_or(port, |p| p.number),
                            d.subset.as_deref().unwrap_or(""),
                            &Model::fqdn(&d.host, &vs.meta.namespace),
                        ),
                        runtime_fraction: Some(core::RuntimeFractionalPercent {
                            default_value: Some(fractional(*percent)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect();
                if let Some(rw) = &http.rewrite {
                    match &rw.path {
                        Some(PathChange::Prefix(p)) => action.prefix_rewrite = p.clone(),
                        Some(PathChange::Full(p)) => {
                            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                                pattern: Some(regex("^/.*$")),
                                substitution: p.clone(),
                            });
                        }
                        Some(PathChange::Regex {
                            pattern,
                            substitution,
                        }) => {
                            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                                pattern: Some(regex(pattern)),
                                substitution: substitution.clone(),
                            });
                        }
                        None => {}
                    }
                    action.host_rewrite_specifier = rw
                        .host
                        .clone()
                        .map(route::route_action::HostRewriteSpecifier::HostRewriteLiteral);
                }
                action.retry_policy = retry_policy(http.retries.as_ref());
                action.timeout = http.timeout.map(pb_duration);
                let headers = header_options(&[http.headers.as_ref(), lone]);
                for m in matches {
                    routes.push(route::Route {
                        name: name.clone(),
                        r#match: Some(m),
                        action: Some(match (&http.redirect, &http.direct_response) {
                            (Some(r), _) => route::route::Action::Redirect(redirect_action(r)),
                            (None, Some(d)) => {
                                route::route::Action::DirectResponse(route::DirectResponseAction {
                                    status: u32::from(d.status),
                                    body: (!d.body.is_empty()).then(|| data_source(&d.body)),
                                    ..Default::default()
                                })
                            }
                            (None, None) => route::route::Action::Route(action.clone()),
                        }),
                        typed_per_filter_config: per_filter.clone(),
                        request_headers_to_add: headers.request_add.clone(),
                        request_headers_to_remove: headers.request_remove.clone(),
                        response_headers_to_add: headers.response_add.clone(),
                        response_headers_to_remove: headers.response_remove.clone(),
                        ..Default::default()
                    });
                }
            }
            routes
        }
    };
    route::VirtualHost {
        name: format!("{fqdn}:{port}"),
        domains: domains(svc, port, namespace),
        routes,
        ..Default::default()
    }
}

/// A route's retries as Envoy's retry policy, as Istio writes it: Istio's default when the
/// route names none, none when it turns them off, and a retry avoiding the hosts already
/// tried (up to five picks).
fn retry_policy(r: Option<&crate::model::RetrySettings>) -> Option<route::RetryPolicy> {
    let r = r
        .cloned()
        .unwrap_or_else(crate::model::RetrySettings::istio_default);
    (r.attempts > 0).then(|| route::RetryPolicy {
        retry_on: r.retry_on.join(","),
        num_retries: Some(UInt32Value { value: r.attempts }),
        per_try_timeout: r.per_try_timeout.map(pb_duration),
        retriable_status_codes: r.status_codes.iter().map(|c| u32::from(*c)).collect(),
        retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
            name: lumen_api::PREVIOUS_HOSTS.to_string(),
            config_type: Some(route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                pack_any(
                    lumen_api::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate::default(),
                ),
            )),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    })
}

/// Header changes as Envoy writes them on a route or a weighted cluster.
#[derive(Default)]
struct HeaderOptions {
    request_add: Vec<core::HeaderValueOption>,
    request_remove: Vec<String>,
    response_add: Vec<core::HeaderValueOption>,
    response_remove: Vec<String>,
}

impl HeaderOptions {
    fn cluster_weight(self) -> route::weighted_cluster::ClusterWeight {
        route::weighted_cluster::ClusterWeight {
            request_headers_to_add: self.request_add,
            request_headers_to_remove: self.request_remove,
            response_headers_to_add: self.response_add,
            response_headers_to_remove: self.response_remove,
            ..Default::default()
        }
    }
}

/// Several rules' header changes, one after the other (a route's, then its lone
/// destination's, as Istio merges them).
fn header_options(rules: &[Option<&HeaderRules>]) -> HeaderOptions {
    let mut out = HeaderOptions::default();
    for r in rules.iter().flatten() {
        out.request_add.extend(headers_to_add(&r.request));
        out.request_remove.extend(r.request.remove.iter().cloned());
        out.response_add.extend(headers_to_add(&r.response));
        out.response_remove
            .extend(r.response.remove.iter().cloned());
    }
    out
}

/// One direction's sets and additions as Envoy's header options; `%` written as Envoy's
/// format strings need it (`%%`), so a value is taken as it is.
fn headers_to_add(ops: &HeaderOps) -> Vec<core::HeaderValueOption> {
    use core::header_value_option::HeaderAppendAction as A;
    let option = |(k, v): &(String, String), action: A| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: k.clone(),
            value: v.replace('%', "%%"),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    ops.set
        .iter()
        .map(|h| option(h, A::OverwriteIfExistsOrAdd))
        .chain(ops.add.iter().map(|h| option(h, A::AppendIfExistsOrAdd)))
        .collect()
}

/// A route's CORS policy as the per-route configuration of Envoy's CORS filter (as Istio
/// writes it: lists joined with commas, the max age in seconds, enabled for every request).
fn cors_policy(
    c: &crate::model::CorsPolicy,
) -> lumen_api::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy {
    use lumen_api::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use lumen_api::pb::google::protobuf::BoolValue;
    lumen_api::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy {
        allow_origin_string_match: c.allow_origins.iter().map(string_matcher).collect(),
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age.map(|s| s.to_string()).unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        filter_enabled: Some(RuntimeFractionalPercent {
            default_value: Some(fractional(100.0)),
            ..Default::default()
        }),
        forward_not_matching_preflights: (!c.forward_unmatched_preflights)
            .then_some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// A string match as Envoy's matcher (a segment-wise prefix as a plain prefix).
fn string_matcher(sm: &StringMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match sm {
            StringMatch::Exact(v) => MatchPattern::Exact(v.clone()),
            StringMatch::Prefix(v) | StringMatch::PathPrefix(v) => MatchPattern::Prefix(v.clone()),
            StringMatch::Regex(v) => MatchPattern::SafeRegex(regex(v)),
        }),
        ..Default::default()
    }
}

/// Inline bytes as Envoy's data source: a string when they are UTF-8 (readable in a config
/// dump), else bytes.
fn data_source(body: &[u8]) -> core::DataSource {
    use core::data_source::Specifier;
    core::DataSource {
        specifier: Some(match std::str::from_utf8(body) {
            Ok(s) => Specifier::InlineString(s.to_string()),
            Err(_) => Specifier::InlineBytes(body.to_vec()),
        }),
        ..Default::default()
    }
}

/// A route's redirect as Envoy's redirect action.
fn redirect_action(r: &Redirect) -> route::RedirectAction {
    use route::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    route::RedirectAction {
        host_redirect: r.host.clone().unwrap_or_default(),
        port_redirect: r.port.map_or(0, u32::from),
        response_code: match r.status {
            302 => C::Found,
            303 => C::SeeOther,
            307 => C::TemporaryRedirect,
            308 => C::PermanentRedirect,
            _ => C::MovedPermanently,
        } as i32,
        scheme_rewrite_specifier: r.scheme.clone().map(S::SchemeRedirect),
        path_rewrite_specifier: r.path.as_ref().map(|p| match p {
            PathChange::Full(p) => P::PathRedirect(p.clone()),
            PathChange::Prefix(p) => P::PrefixRewrite(p.clone()),
            PathChange::Regex {
                pattern,
                substitution,
            } => P::RegexRewrite(RegexMatchAndSubstitute {
                pattern: Some(regex(pattern)),
                substitution: substitution.clone(),
            }),
        }),
        ..Default::default()
    }
}

/// The per-route configuration key of Envoy's fault filter, and the filter itself, which every
/// outbound connection manager carries before the router (as Istio's do).
use lumen_api::{CORS_FILTER, FAULT_FILTER};

/// A std duration as protobuf's.
fn pb_duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A share of requests as Envoy takes it: parts per million.
fn fractional(percent: f64) -> lumen_api::pb::envoy::r#type::v3::FractionalPercent {
    use lumen_api::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    lumen_api::pb::envoy::r#type::v3::FractionalPercent {
        // At most 100% × 10,000: the cast cannot overflow.
        numerator: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: DenominatorType::Million as i32,
    }
}

/// A route's fault injection as Envoy's fault filter's per-route configuration.
fn http_fault(
    f: &FaultPolicy,
) -> lumen_api::pb::envoy::extensions::filters::http::fault::v3::HttpFault {
    use lumen_api::pb::envoy::extensions::filters::common::fault::v3 as common;
    use lumen_api::pb::envoy::extensions::filters::http::fault::v3 as fault;
    fault::HttpFault {
        delay: f.delay.map(|(d, percent)| common::FaultDelay {
            fault_delay_secifier: Some(common::fault_delay::FaultDelaySecifier::FixedDelay(
                pb_duration(d),
            )),
            percentage: Some(fractional(percent)),
        }),
        abort: f.abort.map(|(status, percent)| fault::FaultAbort {
            error_type: Some(fault::fault_abort::ErrorType::HttpStatus(u32::from(status))),
            percentage: Some(fractional(percent)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn route_action(specifier: route::route_action::ClusterSpecifier) -> route::RouteAction {
    route::RouteAction {
        cluster_specifier: Some(specifier),
        ..Default::default()
    }
}

fn prefix_match(prefix: &str) -> route::RouteMatch {
    route::RouteMatch {
        path_specifier: Some(route::route_match::PathSpecifier::Prefix(
            prefix.to_string(),
        )),
        ..Default::default()
    }
}

fn regex(re: &str) -> RegexMatcher {
    RegexMatcher {
        regex: re.to_string(),
        ..Default::default()
    }
}

fn route_match(m: &HttpMatchRequest) -> route::RouteMatch {
    use route::header_matcher::HeaderMatchSpecifier as H;
    use route::route_match::PathSpecifier as P;
    let path_specifier = Some(match &m.uri {
        None => P::Prefix("/".to_string()),
        Some(StringMatch::Exact(p)) => P::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => P::Prefix(p.clone()),
        Some(StringMatch::Regex(r)) => P::SafeRegex(regex(r)),
        Some(StringMatch::PathPrefix(p)) => P::PathSeparatedPrefix(p.clone()),
    });
    let header = |name: &str, sm: &StringMatch| route::HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(H::StringMatch(string_matcher(sm))),
        ..Default::default()
    };
    let mut headers: Vec<route::HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, sm)| header(name, sm))
        .collect();
    if let Some(method) = &m.method {
        headers.push(header(":method", method));
    }
    let query_parameters = m
        .query
        .iter()
        .map(|(name, sm)| route::QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(
                route::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                    string_matcher(sm),
                ),
            ),
        })
        .collect();
    route::RouteMatch {
        path_specifier,
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn http_connection_manager(
    stat_prefix: &str,
    routes: hcm::http_connection_manager::RouteSpecifier,
) -> listener::Filter {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(routes),
        http_filters: vec![
            // Both configured per route (`typed_per_filter_config`); empty here. CORS first,
            // as Istio's chain: a preflight is answered before any fault.
            hcm::HttpFilter {
                name: CORS_FILTER.to_string(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                    lumen_api::pb::envoy::extensions::filters::http::cors::v3::Cors::default(),
                ))),
                ..Default::default()
            },
            hcm::HttpFilter {
                name: FAULT_FILTER.to_string(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                    lumen_api::pb::envoy::extensions::filters::http::fault::v3::HttpFault::default(
                    ),
                ))),
                ..Default::default()
            },
            hcm::HttpFilter {
                name: "envoy.filters.http.router".to_string(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                    Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    listener::Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(manager))),
    }
}

/// A per-port outbound listener as Istio's: it carries the port's route configuration and is
/// not bound itself (`bind_to_port: false`); traffic reaches it through the outbound port.
fn outbound_listener(port: u16) -> listener::Listener {
    listener::Listener {
        name: format!("0.0.0.0_{port}"),
        address: Some(socket_address("0.0.0.0", port)),
        bind_to_port: Some(lumen_api::pb::google::protobuf::BoolValue { value: false }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![http_connection_manager(
                &format!("outbound_0.0.0.0_{port}"),
                hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
                    config_source: Some(ads_source()),
                    route_config_name: port.to_string(),
                }),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An outbound TCP listener: Envoy's TCP proxy to one cluster, not bound itself.
fn tcp_listener(name: &str, ip: &str, port: u16, cluster: &str) -> listener::Listener {
    use lumen_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier,
    };
    let proxy = TcpProxy {
        stat_prefix: cluster.to_string(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    listener::Listener {
        name: name.to_string(),
        address: Some(socket_address(ip, port)),
        bind_to_port: Some(lumen_api::pb::google::protobuf::BoolValue { value: false }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.tcp_proxy".to_string(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn inbound_cluster(pod: &Pod, port: u16, http2: bool, declared: Option<&str>) -> cluster::Cluster {
    let name = cluster_name::inbound(port);
    // The declared protocol, so the sidecar does not guess it from the first bytes.
    let metadata = declared.map(|p| {
        let fields = [(
            lumen_api::cluster_meta::PROTOCOL.to_string(),
            string_value(p),
        )];
        core::Metadata {
            filter_metadata: [(
                lumen_api::cluster_meta::FILTER.to_string(),
                Struct {
                    fields: fields.into_iter().collect(),
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    });
    cluster::Cluster {
        name: name.clone(),
        metadata,
        typed_extension_protocol_options: http2_options(http2),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: Some(socket_address(&pod.ip.to_string(), port)),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sidecar's inbound listener, on the pod's own address (Lumen does not bind 0.0.0.0).
fn inbound_listener(pod_ip: &str, app_ports: &BTreeSet<u16>) -> listener::Listener {
    let routes = app_ports
        .iter()
        .map(|port| route::Route {
            name: format!("inbound|{port}"),
            r#match: Some(prefix_match("/")),
            action: Some(route::route::Action::Route(route_action(
                route::route_action::ClusterSpecifier::Cluster(cluster_name::inbound(*port)),
            ))),
            ..Default::default()
        })
        .collect();
    let config = route::RouteConfiguration {
        name: "inbound|http".to_string(),
        virtual_hosts: vec![route::VirtualHost {
            name: "inbound|http".to_string(),
            domains: vec!["*".to_string()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: "virtualInbound".to_string(),
        address: Some(socket_address(pod_ip, ports::PROXY_INBOUND)),
        filter_chains: vec![listener::FilterChain {
            filters: vec![http_connection_manager(
                "inbound_0.0.0.0_15006",
                hcm::http_connection_manager::RouteSpecifier::RouteConfig(config),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn demo_model() -> Model {
        let mut model = Model::from_yaml(
            "bookinfo",
            include_str!("../../fixtures/demo/bookinfo.yaml"),
        )
        .expect("demo parses");
        model
            .add_yaml("routing", include_str!("../../fixtures/demo/routing.yaml"))
            .expect("routing parses");
        model
    }

    fn node() -> ProxyNode {
        ProxyNode::parse("sidecar~127.0.10.1~productpage-v1.default~default.svc.cluster.local")
            .expect("node id parses")
    }

    #[test]
    fn node_ids_parse_like_istio() {
        let n = node();
        assert_eq!(
            (n.ip.as_str(), n.pod.as_str(), n.namespace.as_str()),
            ("127.0.10.1", "productpage-v1", "default")
        );
        assert!(ProxyNode::parse("router~1.2.3.4~x.y~y.svc.cluster.local").is_err());
        assert!(ProxyNode::parse("sidecar~1.2.3.4~nonamespace~z").is_err());
    }

    #[test]
    fn grpc_ports_get_http2_upstream_clusters_on_both_sides() {
        let mut model = demo_model();
        for svc in &mut model.services {
            if svc.meta.name == "reviews" {
                svc.ports[0].name = "grpc-reviews".into();
            }
        }
        // reviews-v1's sidecar: its inbound cluster goes HTTP/2 too.
        let reviews =
            ProxyNode::parse("sidecar~127.0.10.3~reviews-v1.default~default.svc.cluster.local")
                .expect("node id parses");
        let res = translate(&model, &reviews);
        let h2 = |name: &str| {
            res.of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == name)
                .map(|r| {
                    cluster::Cluster::decode(r.any().value.as_slice())
                        .expect("cluster")
                        .typed_extension_protocol_options
                        .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
                })
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert!(h2("outbound|9080|v1|reviews.default.svc.cluster.local"));
        assert!(h2("inbound|9080||"));
        assert!(!h2("outbound|9080||ratings.default.svc.cluster.local"));
        let port = |name: &str, app: Option<&str>| crate::model::ServicePort {
            name: name.into(),
            port: 1,
            target_port: None,
            protocol: None,
            app_protocol: app.map(Into::into),
        };
        assert!(port("grpc", None).http2());
        assert!(port("http2-api", None).http2());
        assert!(!port("http", None).http2());
        assert!(!port("grpcish", None).http2());
        assert!(port("web", Some("kubernetes.io/h2c")).http2());
        assert!(!port("grpc", Some("http")).http2(), "appProtocol wins");
        assert!(port("https", None).tcp() && port("web", Some("HTTPS")).tcp());
        assert!(!port("https", None).http2() && !port("http", None).tcp());
    }

    #[test]
    fn inbound_clusters_say_the_protocol_their_services_declare() {
        use lumen_api::cluster_meta::{FILTER, HTTP, PROTOCOL, TCP};
        let declared_by = |port_name: &str| {
            let mut model = demo_model();
            for svc in &mut model.services {
                if svc.meta.name == "reviews" {
                    svc.ports[0].name = port_name.into();
                }
            }
            let reviews =
                ProxyNode::parse("sidecar~127.0.10.3~reviews-v1.default~default.svc.cluster.local")
                    .expect("node id parses");
            let res = translate(&model, &reviews);
            let c = res
                .of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == "inbound|9080||")
                .map(|r| cluster::Cluster::decode(r.any().value.as_slice()).expect("cluster"))
                .expect("inbound cluster");
            c.metadata
                .and_then(|m| m.filter_metadata.get(FILTER).cloned())
                .and_then(|s| s.fields.get(PROTOCOL).cloned())
                .and_then(|v| match v.kind {
                    Some(lumen_api::pb::google::protobuf::value::Kind::StringValue(p)) => Some(p),
                    _ => None,
                })
        };
        // Bookinfo names its ports `http`: the sidecar need not sniff them.
        assert_eq!(declared_by("http").as_deref(), Some(HTTP));
        assert_eq!(declared_by("grpc-web").as_deref(), Some(HTTP));
        assert_eq!(declared_by("mysql").as_deref(), Some(TCP));
        // TLS the app speaks itself (Istio's HTTPS and TLS protocols) goes through as TCP,
        // on the outbound side too: a TCP listener for the port, no HTTP route table.
        assert_eq!(declared_by("https").as_deref(), Some(TCP));
        assert_eq!(declared_by("tls-api").as_deref(), Some(TCP));
        let mut model = demo_model();
        model.services.retain(|s| s.meta.name == "reviews");
        model.services[0].ports[0].name = "https".into();
        model.services[0].cluster_ip = Some("10.96.0.9".parse().expect("ip"));
        let res = translate(&model, &node());
        let names =
            |ty: &str| -> Vec<String> { res.of_type(ty).iter().map(|r| r.name.clone()).collect() };
        assert!(names(type_url::LISTENER).contains(&"10.96.0.9_9080".to_string()));
        assert!(!names(type_url::ROUTE).contains(&"9080".to_string()));
        // A name that says nothing: detected from the first bytes.
        assert_eq!(declared_by("web"), None);
    }

    #[test]
    fn a_destination_rule_s_simple_load_balancer_reaches_every_cluster_of_its_service() {
        let mut model = demo_model();
        model
            .add_yaml(
                "lb.yaml",
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings}\nspec:\n  host: ratings\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}\n",
            )
            .expect("a DestinationRule with RANDOM");
        let res = translate(&model, &node());
        let lb = |name: &str| {
            res.of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == name)
                .map(|r| {
                    cluster::Cluster::decode(r.any().value.as_slice())
                        .expect("cluster")
                        .lb_policy
                })
        };
        let random = cluster::cluster::LbPolicy::Random as i32;
        assert_eq!(
            lb("outbound|9080||ratings.default.svc.cluster.local"),
            Some(random)
        );
        // Without one: Lumen's default, peak EWMA for lumen-proxy, least request after it
        // for clients that do not know it.
        let policies = |name: &str| -> Vec<String> {
            res.of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == name)
                .and_then(|r| {
                    cluster::Cluster::decode(r.any().value.as_slice())
                        .expect("cluster")
                        .load_balancing_policy
                })
                .map(|p| {
                    p.policies
                        .iter()
                        .filter_map(|p| p.typed_extension_config.as_ref())
                        .map(|t| t.name.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            policies("outbound|9080||reviews.default.svc.cluster.local"),
            [
                lumen_api::peak_ewma::NAME,
                "envoy.load_balancing_policies.least_request"
            ]
        );
        assert!(policies("outbound|9080||ratings.default.svc.cluster.local").is_empty());
    }

    #[test]
    fn a_subset_s_and_a_port_s_own_policies_reach_their_clusters() {
        let mut model = demo_model();
        // This rule in place of the demo's for reviews.
        model.destination_rules.retain(|d| d.meta.name != "reviews");
        model
            .add_yaml(
                "lb.yaml",
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}, connectionPool: {tcp: {maxConnections: 7}}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n  - name: v3\n    labels: {version: v3}\n    trafficPolicy: {portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: LEAST_REQUEST}}]}\n",
            )
            .expect("a DestinationRule with subset policies");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        let res = translate(&model, &node());
        let cluster = |subset: &str| {
            let name = format!("outbound|9080|{subset}|reviews.default.svc.cluster.local");
            res.of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == name)
                .map(|r| cluster::Cluster::decode(r.any().value.as_slice()).expect("cluster"))
                .unwrap_or_else(|| panic!("no cluster {name}"))
        };
        use cluster::cluster::LbPolicy;
        let max_connections = |c: &cluster::Cluster| {
            c.circuit_breakers
                .as_ref()
                .and_then(|cb| cb.thresholds.first())
                .and_then(|t| t.max_connections.as_ref())
                .map(|v| v.value)
        };
        // The rule's settings: the service's cluster and a subset without its own.
        for subset in ["", "v1"] {
            let c = cluster(subset);
            assert_eq!(c.lb_policy, LbPolicy::Random as i32, "{subset}");
            assert_eq!(max_connections(&c), Some(7), "{subset}");
        }
        // A subset's load balancer over the rule's pool.
        let v2 = cluster("v2");
        assert_eq!(v2.lb_policy, LbPolicy::RingHash as i32);
        assert_eq!(max_connections(&v2), Some(7));
        // A subset's port-level settings replace everything for the port: no pool.
        let v3 = cluster("v3");
        assert_eq!(v3.lb_policy, LbPolicy::LeastRequest as i32);
        assert_eq!(max_connections(&v3), None);
    }

    #[test]
    fn the_same_model_translates_to_the_same_bytes() {
        // Maps of several entries encode in a random order: none may reach a resource, or
        // every push would carry everything again (delta xDS) under a new version.
        let model = demo_model();
        let bytes = |res: &ProxyResources| {
            [
                type_url::CLUSTER,
                type_url::ENDPOINT,
                type_url::LISTENER,
                type_url::ROUTE,
            ]
            .iter()
            .flat_map(|t| res.of_type(t))
            .map(|r| (r.name.clone(), r.any().value))
            .collect::<Vec<_>>()
        };
        let first = bytes(&translate(&model, &node()));
        for _ in 0..5 {
            assert_eq!(bytes(&translate(&model.clone(), &node())), first);
        }
    }

    #[test]
    fn consistent_hash_and_least_request_reach_clusters_and_routes() {
        let mut model = demo_model();
        model
            .add_yaml(
                "lb.yaml",
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ratings}\nspec:\n  host: ratings\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User, maglev: {tableSize: 251}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details}\nspec:\n  host: details\n  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage}\nspec:\n  host: productpage\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, ttl: 0s}}}}\n",
            )
            .expect("DestinationRules");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        let res = translate(&model, &node());
        let cluster_named = |name: &str| {
            res.of_type(type_url::CLUSTER)
                .iter()
                .find(|r| r.name == name)
                .map(|r| cluster::Cluster::decode(r.any().value.as_slice()).expect("cluster"))
                .expect(name)
        };
        use cluster::cluster::{LbConfig, LbPolicy};
        let ratings = cluster_named("outbound|9080||ratings.default.svc.cluster.local");
        assert_eq!(ratings.lb_policy, LbPolicy::Maglev as i32);
        assert!(matches!(
            ratings.lb_config,
            Some(LbConfig::MaglevLbConfig(ref m)) if m.table_size.as_ref().map(|v| v.value) == Some(251)
        ));
        let details = cluster_named("outbound|9080||details.default.svc.cluster.local");
        assert_eq!(details.lb_policy, LbPolicy::LeastRequest as i32);
        let productpage = cluster_named("outbound|9080||productpage.default.svc.cluster.local");
        assert_eq!(productpage.lb_policy, LbPolicy::RingHash as i32);
        // The routes to ratings hash its header; to productpage, its cookie (made up, a
        // session cookie); to details, nothing.
        use route::route_action::hash_policy::PolicySpecifier as P;
        let rc = routes_9080(&res);
        let policy_of = |vhost: &str| {
            let vh = rc
                .virtual_hosts
                .iter()
                .find(|v| v.name.starts_with(vhost))
                .expect(vhost);
            match &vh.routes[0].action {
                Some(route::route::Action::Route(a)) => a.hash_policy.clone(),
                other => panic!("{other:?}"),
            }
        };
        assert!(matches!(
            policy_of("ratings").first().and_then(|p| p.policy_specifier.clone()),
            Some(P::Header(h)) if h.header_name == "x-user"
        ));
        assert!(matches!(
            policy_of("productpage").first().and_then(|p| p.policy_specifier.clone()),
            Some(P::Cookie(c)) if c.name == "s" && c.ttl.as_ref().is_some_and(|t| t.seconds == 0)
        ));
        assert!(policy_of("details").is_empty());
    }

    #[test]
    fn a_route_s_timeout_reaches_its_route_action() {
        let mut model = demo_model();
        model
            .add_yaml(
                "timeout.yaml",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http: [{timeout: 1.5s, route: [{destination: {host: ratings}}]}]\n",
            )
            .expect("a VirtualService with a timeout");
        let rc = routes_9080(&translate(&model, &node()));
        let timeout = rc
            .virtual_hosts
            .iter()
            .find(|vh| vh.name.starts_with("ratings."))
            .and_then(|vh| vh.routes.first())
            .and_then(|r| match &r.action {
                Some(route::route::Action::Route(a)) => a.timeout,
                _ => None,
            });
        assert_eq!(
            timeout,
            Some(Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
    }

    #[test]
    fn an_httproute_for_a_service_becomes_its_routes_with_segment_prefixes() {
        let mut model = demo_model();
        model
            .add_yaml(
                "route.yaml",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ratings-split}\nspec:\n  parentRefs: [{group: '', kind: Service, name: ratings, port: 9080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v2}, method: POST}]\n    backendRefs: [{name: details, port: 9080}]\n  - backendRefs: [{name: ratings, port: 9080}]\n",
            )
            .expect("an HTTPRoute");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        let rc = routes_9080(&translate(&model, &node()));
        let ratings = rc
            .virtual_hosts
            .iter()
            .find(|vh| vh.name.starts_with("ratings."))
            .expect("ratings");
        let first = ratings.routes[0].r#match.clone().expect("match");
        assert_eq!(
            first.path_specifier,
            Some(route::route_match::PathSpecifier::PathSeparatedPrefix(
                "/v2".into()
            ))
        );
        assert_eq!(first.headers[0].name, ":method");
        assert!(matches!(
            &ratings.routes[0].action,
            Some(route::route::Action::Route(a)) if a.cluster_specifier
                == Some(route::route_action::ClusterSpecifier::Cluster(
                    "outbound|9080||details.default.svc.cluster.local".into()
                ))
        ));
    }

    /// The route configuration for port 9080 in `res`.
    fn routes_9080(res: &ProxyResources) -> route::RouteConfiguration {
        res.of_type(type_url::ROUTE)
            .iter()
            .find(|r| r.name == "9080")
            .map(|r| route::RouteConfiguration::decode(r.any().value.as_slice()).expect("rds"))
            .expect("9080")
    }

    #[test]
    fn clusters_cover_services_and_subsets() {
        let res = translate(&demo_model(), &node());
        let names: BTreeSet<&str> = res
            .of_type(type_url::CLUSTER)
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        for expected in [
            "outbound|9080||productpage.default.svc.cluster.local",
            "outbound|9080||reviews.default.svc.cluster.local",
            "outbound|9080|v1|reviews.default.svc.cluster.local",
            "outbound|9080|v2|reviews.default.svc.cluster.local",
            "outbound|9080||ratings.default.svc.cluster.local",
            "inbound|9080||",
        ] {
            assert!(names.contains(expected), "missing {expected} in {names:?}");
        }
        assert_eq!(names.len(), 7);
    }

    #[test]
    fn subset_endpoints_are_filtered_by_labels() {
        let res = translate(&demo_model(), &node());
        let v2 = res
            .of_type(type_url::ENDPOINT)
            .into_iter()
            .find(|r| r.name == "outbound|9080|v2|reviews.default.svc.cluster.local")
            .expect("v2 endpoints");
        let cla =
            endpoint::ClusterLoadAssignment::decode(v2.any().value.as_slice()).expect("decodes");
        let eps = &cla.endpoints[0].lb_endpoints;
        assert_eq!(eps.len(), 1);
        let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &eps[0].host_identifier
        else {
            panic!("endpoint expected");
        };
        assert_eq!(ep.address, Some(socket_address("127.0.10.4", 9080)));
        let meta =
            &eps[0].metadata.as_ref().expect("metadata").filter_metadata[endpoint_meta::FILTER];
        let Some(Kind::StringValue(packed)) = &meta.fields[endpoint_meta::FIELD].kind else {
            panic!("a packed workload: {meta:?}");
        };
        assert_eq!(
            endpoint_meta::Workload::unpack(packed).workload,
            "reviews-v2"
        );
    }

    #[test]
    fn endpoint_slices_give_a_service_s_ready_endpoints_on_their_own_port() {
        let mut model = demo_model();
        // reviews' slices: v1 ready, v2 not, v3 at another address, one endpoint without a
        // pod, and an address two slices share; the pods' selector no longer decides.
        model
            .add_yaml(
                "slices.yaml",
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints:\n- {addresses: [10.1.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1}}\n- {addresses: [10.1.0.2], conditions: {ready: false}, targetRef: {kind: Pod, name: reviews-v2}}\n- {addresses: [10.1.0.3], targetRef: {kind: Pod, name: reviews-v3}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-2, namespace: default, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints:\n- {addresses: [10.1.0.3]}\n- {addresses: [10.1.0.9]}\n",
            )
            .expect("slices");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        let res = translate(&model, &node());
        let addresses = |cluster: &str| -> Vec<String> {
            let r = res
                .of_type(type_url::ENDPOINT)
                .into_iter()
                .find(|r| r.name == cluster)
                .unwrap_or_else(|| panic!("{cluster}"));
            let cla =
                endpoint::ClusterLoadAssignment::decode(r.any().value.as_slice()).expect("decodes");
            cla.endpoints[0]
                .lb_endpoints
                .iter()
                .filter_map(|e| match &e.host_identifier {
                    Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                        match ep.address.as_ref()?.address.as_ref()? {
                            core::address::Address::SocketAddress(sa) => {
                                Some(format!("{}:{:?}", sa.address, sa.port_specifier))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect()
        };
        let at = |ip: &str| format!("{ip}:Some(PortValue(9090))");
        assert_eq!(
            addresses("outbound|9080||reviews.default.svc.cluster.local"),
            [at("10.1.0.1"), at("10.1.0.3"), at("10.1.0.9")]
        );
        // Subsets select on the labels of the pod behind each endpoint.
        assert_eq!(
            addresses("outbound|9080|v1|reviews.default.svc.cluster.local"),
            [at("10.1.0.1")]
        );
        assert!(addresses("outbound|9080|v2|reviews.default.svc.cluster.local").is_empty());
        // A slice without its Service label is refused by name.
        let mut bad = Model::default();
        bad.add_yaml(
            "bad.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan}\naddressType: FQDN\nendpoints: []\n",
        )
        .expect("read");
        assert!(
            bad.rejected[0]
                .reason
                .contains("kubernetes.io/service-name"),
            "{:?}",
            bad.rejected
        );
    }

    #[test]
    fn source_label_and_port_matches_apply_to_their_callers_and_port_only() {
        let mut model = demo_model();
        model.virtual_services.retain(|v| v.meta.name != "reviews");
        model
            .add_yaml(
                "vs.yaml",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - name: from-productpage\n    match: [{sourceLabels: {app: productpage}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - name: other-port\n    match: [{port: 9999}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - name: rest\n    route: [{destination: {host: reviews, subset: v1}}]\n",
            )
            .expect("a VirtualService");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        assert!(model.uses_source_labels());
        let route_names = |res: &ProxyResources| -> Vec<String> {
            let rc = routes_9080(res);
            let vh = rc
                .virtual_hosts
                .iter()
                .find(|v| v.name.starts_with("reviews."))
                .expect("reviews");
            vh.routes.iter().map(|r| r.name.clone()).collect()
        };
        // productpage's sidecar (its pod labelled app: productpage) gets the route for it;
        // reviews' own sidecar does not; neither gets the route of another port.
        assert_eq!(
            route_names(&translate(&model, &node())),
            ["from-productpage", "rest"]
        );
        let reviews =
            ProxyNode::parse("sidecar~127.0.10.3~reviews-v1.default~default.svc.cluster.local")
                .expect("node");
        assert_eq!(route_names(&translate(&model, &reviews)), ["rest"]);
    }

    #[test]
    fn a_consumer_route_applies_to_its_own_namespace_s_clients_only() {
        let mut model = demo_model();
        // A producer route for details (header x-producer), and a consumer route from the
        // `shop` namespace (header x-consumer) sending details' traffic on to details.
        model
            .add_yaml(
                "routes.yaml",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: details, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: details}]\n  rules:\n  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-producer, value: '1'}]}}]\n    backendRefs: [{name: details, port: 9080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: details-from-shop, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: details, namespace: default}]\n  rules:\n  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-consumer, value: '1'}]}}]\n    backendRefs: [{name: details, namespace: default, port: 9080}]\n",
            )
            .expect("routes");
        model.check();
        assert!(model.rejected.is_empty(), "{:?}", model.rejected);
        let header_for = |namespace: &str| -> Vec<String> {
            let routes = routes(&model, namespace, None);
            let rc = routes
                .iter()
                .find(|r| r.name == "9080")
                .map(|r| route::RouteConfiguration::decode(r.any().value.as_slice()).expect("rc"))
                .expect("9080");
            let vh = rc
                .virtual_hosts
                .iter()
                .find(|v| v.name.starts_with("details."))
                .expect("details");
            vh.routes[0]
                .request_headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref().map(|h| h.key.clone()))
                .collect()
        };
        assert_eq!(header_for("shop"), ["x-consumer"]);
        assert_eq!(header_for("default"), ["x-producer"]);
        assert_eq!(header_for("elsewhere"), ["x-producer"]);
    }

    #[test]
    fn virtual_service_becomes_weighted_route() {
        let res = translate(&demo_model(), &node());
        let rc = res
            .of_type(type_url::ROUTE)
            .into_iter()
            .find(|r| r.name == "9080")
            .expect("route 9080");
        let rc = route::RouteConfiguration::decode(rc.any().value.as_slice()).expect("decodes");
        let vh = rc
            .virtual_hosts
            .iter()
            .find(|vh| vh.name == "reviews.default.svc.cluster.local:9080")
            .expect("reviews vhost");
        assert!(vh.domains.contains(&"reviews:9080".to_string()));
        let Some(route::route::Action::Route(action)) = &vh.routes[0].action else {
            panic!("route action expected");
        };
        let Some(route::route_action::ClusterSpecifier::WeightedClusters(wc)) =
            &action.cluster_specifier
        else {
            panic!("weighted clusters expected");
        };
        let split: Vec<(&str, u32)> = wc
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.as_ref().map_or(0, |w| w.value)))
            .collect();
        assert_eq!(
            split,
            vec![
                ("outbound|9080|v1|reviews.default.svc.cluster.local", 50),
                ("outbound|9080|v2|reviews.default.svc.cluster.local", 50)
            ]
        );
    }

    #[test]
    fn short_names_only_for_same_namespace_clients() {
        let model = demo_model();
        let other = ProxyNode {
            namespace: "other".into(),
            ..node()
        };
        let svc = &model.services[0];
        assert!(domains(svc, 9080, "default").contains(&"productpage".to_string()));
        assert!(!domains(svc, 9080, &other.namespace).contains(&"productpage".to_string()));
    }

    #[test]
    fn unknown_node_gets_no_inbound() {
        let other = ProxyNode {
            pod: "ghost".into(),
            ..node()
        };
        let res = translate(&demo_model(), &other);
        assert!(
            res.of_type(type_url::LISTENER)
                .iter()
                .all(|l| l.name != "virtualInbound")
        );
    }
}
