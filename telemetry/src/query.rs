//! SQL over the store (DataFusion), and the questions the dashboard asks of it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{Array, Float64Array, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::Serialize;

use crate::store::Store;
use crate::table::SnapshotTable;

/// Errors answering a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is wrong (the caller's fault).
    #[error("{0}")]
    Sql(DataFusionError),
    #[error("encoding result: {0}")]
    Encode(String),
}

/// Runs SQL over the `spans` and `metrics` tables.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    store: Arc<Store>,
}

/// A query result as the HTTP API returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SqlResult {
    pub columns: Vec<String>,
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Request rate, success rate and latency of one service (server side).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceStats {
    pub service: String,
    pub requests: i64,
    pub errors: i64,
    pub rate_per_s: f64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Calls from one service to another, as the callee served them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeStats {
    pub source: String,
    pub destination: String,
    pub requests: i64,
    pub errors: i64,
    pub rate_per_s: f64,
    pub error_rate: f64,
    pub p99_ms: f64,
}

/// The mesh over a recent window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MeshOverview {
    pub window_s: u64,
    pub services: Vec<ServiceStats>,
    pub edges: Vec<EdgeStats>,
}

/// What the dashboard reads; telemetry implements it over SQL.
pub trait MeshQuery: Send + Sync + 'static {
    fn overview(
        &self,
        window: Duration,
    ) -> impl Future<Output = Result<MeshOverview, QueryError>> + Send;
}

impl QueryEngine {
    pub fn new(store: Arc<Store>) -> QueryEngine {
        QueryEngine { store }
    }

    fn context(&self) -> Result<SessionContext, DataFusionError> {
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        ctx.register_table(
            "spans",
            Arc::new(SnapshotTable::new(self.store.spans.clone())),
        )?;
        ctx.register_table(
            "metrics",
            Arc::new(SnapshotTable::new(self.store.metrics.clone())),
        )?;
        Ok(ctx)
    }

    /// Runs one SQL statement and returns its batches.
    pub async fn batches(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let ctx = self.context().map_err(QueryError::Sql)?;
        let df = ctx.sql(sql).await.map_err(QueryError::Sql)?;
        df.collect().await.map_err(QueryError::Sql)
    }

    /// Runs one SQL statement and returns JSON rows.
    pub async fn sql(&self, sql: &str) -> Result<SqlResult, QueryError> {
        let ctx = self.context().map_err(QueryError::Sql)?;
        let df = ctx.sql(sql).await.map_err(QueryError::Sql)?;
        let columns: Vec<String> = df
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let batches = df.collect().await.map_err(QueryError::Sql)?;
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        for batch in &batches {
            writer
                .write(batch)
                .map_err(|e| QueryError::Encode(e.to_string()))?;
        }
        writer
            .finish()
            .map_err(|e| QueryError::Encode(e.to_string()))?;
        let bytes = writer.into_inner();
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = if bytes.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| QueryError::Encode(e.to_string()))?
        };
        Ok(SqlResult { columns, rows })
    }
}

fn since_nanos(window: Duration) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_sub(window).as_nanos()).unwrap_or(i64::MAX)
}

/// Column `name` of `batch` as strings / i64 / f64 (cast as needed).
fn column<T: Array + Clone + 'static>(
    batch: &RecordBatch,
    name: &str,
    ty: &DataType,
) -> Result<T, QueryError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| QueryError::Encode(format!("column {name} missing")))?;
    let col = cast(col, ty).map_err(|e| QueryError::Encode(e.to_string()))?;
    col.as_any()
        .downcast_ref::<T>()
        .cloned()
        .ok_or_else(|| QueryError::Encode(format!("column {name} has an unexpected type")))
}

