//! SQL over the store (DataFusion), and the questions the dashboard asks of it.
//!
//! Only queries run: DDL, DML (`COPY`, `INSERT`) and statements (`SET`) are refused before
//! planning goes further, no table can be created over a file, URL tables are off and the
//! disk manager is disabled, so nothing outside the store is read or written. Each query runs
//! on its own runtime (so a heavy query cannot delay OTLP acknowledgements), under a time
//! limit that cancels its plan, inside a shared memory pool, with a cap on result rows and on
//! how many queries run at once.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::optimizer::{Analyzer, AnalyzerRule};
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::{self, ExecutionPlan};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};

use crate::hex_ids::HexIds;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::store::Store;
use crate::table::SnapshotTable;

/// Bounds on what one query, and all of them together, may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Wall time of one query, planning included; past it the plan is cancelled.
    pub timeout: Duration,
    /// Bytes the memory pool shared by all running queries may hand out.
    pub memory_bytes: usize,
    /// Rows a result may hold; past it the result is cut and flagged as truncated.
    pub max_rows: usize,
    /// Queries running at once; more wait up to `queue_wait`, then are refused.
    pub max_concurrent: usize,
    /// How long a query waits for a free slot before it is refused.
    pub queue_wait: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            memory_bytes: 96 * 1024 * 1024,
            max_rows: 10_000,
            max_concurrent: 4,
            queue_wait: Duration::from_secs(2),
        }
    }
}

/// Errors answering a query, each saying whose fault it is (see [`QueryError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse, plan or evaluate (the caller's fault).
    #[error("{0}")]
    Sql(DataFusionError),
    /// The statement is not a query: only SELECT, EXPLAIN, SHOW and WITH run here.
    #[error("only queries run here: {0}")]
    Refused(DataFusionError),
    /// The query ran past its time limit and was cancelled.
    #[error("query cancelled after {0:?}, its time limit (--query-timeout)")]
    Timeout(Duration),
    /// The query needed more memory than the pool holds.
    #[error(
        "query needs more memory than the {limit} bytes queries may use (--query-memory): {source}"
    )]
    Memory {
        limit: usize,
        #[source]
        source: DataFusionError,
    },
    /// Too many queries were already running.
    #[error("{0} queries already running (--query-concurrency); retry shortly")]
    Busy(usize),
    /// The store or the engine failed (the server's fault).
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// The HTTP status that says whose fault this is: 4xx the caller's, 5xx the server's.
    pub fn status(&self) -> u16 {
        match self {
            QueryError::Sql(_) => 400,
            QueryError::Refused(_) => 403,
            QueryError::Timeout(_) | QueryError::Memory { .. } => 422,
            QueryError::Busy(_) => 429,
            QueryError::Internal(_) => 500,
        }
    }

    /// The HTTP status for an API whose plans Lumen builds itself (Jaeger's, the graph):
    /// there, what DataFusion calls a planning or SQL error is the server's fault.
    pub fn status_of_own_plan(&self) -> u16 {
        match self {
            QueryError::Sql(_) | QueryError::Refused(_) => 500,
            other => other.status(),
        }
    }

    /// A short machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Sql(_) => "sql",
            QueryError::Refused(_) => "refused",
            QueryError::Timeout(_) => "timeout",
            QueryError::Memory { .. } => "memory",
            QueryError::Busy(_) => "busy",
            QueryError::Internal(_) => "internal",
        }
    }

    /// Sorts a DataFusion error by whose fault it is.
    fn classify(e: DataFusionError, limits: &QueryLimits) -> QueryError {
        match e.find_root() {
            DataFusionError::ResourcesExhausted(_) => QueryError::Memory {
                limit: limits.memory_bytes,
                source: e,
            },
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_)
            | DataFusionError::Execution(_) => QueryError::Sql(e),
            DataFusionError::ArrowError(a, _) if caller_arrow_error(a) => QueryError::Sql(e),
            _ => QueryError::Internal(e.to_string()),
        }
    }
}

/// Arrow errors that come from evaluating the caller's expressions, not from the store.
fn caller_arrow_error(e: &ArrowError) -> bool {
    matches!(
        e,
        ArrowError::DivideByZero
            | ArrowError::CastError(_)
            | ArrowError::ParseError(_)
            | ArrowError::ComputeError(_)
            | ArrowError::InvalidArgumentError(_)
            | ArrowError::ArithmeticOverflow(_)
    )
}

