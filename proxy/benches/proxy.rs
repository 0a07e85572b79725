//! The data plane's ratios (issue 8), lumen-proxy beside Envoy 1.40 in one run, both from the
//! same static bootstrap (`fixtures/proxy/static.yaml`, standalone: no control plane):
//!
//! - added latency through one proxy at a fixed rate (oha `-q`, latency correction), p50
//!   and p99 minus the direct path's, lumen ÷ Envoy;
//! - the same through a sidecar pair (one proxy in front of another);
//! - the closed-loop ceiling on one core (oha without a rate), lumen ÷ Envoy;
//! - CPU seconds per 1,000 requests at the fixed rate, lumen ÷ Envoy;
//! - resident memory idle and after a run with 100 connections, lumen ÷ Envoy;
//! - the telemetry tax: lumen's CPU per request with every span exported (to an OTLP sink in
//!   this process) and metrics on, ÷ with both off;
//! - HTTP/2 (h2c, oha `--http2`): the added-latency ratio again;
//! - lumen ÷ the bare forwarder (`proxy/bare-forwarder`: hyper's server and pooled client on
//!   one thread, nothing between them): added latency, CPU at the fixed rate (as measured
//!   above, and with every span exported), the ceiling and memory.
//!
//! The proxies run on core 1 (`taskset`, Envoy with `--concurrency 1`); nginx (the upstream),
//! oha and the sink on core 0. Run with `scripts/bench-proxy` (installs oha and nginx).
//! Everything is measured in rounds (`LUMEN_BENCH_ROUNDS`, default 3), each a full set side by
//! side; the tables give each figure's median, the median of the rounds' ratios with their
//! range, and in how many rounds the goal was reached: a shared 2-core VM moves single runs
//! by more than the goals' margins.
//! Knobs: `LUMEN_BENCH_RATE` (default 2000), `LUMEN_BENCH_SECONDS` (per run, default 10),
//! `LUMEN_BENCH_ROUNDS`, `LUMEN_OHA`, `LUMEN_NGINX`, `LUMEN_ENVOY`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../tests/peers/envoy.rs"]
mod envoy_peer;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::Value;

use common::free_port;

fn peer(var: &str, default: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        p.exists(),
        "peer missing: {what} at {} (run scripts/bench-proxy, or set {var})",
        p.display()
    );
    p
}

/// A process pinned to `core`, killed when dropped; its stderr goes to a file beside.
struct Pinned(Child, PathBuf);