impl MeshQuery for QueryEngine {
    async fn overview(&self, window: Duration) -> Result<MeshOverview, QueryError> {
        let since = since_nanos(window);
        // Server spans: what each service served.
        let services_sql = format!(
            "SELECT service_name AS service, count(*) AS requests, \
                    sum(CASE WHEN status_code = 'error' THEN 1 ELSE 0 END) AS errors, \
                    approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50, \
                    approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99, \
                    CAST(min(start_time) AS BIGINT) AS first_ns \
             FROM spans WHERE span_kind = 'server' AND start_time >= to_timestamp_nanos({since}) \
             GROUP BY service_name ORDER BY service_name"
        );
        // Edges: a server span whose parent is a client span of another service.
        let edges_sql = format!(
            "SELECT c.service_name AS source, s.service_name AS destination, count(*) AS requests, \
                    sum(CASE WHEN s.status_code = 'error' THEN 1 ELSE 0 END) AS errors, \
                    approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY s.duration_ns) AS p99 \
             FROM spans s JOIN spans c ON s.trace_id = c.trace_id AND s.parent_span_id = c.span_id \
             WHERE s.span_kind = 'server' AND c.span_kind = 'client' \
               AND s.start_time >= to_timestamp_nanos({since}) \
               AND c.start_time >= to_timestamp_nanos({since}) - INTERVAL '60 seconds' \
             GROUP BY c.service_name, s.service_name ORDER BY source, destination"
        );
        let mut overview = MeshOverview {
            window_s: window.as_secs(),
            ..Default::default()
        };
        let mut first_ns = i64::MAX;
        for batch in self.batches(&services_sql).await? {
            let service: StringArray = column(&batch, "service", &DataType::Utf8)?;
            let requests: Int64Array = column(&batch, "requests", &DataType::Int64)?;
            let errors: Int64Array = column(&batch, "errors", &DataType::Int64)?;
            let p50: Float64Array = column(&batch, "p50", &DataType::Float64)?;
            let p99: Float64Array = column(&batch, "p99", &DataType::Float64)?;
            let first: Int64Array = column(&batch, "first_ns", &DataType::Int64)?;
            for i in 0..batch.num_rows() {
                let (n, e) = (requests.value(i), errors.value(i));
                first_ns = first_ns.min(first.value(i));
                overview.services.push(ServiceStats {
                    service: service.value(i).to_string(),
                    requests: n,
                    errors: e,
                    rate_per_s: n as f64,
                    success_rate: if n == 0 {
                        1.0
                    } else {
                        (n - e) as f64 / n as f64
                    },
                    p50_ms: p50.value(i) / 1e6,
                    p99_ms: p99.value(i) / 1e6,
                });
            }
        }
        for batch in self.batches(&edges_sql).await? {
            let source: StringArray = column(&batch, "source", &DataType::Utf8)?;
            let destination: StringArray = column(&batch, "destination", &DataType::Utf8)?;
            let requests: Int64Array = column(&batch, "requests", &DataType::Int64)?;
            let errors: Int64Array = column(&batch, "errors", &DataType::Int64)?;
            let p99: Float64Array = column(&batch, "p99", &DataType::Float64)?;
            for i in 0..batch.num_rows() {
                let (n, e) = (requests.value(i), errors.value(i));
                overview.edges.push(EdgeStats {
                    source: source.value(i).to_string(),
                    destination: destination.value(i).to_string(),
                    requests: n,
                    errors: e,
                    rate_per_s: n as f64,
                    error_rate: if n == 0 { 0.0 } else { e as f64 / n as f64 },
                    p99_ms: p99.value(i) / 1e6,
                });
            }
        }
        // Rates are per second of data actually held: a store that started 12 s ago divides
        // by 12, not by the whole window.
        let now = since_nanos(Duration::ZERO);
        let held_s = if first_ns == i64::MAX {
            window.as_secs_f64()
        } else {
            (now - first_ns) as f64 / 1e9
        };
        let secs = held_s.clamp(1.0, window.as_secs_f64().max(1.0));
        for s in &mut overview.services {
            s.rate_per_s /= secs;
        }
        for e in &mut overview.edges {
            e.rate_per_s /= secs;
        }
        Ok(overview)
    }
}