/// Runs SQL over the `spans` and `metrics` tables within [`QueryLimits`].
#[derive(Debug, Clone)]
pub struct QueryEngine {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: SessionContext,
    limits: QueryLimits,
    slots: Arc<Semaphore>,
    runtime: QueryRuntime,
    stats: QueryStats,
}

/// Counters of answered queries, by outcome.
#[derive(Debug, Default)]
pub struct QueryStats {
    /// ok, then each [`QueryError::kind`] in declaration order.
    outcomes: [AtomicU64; 7],
    micros: AtomicU64,
}

impl QueryStats {
    const OUTCOMES: [&'static str; 7] = [
        "ok", "sql", "refused", "timeout", "memory", "busy", "internal",
    ];

    fn record(&self, result: &Result<QueryOutput, QueryError>, took: Duration) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        let i = Self::OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(Self::OUTCOMES.len() - 1);
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Queries answered, by outcome.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        Self::OUTCOMES
            .iter()
            .zip(&self.outcomes)
            .map(|(o, n)| (*o, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Seconds spent answering them.
    pub fn seconds(&self) -> f64 {
        self.micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The runtime queries run on, apart from the one that serves OTLP. Shut down in the
/// background when dropped, so dropping it from async code does not panic.
#[derive(Debug)]
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A query result as the HTTP API returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SqlResult {
    pub columns: Vec<String>,
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
    /// True when the result had more rows than `row_limit` and was cut.
    pub truncated: bool,
    pub row_limit: usize,
}

/// A result as text, for a page to show: column names and each value as Arrow displays it
/// (ids as hex, times as RFC 3339).
#[derive(Debug, Clone, PartialEq)]
pub struct SqlTable {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub truncated: bool,
    pub row_limit: usize,
}

/// A table and its columns (name, type).
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<(String, String)>,
}

/// Batches of a query, cut at the row cap.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub truncated: bool,
}

/// What the dashboard reads: the same graph `/api/v1/graph` answers with, a service's
/// minutes from the same rollups, and its failed requests from the spans.
pub trait MeshQuery: Send + Sync + 'static {
    /// The mesh over `[start_ns, end_ns]`.
    fn graph(
        &self,
        start_ns: i64,
        end_ns: i64,
    ) -> impl Future<Output = Result<crate::graph::Graph, QueryError>> + Send;

    /// `service`'s RED per minute, all versions and each version.
    fn service_minutes(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
    ) -> impl Future<Output = Result<Vec<crate::graph::Minute>, QueryError>> + Send;

    /// Every span of one trace, read back as OTLP (empty when the store has none).
    fn trace(
        &self,
        id: [u8; 16],
    ) -> impl Future<
        Output = Result<Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>, QueryError>,
    > + Send;

    /// Services that reported spans.
    fn services(&self) -> impl Future<Output = Result<Vec<String>, QueryError>> + Send;

    /// The traces a Jaeger-style search finds, latest first, summarised.
    fn find_traces(
        &self,
        search: crate::jaeger::params::Search,
    ) -> impl Future<Output = Result<Vec<crate::detail::TraceSummary>, QueryError>> + Send;

    /// A read-only query's result as text (the SQL API's engine, limits and refusals).
    fn sql_table(&self, sql: String) -> impl Future<Output = Result<SqlTable, QueryError>> + Send;

    /// The tables a query can read, with their columns.
    fn tables(&self) -> impl Future<Output = Vec<TableInfo>> + Send;

    /// Up to `limit` of `service`'s failed requests, newest first.
    fn failed_requests(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<crate::detail::FailedRequest>, QueryError>> + Send;

    /// The `limit` busiest routes `service` served, with their RED.
    fn routes(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<crate::detail::RouteSignals>, QueryError>> + Send;
}

/// Aborts the query task when the caller goes away (a client that hung up).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl QueryEngine {
    /// An engine over `store` with default limits.
    pub fn new(store: Arc<Store>) -> QueryEngine {
        match QueryEngine::with_limits(store.clone(), QueryLimits::default()) {
            Ok(engine) => engine,
            // Building the runtime only fails when the OS refuses threads; fall back to the
            // caller's runtime rather than refusing every query.
            Err(e) => {
                tracing::warn!(error = %e, "query runtime not started, queries share the caller's");
                QueryEngine::build(store, QueryLimits::default(), None)
            }
        }
    }

    /// An engine over `store` within `limits`, with a runtime of its own for queries.
    pub fn with_limits(store: Arc<Store>, limits: QueryLimits) -> std::io::Result<QueryEngine> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lumen-query")
            .enable_all()
            .build()?;
        Ok(QueryEngine::build(store, limits, Some(runtime)))
    }

    fn build(
        store: Arc<Store>,
        limits: QueryLimits,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> QueryEngine {
        let ctx = context(&store, &limits);
        QueryEngine {
            inner: Arc::new(Inner {
                ctx,
                slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
                limits,
                runtime: QueryRuntime(runtime),
                stats: QueryStats::default(),
            }),
        }
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.inner.limits
    }

    /// Counters of the queries answered so far.
    pub fn stats(&self) -> &QueryStats {
        &self.inner.stats
    }

    /// Runs one query statement within the limits; the result is cut at `max_rows`.
    pub async fn query(&self, sql: &str) -> Result<QueryOutput, QueryError> {
        self.run(sql, Some(self.inner.limits.max_rows)).await
    }

    /// Runs one query statement within the time and memory limits, keeping every row (for
    /// the service's own aggregate queries, whose results are small).
    pub async fn batches(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.run(sql, None).await?.batches)
    }

    /// Runs one query statement and returns JSON rows (cut at `max_rows`).
    pub async fn sql(&self, sql: &str) -> Result<SqlResult, QueryError> {
        let out = self.query(sql).await?;
        let columns: Vec<String> = out
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        for batch in &out.batches {
            writer
                .write(batch)
                .map_err(|e| QueryError::Internal(format!("encoding result: {e}")))?;
        }
        writer
            .finish()
            .map_err(|e| QueryError::Internal(format!("encoding result: {e}")))?;
        let bytes = writer.into_inner();
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = if bytes.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| QueryError::Internal(format!("encoding result: {e}")))?
        };
        Ok(SqlResult {
            columns,
            rows,
            truncated: out.truncated,
            row_limit: self.inner.limits.max_rows,
        })
    }

    /// Runs a plan the caller builds with DataFusion's DataFrame API on the engine's session
    /// (its tables, memory pool and rules), within the same time, memory and concurrency
    /// limits as SQL; every row is kept. For Lumen's own APIs: values go in as literals, so
    /// no parameter can change a query's shape.
    pub async fn frame<F, Fut>(&self, build: F) -> Result<Vec<RecordBatch>, QueryError>
    where
        F: FnOnce(SessionContext) -> Fut + Send + 'static,
        Fut: Future<Output = datafusion::error::Result<DataFrame>> + Send + 'static,
    {
        let build: FrameBuilder = Box::new(move |ctx| Box::pin(build(ctx)));
        let started = std::time::Instant::now();
        let result = self.run_unrecorded(Statement::Frame(build), None).await;
        self.inner.stats.record(&result, started.elapsed());
        Ok(result?.batches)
    }

    async fn run(&self, sql: &str, max_rows: Option<usize>) -> Result<QueryOutput, QueryError> {
        let started = std::time::Instant::now();
        let result = self
            .run_unrecorded(Statement::Sql(sql.to_string()), max_rows)
            .await;
        self.inner.stats.record(&result, started.elapsed());
        result
    }

    async fn run_unrecorded(
        &self,
        statement: Statement,
        max_rows: Option<usize>,
    ) -> Result<QueryOutput, QueryError> {
        let limits = self.inner.limits;
        let slot =
            tokio::time::timeout(limits.queue_wait, self.inner.slots.clone().acquire_owned())
                .await
                .map_err(|_| QueryError::Busy(limits.max_concurrent))?
                .map_err(|_| QueryError::Internal("query engine closed".into()))?;
        let ctx = self.inner.ctx.clone();
        let work = async move {
            let _slot = slot;
            match tokio::time::timeout(limits.timeout, plan_and_collect(&ctx, statement, max_rows))
                .await
            {
                Ok(result) => result.map_err(|e| match e {
                    Failure::Refused(e) => QueryError::Refused(e),
                    Failure::Run(e) => QueryError::classify(e, &limits),
                }),
                Err(_) => Err(QueryError::Timeout(limits.timeout)),
            }
        };
        let handle = match &self.inner.runtime.0 {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        };
        let _abort = AbortOnDrop(handle.abort_handle());
        // The same limit from outside: an operator that runs long between yields (a cross
        // join emits a whole batch per input row) keeps the task busy past the limit, but
        // the caller is answered on time; the task is aborted at its next yield and holds
        // its slot until then, so the concurrency bound stays true.
        match tokio::time::timeout(limits.timeout + Duration::from_millis(100), handle).await {
            Ok(joined) => joined.map_err(|e| QueryError::Internal(format!("query task: {e}")))?,
            Err(_) => Err(QueryError::Timeout(limits.timeout)),
        }
    }
}

