//! Finding the external test peers the test command installs (see `scripts/test-all`).

use std::path::PathBuf;

/// The Python interpreter with the OpenTelemetry SDK: `LUMEN_PYTHON`, else the venv the test
/// command creates. Panics with what to do when it is missing: a missing peer fails loudly.
pub fn python_with_otel_sdk() -> PathBuf {
    let path = std::env::var_os("LUMEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lumen-peers/venv/bin/python"));
    let ok = std::process::Command::new(&path)
        .args([
            "-c",
            "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "peer missing: {} cannot import the OpenTelemetry Python SDK; run scripts/test-all (it installs \
         the pinned SDK) or set LUMEN_PYTHON to a python with opentelemetry-sdk==1.45.2 and \
         opentelemetry-exporter-otlp-proto-grpc==1.45.2",
        path.display()
    );
    path
}
