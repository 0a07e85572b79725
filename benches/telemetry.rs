//! The telemetry store's ratios (issue 5), each measured beside its baseline in one run:
//!
//! - ingest: spans acknowledged (durable in the WAL) per second of the server's CPU, with the
//!   server process pinned to one core, ÷ spans per second of a bare prost decode of the same
//!   payloads on one core;
//! - size: Parquet bytes per span after compaction ÷ bytes per span of the same batches as
//!   OTLP protobuf compressed with zstd level 3;
//! - memory: the server's peak resident memory ÷ the 512 MiB its defaults promise;
//! - query: p50 and p99 of a trace by id and of "spans of one service slower than 100 ms in
//!   one hour" ÷ DuckDB running the same SQL over the same files;
//! - APIs (issue 6): Jaeger's trace by id, a Jaeger search over one hour and the graph of
//!   one hour, through their routers, ÷ DuckDB doing the same retrieval over the same files.
//!
//! The corpus is the demo mesh's shape: traces of five spans (productpage server and client,
//! reviews v1 or v2 server and client, ratings server), about 15 attributes a span with a
//! random request id, HTTP semantic conventions, 20% of spans with an event, 5% of ratings
//! calls over 100 ms, spread over 24 hours; client spans name their callee and server spans
//! their caller (`peer.service`), as the sidecars write them. Batches of 1,000 spans over OTLP/gRPC.
//!
//! Run with `scripts/bench-telemetry` (it installs DuckDB for the baseline). Knobs:
//! `LUMEN_BENCH_SPANS` (default 2,000,000), `LUMEN_PYTHON` (a python with duckdb),
//! `LUMEN_BENCH_DATA` (keep the store in this directory instead of a temporary one).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lumen_telemetry::{QueryEngine, Store};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SPANS_PER_BATCH: usize = 1000;
const SPANS_PER_TRACE: usize = 5;
const DAY_NS: u64 = 24 * 3600 * 1_000_000_000;
/// 2025-10-09T00:00:00Z: the corpus spans that day.
const T0_NS: u64 = 1_759_968_000_000_000_000;

