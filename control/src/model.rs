//! The control plane's resource model: the Kubernetes objects Lumen reads (Services, Pods,
//! Istio VirtualService and DestinationRule), parsed from YAML into plain Rust types.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything the translator needs, already parsed and validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    /// Services' endpoints as Kubernetes tracks them; a Service with slices takes its
    /// endpoints from them, one without from the pods its selector picks.
    pub endpoint_slices: Vec<EndpointSlice>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    /// Resources refused, each with why: they are not in the model, and the rest of the
    /// configuration applies without them.
    pub rejected: Vec<Rejection>,
}

/// A resource refused: where it came from, which it is, and why (with the field path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    pub origin: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} {}/{}: {}",
            self.origin, self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// Where an object came from and who it is, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    /// The file (or text) the object was read from, for messages about it.
    #[serde(skip)]
    pub origin: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub meta: ObjectMeta,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// `spec.clusterIP`, when the Service has one (not headless): a captured connection to
    /// it on a TCP port goes to this service.
    pub cluster_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// Whether the port speaks HTTP/2 (gRPC included), by Istio's protocol selection: its
    /// `appProtocol`, else its name's prefix (`grpc`, `grpc-web`, `http2`, `grpc-api`...).
    pub fn http2(&self) -> bool {
        self.protocol_is(&["grpc", "grpc-web", "http2", "h2c", "kubernetes.io/h2c"])
    }

    /// Whether the port carries opaque TCP, by Istio's protocol selection (`appProtocol`, else
    /// the name's prefix): `tcp`, `tls` and `https` (TLS the application speaks itself, which
    /// a proxy without its keys can only pass on), and those Istio proxies as TCP (`mongo`,
    /// `mysql`, `redis`). Any other port is HTTP, as before.
    pub fn tcp(&self) -> bool {
        self.protocol_is(&["tcp", "tls", "https", "mongo", "mysql", "redis"])
    }

    /// The protocol the port declares, for a sidecar's inbound port: HTTP (HTTP/1, HTTP/2 and
    /// gRPC), opaque TCP, or none (`None`: the sidecar detects it).
    pub fn declared(&self) -> Option<&'static str> {
        use lumen_api::cluster_meta::{HTTP, TCP};
        if self.tcp() {
            Some(TCP)
        } else if self.http2() || self.protocol_is(&["http"]) {
            Some(HTTP)
        } else {
            None
        }
    }

    /// `appProtocol` (or, without one, the name's prefix before `-`) is one of `names`.
    fn protocol_is(&self, names: &[&str]) -> bool {
        let p = match &self.app_protocol {
            Some(p) => p.to_ascii_lowercase(),
            None => self
                .name
                .split('-')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        };
        names.contains(&p.as_str())
    }
}

/// `targetPort` is either a number or the name of a container port.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub meta: ObjectMeta,
    pub ip: IpAddr,
    pub service_account: String,
    pub container_ports: Vec<ContainerPort>,
    /// False when `sidecar.istio.io/inject: "false"` says the pod has no sidecar.
    pub has_sidecar: bool,
}

/// An EndpointSlice (`discovery.k8s.io/v1`): part of a Service's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSlice {
    pub meta: ObjectMeta,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: String,
    /// Port names (the Service port's name; empty for an unnamed one) and numbers.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset: ready, as Kubernetes says to read it).
    pub ready: bool,
    /// The pod behind it (`targetRef` of kind Pod), whose labels subsets select on.
    pub pod: Option<String>,
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub meta: ObjectMeta,
    pub spec: VirtualServiceSpec,
    /// What the user wrote: `VirtualService`, or `HTTPRoute` (Gateway API in the mesh).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// The service ports the routes apply to; empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Fault injection on this route.
    #[serde(skip)]
    pub fault: Option<FaultPolicy>,
    /// How long the upstream gets to answer (zero: no limit).
    #[serde(skip)]
    pub timeout: Option<std::time::Duration>,
    #[serde(skip)]
    pub retries: Option<RetrySettings>,
    /// Header changes on the request and the response.
    #[serde(skip)]
    pub headers: Option<HeaderRules>,
    /// Answer with a redirect instead of a destination.
    #[serde(skip)]
    pub redirect: Option<Redirect>,
    /// Answer with a fixed response instead of a destination.
    #[serde(skip)]
    pub direct_response: Option<DirectResponse>,
    /// Cross-origin requests' policy.
    #[serde(skip)]
    pub cors: Option<CorsPolicy>,
    /// Change the request's path or host on its way to the destination.
    #[serde(skip)]
    pub rewrite: Option<Rewrite>,
    /// Where copies of a percentage of the requests go (answers thrown away).
    #[serde(skip)]
    pub mirrors: Vec<(Destination, f64)>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Query parameter name to match.
    #[serde(skip)]
    pub query: BTreeMap<String, StringMatch>,
    /// The service port the request is for (the route applies on that port only).
    #[serde(skip)]
    pub port: Option<u16>,
    /// Labels the calling workload's pod has (the route applies to those clients only).
    #[serde(skip)]
    pub source_labels: BTreeMap<String, String>,
}

