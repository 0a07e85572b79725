//! Outbound routing: the request's authority and path through the xDS route table to a
//! route and a weighted backend cluster ([`Target`], in the request's extensions), with the
//! destination service's labels and the configuration version recorded.

use std::sync::Arc;

use http::{Request, StatusCode};

use super::error::{Fault, ProxyError, flags};
use super::observe::{Observation, authority_of};
use super::step::Step;
use crate::http::{host_only, span_attributes};
use crate::routing::{Cluster, RouteError};
use crate::server::Body;
use crate::telemetry::AttrValue;
use crate::xds::ConfigRx;

/// Where routing sent a request: the backend cluster and the service (FQDN) it belongs to.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub service: String,
}

#[derive(Debug, Clone)]
pub struct Route {
    config: ConfigRx,
}

impl Route {
    pub fn new(config: ConfigRx) -> Route {
        Route { config }
    }
}

impl Step for Route {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let config = self.config.borrow().clone();
        let observation = req.extensions().get::<Observation>().cloned();
        if let (Some(o), Some(v)) = (&observation, config.versions.get("RDS")) {
            o.update(|o| {
                o.span
                    .attributes
                    .push((span_attributes::CONFIG_VERSION, AttrValue::Str(v.clone())));
            });
        }
        let authority = authority_of(req);
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let decision = config
            .route(&authority, path, req.headers(), rand::random())
            .map_err(|e| {
                let known = config.known_hosts();
                let reason = format!(
                    "{e}; this proxy knows {} service host(s): {}",
                    known.len(),
                    known.join(", ")
                );
                match e {
                    RouteError::NoRoute { .. } => ProxyError::new(
                        flags::NO_ROUTE,
                        StatusCode::NOT_FOUND,
                        Fault::Downstream,
                        reason,
                    ),
                    RouteError::NoCluster { .. } => ProxyError::new(
                        flags::NO_CLUSTER,
                        StatusCode::SERVICE_UNAVAILABLE,
                        Fault::Proxy,
                        reason,
                    ),
                }
            })?;
        let vhost = decision
            .route_config
            .virtual_host(decision.virtual_host)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let service = host_only(&vhost).to_string();
        if let Some(o) = &observation {
            o.update(|o| {
                o.labels.destination_service = service.clone();
                if let Some((name, rest)) = service.split_once('.') {
                    o.labels.destination_service_name = name.to_string();
                    o.labels.destination_service_namespace =
                        rest.split('.').next().unwrap_or_default().to_string();
                }
                o.span.name = format!("{vhost}/*");
                o.span.attributes.push((
                    "upstream_cluster",
                    AttrValue::Str(decision.cluster.name.clone()),
                ));
            });
        }
        req.extensions_mut().insert(Target {
            cluster: decision.cluster,
            service,
        });
        Ok(())
    }
}
