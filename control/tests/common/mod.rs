//! Shared by the control plane's integration tests: the demo mesh's configuration.
#![allow(dead_code)] // each test crate uses some of it

use lumen_control::Model;

/// The demo fixtures (`fixtures/demo/*.yaml`), with the pods moved to `subnet`.
pub fn demo_model(subnet: [u8; 3]) -> Model {
    let mut model = Model::from_yaml(
        "bookinfo",
        include_str!("../../../fixtures/demo/bookinfo.yaml"),
    )
    .expect("demo bookinfo fixture parses");
    model
        .add_yaml(
            "routing",
            include_str!("../../../fixtures/demo/routing.yaml"),
        )
        .expect("demo routing fixture parses");
    model.move_pods([127, 0, 10], subnet);
    model
}

/// A path in the upstream conformance fixtures: `../shared/conformance`, or
/// `LUMEN_CONFORMANCE_DIR`; a missing one fails the test saying where it was looked for.
pub fn conformance(path: &str) -> std::path::PathBuf {
    let root = std::env::var_os("LUMEN_CONFORMANCE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(
                std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            )
            .join("../../shared/conformance")
        });
    let full = root.join(path);
    assert!(
        full.exists(),
        "conformance fixtures missing: {} (set LUMEN_CONFORMANCE_DIR to the shared conformance folder)",
        full.display()
    );
    full
}
