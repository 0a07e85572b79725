//! Each layer on its own with `oneshot` (the layers inside it replaced by a closure that
//! shows what reached it), then both stacks whole against a real upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use super::error::{Fault, ProxyError, flags};
use super::observe::{Direction, Observation, ObserveLayer};
use super::step::StepLayer;
use super::*;
use crate::http::{peer_headers, text_body};
use crate::routing::{Endpoint, MeshConfig};
use crate::server::Body;
use crate::telemetry::{AttrValue, Identity, SpanQueue};

fn identity(app: &str, version: &str) -> Identity {
    Identity {
        workload: format!("{app}-{version}"),
        namespace: "default".into(),
        app: app.into(),
        version: version.into(),
        pod: format!("{app}-{version}-0"),
    }
}

fn reporter(app: &str) -> (Arc<Reporter>, SpanQueue) {
    let (r, q) = Reporter::new(identity(app, "v1"), 64);
    (Arc::new(r), q)
}

/// The local app (ratings) at `addr`, as the inbound cluster.
fn local_app(addr: SocketAddr) -> MeshConfig {
    let mut cfg = MeshConfig::default();
    let mut endpoint = crate::routing::tests::endpoint("127.0.0.1", "ratings-v1");
    endpoint.app_addr = addr;
    endpoint.connect_addr = addr;
    cfg.apply_clusters(vec![crate::routing::Cluster::new(
        "inbound|9080||",
        vec![endpoint],
    )]);
    cfg
}

fn config_rx(cfg: MeshConfig) -> crate::xds::ConfigRx {
    let (tx, rx) = watch::channel(Arc::new(cfg));
    // The sender may go: the receiver keeps the last value.
    drop(tx);
    rx
}

fn get(host: &str, path: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(text_body(""))
        .expect("request")
}

/// What [`capture`] saw.
type Seen = Arc<Mutex<Option<Request<Body>>>>;

/// A closure service that keeps the request it was given and answers 200 "ok".
#[allow(clippy::type_complexity)]
fn capture() -> (
    impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = impl Send + 'static,
    > + Clone,
    Seen,
) {
    let seen: Arc<Mutex<Option<Request<Body>>>> = Arc::new(Mutex::new(None));
    let keep = seen.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let keep = keep.clone();
        async move {
            if let Ok(mut k) = keep.lock() {
                *k = Some(req);
            }
            Ok::<_, ProxyError>(Response::new(text_body("ok")))
        }
    });
    (svc, seen)
}

