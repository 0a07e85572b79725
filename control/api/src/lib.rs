//! Protocol types shared by the Lumen proxy and control plane: xDS v3 (re-exported from
//! `envoy-types`) and the names both sides agree on. Types only, no logic.

#![forbid(unsafe_code)]

pub use envoy_types::pb;
pub use envoy_types::util::pack_any;

/// The xDS v3 resource type URLs Lumen serves and consumes over ADS.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

    /// Short name for logs and `/debug/syncz` ("CDS", "EDS", ...).
    pub fn short(type_url: &str) -> &'static str {
        match type_url {
            LISTENER => "LDS",
            CLUSTER => "CDS",
            ROUTE => "RDS",
            ENDPOINT => "EDS",
            _ => "unknown",
        }
    }
}

/// Cluster metadata written by the control plane and read by the proxy
/// (`Cluster.metadata.filter_metadata[FILTER]`, one field so its bytes are stable).
pub mod cluster_meta {
    /// Filter metadata namespace.
    pub const FILTER: &str = "lumen";
    /// On an inbound cluster: the protocol the Services targeting its port declare (Istio's
    /// protocol selection: `appProtocol`, else the port name's prefix), [`HTTP`] or [`TCP`].
    /// Absent when they declare none: the sidecar then detects it from the first bytes.
    pub const PROTOCOL: &str = "protocol";
    pub const HTTP: &str = "http";
    pub const TCP: &str = "tcp";
}

/// Endpoint metadata written by the control plane and read by the proxy
/// (`LbEndpoint.metadata.filter_metadata[FILTER]`). Istio carries the same facts in the
/// `istio` filter metadata and the `security.istio.io/tlsMode` label.
pub mod endpoint_meta {
    /// Filter metadata namespace.
    pub const FILTER: &str = "lumen";
    /// Its one field: what the proxy needs to know of the endpoint's workload, packed in one
    /// string (as Istio packs `istio.workload`). One field, because a protobuf map of several
    /// entries is encoded in a random order: a one-entry map encodes the same bytes every time,
    /// so a resource's version changes only when its content does.
    pub const FIELD: &str = "endpoint";

