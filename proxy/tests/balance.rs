//! DestinationRule load balancers carried out by a sidecar, end to end (control plane over
//! ADS, the proxy, four real upstream apps): session affinity on a header (a ring) and on a
//! cookie the proxy makes up (Maglev), least request and peak EWMA (the default) steering
//! away from a slow endpoint,
//! outlier detection ejecting a failing endpoint, and circuit breakers refusing overflow.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use lumen_control::model::Model;
use lumen_control::source::ConfigSource;
use lumen_control::{Control, ControlOptions};
use lumen_proxy::{ExportOptions, Identity, Proxy, ProxyConfig};
use tokio_util::sync::CancellationToken;

const SUBNET: &str = "127.0.87";

fn mesh() -> String {
    let mut yaml = String::new();
    for (svc, lb) in [
        ("sticky", "consistentHash: {httpHeaderName: x-user}"),
        (
            "cookie",
            "consistentHash: {httpCookie: {name: lumen-affinity, ttl: 3600s, path: /}, maglev: {tableSize: 65537}}",
        ),
        ("least", "simple: LEAST_REQUEST"),
        ("plain", "simple: ROUND_ROBIN"),
    ] {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\nspec:\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 9080}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {svc}}}\nspec:\n  host: {svc}\n  trafficPolicy: {{loadBalancer: {{{lb}}}}}\n---\n"
        ));
    }
    for (svc, policy) in [
        (
            "flaky",
            "loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}",
        ),
        (
            "narrow",
            "connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}",
        ),
    ] {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\nspec:\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 9080}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {svc}}}\nspec:\n  host: {svc}\n  trafficPolicy: {{{policy}}}\n---\n"
        ));
    }
    // No DestinationRule: Lumen's default balancer (peak EWMA in lumen-proxy).
    yaml.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: ewma}\nspec:\n  selector: {app: echo}\n  ports: [{name: http, port: 9080}]\n---\n");
    // flaky's 503s reach the caller: Istio's default retries (which would send each to
    // another endpoint) turned off.
    yaml.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: flaky}\nspec:\n  hosts: [flaky]\n  http:\n  - route: [{destination: {host: flaky}}]\n    retries: {attempts: 0}\n---\n");
    for i in 1..=4 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-{i}\n  labels: {{app: echo, version: v1}}\n  annotations: {{sidecar.istio.io/inject: 'false'}}\nspec:\n  containers: [{{name: echo, ports: [{{containerPort: 9080}}]}}]\nstatus: {{podIP: {SUBNET}.1{i}}}\n---\n"
        ));
    }
    yaml.push_str(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  labels: {{app: client, version: v1}}\nspec:\n  containers: [{{name: client}}]\nstatus: {{podIP: {SUBNET}.1}}\n"
    ));
    yaml
}

