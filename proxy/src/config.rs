//! Proxy configuration: what the proxy is (node, identity), where it listens and where its
//! control plane and telemetry service are. Read from an Envoy v3 bootstrap file by the
//! `lumen-proxy` binary, or built directly when the demo runs proxies in-process.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use lumen_api::ports;
use serde::Deserialize;

use crate::telemetry::Identity;

/// Everything a proxy needs to start.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// xDS node id, Istio style: `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    /// xDS node cluster (`<app>.<ns>`).
    pub node_cluster: String,
    pub identity: Identity,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Prometheus scrape listener (`/stats/prometheus`), Istio's :15090.
    pub prometheus_addr: SocketAddr,
    /// `http://host:port` of the ADS server.
    pub xds_endpoint: String,
    /// `http://host:port` of the OTLP/gRPC receiver, if telemetry is exported.
    pub otlp_endpoint: Option<String>,
    /// What the outbound and inbound listeners allow a client.
    pub limits: crate::server::Limits,
    /// Standalone mode (a bootstrap without `dynamic_resources`): the static listeners and
    /// clusters are the whole configuration, no control plane is asked, and the sidecar's
    /// outbound and inbound listeners are not opened.
    pub statics: Option<crate::bootstrap::StaticConfig>,
    /// What the proxy records: node metadata `LUMEN_TRACE_SAMPLING` (percent of new traces,
    /// Istio's `sampling`; 0 turns spans off) and `LUMEN_METRICS` (`false` turns them off).
    pub switches: crate::telemetry::Switches,
    /// How the app's traffic reaches the sidecar: node metadata `INTERCEPTION_MODE` (Istio's
    /// key) `REDIRECT` for iptables capture, `NONE` (the default here) for explicit use.
    pub capture: Capture,
}

/// How traffic reaches the sidecar's outbound and inbound listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Capture {
    /// The app sends to the sidecar explicitly (the demo): the outbound listener routes by
    /// `Host`, and a caller's sidecar names the app port it meant in a peer header.
    #[default]
    Explicit,
    /// iptables REDIRECTs the pod's traffic to the sidecar, as Istio's init container sets it
    /// up (outbound to :15001, inbound to :15006, the proxy's own uid excluded). The listeners
    /// bind every address, each connection's original destination is read back
    /// (`SO_ORIGINAL_DST`), and the local app is reached from 127.0.0.6, which the rules let
    /// through, as Istio's inbound passthrough does.
    Redirect,
}

/// Errors reading a bootstrap file.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("bootstrap: {0}")]
    Invalid(String),
}

impl ProxyConfig {
    /// The configuration of a sidecar for a pod at `ip`, on the standard ports.
    pub fn sidecar(
        ip: IpAddr,
        identity: Identity,
        xds_endpoint: String,
        otlp_endpoint: Option<String>,
    ) -> ProxyConfig {
        ProxyConfig {
            node_id: format!(
                "sidecar~{ip}~{}.{ns}~{ns}.svc.cluster.local",
                identity.pod,
                ns = identity.namespace
            ),
            node_cluster: format!("{}.{}", identity.app, identity.namespace),
            outbound_addr: SocketAddr::new(ip, ports::PROXY_OUTBOUND),
            inbound_addr: SocketAddr::new(ip, ports::PROXY_INBOUND),
            admin_addr: SocketAddr::new(ip, ports::PROXY_ADMIN),
            prometheus_addr: SocketAddr::new(ip, ports::PROXY_PROMETHEUS),
            identity,
            xds_endpoint,
            otlp_endpoint,
            limits: crate::server::Limits::default(),
            statics: None,
            switches: crate::telemetry::Switches::default(),
            capture: Capture::Explicit,
        }
    }