fn main() {
    let total: usize = std::env::var("LUMEN_BENCH_SPANS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let batches = total.div_ceil(SPANS_PER_BATCH);
    // LUMEN_BENCH_DATA keeps the store for inspection (an empty directory it may create).
    let kept = std::env::var_os("LUMEN_BENCH_DATA").map(std::path::PathBuf::from);
    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = kept.unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&data_dir).expect("data dir");
    println!(
        "telemetry benchmark: {batches} batches of {SPANS_PER_BATCH} spans, data in {}",
        data_dir.display()
    );

    // Baseline: a bare prost decode of the same payloads, on this one thread.
    let mut corpus = Corpus::new(batches);
    let sample: Vec<Vec<u8>> = (0..200.min(batches))
        .map(|_| corpus.batch().encode_to_vec())
        .collect();
    let decode_rate = best_of(3, || {
        let started = Instant::now();
        let mut spans = 0usize;
        for p in &sample {
            let req = ExportTraceServiceRequest::decode(p.as_slice()).expect("decodes");
            spans += req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum::<usize>();
        }
        spans as f64 / started.elapsed().as_secs_f64()
    });
    // The receiver's conversion of the same payloads into rows (read in place, straight
    // into the Arrow builders), alone on this thread.
    let rows_rate = best_of(3, || {
        let started = Instant::now();
        let mut spans = 0usize;
        for p in &sample {
            let frame = lumen_telemetry::convert::TraceFrame::read(p).expect("reads");
            spans += frame.rows(usize::MAX).expect("rows").batch.num_rows();
        }
        spans as f64 / started.elapsed().as_secs_f64()
    });

    // Lumen: the release binary on core 1, this client on the other.
    let server = Server::start(data_dir.as_path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut corpus = Corpus::new(batches);
    let cpu_before = server.cpu_seconds();
    let started = Instant::now();
    let (acked, zstd_bytes, zstd_spans) = rt.block_on(send_all(&server.grpc, &mut corpus));
    let wall = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu_before;
    let peak_rss = server.peak_rss();
    let flush_s = server.metric_sum("lumen_telemetry_flush_duration_seconds_sum");
    let compaction_s = server.metric_sum("lumen_telemetry_compaction_duration_seconds_sum");
    let compactions = server.metric_sum("lumen_telemetry_compaction_duration_seconds_count");
    let spliced = server.metric_sum("lumen_telemetry_compactions_spliced_total");
    server.stop();
    let ingest_rate = acked as f64 / cpu;

    // Size after compaction, and the queries, over the files the server left.
    let store = Arc::new(Store::open(data_dir.as_path()).expect("reopen"));
    let files_before = store.spans.files().len();
    rt.block_on(async { while store.spans.compact().await.expect("compact").is_some() {} });
    let files = store.spans.files();
    let rows: u64 = files.iter().map(|f| f.rows).sum();
    let bytes: u64 = files.iter().map(|f| f.bytes).sum();
    assert_eq!(
        rows as usize, acked,
        "every acknowledged span is in Parquet"
    );
    let lumen_bps = bytes as f64 / rows as f64;
    let zstd_bps = zstd_bytes as f64 / zstd_spans as f64;

    let trace = corpus.middle_trace_hex();
    // (name, Lumen's SQL, DuckDB's SQL): ids are bytes in the files; Lumen reads a hex
    // literal compared with an id as its bytes, DuckDB is told with from_hex.
    let hour = "SELECT trace_id, span_name, duration_ns FROM spans \
             WHERE service_name = 'ratings' AND duration_ns > 100000000 \
             AND start_time >= '2025-10-09T12:00:00Z' AND start_time < '2025-10-09T13:00:00Z'";
    let queries = [
        (
            "trace by id",
            format!("SELECT * FROM spans WHERE trace_id = '{trace}'"),
            format!("SELECT * FROM spans WHERE trace_id = from_hex('{trace}')"),
        ),
        (
            "slow spans of one service in one hour",
            // Noon to one o'clock of the corpus' day, in SQL both engines read the same way.
            hour.to_string(),
            hour.to_string(),
        ),
    ];
    let engine = QueryEngine::new(store.clone());
    let runs = 30;
    let mut lumen_q = Vec::new();
    for (_, sql, _) in &queries {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let out = rt.block_on(engine.batches(sql)).expect("query");
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            rows = out.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        lumen_q.push((
            percentile(&mut times, 0.5),
            percentile(&mut times, 0.99),
            rows,
        ));
    }
    // The APIs other tools read (issue 6), in-process through their routers (JSON rendering
    // included), beside DuckDB doing the same retrieval on the same files: Jaeger's trace by
    // id, a Jaeger search for one service over one hour (20 traces, every span of each), and
    // the graph of that hour from the rollups.
    let noon_us = 1_760_011_200_000_000i64; // 2025-10-09T12:00:00Z
    let hour_us = 3_600_000_000i64;
    let apis = [
        (
            "Jaeger /api/traces/{id}",
            format!("/api/traces/{trace}"),
            format!("SELECT * FROM spans WHERE trace_id = from_hex('{trace}')"),
        ),
        (
            "Jaeger search, one service, one hour, 20 traces",
            format!(
                "/api/traces?service=ratings&start={noon_us}&end={}&limit=20",
                noon_us + hour_us
            ),
            "SELECT * FROM spans WHERE trace_id IN (SELECT trace_id FROM spans \
             WHERE service_name = 'ratings' AND start_time >= '2025-10-09T12:00:00Z' \
             AND start_time <= '2025-10-09T13:00:00Z' \
             GROUP BY trace_id ORDER BY max(start_time) DESC LIMIT 20)"
                .to_string(),
        ),
        (
            "/api/v1/graph, one hour",
            format!(
                "/api/v1/graph?start={}&end={}",
                noon_us / 1_000_000,
                (noon_us + hour_us) / 1_000_000
            ),
            "SELECT kind, source, source_version, service, version, sum(requests), \
             sum(errors), sum(request_bytes), sum(response_bytes), min(first_ns) \
             FROM rollups WHERE minute >= '2025-10-09T12:00:00Z' \
             AND minute <= '2025-10-09T13:00:00Z' AND last_ns >= 1760011200000000000 \
             GROUP BY ALL"
                .to_string(),
        ),
    ];
    let router = lumen_telemetry::jaeger::router(engine.clone())
        .merge(lumen_telemetry::graph::router(engine.clone()));
    let mut lumen_api = Vec::new();
    for (name, uri, _) in &apis {
        let mut times = Vec::new();
        let mut spans = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let body = rt.block_on(async {
                use tower::ServiceExt;
                let req = axum::http::Request::get(uri.as_str())
                    .body(axum::body::Body::empty())
                    .expect("request");
                let resp = router.clone().oneshot(req).await.expect("response");
                assert_eq!(resp.status(), 200, "{name}");
                axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .expect("body")
            });
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            spans = v["data"].as_array().map_or(0, |traces| {
                traces
                    .iter()
                    .map(|t| t["spans"].as_array().map_or(0, Vec::len))
                    .sum()
            });
        }
        lumen_api.push((
            percentile(&mut times, 0.5),
            percentile(&mut times, 0.99),
            spans,
        ));
    }

    let mut statements: Vec<String> = queries.iter().map(|(_, _, q)| q.clone()).collect();
    statements.extend(apis.iter().map(|(_, _, q)| q.clone()));
    let duck = duckdb(data_dir.as_path(), runs, &statements);

    println!();
    println!("spans acknowledged: {acked} in {wall:.1} s wall, {cpu:.1} s of server CPU");
    println!(
        "of the server's time on its one core: flushes {flush_s:.1} s, compactions {compaction_s:.1} s (wall time of each, as /metrics counts it); {compactions} compactions, {spliced} of them by copying row groups"
    );
    println!(
        "files: {files_before} flushed, {} after compaction",
        files.len()
    );
    println!(
        "the receiver's conversion of the same payloads into rows: {rows_rate:.0} spans/s, {:.2}× a prost decode",
        rows_rate / decode_rate
    );
    println!("| measure | Lumen | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| ingest, spans/s per core (durable) | {ingest_rate:.0} | {decode_rate:.0} (prost decode) | {:.2} | ≥ 0.5 |",
        ingest_rate / decode_rate
    );
    println!(
        "| size, bytes/span after compaction | {lumen_bps:.1} | {zstd_bps:.1} (OTLP protobuf, zstd 3) | {:.2} | ≤ 0.5 |",
        lumen_bps / zstd_bps
    );
    println!(
        "| memory, peak RSS during ingest | {:.0} MiB | 512 MiB (the defaults' cap) | {:.2} | ≤ 1.0 |",
        peak_rss as f64 / 1048576.0,
        peak_rss as f64 / (512.0 * 1048576.0)
    );
    for (i, (name, _, _)) in queries.iter().enumerate() {
        let (l50, l99, lrows) = lumen_q[i];
        match duck.get(i) {
            Some((d50, d99, drows)) => {
                assert_eq!(lrows, *drows, "{name}: Lumen and DuckDB disagree");
                println!(
                    "| query p50, {name} ({lrows} rows) | {l50:.2} ms | {d50:.2} ms (DuckDB) | {:.2} | ≤ 1.0 |",
                    l50 / d50
                );
                println!(
                    "| query p99, {name} | {l99:.2} ms | {d99:.2} ms (DuckDB) | {:.2} | ≤ 1.0 |",
                    l99 / d99
                );
            }
            None => println!(
                "| query, {name} | {l50:.2} / {l99:.2} ms | DuckDB did not run | — | ≤ 1.0 |"
            ),
        }
    }
    for (i, (name, _, _)) in apis.iter().enumerate() {
        let (l50, l99, lspans) = lumen_api[i];
        match duck.get(queries.len() + i) {
            Some((d50, d99, drows)) => {
                // Jaeger's answers hold spans: as many as DuckDB's rows. The graph's nodes
                // and edges are not rows of the rollups, so it has no such check.
                if name.starts_with("Jaeger") {
                    assert_eq!(lspans, *drows, "{name}: Lumen and DuckDB disagree");
                }
                println!(
                    "| API p50, {name} | {l50:.2} ms | {d50:.2} ms (DuckDB) | {:.2} | ≤ 1.0 |",
                    l50 / d50
                );
                println!(
                    "| API p99, {name} | {l99:.2} ms | {d99:.2} ms (DuckDB) | {:.2} | ≤ 1.0 |",
                    l99 / d99
                );
            }
            None => println!(
                "| API, {name} | {l50:.2} / {l99:.2} ms | DuckDB did not run | — | ≤ 1.0 |"
            ),
        }
    }
}