/// A route's cross-origin resource sharing policy (Istio's `corsPolicy`).
#[derive(Debug, Clone, PartialEq)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    /// Lowercase header names.
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    /// Whole seconds.
    pub max_age: Option<u64>,
    pub allow_credentials: Option<bool>,
    /// A preflight from an origin not allowed goes upstream (Istio's `FORWARD`, the default)
    /// or is answered without CORS headers (`IGNORE`).
    pub forward_unmatched_preflights: bool,
}

/// A fixed response a route answers with.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectResponse {
    /// 200 to 599.
    pub status: u16,
    /// At most [`lumen_api::MAX_DIRECT_RESPONSE_BODY`] bytes.
    pub body: Vec<u8>,
}

/// A redirect a route answers with: each part replaces the request's own when set.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A rewrite of a request on its way upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub path: Option<PathChange>,
    pub host: Option<String>,
}

/// A new path: the whole of it, or in place of what the route's prefix matched.
#[derive(Debug, Clone, PartialEq)]
pub enum PathChange {
    Full(String),
    Prefix(String),
    /// Every match of `pattern` in the path replaced by `substitution` (`\1`: a group).
    Regex {
        pattern: String,
        substitution: String,
    },
}

/// Header changes in one direction (names lower case): removed, then set, then added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
}

/// A route's header changes (Istio's `Headers`, Gateway API's header modifier filters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

/// A route's retries (Istio's `HTTPRetry`): how many after the first try, each try's time,
/// and on what (Envoy's `retry_on` conditions, and status codes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetrySettings {
    /// Retries after the first try (0: retries off).
    pub attempts: u32,
    pub per_try_timeout: Option<std::time::Duration>,
    pub retry_on: Vec<String>,
    pub status_codes: Vec<u16>,
}

impl RetrySettings {
    /// What a route that names no retries gets, as Istio gives it: two retries on a failed
    /// connection, a refused stream, gRPC's unavailable and cancelled, and 503.
    pub fn istio_default() -> RetrySettings {
        RetrySettings {
            attempts: 2,
            per_try_timeout: None,
            retry_on: [
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes",
            ]
            .map(String::from)
            .to_vec(),
            status_codes: vec![503],
        }
    }
}

/// A route's fault injection (Istio's `HTTPFaultInjection`): a fixed delay and an abort
/// status, each for a percentage of requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPolicy {
    pub delay: Option<(std::time::Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// Istio's `StringMatch`: exactly one of exact, prefix, regex.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    /// A path and what is below it, segment-wise (Gateway API's `PathPrefix`).
    PathPrefix(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Header changes for requests to this destination and its responses.
    #[serde(skip)]
    pub headers: Option<HeaderRules>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    pub meta: ObjectMeta,
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// `trafficPolicy`: for every subset and port, unless they have their own.
    #[serde(skip)]
    pub traffic_policy: Option<TrafficPolicy>,
}

impl DestinationRuleSpec {
    /// The settings for one subset's cluster (`""`: the whole service's) on one port, merged
    /// as Istio merges them: the rule's, or its port-level ones for the port (which replace
    /// them whole); then each setting the subset's policy has (its port-level ones for the
    /// port replacing every setting, given or not).
    pub fn policy_for(&self, subset: &str, port: u16) -> Policy {
        let (mut merged, _) = self
            .traffic_policy
            .as_ref()
            .map(|p| p.for_port(port))
            .unwrap_or_default();
        let Some(own) = self
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.traffic_policy.as_ref())
        else {
            return merged;
        };
        let (own, whole) = own.for_port(port);
        if own.load_balancer.is_some() || whole {
            merged.load_balancer = own.load_balancer;
        }
        if own.connection_pool.is_some() || whole {
            merged.connection_pool = own.connection_pool;
        }
        if own.outlier_detection.is_some() || whole {
            merged.outlier_detection = own.outlier_detection;
        }
        merged
    }
}