/// A plan built with the DataFrame API (see [`QueryEngine::frame`]).
type FrameBuilder = Box<
    dyn FnOnce(
            SessionContext,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = datafusion::error::Result<DataFrame>> + Send>,
        > + Send,
>;

/// What to run: SQL text from a caller (checked to be a query), or a plan Lumen built.
enum Statement {
    Sql(String),
    Frame(FrameBuilder),
}

/// Why a statement did not produce rows.
enum Failure {
    Refused(DataFusionError),
    Run(DataFusionError),
}

/// Plans `sql`, refuses anything but a query, then executes with `LIMIT max_rows + 1` on top
/// so the cap is enforced by the plan and a cut result can be told from an exact fit.
async fn plan_and_collect(
    ctx: &SessionContext,
    statement: Statement,
    max_rows: Option<usize>,
) -> Result<QueryOutput, Failure> {
    let (mut df, explain) = match statement {
        Statement::Sql(sql) => {
            let plan = ctx
                .state()
                .create_logical_plan(&sql)
                .await
                .map_err(Failure::Run)?;
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)
                .map_err(Failure::Refused)?;
            // EXPLAIN must stay the root of its plan, and its output is small anyway.
            let explain = matches!(plan, LogicalPlan::Explain(_) | LogicalPlan::Analyze(_));
            (
                ctx.execute_logical_plan(plan).await.map_err(Failure::Run)?,
                explain,
            )
        }
        Statement::Frame(build) => (build(ctx.clone()).await.map_err(Failure::Run)?, false),
    };
    if let Some(cap) = max_rows.filter(|_| !explain) {
        df = df
            .limit(0, Some(cap.saturating_add(1)))
            .map_err(Failure::Run)?;
    }
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await.map_err(Failure::Run)?;
    let batches = physical_plan::collect(cooperative(plan).map_err(Failure::Run)?, task)
        .await
        .map_err(Failure::Run)?;
    let (batches, truncated) = match max_rows {
        Some(cap) => cut(batches, cap),
        None => (batches, false),
    };
    Ok(QueryOutput {
        schema,
        batches,
        truncated,
    })
}