fn best_of(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..n).map(|_| f()).fold(0.0, f64::max)
}

fn percentile(times: &mut [f64], q: f64) -> f64 {
    times.sort_by(f64::total_cmp);
    let i = ((times.len() as f64 - 1.0) * q).round() as usize;
    times[i.min(times.len() - 1)]
}

/// Sends every batch over OTLP/gRPC, 16 in flight; returns the spans acknowledged and the
/// zstd-3 size of a sample of the payloads (one in ten) with its span count.
async fn send_all(grpc: &str, corpus: &mut Corpus) -> (usize, usize, usize) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let url = format!("http://{grpc}/opentelemetry.proto.collector.trace.v1.TraceService/Export");
    let mut in_flight = tokio::task::JoinSet::new();
    let (mut acked, mut zstd_bytes, mut zstd_spans) = (0usize, 0usize, 0usize);
    for i in 0..corpus.batches {
        let payload = corpus.batch().encode_to_vec();
        if i % 10 == 0 {
            zstd_bytes += zstd::bulk::compress(&payload, 3).expect("zstd").len();
            zstd_spans += SPANS_PER_BATCH;
        }
        let mut frame = Vec::with_capacity(payload.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        let (client, url) = (client.clone(), url.clone());
        in_flight.spawn(async move { export(&client, &url, Bytes::from(frame)).await });
        while in_flight.len() >= 16 {
            acked += in_flight.join_next().await.expect("task").expect("join");
        }
    }
    while let Some(r) = in_flight.join_next().await {
        acked += r.expect("join");
    }
    (acked, zstd_bytes, zstd_spans)
}

