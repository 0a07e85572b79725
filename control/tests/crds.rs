//! The CRDs in `deploy/crds/` are generated from the Rust types in `control/src/crd`: this
//! test fails when they drift apart. `LUMEN_WRITE_CRDS=1` writes them instead.

use std::path::Path;

#[test]
fn deploy_crds_match_the_rust_types() {
    let dir =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("../deploy/crds");
    let write = std::env::var_os("LUMEN_WRITE_CRDS").is_some();
    for (file, text) in lumen_control::crd::crd_files().expect("CRDs serialize") {
        let path = dir.join(file);
        if write {
            std::fs::create_dir_all(&dir).expect("mkdir deploy/crds");
            std::fs::write(&path, &text).expect("write a CRD file");
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; generate it with LUMEN_WRITE_CRDS=1 cargo test -p lumen-control --test crds",
                path.display()
            )
        });
        assert!(
            committed == text,
            "{} differs from the CRDs the Rust types in control/src/crd generate: regenerate with LUMEN_WRITE_CRDS=1 cargo test -p lumen-control --test crds",
            path.display()
        );
    }
}

/// `deploy/rbac.yaml` is the ClusterRole `lumen control --kube` needs, generated from the
/// kinds it watches (`lumen_control::cluster::cluster_role`); `LUMEN_WRITE_CRDS=1` writes it.
#[test]
fn deploy_rbac_matches_the_kinds_lumen_control_watches() {
    let path =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("../deploy/rbac.yaml");
    let text = format!(
        "# Generated from lumen_control::cluster::cluster_role (LUMEN_WRITE_CRDS=1 cargo test -p lumen-control --test crds).\n# Bind it to the service account lumen control runs as.\n{}",
        serde_yaml::to_string(&lumen_control::cluster::cluster_role()).expect("serializes")
    );
    if std::env::var_os("LUMEN_WRITE_CRDS").is_some() {
        std::fs::write(&path, &text).expect("write deploy/rbac.yaml");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} differs from the kinds lumen control watches: regenerate with LUMEN_WRITE_CRDS=1 cargo test -p lumen-control --test crds",
        path.display()
    );
    for kind in lumen_control::cluster::KINDS {
        assert!(
            text.contains(kind.plural),
            "{} is not in the role",
            kind.plural
        );
    }
}

#[test]
fn the_crds_serve_istio_s_three_versions_and_gateway_api_v1() {
    let crds = lumen_control::crd::crds();
    let versions = |kind: &str| -> Vec<(String, bool)> {
        crds.iter()
            .flat_map(|(_, c)| c)
            .find(|c| c.spec.names.kind == kind)
            .map(|c| {
                c.spec
                    .versions
                    .iter()
                    .map(|v| (v.name.clone(), v.storage))
                    .collect()
            })
            .unwrap_or_default()
    };
    for kind in ["VirtualService", "DestinationRule"] {
        assert_eq!(
            versions(kind),
            vec![
                ("v1".to_string(), true),
                ("v1beta1".to_string(), false),
                ("v1alpha3".to_string(), false)
            ],
            "{kind}"
        );
    }
    for kind in ["HTTPRoute", "GRPCRoute"] {
        assert_eq!(versions(kind), vec![("v1".to_string(), true)], "{kind}");
    }
}