/// Makes every operator of `plan` spend tokio's cooperative budget per batch it emits, not
/// only the leaves (DataFusion's own rule): an operator that emits many batches per input
/// batch (a cross join emits one per input row) then still yields often enough for the time
/// limit to cancel it promptly.
fn cooperative(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
    plan.transform_up(|node| {
        if node.name() == "CooperativeExec" {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(
            Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
        ))
    })
    .map(|t| t.data)
}

/// Keeps the first `cap` rows; says whether any were dropped.
fn cut(batches: Vec<RecordBatch>, cap: usize) -> (Vec<RecordBatch>, bool) {
    let mut left = cap;
    let mut kept = Vec::with_capacity(batches.len());
    let mut truncated = false;
    for batch in batches {
        if batch.num_rows() <= left {
            left -= batch.num_rows();
            kept.push(batch);
        } else {
            truncated = true;
            if left > 0 {
                kept.push(batch.slice(0, left));
                left = 0;
            }
        }
    }
    (kept, truncated)
}

/// The session every query clones: the store's tables, no spill files, one memory pool.
fn context(store: &Arc<Store>, limits: &QueryLimits) -> SessionContext {
    let mut config = SessionConfig::new().with_information_schema(true);
    // Late materialization: a selective filter (a trace id) is evaluated while decoding, so
    // the other columns of the rows it rejects (maps, events, links) are never decoded.
    let parquet = &mut config.options_mut().execution.parquet;
    parquet.pushdown_filters = true;
    parquet.reorder_filters = true;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(limits.memory_bytes),
            std::num::NonZeroUsize::MIN.saturating_add(2),
        )))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build()
        .map_or_else(
            |e| {
                tracing::warn!(error = %e, "query runtime environment, using defaults");
                Arc::new(RuntimeEnv::default())
            },
            Arc::new,
        );
    // Ids are bytes; a hex literal compared with one is read as its bytes (hex_ids.rs). The
    // rule runs first, before type coercion would compare the bytes with the text.
    let mut rules: Vec<Arc<dyn AnalyzerRule + Send + Sync>> = vec![Arc::new(HexIds)];
    rules.extend(Analyzer::new().rules);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_analyzer_rules(rules)
        .build();
    if let Some(remote) = store.remote().filter(|r| r.needs_registration()) {
        state
            .runtime_env()
            .register_object_store(remote.store_url().as_ref(), remote.object_store());
    }
    let ctx = SessionContext::new_with_state(state);
    for table in store.tables() {
        // Names are distinct, so registering cannot collide.
        if let Err(e) = ctx.register_table(table.name, Arc::new(SnapshotTable::new(table.clone())))
        {
            tracing::error!(table = table.name, error = %e, "registering table");
        }
    }
    ctx
}

