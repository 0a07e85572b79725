//! The demo's application services, in the shape of Istio's bookinfo: productpage calls
//! details and reviews; reviews (v1, v2) calls ratings; ratings fails a few percent of
//! requests and has a slow tail. Each app calls others through its own sidecar's outbound
//! port and forwards `traceparent`, as bookinfo's apps do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lumen_proxy::http::text_body;
use lumen_proxy::server::Body;

/// Share of ratings requests answered with 500.
pub const RATINGS_ERROR_RATE: f64 = 0.03;
/// Share of ratings requests that are slow (the p99 tail).
pub const RATINGS_SLOW_RATE: f64 = 0.05;

/// Which app a pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    ProductPage,
    Details,
    Reviews,
    Ratings,
}

/// One running app instance.
#[derive(Debug)]
pub struct App {
    kind: AppKind,
    version: String,
    /// The app's own sidecar outbound listener.
    outbound: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl AppKind {
    pub fn from_app_label(app: &str) -> Option<AppKind> {
        match app {
            "productpage" => Some(AppKind::ProductPage),
            "details" => Some(AppKind::Details),
            "reviews" => Some(AppKind::Reviews),
            "ratings" => Some(AppKind::Ratings),
            _ => None,
        }
    }
}

impl App {
    pub fn new(kind: AppKind, version: String, outbound: SocketAddr) -> App {
        App {
            kind,
            version,
            outbound,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Calls `service` at `path` through the sidecar, forwarding the trace context.
    async fn call(
        &self,
        service: &str,
        path: &str,
        traceparent: Option<&str>,
    ) -> Result<String, String> {
        let mut req = Request::builder()
            .uri(format!("http://{}{path}", self.outbound))
            .header(hyper::header::HOST, format!("{service}:9080"));
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{service} answered {status}: {}", text.trim()))
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let traceparent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let tp = traceparent.as_deref();
        let path = req.uri().path().to_string();
        match (self.kind, path.as_str()) {
            (AppKind::ProductPage, "/productpage" | "/") => {
                let (details, reviews) = tokio::join!(self.call("details", "/details/0", tp), self.call("reviews", "/reviews/0", tp));
                let details = details.unwrap_or_else(|e| format!("{{\"error\": \"details unavailable: {e}\"}}"));
                let reviews = reviews.unwrap_or_else(|e| format!("{{\"error\": \"reviews unavailable: {e}\"}}"));
                reply(StatusCode::OK, format!("{{\"product\": 0, \"details\": {details}, \"reviews\": {reviews}}}"))
            }
            (AppKind::Details, p) if p.starts_with("/details/") => reply(
                StatusCode::OK,
                "{\"id\": 0, \"author\": \"William Shakespeare\", \"year\": 1595, \"type\": \"paperback\", \"pages\": 200}".to_string(),
            ),
            (AppKind::Reviews, p) if p.starts_with("/reviews/") => {
                let ratings = self
                    .call("ratings", "/ratings/0", tp)
                    .await
                    .unwrap_or_else(|e| format!("{{\"error\": \"ratings unavailable: {}\"}}", e.replace('"', "'")));
                reply(
                    StatusCode::OK,
                    format!("{{\"id\": 0, \"version\": \"{}\", \"reviews\": [{{\"reviewer\": \"Reviewer1\", \"ratings\": {ratings}}}]}}", self.version),
                )
            }
            (AppKind::Ratings, p) if p.starts_with("/ratings/") => {
                let (fail, slow, jitter) = {
                    let roll: f64 = rand::random();
                    (roll < RATINGS_ERROR_RATE, rand::random::<f64>() < RATINGS_SLOW_RATE, rand::random::<u64>() % 3)
                };
                let delay = if slow { Duration::from_millis(40 + jitter * 10) } else { Duration::from_millis(1 + jitter) };
                tokio::time::sleep(delay).await;
                if fail {
                    reply(StatusCode::INTERNAL_SERVER_ERROR, "{\"error\": \"ratings backend failure\"}".to_string())
                } else {
                    reply(StatusCode::OK, "{\"id\": 0, \"ratings\": {\"Reviewer1\": 5}}".to_string())
                }
            }
            _ => reply(StatusCode::NOT_FOUND, format!("{{\"error\": \"no such path {path}\"}}")),
        }
    }
}

fn reply(status: StatusCode, json: String) -> Response<Body> {
    let mut resp = Response::new(text_body(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
