//! OTLP/HTTP receiver (:4318): `POST /v1/traces`, `/v1/metrics`, `/v1/logs` with protobuf
//! (`application/x-protobuf`) or JSON (`application/json`, OTLP's JSON mapping: hex ids,
//! 64-bit integers as strings) bodies, gzip accepted. A JSON body is decoded and re-encoded
//! as protobuf, so it takes exactly the gRPC path from there: same request slots, budget,
//! WAL and partial success. The answer is in the request's encoding.
//!
//! Refusals follow the OTLP/HTTP spec: 400 malformed (not retried), 413 too large, 415 an
//! unknown content type or encoding, 429 or 503 with Retry-After when the service is busy or
//! its buffer is full (exporters retry those), each with a `google.rpc.Status` body.

use std::io::Read;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::receiver::{self, Logs, Metrics, Receiver, Signal, Traces};
use crate::selfmetrics::Refusal;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// Routes of the OTLP/HTTP port.
pub fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route("/v1/traces", post(handle::<Traces>))
        .route("/v1/metrics", post(handle::<Metrics>))
        .route("/v1/logs", post(handle::<Logs>))
        .layer(axum::extract::DefaultBodyLimit::max(
            receiver.max_message_bytes(),
        ))
        .with_state(receiver)
}

/// How the request was encoded, and so how the answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

async fn handle<S>(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response
where
    S: Signal,
    S::Request: DeserializeOwned,
    S::Response: Serialize,
{
    let Call::<S>(result, encoding, _) = call::<S>(&receiver, &headers, body).await;
    match result {
        Ok(response) => {
            let body = match encoding {
                Encoding::Protobuf => response.encode_to_vec(),
                Encoding::Json => serde_json::to_vec(&response).unwrap_or_default(),
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type(encoding))],
                body,
            )
                .into_response()
        }
        Err((status, message)) => refuse(status, &message, encoding),
    }
}

/// The outcome of one call, in the encoding it is to be answered in.
struct Call<S: Signal>(
    Result<S::Response, (StatusCode, String)>,
    Encoding,
    PhantomData<S>,
);

async fn call<S>(
    receiver: &Receiver,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Call<S>
where
    S: Signal,
    S::Request: DeserializeOwned,
{
    let header_value = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    let content_type = header_value(header::CONTENT_TYPE);
    let encoding = match content_type.split(';').next().unwrap_or_default().trim() {
        PROTOBUF | "application/protobuf" => Encoding::Protobuf,
        JSON => Encoding::Json,
        other => {
            let message = format!("content type {other:?} is not OTLP: send {PROTOBUF} or {JSON}");
            return Call(
                Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, message)),
                Encoding::Json,
                PhantomData,
            );
        }
    };
    let fail = |status, message: String| Call(Err((status, message)), encoding, PhantomData);
    let Some(_slot) = receiver.try_slot() else {
        receiver.stats.refused(usize::from(S::TABLE), Refusal::Busy);
        return fail(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} export requests already in progress (--max-inflight-requests), retry later",
                receiver.max_inflight()
            ),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return fail(rejection.status(), rejection.body_text()),
    };
    let body = match header_value(header::CONTENT_ENCODING).as_str() {
        "" | "identity" => body,
        "gzip" => match gunzip(&body, receiver.max_message_bytes()) {
            Ok(b) => b,
            Err((status, message)) => return fail(status, message),
        },
        other => {
            return fail(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content encoding {other:?} is not supported: send gzip or none"),
            );
        }
    };
    let body = match encoding {
        Encoding::Protobuf => body,
        Encoding::Json => match serde_json::from_slice::<S::Request>(&body) {
            Ok(request) => Bytes::from(request.encode_to_vec()),
            Err(e) => {
                receiver
                    .stats
                    .refused(usize::from(S::TABLE), Refusal::Malformed);
                return fail(
                    StatusCode::BAD_REQUEST,
                    format!("malformed OTLP JSON for {}: {e}", S::SERVICE),
                );
            }
        },
    };
    let result = receiver::export::<S>(receiver, body).await;
    Call(
        result.map_err(|(why, status)| (http_status(why), status.message().to_string())),
        encoding,
        PhantomData,
    )
}

/// The HTTP status OTLP/HTTP exporters expect for each refusal.
fn http_status(why: Refusal) -> StatusCode {
    match why {
        Refusal::Malformed => StatusCode::BAD_REQUEST,
        Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Busy => StatusCode::TOO_MANY_REQUESTS,
        Refusal::BufferFull | Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Decompresses at most `max` bytes; more is a 413, broken gzip a 400.
fn gunzip(body: &[u8], max: usize) -> Result<Bytes, (StatusCode, String)> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("malformed gzip body: {e}")))?;
    if out.len() > max {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body decompresses to more than {max} bytes (--max-message-mib)"),
        ));
    }
    Ok(Bytes::from(out))
}

fn content_type(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Protobuf => PROTOBUF,
        Encoding::Json => JSON,
    }
}

/// A refusal with a `google.rpc.Status` body, and Retry-After when retrying helps.
fn refuse(status: StatusCode, message: &str, encoding: Encoding) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            tonic::Code::InvalidArgument
        }
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => {
            tonic::Code::ResourceExhausted
        }
        _ => tonic::Code::Unavailable,
    };
    let body = match encoding {
        Encoding::Protobuf => receiver::rpc_status(code, message),
        Encoding::Json => {
            serde_json::to_vec(&serde_json::json!({ "code": code as i32, "message": message }))
                .unwrap_or_default()
        }
    };
    let mut response = (
        status,
        [(header::CONTENT_TYPE, content_type(encoding))],
        body,
    )
        .into_response();
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}