    /// Reads the subset of an Envoy v3 bootstrap Lumen uses: `node` (id, cluster, Istio's
    /// metadata keys), `admin.address`, `static_resources.clusters` (the ADS cluster named by
    /// `dynamic_resources.ads_config`, and `lumen-telemetry` for OTLP) and the listener ports
    /// in node metadata `LUMEN_OUTBOUND_PORT` / `LUMEN_INBOUND_PORT` / `LUMEN_PROMETHEUS_PORT`
    /// (defaults 15001 / 15006 / 15090).
    pub fn from_bootstrap_file(path: &Path) -> Result<ProxyConfig, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bootstrap_yaml(&text)
    }

    pub fn from_bootstrap_yaml(text: &str) -> Result<ProxyConfig, BootstrapError> {
        let b: Bootstrap = serde_yaml::from_str(text)?;
        let invalid = |m: &str| BootstrapError::Invalid(m.to_string());
        let statics = b
            .static_resources
            .resolve()
            .map_err(BootstrapError::Invalid)?;
        let ads_cluster = b
            .dynamic_resources
            .and_then(|d| d.ads_config)
            .and_then(|a| a.grpc_services.into_iter().next())
            .map(|g| g.envoy_grpc.cluster_name);
        let standalone = ads_cluster.is_none();
        if standalone && statics.listeners.is_empty() {
            return Err(invalid(
                "neither dynamic_resources.ads_config (a control plane) nor static_resources.listeners: nothing to serve",
            ));
        }
        let admin = match b.admin {
            None => SocketAddr::from(([127, 0, 0, 1], ports::PROXY_ADMIN)),
            Some(a) => a
                .address
                .socket_address
                .socket_addr("admin.address.socket_address")
                .map_err(BootstrapError::Invalid)?,
        };
        // The admin port dumps the configuration: never beyond this host.
        if !admin.ip().is_loopback() {
            return Err(BootstrapError::Invalid(format!(
                "admin.address {admin} is not a loopback address: the admin port shows the whole configuration, so lumen-proxy serves it on loopback only (Prometheus scrapes :15090)"
            )));
        }
        let node = match (b.node, standalone) {
            (Some(n), _) => n,
            (None, true) => BootstrapNode {
                id: "lumen-proxy".into(),
                cluster: String::new(),
                metadata: BTreeMap::new(),
            },
            (None, false) => return Err(invalid("node is missing")),
        };
        let meta = node.metadata;
        let meta_str = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let labels: BTreeMap<String, String> = meta
            .get("LABELS")
            .and_then(|v| serde_yaml::from_value(v.clone()).ok())
            .unwrap_or_default();
        let cluster_addr = |name: &str| -> Option<SocketAddr> {
            let c = b
                .static_resources
                .clusters
                .iter()
                .find(|c| c.name == name)?;
            let sa = &c
                .load_assignment
                .endpoints
                .first()?
                .lb_endpoints
                .first()?
                .endpoint
                .address
                .socket_address;
            sa.socket_addr("").ok()
        };
        let otlp_endpoint = cluster_addr("lumen-telemetry").map(|a| format!("http://{a}"));
        // Listener limits from node metadata (as Istio's proxy metadata tunes its sidecars).
        let mut limits = crate::server::Limits::default();
        let number = |k: &str| -> Result<Option<u64>, BootstrapError> {
            meta_str(k)
                .map(|v| {
                    v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        BootstrapError::Invalid(format!(
                            "node.metadata.{k}: {v:?} is not a positive whole number"
                        ))
                    })
                })
                .transpose()
        };
        if let Some(n) = number("LUMEN_MAX_CONNECTIONS")? {
            limits.max_connections = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(ms) = number("LUMEN_HEADER_READ_TIMEOUT_MS")? {
            limits.header_read_timeout = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = number("LUMEN_PROTOCOL_DETECTION_TIMEOUT_MS")? {
            limits.protocol_detection_timeout = std::time::Duration::from_millis(ms);
        }
        let switches = crate::telemetry::Switches {
            span_ratio: match meta_str("LUMEN_TRACE_SAMPLING") {
                None => 1.0,
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .map(|p| p / 100.0)
                    .ok_or_else(|| {
                        BootstrapError::Invalid(format!(
                            "node.metadata.LUMEN_TRACE_SAMPLING: {v:?} is not a percentage from 0 to 100"
                        ))
                    })?,
            },
            metrics: match meta_str("LUMEN_METRICS").as_deref() {
                None | Some("true") => true,
                Some("false") => false,
                Some(v) => {
                    return Err(BootstrapError::Invalid(format!(
                        "node.metadata.LUMEN_METRICS: {v:?} is neither true nor false"
                    )));
                }
            },
        };
        let port = |k: &str, d: u16| meta_str(k).and_then(|p| p.parse().ok()).unwrap_or(d);
        let capture = match meta_str("INTERCEPTION_MODE").as_deref() {
            None | Some("NONE") => Capture::Explicit,
            Some("REDIRECT") => Capture::Redirect,
            Some(other) => {
                return Err(BootstrapError::Invalid(format!(
                    "node.metadata.INTERCEPTION_MODE: {other:?} is not supported (REDIRECT or NONE; TPROXY is not implemented)"
                )));
            }
        };
        let Some(ads_cluster) = ads_cluster else {
            if capture != Capture::Explicit {
                return Err(invalid(
                    "node.metadata.INTERCEPTION_MODE: capture needs the sidecar's listeners, which standalone mode (no dynamic_resources) does not open",
                ));
            }
            // Standalone: the node is whatever the file says; the process listens where its
            // static listeners say, and serves Prometheus beside its admin port.
            let id = node.id.clone();
            let identity = Identity {
                workload: meta_str("WORKLOAD_NAME").unwrap_or_else(|| id.clone()),
                namespace: meta_str("NAMESPACE").unwrap_or_else(|| "default".into()),
                app: labels.get("app").cloned().unwrap_or_else(|| id.clone()),
                version: labels.get("version").cloned().unwrap_or_default(),
                pod: meta_str("NAME").unwrap_or_else(|| id.clone()),
            };
            let ip = admin.ip();
            return Ok(ProxyConfig {
                node_id: id,
                node_cluster: node.cluster,
                outbound_addr: SocketAddr::new(ip, 0),
                inbound_addr: SocketAddr::new(ip, 0),
                admin_addr: admin,
                prometheus_addr: SocketAddr::new(
                    ip,
                    port("LUMEN_PROMETHEUS_PORT", ports::PROXY_PROMETHEUS),
                ),
                identity,
                xds_endpoint: String::new(),
                otlp_endpoint,
                limits,
                statics: Some(statics),
                switches,
                capture,
            });
        };
        let mut parts = node.id.split('~');
        let ip: IpAddr = parts.nth(1).and_then(|ip| ip.parse().ok()).ok_or_else(|| {
            invalid("node.id must be sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local")
        })?;
        let (pod, namespace) = parts
            .next()
            .and_then(|p| p.rsplit_once('.'))
            .map(|(p, n)| (p.to_string(), n.to_string()))
            .ok_or_else(|| invalid("node.id must name <pod>.<namespace>"))?;
        let identity = Identity {
            workload: meta_str("WORKLOAD_NAME").unwrap_or_else(|| pod.clone()),
            namespace: meta_str("NAMESPACE").unwrap_or(namespace),
            app: labels.get("app").cloned().unwrap_or_else(|| pod.clone()),
            version: labels.get("version").cloned().unwrap_or_default(),
            pod: meta_str("NAME").unwrap_or(pod),
        };
        // Captured traffic arrives at 127.0.0.1 (outbound) or the interface's address
        // (inbound): the listeners take every address, as Istio's do.
        let listen_ip = match capture {
            Capture::Explicit => ip,
            Capture::Redirect => IpAddr::from([0, 0, 0, 0]),
        };
        let xds = cluster_addr(&ads_cluster).ok_or_else(|| {
            BootstrapError::Invalid(format!(
                "static cluster {ads_cluster:?} with a socket address is missing"
            ))
        })?;
        Ok(ProxyConfig {
            node_id: node.id.clone(),
            node_cluster: node.cluster,
            outbound_addr: SocketAddr::new(
                listen_ip,
                port("LUMEN_OUTBOUND_PORT", ports::PROXY_OUTBOUND),
            ),
            inbound_addr: SocketAddr::new(
                listen_ip,
                port("LUMEN_INBOUND_PORT", ports::PROXY_INBOUND),
            ),
            admin_addr: admin,
            prometheus_addr: SocketAddr::new(
                ip,
                port("LUMEN_PROMETHEUS_PORT", ports::PROXY_PROMETHEUS),
            ),
            identity,
            xds_endpoint: format!("http://{xds}"),
            otlp_endpoint,
            limits,
            statics: None,
            switches,
            capture,
        })
    }
}

