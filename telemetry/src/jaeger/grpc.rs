//! Jaeger's `jaeger.api_v3.QueryService` over gRPC, on its own port (Jaeger's is 16685): the
//! same searches as the HTTP API v3, answered with OTLP `TracesData` streams.
//!
//! The messages are written here from the service's published definition (field numbers and
//! types), as prost types; no generated code and no copy of the `.proto`. Traces stream one
//! `TracesData` per trace, as Jaeger's own query service sends them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, TracesData};
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use super::params::{self, BadParam, Search};
use super::{SPAN_KINDS, dependency_counts, distinct_services, load_spans, operations_of};
use crate::query::{QueryEngine, QueryError};

/// The service's messages (`jaeger.api_v3`).
pub mod pb {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetTraceRequest {
        /// Hex, 64 or 128 bits.
        #[prost(string, tag = "1")]
        pub trace_id: String,
        #[prost(message, optional, tag = "2")]
        pub start_time: Option<prost_types::Timestamp>,
        #[prost(message, optional, tag = "3")]
        pub end_time: Option<prost_types::Timestamp>,
        #[prost(bool, tag = "4")]
        pub raw_traces: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TraceQueryParameters {
        #[prost(string, tag = "1")]
        pub service_name: String,
        #[prost(string, tag = "2")]
        pub operation_name: String,
        #[prost(map = "string, string", tag = "3")]
        pub attributes: HashMap<String, String>,
        #[prost(message, optional, tag = "4")]
        pub start_time_min: Option<prost_types::Timestamp>,
        #[prost(message, optional, tag = "5")]
        pub start_time_max: Option<prost_types::Timestamp>,
        #[prost(message, optional, tag = "6")]
        pub duration_min: Option<prost_types::Duration>,
        #[prost(message, optional, tag = "7")]
        pub duration_max: Option<prost_types::Duration>,
        #[prost(int32, tag = "8")]
        pub search_depth: i32,
        #[prost(bool, tag = "9")]
        pub raw_traces: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FindTracesRequest {
        #[prost(message, optional, tag = "1")]
        pub query: Option<TraceQueryParameters>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetServicesRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetServicesResponse {
        #[prost(string, repeated, tag = "1")]
        pub services: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetOperationsRequest {
        #[prost(string, tag = "1")]
        pub service: String,
        #[prost(string, tag = "2")]
        pub span_kind: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Operation {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub span_kind: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetOperationsResponse {
        #[prost(message, repeated, tag = "1")]
        pub operations: Vec<Operation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetDependenciesRequest {
        #[prost(message, optional, tag = "1")]
        pub start_time: Option<prost_types::Timestamp>,
        #[prost(message, optional, tag = "2")]
        pub end_time: Option<prost_types::Timestamp>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dependency {
        #[prost(string, tag = "1")]
        pub parent: String,
        #[prost(string, tag = "2")]
        pub child: String,
        #[prost(uint64, tag = "3")]
        pub call_count: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DependenciesResponse {
        #[prost(message, repeated, tag = "1")]
        pub dependencies: Vec<Dependency>,
    }
}

/// The fully qualified service name.
pub const SERVICE: &str = "jaeger.api_v3.QueryService";

/// The gRPC service; routes by method path.
#[derive(Debug, Clone)]
pub struct QueryService {
    engine: QueryEngine,
}

impl QueryService {
    pub fn new(engine: QueryEngine) -> QueryService {
        QueryService { engine }
    }
}

impl NamedService for QueryService {
    const NAME: &'static str = SERVICE;
}

type Traces = tokio_stream::Iter<std::vec::IntoIter<Result<TracesData, Status>>>;

fn invalid(e: BadParam) -> Status {
    Status::invalid_argument(e.0)
}

/// A query error as a gRPC status: the time limit DEADLINE_EXCEEDED, the memory limit
/// RESOURCE_EXHAUSTED, too many queries UNAVAILABLE (retry), and anything else INTERNAL (the
/// plans are Lumen's own, so a plan that fails is the server's fault).
fn failed(e: QueryError) -> Status {
    let message = e.to_string();
    match e {
        QueryError::Timeout(_) => Status::deadline_exceeded(message),
        QueryError::Memory { .. } => Status::resource_exhausted(message),
        QueryError::Busy(_) => Status::unavailable(message),
        QueryError::Sql(_) | QueryError::Refused(_) | QueryError::Internal(_) => {
            Status::internal(message)
        }
    }
}

fn ns_of(t: &prost_types::Timestamp, field: &str) -> Result<i64, BadParam> {
    let ns = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    i64::try_from(ns)
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| BadParam(format!("{field}: {t} is not between 1970 and 2262")))
}

fn duration_of(d: &prost_types::Duration, field: &str) -> Result<i64, BadParam> {
    let ns = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    i64::try_from(ns)
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| BadParam(format!("{field}: {d} is not a duration of 0 or more")))
}

/// `TraceQueryParameters` as the HTTP API's [`Search`], checked the same way.
fn search(q: &pb::TraceQueryParameters, now_ns: i64) -> Result<Search, BadParam> {
    if q.service_name.is_empty() {
        return Err(BadParam("query.service_name is required".into()));
    }
    let time =
        |t: &Option<prost_types::Timestamp>, name| t.as_ref().map(|t| ns_of(t, name)).transpose();
    let (start_ns, end_ns) = params::window(
        (
            "query.start_time_min",
            time(&q.start_time_min, "query.start_time_min")?,
        ),
        (
            "query.start_time_max",
            time(&q.start_time_max, "query.start_time_max")?,
        ),
        now_ns,
    )?;
    let duration = |d: &Option<prost_types::Duration>, name| {
        d.as_ref().map(|d| duration_of(d, name)).transpose()
    };
    let (min, max) = params::duration_bounds(
        (
            "query.duration_min",
            duration(&q.duration_min, "query.duration_min")?,
        ),
        (
            "query.duration_max",
            duration(&q.duration_max, "query.duration_max")?,
        ),
    )?;
    let depth = usize::try_from(q.search_depth).map_err(|_| {
        BadParam(format!(
            "query.search_depth: {} is not a count",
            q.search_depth
        ))
    })?;
    let limit = params::limit_of("query.search_depth", depth)?;
    let mut tags: Vec<(String, String)> = q
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.sort();
    Ok(Search {
        service: q.service_name.clone(),
        operation: (!q.operation_name.is_empty()).then(|| q.operation_name.clone()),
        tags,
        start_ns,
        end_ns,
        min_duration_ns: min,
        max_duration_ns: max,
        limit,
    })
}

/// One `TracesData` per trace, in the order the ids were found.
fn per_trace(spans: Vec<ResourceSpans>, ids: &[Vec<u8>]) -> Vec<TracesData> {
    let mut out: Vec<TracesData> = ids.iter().map(|_| TracesData::default()).collect();
    for rs in spans {
        // Readback gives each resource's spans of one trace together; split by trace.
        for (i, id) in ids.iter().enumerate() {
            let mut part = rs.clone();
            for ss in &mut part.scope_spans {
                ss.spans.retain(|s| &s.trace_id == id);
            }
            part.scope_spans.retain(|ss| !ss.spans.is_empty());
            if !part.scope_spans.is_empty() {
                out[i].resource_spans.push(part);
            }
        }
    }
    out.retain(|t| !t.resource_spans.is_empty());
    out
}

async fn get_trace(
    engine: QueryEngine,
    req: Request<pb::GetTraceRequest>,
) -> Result<Response<Traces>, Status> {
    let id = params::trace_id(&req.get_ref().trace_id).map_err(invalid)?;
    let ids = vec![id.to_vec()];
    let spans = load_spans(&engine, ids.clone()).await.map_err(failed)?;
    if spans.is_empty() {
        return Err(Status::not_found("trace not found"));
    }
    let traces = per_trace(spans, &ids);
    Ok(Response::new(tokio_stream::iter(
        traces.into_iter().map(Ok).collect::<Vec<_>>(),
    )))
}

async fn find_traces(
    engine: QueryEngine,
    req: Request<pb::FindTracesRequest>,
) -> Result<Response<Traces>, Status> {
    let query = req.into_inner().query.unwrap_or_default();
    let search = search(&query, crate::now_ns()).map_err(invalid)?;
    let ids = super::search_ids(&engine, search).await.map_err(failed)?;
    let spans = load_spans(&engine, ids.clone()).await.map_err(failed)?;
    let traces = per_trace(spans, &ids);
    Ok(Response::new(tokio_stream::iter(
        traces.into_iter().map(Ok).collect::<Vec<_>>(),
    )))
}

async fn get_services(engine: QueryEngine) -> Result<Response<pb::GetServicesResponse>, Status> {
    let services = distinct_services(&engine).await.map_err(failed)?;
    Ok(Response::new(pb::GetServicesResponse { services }))
}

async fn get_operations(
    engine: QueryEngine,
    req: Request<pb::GetOperationsRequest>,
) -> Result<Response<pb::GetOperationsResponse>, Status> {
    let pb::GetOperationsRequest { service, span_kind } = req.into_inner();
    if service.is_empty() {
        return Err(Status::invalid_argument("service is required"));
    }
    let kind = (!span_kind.is_empty()).then_some(span_kind);
    if let Some(k) = &kind
        && !SPAN_KINDS.contains(&k.as_str())
    {
        return Err(Status::invalid_argument(format!(
            "span_kind {k:?} is not one of {SPAN_KINDS:?}"
        )));
    }
    let operations = operations_of(&engine, service, kind)
        .await
        .map_err(failed)?
        .into_iter()
        .map(|(name, span_kind)| pb::Operation { name, span_kind })
        .collect();
    Ok(Response::new(pb::GetOperationsResponse { operations }))
}

async fn get_dependencies(
    engine: QueryEngine,
    req: Request<pb::GetDependenciesRequest>,
) -> Result<Response<pb::DependenciesResponse>, Status> {
    let r = req.into_inner();
    let (Some(start), Some(end)) = (r.start_time, r.end_time) else {
        return Err(Status::invalid_argument(
            "start_time and end_time are required",
        ));
    };
    let start_ns = ns_of(&start, "start_time").map_err(invalid)?;
    let end_ns = ns_of(&end, "end_time").map_err(invalid)?;
    params::ordered("start_time", start_ns, "end_time", end_ns).map_err(invalid)?;
    let dependencies = dependency_counts(&engine, start_ns, end_ns)
        .await
        .map_err(failed)?
        .into_iter()
        .map(|(parent, child, calls)| pb::Dependency {
            parent,
            child,
            call_count: u64::try_from(calls).unwrap_or(0),
        })
        .collect();
    Ok(Response::new(pb::DependenciesResponse { dependencies }))
}

impl<B> tower::Service<http::Request<B>> for QueryService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let engine = self.engine.clone();
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or_default()
            .to_string();
        Box::pin(async move {
            let response = match method.as_str() {
                "GetTrace" => {
                    let svc = tower::service_fn(move |r| get_trace(engine.clone(), r));
                    Grpc::new(ProstCodec::default())
                        .server_streaming(svc, req)
                        .await
                }
                "FindTraces" => {
                    let svc = tower::service_fn(move |r| find_traces(engine.clone(), r));
                    Grpc::new(ProstCodec::default())
                        .server_streaming(svc, req)
                        .await
                }
                "GetServices" => {
                    let svc = tower::service_fn(move |_: Request<pb::GetServicesRequest>| {
                        get_services(engine.clone())
                    });
                    Grpc::new(ProstCodec::default()).unary(svc, req).await
                }
                "GetOperations" => {
                    let svc = tower::service_fn(move |r| get_operations(engine.clone(), r));
                    Grpc::new(ProstCodec::default()).unary(svc, req).await
                }
                "GetDependencies" => {
                    let svc = tower::service_fn(move |r| get_dependencies(engine.clone(), r));
                    Grpc::new(ProstCodec::default()).unary(svc, req).await
                }
                other => {
                    Status::unimplemented(format!("{SERVICE} has no method {other:?}")).into_http()
                }
            };
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_as_the_http_api_checks_them() {
        let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        let mut q = pb::TraceQueryParameters {
            service_name: "frontend".into(),
            start_time_min: ts(100),
            start_time_max: ts(200),
            search_depth: 5,
            ..Default::default()
        };
        q.attributes.insert("http.method".into(), "GET".into());
        let s = search(&q, 0).expect("valid");
        assert_eq!(
            (s.start_ns, s.end_ns, s.limit),
            (100_000_000_000, 200_000_000_000, 5)
        );
        assert_eq!(s.tags, vec![("http.method".to_string(), "GET".to_string())]);
        for (bad, why) in [
            (
                pb::TraceQueryParameters {
                    service_name: String::new(),
                    ..q.clone()
                },
                "service_name",
            ),
            (
                pb::TraceQueryParameters {
                    start_time_min: ts(300),
                    ..q.clone()
                },
                "start_time_min",
            ),
            (
                pb::TraceQueryParameters {
                    start_time_min: ts(-5),
                    ..q.clone()
                },
                "1970",
            ),
            (
                pb::TraceQueryParameters {
                    search_depth: 1_000_000,
                    ..q.clone()
                },
                "search_depth",
            ),
            (
                pb::TraceQueryParameters {
                    search_depth: -1,
                    ..q.clone()
                },
                "search_depth",
            ),
            (
                pb::TraceQueryParameters {
                    duration_min: Some(prost_types::Duration {
                        seconds: 2,
                        nanos: 0,
                    }),
                    duration_max: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..q.clone()
                },
                "duration_min",
            ),
        ] {
            let err = search(&bad, 0).expect_err(why);
            assert!(err.0.contains(why), "{why}: {}", err.0);
        }
    }
}