fn attr<'a>(attrs: &'a [(&'static str, AttrValue)], key: &str) -> Option<&'a AttrValue> {
    attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// Spans are filled in only when they will be recorded: not for an unsampled trace, not at
/// all without an OTLP endpoint; the request is counted in the metrics either way.
#[tokio::test]
async fn a_span_that_will_not_be_recorded_is_not_filled_in() {
    // The layer after the trace context sees whether the span is kept.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = |seen: Arc<Mutex<Vec<(bool, usize)>>>| {
        tower::service_fn(move |req: Request<Body>| {
            let seen = seen.clone();
            async move {
                if let Some(o) = req.extensions().get::<Observation>() {
                    o.update(|o| {
                        if let Ok(mut s) = seen.lock() {
                            s.push((o.keeps_span(), o.span.attributes.len()));
                        }
                    });
                }
                Ok::<_, ProxyError>(Response::new(text_body("ok")))
            }
        })
    };
    let (r, mut queue) = Reporter::new(identity("productpage", "v1"), 64);
    let cases = [
        ("sampled, exported", Arc::new(r), 1.0, true),
        (
            "unsampled",
            Arc::new(Reporter::new(identity("productpage", "v1"), 64).0),
            0.0,
            false,
        ),
        (
            "no OTLP endpoint",
            Arc::new(
                Reporter::new(identity("productpage", "v1"), 64)
                    .0
                    .without_span_export(),
            ),
            1.0,
            false,
        ),
    ];
    for (name, reporter, ratio, kept) in cases {
        seen.lock().expect("lock").clear();
        let svc = ObserveLayer::new(reporter.clone(), Direction::Outbound)
            .layer(StepLayer(trace_context::TraceContext { ratio }).layer(probe(seen.clone())));
        let resp = svc
            .oneshot(get("reviews:9080", "/reviews/1"))
            .await
            .expect("ok");
        let _ = resp.into_body().collect().await.expect("body");
        let (keeps, attributes) = seen.lock().expect("lock")[0];
        assert_eq!(keeps, kept, "{name}");
        assert_eq!(attributes > 0, reporter.records_spans(), "{name}");
        assert!(
            reporter
                .prometheus_text()
                .contains(r#"response_code="200""#),
            "{name}: counted"
        );
    }
    assert!(queue.try_recv().is_some(), "the sampled span is queued");
}

#[tokio::test]
async fn observe_records_a_span_and_a_sample_when_the_body_is_done() {
    let (reporter, mut queue) = reporter("productpage");
    let ok = tower::service_fn(|req: Request<Body>| async move {
        // Inner layers fill in what they learn.
        let o = req
            .extensions()
            .get::<Observation>()
            .cloned()
            .expect("observation");
        o.update(|o| o.labels.destination_app = "reviews".into());
        Ok::<_, ProxyError>(Response::new(text_body("hello")))
    });
    // With the trace layer inside, which gives the span its place (and sampling) in a trace.
    let svc = ObserveLayer::new(reporter.clone(), Direction::Outbound)
        .layer(StepLayer(trace_context::TraceContext::default()).layer(ok));
    let resp = svc
        .oneshot(get("reviews:9080", "/reviews/1"))
        .await
        .expect("ok");
    assert!(
        queue.try_recv().is_none(),
        "nothing recorded before the body is sent"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "hello");
    let span = queue.try_recv().expect("a span once the body is done");
    assert_eq!(
        attr(&span.attributes, "http.response.status_code"),
        Some(&AttrValue::Int(200))
    );
    assert_eq!(
        attr(&span.attributes, "http.response.body.size"),
        Some(&AttrValue::Int(5))
    );
    assert_eq!(
        attr(&span.attributes, "url.path"),
        Some(&AttrValue::Str("/reviews/1".into()))
    );
    assert!(!span.error);
    let text = reporter.prometheus_text();
    assert!(
        text.contains(r#"reporter="source",source_workload="productpage-v1""#)
            && text.contains(r#"destination_app="reviews""#)
            && text.contains(r#"response_code="200""#),
        "{text}"
    );
}

#[tokio::test]
async fn observe_records_a_failure_with_its_flag_and_reason_and_passes_it_on() {
    let (reporter, mut queue) = reporter("productpage");
    let failing = tower::service_fn(|_: Request<Body>| async {
        Err::<Response<Body>, _>(ProxyError::new(
            flags::UPSTREAM_TIMEOUT,
            StatusCode::GATEWAY_TIMEOUT,
            Fault::Upstream,
            "upstream 127.0.0.9:9080 did not answer within 15s",
        ))
    });
    let svc = ObserveLayer::new(reporter.clone(), Direction::Outbound)
        .layer(StepLayer(trace_context::TraceContext::default()).layer(failing));
    let err = svc.oneshot(get("reviews", "/")).await.expect_err("fails");
    assert_eq!(err.flag, "UT");
    let span = queue.try_recv().expect("recorded at once");
    assert!(span.error);
    assert_eq!(
        attr(&span.attributes, "response_flags"),
        Some(&AttrValue::Str("UT".into()))
    );
    assert_eq!(
        attr(&span.attributes, "lumen.reason"),
        Some(&AttrValue::Str(
            "upstream 127.0.0.9:9080 did not answer within 15s".into()
        ))
    );
    assert!(
        reporter
            .prometheus_text()
            .contains(r#"response_flags="UT""#)
    );
}

#[tokio::test]
async fn a_request_its_client_abandons_before_the_response_is_recorded_as_dc() {
    let (reporter, mut queue) = reporter("productpage");
    let never = tower::service_fn(|_: Request<Body>| {
        std::future::pending::<Result<Response<Body>, ProxyError>>()
    });
    let mut svc = ObserveLayer::new(reporter.clone(), Direction::Outbound)
        .layer(StepLayer(trace_context::TraceContext::default()).layer(never));
    let call = svc
        .ready()
        .await
        .expect("ready")
        .call(get("reviews", "/reviews/1"));
    // The client waits, then closes its connection: hyper drops the request's future.
    let waited = tokio::time::timeout(std::time::Duration::from_millis(50), call).await;
    assert!(waited.is_err(), "the upstream never answers");
    let span = queue
        .try_recv()
        .expect("recorded when the request is dropped");
    assert!(span.error);
    assert_eq!(
        attr(&span.attributes, "response_flags"),
        Some(&AttrValue::Str("DC".into()))
    );
    assert_eq!(attr(&span.attributes, "http.response.status_code"), None);
    let text = reporter.prometheus_text();
    assert!(
        text.contains(r#"response_code="0""#) && text.contains(r#"response_flags="DC""#),
        "{text}"
    );
    // Recorded once.
    assert!(queue.try_recv().is_none());
}

#[tokio::test]
async fn a_response_its_client_abandons_mid_body_is_recorded_as_dc_with_its_status() {
    // A body of one chunk, then nothing (the upstream is slow to send the rest).
    fn slow_body() -> Body {
        use futures::StreamExt;
        let chunks = futures::stream::iter([Ok::<_, hyper::Error>(hyper::body::Frame::data(
            bytes::Bytes::from_static(b"first"),
        ))])
        .chain(futures::stream::pending());
        BodyExt::boxed(http_body_util::StreamBody::new(chunks))
    }
    let (reporter_dc, mut queue) = reporter("productpage");
    let upstream = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, ProxyError>(Response::new(slow_body()))
    });
    let svc = ObserveLayer::new(reporter_dc.clone(), Direction::Outbound)
        .layer(StepLayer(trace_context::TraceContext::default()).layer(upstream));
    let resp = svc
        .oneshot(get("reviews", "/reviews/1"))
        .await
        .expect("a response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(first.data_ref().map(|d| d.len()), Some(5));
    assert!(queue.try_recv().is_none(), "recorded at the response's end");
    // The client goes away: hyper drops the body.
    drop(body);
    let span = queue.try_recv().expect("recorded when the body is dropped");
    assert_eq!(
        attr(&span.attributes, "response_flags"),
        Some(&AttrValue::Str("DC".into()))
    );
    assert_eq!(
        attr(&span.attributes, "http.response.status_code"),
        Some(&AttrValue::Int(200))
    );
    assert_eq!(
        attr(&span.attributes, "http.response.body.size"),
        Some(&AttrValue::Int(5))
    );
    let text = reporter_dc.prometheus_text();
    assert!(
        text.contains(r#"response_code="200""#) && text.contains(r#"response_flags="DC""#),
        "{text}"
    );

    // Read to its end, the same kind of body is no DC; nor is an empty one never polled.
    let (reporter, mut queue) = reporter("productpage");
    for text in ["whole", ""] {
        let upstream = tower::service_fn(move |_: Request<Body>| async move {
            Ok::<_, ProxyError>(Response::new(text_body(text)))
        });
        let svc = ObserveLayer::new(reporter.clone(), Direction::Outbound)
            .layer(StepLayer(trace_context::TraceContext::default()).layer(upstream));
        let resp = svc.oneshot(get("reviews", "/")).await.expect("a response");
        let mut body = resp.into_body();
        if !hyper::body::Body::is_end_stream(&body) {
            while body.frame().await.is_some() {}
        }
        drop(body);
        let span = queue.try_recv().expect("recorded");
        assert_eq!(
            attr(&span.attributes, "response_flags"),
            Some(&AttrValue::Str("-".into()))
        );
    }
}

#[tokio::test]
async fn route_picks_the_cluster_and_names_the_service_or_fails_with_nr() {
    let (inner, seen) = capture();
    let route = StepLayer(route::Route::new(
        config_rx(crate::routing::tests::config()),
    ));
    let o = Observation::for_test(Direction::Outbound);
    let mut req = get("reviews:9080", "/reviews/0");
    req.headers_mut()
        .insert("end-user", "jason".parse().expect("value"));
    req.extensions_mut().insert(o.clone());
    route
        .layer(inner.clone())
        .oneshot(req)
        .await
        .expect("routed");
    let reached = seen.lock().expect("lock").take().expect("reached inside");
    let target = reached
        .extensions()
        .get::<route::Target>()
        .expect("a target");
    assert_eq!(target.cluster.name, "v2", "jason goes to v2");
    assert_eq!(&*target.service, "reviews.default.svc.cluster.local");
    let (labels, attrs) = o.snapshot().expect("record");
    assert_eq!(&*labels.destination_service_name, "reviews");
    assert_eq!(&*labels.destination_service_namespace, "default");
    assert_eq!(
        attr(&attrs, "upstream_cluster"),
        Some(&AttrValue::Str("v2".into()))
    );

    let err = route
        .layer(inner)
        .oneshot(get("nosuch:9080", "/"))
        .await
        .expect_err("no route");
    assert_eq!(
        (err.flag, err.status, err.fault),
        ("NR", StatusCode::NOT_FOUND, Fault::Downstream)
    );
    assert!(
        err.reason.contains("reviews.default.svc.cluster.local"),
        "{}",
        err.reason
    );
}

#[tokio::test]
async fn balance_picks_an_endpoint_sets_peer_headers_and_drops_forged_ones() {
    let cfg = crate::routing::tests::config();
    let cluster = cfg.clusters.get("v2").cloned().expect("v2");
    let (inner, seen) = capture();
    let balance = StepLayer(balance::Balance::new(identity("productpage", "v1")));
    let mut req = get("reviews:9080", "/");
    req.headers_mut()
        .insert(peer_headers::APP, "forged".parse().expect("value"));
    req.headers_mut()
        .insert("x-lumen-anything", "forged".parse().expect("value"));
    req.extensions_mut().insert(route::Target {
        cluster,
        service: "reviews.default.svc.cluster.local".into(),
    });
    balance
        .layer(inner.clone())
        .oneshot(req)
        .await
        .expect("balanced");
    let reached = seen.lock().expect("lock").take().expect("reached");
    let endpoint = reached.extensions().get::<Endpoint>().expect("an endpoint");
    assert_eq!(&*endpoint.workload, "reviews-v2");
    let h = reached.headers();
    assert_eq!(h[peer_headers::APP], "productpage", "ours, not the app's");
    assert_eq!(h[peer_headers::ORIGINAL_DST], "127.0.10.4:9080");
    assert!(h.get("x-lumen-anything").is_none());

    // A cluster with no endpoint: UH, the upstream's fault.
    let empty = Arc::new(crate::routing::Cluster::new("empty", Vec::new()));
    let mut req = get("reviews:9080", "/");
    req.extensions_mut().insert(route::Target {
        cluster: empty,
        service: "reviews".into(),
    });
    let err = balance
        .layer(inner)
        .oneshot(req)
        .await
        .expect_err("no endpoint");
    assert_eq!((err.flag, err.fault), ("UH", Fault::Upstream));
}

#[tokio::test]
async fn a_retry_under_the_previous_hosts_predicate_goes_to_an_endpoint_not_tried() {
    use crate::routing::tests::endpoint;
    // Least request between two idle endpoints picks either, the same one again as likely as
    // not: the predicate gets the retry to the other every time.
    let mut two = crate::routing::Cluster::new(
        "two",
        vec![
            endpoint("127.0.10.3", "reviews-v1"),
            endpoint("127.0.10.4", "reviews-v2"),
        ],
    );
    two.lb = crate::lb::LbPolicy::LeastRequest;
    let two = Arc::new(two.balanced());
    let balance = StepLayer(balance::Balance::new(identity("productpage", "v1")));
    let tried = balance::Tried::new(6);
    let mut picked = Vec::new();
    for _ in 0..2 {
        let (inner, seen) = capture();
        let mut req = get("reviews:9080", "/");
        req.extensions_mut().insert(route::Target {
            cluster: two.clone(),
            service: "reviews".into(),
        });
        req.extensions_mut().insert(tried.clone());
        balance
            .clone()
            .layer(inner)
            .oneshot(req)
            .await
            .expect("balanced");
        let reached = seen.lock().expect("lock").take().expect("reached");
        picked.push(
            reached
                .extensions()
                .get::<Endpoint>()
                .expect("endpoint")
                .workload
                .clone(),
        );
    }
    assert_ne!(picked[0], picked[1], "{picked:?}");
}

#[tokio::test]
async fn inbound_reads_the_callers_identity_then_removes_it() {
    let mut cfg = MeshConfig::default();
    cfg.apply_clusters(vec![crate::routing::Cluster::new(
        "inbound|9080||",
        vec![crate::routing::tests::endpoint("127.0.0.1", "ratings-v1")],
    )]);
    cfg.versions.insert("CDS", "00000000000000c5".into());
    let (inner, seen) = capture();
    let layer = StepLayer(inbound::Inbound::new(config_rx(cfg)));
    let o = Observation::for_test(Direction::Inbound);
    let mut req = get("ratings:9080", "/ratings/0");
    for (name, value) in [
        (peer_headers::APP, "reviews"),
        (peer_headers::VERSION, "v2"),
        (peer_headers::WORKLOAD, "reviews-v2"),
        (peer_headers::NAMESPACE, "default"),
        (
            peer_headers::DESTINATION_SERVICE,
            "ratings.default.svc.cluster.local",
        ),
        (peer_headers::ORIGINAL_DST, "127.0.0.1:9080"),
    ] {
        req.headers_mut()
            .insert(name, value.parse().expect("value"));
    }
    req.extensions_mut().insert(o.clone());
    layer
        .layer(inner.clone())
        .oneshot(req)
        .await
        .expect("forwarded");
    let reached = seen.lock().expect("lock").take().expect("reached");
    assert!(
        reached
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("x-lumen-")),
        "the app sees no peer header"
    );
    assert!(reached.extensions().get::<Endpoint>().is_some());
    let (labels, attrs) = o.snapshot().expect("record");
    assert_eq!(
        (&*labels.source_app, &*labels.source_version),
        ("reviews", "v2")
    );
    assert_eq!(&*labels.destination_service_name, "ratings");
    assert_eq!(
        attr(&attrs, "peer.service"),
        Some(&AttrValue::Str("reviews".into()))
    );
    assert_eq!(
        attr(&attrs, "lumen.config.version"),
        Some(&AttrValue::Str("00000000000000c5".into()))
    );

    // No configuration yet: NC, the proxy's fault.
    let layer = StepLayer(inbound::Inbound::new(config_rx(MeshConfig::default())));
    let err = layer
        .layer(inner)
        .oneshot(get("ratings", "/"))
        .await
        .expect_err("no cluster");
    assert_eq!((err.flag, err.fault), ("NC", Fault::Proxy));
}

#[tokio::test]
async fn connect_reports_a_refused_upstream_as_uf() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut req = get("ratings", "/");
    req.extensions_mut().insert(Endpoint {
        app_addr: addr,
        connect_addr: addr,
        meshed: false,
        workload: "ratings-v1".into(),
        namespace: "default".into(),
        app: "ratings".into(),
        version: "v1".into(),
    });
    let err = connect::Connect::new()
        .oneshot(req)
        .await
        .expect_err("refused");
    assert_eq!(
        (err.flag, err.status, err.fault),
        ("UF", StatusCode::SERVICE_UNAVAILABLE, Fault::Upstream)
    );
}

/// An upstream that echoes the request's headers (name: value lines) after a moment.
async fn echo_upstream(delay: std::time::Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::serve(
        listener,
        move |req: Request<hyper::body::Incoming>| async move {
            tokio::time::sleep(delay).await;
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            let mut resp = Response::new(text_body(lines.join("\n")));
            resp.headers_mut()
                .insert("connection", "x-upstream-secret".parse().expect("value"));
            resp.headers_mut()
                .insert("x-upstream-secret", "1".parse().expect("value"));
            resp
        },
        stop,
    ));
    addr
}

#[tokio::test]
async fn the_outbound_stack_carries_a_request_end_to_end_and_replies_for_failures() {
    let upstream = echo_upstream(std::time::Duration::ZERO).await;
    let mut cfg = crate::routing::tests::config();
    let mut endpoint = crate::routing::tests::endpoint("127.0.0.1", "reviews-v2");
    endpoint.app_addr = upstream;
    endpoint.connect_addr = upstream;
    cfg.apply_endpoints(vec![("v2".into(), vec![endpoint])]);
    cfg.versions.insert("RDS", "00000000000000r1".into());
    let (reporter, mut queue) = reporter("productpage");
    let stack = outbound(config_rx(cfg), reporter, connect::Connect::new());

    let mut req = get("reviews:9080", "/reviews/0");
    req.headers_mut()
        .insert("end-user", "jason".parse().expect("value"));
    req.headers_mut()
        .insert("connection", "x-hop".parse().expect("value"));
    req.headers_mut()
        .insert("x-hop", "1".parse().expect("value"));
    let resp = stack.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("x-upstream-secret").is_none(),
        "hop-by-hop both ways"
    );
    let echoed = resp.into_body().collect().await.expect("body").to_bytes();
    let echoed = String::from_utf8_lossy(&echoed);
    assert!(echoed.contains("traceparent: 00-"), "{echoed}");
    assert!(echoed.contains("x-lumen-peer-app: productpage"), "{echoed}");
    assert!(!echoed.contains("x-hop"), "{echoed}");
    let span = queue.try_recv().expect("span");
    assert_eq!(
        attr(&span.attributes, "lumen.config.version"),
        Some(&AttrValue::Str("00000000000000r1".into()))
    );
    assert_ne!(span.context.trace_id, [0; 16], "the trace layer placed it");

    // No route: the reply says so, with the flag and whose fault.
    let resp = stack
        .oneshot(get("nosuch:9080", "/"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");
    assert_eq!(resp.headers()["x-lumen-fault"], "downstream");
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_ut() {
    let upstream = echo_upstream(std::time::Duration::from_secs(5)).await;
    let cfg = local_app(upstream);
    let (reporter, _queue) = reporter("ratings");
    let stack = inbound(
        config_rx(cfg),
        reporter,
        connect::Connect::new().with_timeout(std::time::Duration::from_millis(100)),
    );
    let resp = stack
        .oneshot(get("ratings:9080", "/"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()["x-lumen-response-flags"], "UT");
}

#[tokio::test]
async fn the_route_s_timeout_overrides_the_connector_s() {
    let upstream = echo_upstream(std::time::Duration::from_secs(5)).await;
    let endpoint = Endpoint {
        app_addr: upstream,
        connect_addr: upstream,
        meshed: false,
        workload: "ratings-v1".into(),
        namespace: "default".into(),
        app: "ratings".into(),
        version: "v1".into(),
    };
    let mut req = get("ratings", "/");
    req.extensions_mut().insert(endpoint);
    req.extensions_mut()
        .insert(connect::RouteTimeout(std::time::Duration::from_millis(100)));
    // The connector's own limit would let the upstream's 5 s pass.
    let err = connect::Connect::new()
        .with_timeout(std::time::Duration::from_secs(60))
        .oneshot(req)
        .await
        .expect_err("timed out");
    assert_eq!((err.flag, err.status), ("UT", StatusCode::GATEWAY_TIMEOUT));
    assert!(err.reason.contains("100ms"), "{}", err.reason);
}

#[tokio::test]
async fn telemetry_switches_and_the_callers_sampling_decision_are_kept() {
    let upstream = echo_upstream(std::time::Duration::ZERO).await;
    let cfg = local_app(upstream);
    let run = |switches: crate::telemetry::Switches, traceparent: Option<&'static str>| {
        let cfg = cfg.clone();
        async move {
            let (r, q) = Reporter::with_switches(identity("ratings", "v1"), 16, switches);
            let r = Arc::new(r);
            let stack = inbound(config_rx(cfg), r.clone(), connect::Connect::new());
            let mut req = get("ratings:9080", "/");
            if let Some(tp) = traceparent {
                req.headers_mut()
                    .insert(trace_context::TRACEPARENT, tp.parse().expect("value"));
            }
            let resp = stack.oneshot(req).await.expect("infallible");
            let echoed = resp.into_body().collect().await.expect("body").to_bytes();
            (r, q, String::from_utf8_lossy(&echoed).into_owned())
        }
    };
    // The caller did not sample: no span here either, and the next hop is told so; the
    // metrics still count the request.
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let (r, mut q, echoed) = run(Default::default(), Some(unsampled)).await;
    assert!(q.try_recv().is_none());
    assert!(echoed.contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(
        echoed.contains("-00\n") || echoed.ends_with("-00"),
        "{echoed}"
    );
    assert!(r.prometheus_text().contains("istio_requests_total{"));
    // Everything off: nothing recorded, the request still served.
    let off = crate::telemetry::Switches {
        span_ratio: 0.0,
        metrics: false,
    };
    let (r, mut q, echoed) = run(off, None).await;
    assert!(!echoed.is_empty());
    assert!(q.try_recv().is_none());
    assert!(!r.prometheus_text().contains("istio_requests_total{"));
}

#[tokio::test]
async fn a_hundred_thousand_hosts_cannot_grow_the_series_past_the_cap() {
    // No route for any of them: each a local reply whose series names its Host.
    let (r, _q) = Reporter::new(identity("productpage", "v1"), 16);
    let limits = crate::telemetry::SeriesLimits {
        max_series: 1_000,
        idle: std::time::Duration::from_secs(3600),
        max_label_bytes: 64,
    };
    let r = Arc::new(r.with_series_limits(limits));
    let stack = outbound(
        config_rx(MeshConfig::default()),
        r.clone(),
        connect::Connect::new(),
    );
    let baseline = r.series_count();
    for i in 0..100_000u32 {
        let host = format!("h{i}-{}.example:80", "x".repeat(200));
        let resp = stack
            .clone()
            .oneshot(get(&host, "/"))
            .await
            .expect("infallible");
        assert_eq!(resp.headers()["x-lumen-response-flags"], "NR");
    }
    assert_eq!(r.series_count(), 1_000, "at the cap, no further");
    assert_eq!(
        r.dropped_series(),
        99_000,
        "every request past it counted as dropped"
    );
    let text = r.prometheus_text();
    assert!(text.contains("lumen_proxy_metric_series_dropped_total 99000"));
    // Label values are cut to 64 bytes.
    assert!(
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .all(|l| !l.contains(&"x".repeat(65))),
        "a label value longer than the bound"
    );
    // Idle series go, and the count returns to its baseline.
    let r2 = Arc::new(
        Reporter::new(identity("productpage", "v1"), 16)
            .0
            .with_series_limits(crate::telemetry::SeriesLimits {
                idle: std::time::Duration::ZERO,
                ..limits
            }),
    );
    let stack = outbound(
        config_rx(MeshConfig::default()),
        r2.clone(),
        connect::Connect::new(),
    );
    for i in 0..50u32 {
        let _ = stack.clone().oneshot(get(&format!("h{i}:80"), "/")).await;
    }
    assert_eq!(r2.evict_idle(), 50);
    assert_eq!(r2.series_count(), baseline);
}

/// RFC 6455's own handshake example: this key must be answered with this accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket echo server on raw TCP: answers the handshake, then echoes each small text
/// frame it gets (unmasked, as a server sends).
async fn websocket_echo() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read_exact(&mut byte).await.is_err() {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !head.contains("upgrade: websocket") || !head.contains(&WS_KEY.to_ascii_lowercase()) {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return;
            }
            let len = usize::from(h[1] & 0x7f);
            let mut mask = [0u8; 4];
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut mask).await.is_err() || s.read_exact(&mut payload).await.is_err() {
                return;
            }
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            let mut frame = vec![0x81, u8::try_from(len).unwrap_or(0)];
            frame.extend_from_slice(&payload);
            if s.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_websocket_is_carried_through_the_outbound_stack() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = websocket_echo().await;
    let mut cfg = crate::routing::tests::config();
    let mut endpoint = crate::routing::tests::endpoint("127.0.0.1", "reviews-v1");
    endpoint.app_addr = upstream;
    endpoint.connect_addr = upstream;
    endpoint.meshed = false;
    cfg.apply_endpoints(vec![
        ("v1".into(), vec![endpoint.clone()]),
        ("v2".into(), vec![endpoint]),
    ]);
    let (reporter, _q) = reporter("productpage");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::serve_stack(
        listener,
        outbound(config_rx(cfg), reporter, connect::Connect::new()),
        crate::server::Limits::default(),
        Arc::new(crate::server::ConnStats::default()),
        stop.clone(),
    ));
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: reviews:9080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: websocket") && head.contains(&WS_ACCEPT.to_ascii_lowercase()),
        "{head}"
    );
    for text in ["hello", "through lumen"] {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).expect("small")];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).await.expect("frame");
        let mut echoed = vec![0u8; 2 + text.len()];
        s.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed[2..], text.as_bytes());
    }
    stop.cancel();
}

#[tokio::test]
async fn an_upstream_that_breaks_off_mid_response_is_recorded_as_ur() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        // A head promising 100 bytes, 4 of them, then the connection is gone.
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            .await;
        drop(s);
    });
    let cfg = local_app(upstream);
    let (reporter, mut queue) = reporter("ratings");
    let stack = inbound(config_rx(cfg), reporter.clone(), connect::Connect::new());
    let resp = stack
        .oneshot(get("ratings:9080", "/"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK, "the head came");
    assert!(
        resp.into_body().collect().await.is_err(),
        "the body did not"
    );
    let span = queue.try_recv().expect("span");
    assert!(span.error);
    assert_eq!(
        attr(&span.attributes, "response_flags"),
        Some(&AttrValue::Str("UR".into()))
    );
    assert!(matches!(
        attr(&span.attributes, "lumen.reason"),
        Some(AttrValue::Str(r)) if r.starts_with("upstream reset the response after 4 body bytes")
    ));
    assert!(
        reporter
            .prometheus_text()
            .contains(r#"response_flags="UR""#)
    );
}

#[tokio::test]
async fn expect_100_continue_and_chunked_bodies_go_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The upstream answers with the length of the body it got.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::serve(
        listener,
        |req: Request<hyper::body::Incoming>| async move {
            let n = req
                .into_body()
                .collect()
                .await
                .map_or(0, |b| b.to_bytes().len());
            Response::new(text_body(format!("got {n} bytes")))
        },
        stop.clone(),
    ));
    let cfg = local_app(upstream);
    let (reporter, _q) = reporter("ratings");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = listener.local_addr().expect("addr");
    tokio::spawn(crate::server::serve_stack(
        listener,
        inbound(config_rx(cfg), reporter, connect::Connect::new()),
        crate::server::Limits::default(),
        Arc::new(crate::server::ConnStats::default()),
        stop.clone(),
    ));
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: ratings\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("head");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).await.expect("interim response");
    assert_eq!(
        &interim,
        b"HTTP/1.1 100 Continue\r\n\r\n",
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"hello world").await.expect("body");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("response");
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("got 11 bytes"),
        "{resp}"
    );
    // A chunked body on a kept-alive connection.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: ratings\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .expect("chunked");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("response");
    let resp = String::from_utf8_lossy(&rest);
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("got 11 bytes"),
        "{resp}"
    );
    stop.cancel();
}