/// A traffic policy's settings (Istio's `TrafficPolicy` without its port-level list, or one
/// entry of that list).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub load_balancer: Option<LoadBalancer>,
    /// `connectionPool`: circuit breakers.
    pub connection_pool: Option<ConnectionPool>,
    /// `outlierDetection`: ejection of endpoints that keep failing.
    pub outlier_detection: Option<OutlierDetection>,
}

/// A traffic policy: its settings, and the settings of the ports that have their own
/// (`portLevelSettings`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    pub settings: Policy,
    pub ports: Vec<(u16, Policy)>,
}

impl TrafficPolicy {
    /// The settings on `port`: the port's own, which replace the policy's whole (Istio's
    /// rule: nothing is inherited), and whether the port had its own.
    pub fn for_port(&self, port: u16) -> (Policy, bool) {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((_, own)) => (own.clone(), true),
            None => (self.settings.clone(), false),
        }
    }
}

/// Circuit-breaker thresholds (each unset one is unbounded, as Istio writes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

/// Outlier detection as written (unset fields take Envoy's defaults in the proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<std::time::Duration>,
    pub base_ejection_time: Option<std::time::Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: u32,
}

/// How the proxies pick an endpoint of the service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LoadBalancer {
    /// None chosen (`simple` unset or UNSPECIFIED): Lumen's default, peak EWMA in
    /// lumen-proxy, least request (Istio's default) in any other client.
    #[default]
    MeshDefault,
    RoundRobin,
    Random,
    /// The less loaded of two endpoints drawn at random (Envoy's LEAST_REQUEST).
    LeastRequest,
    /// Session affinity: a hash of something in the request picks the endpoint.
    ConsistentHash(ConsistentHash),
}

/// `loadBalancer.consistentHash`: what is hashed, and onto which table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub table: HashTable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    /// A cookie; with a time to live, the proxy makes one up for a request that has none and
    /// sets it on the response (a zero TTL: a session cookie).
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<std::time::Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    /// A ring of hashed endpoint points (Envoy's RING_HASH), at least this many.
    Ring { minimum_ring_size: u64 },
    /// Maglev's lookup table (Envoy's MAGLEV), a prime number of entries.
    Maglev { table_size: u64 },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The subset's own policy, merged over the rule's ([`DestinationRuleSpec::policy_for`]).
    #[serde(skip)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Why a configuration could not be read. Every variant names the source and the object.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: document {index}: invalid YAML: {source}")]
    Yaml {
        origin: String,
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: {kind} {namespace}/{name}: {message}")]
    Invalid {
        origin: String,
        kind: String,
        namespace: String,
        name: String,
        message: String,
    },
    #[error("Kubernetes API: {0}")]
    Kube(String),
}

// Raw Kubernetes shapes, only as deep as the model needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_yaml::Value,
    #[serde(default)]
    status: serde_yaml::Value,
    // An EndpointSlice's fields, which it has at the top level rather than in a spec.
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: serde_yaml::Value,
    #[serde(default)]
    ports: serde_yaml::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSliceEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawSliceConditions,
    #[serde(default)]
    target_ref: Option<RawTargetRef>,
}

#[derive(Deserialize, Default)]
struct RawSliceConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct RawTargetRef {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawSlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    containers: Vec<RawContainer>,
}

#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

