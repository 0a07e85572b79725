//! Route matching cost (issue 9): the proxy's routing decision for a request to the last of
//! 1,000 services (each its own virtual host with Istio's domains, as `lumen control` writes
//! them) ÷ the same decision with one service. Goal ≤ 1.5.
//!
//! `cargo bench -p lumen-proxy --bench routing`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use lumen_api::pb::envoy::config::route::v3 as xroute;
use lumen_proxy::routing::{Cluster, MeshConfig, RouteConfig};

/// A route configuration `9080` with `n` virtual hosts (`svc-i` in `default`, Istio's domain
/// forms), each with a prefix route to its own cluster.
fn mesh(n: usize) -> MeshConfig {
    let virtual_hosts = (0..n)
        .map(|i| {
            let fqdn = format!("svc-{i}.default.svc.cluster.local");
            let mut domains = Vec::new();
            for d in [
                format!("svc-{i}"),
                format!("svc-{i}.default"),
                format!("svc-{i}.default.svc"),
                fqdn.clone(),
            ] {
                domains.push(format!("{d}:9080"));
                domains.push(d);
            }
            xroute::VirtualHost {
                name: format!("{fqdn}:9080"),
                domains,
                routes: vec![xroute::Route {
                    name: "default".into(),
                    r#match: Some(xroute::RouteMatch {
                        path_specifier: Some(xroute::route_match::PathSpecifier::Prefix(
                            "/".into(),
                        )),
                        ..Default::default()
                    }),
                    action: Some(xroute::route::Action::Route(xroute::RouteAction {
                        cluster_specifier: Some(xroute::route_action::ClusterSpecifier::Cluster(
                            format!("outbound|9080||{fqdn}"),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    let rc = RouteConfig::try_from(xroute::RouteConfiguration {
        name: "9080".into(),
        virtual_hosts,
        ..Default::default()
    })
    .expect("route configuration");
    let clusters = (0..n)
        .map(|i| {
            let name = format!("outbound|9080||svc-{i}.default.svc.cluster.local");
            (name.clone(), Arc::new(Cluster::new(name, Vec::new())))
        })
        .collect();
    MeshConfig {
        routes: [("9080".to_string(), Arc::new(rc))].into_iter().collect(),
        clusters,
        ..Default::default()
    }
}

/// Nanoseconds a decision for the last service takes (best of 5 rounds of 200,000).
fn cost(config: &MeshConfig, n: usize) -> f64 {
    let host = format!("svc-{}:9080", n - 1);
    let headers = http::HeaderMap::new();
    let method = http::Method::GET;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let rounds = 200_000;
        let started = Instant::now();
        for i in 0..rounds {
            let d = config.route(
                black_box(&host),
                &method,
                black_box("/reviews/1"),
                &headers,
                i,
            );
            black_box(d.is_ok());
        }
        best = best.min(started.elapsed().as_nanos() as f64 / f64::from(rounds));
    }
    best
}

fn main() {
    let one = mesh(1);
    let thousand = mesh(1000);
    assert!(
        one.route(
            "svc-0:9080",
            &http::Method::GET,
            "/",
            &http::HeaderMap::new(),
            0
        )
        .is_ok()
    );
    assert!(
        thousand
            .route(
                "svc-999:9080",
                &http::Method::GET,
                "/",
                &http::HeaderMap::new(),
                0
            )
            .is_ok()
    );
    let (a, b) = (cost(&one, 1), cost(&thousand, 1000));
    println!("| measure | 1 route | 1,000 routes | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| routing decision, request to the last service | {a:.0} ns | {b:.0} ns | **{:.2}** | ≤ 1.5 |",
        b / a
    );
}
