//! Jaeger's query API against Jaeger's own fixtures: the OTLP trace of
//! `otlp2jaeger-in.json` comes back from `/api/traces/{id}` equal to `otlp2jaeger-out.json`
//! (only object key order and process key names normalised), a richer trace has the shape
//! of Jaeger's UI-model fixture `ui_01.json` (every field it has, no others), search, operations, services and dependencies
//! answer as Jaeger does, and every bad parameter is a 4xx in Jaeger's error envelope.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value, json};

fn fixture(file: &str) -> Value {
    let text = std::fs::read_to_string(common::conformance(file)).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

async fn get(http: SocketAddr, path: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("http://{http}{path}"))
        .await
        .expect("get");
    let status = resp.status().as_u16();
    let body = resp.json().await.expect("JSON body");
    (status, body)
}

/// Renames each trace's process keys to p1, p2, ... in order of first use by its spans.
fn normalise_processes(envelope: &mut Value) {
    let Some(traces) = envelope["data"].as_array_mut() else {
        return;
    };
    for trace in traces {
        let mut renames: Vec<(String, String)> = Vec::new();
        if let Some(spans) = trace["spans"].as_array_mut() {
            for span in spans {
                let old = span["processID"].as_str().unwrap_or_default().to_string();
                let new = match renames.iter().find(|(o, _)| *o == old) {
                    Some((_, n)) => n.clone(),
                    None => {
                        let n = format!("p{}", renames.len() + 1);
                        renames.push((old, n.clone()));
                        n
                    }
                };
                span["processID"] = Value::String(new);
            }
        }
        let old = trace["processes"].as_object().cloned().unwrap_or_default();
        let mut processes = Map::new();
        for (o, n) in renames {
            if let Some(p) = old.get(&o) {
                processes.insert(n, p.clone());
            }
        }
        trace["processes"] = Value::Object(processes);
    }
}