/// The bootstrap's top level: a field lumen-proxy does not read is an error naming it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bootstrap {
    node: Option<BootstrapNode>,
    admin: Option<Admin>,
    #[serde(default)]
    static_resources: crate::bootstrap::StaticResources,
    dynamic_resources: Option<DynamicResources>,
}

#[derive(Deserialize)]
struct BootstrapNode {
    id: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    metadata: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Admin {
    address: crate::bootstrap::AddressCfg,
    /// Envoy's admin access log; lumen-proxy logs to stderr.
    #[serde(default)]
    #[allow(dead_code)]
    access_log_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DynamicResources {
    ads_config: Option<AdsConfig>,
    /// `{ads: {}}`: CDS and LDS over the ADS stream, the only way lumen-proxy asks.
    #[serde(default)]
    #[allow(dead_code)]
    cds_config: Option<serde_yaml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    lds_config: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
struct AdsConfig {
    grpc_services: Vec<GrpcService>,
}

#[derive(Deserialize)]
struct GrpcService {
    envoy_grpc: EnvoyGrpc,
}

#[derive(Deserialize)]
struct EnvoyGrpc {
    cluster_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fixture_bootstrap() {
        let cfg =
            ProxyConfig::from_bootstrap_yaml(include_str!("../../fixtures/proxy/bootstrap.yaml"))
                .expect("parses");
        assert_eq!(
            cfg.node_id,
            "sidecar~127.0.10.3~reviews-v1.default~default.svc.cluster.local"
        );
        assert_eq!(cfg.identity.app, "reviews");
        assert_eq!(cfg.identity.version, "v1");
        assert_eq!(cfg.identity.workload, "reviews-v1");
        assert_eq!(cfg.xds_endpoint, "http://127.0.0.1:15010");
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(cfg.outbound_addr.to_string(), "127.0.10.3:15001");
        assert_eq!(cfg.admin_addr.to_string(), "127.0.10.3:15000");
    }

    #[test]
    fn missing_ads_cluster_is_a_clear_error() {
        let err = ProxyConfig::from_bootstrap_yaml(
            "node: {id: 'sidecar~127.0.0.1~a.b~b.svc.cluster.local'}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ads_config"), "{err}");
    }

    #[test]
    fn interception_mode_redirect_captures_on_every_address() {
        let fixture = include_str!("../../fixtures/proxy/bootstrap.yaml");
        let with = |mode: &str| {
            ProxyConfig::from_bootstrap_yaml(&fixture.replace(
                "NAME: reviews-v1",
                &format!("NAME: reviews-v1\n    INTERCEPTION_MODE: {mode}"),
            ))
        };
        let explicit = ProxyConfig::from_bootstrap_yaml(fixture).expect("parses");
        assert_eq!(explicit.capture, Capture::Explicit);
        assert_eq!(explicit.outbound_addr.to_string(), "127.0.10.3:15001");
        let captured = with("REDIRECT").expect("parses");
        assert_eq!(captured.capture, Capture::Redirect);
        assert_eq!(captured.outbound_addr.to_string(), "0.0.0.0:15001");
        assert_eq!(captured.inbound_addr.to_string(), "0.0.0.0:15006");
        assert_eq!(with("NONE").expect("parses").capture, Capture::Explicit);
        let err = with("TPROXY").unwrap_err().to_string();
        assert!(
            err.contains("INTERCEPTION_MODE") && err.contains("TPROXY"),
            "{err}"
        );
    }

    const STATIC: &str = include_str!("../../fixtures/proxy/static.yaml");

    #[test]
    fn a_static_bootstrap_runs_standalone() {
        let cfg = ProxyConfig::from_bootstrap_yaml(STATIC).expect("parses");
        let st = cfg.statics.expect("standalone");
        assert_eq!(st.listeners.len(), 1);
        let l = &st.listeners[0];
        assert_eq!(l.address.to_string(), "127.0.0.1:10000");
        let routes = &l.routes.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].headers[0].name, "x-canary");
        let weights: Vec<(&str, u32)> = routes[2]
            .backends
            .iter()
            .map(|b| (b.cluster.as_str(), b.weight))
            .collect();
        assert_eq!(weights, [("web", 90), ("api", 10)]);
        assert_eq!(
            st.clusters["api"].endpoints[0].connect_addr.to_string(),
            "127.0.0.1:18082"
        );
        assert_eq!(cfg.admin_addr.to_string(), "127.0.0.1:19000");
    }