#[test]
fn http_is_told_from_opaque_bytes() {
    use crate::server::looks_like_http;
    for http in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"OPTIONS * HTTP/1.1",
        b"PRI * HTTP/2.0\r\n\r\nSM",
    ] {
        assert!(looks_like_http(http), "{:?}", String::from_utf8_lossy(http));
    }
    for opaque in [
        &b"\x16\x03\x01\x02\x00"[..],
        b"get / HTTP/1.1",
        b"SSH-2.0-OpenSSH",
        b"GETTING",
    ] {
        assert!(
            !looks_like_http(opaque),
            "{:?}",
            String::from_utf8_lossy(opaque)
        );
    }
}

/// A local app that echoes whatever bytes it gets; its address.
async fn echo_app() -> SocketAddr {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    app_addr
}

#[tokio::test]
async fn the_inbound_port_serves_http_and_opaque_tcp_alike() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The local app: echoes whatever bytes it gets.
    let app_addr = echo_app().await;
    let cfg = local_app(app_addr);
    let rx = config_rx(cfg);
    let (reporter, _q) = reporter("ratings");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::serve_stack_detecting(
        listener,
        inbound(rx.clone(), reporter.clone(), connect::Connect::new()),
        crate::server::Limits::default(),
        Arc::new(crate::server::ConnStats::default()),
        crate::server::Detect::opaque(crate::tcp::inbound_opaque(rx, reporter.clone(), None)),
        stop.clone(),
    ));
    // Opaque bytes (a TLS ClientHello's start) are carried as they are.
    let mut s = tokio::net::TcpStream::connect(port).await.expect("connect");
    let hello = b"\x16\x03\x01\x00\x05hello";
    s.write_all(hello).await.expect("write");
    let mut back = [0u8; 10];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, hello);
    drop(s);
    // A client that says nothing first (a server-speaks-first protocol) is TCP too.
    let mut s = tokio::net::TcpStream::connect(port).await.expect("connect");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.write_all(b"late").await.expect("write");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"late");
    drop(s);
    // HTTP on the same port goes through the HTTP stack (the echoing app is no HTTP server,
    // so the proxy says what went wrong in its own reply).
    let mut s = tokio::net::TcpStream::connect(port).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut resp = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 "), "{resp}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = reporter.prometheus_text();
        if text.contains("istio_tcp_connections_closed_total{reporter=\"destination\"")
            && text
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 2"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn a_port_with_a_declared_protocol_is_not_sniffed() {
    use crate::server::Declared;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The local app: echoes whatever bytes it gets (so an HTTP request that went as opaque
    // TCP comes back as it was sent; one the HTTP stack took gets the proxy's own reply).
    let app_addr = echo_app().await;
    let limits = crate::server::Limits {
        protocol_detection_timeout: std::time::Duration::from_millis(50),
        ..crate::server::Limits::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let port_declaring = |declared: Option<Declared>| {
        let stop = stop.clone();
        async move {
            let mut cfg = MeshConfig::default();
            let mut endpoint = crate::routing::tests::endpoint("127.0.0.1", "ratings-v1");
            endpoint.app_addr = app_addr;
            endpoint.connect_addr = app_addr;
            let mut cluster = crate::routing::Cluster::new("inbound|9080||", vec![endpoint]);
            cluster.declared = declared;
            cfg.apply_clusters(vec![cluster]);
            let rx = config_rx(cfg);
            let (reporter, _q) = reporter("ratings");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr");
            let mut detect = crate::server::Detect::opaque(crate::tcp::inbound_opaque(
                rx.clone(),
                reporter.clone(),
                None,
            ));
            detect.declared = crate::tcp::inbound_declared(rx.clone());
            tokio::spawn(crate::server::serve_stack_detecting(
                listener,
                inbound(rx, reporter, connect::Connect::new()),
                limits,
                Arc::new(crate::server::ConnStats::default()),
                detect,
                stop,
            ));
            port
        }
    };
    // A client that sends its request only after the detection timeout (a busy node).
    let slow_request = |port: SocketAddr| async move {
        let mut s = tokio::net::TcpStream::connect(port).await.expect("connect");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut head = [0u8; 8];
        tokio::time::timeout(std::time::Duration::from_secs(20), s.read_exact(&mut head))
            .await
            .expect("an answer in time")
            .expect("eight bytes back");
        head
    };
    let undeclared = port_declaring(None).await;
    let http = port_declaring(Some(Declared::Http)).await;
    let tcp = port_declaring(Some(Declared::Tcp)).await;
    // Undeclared: silent past the timeout, so taken for TCP (the bytes come back as sent).
    assert_eq!(&slow_request(undeclared).await, b"GET / HT");
    // Declared HTTP: the HTTP stack, however late the request.
    assert_eq!(&slow_request(http).await, b"HTTP/1.1");
    // Declared TCP: opaque at once, even for bytes that look like HTTP.
    assert_eq!(&slow_request(tcp).await, b"GET / HT");
    stop.cancel();
}

#[tokio::test]
async fn fault_delays_or_aborts_the_share_its_route_names() {
    use crate::routing::RouteFault;
    use fault::Faults;
    let fault_layer = step::AroundLayer(Faults);
    use tower::Layer;
    let every = 1_000_000;
    // An abort for every request: answered at once with its status (FI), never passed on.
    let (inner, seen) = capture();
    let mut req = get("details", "/");
    req.extensions_mut().insert(RouteFault {
        delay: None,
        abort: Some((StatusCode::from_u16(555).expect("status"), every)),
    });
    let err = fault_layer
        .layer(inner)
        .oneshot(req)
        .await
        .expect_err("aborted");
    assert_eq!((err.flag, err.status.as_u16()), ("FI", 555));
    assert!(
        seen.lock().expect("lock").is_none(),
        "the abort reached the upstream"
    );
    // A delay for every request: passed on after it, flagged DI in the record.
    let (inner, seen) = capture();
    let observation = Observation::for_test(Direction::Outbound);
    let mut req = get("ratings", "/");
    req.extensions_mut().insert(observation.clone());
    req.extensions_mut().insert(RouteFault {
        delay: Some((std::time::Duration::from_millis(50), every)),
        abort: None,
    });
    let started = std::time::Instant::now();
    let resp = fault_layer
        .layer(inner)
        .oneshot(req)
        .await
        .expect("delayed");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(50));
    assert!(seen.lock().expect("lock").is_some());
    let (labels, _) = observation.snapshot().expect("record");
    assert_eq!(&*labels.response_flags, "DI");
    // A share of none: nothing happens.
    let (inner, seen) = capture();
    let mut req = get("details", "/");
    req.extensions_mut().insert(RouteFault {
        delay: None,
        abort: Some((StatusCode::SERVICE_UNAVAILABLE, 0)),
    });
    let resp = fault_layer
        .layer(inner)
        .oneshot(req)
        .await
        .expect("passed on");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(seen.lock().expect("lock").is_some());
}

