//! Shared by the control plane's integration tests: the demo mesh's configuration.

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
