//! Load balancing: one endpoint of the routed cluster (round robin), recorded as the
//! destination workload; to a meshed endpoint, the caller's identity for the next sidecar
//! (peer headers, as Istio's metadata exchange), after removing any `x-lumen-*` header the
//! application sent so none can be forged.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, StatusCode};

use super::error::{Fault, ProxyError, flags};
use super::observe::{Observation, set_attribute};
use super::route::{RequestHash, Target};
use super::step::Step;
use crate::http::peer_headers;
use crate::routing::Endpoint;
use crate::server::Body;
use crate::telemetry::{AttrValue, Identity};

#[derive(Debug, Clone)]
pub struct Balance {
    me: std::sync::Arc<Identity>,
}

impl Balance {
    pub fn new(me: Identity) -> Balance {
        Balance {
            me: std::sync::Arc::new(me),
        }
    }
}

/// Removes every `x-lumen-*` header (Lumen's own, set only by its sidecars).
pub fn strip_lumen_headers(headers: &mut http::HeaderMap) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-lumen-"))
        .cloned()
        .collect();
    for k in ours {
        headers.remove(k);
    }
}

fn set(headers: &mut http::HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// The endpoints a request's attempts went to, shared by its attempts (set by the retry
/// layer under the previous-hosts predicate): a retry picks again, up to `picks` times, for
/// one not tried yet.
#[derive(Debug, Clone)]
pub struct Tried {
    picks: u32,
    indices: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Tried {
    pub fn new(picks: u32) -> Tried {
        Tried {
            picks,
            indices: Arc::default(),
        }
    }
}

impl Step for Balance {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let target = req
            .extensions()
            .get::<Target>()
            .cloned()
            .ok_or_else(|| ProxyError::internal("no route chosen before load balancing"))?;
        let request_hash = req.extensions().get::<RequestHash>().map(|h| h.0);
        let no_healthy = || {
            ProxyError::new(
                flags::NO_HEALTHY_UPSTREAM,
                StatusCode::SERVICE_UNAVAILABLE,
                Fault::Upstream,
                format!("no healthy upstream in cluster {}", target.cluster.name),
            )
        };
        let mut picked = target
            .cluster
            .pick_for(request_hash)
            .ok_or_else(no_healthy)?;
        if let Some(tried) = req.extensions().get::<Tried>()
            && let Ok(mut indices) = tried.indices.lock()
        {
            // A retry: pick again while the pick was tried before, as many times as allowed;
            // a policy that keeps choosing it (power of two choices between two endpoints
            // always takes the cheaper) then gets the next endpoint in turn neither tried
            // nor ejected, if there is one.
            for _ in 1..tried.picks {
                if !indices.contains(&picked.0) {
                    break;
                }
                picked = target
                    .cluster
                    .pick_for(request_hash)
                    .ok_or_else(no_healthy)?;
            }
            let n = target.cluster.endpoints.len();
            if indices.contains(&picked.0)
                && let Some(i) = (1..n)
                    .map(|k| (picked.0 + k) % n)
                    .find(|i| !indices.contains(i) && !target.cluster.balancer.ejected(*i))
                && let Some(e) = target.cluster.endpoints.get(i)
            {
                picked = (i, e);
            }
            indices.push(picked.0);
        }
        let (index, endpoint) = picked;
        let endpoint: Endpoint = endpoint.clone();
        // In flight until its response comes (the connector holds it): least request's and
        // peak EWMA's load (and the latter's latency measure), counted only where the policy
        // reads it and has a choice to make (no allocation on other requests' path).
        if target.cluster.lb.counts_in_flight()
            && target.cluster.endpoints.len() > 1
            && let Some(guard) = target.cluster.balancer.start(index, target.cluster.lb)
        {
            req.extensions_mut().insert(Arc::new(guard));
        }
        if let Some(o) = req.extensions().get::<Observation>() {
            o.update(|o| {
                o.labels.destination_workload = endpoint.workload.clone();
                o.labels.destination_workload_namespace = endpoint.namespace.clone();
                o.labels.destination_app = endpoint.app.clone();
                o.labels.destination_version = endpoint.version.clone();
                if !o.keeps_span() {
                    return;
                }
                // Set, not pushed: a retry passes here again with another endpoint.
                let attrs = &mut o.span.attributes;
                set_attribute(
                    attrs,
                    "peer.service",
                    AttrValue::Str(endpoint.app.to_string()),
                );
                set_attribute(
                    attrs,
                    "network.peer.address",
                    AttrValue::Str(endpoint.connect_addr.ip().to_string()),
                );
                set_attribute(
                    attrs,
                    "network.peer.port",
                    AttrValue::Int(i64::from(endpoint.connect_addr.port())),
                );
            });
        }
        let headers = req.headers_mut();
        strip_lumen_headers(headers);
        if endpoint.meshed {
            let me = &self.me;
            set(headers, peer_headers::WORKLOAD, &me.workload);
            set(headers, peer_headers::NAMESPACE, &me.namespace);
            set(headers, peer_headers::APP, &me.app);
            set(headers, peer_headers::VERSION, &me.version);
            set(headers, peer_headers::DESTINATION_SERVICE, &target.service);
            set(
                headers,
                peer_headers::ORIGINAL_DST,
                &endpoint.app_addr.to_string(),
            );
        }
        if target.cluster.outlier.is_some() {
            req.extensions_mut().insert(super::outlier::Picked {
                balancer: target.cluster.balancer.clone(),
                index,
            });
        }
        req.extensions_mut().insert(endpoint);
        req.extensions_mut()
            .insert(super::connect::UpstreamHttp2(target.cluster.http2));
        Ok(())
    }
}
