//! SIGTERM during steady load, as Kubernetes stops a pod: the `lumen-proxy` binary, with a
//! real control plane and telemetry service in this process, serves reviews-v1's inbound
//! traffic to a slow app; mid-load it gets SIGTERM. Every request the app received gets its
//! full response back through the proxy, the proxy exits 0 within its drain period, and the
//! span of every completed request reaches the telemetry service.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use lumen_control::model::Model;
use lumen_control::source::ConfigSource;
use lumen_control::{Control, ControlOptions};
use lumen_telemetry::{Telemetry, TelemetryOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const POD: &str = "127.0.83.3";
const APP_BODY: &str = "reviews-v1 answered";

#[derive(Debug, Default)]
struct Tally {
    /// Complete 200 responses with the app's body.
    ok: AtomicU64,
    /// Any other response, or one cut short after it began.
    failed: AtomicU64,
    /// Refused or closed before a single byte (after the listener stopped accepting).
    not_accepted: AtomicU64,
}

async fn one_request(addr: &str) -> Result<String, std::io::Error> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_requests_in_flight_and_flushes_their_spans() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let stop = CancellationToken::new();

    // The telemetry service.
    let data = tempfile::tempdir().expect("tempdir");
    let mut options = TelemetryOptions::new(data.path().to_path_buf());
    options.otlp_grpc_addr = any;
    options.otlp_http_addr = any;
    options.http_addr = any;
    options.jaeger_grpc_addr = any;
    options.flush_interval = Duration::from_secs(1);
    let telemetry = Telemetry::bind(options).await.expect("telemetry binds");
    let otlp = telemetry.otlp_grpc_addr().expect("otlp addr");
    let engine = telemetry.query_engine();
    tokio::spawn({
        let stop = stop.clone();
        async move { telemetry.run(axum_free_router(), stop).await }
    });

    // The control plane, serving the demo's model on this test's /24.
    let mut model = Model::from_yaml(
        "bookinfo.yaml",
        include_str!("../../fixtures/demo/bookinfo.yaml"),
    )
    .expect("demo model");
    model.move_pods([127, 0, 10], [127, 0, 83]);
    let control = Control::bind(ControlOptions {
        xds_addr: any,
        http_addr: any,
        source: ConfigSource::Static(model),
    })
    .await
    .expect("control binds");
    let xds = control.xds_addr().expect("xds addr");
    tokio::spawn({
        let stop = stop.clone();
        async move { control.run(stop).await }
    });

    // reviews-v1's app: 80 ms a request, counting what it receives.
    let received = Arc::new(AtomicU64::new(0));
    let app = tokio::net::TcpListener::bind(format!("{POD}:9080"))
        .await
        .expect("app binds");
    tokio::spawn({
        let received = received.clone();
        lumen_proxy::server::serve(
            app,
            move |_req: Request<Incoming>| {
                let received = received.clone();
                async move {
                    received.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(80)).await;
                    Response::new(lumen_proxy::http::text_body(APP_BODY))
                }
            },
            stop.clone(),
        )
    });

    // The proxy binary, from the demo's bootstrap pointed at them.
    let bootstrap = include_str!("../../fixtures/proxy/bootstrap.yaml")
        .replace("127.0.10.3", POD)
        .replace("port_value: 15010", &format!("port_value: {}", xds.port()))
        .replace("port_value: 4317", &format!("port_value: {}", otlp.port()));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = common::start_proxy(dir.path(), "bootstrap.yaml", &bootstrap, "warn");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://{POD}:15000/ready")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Steady load: 16 clients, a new connection a request, at most 4,000 requests.
    let tally = Arc::new(Tally::default());
    let loading = Arc::new(AtomicBool::new(true));
    let budget = Arc::new(AtomicU64::new(4_000));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (tally, loading, budget) = (tally.clone(), loading.clone(), budget.clone());
        clients.push(tokio::spawn(async move {
            let inbound = format!("{POD}:15006");
            while loading.load(Ordering::SeqCst)
                && budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                match one_request(&inbound).await {
                    Ok(r) if r.starts_with("HTTP/1.1 200") && r.ends_with(APP_BODY) => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) if r.is_empty() => {
                        tally.not_accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => {
                        eprintln!("failed: {r:?}");
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        tally.not_accepted.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = tally.ok.load(Ordering::SeqCst);
    assert!(before > 0, "no request got through before the signal");
    let pid = child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let signalled = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the proxy stops within its drain period")
        .expect("wait");
    assert!(exit.success(), "SIGTERM is a clean stop: {exit:?}");
    eprintln!("stopped {:?} after SIGTERM", signalled.elapsed());
    loading.store(false, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let (ok, failed, not_accepted) = (
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
        tally.not_accepted.load(Ordering::SeqCst),
    );
    eprintln!("ok {ok}, failed {failed}, not accepted {not_accepted}");
    assert_eq!(failed, 0, "a request the proxy took failed");
    assert_eq!(
        received.load(Ordering::SeqCst),
        ok,
        "every request the app received got its response back"
    );

    // The span of every completed request reached the telemetry service.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let r = engine
            .sql("SELECT count(*) AS n FROM spans WHERE service_name = 'reviews' AND span_kind = 'server'")
            .await
            .expect("query");
        let n = r.rows[0]["n"].as_u64().unwrap_or(0);
        if n >= ok || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(spans, ok, "one server span per completed request");
    stop.cancel();
}

/// The telemetry service's HTTP port needs no dashboard here.
fn axum_free_router() -> axum::Router {
    axum::Router::new()
}
