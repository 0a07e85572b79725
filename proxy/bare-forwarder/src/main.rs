//! The bare forwarder the proxy benchmark measures lumen-proxy against
//! (`lumen-bare-forwarder LISTEN_PORT UPSTREAM_PORT`): hyper's HTTP/1.1 server and pooled client with
//! nothing between them (no routing, no telemetry, no limits), on one thread (tokio's
//! current-thread runtime, as lumen-proxy uses on one core), on loopback. scripts/bench-proxy builds it with the `proxy` profile, as it
//! builds lumen-proxy.

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = |k: usize| -> u16 {
        args.get(k)
            .and_then(|v| v.parse().ok())
            .expect("usage: lumen-bare-forwarder LISTEN_PORT UPSTREAM_PORT")
    };
    let (listen, upstream) = (port(1), port(2));
    // One thread, as the issue defines the limit (and as lumen-proxy runs on one core).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
            .await
            .expect("bind");
        let client: Client<_, hyper::body::Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut req: http::Request<hyper::body::Incoming>| {
                        let client = client.clone();
                        async move {
                            let path = req
                                .uri()
                                .path_and_query()
                                .map_or("/", |p| p.as_str())
                                .to_string();
                            *req.uri_mut() = format!("http://127.0.0.1:{upstream}{path}")
                                .parse()
                                .expect("uri");
                            let resp = client.request(req).await?;
                            Ok::<_, hyper_util::client::legacy::Error>(resp.map(|b| b.boxed()))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