#[tokio::test]
async fn retries_follow_the_route_s_policy_and_replay_the_body() {
    use crate::routing::RetryPolicy;
    use retry::RetryLayer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::Layer;
    // An upstream path that refuses `failures` times, then answers with the body it got.
    let flaky = |failures: usize| {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < failures {
                    return Err(ProxyError::new(
                        "UF",
                        StatusCode::SERVICE_UNAVAILABLE,
                        Fault::Upstream,
                        "refused",
                    ));
                }
                let body = req.into_body().collect().await.expect("body").to_bytes();
                Ok(Response::new(text_body(body)))
            }
        });
        (svc, calls)
    };
    let post = |policy: RetryPolicy| {
        let mut req = Request::post("http://ratings/")
            .body(text_body("the body"))
            .expect("request");
        req.extensions_mut().insert(Arc::new(policy));
        req
    };
    let policy = |attempts, on: &str| RetryPolicy {
        host_selection_attempts: 0,
        attempts,
        per_try_timeout: None,
        retry_on: on.split(',').map(str::to_string).collect(),
        status_codes: Vec::new(),
    };
    // Two refusals, three retries allowed: the third attempt answers, with the whole body.
    let (svc, calls) = flaky(2);
    let resp = RetryLayer::default()
        .layer(svc)
        .oneshot(post(policy(3, "connect-failure")))
        .await
        .expect("answered");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        (calls.load(Ordering::SeqCst), &body[..]),
        (3, &b"the body"[..])
    );
    // One retry allowed: out of retries, the last failure (UF) recorded after URX, as
    // Envoy records it ("URX,UF").
    let (svc, calls) = flaky(5);
    let observation = Observation::for_test(Direction::Outbound);
    let mut req = post(policy(1, "5xx"));
    req.extensions_mut().insert(observation.clone());
    let err = RetryLayer::default()
        .layer(svc)
        .oneshot(req)
        .await
        .expect_err("out of retries");
    assert_eq!((calls.load(Ordering::SeqCst), err.flag), (2, "UF"));
    let (labels, _) = observation.snapshot().expect("record");
    assert_eq!(&*labels.response_flags, "URX");
    // A condition the policy does not name: no retry.
    let (svc, calls) = flaky(5);
    let err = RetryLayer::default()
        .layer(svc)
        .oneshot(post(policy(3, "retriable-4xx")))
        .await
        .expect_err("not retried");
    assert_eq!((calls.load(Ordering::SeqCst), err.flag), (1, "UF"));
    // A response the policy names (503 under gateway-error) is retried too.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let unavailable = tower::service_fn(move |_req: Request<Body>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let mut resp = Response::new(text_body(""));
            *resp.status_mut() = status;
            Ok::<_, ProxyError>(resp)
        }
    });
    let resp = RetryLayer::default()
        .layer(unavailable)
        .oneshot(post(policy(2, "gateway-error")))
        .await
        .expect("answered");
    assert_eq!(
        (calls.load(Ordering::SeqCst), resp.status()),
        (2, StatusCode::OK)
    );
    // An upstream that answers 503 every time: its last answer goes back, the record flagged
    // URX (as Envoy flags it).
    let unavailable = tower::service_fn(|_req: Request<Body>| async {
        let mut resp = Response::new(text_body(""));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, ProxyError>(resp)
    });
    let observation = Observation::for_test(Direction::Outbound);
    let mut req = post(policy(2, "5xx"));
    req.extensions_mut().insert(observation.clone());
    let resp = RetryLayer::default()
        .layer(unavailable)
        .oneshot(req)
        .await
        .expect("answered");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (labels, _) = observation.snapshot().expect("record");
    assert_eq!(&*labels.response_flags, "URX");
}

