//! The one error type of the data path: what went wrong, as the local reply, the metrics and
//! the span all say it (Envoy's response flag, the status, the reason in words) and whose
//! fault it was. Every layer fails with it; [`super::local_reply`] turns it into a response.

use http::StatusCode;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller: a request the proxy cannot route or forward as sent.
    Downstream,
    /// The upstream: refused, reset, or never answered.
    Upstream,
    /// The proxy or its configuration.
    Proxy,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Downstream => "downstream",
            Fault::Upstream => "upstream",
            Fault::Proxy => "proxy",
        }
    }
}

/// Envoy's response flags for the failures the proxy itself causes or sees.
pub mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    /// The upstream reset the connection (here: broke off a response after its head).
    pub const UPSTREAM_RESET: &str = "UR";
    pub const NO_CLUSTER: &str = "NC";
    /// A request the proxy could not make sense of (Envoy's downstream protocol error).
    pub const DOWNSTREAM_PROTOCOL_ERROR: &str = "DPE";
    /// The route's retries ran out (the last attempt's failure is the answer).
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: &str = "URX";
    /// The route's fault injection delayed the request.
    pub const DELAY_INJECTED: &str = "DI";
    /// The route's fault injection answered the request itself.
    pub const FAULT_INJECTED: &str = "FI";
    /// The cluster's circuit breaker was full (requests, connections, pending).
    pub const UPSTREAM_OVERFLOW: &str = "UO";
    /// The client closed the connection before the response (recorded, never answered).
    pub const DOWNSTREAM_CONNECTION_TERMINATION: &str = "DC";
    pub const NONE: &str = "-";
}

/// A failure of one request, answered by the proxy itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ProxyError {
    pub flag: &'static str,
    pub status: StatusCode,
    /// In words, for the reply's body, the span's `lumen.reason` and the log.
    pub reason: String,
    pub fault: Fault,
}

impl ProxyError {
    pub fn new(
        flag: &'static str,
        status: StatusCode,
        fault: Fault,
        reason: impl Into<String>,
    ) -> ProxyError {
        ProxyError {
            flag,
            status,
            reason: reason.into(),
            fault,
        }
    }

    /// The local reply's body.
    pub fn body(&self) -> String {
        format!("lumen-proxy: {}\n", self.reason)
    }

    /// A failure inside the proxy (a layer missing what an outer one should have set).
    pub fn internal(reason: impl Into<String>) -> ProxyError {
        ProxyError::new(
            flags::NONE,
            StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Proxy,
            reason,
        )
    }
}
