//! What the proxy's binary tests (and its benchmark) share: ports, and starting the binary.
#![allow(dead_code)] // each test crate uses some of it

use std::path::Path;

/// A port on 127.0.0.1 nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Writes `yaml` as `name` in `dir` and starts `lumen-proxy -c` on it, logging at `log`;
/// the process is killed when the handle is dropped.
pub fn start_proxy(dir: &Path, name: &str, yaml: &str, log: &str) -> tokio::process::Child {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write the bootstrap");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lumen-proxy"))
        .arg("-c")
        .arg(&path)
        .env("RUST_LOG", log)
        .kill_on_drop(true)
        .spawn()
        .expect("lumen-proxy starts")
}