#[tokio::test]
async fn headers_change_the_request_going_up_and_the_response_coming_back() {
    use crate::routing::{HeaderOps, HeaderRules};
    use headers::HeaderChanges;
    let headers_layer = step::AroundLayer(HeaderChanges);
    use tower::Layer;
    let h = |n: &'static str| http::HeaderName::from_static(n);
    let v = |s: &'static str| http::HeaderValue::from_static(s);
    let rules_again = || HeaderRules {
        request: HeaderOps {
            remove: vec![h("x-drop")],
            set: vec![(h("x-set"), v("set-overwrites"))],
            add: vec![(h("x-add"), v("added"))],
        },
        response: HeaderOps {
            remove: vec![h("server")],
            set: vec![(h("x-answered-by"), v("lumen"))],
            add: vec![],
        },
    };
    let rules = rules_again();
    let upstream = tower::service_fn(move |req: Request<Body>| async move {
        let mut resp = Response::new(text_body(""));
        for (k, v) in req.headers() {
            resp.headers_mut().append(
                format!("x-seen-{k}")
                    .parse::<http::HeaderName>()
                    .expect("name"),
                v.clone(),
            );
        }
        resp.headers_mut().insert("server", v("upstream"));
        Ok::<_, ProxyError>(resp)
    });
    let mut req = get("echo", "/");
    req.headers_mut().insert("x-drop", v("gone"));
    req.headers_mut().insert("x-set", v("old"));
    req.headers_mut().insert("x-add", v("first"));
    req.extensions_mut().insert(Arc::new(rules));
    let resp = headers_layer
        .clone()
        .layer(upstream)
        .oneshot(req)
        .await
        .expect("answered");
    let hs = resp.headers();
    assert!(!hs.contains_key("x-seen-x-drop"));
    assert_eq!(hs["x-seen-x-set"], "set-overwrites");
    let added: Vec<_> = hs.get_all("x-seen-x-add").iter().collect();
    assert_eq!(added, ["first", "added"]);
    assert!(!hs.contains_key("server"));
    assert_eq!(hs["x-answered-by"], "lumen");
    // A backend's own changes apply first, the route's after (so a route's set wins), both
    // ways, as Envoy's router applies a weighted cluster's and its route's.
    let backend = HeaderRules {
        request: HeaderOps {
            remove: vec![],
            set: vec![(h("x-set"), v("backend")), (h("x-backend"), v("v1"))],
            add: vec![],
        },
        response: HeaderOps {
            remove: vec![],
            set: vec![(h("x-answered-by"), v("backend"))],
            add: vec![],
        },
    };
    let mut req = get("echo", "/");
    req.extensions_mut().insert(Arc::new(rules_again()));
    req.extensions_mut()
        .insert(headers::BackendHeaders(Arc::new(backend)));
    let resp = headers_layer
        .layer(upstream)
        .oneshot(req)
        .await
        .expect("answered");
    let hs = resp.headers();
    assert_eq!(hs["x-seen-x-set"], "set-overwrites");
    assert_eq!(hs["x-seen-x-backend"], "v1");
    assert_eq!(hs["x-answered-by"], "lumen");
}