/// One Export call, retried while the server says to (RESOURCE_EXHAUSTED, UNAVAILABLE).
async fn export(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: &str,
    frame: Bytes,
) -> usize {
    for _ in 0..1000 {
        let req = http::Request::post(url)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(frame.clone()))
            .expect("request");
        let resp = client.request(req).await.expect("response");
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body");
        let trailers = body.trailers().cloned().unwrap_or_default();
        let status = headers
            .get("grpc-status")
            .or_else(|| trailers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match status.as_str() {
            "0" => return SPANS_PER_BATCH,
            "8" | "14" => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("export failed with grpc-status {other:?}"),
        }
    }
    panic!("export refused 1,000 times")
}

/// `lumen telemetry` (release build) pinned to core 1.
struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        let mut child = Command::new("taskset")
            .args([
                "-c",
                "1",
                env!("CARGO_BIN_EXE_lumen"),
                "telemetry",
                "--data",
            ])
            .arg(data)
            .args([
                "--otlp-grpc",
                "127.0.0.1:0",
                "--otlp-http",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--jaeger-grpc",
                "127.0.0.1:0",
            ])
            // LUMEN_BENCH_LOG=info shows each flush and compaction on stderr.
            .env(
                "RUST_LOG",
                std::env::var("LUMEN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("taskset lumen telemetry (util-linux taskset)");
        let stdout = child.stdout.take().expect("stdout");
        let (mut grpc, mut http) = (String::new(), String::new());
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            // "telemetry: OTLP gRPC <addr>, dashboard http://<addr>/, Jaeger gRPC <addr>"
            if let Some(rest) = line.strip_prefix("telemetry: OTLP gRPC ") {
                let (g, h) = rest.split_once(", dashboard ").unwrap_or((rest, ""));
                let h = h.split_once(", Jaeger gRPC ").map_or(h, |(h, _)| h);
                grpc = g.to_string();
                http = h
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string();
                break;
            }
        }
        assert!(!grpc.is_empty(), "lumen telemetry did not start");
        // Its log goes on to stderr (a closed pipe would fail its writes).
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        Server { child, grpc, http }
    }

    /// The sum of every sample of `family` on the server's /metrics (0 when absent).
    fn metric_sum(&self, family: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(&self.http) else {
            return 0.0;
        };
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        );
        let mut body = String::new();
        if conn.write_all(request.as_bytes()).is_err() || conn.read_to_string(&mut body).is_err() {
            return 0.0;
        }
        body.lines()
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn proc_status(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn peak_rss(&self) -> u64 {
        self.proc_status("VmHWM:") * 1024
    }

    /// User + system CPU seconds of the whole process so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        ticks / 100.0
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "lumen telemetry exited {status}");
    }
}