impl Model {
    /// Reads every `*.yaml` / `*.yml` file of a directory (not recursive), in name order.
    pub fn load_dir(dir: &Path) -> Result<Model, ModelError> {
        let io = |source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        paths.sort();
        let mut model = Model::default();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            model.add_yaml(&path.display().to_string(), &text)?;
        }
        model.check();
        Ok(model)
    }

    /// Parses a multi-document YAML text (as `kubectl apply -f` takes) into a model.
    pub fn from_yaml(origin: &str, text: &str) -> Result<Model, ModelError> {
        let mut model = Model::default();
        model.add_yaml(origin, text)?;
        Ok(model)
    }

    /// Adds the objects of a multi-document YAML text. Kinds Lumen does not model (Namespace,
    /// Deployment, ...) are skipped; a malformed document fails the whole text so a half-read
    /// configuration never replaces a good one.
    pub fn add_yaml(&mut self, origin: &str, text: &str) -> Result<(), ModelError> {
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).map_err(|source| ModelError::Yaml {
                origin: origin.to_string(),
                index,
                source,
            })?;
            self.add_value(origin, index, value)?;
        }
        Ok(())
    }

    /// Adds one object, as a YAML document or a Kubernetes API watch reads it (`index` is its
    /// place in its text, for messages). A bad object is refused alone: it is recorded in
    /// [`Model::rejected`] and the call succeeds.
    pub fn add_value(
        &mut self,
        origin: &str,
        index: usize,
        value: serde_yaml::Value,
    ) -> Result<(), ModelError> {
        if value.is_null() {
            return Ok(());
        }
        // Istio's and Gateway API's kinds are read strictly, with field paths in errors.
        let added = crate::crd::parse_document(&value)
            .map_err(|e| ModelError::Invalid {
                origin: origin.to_string(),
                kind: e.kind,
                namespace: e.namespace,
                name: e.name,
                message: format!("{}: {}", e.path, e.message),
            })
            .and_then(|doc| {
                let raw: RawObject =
                    serde_yaml::from_value(value).map_err(|source| ModelError::Yaml {
                        origin: origin.to_string(),
                        index,
                        source,
                    })?;
                self.add_object(origin, raw, doc)
            });
        // One bad resource is refused alone; the others apply.
        match added {
            Ok(()) => {}
            Err(ModelError::Invalid {
                origin,
                kind,
                namespace,
                name,
                message,
            }) => self.reject(Rejection {
                origin,
                kind,
                namespace,
                name,
                reason: message,
            }),
            Err(ModelError::Yaml {
                origin,
                index,
                source,
            }) => self.reject(Rejection {
                origin,
                kind: "?".to_string(),
                namespace: String::new(),
                name: format!("document {index}"),
                reason: source.to_string(),
            }),
            Err(other) => return Err(other),
        }
        Ok(())
    }

    fn add_object(
        &mut self,
        origin: &str,
        raw: RawObject,
        doc: crate::crd::Document,
    ) -> Result<(), ModelError> {
        use crate::crd::Document;
        let mut raw = raw;
        raw.metadata.origin = origin.to_string();
        let invalid = |message: String| ModelError::Invalid {
            origin: origin.to_string(),
            kind: raw.kind.clone(),
            namespace: raw.metadata.namespace.clone(),
            name: raw.metadata.name.clone(),
            message,
        };
        let group = raw.api_version.split('/').next().unwrap_or_default();
        match (group, raw.kind.as_str()) {
            ("v1", "Service") => {
                let spec: RawServiceSpec = spec_of(&raw.spec).map_err(invalid)?;
                let cluster_ip = match spec.cluster_ip.as_deref() {
                    None | Some("" | "None") => None,
                    Some(ip) => Some(
                        ip.parse::<IpAddr>()
                            .map_err(|e| invalid(format!("spec.clusterIP {ip:?}: {e}")))?,
                    ),
                };
                self.services.push(Service {
                    meta: raw.metadata.clone(),
                    selector: spec.selector,
                    ports: spec.ports,
                    cluster_ip,
                });
            }
            ("v1", "Pod") => {
                let spec: RawPodSpec = spec_of(&raw.spec).map_err(invalid)?;
                let status: RawPodStatus = spec_of(&raw.status).map_err(invalid)?;
                let Some(ip) = status.pod_ip else {
                    return Err(invalid("status.podIP is missing".to_string()));
                };
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|e| invalid(format!("status.podIP {ip:?}: {e}")))?;
                let has_sidecar = raw
                    .metadata
                    .annotations
                    .get("sidecar.istio.io/inject")
                    .is_none_or(|v| v != "false");
                self.pods.push(Pod {
                    meta: raw.metadata.clone(),
                    ip,
                    service_account: spec
                        .service_account_name
                        .unwrap_or_else(|| "default".to_string()),
                    container_ports: spec.containers.into_iter().flat_map(|c| c.ports).collect(),
                    has_sidecar,
                });
            }
            ("discovery.k8s.io", "EndpointSlice") => {
                let Some(service) = raw.metadata.labels.get(SERVICE_NAME_LABEL).cloned() else {
                    return Err(invalid(format!(
                        "metadata.labels: no {SERVICE_NAME_LABEL} label names its Service"
                    )));
                };
                match raw.address_type.as_deref() {
                    Some("IPv4" | "IPv6") => {}
                    other => {
                        return Err(invalid(format!(
                            "addressType {other:?} is not supported (IPv4 and IPv6 are)"
                        )));
                    }
                }
                let ports: Vec<RawSlicePort> =
                    spec_of(&raw.ports).map_err(|e| invalid(format!("ports: {e}")))?;
                let raw_endpoints: Vec<RawSliceEndpoint> =
                    spec_of(&raw.endpoints).map_err(|e| invalid(format!("endpoints: {e}")))?;
                let mut endpoints = Vec::new();
                for (i, e) in raw_endpoints.into_iter().enumerate() {
                    let addresses = e
                        .addresses
                        .iter()
                        .enumerate()
                        .map(|(j, a)| {
                            a.parse::<IpAddr>().map_err(|err| {
                                invalid(format!("endpoints[{i}].addresses[{j}] {a:?}: {err}"))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    endpoints.push(SliceEndpoint {
                        addresses,
                        ready: e.conditions.ready.unwrap_or(true),
                        pod: e
                            .target_ref
                            .filter(|t| t.kind.as_deref() == Some("Pod"))
                            .and_then(|t| t.name),
                    });
                }
                self.endpoint_slices.push(EndpointSlice {
                    meta: raw.metadata.clone(),
                    service,
                    ports: ports
                        .into_iter()
                        .filter_map(|p| Some((p.name.unwrap_or_default(), p.port?)))
                        .collect(),
                    endpoints,
                });
            }
            ("networking.istio.io", "VirtualService") => {
                let Document::VirtualService(vs) = doc else {
                    return Err(invalid("not read as a VirtualService".to_string()));
                };
                let spec = crate::validate::virtual_service(&vs.spec)
                    .map_err(|e| invalid(e.to_string()))?;
                self.virtual_services.push(VirtualService {
                    meta: raw.metadata.clone(),
                    spec,
                    kind: "VirtualService",
                });
            }
            ("networking.istio.io", "DestinationRule") => {
                let Document::DestinationRule(dr) = doc else {
                    return Err(invalid("not read as a DestinationRule".to_string()));
                };
                let spec = crate::validate::destination_rule(&dr.spec)
                    .map_err(|e| invalid(e.to_string()))?;
                self.destination_rules.push(DestinationRule {
                    meta: raw.metadata.clone(),
                    spec,
                });
            }
            ("gateway.networking.k8s.io", "HTTPRoute") => {
                let Document::HttpRoute(route) = doc else {
                    return Err(invalid("not read as an HTTPRoute".to_string()));
                };
                let spec = crate::gamma::http_route(&route.spec, &raw.metadata.namespace)
                    .map_err(|e| invalid(e.to_string()))?;
                self.virtual_services.push(VirtualService {
                    meta: raw.metadata.clone(),
                    spec,
                    kind: "HTTPRoute",
                });
            }
            ("gateway.networking.k8s.io", "GRPCRoute") => {
                let Document::GrpcRoute(route) = doc else {
                    return Err(invalid("not read as a GRPCRoute".to_string()));
                };
                let spec = crate::gamma::grpc_route(&route.spec, &raw.metadata.namespace)
                    .map_err(|e| invalid(e.to_string()))?;
                self.virtual_services.push(VirtualService {
                    meta: raw.metadata.clone(),
                    spec,
                    kind: "GRPCRoute",
                });
            }
            ("networking.istio.io" | "security.istio.io" | "gateway.networking.k8s.io", kind) => {
                let why = match kind {
                    "Gateway" | "ServiceEntry" | "WorkloadEntry" | "WorkloadGroup" => {
                        "ingress, egress and workloads outside Kubernetes are out of lumen's scope"
                    }
                    "PeerAuthentication" | "AuthorizationPolicy" | "RequestAuthentication" => {
                        "mTLS and authorization are not carried out by lumen yet"
                    }
                    _ => "lumen does not read this kind",
                };
                return Err(invalid(format!("{kind} is not supported: {why}")));
            }
            _ => {
                tracing::debug!(origin, kind = %raw.kind, name = %raw.metadata.name, "skipping kind lumen does not model");
            }
        }
        Ok(())
    }

    fn reject(&mut self, r: Rejection) {
        tracing::warn!(rejected = %r, "resource refused; the rest of the configuration applies");
        self.rejected.push(r);
    }

    /// What only the whole configuration shows, once every file is read: a Service, a
    /// VirtualService or a DestinationRule defined twice, two VirtualServices for one host, two
    /// DestinationRules for one host, a route to a subset no DestinationRule defines. The
    /// later resource (in file order) is refused; the rest applies. Idempotent.
    pub fn check(&mut self) {
        let mut rejected = Vec::new();
        let origin_of = |kind: &str, meta: &ObjectMeta, reason: String| Rejection {
            origin: meta.origin.clone(),
            kind: kind.to_string(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            reason,
        };
        let mut seen = std::collections::BTreeSet::new();
        self.services.retain(|s| {
            let fresh = seen.insert((s.meta.namespace.clone(), s.meta.name.clone()));
            if !fresh {
                rejected.push(origin_of(
                    "Service",
                    &s.meta,
                    "is defined twice: the first one applies".into(),
                ));
            }
            fresh
        });
        let mut hosts: BTreeMap<String, String> = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        self.destination_rules.retain(|dr| {
            let host = Model::fqdn(&dr.spec.host, &dr.meta.namespace);
            let id = format!("{}/{}", dr.meta.namespace, dr.meta.name);
            let reason = if !names.insert(id.clone()) {
                Some("is defined twice: the first one applies".to_string())
            } else {
                hosts.get(&host).map(|first| {
                    format!(
                        "spec.host: {host} already has DestinationRule {first}: one rule per host"
                    )
                })
            };
            match reason {
                Some(r) => {
                    rejected.push(origin_of("DestinationRule", &dr.meta, r));
                    false
                }
                None => {
                    hosts.insert(host, id);
                    true
                }
            }
        });
        let subsets: BTreeMap<String, std::collections::BTreeSet<String>> = self
            .destination_rules
            .iter()
            .map(|dr| {
                (
                    Model::fqdn(&dr.spec.host, &dr.meta.namespace),
                    dr.spec.subsets.iter().map(|s| s.name.clone()).collect(),
                )
            })
            .collect();
        // Host → the routes claiming it: who, and on which ports (empty: all).
        let mut routed: BTreeMap<String, Vec<(String, Vec<u16>)>> = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        self.virtual_services.retain(|vs| {
            let ns = &vs.meta.namespace;
            let id = format!("{} {ns}/{}", vs.kind, vs.meta.name);
            let mut reason = (!names.insert(id.clone()))
                .then(|| "is defined twice: the first one applies".to_string());
            let overlaps = |ports: &[u16]| {
                ports.is_empty()
                    || vs.spec.ports.is_empty()
                    || ports.iter().any(|p| vs.spec.ports.contains(p))
            };
            // A Gateway API route for a Service of another namespace is a consumer route: it
            // claims the host for its own namespace's clients only.
            let claim = |fqdn: &str| {
                let service_ns = fqdn.split('.').nth(1).unwrap_or_default();
                if vs.kind != "VirtualService" && service_ns != ns.as_str() {
                    format!("{fqdn} for clients in {ns}")
                } else {
                    fqdn.to_string()
                }
            };
            for (i, host) in vs.spec.hosts.iter().enumerate() {
                let fqdn = claim(&Model::fqdn(host, ns));
                let first = routed
                    .get(&fqdn)
                    .and_then(|claims| claims.iter().find(|(_, ports)| overlaps(ports)));
                if reason.is_none()
                    && let Some((first, _)) = first
                {
                    let field = if vs.kind != "VirtualService" { "spec.parentRefs" } else { "spec.hosts" };
                    reason = Some(format!(
                        "{field}[{i}]: {fqdn} is already routed by {first}: one route resource per host and port"
                    ));
                }
            }
            for (i, http) in vs.spec.http.iter().enumerate() {
                for (j, d) in http.route.iter().enumerate() {
                    let Some(subset) = &d.destination.subset else {
                        continue;
                    };
                    let fqdn = Model::fqdn(&d.destination.host, ns);
                    if reason.is_none() && !subsets.get(&fqdn).is_some_and(|s| s.contains(subset)) {
                        reason = Some(format!(
                            "spec.http[{i}].route[{j}].destination.subset: no DestinationRule defines subset {subset:?} of {fqdn}"
                        ));
                    }
                }
            }
            match reason {
                Some(r) => {
                    rejected.push(origin_of(vs.kind, &vs.meta, r));
                    false
                }
                None => {
                    for host in &vs.spec.hosts {
                        routed
                            .entry(claim(&Model::fqdn(host, ns)))
                            .or_default()
                            .push((id.clone(), vs.spec.ports.clone()));
                    }
                    true
                }
            }
        });
        for r in rejected {
            self.reject(r);
        }
    }

    /// Moves pods whose IPv4 address is in `from` (first three octets) to `to`, keeping the
    /// last octet: runs the same mesh on another loopback /24 (tests, a second demo).
    /// The labels of each of a service's endpoints (the pod's; none for an endpoint without
    /// one): its EndpointSlices' ready addresses when it has slices, else the pods its
    /// selector picks, as the translator finds them.
    pub fn endpoint_labels<'m>(&'m self, svc: &Service) -> Vec<&'m BTreeMap<String, String>> {
        static NONE: std::sync::LazyLock<BTreeMap<String, String>> =
            std::sync::LazyLock::new(BTreeMap::new);
        let slices: Vec<&EndpointSlice> = self
            .endpoint_slices
            .iter()
            .filter(|s| s.service == svc.meta.name && s.meta.namespace == svc.meta.namespace)
            .collect();
        if slices.is_empty() {
            return self
                .pods
                .iter()
                .filter(|p| svc.selects(p))
                .map(|p| &p.meta.labels)
                .collect();
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for slice in slices {
            for e in slice.endpoints.iter().filter(|e| e.ready) {
                let labels = e
                    .pod
                    .as_deref()
                    .and_then(|name| {
                        self.pods.iter().find(|p| {
                            p.meta.name == name && p.meta.namespace == slice.meta.namespace
                        })
                    })
                    .map_or(&*NONE, |p| &p.meta.labels);
                for ip in &e.addresses {
                    if seen.insert(*ip) {
                        out.push(labels);
                    }
                }
            }
        }
        out
    }

    /// Whether a route matches on its caller's labels, which makes route tables differ
    /// between the sidecars of one namespace.
    pub fn uses_source_labels(&self) -> bool {
        self.virtual_services.iter().any(|vs| {
            vs.spec
                .http
                .iter()
                .any(|h| h.matches.iter().any(|m| !m.source_labels.is_empty()))
        })
    }

    pub fn move_pods(&mut self, from: [u8; 3], to: [u8; 3]) {
        let moved = |ip: &mut IpAddr| {
            if let IpAddr::V4(v4) = *ip {
                let o = v4.octets();
                if o[..3] == from {
                    *ip = IpAddr::V4(std::net::Ipv4Addr::new(to[0], to[1], to[2], o[3]));
                }
            }
        };
        for pod in &mut self.pods {
            moved(&mut pod.ip);
        }
        for slice in &mut self.endpoint_slices {
            for e in &mut slice.endpoints {
                e.addresses.iter_mut().for_each(moved);
            }
        }
    }

    /// Fully qualified name of `host` as written in a resource of `namespace`
    /// (`reviews` in `default` is `reviews.default.svc.cluster.local`).
    pub fn fqdn(host: &str, namespace: &str) -> String {
        if host.contains('.') {
            let parts = host.split('.').count();
            if parts == 2 {
                return format!("{host}.svc.cluster.local");
            }
            return host.to_string();
        }
        format!("{host}.{namespace}.svc.cluster.local")
    }

    /// The workload a pod belongs to: its owner's name (ReplicaSet hash stripped) or the pod
    /// name, as Istio's `destination_workload` label does.
    pub fn workload_name(pod: &Pod) -> String {
        match pod.meta.owner_references.first() {
            Some(owner) if owner.kind == "ReplicaSet" => owner
                .name
                .rsplit_once('-')
                .map(|(deployment, _)| deployment.to_string())
                .unwrap_or_else(|| owner.name.clone()),
            Some(owner) => owner.name.clone(),
            None => pod.meta.name.clone(),
        }
    }
}

fn spec_of<T: serde::de::DeserializeOwned + Default>(
    value: &serde_yaml::Value,
) -> Result<T, String> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(value.clone()).map_err(|e| e.to_string())
}

impl Service {
    pub fn fqdn(&self) -> String {
        Model::fqdn(&self.meta.name, &self.meta.namespace)
    }

    /// True when the pod is selected by this service.
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.meta.namespace == self.meta.namespace
            && !self.selector.is_empty()
            && labels_match(&self.selector, &pod.meta.labels)
    }
}

