//! Shared by the root tests: running the `lumen` binary and finding the external test peers
//! the test command installs (see `scripts/test-all`).
// Each test crate uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The Python interpreter with the OpenTelemetry SDK: `LUMEN_PYTHON`, else the venv the test
/// command creates. Panics with what to do when it is missing: a missing peer fails loudly.
pub fn python_with_otel_sdk() -> PathBuf {
    let path = std::env::var_os("LUMEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lumen-peers/venv/bin/python"));
    let ok = Command::new(&path)
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

/// Where a `lumen telemetry` process listens (host:port), and what its WAL replay said.
pub struct Addrs {
    pub grpc: String,
    pub otlp_http: String,
    pub http: String,
    pub wal: String,
}

/// The test peers' Python (as [`python_with_otel_sdk`]) if it can import every one of
/// `modules`; panics with what to do otherwise.
pub fn python_with(modules: &[&str]) -> PathBuf {
    let path = python_with_otel_sdk();
    let import = format!("import {}", modules.join(", "));
    let ok = Command::new(&path)
        .args(["-c", &import])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "peer missing: {} cannot `{import}`; run scripts/test-all (it installs them)",
        path.display()
    );
    path
}

/// A `lumen` process whose stdout lines arrive on a channel (and are echoed to stderr).
pub struct Lumen {
    pub child: Child,
    pub lines: Receiver<String>,
}

impl Lumen {
    pub fn spawn(args: &[&str]) -> Lumen {
        Lumen::spawn_with_env(args, &[])
    }

    /// As [`Lumen::spawn`], with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Lumen {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("lumen starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("lumen: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lumen { child, lines }
    }

    /// Starts `lumen telemetry` on `data` with ephemeral loopback ports and `extra` flags;
    /// returns it with its addresses and its WAL report line.
    pub fn telemetry(data: &str, extra: &[&str]) -> (Lumen, Addrs) {
        Lumen::telemetry_with_env(data, extra, &[])
    }

    /// The arguments of `lumen telemetry` on `data` with ephemeral loopback ports, then
    /// `extra`.
    pub fn telemetry_args<'a>(data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "telemetry",
            "--data",
            data,
            "--otlp-grpc",
            "127.0.0.1:0",
            "--otlp-http",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--jaeger-grpc",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// As [`Lumen::telemetry`], with extra environment variables.
    pub fn telemetry_with_env(data: &str, extra: &[&str], env: &[(&str, &str)]) -> (Lumen, Addrs) {
        let mut lumen = Lumen::spawn_with_env(&Lumen::telemetry_args(data, extra), env);
        let wal = lumen.wait_for_line("wal: ", Duration::from_secs(60));
        let otlp_http = lumen.wait_for_line("otlp-http: ", Duration::from_secs(60));
        let otlp_http = otlp_http
            .trim_start_matches("http://")
            .trim_end_matches("/v1/")
            .to_string();
        // "telemetry: OTLP gRPC <addr>, dashboard http://<addr>/, Jaeger gRPC <addr>"
        let line = lumen.wait_for_line("telemetry: OTLP gRPC ", Duration::from_secs(60));
        let (grpc, rest) = line.split_once(", dashboard ").expect("address line");
        let (dashboard, _jaeger) = rest.split_once(", Jaeger gRPC ").expect("address line");
        let http = dashboard
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let addrs = Addrs {
            grpc: grpc.to_string(),
            otlp_http,
            http,
            wal,
        };
        (lumen, addrs)
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// Waits (bounded) for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_for_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200))
                && let Some(rest) = line.strip_prefix(prefix)
            {
                return rest.to_string();
            }
        }
        let _ = self.child.kill();
        panic!("no line starting with {prefix:?} within {limit:?}");
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded) for a clean exit; returns how long it took.
    pub fn interrupt(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let code = self.signal("-INT", limit);
        assert!(code.success(), "exit status {code}");
        started.elapsed()
    }

    /// Sends `signal` (as `kill` spells it) and waits (bounded) for the exit status.
    pub fn signal(&mut self, signal: &str, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        loop {
            if let Some(code) = self.child.try_wait().expect("wait") {
                return code;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("lumen still running {limit:?} after {signal}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lumen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rows of a query to a `lumen telemetry` HTTP address (`host:port`); the query must
/// succeed and its result must be whole (not cut at the row cap).
pub async fn sql_rows(http: &str, query: &str) -> Vec<serde_json::Value> {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/sql"))
        .json(&serde_json::json!({ "sql": query }))
        .send()
        .await
        .expect("sql request");
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.expect("sql json");
    assert!(status.is_success(), "{query}: {status} {body}");
    assert_eq!(body["truncated"], false, "{query}: raise --query-max-rows");
    body["rows"].as_array().expect("rows").clone()
}