#[tokio::test]
async fn routes_answer_redirects_and_direct_responses_themselves() {
    use crate::routing::{Answer, DirectResponse};
    use crate::routing::{PathChange, PathMatch, Redirect};
    use answer::{Answering, Redirecting, RouteAnswers, location};
    let answer_layer = step::AroundLayer(RouteAnswers);
    use tower::Layer;
    let redirecting = |r: Redirect, matched: PathMatch| Redirecting {
        redirect: Arc::new(r),
        matched,
    };
    let plain = Redirect {
        scheme: None,
        host: None,
        port: None,
        path: None,
        status: StatusCode::FOUND,
        strip_query: false,
    };
    let req = |host: &str, path: &str| get(host, path);
    // Only the host: it replaces the request's whole authority, port included (as Envoy's
    // `host_redirect`); the rest of the URL stays.
    let to_host = redirecting(
        Redirect {
            host: Some("example.org".into()),
            ..plain.clone()
        },
        PathMatch::Prefix("/".into()),
    );
    assert_eq!(
        location(&req("echo:8080", "/a/b?x=1"), &to_host),
        "http://example.org/a/b?x=1"
    );
    // A scheme change keeps the request's port unless it was the old scheme's default.
    let https = redirecting(
        Redirect {
            scheme: Some("https".into()),
            ..plain.clone()
        },
        PathMatch::Prefix("/".into()),
    );
    assert_eq!(
        location(&req("echo:8080", "/"), &https),
        "https://echo:8080/"
    );
    assert_eq!(location(&req("echo:80", "/"), &https), "https://echo/");
    // A port named replaces the request's, even the scheme's default.
    let to_port = redirecting(
        Redirect {
            port: Some(80),
            ..plain.clone()
        },
        PathMatch::Prefix("/".into()),
    );
    assert_eq!(
        location(&req("echo:8080", "/"), &to_port),
        "http://echo:80/"
    );
    // The part the prefix matched, replaced; the query stripped when asked.
    let prefix = redirecting(
        Redirect {
            path: Some(PathChange::Prefix("/v2".into())),
            strip_query: true,
            ..plain.clone()
        },
        PathMatch::SeparatedPrefix("/v1".into()),
    );
    assert_eq!(
        location(&req("echo", "/v1/items?x=1"), &prefix),
        "http://echo/v2/items"
    );
    let full = redirecting(
        Redirect {
            path: Some(PathChange::Full("/new".into())),
            ..plain.clone()
        },
        PathMatch::Exact("/old".into()),
    );
    assert_eq!(location(&req("echo", "/old"), &full), "http://echo/new");
    // The layer answers itself; nothing goes upstream.
    let (inner, seen) = capture();
    let mut r = req("echo", "/old");
    r.extensions_mut().insert(Answering {
        answer: Answer::Redirect(full.redirect.clone()),
        matched: full.matched.clone(),
    });
    let resp = answer_layer
        .clone()
        .layer(inner)
        .oneshot(r)
        .await
        .expect("answered");
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "http://echo/new");
    assert!(seen.lock().expect("lock").is_none());
    // A direct response: the route's status and body.
    let (inner, seen) = capture();
    let mut r = req("echo", "/maintenance");
    r.extensions_mut().insert(Answering {
        answer: Answer::Direct(Arc::new(DirectResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: "down for maintenance".into(),
        })),
        matched: PathMatch::Prefix("/".into()),
    });
    let resp = answer_layer
        .layer(inner)
        .oneshot(r)
        .await
        .expect("answered");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"down for maintenance");
    assert!(seen.lock().expect("lock").is_none());
}

