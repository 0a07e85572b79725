//! The telemetry service's HTTP API: `POST /api/v1/sql`, `/healthz`, `/readyz`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::query::{QueryEngine, QueryError};

/// Largest accepted SQL request body.
pub const MAX_SQL_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub sql: String,
}

/// Routes of the HTTP API (the dashboard is merged in by the binary).
pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/sql", post(sql))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_SQL_BODY))
        .with_state(engine)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Takes the body as JSON whatever its Content-Type says (`curl -d` sends a form type).
async fn sql(State(engine): State<QueryEngine>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let req: SqlRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"sql\": \"...\"}}: {e}"),
            );
        }
    };
    match engine.sql(&req.sql).await {
        Ok(result) => Json(result).into_response(),
        Err(QueryError::Sql(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