    /// An endpoint's workload. `inbound_port` is the port of its sidecar's inbound listener,
    /// present when it has a sidecar: a meshed endpoint is reached at `<pod ip>:<inbound
    /// port>`, and the sidecar forwards to the app port.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Workload {
        /// The pod's owner, e.g. `reviews-v1`.
        pub workload: String,
        pub namespace: String,
        /// `app` label (canonical service).
        pub app: String,
        /// `version` label (canonical revision).
        pub version: String,
        pub service_account: String,
        pub inbound_port: Option<u16>,
    }

    impl Workload {
        /// `workload;namespace;app;version;service_account;inbound_port` (Kubernetes names and
        /// label values cannot hold `;`).
        pub fn pack(&self) -> String {
            format!(
                "{};{};{};{};{};{}",
                self.workload,
                self.namespace,
                self.app,
                self.version,
                self.service_account,
                self.inbound_port.map(|p| p.to_string()).unwrap_or_default()
            )
        }

        /// The workload a packed string names; missing parts are empty.
        pub fn unpack(text: &str) -> Workload {
            let mut parts = text.split(';').map(str::to_string);
            let mut next = || parts.next().unwrap_or_default();
            Workload {
                workload: next(),
                namespace: next(),
                app: next(),
                version: next(),
                service_account: next(),
                inbound_port: next().parse().ok().filter(|p| *p != 0),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::Workload;

        #[test]
        fn a_workload_survives_packing() {
            let w = Workload {
                workload: "reviews-v1".into(),
                namespace: "default".into(),
                app: "reviews".into(),
                version: "v1".into(),
                service_account: "bookinfo-reviews".into(),
                inbound_port: Some(15006),
            };
            assert_eq!(Workload::unpack(&w.pack()), w);
            let bare = Workload {
                inbound_port: None,
                ..w
            };
            assert_eq!(Workload::unpack(&bare.pack()), bare);
            assert_eq!(Workload::unpack(""), Workload::default());
        }
    }
}

/// The largest compiled regular expression a route may carry (bytes of the regex crate's
/// program): a bound against configuration that would cost the proxy memory or time.
pub const MAX_REGEX_PROGRAM: usize = 64 * 1024;

/// The name (and per-route configuration key) of Envoy's fault filter.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Envoy's retry host predicate that steers a retry away from the hosts already tried.
pub const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

/// The name (and per-route configuration key) of Envoy's CORS filter.
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// The largest direct response body, in bytes: Envoy's default
/// `max_direct_response_body_size_bytes` (a route configuration with a bigger one is refused).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 4096;

/// Envoy's `retry_on` conditions lumen-proxy carries out (the control plane refuses others).
pub const RETRY_ON: [&str; 12] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Well-known ports (DESIGN.md), shared so both sides agree.
pub mod ports {
    pub const PROXY_OUTBOUND: u16 = 15001;
    pub const PROXY_INBOUND: u16 = 15006;
    pub const PROXY_ADMIN: u16 = 15000;
    pub const PROXY_PROMETHEUS: u16 = 15090;
    pub const CONTROL_XDS: u16 = 15010;
    pub const CONTROL_HTTP: u16 = 15014;
}

/// Cluster names in Istio's format: `outbound|<port>|<subset>|<fqdn>` and `inbound|<port>||`.
pub mod cluster_name {
    /// Outbound cluster for a service port and optional subset.
    pub fn outbound(port: u16, subset: &str, fqdn: &str) -> String {
        format!("outbound|{port}|{subset}|{fqdn}")
    }

    /// Inbound cluster for an app port of the local workload.
    pub fn inbound(port: u16) -> String {
        format!("inbound|{port}||")
    }

    /// Parses `inbound|<port>||`.
    pub fn parse_inbound(name: &str) -> Option<u16> {
        name.strip_prefix("inbound|")?
            .split('|')
            .next()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_round_trip() {
        assert_eq!(
            cluster_name::outbound(9080, "v1", "reviews.default.svc.cluster.local"),
            "outbound|9080|v1|reviews.default.svc.cluster.local"
        );
        assert_eq!(
            cluster_name::parse_inbound(&cluster_name::inbound(9080)),
            Some(9080)
        );
        assert_eq!(cluster_name::parse_inbound("outbound|9080||x"), None);
    }

    #[test]
    fn type_urls_match_generated_names() {
        use prost::Name;
        assert_eq!(
            pb::envoy::config::cluster::v3::Cluster::type_url(),
            type_url::CLUSTER
        );
        assert_eq!(
            pb::envoy::config::listener::v3::Listener::type_url(),
            type_url::LISTENER
        );
        assert_eq!(
            pb::envoy::config::route::v3::RouteConfiguration::type_url(),
            type_url::ROUTE
        );
        assert_eq!(
            pb::envoy::config::endpoint::v3::ClusterLoadAssignment::type_url(),
            type_url::ENDPOINT
        );
    }
}

/// Lumen's own load-balancing policy, peak EWMA, as a cluster's `load_balancing_policy`
/// carries it: first in the list, before a policy every Envoy knows (least request), so
/// lumen-proxy takes it and other clients fall back (Envoy stops at the first policy it
/// supports).
pub mod peak_ewma {
    use crate::pb::google::protobuf::{Value, value::Kind};

    /// The extension's name in `TypedExtensionConfig`.
    pub const NAME: &str = "lumen.load_balancing_policies.peak_ewma";
    /// The type URL its `TypedStruct` names.
    pub const TYPE_URL: &str =
        "type.googleapis.com/lumen.load_balancing_policies.peak_ewma.v1.PeakEwma";
    /// `TypedStruct`'s own type URL (`xds.type.v3`; `udpa.type.v1` is its older name).
    pub const TYPED_STRUCT_URL: &str = "type.googleapis.com/xds.type.v3.TypedStruct";
    pub const OLD_TYPED_STRUCT_URL: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

    /// `xds.type.v3.TypedStruct` (envoy-types does not carry the xds type protos): an
    /// extension's configuration by type URL, as a `Struct`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypedStruct {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<StructFields>,
    }

    /// A `google.protobuf.Struct` as its wire form, a list of entries: it encodes in the
    /// order given, where a map's order is random (and the same bytes each time is what
    /// keeps a resource's version).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StructFields {
        #[prost(message, repeated, tag = "1")]
        pub fields: Vec<StructField>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StructField {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<Value>,
    }

    /// The policy's settings: how fast the latency estimate decays, and what an endpoint
    /// not yet measured is taken at.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Settings {
        pub decay_ms: u64,
        pub default_rtt_ms: u64,
    }

    impl Default for Settings {
        /// Linkerd's: a 10 s decay, 30 ms for an endpoint not measured.
        fn default() -> Settings {
            Settings {
                decay_ms: 10_000,
                default_rtt_ms: 30,
            }
        }
    }

    impl Settings {
        pub fn to_typed_struct(self) -> TypedStruct {
            let number = |v: u64| Value {
                kind: Some(Kind::NumberValue(v as f64)),
            };
            let field = |key: &str, v: u64| StructField {
                key: key.to_string(),
                value: Some(number(v)),
            };
            TypedStruct {
                type_url: TYPE_URL.to_string(),
                value: Some(StructFields {
                    fields: vec![
                        field("decay_ms", self.decay_ms),
                        field("default_rtt_ms", self.default_rtt_ms),
                    ],
                }),
            }
        }

        /// The settings a `TypedStruct`'s value holds (unset ones at their defaults); an
        /// error for a field that is not a whole number of milliseconds from 1 to a day, or
        /// one not known.
        pub fn from_struct(value: Option<&StructFields>) -> Result<Settings, String> {
            let mut s = Settings::default();
            for f in value.map(|v| v.fields.iter()).into_iter().flatten() {
                let k = &f.key;
                let ms = match f.value.as_ref().and_then(|v| v.kind.as_ref()) {
                    Some(Kind::NumberValue(n))
                        if *n >= 1.0 && *n <= 86_400_000.0 && n.fract() == 0.0 =>
                    {
                        *n as u64
                    }
                    other => {
                        return Err(format!(
                            "{k}: {other:?} is not a whole number of milliseconds from 1 to a day"
                        ));
                    }
                };
                match k.as_str() {
                    "decay_ms" => s.decay_ms = ms,
                    "default_rtt_ms" => s.default_rtt_ms = ms,
                    other => return Err(format!("unknown field {other:?}")),
                }
            }
            Ok(s)
        }
    }
}