/// Echo apps at .11–.14: each answers with its name; `echo-1` takes 300 ms for `/slow`,
/// `echo-2` fails `/flaky` with 503, and every one takes 300 ms for `/hold`.
fn apps(stop: &CancellationToken) {
    for i in 1..=4u8 {
        let listener =
            std::net::TcpListener::bind(format!("{SUBNET}.1{i}:9080")).expect("app binds");
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let name: &'static str = ["echo-1", "echo-2", "echo-3", "echo-4"][usize::from(i - 1)];
        tokio::spawn(lumen_proxy::server::serve(
            listener,
            move |req: Request<Incoming>| async move {
                if name == "echo-1" && req.uri().path() == "/slow" || req.uri().path() == "/hold" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let mut resp = Response::new(lumen_proxy::http::text_body(name));
                if name == "echo-2" && req.uri().path() == "/flaky" {
                    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                resp
            },
            stop.clone(),
        ));
    }
}

async fn start(stop: &CancellationToken) -> SocketAddr {
    let mut model = Model::from_yaml("balance.yaml", &mesh()).expect("model");
    model.check();
    assert!(model.rejected.is_empty(), "{:?}", model.rejected);
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let control = Control::bind(ControlOptions {
        xds_addr: any,
        http_addr: any,
        source: ConfigSource::Static(model),
    })
    .await
    .expect("control binds");
    let xds = control.xds_addr().expect("xds");
    tokio::spawn(control.run(stop.clone()));
    apps(stop);
    let identity = Identity {
        workload: "client".into(),
        namespace: "default".into(),
        app: "client".into(),
        version: "v1".into(),
        pod: "client".into(),
    };
    let ip = format!("{SUBNET}.1").parse().expect("ip");
    let config = ProxyConfig::sidecar(ip, identity, format!("http://{xds}"), None);
    let proxy = Proxy::bind(config, ExportOptions::default())
        .await
        .expect("proxy binds");
    let outbound = proxy.outbound_addr().expect("outbound");
    tokio::spawn(proxy.run(stop.clone()));
    // Ready once every service routes.
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    for svc in ["sticky", "cookie", "least", "plain", "flaky", "narrow"] {
        loop {
            let ok = client
                .get(format!("http://{outbound}/"))
                .header("host", format!("{svc}:9080"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{svc} never routed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    outbound
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn who(
    client: &reqwest::Client,
    outbound: SocketAddr,
    svc: &str,
    header: Option<(&str, &str)>,
) -> (String, Option<String>) {
    let mut req = client
        .get(format!("http://{outbound}/"))
        .header("host", format!("{svc}:9080"));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("answered");
    assert!(resp.status().is_success(), "{}", resp.status());
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (resp.text().await.expect("body"), cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_traffic_policies_work_as_istio_users_expect() {
    let stop = CancellationToken::new();
    let outbound = start(&stop).await;
    let client = client();

    // A header: each user always reaches the same endpoint, and the users spread.
    let mut homes = BTreeMap::new();
    for user in 0..40 {
        let user = format!("user-{user}");
        let (first, _) = who(&client, outbound, "sticky", Some(("x-user", &user))).await;
        for _ in 0..5 {
            let (again, _) = who(&client, outbound, "sticky", Some(("x-user", &user))).await;
            assert_eq!(again, first, "{user} moved");
        }
        *homes.entry(first).or_insert(0) += 1;
    }
    assert!(homes.len() >= 3, "40 users on {homes:?}");

    // A cookie with a TTL: a request without one gets one made up, and the requests that
    // send it back stick to one endpoint.
    let (first, set) = who(&client, outbound, "cookie", None).await;
    let set = set.expect("a Set-Cookie for a request without the cookie");
    assert!(
        set.starts_with("lumen-affinity=\"")
            && set.contains("Max-Age=3600")
            && set.contains("Path=/"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("name=value").to_string();
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        let (answer, again) = who(&client, outbound, "cookie", Some(("cookie", &cookie))).await;
        assert!(
            again.is_none(),
            "the cookie was sent, none is made up: {again:?}"
        );
        *seen.entry(answer).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), [&first], "{seen:?}");

    // Least request: echo-1 holds /slow for 300 ms, so it has requests in flight while the
    // others answer at once; with 8 concurrent callers it gets far fewer than round robin's
    // quarter (here at most half of it). Round robin on the same endpoints is the control.
    async fn shares(outbound: SocketAddr, svc: &'static str) -> BTreeMap<String, usize> {
        let client = crate::client();
        let counts = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut workers = Vec::new();
        for _ in 0..8 {
            let (client, counts) = (client.clone(), counts.clone());
            workers.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let resp = client
                        .get(format!("http://{outbound}/slow"))
                        .header("host", format!("{svc}:9080"))
                        .send()
                        .await
                        .expect("answered");
                    let body = resp.text().await.expect("body");
                    *counts.lock().expect("lock").entry(body).or_insert(0) += 1;
                }
            }));
        }
        for w in workers {
            w.await.expect("worker");
        }
        counts.lock().expect("lock").clone()
    }
    let least = shares(outbound, "least").await;
    let plain = shares(outbound, "plain").await;
    let slow = |m: &BTreeMap<String, usize>| m.get("echo-1").copied().unwrap_or(0);
    eprintln!("200 requests, echo-1 slow: least request {least:?}, round robin {plain:?}");
    assert_eq!(
        slow(&plain),
        50,
        "round robin gives each a quarter: {plain:?}"
    );
    assert!(
        slow(&least) <= slow(&plain) / 2,
        "least request sent {} of 200 to the slow endpoint: {least:?}",
        slow(&least)
    );

    // Peak EWMA (the default without a DestinationRule): one caller at a time, so no
    // endpoint ever has a request in flight when the next is picked and least request could
    // not tell them apart; the latency estimate can. Once echo-1 has answered /slow in
    // 300 ms it is not picked again while its estimate decays (300 ms × e^(-t/10 s) stays
    // above the others' for about a minute): round robin would send it 10 of 40.
    let mut ewma = BTreeMap::new();
    for _ in 0..40 {
        let resp = client
            .get(format!("http://{outbound}/slow"))
            .header("host", "ewma:9080")
            .send()
            .await
            .expect("answered");
        *ewma.entry(resp.text().await.expect("body")).or_insert(0) += 1;
    }
    eprintln!("40 requests one at a time, echo-1 slow: peak EWMA {ewma:?}");
    assert!(
        slow(&ewma) <= 3,
        "peak EWMA sent {} of 40 to the slow endpoint: {ewma:?}",
        slow(&ewma)
    );

    // Outlier detection: echo-2 fails /flaky; after two 503s in a row it is ejected for
    // 60 s, so of 40 requests round robin only its first two fail.
    let mut failed = 0;
    let mut answered = BTreeMap::new();
    for _ in 0..40 {
        let resp = client
            .get(format!("http://{outbound}/flaky"))
            .header("host", "flaky:9080")
            .send()
            .await
            .expect("answered");
        let status = resp.status();
        let body = resp.text().await.expect("body");
        if status == 503 {
            failed += 1;
        }
        *answered.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        failed, 2,
        "echo-2 ejected after two failures in a row: {answered:?}"
    );

    // Circuit breakers: one connection and one waiting request; of 8 concurrent 300 ms
    // requests, the rest are refused at once with 503 and flag UO.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let resp = client
                .get(format!("http://{outbound}/hold"))
                .header("host", "narrow:9080")
                .send()
                .await
                .expect("answered");
            let flag = resp
                .headers()
                .get("x-lumen-response-flags")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (resp.status().as_u16(), flag)
        }));
    }
    let mut outcomes = Vec::new();
    for c in calls {
        outcomes.push(c.await.expect("call"));
    }
    let ok = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let overflow = outcomes
        .iter()
        .filter(|(s, f)| *s == 503 && f.as_deref() == Some("UO"))
        .count();
    assert!(
        (1..=2).contains(&ok) && ok + overflow == 8,
        "one in flight and one waiting pass, the rest overflow: {outcomes:?}"
    );
    stop.cancel();
}
