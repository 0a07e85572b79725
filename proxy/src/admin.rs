//! Admin endpoints on :15000, named as Envoy's: `/ready`, `/config_dump`, `/stats/prometheus`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::watch;

use crate::http::{DataPath, text_body};
use crate::routing::{PathMatch, RouteConfig};
use crate::server::{Body, ConnStats};

/// Connection counters of the data-path listeners.
#[derive(Debug, Clone, Default)]
pub struct Conns {
    pub outbound: Arc<ConnStats>,
    pub inbound: Arc<ConnStats>,
}

/// State the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Admin {
    pub data: Arc<DataPath>,
    pub conns: Conns,
    /// The control plane connection (none in standalone mode).
    pub xds: Option<Arc<crate::xds::XdsHealth>>,
    pub ready: watch::Receiver<bool>,
    pub node_id: String,
}

impl Admin {
    pub async fn handle(self, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&http::Method::GET, "/ready") => {
                if *self.ready.borrow() {
                    // Ready stays ready without the control plane: the last good
                    // configuration keeps serving, and the body says so.
                    let body = match self.xds.as_ref().and_then(|x| x.away_secs()) {
                        Some(away) => format!(
                            "LIVE: control plane unreachable for {away} s; serving the last good configuration\n"
                        ),
                        None => "LIVE\n".to_string(),
                    };
                    reply(StatusCode::OK, "text/plain", body)
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "PRE_INITIALIZING\n".to_string(),
                    )
                }
            }
            (&http::Method::GET, "/config_dump") => {
                reply(StatusCode::OK, "application/json", self.config_dump())
            }
            (&http::Method::GET, "/stats/prometheus") => {
                let mut text = self.data.reporter.prometheus_text();
                text.push_str("# HELP lumen_proxy_dropped_spans_total Spans dropped because the exporter was behind or failing.\n");
                text.push_str("# TYPE lumen_proxy_dropped_spans_total counter\n");
                text.push_str(&format!(
                    "lumen_proxy_dropped_spans_total {}\n",
                    self.data.reporter.dropped_spans()
                ));
                if let Some(x) = &self.xds {
                    x.prometheus(&mut text);
                }
                self.conns.outbound.prometheus("outbound", &mut text);
                self.conns.inbound.prometheus("inbound", &mut text);
                reply(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "lumen-proxy admin: try /ready, /config_dump, /stats/prometheus\n".to_string(),
            ),
        }
    }

    /// The Prometheus listener: `/stats/prometheus` only.
    pub async fn prometheus_only(self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == "/stats/prometheus" {
            self.handle(req).await
        } else {
            reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /stats/prometheus\n".to_string(),
            )
        }
    }

    fn config_dump(&self) -> String {
        let cfg = self.data.config.borrow().clone();
        let mut clusters: Vec<_> = cfg
            .clusters
            .values()
            .map(|c| {
                json!({
                    "name": c.name,
                    "eds": c.eds,
                    "endpoints": c.endpoints.iter().map(|e| json!({
                        "address": e.app_addr.to_string(),
                        "connect": e.connect_addr.to_string(),
                        "workload": &*e.workload,
                        "namespace": &*e.namespace,
                        "version": &*e.version,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut routes: Vec<&Arc<RouteConfig>> = cfg.routes.values().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        let routes: Vec<_> = routes
            .into_iter()
            .map(|rc| {
                json!({
                    "name": rc.name,
                    "virtual_hosts": rc.virtual_hosts.iter().map(|vh| json!({
                        "name": vh.name,
                        "domains": vh.domains,
                        "routes": vh.routes.iter().map(|r| json!({
                            "name": r.name,
                            "match": match &r.path {
                                PathMatch::Prefix(p) => json!({"prefix": p}),
                                PathMatch::Exact(p) => json!({"path": p}),
                                PathMatch::SeparatedPrefix(p) => json!({"path_separated_prefix": p}),
                                PathMatch::Regex(p) => json!({"safe_regex": {"regex": p.source()}}),
                            },
                            "clusters": r.backends.iter().map(|b| json!({"name": b.cluster, "weight": b.weight})).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut versions: Vec<_> = cfg.versions.iter().collect();
        versions.sort();
        json!({
            "node": self.node_id,
            "versions": versions.into_iter().map(|(k, v)| json!({"type": k, "version": v})).collect::<Vec<_>>(),
            "clusters": clusters,
            "routes": routes,
            "listener_routes": cfg.rds_names,
        })
        .to_string()
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(text_body(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