#[test]
fn path_changes_replace_the_whole_path_or_the_matched_prefix() {
    use crate::routing::{PathChange, PathMatch};
    let prefix = |p: &str| PathChange::Prefix(p.into());
    let sep = PathMatch::SeparatedPrefix("/v1".into());
    assert_eq!(prefix("/v2").apply("/v1/items", &sep), "/v2/items");
    assert_eq!(prefix("/").apply("/v1/items", &sep), "/items");
    assert_eq!(prefix("/").apply("/v1", &sep), "/");
    assert_eq!(
        PathChange::Full("/new".into()).apply("/v1/items", &sep),
        "/new"
    );
    assert_eq!(
        prefix("/reviews").apply("/api/reviews/1", &PathMatch::Prefix("/api/reviews".into())),
        "/reviews/1"
    );
}

#[tokio::test]
async fn a_route_s_rewrite_changes_the_path_and_host_going_upstream() {
    use crate::routing::{PathChange, Rewrite};
    let mut cfg = crate::routing::tests::config();
    // The jason route of reviews, rewritten: its prefix `/` becomes `/v2/`, its host another.
    let rc = cfg
        .routes
        .values()
        .next()
        .cloned()
        .expect("a route configuration");
    let mut rc = (*rc).clone();
    rc.virtual_hosts[0].routes[0].rewrite = Some(Arc::new(Rewrite {
        path: Some(PathChange::Prefix("/v2/".into())),
        host: Some("reviews.internal".into()),
    }));
    cfg.routes.insert(rc.name.clone(), Arc::new(rc));
    let (inner, seen) = capture();
    let route = StepLayer(route::Route::new(config_rx(cfg)));
    let mut req = get("reviews:9080", "/reviews/0?x=1");
    req.headers_mut()
        .insert("end-user", "jason".parse().expect("value"));
    route.layer(inner).oneshot(req).await.expect("routed");
    let reached = seen.lock().expect("lock").take().expect("reached inside");
    assert_eq!(
        reached.uri().path_and_query().map(|p| p.as_str()),
        Some("/v2/reviews/0?x=1")
    );
    assert_eq!(reached.headers()["host"], "reviews.internal");
}

