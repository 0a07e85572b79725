//! Golden tests: the route configuration (RDS) `lumen control` sends productpage's sidecar
//! for bookinfo's routing samples from Istio (`../shared/conformance`), beside bookinfo's
//! Services and Pods (`fixtures/demo/bookinfo.yaml`) and `destination-rule-all.yaml`. Each is
//! pinned in `fixtures/golden/`; a change to the translation shows up as a diff there.
//! `LUMEN_WRITE_GOLDEN=1` writes them.

mod common;

use common::conformance;
use std::fmt::Write as _;
use std::path::PathBuf;

use lumen_api::pb::envoy::config::route::v3 as route;
use lumen_api::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use lumen_api::type_url;
use lumen_control::Model;
use lumen_control::translate::{ProxyNode, translate};
use prost::Message;

/// productpage's route configuration for port 9080 with `sample` applied, as text: the
/// configuration's Debug form with each route's fault filter configuration decoded.
fn routes_with(sample: &str) -> String {
    let read = |p: PathBuf| std::fs::read_to_string(p).expect("read");
    let mut model = Model::from_yaml(
        "bookinfo.yaml",
        include_str!("../../fixtures/demo/bookinfo.yaml"),
    )
    .expect("bookinfo");
    model
        .add_yaml(
            "destination-rule-all.yaml",
            &read(conformance(
                "istio/bookinfo/networking/destination-rule-all.yaml",
            )),
        )
        .expect("subsets");
    model
        .add_yaml(
            sample,
            &read(conformance(&format!("istio/bookinfo/networking/{sample}"))),
        )
        .expect("sample");
    model.check();
    assert!(model.rejected.is_empty(), "{sample}: {:?}", model.rejected);
    let node =
        ProxyNode::parse("sidecar~127.0.10.1~productpage-v1.default~default.svc.cluster.local")
            .expect("node");
    let res = translate(&model, &node);
    let rc = res
        .of_type(type_url::ROUTE)
        .iter()
        .find(|r| r.name == "9080")
        .map(|r| route::RouteConfiguration::decode(r.any().value.as_slice()).expect("routes"))
        .expect("route configuration 9080");
    let mut out = String::new();
    let mut plain = rc.clone();
    for vh in &mut plain.virtual_hosts {
        for r in &mut vh.routes {
            for (name, any) in std::mem::take(&mut r.typed_per_filter_config) {
                let fault = HttpFault::decode(any.value.as_slice()).expect("fault config");
                let _ = writeln!(out, "route {:?} {name}: {fault:#?}", r.name);
            }
        }
    }
    format!("{plain:#?}\n{out}")
}

#[test]
fn bookinfo_routes_are_pinned() {
    let dir = PathBuf::from(format!(
        "{}/../fixtures/golden",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    ));
    let write = std::env::var_os("LUMEN_WRITE_GOLDEN").is_some();
    for sample in [
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-test-v2.yaml",
        "virtual-service-reviews-80-20.yaml",
        "virtual-service-reviews-90-10.yaml",
        "virtual-service-ratings-test-delay.yaml",
        "virtual-service-ratings-test-abort.yaml",
    ] {
        let text = routes_with(sample);
        let path = dir.join(sample.replace(".yaml", ".rds.txt"));
        if write {
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(&path, &text).expect("write");
            continue;
        }
        let pinned = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; write it with LUMEN_WRITE_GOLDEN=1 cargo test -p lumen-control --test golden", path.display())
        });
        assert!(
            pinned == text,
            "{sample}: the route configuration changed from {}; if that is intended, regenerate with LUMEN_WRITE_GOLDEN=1 cargo test -p lumen-control --test golden\n{text}",
            path.display()
        );
    }
    // What the samples say, read off the pins rather than trusted to them.
    let delay = routes_with("virtual-service-ratings-test-delay.yaml");
    assert!(
        delay.contains("seconds: 7") && delay.contains("numerator: 1000000"),
        "{delay}"
    );
    let abort = routes_with("virtual-service-ratings-test-abort.yaml");
    assert!(
        abort.contains("HttpStatus(\n") && abort.contains("500"),
        "{abort}"
    );
    let split = routes_with("virtual-service-reviews-80-20.yaml");
    assert!(
        split.contains("value: 80") && split.contains("value: 20"),
        "{split}"
    );
}