/// DuckDB's p50, p99 and row count for each statement, or nothing when it is not installed.
fn duckdb(spans: &Path, runs: usize, statements: &[String]) -> Vec<(f64, f64, usize)> {
    let python = std::env::var_os("LUMEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lumen-peers/venv/bin/python"));
    let script = format!(
        "{}/scripts/bench/duckdb_query.py",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    );
    let out = Command::new(python)
        .arg(script)
        .arg(spans)
        .arg(runs.to_string())
        .args(statements)
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "DuckDB baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return Vec::new();
        }
        Err(e) => {
            eprintln!("DuckDB baseline did not run ({e}): scripts/bench-telemetry installs it");
            return Vec::new();
        }
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// One span of a trace: (service index, version, kind, parent index, start offset ms,
/// duration ms, the service called).
type Hop<'a> = (usize, &'a str, i32, Option<usize>, u64, u64, &'a str);

/// The demo mesh's traffic, deterministic.
struct Corpus {
    rng: StdRng,
    batches: usize,
    trace: u64,
    traces_total: u64,
}

impl Corpus {
    fn new(batches: usize) -> Corpus {
        Corpus {
            rng: StdRng::seed_from_u64(7),
            batches,
            trace: 0,
            traces_total: (batches * SPANS_PER_BATCH / SPANS_PER_TRACE) as u64,
        }
    }

    fn trace_id(n: u64) -> [u8; 16] {
        // Random-looking but reproducible from the trace number.
        let mut rng = StdRng::seed_from_u64(n ^ 0x5eed);
        let mut id = [0u8; 16];
        rng.fill(&mut id);
        id[0] |= 1;
        id
    }

