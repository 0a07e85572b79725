//! Hostile OTLP against `lumen telemetry` on its default limits: an amplifying request, a
//! gzip bomb, a flood of concurrent streams over many connections and an ingest rate faster
//! than a deliberately slowed flush. Each ends in explicit refusals (RESOURCE_EXHAUSTED with
//! a reason), the process's peak resident memory stays under 512 MiB, and every acknowledged
//! span is stored, exactly once, across a clean restart.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Lumen;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tonic::Code;

/// The resident memory the default limits keep the whole service under.
const RSS_CAP: u64 = 512 * 1024 * 1024;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn request(resource: Vec<KeyValue>, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A realistic mesh export: `n` server spans of one trace (`trace`), with HTTP attributes
/// and a random-looking request id each.
fn mesh_export(trace: u64, n: usize) -> ExportTraceServiceRequest {
    let mut trace_id = trace.to_be_bytes().to_vec();
    trace_id.extend_from_slice(&[0x5a; 8]);
    let spans = (0..n)
        .map(|i| Span {
            trace_id: trace_id.clone(),
            span_id: ((trace << 20) | i as u64).to_be_bytes().to_vec(),
            name: "GET /reviews/{id}".into(),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000 + i as u64,
            end_time_unix_nano: 1_700_000_000_004_000_000 + i as u64,
            attributes: vec![
                text("http.request.method", "GET"),
                text("url.path", format!("/reviews/{i}")),
                kv("http.response.status_code", any_value::Value::IntValue(200)),
                text("server.address", "reviews.default.svc.cluster.local"),
                kv("server.port", any_value::Value::IntValue(9080)),
                text("network.peer.address", "127.0.10.3"),
                text(
                    "guid:x-request-id",
                    format!("{:032x}", trace * 7919 + i as u64),
                ),
                text("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
                text("istio.canonical_service", "reviews"),
                text("istio.canonical_revision", "v2"),
                text("istio.namespace", "default"),
                text("upstream_cluster", "inbound|9080||"),
                text("response_flags", "-"),
                text("peer.service", "productpage"),
                text("component", "proxy"),
            ],
            ..Default::default()
        })
        .collect();
    request(vec![text("service.name", "flood")], spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Acknowledged traces (hex id → spans) and refusals by code.
#[derive(Default)]
struct Tally {
    acked: HashMap<String, i64>,
    refused: HashMap<Code, usize>,
    /// Refusals by reason: the first words of the message up to a digit or colon.
    reasons: HashMap<String, usize>,
    messages: Vec<String>,
}

async fn send(
    client: &mut TraceServiceClient<tonic::transport::Channel>,
    req: ExportTraceServiceRequest,
    tally: &Mutex<Tally>,
) {
    let trace = hex(&req.resource_spans[0].scope_spans[0].spans[0].trace_id);
    let n = req.resource_spans[0].scope_spans[0].spans.len() as i64;
    let result = client.export(req).await;
    let mut t = tally.lock().expect("lock");
    match result {
        Ok(_) => {
            t.acked.insert(trace, n);
        }
        Err(status) => {
            *t.refused.entry(status.code()).or_default() += 1;
            let reason = if status.message().contains("buffer full") {
                "buffer full"
            } else if status.message().contains("in progress") {
                "requests in progress"
            } else {
                "other"
            };
            *t.reasons.entry(reason.to_string()).or_default() += 1;
            if t.messages.len() < 20 {
                t.messages
                    .push(format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

async fn connect(grpc: &str) -> TraceServiceClient<tonic::transport::Channel> {
    TraceServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect")
        .max_encoding_message_size(64 * 1024 * 1024)
}

async fn stored_traces(http: &str) -> HashMap<String, i64> {
    common::sql_rows(
        http,
        "SELECT trace_id, count(*) AS n FROM spans GROUP BY trace_id",
    )
    .await
    .iter()
    .map(|r| {
        (
            r["trace_id"].as_str().expect("trace_id").to_string(),
            r["n"].as_i64().expect("n"),
        )
    })
    .collect()
}

#[test]
fn hostile_otlp_is_refused_within_the_memory_cap_and_nothing_acked_is_lost() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_string_lossy().to_string();
    let (mut lumen, common::Addrs { grpc, .. }) = Lumen::telemetry(
        &data_dir,
        &["--flush-interval", "1", "--debug-flush-delay-ms", "3000"],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tally = Arc::new(Mutex::new(Tally::default()));

    rt.block_on(async {
        let mut client = connect(&grpc).await;

        // 1. Amplification: 200 resource attributes of 1 KB copied onto 20,000 empty spans.
        let resource: Vec<KeyValue> = (0..200)
            .map(|i| text(&format!("k{i}"), "v".repeat(1024)))
            .collect();
        let amplifying = request(resource, vec![Span::default(); 20_000]);
        let err = client.export(amplifying).await.expect_err("refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("smaller batches"), "{err:?}");

        // 2. Protobuf's own amplification: 1.5 million empty spans in 3 MB on the wire,
        // refused from the count of their rows before any is built.
        let empties = request(vec![], vec![Span::default(); 1_500_000]);
        let err = client.export(empties).await.expect_err("refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("expands to"), "{err:?}");

        // 2b. One span of 400,000 empty attributes (2 bytes each on the wire): refused while
        // its row is built, once it passes what the request's estimate reserved.
        let flood = Span {
            trace_id: vec![7; 16],
            span_id: vec![7; 8],
            attributes: vec![KeyValue::default(); 400_000],
            ..Default::default()
        };
        let err = client
            .export(request(vec![], vec![flood]))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("expands to more than"), "{err:?}");

        // 3. A gzip bomb: a span whose name is 40 MB of 'a', a few tens of KB compressed.
        let name_len = 40 * 1024 * 1024;
        let mut span = vec![0x2a];
        push_varint(&mut span, name_len as u64);
        let mut scope = vec![0x12];
        push_varint(&mut scope, (span.len() + name_len) as u64);
        let mut resource_spans = vec![0x12];
        push_varint(
            &mut resource_spans,
            (scope.len() + span.len() + name_len) as u64,
        );
        let mut head = vec![0x0a];
        push_varint(
            &mut head,
            (resource_spans.len() + scope.len() + span.len() + name_len) as u64,
        );
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for part in [&head, &resource_spans, &scope, &span] {
            enc.write_all(part).expect("gzip");
        }
        let chunk = vec![b'a'; 1024 * 1024];
        for _ in 0..40 {
            enc.write_all(&chunk).expect("gzip");
        }
        let bomb = enc.finish().expect("gzip");
        let code = raw_gzip_export(&grpc, &bomb).await;
        assert_ne!(code, "0", "a gzip bomb was accepted");
        eprintln!("gzip bomb of {} bytes: grpc-status {code}", bomb.len());
    });
    let after_hostile = lumen.peak_rss();
    eprintln!(
        "peak RSS after hostile requests: {} MiB",
        after_hostile >> 20
    );

    // 4. A flood: 8 connections × 48 concurrent streams of 1,000-span exports, then 4
    //    clients as fast as they can against a flush slowed to 3 s.
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..8u64 {
            let client = connect(&grpc).await;
            for s in 0..48u64 {
                let (mut client, tally) = (client.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    send(&mut client, mesh_export(1 + c * 1000 + s, 1000), &tally).await;
                }));
            }
        }
        for t in tasks {
            t.await.expect("flood task");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let (grpc, tally) = (grpc.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = connect(&grpc).await;
                let mut i = 0u64;
                while Instant::now() < deadline && i < 5000 {
                    send(
                        &mut client,
                        mesh_export(100_000 + w * 10_000 + i, 1000),
                        &tally,
                    )
                    .await;
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.expect("fast task");
        }
    });
    let peak = lumen.peak_rss();
    let t = tally.lock().expect("lock");
    eprintln!(
        "flood and fast ingest in {:.1} s: {} exports acknowledged, refused {:?} {:?}, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        t.acked.len(),
        t.refused,
        t.reasons,
        peak >> 20
    );
    for m in &t.messages {
        eprintln!("  {m}");
    }
    assert!(peak < RSS_CAP, "peak RSS {} MiB over the cap", peak >> 20);
    assert!(!t.acked.is_empty(), "nothing acknowledged");
    let exhausted = t
        .refused
        .get(&Code::ResourceExhausted)
        .copied()
        .unwrap_or(0);
    assert!(
        exhausted > 0,
        "no RESOURCE_EXHAUSTED under overload: {:?}",
        t.refused
    );
    assert!(
        t.refused
            .keys()
            .all(|c| matches!(c, Code::ResourceExhausted | Code::Unavailable)),
        "unexpected refusals: {:?}",
        t.messages
    );
    assert!(
        t.reasons.contains_key("requests in progress"),
        "the flood never met the request slots: {:?}",
        t.reasons
    );
    assert!(
        t.reasons.contains_key("buffer full"),
        "ingest never outran the slowed flush: {:?}",
        t.reasons
    );
    assert!(!t.reasons.contains_key("other"), "{:?}", t.messages);

    // Nothing acknowledged is lost: a clean stop (final flush), a restart, every span there.
    let took = lumen.interrupt(Duration::from_secs(60));
    eprintln!("stopped {:.1} s after SIGINT", took.as_secs_f64());
    let (lumen, common::Addrs { http, .. }) =
        Lumen::telemetry(&data_dir, &["--query-max-rows", "1000000"]);
    let stored = rt.block_on(stored_traces(&http));
    for (trace, n) in &t.acked {
        assert_eq!(stored.get(trace), Some(n), "trace {trace}");
    }
    drop(lumen);
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Posts one gzip-compressed gRPC frame as an Export call; returns grpc-status.
async fn raw_gzip_export(grpc: &str, compressed: &[u8]) -> String {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    frame.extend_from_slice(compressed);
    let req = http::Request::post(format!(
        "http://{grpc}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("grpc-encoding", "gzip")
    .header("te", "trailers")
    .body(Full::new(bytes::Bytes::from(frame)))
    .expect("request");
    let resp = client.request(req).await.expect("response");
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    headers
        .get("grpc-status")
        .or_else(|| trailers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