/// Keys of every object in `v`, with their paths (array items merged).
fn keys(v: &Value, path: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{path}.{k}");
                out.insert(p.clone());
                keys(v, &p, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                keys(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn otlp_in_comes_back_as_jaegers_own_expected_output() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    common::export_json(svc.otlp_http, &fixture("jaeger/otlp2jaeger-in.json")).await;
    let (status, mut got) = get(svc.http, "/api/traces/83a9efd15c1c98a977e0711cc93ee28b").await;
    assert_eq!(status, 200, "{got}");
    let mut want = fixture("jaeger/otlp2jaeger-out.json");
    normalise_processes(&mut got);
    normalise_processes(&mut want);
    assert_eq!(got, want, "got {got:#}\nwant {want:#}");
    svc.stop().await;
}

/// A trace with what the UI model carries: typed tags (big ints as strings, binary as
/// base64), events as logs, parent and link references, two processes.
fn rich_trace(now_ns: i64) -> Value {
    let t = |ms: i64| (now_ns - 60_000_000_000 + ms * 1_000_000).to_string();
    json!({ "resourceSpans": [
        { "resource": { "attributes": [
            { "key": "service.name", "value": { "stringValue": "frontend" } },
            { "key": "host.name", "value": { "stringValue": "node-1" } }
          ]},
          "scopeSpans": [{ "scope": { "name": "lib", "version": "2.0" }, "spans": [
            { "traceId": "0000000000000000000000000000c0de", "spanId": "0000000000000001",
              "name": "GET /", "kind": 2, "startTimeUnixNano": t(0), "endTimeUnixNano": t(30),
              "attributes": [
                { "key": "http.request.method", "value": { "stringValue": "GET" } },
                { "key": "http.response.status_code", "value": { "intValue": "500" } },
                { "key": "retry", "value": { "boolValue": true } },
                { "key": "temperature", "value": { "doubleValue": 72.5 } },
                { "key": "big", "value": { "intValue": "9223372036854775222" } },
                { "key": "blob", "value": { "bytesValue": "AAAwOQ==" } }
              ],
              "events": [{ "timeUnixNano": t(1), "name": "cache miss",
                           "attributes": [{ "key": "x", "value": { "stringValue": "y" } }] }],
              "status": { "code": 2, "message": "upstream failed" } }
          ]}]
        },
        { "resource": { "attributes": [
            { "key": "service.name", "value": { "stringValue": "backend" } }
          ]},
          "scopeSpans": [{ "spans": [
            { "traceId": "0000000000000000000000000000c0de", "spanId": "0000000000000002",
              "parentSpanId": "0000000000000001", "name": "query", "kind": 3,
              "startTimeUnixNano": t(5), "endTimeUnixNano": t(25),
              "links": [{ "traceId": "000000000000000000000000000000ff", "spanId": "00000000000000ff" }],
              "attributes": [{ "key": "peer.service", "value": { "stringValue": "db" } }] }
          ]}]
        }
    ]})
}

#[tokio::test]
async fn search_operations_services_and_the_ui_model_shape() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    let now_ns = lumen_telemetry::now_ns();
    common::export_json(svc.otlp_http, &rich_trace(now_ns)).await;
    common::export_json(svc.otlp_http, &fixture("jaeger/otlp2jaeger-in.json")).await;

    let (status, services) = get(svc.http, "/api/services").await;
    assert_eq!(status, 200);
    assert_eq!(
        services["data"],
        json!(["backend", "frontend", "telemetrygen"])
    );
    assert_eq!(services["total"], 3);

    let (_, ops) = get(svc.http, "/api/services/frontend/operations").await;
    assert_eq!(ops["data"], json!(["GET /"]));
    let (_, ops) = get(svc.http, "/api/operations?service=backend&spanKind=client").await;
    assert_eq!(
        ops["data"],
        json!([{ "name": "query", "spanKind": "client" }])
    );

    // The trace by its 64-bit id, as Jaeger shows such ids, and by search.
    let (status, by_id) = get(svc.http, "/api/traces/c0de").await;
    assert_eq!(status, 200, "{by_id}");
    let trace = &by_id["data"][0];
    assert_eq!(trace["traceID"], "000000000000c0de");
    let ui = fixture("jaeger/uimodel/ui_01.json");
    let (mut ours, mut theirs) = (Default::default(), Default::default());
    keys(trace, "", &mut ours);
    keys(&ui, "", &mut theirs);
    // Every field of the UI model is there; the only ones beyond it are the items of
    // process tags (empty in the fixture), which are tags like the spans'.
    let missing: Vec<_> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "fields of Jaeger's UI model missing: {missing:?}"
    );
    let extra: Vec<_> = ours
        .difference(&theirs)
        .filter(|k| {
            !["tags[].key", "tags[].type", "tags[].value"]
                .iter()
                .any(|t| k.ends_with(t))
        })
        .collect();
    assert!(
        extra.is_empty(),
        "fields Jaeger's UI model does not have: {extra:?}"
    );
    let spans = trace["spans"].as_array().expect("spans");
    let root = spans
        .iter()
        .find(|s| s["spanID"] == "0000000000000001")
        .expect("root");
    let tag = |key: &str| {
        root["tags"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["key"] == key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        tag("http.response.status_code"),
        json!({"key": "http.response.status_code", "type": "int64", "value": 500})
    );
    assert_eq!(
        tag("big")["value"],
        "9223372036854775222",
        "past 2^53, as a string"
    );
    assert_eq!(
        tag("blob"),
        json!({"key": "blob", "type": "binary", "value": "AAAwOQ=="})
    );
    assert_eq!(tag("temperature")["type"], "float64");
    assert_eq!(tag("retry")["value"], true);
    assert_eq!(
        tag("error"),
        json!({"key": "error", "type": "bool", "value": true})
    );
    assert_eq!(tag("otel.status_description")["value"], "upstream failed");
    assert_eq!(tag("otel.scope.version")["value"], "2.0");
    assert_eq!(
        root["logs"][0]["fields"][0],
        json!({"key": "event", "type": "string", "value": "cache miss"})
    );
    assert_eq!(root["duration"], 30_000);
    let child = spans
        .iter()
        .find(|s| s["spanID"] == "0000000000000002")
        .expect("child");
    assert_eq!(
        child["references"],
        json!([
            { "refType": "CHILD_OF", "traceID": "000000000000c0de", "spanID": "0000000000000001" },
            { "refType": "FOLLOWS_FROM", "traceID": "00000000000000ff", "spanID": "00000000000000ff" }
        ])
    );
    assert_ne!(root["processID"], child["processID"]);
    let p = &trace["processes"][root["processID"].as_str().expect("pid")];
    assert_eq!(p["serviceName"], "frontend");
    assert_eq!(
        p["tags"],
        json!([{ "key": "host.name", "type": "string", "value": "node-1" }])
    );

    let start = (now_ns - 3_600_000_000_000) / 1000;
    let end = now_ns / 1000;
    for (query, hits) in [
        (format!("service=frontend&start={start}&end={end}"), 1),
        (
            format!("service=frontend&start={start}&end={end}&operation=GET%20/"),
            1,
        ),
        (
            format!("service=frontend&start={start}&end={end}&operation=POST"),
            0,
        ),
        (
            format!("service=frontend&start={start}&end={end}&minDuration=20ms"),
            1,
        ),
        (
            format!("service=frontend&start={start}&end={end}&minDuration=50ms"),
            0,
        ),
        (
            format!("service=frontend&start={start}&end={end}&maxDuration=10ms"),
            0,
        ),
        (
            format!(
                "service=frontend&start={start}&end={end}&tags=%7B%22http.response.status_code%22%3A%22500%22%7D"
            ),
            1,
        ),
        (
            format!("service=frontend&start={start}&end={end}&tag=error:true&tag=host.name:node-1"),
            1,
        ),
        (
            format!("service=frontend&start={start}&end={end}&tag=retry:true&tag=temperature:72.5"),
            1,
        ),
        (
            format!("service=frontend&start={start}&end={end}&tag=host.name:node-2"),
            0,
        ),
        (
            format!("service=backend&start={start}&end={end}&tag=peer.service:db"),
            1,
        ),
        (
            format!(
                "service=frontend&start={}&end={}",
                end - 10_000_000,
                end - 5_000_000
            ),
            0,
        ),
    ] {
        let (status, found) = get(svc.http, &format!("/api/traces?{query}")).await;
        assert_eq!(status, 200, "{query}: {found}");
        let n = found["data"].as_array().map_or(0, Vec::len);
        assert_eq!(n, hits, "{query}: {found}");
        if hits > 0 {
            assert_eq!(
                found["data"][0]["spans"].as_array().map(Vec::len),
                Some(2),
                "whole traces"
            );
        }
    }
    let (_, by_ids) = get(
        svc.http,
        "/api/traces?traceID=c0de&traceID=83a9efd15c1c98a977e0711cc93ee28b",
    )
    .await;
    assert_eq!(by_ids["data"].as_array().map(Vec::len), Some(2));
    svc.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_4xx_in_jaegers_envelope_and_the_service_goes_on() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    common::export_json(svc.otlp_http, &fixture("jaeger/otlp2jaeger-in.json")).await;
    for (path, status, needle) in [
        ("/api/traces/not-hex", 400, "traceID"),
        (
            "/api/traces/0123456789abcdef0123456789abcdef01",
            400,
            "traceID",
        ),
        (
            "/api/traces/00000000000000000000000000000bad",
            404,
            "trace not found",
        ),
        ("/api/traces?traceID=zz", 400, "traceID"),
        ("/api/traces", 400, "service"),
        ("/api/traces?service=nobody", 404, "nobody"),
        ("/api/services/nobody/operations", 404, "nobody"),
        ("/api/operations", 400, "service"),
        (
            "/api/operations?service=telemetrygen&spanKind=sideways",
            400,
            "spanKind",
        ),
        (
            "/api/traces?service=telemetrygen&start=20&end=10",
            400,
            "inverted",
        ),
        (
            "/api/traces?service=telemetrygen&end=99999999999999999999",
            400,
            "end",
        ),
        ("/api/traces?service=telemetrygen&start=-5", 400, "1970"),
        (
            "/api/traces?service=telemetrygen&limit=10000000",
            400,
            "limit",
        ),
        (
            "/api/traces?service=telemetrygen&tags=%7Bbroken",
            400,
            "tags",
        ),
        ("/api/traces?service=telemetrygen&tag=nocolon", 400, "tag"),
        (
            "/api/traces?service=telemetrygen&minDuration=fast",
            400,
            "minDuration",
        ),
        ("/api/dependencies?endTs=soon", 400, "endTs"),
        ("/api/dependencies?lookback=-1", 400, "lookback"),
    ] {
        let (got, body) = get(svc.http, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(body["data"], Value::Null, "{path}: {body}");
        let msg = body["errors"][0]["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {msg}");
        assert_eq!(body["errors"][0]["code"], status, "{path}");
    }
    let (status, ok) = get(svc.http, "/api/traces/83a9efd15c1c98a977e0711cc93ee28b").await;
    assert_eq!(status, 200, "still serving: {ok}");
    svc.stop().await;
}

/// The span of Jaeger's api_v3 snapshots, as an OTLP export: no resource attributes, no
/// scope, no times.
fn snapshot_span() -> Value {
    json!({ "resourceSpans": [{ "resource": {}, "scopeSpans": [{ "scope": {}, "spans": [{
        "traceId": "00000000000000000000000000000001", "spanId": "0000000000000002",
        "name": "foobar", "kind": 2, "status": { "code": 2 }
    }]}]}]})
}

/// Whether `ours` has every key of `theirs` with a value of the same JSON type, recursively
/// (arrays by their first item).
fn same_shape(ours: &Value, theirs: &Value) -> bool {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => b
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|o| same_shape(o, v))),
        (Value::Array(a), Value::Array(b)) => match (a.first(), b.first()) {
            (Some(x), Some(y)) => same_shape(x, y),
            (_, None) => true,
            (None, Some(_)) => false,
        },
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => true,
        _ => false,
    }
}