    fn middle_trace_hex(&self) -> String {
        Self::trace_id(self.traces_total / 2)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The next 1,000 spans, grouped by the service that reported them.
    fn batch(&mut self) -> ExportTraceServiceRequest {
        let services = ["productpage", "reviews", "ratings"];
        let mut by_service: Vec<(String, String, Vec<Span>)> = Vec::new();
        for _ in 0..SPANS_PER_BATCH / SPANS_PER_TRACE {
            let n = self.trace;
            self.trace += 1;
            let trace_id = Self::trace_id(n).to_vec();
            let start = T0_NS + n * (DAY_NS / self.traces_total.max(1));
            let version = if self.rng.random_bool(0.5) {
                "v1"
            } else {
                "v2"
            };
            let request_id = {
                let mut b = [0u8; 16];
                self.rng.fill(&mut b);
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            };
            let slow = self.rng.random_bool(0.05);
            let ratings_ms: u64 = if slow {
                self.rng.random_range(100..160)
            } else {
                self.rng.random_range(1..5)
            };
            let mut ids = [[0u8; 8]; SPANS_PER_TRACE];
            for id in &mut ids {
                self.rng.fill(id);
                id[0] |= 1;
            }
            let shape: [Hop; SPANS_PER_TRACE] = [
                (0, "v1", 2, None, 0, ratings_ms + 8, "productpage"),
                (0, "v1", 3, Some(0), 1, ratings_ms + 6, "reviews"),
                (1, version, 2, Some(1), 2, ratings_ms + 4, "reviews"),
                (1, version, 3, Some(2), 3, ratings_ms + 2, "ratings"),
                (2, "v1", 2, Some(3), 4, ratings_ms, "ratings"),
            ];
            for (i, (svc, ver, kind, parent, offset, dur, peer)) in shape.iter().enumerate() {
                let status = if *svc == 2 && self.rng.random_bool(0.03) {
                    500
                } else {
                    200
                };
                let s0 = start + offset * 1_000_000;
                let mut attributes = vec![
                    text("http.request.method", "GET"),
                    text(
                        "url.path",
                        &format!("/{peer}/{}", self.rng.random_range(0..1000)),
                    ),
                    text("http.route", &format!("/{peer}/{{id}}")),
                    int("http.response.status_code", status),
                    text(
                        "server.address",
                        &format!("{peer}.default.svc.cluster.local"),
                    ),
                    int("server.port", 9080),
                    text("network.peer.address", &format!("127.0.10.{}", svc + 1)),
                    text("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
                    text("guid:x-request-id", &request_id),
                    text(
                        "upstream_cluster",
                        &format!("outbound|9080|{ver}|{peer}.default.svc.cluster.local"),
                    ),
                    text("response_flags", "-"),
                    text("istio.canonical_service", services[*svc]),
                    text("istio.canonical_revision", ver),
                    text("istio.namespace", "default"),
                    text("component", "proxy"),
                ];
                if status != 200 {
                    attributes.push(text("error.type", "500"));
                }
                // As the mesh's sidecars write them: a client span names its callee, a
                // server span its caller (with the caller's version and namespace).
                match (*kind, parent) {
                    (3, _) => attributes.push(text("peer.service", peer)),
                    (2, Some(p)) => {
                        let (caller, caller_version) = (services[shape[*p].0], shape[*p].1);
                        attributes.push(text("peer.service", caller));
                        attributes.push(text("lumen.source.version", caller_version));
                        attributes.push(text("lumen.source.namespace", "default"));
                    }
                    _ => {}
                }
                let events = if self.rng.random_bool(0.2) {
                    vec![span::Event {
                        time_unix_nano: s0 + 500_000,
                        name: "upstream.retry".into(),
                        attributes: vec![int("retry.attempt", 1)],
                        dropped_attributes_count: 0,
                    }]
                } else {
                    Vec::new()
                };
                let span = Span {
                    trace_id: trace_id.clone(),
                    span_id: ids[i].to_vec(),
                    parent_span_id: parent.map(|p| ids[p].to_vec()).unwrap_or_default(),
                    name: format!("{peer}.default.svc.cluster.local:9080/*"),
                    kind: *kind,
                    start_time_unix_nano: s0,
                    end_time_unix_nano: s0 + dur * 1_000_000,
                    attributes,
                    events,
                    flags: 0x301,
                    ..Default::default()
                };
                let service = services[*svc].to_string();
                match by_service
                    .iter_mut()
                    .find(|(s, v, _)| *s == service && v == ver)
                {
                    Some((_, _, spans)) => spans.push(span),
                    None => by_service.push((service, ver.to_string(), vec![span])),
                }
            }
        }
        ExportTraceServiceRequest {
            resource_spans: by_service
                .into_iter()
                .map(|(service, version, spans)| ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![
                            text("service.name", &service),
                            text("service.version", &version),
                            text("service.namespace", "default"),
                            text("k8s.pod.name", &format!("{service}-{version}-7d4b9c")),
                            text("k8s.namespace.name", "default"),
                        ],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
        }
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}