    #[test]
    fn a_static_route_reads_its_timeout() {
        let cfg = ProxyConfig::from_bootstrap_yaml(&STATIC.replace(
            "route: {cluster: api}\n              - match: {prefix: /}",
            "route: {cluster: api, timeout: 0.25s}\n              - match: {prefix: /}",
        ))
        .expect("parses");
        let st = cfg.statics.expect("standalone");
        let timeouts: Vec<_> = st.listeners[0].routes.virtual_hosts[0]
            .routes
            .iter()
            .map(|r| r.timeout)
            .collect();
        assert!(
            timeouts.contains(&Some(std::time::Duration::from_millis(250))),
            "{timeouts:?}"
        );
        let err = ProxyConfig::from_bootstrap_yaml(&STATIC.replace(
            "route: {cluster: api}\n              - match: {prefix: /}",
            "route: {cluster: api, timeout: soon}\n              - match: {prefix: /}",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("route.timeout"), "{err}");
    }

    #[test]
    fn unsupported_fields_and_values_are_named() {
        let cases = [
            // A field lumen-proxy does not read, anywhere in the file.
            (
                STATIC.replace("codec_type: AUTO", "codec_type: AUTO\n          use_remote_address: true"),
                "use_remote_address",
            ),
            (
                STATIC.replace("route: {cluster: api}\n              - match: {prefix: /}", "route: {cluster: api, retry_policy: {num_retries: 2}}\n              - match: {prefix: /}"),
                "retry_policy",
            ),
            (STATIC.replace("layered_runtime", "x").replace("node:", "layered_runtime: {}\nnode:"), "layered_runtime"),
            // Values it does not support.
            (STATIC.replace("type: STATIC\n    connect_timeout: 1s\n    lb_policy", "type: STRICT_DNS\n    connect_timeout: 1s\n    lb_policy"), "STRICT_DNS is not supported"),
            (STATIC.replace("lb_policy: ROUND_ROBIN", "lb_policy: RING_HASH"), "RING_HASH is not supported"),
            (STATIC.replace("{name: api, weight: 10}", "{name: nowhere, weight: 10}"), "cluster \"nowhere\" is not in static_resources.clusters"),
            (
                STATIC.replace("- name: envoy.filters.http.router\n", "- name: envoy.filters.http.cors\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}\n          - name: envoy.filters.http.router\n"),
                "envoy.filters.http.cors is not supported",
            ),
            (STATIC.replace("address: 127.0.0.1, port_value: 19000", "address: 10.0.0.5, port_value: 19000"), "not a loopback address"),
        ];
        for (yaml, says) in cases {
            assert_ne!(yaml, STATIC, "the case changed nothing: {says}");
            let err = ProxyConfig::from_bootstrap_yaml(&yaml)
                .expect_err(says)
                .to_string();
            assert!(err.contains(says), "{says:?} not in: {err}");
        }
    }
}
