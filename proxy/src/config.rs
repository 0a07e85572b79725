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
    #[error("bootstrap is not valid YAML: {0}")]
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
        let node = b.node.ok_or_else(|| invalid("node is missing"))?;
        let meta = node.metadata;
        let meta_str = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let labels: BTreeMap<String, String> = meta
            .get("LABELS")
            .and_then(|v| serde_yaml::from_value(v.clone()).ok())
            .unwrap_or_default();
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
            Some(SocketAddr::new(sa.address.parse().ok()?, sa.port_value))
        };
        let ads_cluster = b
            .dynamic_resources
            .and_then(|d| d.ads_config)
            .and_then(|a| a.grpc_services.into_iter().next())
            .map(|g| g.envoy_grpc.cluster_name)
            .ok_or_else(|| invalid("dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name is missing"))?;
        let xds = cluster_addr(&ads_cluster).ok_or_else(|| {
            BootstrapError::Invalid(format!(
                "static cluster {ads_cluster:?} with a socket address is missing"
            ))
        })?;
        let port = |k: &str, d: u16| meta_str(k).and_then(|p| p.parse().ok()).unwrap_or(d);
        let admin = b
            .admin
            .and_then(|a| {
                Some(SocketAddr::new(
                    a.address.socket_address.address.parse().ok()?,
                    a.address.socket_address.port_value,
                ))
            })
            .unwrap_or_else(|| SocketAddr::new(ip, ports::PROXY_ADMIN));
        Ok(ProxyConfig {
            node_id: node.id.clone(),
            node_cluster: node.cluster,
            outbound_addr: SocketAddr::new(ip, port("LUMEN_OUTBOUND_PORT", ports::PROXY_OUTBOUND)),
            inbound_addr: SocketAddr::new(ip, port("LUMEN_INBOUND_PORT", ports::PROXY_INBOUND)),
            admin_addr: admin,
            prometheus_addr: SocketAddr::new(
                ip,
                port("LUMEN_PROMETHEUS_PORT", ports::PROXY_PROMETHEUS),
            ),
            identity,
            xds_endpoint: format!("http://{xds}"),
            otlp_endpoint: cluster_addr("lumen-telemetry").map(|a| format!("http://{a}")),
            limits: crate::server::Limits::default(),
        })
    }
}

#[derive(Deserialize)]
struct Bootstrap {
    node: Option<BootstrapNode>,
    admin: Option<Admin>,
    #[serde(default)]
    static_resources: StaticResources,
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
struct Admin {
    address: Address,
}

#[derive(Deserialize)]
struct Address {
    socket_address: SocketAddress,
}

#[derive(Deserialize)]
struct SocketAddress {
    address: String,
    port_value: u16,
}

#[derive(Deserialize, Default)]
struct StaticResources {
    #[serde(default)]
    clusters: Vec<StaticCluster>,
}

#[derive(Deserialize)]
struct StaticCluster {
    name: String,
    load_assignment: LoadAssignment,
}

#[derive(Deserialize)]
struct LoadAssignment {
    endpoints: Vec<LocalityEndpoints>,
}

#[derive(Deserialize)]
struct LocalityEndpoints {
    lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Deserialize)]
struct LbEndpoint {
    endpoint: EndpointAddress,
}

#[derive(Deserialize)]
struct EndpointAddress {
    address: Address,
}

#[derive(Deserialize)]
struct DynamicResources {
    ads_config: Option<AdsConfig>,
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
}
