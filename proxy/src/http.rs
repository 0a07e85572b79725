//! What the data path's stacks (`crate::stack`) share: the state of one proxy, the headers
//! one sidecar passes to the next, Lumen's own span attributes, and small helpers.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::server::Body;
use crate::stack::{self, Stack};
use crate::telemetry::Reporter;
use crate::xds::ConfigRx;

/// Headers one sidecar passes to the next (Istio does the same with its peer metadata
/// exchange); the inbound side strips them before the app sees the request.
pub mod peer_headers {
    pub const WORKLOAD: &str = "x-lumen-peer-workload";
    pub const NAMESPACE: &str = "x-lumen-peer-namespace";
    pub const APP: &str = "x-lumen-peer-app";
    pub const VERSION: &str = "x-lumen-peer-version";
    /// The service the client addressed (FQDN), for the server's `destination_service`.
    pub const DESTINATION_SERVICE: &str = "x-lumen-destination-service";
    /// The app address the client meant (what iptables' original destination would say).
    pub const ORIGINAL_DST: &str = "x-lumen-original-dst";
    pub const ALL: [&str; 6] = [
        WORKLOAD,
        NAMESPACE,
        APP,
        VERSION,
        DESTINATION_SERVICE,
        ORIGINAL_DST,
    ];
}

/// Span attributes of Lumen's own (the caller's identity on a server span).
pub mod span_attributes {
    pub const SOURCE_WORKLOAD: &str = "lumen.source.workload";
    pub const SOURCE_VERSION: &str = "lumen.source.version";
    pub const SOURCE_NAMESPACE: &str = "lumen.source.namespace";
    /// Why the proxy answered itself (a local reply), in words.
    pub const REASON: &str = "lumen.reason";
    /// The xDS version of the configuration that handled the request: the route
    /// configuration's (RDS) outbound, the clusters' (CDS) inbound.
    pub const CONFIG_VERSION: &str = "lumen.config.version";
}

/// The address a capturing sidecar reaches its local app from: the capture rules let it
/// through (Istio's `InboundPassthroughBindIpv4`).
pub const INBOUND_SOURCE: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));

/// State shared by every request of one proxy, and its two stacks.
#[derive(Debug)]
pub struct DataPath {
    pub config: ConfigRx,
    pub reporter: Arc<Reporter>,
    /// Where connections to the local app come from (under capture, [`INBOUND_SOURCE`]).
    pub inbound_source: Option<std::net::IpAddr>,
}

impl DataPath {
    pub fn new(config: ConfigRx, reporter: Arc<Reporter>) -> DataPath {
        DataPath {
            config,
            reporter,
            inbound_source: None,
        }
    }

    /// The same, reaching the local app from `source`.
    pub fn with_inbound_source(mut self, source: Option<std::net::IpAddr>) -> DataPath {
        self.inbound_source = source;
        self
    }

    /// The stack for requests the local app sends out.
    pub fn outbound(&self) -> Stack {
        stack::outbound(
            self.config.clone(),
            self.reporter.clone(),
            stack::connect::Connect::new(),
        )
    }

    /// The stack for requests that arrive for the local app.
    pub fn inbound(&self) -> Stack {
        stack::inbound(
            self.config.clone(),
            self.reporter.clone(),
            stack::connect::Connect::from_source(self.inbound_source),
        )
    }
}

/// A small text body.
pub fn text_body(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `host` of `host:port` (IPv6 literals in brackets kept whole).
pub fn host_only(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &h[1..]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_only_handles_ports_and_ipv6() {
        assert_eq!(host_only("reviews:9080"), "reviews");
        assert_eq!(host_only("reviews"), "reviews");
        assert_eq!(host_only("[::1]:80"), "::1");
    }
}
