//! Inbound: who is calling (as the caller's sidecar said in its peer headers, which are then
//! removed, with every other `x-lumen-*` header, before the app sees the request) and the
//! local app's endpoint for the port the caller meant.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode};

use super::balance::strip_lumen_headers;
use super::error::{Fault, ProxyError, flags};
use super::observe::Observation;
use super::step::Step;
use crate::http::{peer_headers, span_attributes};
use crate::routing::Cluster;
use crate::server::{Accepted, Body};
use crate::tcp::passthrough;
use crate::telemetry::AttrValue;
use crate::telemetry::unknown;
use crate::xds::ConfigRx;

/// Istio's name for the inbound passthrough.
const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";

#[derive(Debug, Clone)]
pub struct Inbound {
    config: ConfigRx,
}

impl Inbound {
    pub fn new(config: ConfigRx) -> Inbound {
        Inbound { config }
    }
}

impl Step for Inbound {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // The port the caller meant: from the connection when it was captured, else as the
        // caller's sidecar said (explicit mode).
        let captured = req
            .extensions()
            .get::<Accepted>()
            .and_then(|a| a.original_dst);
        let original_dst: Option<SocketAddr> =
            captured.or_else(|| header(peer_headers::ORIGINAL_DST).and_then(|v| v.parse().ok()));
        let service = header(peer_headers::DESTINATION_SERVICE);
        let caller = header(peer_headers::APP);
        let (workload, namespace, version) = (
            header(peer_headers::WORKLOAD),
            header(peer_headers::NAMESPACE),
            header(peer_headers::VERSION),
        );
        let config = self.config.borrow().clone();
        let cluster = match captured {
            // Captured for a port no inbound cluster names: that port of the app, as it is.
            Some(dst) => config
                .clusters
                .get(&lumen_api::cluster_name::inbound(dst.port()))
                .cloned()
                .or_else(|| {
                    Some(Arc::new(Cluster::new(
                        INBOUND_PASSTHROUGH,
                        vec![passthrough(dst)],
                    )))
                }),
            None => config.inbound_cluster(original_dst.map(|a| a.port())),
        };
        let port = cluster
            .as_ref()
            .and_then(|c| lumen_api::cluster_name::parse_inbound(&c.name))
            .map_or_else(String::new, |p| format!(":{p}"));
        if let Some(o) = req.extensions().get::<Observation>() {
            o.update(|o| {
                let keep = o.keeps_span();
                let l = &mut o.labels;
                let or_unknown = |v: &Option<String>| v.as_deref().map_or_else(unknown, Arc::from);
                l.source_workload = or_unknown(&workload);
                l.source_workload_namespace = or_unknown(&namespace);
                l.source_app = or_unknown(&caller);
                l.source_version = or_unknown(&version);
                if let Some(s) = &service {
                    l.destination_service = Arc::from(s.as_str());
                }
                let svc = l.destination_service.clone();
                let mut parts = svc.split('.');
                l.destination_service_name = Arc::from(parts.next().unwrap_or_default());
                if let Some(ns) = parts.next() {
                    l.destination_service_namespace = Arc::from(ns);
                }
                if !keep {
                    return;
                }
                o.span.name = format!("{svc}{port}/*");
                // The caller, as its sidecar told: edges of the service graph are counted
                // here, on the server side, which also knows its own version. A caller
                // outside the mesh (no sidecar said who it is) makes no edge.
                if caller.is_some() {
                    let a = &mut o.span.attributes;
                    a.push(("peer.service", AttrValue::Str(l.source_app.to_string())));
                    a.push((
                        span_attributes::SOURCE_WORKLOAD,
                        AttrValue::Str(l.source_workload.to_string()),
                    ));
                    a.push((
                        span_attributes::SOURCE_VERSION,
                        AttrValue::Str(l.source_version.to_string()),
                    ));
                    a.push((
                        span_attributes::SOURCE_NAMESPACE,
                        AttrValue::Str(l.source_workload_namespace.to_string()),
                    ));
                }
                if let Some(v) = config.versions.get("CDS") {
                    o.span
                        .attributes
                        .push((span_attributes::CONFIG_VERSION, AttrValue::Str(v.clone())));
                }
            });
        }
        strip_lumen_headers(req.headers_mut());
        let endpoint = cluster.as_ref().and_then(|c| c.pick().cloned()).ok_or_else(|| {
            ProxyError::new(
                flags::NO_CLUSTER,
                StatusCode::SERVICE_UNAVAILABLE,
                Fault::Proxy,
                "no inbound cluster for the local app (has the control plane sent its configuration?)",
            )
        })?;
        req.extensions_mut().insert(endpoint);
        let http2 = cluster.as_ref().is_some_and(|c| c.http2);
        req.extensions_mut()
            .insert(super::connect::UpstreamHttp2(http2));
        Ok(())
    }
}