#[tokio::test]
async fn mirrors_send_a_copy_with_a_shadow_host_and_the_request_goes_on() {
    use mirror::{MirrorLayer, Mirroring, shadow_host};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::Layer;
    assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
    assert_eq!(shadow_host("reviews"), "reviews-shadow");
    // The shadow: tells what it received (its request head and body), answers 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shadow = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("the body") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await;
        let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
    });
    let cluster = Arc::new(crate::routing::Cluster::new(
        "outbound|9080||ratings-shadow",
        vec![Endpoint {
            app_addr: shadow,
            connect_addr: shadow,
            meshed: false,
            workload: "ratings-v2".into(),
            namespace: "default".into(),
            app: "ratings".into(),
            version: "v2".into(),
        }],
    ));
    let (inner, seen) = capture();
    let mut req = Request::post("http://ratings:9080/rate")
        .body(text_body("the body"))
        .expect("request");
    req.extensions_mut()
        .insert(Mirroring(vec![(cluster, 1_000_000)]));
    let resp = MirrorLayer::default()
        .layer(inner)
        .oneshot(req)
        .await
        .expect("answered");
    // The request itself went on, whole.
    assert_eq!(resp.status(), StatusCode::OK);
    let reached = seen.lock().expect("lock").take().expect("passed on");
    let body = reached
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"the body");
    // And the shadow got its copy, the host marked.
    let copy = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
        .await
        .expect("the copy within 10 s")
        .expect("copy");
    assert!(copy.starts_with("POST /rate HTTP/1.1"), "{copy}");
    assert!(
        copy.to_ascii_lowercase()
            .contains("host: ratings-shadow:9080"),
        "{copy}"
    );
    assert!(copy.ends_with("the body"), "{copy}");
}

#[tokio::test]
async fn cors_answers_allowed_preflights_and_decorates_allowed_origins() {
    use crate::routing::{CorsPolicy, ValueMatch};
    use tower::Layer;
    let policy = |forward: bool| {
        Arc::new(CorsPolicy {
            allow_origins: vec![ValueMatch::Exact("https://app.example".into())],
            allow_methods: "GET,PUT".into(),
            allow_headers: "*".into(),
            expose_headers: "x-trace".into(),
            max_age: "600".into(),
            allow_credentials: true,
            allow_private_network_access: false,
            forward_not_matching_preflights: forward,
        })
    };
    let request = |method: &str, origin: &str, preflight: bool, forward: bool| {
        let mut b = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "reviews")
            .header("origin", origin);
        if preflight {
            b = b
                .header("access-control-request-method", "PUT")
                .header("access-control-request-headers", "x-a");
        }
        let mut req = b.body(text_body("")).expect("request");
        req.extensions_mut().insert(policy(forward));
        req
    };
    let layer = step::AroundLayer(cors::Cors);
    let header = |resp: &Response<Body>, name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("text").to_string())
    };
    // An allowed preflight: answered here, with what the policy allows.
    let (inner, seen) = capture();
    let resp = layer
        .clone()
        .layer(inner)
        .oneshot(request("OPTIONS", "https://app.example", true, true))
        .await
        .expect("answered");
    assert!(seen.lock().expect("lock").is_none(), "went upstream");
    assert_eq!(resp.status(), StatusCode::OK);
    for (name, value) in [
        ("access-control-allow-origin", "https://app.example"),
        ("access-control-allow-methods", "GET,PUT"),
        ("access-control-allow-headers", "x-a"),
        ("access-control-max-age", "600"),
        ("access-control-allow-credentials", "true"),
        ("access-control-expose-headers", "x-trace"),
    ] {
        assert_eq!(header(&resp, name).as_deref(), Some(value), "{name}");
    }
    // A preflight from another origin goes upstream, untouched.
    let (inner, seen) = capture();
    let resp = layer
        .clone()
        .layer(inner)
        .oneshot(request("OPTIONS", "https://evil.example", true, true))
        .await
        .expect("forwarded");
    assert!(seen.lock().expect("lock").is_some());
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    // ... unless unmatched preflights are not forwarded: 200 here, no origin allowed.
    let (inner, seen) = capture();
    let resp = layer
        .clone()
        .layer(inner)
        .oneshot(request("OPTIONS", "https://evil.example", true, false))
        .await
        .expect("answered");
    assert!(seen.lock().expect("lock").is_none());
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    // A request from an allowed origin: upstream's answer, decorated.
    let (inner, seen) = capture();
    let resp = layer
        .clone()
        .layer(inner)
        .oneshot(request("GET", "https://app.example", false, true))
        .await
        .expect("forwarded");
    assert!(seen.lock().expect("lock").is_some());
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        header(&resp, "access-control-expose-headers").as_deref(),
        Some("x-trace")
    );
    assert_eq!(header(&resp, "access-control-allow-methods"), None);
}

#[test]
fn a_request_body_sent_again_by_a_retry_counts_once() {
    use observe::{AttemptBytes, CountInto};
    use std::sync::atomic::{AtomicU64, Ordering};
    let request = Arc::new(AtomicU64::new(0));
    for _ in 0..3 {
        let mut attempt = AttemptBytes {
            request: request.clone(),
            sent: 0,
        };
        attempt.add(100);
        attempt.add(20);
    }
    assert_eq!(request.load(Ordering::Relaxed), 120);
}
