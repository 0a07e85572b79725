//! Durability of `lumen telemetry`: exports stream in from several clients while the process
//! is SIGKILLed at random moments, 20 times, restarted on the same data directory each time;
//! every span whose export was acknowledged must then be queryable exactly once. Then the
//! same after the WAL's tail is torn (a half-written record) or corrupt (a bad checksum):
//! the service starts, reports and cuts the tail, and loses nothing acknowledged. And a
//! final flush that fails makes SIGTERM exit non-zero with the rows kept in the WAL.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Lumen;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use rand::Rng;

const ROUNDS: u8 = 20;
const SENDERS: u8 = 4;
const SPANS_PER_EXPORT: u16 = 25;

/// A span id that says who sent it: round, sender, export, index (from 1: never all zero).
fn span_id(round: u8, sender: u8, export: u32, index: u16) -> [u8; 8] {
    let mut id = [0u8; 8];
    id[0] = round;
    id[1] = sender;
    id[2..6].copy_from_slice(&export.to_be_bytes());
    id[6..8].copy_from_slice(&index.to_be_bytes());
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn export(round: u8, sender: u8, n: u32) -> (ExportTraceServiceRequest, Vec<String>) {
    let mut ids = Vec::new();
    let spans = (0..SPANS_PER_EXPORT)
        .map(|i| {
            let id = span_id(round, sender, n, i + 1);
            ids.push(hex(&id));
            let mut trace_id = vec![0u8; 8];
            trace_id.extend_from_slice(&id);
            Span {
                trace_id,
                span_id: id.to_vec(),
                name: "crash-test".into(),
                kind: 2,
                start_time_unix_nano: 1_700_000_000_000_000_000,
                end_time_unix_nano: 1_700_000_000_001_000_000,
                ..Default::default()
            }
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("crash".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    (request, ids)
}

fn start(data: &str) -> (Lumen, String, String, String) {
    let (lumen, a) = Lumen::telemetry(
        data,
        &["--flush-interval", "1", "--query-max-rows", "1000000"],
    );
    (lumen, a.grpc, a.http, a.wal)
}

/// Sends exports from `SENDERS` clients until the process dies or `limit` passes; returns
/// the span ids of acknowledged exports.
async fn stream_until_killed(grpc: &str, round: u8, limit: Duration) -> Vec<String> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + limit;
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let acked = acked.clone();
        let url = format!("http://{grpc}");
        tasks.push(tokio::spawn(async move {
            let mut client = match TraceServiceClient::connect(url).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sender {sender}: connect failed: {e}");
                    return;
                }
            };
            let mut n = 0u32;
            while Instant::now() < deadline {
                let (request, ids) = export(round, sender, n);
                n += 1;
                match tokio::time::timeout(Duration::from_secs(5), client.export(request)).await {
                    Ok(Ok(response)) => {
                        let partial = response.into_inner().partial_success;
                        assert!(
                            partial.as_ref().is_none_or(|p| p.rejected_spans == 0),
                            "valid spans rejected: {partial:?}"
                        );
                        acked.lock().expect("lock").extend(ids);
                    }
                    // Refused with a reason to retry (the buffer is full while replayed
                    // rows flush): retry, as an OTLP exporter does.
                    Ok(Err(status))
                        if matches!(
                            status.code(),
                            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                        ) =>
                    {
                        n -= 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(Err(status)) => {
                        // Expected once the process is killed: the connection goes away.
                        eprintln!("sender {sender}: export {n} ended: {status}");
                        return;
                    }
                    Err(_) => {
                        eprintln!("sender {sender}: export {n} timed out");
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    acked.lock().expect("lock").clone()
}

async fn stored_span_ids(http: &str) -> Vec<String> {
    common::sql_rows(http, "SELECT span_id FROM spans")
        .await
        .iter()
        .map(|r| r["span_id"].as_str().expect("span_id").to_string())
        .collect()
}

/// Every acknowledged id is stored, and no id is stored twice.
fn check_exactly_once(acked: &HashSet<String>, stored: &[String], when: &str) {
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(
        unique.len(),
        stored.len(),
        "{when}: {} spans stored more than once",
        stored.len() - unique.len()
    );
    let missing = acked.iter().filter(|id| !unique.contains(id)).count();
    assert_eq!(
        missing,
        0,
        "{when}: {missing} of {} acknowledged spans lost",
        acked.len()
    );
}

fn last_wal_segment(data: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(data.join("wal"))
        .expect("wal dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a WAL segment")
}

#[test]
fn acknowledged_spans_survive_sigkill_and_damaged_wal_tails() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut acked: HashSet<String> = HashSet::new();
    let mut rng = rand::rng();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let (mut lumen, grpc, _http, wal) = start(&data_dir);
        eprintln!("round {round}: {wal}");
        let kill_after = Duration::from_millis(rng.random_range(50..1500));
        let killer = {
            let pid = lumen.child.id();
            std::thread::spawn(move || {
                std::thread::sleep(kill_after);
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            })
        };
        let ids = rt.block_on(stream_until_killed(&grpc, round, Duration::from_secs(10)));
        killer.join().expect("killer");
        let _ = lumen.child.wait();
        eprintln!(
            "round {round}: killed after {kill_after:?}, {} spans acknowledged",
            ids.len()
        );
        acked.extend(ids);
    }
    eprintln!(
        "{ROUNDS} SIGKILLs in {:.1} s, {} spans acknowledged in all",
        started.elapsed().as_secs_f64(),
        acked.len()
    );
    assert!(
        acked.len() > 1000,
        "too few acknowledged spans to mean anything"
    );

    let (mut lumen, _grpc, http, _wal) = start(&data_dir);
    let stored = rt.block_on(stored_span_ids(&http));
    check_exactly_once(&acked, &stored, "after 20 SIGKILLs");
    lumen.child.kill().expect("kill");
    let _ = lumen.child.wait();

    // A torn tail: a record header promising 1000 bytes, then only 100 of them.
    let segment = last_wal_segment(data.path());
    let mut torn = std::fs::read(&segment).expect("read");
    let kept = torn.len();
    torn.extend_from_slice(&1000u32.to_le_bytes());
    torn.extend_from_slice(&0u32.to_le_bytes());
    torn.extend_from_slice(&[7u8; 100]);
    std::fs::write(&segment, &torn).expect("write");
    let (mut lumen, _grpc, http, wal) = start(&data_dir);
    assert!(
        wal.contains("cut 1 damaged"),
        "torn tail not reported: {wal}"
    );
    check_exactly_once(&acked, &rt.block_on(stored_span_ids(&http)), "torn tail");
    assert_eq!(
        std::fs::metadata(&segment)
            .map(|m| m.len() as usize)
            .unwrap_or(kept),
        kept,
        "the torn tail was cut"
    );
    lumen.child.kill().expect("kill");
    let _ = lumen.child.wait();

    // A corrupt tail: a whole record whose checksum does not match.
    let segment = last_wal_segment(data.path());
    let mut corrupt = std::fs::read(&segment).expect("read");
    let body = [0xabu8; 64];
    corrupt.extend_from_slice(&(body.len() as u32).to_le_bytes());
    corrupt.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    corrupt.extend_from_slice(&body);
    std::fs::write(&segment, &corrupt).expect("write");
    let (lumen, _grpc, http, wal) = start(&data_dir);
    assert!(
        wal.contains("cut 1 damaged"),
        "corrupt tail not reported: {wal}"
    );
    check_exactly_once(&acked, &rt.block_on(stored_span_ids(&http)), "corrupt tail");
    drop(lumen);
}

#[test]
fn a_failed_final_flush_exits_non_zero_and_keeps_the_rows_in_the_wal() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let (mut lumen, addrs) = Lumen::telemetry(
        &data_dir,
        &["--flush-interval", "3600", "--query-max-rows", "1000000"],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let acked: HashSet<String> = rt
        .block_on(async {
            let mut client = TraceServiceClient::connect(format!("http://{}", addrs.grpc))
                .await
                .expect("connect");
            let mut ids = Vec::new();
            for n in 0..20 {
                let (request, span_ids) = export(99, 1, n);
                client.export(request).await.expect("export");
                ids.extend(span_ids);
            }
            ids
        })
        .into_iter()
        .collect();
    // The spans directory becomes a file: the final flush cannot write there.
    let spans = data.path().join("spans");
    let aside = data.path().join("spans.aside");
    std::fs::rename(&spans, &aside).expect("move spans aside");
    std::fs::write(&spans, b"not a directory").expect("file in its place");
    let code = lumen.signal("-TERM", Duration::from_secs(30));
    assert!(!code.success(), "a failed final flush exited {code}");

    std::fs::remove_file(&spans).expect("remove");
    std::fs::rename(&aside, &spans).expect("move back");
    let (lumen, addrs) = Lumen::telemetry(&data_dir, &["--query-max-rows", "1000000"]);
    assert!(addrs.wal.contains("replayed 20 records"), "{}", addrs.wal);
    check_exactly_once(
        &acked,
        &rt.block_on(stored_span_ids(&addrs.http)),
        "after a failed final flush",
    );
    drop(lumen);
}