#[tokio::test]
async fn api_v3_answers_as_jaegers_snapshots() {
    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    common::export_json(svc.otlp_http, &snapshot_span()).await;
    common::export_json(svc.otlp_http, &rich_trace(lumen_telemetry::now_ns())).await;

    let (status, trace) = get(svc.http, "/api/v3/traces/00000000000000000000000000000001").await;
    assert_eq!(status, 200, "{trace}");
    assert_eq!(trace, fixture("jaeger/apiv3/GetTrace.json"), "{trace:#}");
    let (status, found) = get(
        svc.http,
        "/api/v3/traces?query.service_name=unknown_service&query.start_time_min=1970-01-01T00:00:00Z\
         &query.start_time_max=2100-01-01T00:00:00Z&query.search_depth=20",
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found, fixture("jaeger/apiv3/FindTraces.json"), "{found:#}");

    let (_, services) = get(svc.http, "/api/v3/services").await;
    assert!(
        same_shape(&services, &fixture("jaeger/apiv3/GetServices.json")),
        "{services}"
    );
    assert_eq!(
        services["services"],
        json!(["backend", "frontend", "unknown_service"])
    );
    let (_, ops) = get(
        svc.http,
        "/api/v3/operations?service=frontend&span_kind=server",
    )
    .await;
    assert!(
        same_shape(&ops, &fixture("jaeger/apiv3/GetOperations.json")),
        "{ops}"
    );
    assert_eq!(
        ops["operations"],
        json!([{ "name": "GET /", "spanKind": "server" }])
    );

    // The rich trace: typed attributes as OTLP JSON values, ids as hex.
    let (_, rich) = get(svc.http, "/api/v3/traces/0000000000000000000000000000c0de").await;
    let spans: Vec<Value> = rich["result"]["resourceSpans"]
        .as_array()
        .expect("resourceSpans")
        .iter()
        .filter_map(|rs| rs["scopeSpans"][0]["spans"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(spans.len(), 2, "{rich}");
    let root = spans
        .iter()
        .find(|s| s["spanId"] == "0000000000000001")
        .expect("root");
    let attr = |key: &str| {
        root["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|kv| kv["key"] == key))
            .map(|kv| kv["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        attr("http.response.status_code"),
        json!({ "intValue": "500" })
    );
    assert_eq!(attr("retry"), json!({ "boolValue": true }));
    assert_eq!(attr("temperature"), json!({ "doubleValue": 72.5 }));

    for (path, status) in [
        ("/api/v3/traces/xyz", 400),
        ("/api/v3/traces/00000000000000000000000000000bad", 404),
        ("/api/v3/traces", 400),
        (
            "/api/v3/traces?query.service_name=a&query.start_time_min=yesterday",
            400,
        ),
        (
            "/api/v3/traces?query.service_name=a&query.start_time_min=2020-01-02T00:00:00Z&query.start_time_max=2020-01-01T00:00:00Z",
            400,
        ),
        (
            "/api/v3/traces?query.service_name=a&query.search_depth=99999999",
            400,
        ),
        ("/api/v3/operations", 400),
    ] {
        let (got, body) = get(svc.http, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(body["error"]["httpCode"], status, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}"
        );
    }
    svc.stop().await;
}

/// A gRPC call of `jaeger.api_v3.QueryService`: the messages it streamed back, or its status.
async fn grpc_call<Req, Resp>(
    addr: SocketAddr,
    method: &'static str,
    request: Req,
) -> Result<Vec<Resp>, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(method);
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let mut stream = grpc
        .server_streaming(tonic::Request::new(request), path, codec)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.push(message);
    }
    Ok(out)
}

#[tokio::test]
async fn api_v3_over_grpc_answers_as_jaegers_snapshots() {
    use lumen_telemetry::jaeger::grpc::pb;
    use opentelemetry_proto::tonic::trace::v1::TracesData;

    let svc = common::start_telemetry(Duration::from_secs(3600)).await;
    common::export_json(svc.otlp_http, &snapshot_span()).await;
    common::export_json(svc.otlp_http, &rich_trace(lumen_telemetry::now_ns())).await;
    let addr = svc.jaeger_grpc;
    let as_json = |messages: Vec<TracesData>| {
        let spans: Vec<_> = messages
            .into_iter()
            .flat_map(|t| t.resource_spans)
            .collect();
        lumen_telemetry::jaeger::v3::otlp_json(&spans)
    };

    let trace: Vec<TracesData> = grpc_call(
        addr,
        "/jaeger.api_v3.QueryService/GetTrace",
        pb::GetTraceRequest {
            trace_id: "00000000000000000000000000000001".into(),
            ..Default::default()
        },
    )
    .await
    .expect("GetTrace");
    assert_eq!(trace.len(), 1, "one TracesData per trace");
    assert_eq!(as_json(trace), fixture("jaeger/apiv3/GetTrace.json"));

    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let query = pb::TraceQueryParameters {
        service_name: "unknown_service".into(),
        start_time_min: ts(0),
        start_time_max: ts(4_102_444_800),
        search_depth: 20,
        ..Default::default()
    };
    let found: Vec<TracesData> = grpc_call(
        addr,
        "/jaeger.api_v3.QueryService/FindTraces",
        pb::FindTracesRequest {
            query: Some(query.clone()),
        },
    )
    .await
    .expect("FindTraces");
    assert_eq!(as_json(found), fixture("jaeger/apiv3/FindTraces.json"));

    let services: Vec<pb::GetServicesResponse> = grpc_call(
        addr,
        "/jaeger.api_v3.QueryService/GetServices",
        pb::GetServicesRequest {},
    )
    .await
    .expect("GetServices");
    assert_eq!(
        services[0].services,
        ["backend", "frontend", "unknown_service"]
    );
    let ops: Vec<pb::GetOperationsResponse> = grpc_call(
        addr,
        "/jaeger.api_v3.QueryService/GetOperations",
        pb::GetOperationsRequest {
            service: "frontend".into(),
            span_kind: "server".into(),
        },
    )
    .await
    .expect("GetOperations");
    assert_eq!(
        ops[0].operations,
        [pb::Operation {
            name: "GET /".into(),
            span_kind: "server".into()
        }]
    );

    // Bad requests: each a status that says what is wrong, and the service goes on.
    let code = |r: Result<Vec<TracesData>, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());
    let get_trace = |id: &str| {
        grpc_call::<_, TracesData>(
            addr,
            "/jaeger.api_v3.QueryService/GetTrace",
            pb::GetTraceRequest {
                trace_id: id.into(),
                ..Default::default()
            },
        )
    };
    assert_eq!(
        code(get_trace("xyz").await),
        Err(tonic::Code::InvalidArgument)
    );
    assert_eq!(
        code(get_trace("00000000000000000000000000000bad").await),
        Err(tonic::Code::NotFound)
    );
    for bad in [
        pb::TraceQueryParameters {
            service_name: String::new(),
            ..query.clone()
        },
        pb::TraceQueryParameters {
            search_depth: 99_999_999,
            ..query.clone()
        },
        pb::TraceQueryParameters {
            start_time_min: ts(4_102_444_800),
            start_time_max: ts(0),
            ..query.clone()
        },
    ] {
        let r = grpc_call::<_, TracesData>(
            addr,
            "/jaeger.api_v3.QueryService/FindTraces",
            pb::FindTracesRequest { query: Some(bad) },
        )
        .await;
        assert_eq!(code(r), Err(tonic::Code::InvalidArgument));
    }
    let r = grpc_call::<_, TracesData>(
        addr,
        "/jaeger.api_v3.QueryService/Nothing",
        pb::GetServicesRequest {},
    )
    .await;
    assert_eq!(code(r), Err(tonic::Code::Unimplemented));
    svc.stop().await;
}
