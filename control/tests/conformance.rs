//! Istio's and Gateway API's own YAML (`../shared/conformance`, or `LUMEN_CONFORMANCE_DIR`)
//! read into Lumen's resource types: every VirtualService, DestinationRule, HTTPRoute and
//! GRPCRoute document in bookinfo's networking samples and Gateway API's mesh conformance
//! manifests parses, field for field; the kinds out of Lumen's scope are named here, so a
//! new file of an unexpected kind fails the test rather than passing unread.

mod common;

use common::conformance;
use std::collections::BTreeMap;
use std::path::PathBuf;

use lumen_control::crd::{Document, parse_document};
use serde::Deserialize;

/// Every document of every YAML file in `dir`: (file, kind) → how many parsed.
fn read_all(dir: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(conformance(dir))
        .expect("read the folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {dir}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if value.is_null() {
                continue;
            }
            let kind = match parse_document(&value) {
                Ok(Document::VirtualService(_)) => "VirtualService".to_string(),
                Ok(Document::DestinationRule(_)) => "DestinationRule".to_string(),
                Ok(Document::HttpRoute(_)) => "HTTPRoute".to_string(),
                Ok(Document::GrpcRoute(_)) => "GRPCRoute".to_string(),
                Ok(Document::Other { kind, .. }) => format!("other {kind}"),
                Err(e) => panic!("{name}: {e}"),
            };
            *seen.entry(kind).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn every_istio_bookinfo_networking_resource_parses() {
    let seen = read_all("istio/bookinfo/networking");
    assert!(
        seen.get("VirtualService").is_some_and(|n| *n >= 15),
        "{seen:?}"
    );
    assert!(
        seen.get("DestinationRule").is_some_and(|n| *n >= 3),
        "{seen:?}"
    );
    // Out of Lumen's scope: ingress and egress (Gateway, ServiceEntry).
    for kind in seen.keys().filter_map(|k| k.strip_prefix("other ")) {
        assert!(
            ["Gateway", "ServiceEntry"].contains(&kind),
            "a kind this test does not expect in bookinfo's networking samples: {kind}"
        );
    }
}

#[test]
fn every_gateway_api_mesh_route_parses() {
    let seen = read_all("gateway-api/mesh");
    assert!(seen.get("HTTPRoute").is_some_and(|n| *n >= 18), "{seen:?}");
    assert!(seen.get("GRPCRoute").is_some_and(|n| *n >= 2), "{seen:?}");
    for kind in seen.keys().filter_map(|k| k.strip_prefix("other ")) {
        assert!(
            ["Service", "Deployment", "Namespace"].contains(&kind),
            "a kind this test does not expect in Gateway API's mesh manifests: {kind}"
        );
    }
}

#[test]
fn a_wrong_field_or_version_is_named_with_its_path() {
    let read = |yaml: &str| {
        parse_document(&serde_yaml::from_str(yaml).expect("yaml")).expect_err("refused")
    };
    let e = read(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: shop}\nspec:\n  hosts: [r]\n  http:\n  - match:\n    - uri: {exct: /a}\n    route: [{destination: {host: r}}]\n",
    );
    assert_eq!(e.path, "spec.http[0].match[0].uri.exct", "{e}");
    assert!(e.message.contains("unknown field `exct`"), "{e}");
    assert_eq!((e.namespace.as_str(), e.name.as_str()), ("shop", "r"));
    let e = read(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: r\n  subsets: [{name: v1, labels: {version: 1}}]\n",
    );
    assert_eq!(e.path, "spec.subsets[0].labels.version", "{e}");
    let e = read(
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [r]}\n",
    );
    assert_eq!(e.path, "apiVersion", "{e}");
    assert!(e.message.contains("networking.istio.io/v1beta1"), "{e}");
    let e = read(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - backendRefs: [{name: a, port: \"80\"}]\n",
    );
    assert_eq!(e.path, "spec.rules[0].backendRefs[0].port", "{e}");
    // The older spellings read as v1.
    let ok = parse_document(
        &serde_yaml::from_str(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [r]}\n",
        )
        .expect("yaml"),
    );
    assert!(matches!(ok, Ok(Document::VirtualService(_))), "{ok:?}");
}

/// Each bookinfo networking sample through the model, as `lumen control` reads a config
/// directory, beside `destination-rule-all.yaml` (which Istio's task pages apply first, for
/// the subsets the routes name); a sample with DestinationRules of its own is read alone, as
/// it replaces that one. Accepted with nothing refused, or refused with the field and the reason. The
/// refusals are pinned: a feature that lands moves its sample to the accepted side.
#[test]
fn bookinfo_samples_are_accepted_or_refused_by_name() {
    let dir = conformance("istio/bookinfo/networking");
    let refused: BTreeMap<&str, &str> = [
        ("bookinfo-gateway.yaml", "Gateway is not supported"),
        ("certmanager-gateway.yaml", "Gateway is not supported"),
        (
            "egress-rule-google-apis.yaml",
            "ServiceEntry is not supported",
        ),
    ]
    .into_iter()
    .collect();
    let subsets = std::fs::read_to_string(dir.join("destination-rule-all.yaml")).expect("read");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut accepted = 0;
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&file).expect("read");
        let mut model = if name.starts_with("destination-rule")
            || text.contains("kind: DestinationRule")
        {
            lumen_control::Model::default()
        } else {
            lumen_control::Model::from_yaml("destination-rule-all.yaml", &subsets).expect("subsets")
        };
        model
            .add_yaml(&name, &text)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        model.check();
        let reasons: Vec<String> = model.rejected.iter().map(ToString::to_string).collect();
        match refused.get(name.as_str()) {
            None => {
                assert!(reasons.is_empty(), "{name} was refused: {reasons:#?}");
                accepted += 1;
            }
            Some(why) => assert!(
                reasons
                    .iter()
                    .any(|r| r.starts_with(&format!("{name}: ")) && r.contains(why)),
                "{name}: expected refused with {why:?}, got {reasons:#?}"
            ),
        }
    }
    assert!(accepted >= 18, "{accepted} accepted");
}

/// Each Gateway API mesh sample through the model beside the suite's own Services
/// (`manifests.yaml`): accepted with nothing refused, or refused with the field and the
/// reason, pinned per file. A feature that lands moves its sample to the accepted side.
#[test]
fn gateway_api_mesh_samples_are_accepted_or_refused_by_name() {
    let dir = conformance("gateway-api/mesh");
    // Every sample is accepted now; one a later feature must refuse goes here.
    let refused: BTreeMap<&str, &str> = BTreeMap::new();
    let services = std::fs::read_to_string(dir.join("manifests.yaml")).expect("read");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n != "manifests.yaml"))
        .collect();
    files.sort();
    let mut accepted = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&file).expect("read");
        let mut model =
            lumen_control::Model::from_yaml("manifests.yaml", &services).expect("services");
        model
            .add_yaml(&name, &text)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        model.check();
        let reasons: Vec<String> = model.rejected.iter().map(ToString::to_string).collect();
        match refused.get(name.as_str()) {
            None => {
                assert!(reasons.is_empty(), "{name} was refused: {reasons:#?}");
                assert!(
                    model
                        .virtual_services
                        .iter()
                        .any(|v| v.kind != "VirtualService"),
                    "{name}: no route read"
                );
                accepted.push(name);
            }
            Some(why) => assert!(
                reasons
                    .iter()
                    .any(|r| r.starts_with(&format!("{name}: ")) && r.contains(why)),
                "{name}: expected refused with {why:?}, got {reasons:#?}"
            ),
        }
    }
    assert!(accepted.len() >= 21, "accepted: {accepted:?}");
}
