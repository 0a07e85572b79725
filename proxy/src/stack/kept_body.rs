//! A request body kept in memory so a layer can send it more than once (retries, mirrors):
//! only a body known to be at most [`MAX_KEPT_BODY`] is kept; reading it fails as the
//! caller's fault.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;

use super::error::{Fault, ProxyError, flags};
use crate::server::Body;

/// Largest request body kept (Envoy keeps up to its buffer limit).
pub const MAX_KEPT_BODY: u64 = 64 * 1024;

/// Whether `req`'s body is known to be small enough to keep.
pub fn keepable(req: &Request<Body>) -> bool {
    req.body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_KEPT_BODY)
}

/// Reads the whole body, for `why` (in the error).
pub async fn keep(body: Body, why: &str) -> Result<Bytes, ProxyError> {
    body.collect().await.map(|b| b.to_bytes()).map_err(|e| {
        ProxyError::new(
            flags::DOWNSTREAM_PROTOCOL_ERROR,
            StatusCode::BAD_REQUEST,
            Fault::Downstream,
            format!("reading the request body to keep {why}: {e}"),
        )
    })
}

/// The kept body, to send again.
pub fn replay(bytes: &Bytes) -> Body {
    Full::new(bytes.clone())
        .map_err(|never| match never {})
        .boxed()
}