impl MeshQuery for QueryEngine {
    /// `crate::graph::graph_of`: from the one-minute rollups, no scan of raw spans, no join.
    async fn graph(&self, start_ns: i64, end_ns: i64) -> Result<crate::graph::Graph, QueryError> {
        crate::graph::graph_of(self, start_ns, end_ns, crate::now_ns()).await
    }

    async fn service_minutes(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<crate::graph::Minute>, QueryError> {
        crate::graph::service_minutes(self, service, start_ns, end_ns).await
    }

    async fn trace(
        &self,
        id: [u8; 16],
    ) -> Result<Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>, QueryError> {
        crate::jaeger::load_spans(self, vec![id.to_vec()]).await
    }

    async fn services(&self) -> Result<Vec<String>, QueryError> {
        crate::jaeger::distinct_services(self).await
    }

    async fn find_traces(
        &self,
        search: crate::jaeger::params::Search,
    ) -> Result<Vec<crate::detail::TraceSummary>, QueryError> {
        crate::detail::find_traces(self, search).await
    }

    async fn sql_table(&self, sql: String) -> Result<SqlTable, QueryError> {
        use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
        let out = self.query(&sql).await?;
        let columns = out
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let options = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        for batch in &out.batches {
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| QueryError::Internal(format!("formatting the result: {e}")))?;
            for row in 0..batch.num_rows() {
                rows.push(
                    formatters
                        .iter()
                        .map(|f| f.value(row).to_string())
                        .collect(),
                );
            }
        }
        Ok(SqlTable {
            columns,
            rows,
            truncated: out.truncated,
            row_limit: self.inner.limits.max_rows,
        })
    }

    async fn tables(&self) -> Vec<TableInfo> {
        let ctx = &self.inner.ctx;
        let mut names: Vec<String> = ctx
            .catalog("datafusion")
            .and_then(|c| c.schema("public"))
            .map(|s| s.table_names())
            .unwrap_or_default();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let Ok(provider) = ctx.table_provider(name.as_str()).await else {
                continue;
            };
            let columns = provider
                .schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().to_string()))
                .collect();
            out.push(TableInfo { name, columns });
        }
        out
    }

    async fn failed_requests(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> Result<Vec<crate::detail::FailedRequest>, QueryError> {
        crate::detail::failed_requests(self, service, start_ns, end_ns, limit).await
    }

    async fn routes(
        &self,
        service: String,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> Result<Vec<crate::detail::RouteSignals>, QueryError> {
        crate::detail::routes(self, service, start_ns, end_ns, limit).await
    }
}
