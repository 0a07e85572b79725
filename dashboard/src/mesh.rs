//! The mesh's configuration as the proxies hold it: per proxy and xDS type, SYNCED, STALE
//! (sent, not acknowledged yet), NACKED (with the proxy's reason) or NOT SENT, with the
//! versions sent and acknowledged, read from the control plane's `/debug/syncz` (what
//! `istioctl proxy-status` shows); and the routes and subsets that apply to each service,
//! from its `/debug/config`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The xDS types every proxy should hold, in the order Envoy asks for them.
pub const TYPES: [&str; 4] = ["CDS", "EDS", "LDS", "RDS"];

/// One type's state as `/debug/syncz` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TypeStatus {
    pub state: String,
    #[serde(default)]
    pub sent_version: String,
    #[serde(default)]
    pub acked_version: String,
    #[serde(default)]
    pub resources: usize,
    #[serde(default)]
    pub nack: Option<String>,
}

/// One proxy as `/debug/syncz` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ProxyStatus {
    pub node_id: String,
    pub connected_at_unix: u64,
    #[serde(default)]
    pub types: BTreeMap<String, TypeStatus>,
}

/// One service's configuration as `/debug/config` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    pub host: String,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub endpoints: usize,
    #[serde(default)]
    pub virtual_service: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub subsets: Vec<SubsetConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default)]
    pub matches: Vec<String>,
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    #[serde(default)]
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DestinationConfig {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    pub weight: u32,
}

impl DestinationConfig {
    /// `reviews.default.svc.cluster.local subset v2 :9080 50%`.
    pub fn words(&self) -> String {
        let mut w = self.host.clone();
        if let Some(s) = &self.subset {
            w.push_str(&format!(" subset {s}"));
        }
        if let Some(p) = self.port {
            w.push_str(&format!(" :{p}"));
        }
        w.push_str(&format!(" {}%", self.weight));
        w
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SubsetConfig {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: usize,
}

impl SubsetConfig {
    pub fn label_words(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ConfigDump {
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub rejected: Vec<Rejection>,
}

/// A resource the control plane refused, and why (`/debug/config`'s `rejected`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Rejection {
    pub origin: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// One cell of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// SYNCED, STALE, NACKED or NOT SENT.
    pub state: &'static str,
    pub versions: String,
    pub resources: usize,
    pub nack: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyRow {
    pub node_id: String,
    pub connected: String,
    pub cells: Vec<Cell>,
    pub healthy: bool,
}

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshView {
    pub control_url: Option<String>,
    pub error: Option<String>,
    pub proxies: Vec<ProxyRow>,
    pub config_error: Option<String>,
    pub services: Vec<ServiceConfig>,
    pub rejected: Vec<Rejection>,
}

fn cell(t: Option<&TypeStatus>) -> Cell {
    let Some(t) = t else {
        return Cell {
            state: "NOT SENT",
            versions: String::new(),
            resources: 0,
            nack: String::new(),
        };
    };
    let state = match t.state.as_str() {
        "SYNCED" => "SYNCED",
        "NACK" | "NACKED" => "NACKED",
        _ => "STALE",
    };
    let short = |v: &str| v.chars().take(12).collect::<String>();
    Cell {
        state,
        versions: if t.sent_version == t.acked_version {
            short(&t.sent_version)
        } else {
            format!(
                "sent {} · acked {}",
                short(&t.sent_version),
                short(&t.acked_version)
            )
        },
        resources: t.resources,
        nack: t.nack.clone().unwrap_or_default(),
    }
}

impl MeshView {
    pub fn build(
        control_url: Option<String>,
        fetched: Result<Vec<ProxyStatus>, String>,
        config: Result<ConfigDump, String>,
    ) -> MeshView {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (config_error, services, rejected) = match config {
            Ok(c) => (None, c.services, c.rejected),
            Err(e) => (Some(e), Vec::new(), Vec::new()),
        };
        match fetched {
            Err(e) => MeshView {
                control_url,
                error: Some(e),
                proxies: Vec::new(),
                config_error,
                services,
                rejected,
            },
            Ok(mut list) => {
                list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
                let proxies = list
                    .iter()
                    .map(|p| {
                        let cells: Vec<Cell> =
                            TYPES.iter().map(|t| cell(p.types.get(*t))).collect();
                        ProxyRow {
                            node_id: p.node_id.clone(),
                            connected: format!("{} s ago", now.saturating_sub(p.connected_at_unix)),
                            healthy: cells.iter().all(|c| c.state == "SYNCED"),
                            cells,
                        }
                    })
                    .collect();
                MeshView {
                    control_url,
                    error: None,
                    proxies,
                    config_error,
                    services,
                    rejected,
                }
            }
        }
    }

    pub fn types(&self) -> &'static [&'static str] {
        &TYPES
    }
}

/// `GET {base}{path}` as JSON of `T` (`what` names it in errors), within `timeout`.
pub async fn fetch<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    what: &str,
    timeout: Duration,
) -> Result<T, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("control plane URL {url:?}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let call = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| format!("asking {url}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{url} answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not {what} JSON: {e}"))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("{url} did not answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_by_type_with_not_sent_for_missing_types() {
        let json = r#"[{"node_id":"sidecar~127.0.10.3~reviews-v1","connected_at_unix":0,
            "types":{"CDS":{"state":"SYNCED","sent_version":"abc","acked_version":"abc","resources":4,"nack":null},
                     "LDS":{"state":"NACK","sent_version":"v2","acked_version":"v1","resources":1,"nack":"unknown filter"},
                     "RDS":{"state":"STALE","sent_version":"r2","acked_version":"r1","resources":1,"nack":null}}}]"#;
        let list: Vec<ProxyStatus> = serde_json::from_str(json).expect("syncz JSON");
        let v = MeshView::build(Some("http://x".into()), Ok(list), Err("gone".into()));
        let states: Vec<&str> = v.proxies[0].cells.iter().map(|c| c.state).collect();
        assert_eq!(states, ["SYNCED", "NOT SENT", "NACKED", "STALE"]);
        assert_eq!(v.proxies[0].cells[2].nack, "unknown filter");
        assert_eq!(v.proxies[0].cells[3].versions, "sent r2 · acked r1");
        assert!(!v.proxies[0].healthy);
    }
}