impl Pinned {
    fn start(core: u32, program: &Path, args: &[&str]) -> Pinned {
        let log = std::env::temp_dir().join(format!(
            "lumen-bench-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Pinned(child, log)
    }

    /// Waits until `port` is served, or panics with what the process said.
    fn wait_for(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self.0.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "nothing listens on {port} ({exited:?}): {}",
                    std::fs::read_to_string(&self.1).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// utime + stime, seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    /// A `/proc/<pid>/status` figure in KiB (VmRSS, VmHWM).
    fn status_kib(&self, key: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// One oha run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    ok: f64,
}

fn oha(oha: &Path, port: u16, args: &[&str]) -> Run {
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(oha)
        .args(["--no-tui", "--output-format", "json"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("oha runs");
    assert!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("oha json");
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    Run {
        p50_ms: pct("p50"),
        p99_ms: pct("p99"),
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        ok: v["summary"]["successRate"].as_f64().unwrap_or(0.0),
    }
}

/// The static bootstrap: listener on `listen`, admin on `admin`, both clusters to `to`, node
/// metadata (a Prometheus port of its own, and `extra`: `KEY: "value"` entries), and with
/// `sink`, the `lumen-telemetry` cluster spans and metrics are exported to.
fn bootstrap(
    dir: &Path,
    name: &str,
    listen: u16,
    admin: u16,
    to: u16,
    extra: &str,
    sink: Option<u16>,
) -> PathBuf {
    let meta = format!(
        "  metadata: {{LUMEN_PROMETHEUS_PORT: \"{}\"{}{extra}}}\n",
        free_port(),
        if extra.is_empty() { "" } else { ", " }
    );
    let yaml = include_str!("../../fixtures/proxy/static.yaml")
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 19000", &format!("port_value: {admin}"))
        .replace("port_value: 18081", &format!("port_value: {to}"))
        .replace("port_value: 18082", &format!("port_value: {to}"))
        .replace("  cluster: bench\n", &format!("  cluster: bench\n{meta}"));
    let yaml = match sink {
        None => yaml,
        Some(port) => {
            yaml + &format!(
                "  - name: lumen-telemetry\n    type: STATIC\n    load_assignment:\n      cluster_name: lumen-telemetry\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{address: 127.0.0.1, port_value: {port}}}\n"
            )
        }
    };
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).expect("write bootstrap");
    path
}

#[derive(Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[derive(Default)]
struct MetricsSink;

#[tonic::async_trait]
impl MetricsService for MetricsSink {
    async fn export(
        &self,
        _req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn main() {
    let rate: u32 = std::env::var("LUMEN_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let secs: u32 = std::env::var("LUMEN_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let oha_bin = peer("LUMEN_OHA", "/var/tmp/lumen-peers/oha/bin/oha", "oha");
    let nginx_bin = peer("LUMEN_NGINX", "/usr/sbin/nginx", "nginx");
    let envoy_bin = envoy_peer::envoy();
    // Both built with the `proxy` profile (fat LTO, one codegen unit) by scripts/bench-proxy,
    // as a sidecar is built for deployment.
    let lumen_bin = std::env::var_os("LUMEN_PROXY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_lumen-proxy")),
        PathBuf::from,
    );
    let bare_bin = PathBuf::from(std::env::var_os("LUMEN_BARE_FORWARDER").expect(
        "LUMEN_BARE_FORWARDER: the bare forwarder (proxy/bare-forwarder); run scripts/bench-proxy, which builds it",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // The upstream: nginx, one worker, answering a small body.
    let nginx_port = free_port();
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; pid {pid}; error_log {err} error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{nginx_port}; location / {{ return 200 \"hello from nginx\\n\"; }} }} }}\n",
            pid = d.join("nginx.pid").display(),
            err = d.join("nginx.err").display(),
            d = d.display(),
        ),
    )
    .expect("nginx.conf");
    let conf_s = conf.display().to_string();
    let prefix = format!("{}/", d.display());
    let mut nginx = Pinned::start(0, &nginx_bin, &["-p", &prefix, "-c", &conf_s]);
    nginx.wait_for(nginx_port);

    // The OTLP sink for the telemetry tax, on core 0 in this process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let sink_port = free_port();
    let exported = Arc::new(AtomicU64::new(0));
    {
        let spans = exported.clone();
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Sink { spans }))
                .add_service(MetricsServiceServer::new(MetricsSink))
                .serve(([127, 0, 0, 1], sink_port).into())
                .await;
        });
    }

    let rate_s = rate.to_string();
    let dur = format!("{secs}s");
    let fixed = [
        "-q",
        rate_s.as_str(),
        "-z",
        dur.as_str(),
        "-c",
        "32",
        "--latency-correction",
    ];
    let run_fixed = |port: u16| oha(&oha_bin, port, &fixed);
    let warm_up = |port: u16| {
        let _ = oha(&oha_bin, port, &["-n", "2000", "-c", "8"]);
    };
    // The fixed rate over 100 connections (what the loaded memory figure is read after).
    let run_100 = |port: u16| {
        let _ = oha(
            &oha_bin,
            port,
            &[
                "-q",
                rate_s.as_str(),
                "-z",
                dur.as_str(),
                "-c",
                "100",
                "--latency-correction",
            ],
        );
    };

    // One proxy of each, alone on core 1 in turn.
    let start_proxy =
        |kind: &str, name: &str, listen: u16, to: u16, extra: &str, sink: Option<u16>| -> Pinned {
            let admin = free_port();
            let path = bootstrap(d, name, listen, admin, to, extra, sink);
            let p = path.display().to_string();
            let mut proc = if kind == "envoy" {
                let base_id = (listen % 60000).to_string();
                Pinned::start(
                    1,
                    &envoy_bin,
                    &[
                        "-c",
                        &p,
                        "--concurrency",
                        "1",
                        "--base-id",
                        &base_id,
                        "--log-level",
                        "error",
                    ],
                )
            } else {
                Pinned::start(1, &lumen_bin, &["-c", &p])
            };
            proc.wait_for(listen);
            proc
        };
    let no_telemetry = "LUMEN_TRACE_SAMPLING: \"0\", LUMEN_METRICS: \"false\"";
    let single = |kind: &str| {
        let listen = free_port();
        let p = start_proxy(
            kind,
            &format!("{kind}-single"),
            listen,
            nginx_port,
            "",
            None,
        );
        warm_up(listen);
        let idle_kib = p.status_kib("VmRSS:");
        let cpu0 = p.cpu_seconds();
        let r = run_fixed(listen);
        let cpu = p.cpu_seconds() - cpu0;
        let sent = r.rps * f64::from(secs);
        let h2 = oha(
            &oha_bin,
            listen,
            &[
                "-q",
                rate_s.as_str(),
                "-z",
                dur.as_str(),
                "-c",
                "32",
                "--latency-correction",
                "--http2",
            ],
        );
        run_100(listen);
        let loaded_kib = p.status_kib("VmHWM:");
        let ceiling = oha(&oha_bin, listen, &["-z", dur.as_str(), "-c", "64"]);
        (
            r,
            h2,
            cpu * 1000.0 / sent.max(1.0),
            idle_kib,
            loaded_kib,
            ceiling,
        )
    };
    // The bare forwarder: its memory idle and after 100 connections, beside lumen's.
    let bare = || {
        let listen = free_port();
        let l = listen.to_string();
        let n = nginx_port.to_string();
        let mut p = Pinned::start(1, &bare_bin, &[&l, &n]);
        p.wait_for(listen);
        warm_up(listen);
        let idle_kib = p.status_kib("VmRSS:");
        let cpu0 = p.cpu_seconds();
        let r = run_fixed(listen);
        let cpu = p.cpu_seconds() - cpu0;
        run_100(listen);
        let ceiling = oha(&oha_bin, listen, &["-z", dur.as_str(), "-c", "64"]);
        (
            r,
            idle_kib,
            p.status_kib("VmHWM:"),
            cpu * 1000.0 / (r.rps * f64::from(secs)).max(1.0),
            ceiling,
        )
    };
    let added = |r: Run, base: Run| (r.p50_ms - base.p50_ms, r.p99_ms - base.p99_ms);

    // Sidecar pairs: front → back → nginx, both on core 1.
    let pair = |kind: &str| {
        let (front, back) = (free_port(), free_port());
        let _b = start_proxy(kind, &format!("{kind}-back"), back, nginx_port, "", None);
        let _f = start_proxy(kind, &format!("{kind}-front"), front, back, "", None);
        warm_up(front);
        run_fixed(front)
    };
    // The telemetry tax: lumen with every span exported (to the sink) and metrics on, against
    // both off: CPU seconds per request at the fixed rate.
    let tax = |name: &str, extra: &str, sink: Option<u16>| {
        let listen = free_port();
        let p = start_proxy("lumen", name, listen, nginx_port, extra, sink);
        warm_up(listen);
        let cpu0 = p.cpu_seconds();
        let r = run_fixed(listen);
        let cpu = p.cpu_seconds() - cpu0;
        std::thread::sleep(Duration::from_secs(2)); // the last span batch
        cpu / (r.rps * f64::from(secs)).max(1.0)
    };
    let full = "LUMEN_TRACE_SAMPLING: \"100\", LUMEN_METRICS: \"true\"";

    // Rounds: each measures everything once, side by side; a figure is reported as the
    // median over the rounds, and a ratio as the median of the rounds' own ratios (each
    // taken under the same moment's load on this machine) with their range.
    let rounds: usize = std::env::var("LUMEN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut figures = Figures::default();
    let mut spans_exported = 0;
    let mut last = Vec::new();
    for round in 0..rounds {
        let direct = run_fixed(nginx_port);
        let lumen = single("lumen");
        let envoy = single("envoy");
        let bare = bare();
        let lumen_pair = pair("lumen");
        let envoy_pair = pair("envoy");
        let spans_before = exported.load(Ordering::Relaxed);
        let tax_on = tax("lumen-tax-on", full, Some(sink_port));
        spans_exported = exported.load(Ordering::Relaxed) - spans_before;
        let tax_off = tax("lumen-tax-off", no_telemetry, None);

        let (l50, l99) = added(lumen.0, direct);
        let (e50, e99) = added(envoy.0, direct);
        let (lp50, lp99) = added(lumen_pair, direct);
        let (ep50, ep99) = added(envoy_pair, direct);
        // nginx speaks HTTP/1.1 here: h2c's added latency is against the same direct path.
        let (lh50, lh99) = added(lumen.1, direct);
        let (eh50, eh99) = added(envoy.1, direct);
        let (b50, b99) = added(bare.0, direct);
        let f = &mut figures;
        f.envoy("added latency p50, one proxy", l50, e50, "ms", "≤ 0.5");
        f.envoy("added latency p99, one proxy", l99, e99, "ms", "≤ 0.5");
        f.envoy("added latency p50, sidecar pair", lp50, ep50, "ms", "≤ 0.5");
        f.envoy("added latency p99, sidecar pair", lp99, ep99, "ms", "≤ 0.5");
        f.envoy(
            "closed-loop ceiling, one core",
            lumen.5.rps,
            envoy.5.rps,
            "req/s",
            "≥ 2.0",
        );
        f.envoy("CPU per 1,000 requests", lumen.2, envoy.2, "s", "≤ 0.5");
        f.envoy(
            "resident memory, idle",
            lumen.3 / 1024.0,
            envoy.3 / 1024.0,
            "MiB",
            "≤ 0.1",
        );
        f.envoy(
            "resident memory, peak with 100 connections",
            lumen.4 / 1024.0,
            envoy.4 / 1024.0,
            "MiB",
            "≤ 0.1",
        );
        f.envoy("added latency p50, h2c", lh50, eh50, "ms", "≤ 0.5");
        f.envoy("added latency p99, h2c", lh99, eh99, "ms", "≤ 0.5");
        // Every figure against the bare forwarder too: the limit a proxy on this runtime has.
        f.bare("added latency p50, one proxy", l50, b50, "ms", "≤ 1.3");
        f.bare("added latency p99, one proxy", l99, b99, "ms", "≤ 1.3");
        f.bare(
            "CPU per 1,000 requests (metrics on, spans not exported)",
            lumen.2,
            bare.3,
            "s",
            "≤ 1.3",
        );
        f.bare(
            "CPU per 1,000 requests (every span exported, metrics on)",
            tax_on * 1000.0,
            bare.3,
            "s",
            "≤ 1.3",
        );
        f.bare(
            "closed-loop ceiling, one core (higher is better)",
            lumen.5.rps,
            bare.4.rps,
            "req/s",
            "",
        );
        f.bare(
            "resident memory, idle",
            lumen.3 / 1024.0,
            bare.1 / 1024.0,
            "MiB",
            "≤ 1.5",
        );
        f.bare(
            "resident memory, peak with 100 connections",
            lumen.4 / 1024.0,
            bare.2 / 1024.0,
            "MiB",
            "≤ 1.5",
        );
        f.tax(
            "telemetry tax: CPU per request, every span exported and metrics on ÷ both off",
            tax_on * 1e6,
            tax_off * 1e6,
            "µs",
            "≤ 1.2",
        );
        eprintln!("round {} of {rounds} measured", round + 1);
        last = vec![
            ("direct to nginx", direct),
            ("lumen one proxy", lumen.0),
            ("envoy one proxy", envoy.0),
            ("lumen pair", lumen_pair),
            ("envoy pair", envoy_pair),
        ];
    }
    println!(
        "proxy benchmark: {rate} requests/s for {secs} s a run, {rounds} rounds, proxies on core 1, nginx and oha on core 0"
    );
    figures.print(rounds);
    println!("spans the sink received during the last telemetry-on run: {spans_exported}");
    for (name, r) in last {
        println!(
            "last round, {name}: p50 {:.3} ms, p99 {:.3} ms, {:.0} requests/s, {:.1}% ok",
            r.p50_ms,
            r.p99_ms,
            r.rps,
            r.ok * 100.0
        );
    }
    drop(rt);
}

/// Every round's figures, by table and measure, in the order first seen.
#[derive(Default)]
struct Figures {
    rows: Vec<Row>,
}

struct Row {
    table: &'static str,
    name: &'static str,
    unit: &'static str,
    goal: &'static str,
    /// Each round's (lumen-proxy, baseline).
    values: Vec<(f64, f64)>,
}

const ENVOY: &str = "| measure | lumen-proxy | Envoy 1.40 | ratio (median) | ratio range | goal |";
const BARE: &str =
    "| measure | lumen-proxy | bare forwarder | ratio (median) | ratio range | goal |";
const TAX: &str = "| measure | on | off | ratio (median) | ratio range | goal |";

impl Figures {
    fn add(
        &mut self,
        table: &'static str,
        name: &'static str,
        l: f64,
        b: f64,
        unit: &'static str,
        goal: &'static str,
    ) {
        match self
            .rows
            .iter_mut()
            .find(|r| r.table == table && r.name == name)
        {
            Some(r) => r.values.push((l, b)),
            None => self.rows.push(Row {
                table,
                name,
                unit,
                goal,
                values: vec![(l, b)],
            }),
        }
    }

    fn envoy(
        &mut self,
        name: &'static str,
        l: f64,
        e: f64,
        unit: &'static str,
        goal: &'static str,
    ) {
        self.add(ENVOY, name, l, e, unit, goal);
    }

    fn bare(&mut self, name: &'static str, l: f64, b: f64, unit: &'static str, goal: &'static str) {
        self.add(BARE, name, l, b, unit, goal);
    }

    fn tax(
        &mut self,
        name: &'static str,
        on: f64,
        off: f64,
        unit: &'static str,
        goal: &'static str,
    ) {
        self.add(TAX, name, on, off, unit, goal);
    }

    /// The tables: medians of the figures, the median of the rounds' ratios and their range,
    /// and how many rounds reached the goal.
    fn print(&self, rounds: usize) {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n == 0 {
                f64::NAN
            } else if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        let mut table = "";
        for r in &self.rows {
            if r.table != table {
                table = r.table;
                println!("{table}");
                println!("|---|---|---|---|---|---|");
            }
            let ratios: Vec<f64> = r.values.iter().map(|(l, b)| l / b).collect();
            let ratio = median(ratios.clone());
            let (lo, hi) = ratios
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(*x), hi.max(*x))
                });
            let goal = goal_value(r.goal);
            let lower_better = r.goal.starts_with('≤');
            let meets = |x: f64| if lower_better { x <= goal } else { x >= goal };
            let verdict = if r.goal.is_empty() {
                String::new()
            } else {
                let n = ratios.iter().filter(|x| meets(**x)).count();
                format!(
                    "{} ({}; {n} of {rounds} rounds)",
                    r.goal,
                    if meets(ratio) {
                        "reached"
                    } else {
                        "not reached"
                    }
                )
            };
            let (l, b) = (
                median(r.values.iter().map(|v| v.0).collect()),
                median(r.values.iter().map(|v| v.1).collect()),
            );
            println!(
                "| {} | {l:.3} {u} | {b:.3} {u} | {ratio:.2} | {lo:.2}–{hi:.2} | {verdict} |",
                r.name,
                u = r.unit
            );
        }
    }
}

fn goal_value(goal: &str) -> f64 {
    goal.trim_start_matches(['≤', '≥', ' '])
        .parse()
        .unwrap_or(f64::NAN)
}