impl Pod {
    /// The container port a service port targets on this pod.
    pub fn target_port(&self, port: &ServicePort) -> Option<u16> {
        match &port.target_port {
            None => Some(port.port),
            Some(TargetPort::Number(n)) => Some(*n),
            Some(TargetPort::Name(name)) => self
                .container_ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port),
        }
    }
}

/// True when every `selector` label is present in `labels` with the same value.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../fixtures/demo/bookinfo.yaml");
    const ROUTING: &str = include_str!("../../fixtures/demo/routing.yaml");

    #[test]
    fn parses_demo_fixtures() {
        let mut model = Model::from_yaml("bookinfo.yaml", DEMO).expect("demo parses");
        model
            .add_yaml("routing.yaml", ROUTING)
            .expect("routing parses");
        assert_eq!(model.services.len(), 4);
        assert_eq!(model.pods.len(), 5);
        assert_eq!(model.virtual_services.len(), 1);
        let vs = &model.virtual_services[0];
        assert_eq!(vs.spec.http[0].route.len(), 2);
        assert_eq!(vs.spec.http[0].route[0].weight, Some(50));
        assert_eq!(model.destination_rules[0].spec.subsets.len(), 2);
        let reviews = model
            .services
            .iter()
            .find(|s| s.meta.name == "reviews")
            .expect("reviews service");
        let selected: Vec<_> = model.pods.iter().filter(|p| reviews.selects(p)).collect();
        assert_eq!(selected.len(), 2);
    }

    #[test]
    fn invalid_yaml_names_the_document() {
        let err = Model::from_yaml("bad.yaml", "kind: Service\n  metadata: [").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bad.yaml: document 0: invalid YAML"),
            "{err}"
        );
    }

    #[test]
    fn pod_without_ip_is_rejected_with_its_name() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns}\nspec: {}\n";
        let model = Model::from_yaml("pods.yaml", text).expect("read");
        assert!(model.pods.is_empty());
        assert_eq!(
            model.rejected[0].to_string(),
            "pods.yaml: Pod ns/p: status.podIP is missing"
        );
    }

    #[test]
    fn a_bad_resource_is_refused_alone_and_conflicts_refuse_the_later_one() {
        let mut model = Model::from_yaml("bookinfo.yaml", DEMO).expect("demo");
        model
            .add_yaml(
                "extra.yaml",
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews-again}\nspec: {host: reviews.default.svc.cluster.local}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: typo}\nspec:\n  hosts: [ratings]\n  http: [{route: [{destination: {hots: ratings}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v2}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-too}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http: [{route: [{destination: {host: reviews, subset: v1}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: details}\nspec:\n  hosts: [details]\n  http: [{route: [{destination: {host: details, subset: v9}}]}]\n",
            )
            .expect("read");
        model.check();
        let names =
            |v: &[VirtualService]| v.iter().map(|v| v.meta.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&model.virtual_services), ["reviews"]);
        assert_eq!(model.destination_rules.len(), 1);
        let reasons: Vec<String> = model.rejected.iter().map(ToString::to_string).collect();
        let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
        assert!(
            has(
                "VirtualService default/typo: spec.http[0].route[0].destination.hots: unknown field `hots`"
            ),
            "{reasons:#?}"
        );
        assert!(
            has(
                "DestinationRule default/reviews-again: spec.host: reviews.default.svc.cluster.local already has DestinationRule default/reviews"
            ),
            "{reasons:#?}"
        );
        assert!(
            has(
                "VirtualService default/reviews-too: spec.hosts[0]: reviews.default.svc.cluster.local is already routed by VirtualService default/reviews"
            ),
            "{reasons:#?}"
        );
        assert!(
            has(
                "VirtualService default/details: spec.http[0].route[0].destination.subset: no DestinationRule defines subset \"v9\""
            ),
            "{reasons:#?}"
        );
        assert!(
            reasons.iter().all(|r| r.starts_with("extra.yaml: ")),
            "{reasons:#?}"
        );
        // Checking again changes nothing.
        let before = model.rejected.len();
        model.check();
        assert_eq!(model.rejected.len(), before);
    }

    #[test]
    fn fqdn_and_workload_names() {
        assert_eq!(
            Model::fqdn("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            Model::fqdn("reviews.prod", "default"),
            "reviews.prod.svc.cluster.local"
        );
        assert_eq!(
            Model::fqdn("a.b.svc.cluster.local", "x"),
            "a.b.svc.cluster.local"
        );
        let mut pod = Model::from_yaml("x", DEMO).expect("demo parses").pods[0].clone();
        assert_eq!(Model::workload_name(&pod), "productpage-v1");
        pod.meta.owner_references = vec![OwnerReference {
            kind: "ReplicaSet".into(),
            name: "productpage-v1-5f9d8c".into(),
        }];
        assert_eq!(Model::workload_name(&pod), "productpage-v1");
    }

    #[test]
    fn skips_unmodelled_kinds() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo}\n---\n";
        assert_eq!(
            Model::from_yaml("ns.yaml", text).expect("parses"),
            Model::default()
        );
    }
}
