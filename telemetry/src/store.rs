//! The columnar store: per table, an in-memory list of Arrow batches (the memtable) and the
//! Parquet files it has been flushed to, with a write-ahead log in front. Readers take a
//! snapshot (files + batches) under the same lock flushes swap under, so a row is always seen
//! exactly once.
//!
//! Write path: receiver → [`Store::ingest`] → WAL (fsync, group commit) → memtable →
//! [`Table::flush`] → Parquet (zstd, tmp + fsync + rename + directory fsync) in
//! `<data>/<table>/` → WAL segments wholly in Parquet are deleted. Each file records the
//! highest WAL LSN it holds (`lumen.wal_lsn`), so replay at start skips what is already in
//! Parquet. Read path: [`Table::snapshot`] → `crate::table::SnapshotTable`.
//!
//! Memory: every buffered batch holds a [`Reservation`] of the shared [`Budget`] until it is
//! flushed, so the memtables and the requests being converted never exceed the cap together.

mod order;
mod splice;
mod table;
mod upgrade;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::Notify;

pub use self::table::{Snapshot, Table, TableSpec, TableStats};
pub use self::upgrade::decode_hex;
use crate::budget::{Budget, Reservation};
use crate::wal::{self, ReplayReport, Wal, WalError};
use crate::{rollup, schema};

/// Errors of the store; each names the file or table involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("table {table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: datafusion::arrow::error::ArrowError,
    },
    #[error("writing {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: datafusion::parquet::errors::ParquetError,
    },
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("object store: {0}")]
    Remote(#[from] crate::remote::RemoteError),
    #[error("no table with id {0}")]
    NoTable(u8),
    #[error("store lock poisoned")]
    Poisoned,
}

/// How the store buffers and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes of rows held in memory (memtables and requests being converted) at most.
    pub max_buffered_bytes: usize,
    /// A WAL segment is closed and a new one started past this size.
    pub wal_segment_bytes: u64,
    /// Exports waiting for the WAL writer at most; more wait for room.
    pub wal_queue: usize,
    /// A pause before each flush writes: a slow disk, for tests of backpressure.
    pub flush_delay: Duration,
    /// Files stored longer ago than this are dropped (`None`: kept forever).
    pub retention_age: Option<Duration>,
    /// Past this many bytes of files a table drops its oldest (`None`: no cap).
    pub retention_bytes: Option<u64>,
    /// A level is compacted once it holds this many files...
    pub compact_min_files: usize,
    /// ...merging at most this many of them...
    pub compact_max_files: usize,
    /// ...of at most this many bytes together.
    pub compact_target_bytes: u64,
    /// How long a file taken out of the manifest stays on disk for queries still reading it.
    pub delete_grace: Duration,
    /// Rollup files are dropped this long after they were stored (`None`: kept forever).
    pub rollup_retention_age: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_buffered_bytes: 128 * 1024 * 1024,
            wal_segment_bytes: 16 * 1024 * 1024,
            wal_queue: 1024,
            flush_delay: Duration::ZERO,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            compact_min_files: 8,
            compact_max_files: 32,
            compact_target_bytes: 256 * 1024 * 1024,
            delete_grace: Duration::from_secs(120),
            rollup_retention_age: Some(Duration::from_secs(90 * 24 * 3600)),
        }
    }
}

/// Turns a WAL record's payload back into rows of its table (the receiver's conversion).
pub type Decode = fn(table: u8, payload: &[u8]) -> Result<RecordBatch, String>;

/// The tables of one data directory and the log in front of them.
#[derive(Debug)]
pub struct Store {
    pub spans: Arc<Table>,
    pub metrics: Arc<Table>,
    pub logs: Arc<Table>,
    /// One-minute RED per service and edge, derived from spans (see `crate::rollup`).
    pub rollups: Arc<Table>,
    wal: Wal,
    budget: Arc<Budget>,
    /// What the WAL replay at start found.
    pub replayed: ReplayReport,
    /// Parquet files set aside at start because they could not be read.
    pub quarantined: Vec<(PathBuf, String)>,
    flush_wanted: Notify,
    remote: std::sync::OnceLock<Arc<crate::remote::Remote>>,
}

impl Store {
    /// Opens (creating if needed) a data directory with default options.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default(), crate::receiver::decode_record)
    }

    /// Opens a data directory: picks up its Parquet files, replays the WAL into the
    /// memtables (skipping rows already in Parquet) and starts the WAL writer.
    pub fn open_with(
        dir: &Path,
        options: StoreOptions,
        decode: Decode,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut quarantined = Vec::new();
        let view = Arc::new(std::sync::RwLock::new(()));
        let spans = Arc::new(Table::open(
            &dir,
            TableSpec {
                name: "spans",
                id: 0,
                schema: schema::SPANS.clone(),
                time_column: "start_time",
            },
            options,
            view.clone(),
            &mut quarantined,
        )?);
        let metrics = Arc::new(Table::open(
            &dir,
            TableSpec {
                name: "metrics",
                id: 1,
                schema: schema::METRICS.clone(),
                time_column: "time",
            },
            options,
            view.clone(),
            &mut quarantined,
        )?);
        let logs = Arc::new(Table::open(
            &dir,
            TableSpec {
                name: "logs",
                id: 2,
                schema: schema::LOGS.clone(),
                time_column: "time",
            },
            options,
            view.clone(),
            &mut quarantined,
        )?);
        let rollups = Arc::new(Table::open(
            &dir,
            TableSpec {
                name: "rollups",
                id: 3,
                schema: rollup::ROLLUPS.clone(),
                time_column: "minute",
            },
            StoreOptions {
                retention_age: options.rollup_retention_age,
                ..options
            },
            view,
            &mut quarantined,
        )?);
        rollups.drop_above(spans.flushed_lsn())?;
        Table::link_rollups(&spans, &rollups);
        let budget = Budget::new(options.max_buffered_bytes);
        let tables = [&spans, &metrics, &logs];
        let wal_dir = dir.join("wal");
        let mut undecodable = 0usize;
        let replayed = wal::replay(&wal_dir, |record| {
            let Some(table) = tables.iter().find(|t| t.id == record.table) else {
                undecodable += 1;
                return;
            };
            if record.lsn <= table.flushed_lsn() {
                return;
            }
            match decode(record.table, &record.payload) {
                Ok(batch) => {
                    let reservation = budget.force_reserve(batch.get_array_memory_size());
                    table.push(record.lsn, batch, reservation);
                }
                Err(e) => {
                    undecodable += 1;
                    tracing::error!(lsn = record.lsn, table = table.name, error = %e, "WAL record does not convert, skipped");
                }
            }
        })?;
        let flushed = tables.iter().map(|t| t.flushed_lsn()).max().unwrap_or(0);
        let next_lsn = replayed.last_lsn.max(flushed) + 1;
        let buffered: usize = tables.iter().map(|t| t.buffered_rows()).sum();
        tracing::info!(
            segments = replayed.segments,
            records = replayed.records,
            rows_replayed = buffered,
            cut = replayed.cut.len(),
            undecodable,
            next_lsn,
            "write-ahead log replayed"
        );
        let flush_wanted = Notify::new();
        if buffered > 0 {
            // Replayed rows are durable already; flush them soon to free memory and the WAL.
            flush_wanted.notify_one();
        }
        let wal = Wal::start(
            &wal_dir,
            next_lsn,
            options.wal_segment_bytes,
            options.wal_queue,
        )?;
        Ok(Store {
            spans,
            metrics,
            logs,
            rollups,
            wal,
            budget,
            replayed,
            quarantined,
            flush_wanted,
            remote: std::sync::OnceLock::new(),
        })
    }

    /// Publishes every table to `remote` from now on (see `crate::remote`), after bringing
    /// the bucket in line with the local files, and reads the other writers' manifests.
    pub async fn attach_remote(
        &self,
        remote: Arc<crate::remote::Remote>,
    ) -> Result<(), StoreError> {
        for table in self.tables() {
            table.attach_remote(remote.clone()).await?;
            table.sync_remote().await?;
        }
        let _ = self.remote.set(remote);
        Ok(())
    }

    /// The bucket the store publishes to, if any.
    pub fn remote(&self) -> Option<&Arc<crate::remote::Remote>> {
        self.remote.get()
    }

    pub fn tables(&self) -> [&Arc<Table>; 4] {
        [&self.spans, &self.metrics, &self.logs, &self.rollups]
    }

    pub fn table(&self, id: u8) -> Result<&Arc<Table>, StoreError> {
        self.tables()
            .into_iter()
            .find(|t| t.id == id)
            .ok_or(StoreError::NoTable(id))
    }

    /// The memory budget requests reserve from before converting.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Bytes of WAL segments on disk.
    pub fn wal_disk_bytes(&self) -> u64 {
        self.wal.disk_bytes()
    }

    /// Counters of the WAL.
    pub fn wal_stats(&self) -> &wal::WalStats {
        &self.wal.stats
    }

    /// Makes an export durable: logs `payload` (the request as received) in the WAL, fsyncs,
    /// then adds `batch` (its rows) to table `id`'s memtable with `reservation` held until
    /// it is flushed. Returns the record's LSN once it is durable.
    pub async fn ingest(
        &self,
        id: u8,
        payload: Bytes,
        batch: RecordBatch,
        reservation: Reservation,
    ) -> Result<u64, StoreError> {
        let table = self.table(id)?.clone();
        let lsn = self
            .wal
            .append(
                id,
                payload,
                Box::new(move |lsn| {
                    table
                        .stats
                        .rows_ingested
                        .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                    table.push(lsn, batch, reservation);
                }),
            )
            .await?;
        // A flush is due early when the memtables hold half the budget, or when everything
        // together (requests in flight too) nears the cap. Not on in-flight bytes alone:
        // sixteen large requests being read would otherwise flush small files again and
        // again, and small row groups are re-encoded at compaction where big ones are copied.
        let cap = self.budget.cap();
        let buffered: usize = self.tables().iter().map(|t| t.buffered_bytes()).sum();
        if buffered > cap / 2 || self.budget.used() > cap / 8 * 7 {
            self.flush_wanted.notify_one();
        }
        Ok(lsn)
    }

    /// Resolves when a flush is due early (see [`Store::ingest`]).
    pub async fn flush_wanted(&self) {
        self.flush_wanted.notified().await;
    }

    /// Flushes every table's memtable to Parquet, each on its own (one failing table does
    /// not hold the others back), then deletes the WAL segments Parquet now holds wholly.
    /// Returns the first error.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut first_error = None;
        for table in self.tables() {
            if let Err(e) = table.flush().await {
                tracing::error!(table = table.name, error = %e, "flush failed, rows stay in the WAL and memtable");
                first_error.get_or_insert(e);
            }
        }
        let durable = self.durable_lsn();
        if let Err(e) = self.wal.remove_through(durable) {
            tracing::error!(error = %e, "removing flushed WAL segments");
            first_error.get_or_insert(e.into());
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Background upkeep after a flush: compacts what is due, drops files past retention
    /// (`now_ns` is the current time) and deletes retired files whose grace is over. Each
    /// table on its own; returns the first error.
    pub async fn maintain(&self, now_ns: i64) -> Result<(), StoreError> {
        let mut first_error = None;
        for table in self.tables() {
            // A few rounds at most, so a big backlog does not hold off the next flush long.
            for _ in 0..4 {
                match table.compact().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(table = table.name, error = %e, "compaction failed, the files stay as they were");
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
            if let Err(e) = table.expire(now_ns).await {
                tracing::error!(table = table.name, error = %e, "retention failed");
                first_error.get_or_insert(e);
            }
            table.sweep();
            if let Err(e) = table.sync_remote().await {
                tracing::error!(table = table.name, error = %e, "object store upkeep failed, retried at the next maintenance");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Every record with an LSN up to this one is in a Parquet file.
    pub fn durable_lsn(&self) -> u64 {
        // Read the applied LSN first: anything applied after it is above it anyway.
        let applied = self.wal.stats.applied_lsn.load(Ordering::Acquire);
        self.tables()
            .iter()
            .map(|t| t.first_buffered_lsn().map_or(applied, |l| l - 1))
            .min()
            .unwrap_or(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_to_batch;
    use crate::query::QueryEngine;
    use datafusion::arrow::array::{Array, AsArray};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    fn request(n: u8, seed: u8) -> ExportTraceServiceRequest {
        let spans = (0..n)
            .map(|i| Span {
                trace_id: vec![seed; 16],
                span_id: vec![i + 1; 8],
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    async fn ingest(store: &Store, n: u8, seed: u8) -> u64 {
        ingest_with(store, n, seed, |_| {}).await
    }

    /// Ingests `n` spans of trace `seed`, each changed by `edit` first; returns the LSN.
    async fn ingest_with(store: &Store, n: u8, seed: u8, edit: impl Fn(&mut Span)) -> u64 {
        let mut req = request(n, seed);
        req.resource_spans[0].scope_spans[0]
            .spans
            .iter_mut()
            .for_each(edit);
        let batch = spans_to_batch(&req).expect("converts");
        let reservation = store
            .budget()
            .try_reserve(batch.get_array_memory_size())
            .expect("room");
        store
            .ingest(0, Bytes::from(req.encode_to_vec()), batch, reservation)
            .await
            .expect("ingest")
    }

    async fn count(store: Arc<Store>) -> i64 {
        let r = QueryEngine::new(store)
            .sql("SELECT count(*) AS n FROM spans")
            .await
            .expect("query");
        r.rows[0]["n"].as_i64().expect("n")
    }

    fn files_in(dir: &Path, suffix: &str) -> usize {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().to_string_lossy().ends_with(suffix))
            .count()
    }

    #[tokio::test]
    async fn rows_are_seen_once_across_flushes_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        assert_eq!(
            store.spans.flush().await.expect("flush"),
            None,
            "nothing to flush"
        );
        ingest(&store, 3, 1).await;
        ingest(&store, 2, 2).await;
        assert_eq!(count(store.clone()).await, 5, "memtable rows are queryable");
        let file = store.spans.flush().await.expect("flush").expect("a file");
        assert!(file.name.ends_with(".parquet"));
        assert_eq!(file.rows, 5);
        let snap = store.spans.snapshot();
        assert_eq!((snap.files.len(), snap.batches.len()), (1, 0));
        ingest(&store, 4, 3).await;
        assert_eq!(
            count(store.clone()).await,
            9,
            "file and memtable, no row twice"
        );
        store.flush().await.expect("flush");
        drop(store);
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(reopened.spans.snapshot().files.len(), 2);
        assert_eq!(count(reopened).await, 9, "everything survives a restart");
        assert_eq!(
            files_in(&dir.path().join("spans"), ".tmp"),
            0,
            "no temporary files left behind"
        );
    }

    #[tokio::test]
    async fn unflushed_rows_come_back_from_the_wal_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        ingest(&store, 3, 1).await;
        store.flush().await.expect("flush");
        ingest(&store, 2, 2).await;
        ingest(&store, 1, 3).await;
        // No flush: the process "dies" with two exports only in the WAL.
        drop(store);
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(
            reopened.replayed.records, 3,
            "all read, the flushed one skipped"
        );
        assert_eq!(reopened.spans.buffered_rows(), 3);
        assert_eq!(
            count(reopened.clone()).await,
            6,
            "flushed rows not replayed twice"
        );
        reopened.flush().await.expect("flush");
        assert_eq!(reopened.durable_lsn(), 3);
        drop(reopened);
        let again = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(again.spans.buffered_rows(), 0, "all in Parquet now");
        assert_eq!(count(again.clone()).await, 6);
        // Flushed segments go; LSNs keep rising after a restart.
        assert_eq!(ingest(&again, 1, 4).await, 4);
        again.flush().await.expect("flush");
        assert!(files_in(&dir.path().join("wal"), ".wal") <= 2);
    }

    #[tokio::test]
    async fn damaged_files_are_quarantined_and_orphans_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        ingest(&store, 2, 1).await;
        store.flush().await.expect("flush");
        ingest(&store, 3, 2).await;
        let damaged = store.spans.flush().await.expect("flush").expect("file");
        drop(store);
        // A file the manifest does not name (a flush that died before its manifest update)
        // and a listed file cut short.
        std::fs::write(dir.path().join("spans/orphan.parquet"), b"PAR1 nope").expect("write");
        let path = dir.path().join("spans").join(&damaged.name);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen despite bad files"));
        assert_eq!(reopened.quarantined.len(), 1, "{:?}", reopened.quarantined);
        assert!(reopened.quarantined[0].1.contains("manifest says"));
        assert!(
            dir.path()
                .join("quarantine/spans")
                .join(&damaged.name)
                .exists()
        );
        assert!(
            !dir.path().join("spans/orphan.parquet").exists(),
            "orphan deleted"
        );
        // The damaged file's rows are still in the WAL's open segment: they come back.
        assert_eq!(reopened.spans.buffered_rows(), 3, "recovered from the WAL");
        assert_eq!(
            count(reopened.clone()).await,
            5,
            "queries go on, nothing lost"
        );
        assert_eq!(
            reopened.spans.files().len(),
            1,
            "the manifest no longer lists it"
        );
    }

    #[tokio::test]
    async fn a_table_from_before_the_manifest_gets_one_from_its_footers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        ingest(&store, 4, 1).await;
        store.flush().await.expect("flush");
        drop(store);
        std::fs::remove_file(dir.path().join("spans/manifest.json")).expect("remove");
        std::fs::write(dir.path().join("spans/foreign.parquet"), b"not parquet").expect("write");
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen"));
        let files = reopened.spans.files();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].rows, 4);
        assert!(files[0].min_time_ns <= files[0].max_time_ns);
        assert_eq!(
            reopened.quarantined.len(),
            1,
            "the foreign file is set aside"
        );
        assert!(dir.path().join("spans/manifest.json").exists());
        assert_eq!(count(reopened).await, 4);
    }

    /// Spans of one export, all starting at `start_s` seconds.
    async fn ingest_at(store: &Store, n: u8, seed: u8, start_s: u64) {
        ingest_with(store, n, seed, |s| {
            s.start_time_unix_nano = start_s * 1_000_000_000;
            s.end_time_unix_nano = start_s * 1_000_000_000 + 1;
        })
        .await;
    }

    async fn explain(engine: &QueryEngine, sql: &str) -> String {
        let r = engine
            .sql(&format!("EXPLAIN {sql}"))
            .await
            .expect("explain");
        r.rows
            .iter()
            .filter(|row| row["plan_type"] == "physical_plan")
            .map(|row| row["plan"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[tokio::test]
    async fn files_outside_a_time_filter_are_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        for (i, start) in [1_000u64, 2_000, 3_000].into_iter().enumerate() {
            ingest_at(&store, 2, i as u8 + 1, start).await;
            store.flush().await.expect("flush");
        }
        let engine = QueryEngine::new(store.clone());
        let all = explain(&engine, "SELECT span_id FROM spans").await;
        assert_eq!(all.matches(".parquet").count(), 3, "{all}");
        let since = 2_500u64 * 1_000_000_000;
        let recent = explain(
            &engine,
            &format!("SELECT span_id FROM spans WHERE start_time >= to_timestamp_nanos({since})"),
        )
        .await;
        assert_eq!(recent.matches(".parquet").count(), 1, "{recent}");
        let r = engine
            .sql(&format!(
                "SELECT count(*) AS n FROM spans WHERE start_time >= to_timestamp_nanos({since})"
            ))
            .await
            .expect("query");
        assert_eq!(r.rows[0]["n"], 2);
        let between = explain(
            &engine,
            &format!(
                "SELECT span_id FROM spans WHERE start_time BETWEEN to_timestamp_nanos({}) AND to_timestamp_nanos({})",
                1_500u64 * 1_000_000_000,
                2_500u64 * 1_000_000_000
            ),
        )
        .await;
        assert_eq!(between.matches(".parquet").count(), 1, "{between}");
    }

    #[tokio::test]
    async fn compaction_merges_and_retention_drops_without_losing_a_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            compact_min_files: 3,
            compact_max_files: 3,
            delete_grace: Duration::ZERO,
            retention_age: Some(Duration::from_secs(3600)),
            ..StoreOptions::default()
        };
        let store = Arc::new(
            Store::open_with(dir.path(), options, crate::receiver::decode_record).expect("open"),
        );
        // Three files stored before `cutoff`, then four after it.
        let mut cutoff = 0;
        for i in 0..7u8 {
            if i == 3 {
                cutoff = crate::now_ns();
            }
            ingest_at(&store, 5, i + 1, 1_000).await;
            store.flush().await.expect("flush");
        }
        assert_eq!(store.spans.files().len(), 7);
        assert_eq!(count(store.clone()).await, 35);
        let merged = compact_spans(&store).await;
        assert_eq!((merged.level, merged.rows), (1, 15));
        assert_eq!(store.spans.files().len(), 5);
        assert_eq!(
            count(store.clone()).await,
            35,
            "no row lost or doubled by compaction"
        );
        let now_ns = cutoff + 3_600_000_000_000;
        let expired = store.spans.expire(now_ns).await.expect("expire");
        assert_eq!(
            expired, 1,
            "the merged file of rows stored before the cutoff expired"
        );
        assert_eq!(count(store.clone()).await, 20);
        store.spans.sweep();
        let on_disk = files_in(&dir.path().join("spans"), ".parquet");
        assert_eq!(on_disk, store.spans.files().len(), "retired files deleted");
        drop(store);
        // Byte cap: keep the table under the size of two files.
        let two = {
            let s = Store::open(dir.path()).expect("reopen");
            s.spans.files().iter().take(2).map(|f| f.bytes).sum::<u64>()
        };
        let capped = Store::open_with(
            dir.path(),
            StoreOptions {
                retention_bytes: Some(two),
                retention_age: None,
                delete_grace: Duration::ZERO,
                ..StoreOptions::default()
            },
            crate::receiver::decode_record,
        )
        .expect("reopen");
        capped.spans.expire(0).await.expect("expire");
        assert!(capped.spans.files().iter().map(|f| f.bytes).sum::<u64>() <= two);
        assert_eq!(capped.spans.files().len(), 2);
        drop(capped);
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(count(reopened).await, 10, "the manifest survives a restart");
    }

    #[tokio::test]
    async fn files_of_the_first_layout_are_rewritten_and_stay_readable() {
        use datafusion::arrow::array::{ArrayRef, MapBuilder, StringArray, StringBuilder};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        use datafusion::parquet::arrow::ArrowWriter;
        use datafusion::parquet::file::metadata::KeyValue;
        use datafusion::parquet::file::properties::WriterProperties;

        // A spans file as version 1 wrote it: 30 columns, ids as hex text, every attribute
        // as text in the map (the request id among them), no manifest yet.
        const V1_COLUMNS: [&str; 30] = [
            "trace_id",
            "span_id",
            "parent_span_id",
            "trace_state",
            "service_name",
            "service_version",
            "service_namespace",
            "span_name",
            "span_kind",
            "start_time",
            "end_time",
            "duration_ns",
            "status_code",
            "status_message",
            "http_request_method",
            "http_response_status_code",
            "http_route",
            "url_path",
            "url_full",
            "server_address",
            "server_port",
            "network_peer_address",
            "rpc_system",
            "rpc_service",
            "rpc_method",
            "rpc_grpc_status_code",
            "scope_name",
            "scope_version",
            "attributes",
            "resource_attributes",
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let spans_dir = dir.path().join("spans");
        std::fs::create_dir_all(&spans_dir).expect("dir");
        let current = spans_to_batch(&request(3, 7)).expect("converts");
        let hex = |name: &str| -> ArrayRef {
            let ids = current
                .column_by_name(name)
                .expect(name)
                .as_fixed_size_binary();
            Arc::new(StringArray::from_iter((0..ids.len()).map(|i| {
                ids.is_valid(i).then(|| {
                    ids.value(i)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                })
            })))
        };
        let mut attrs = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for i in 0..3 {
            attrs.keys().append_value("guid:x-request-id");
            attrs.values().append_value(format!("req-{i}"));
            attrs.append(true).expect("row");
        }
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for name in V1_COLUMNS {
            let (field, column) = match name {
                "trace_id" | "span_id" => (Field::new(name, DataType::Utf8, false), hex(name)),
                "parent_span_id" => (Field::new(name, DataType::Utf8, true), hex(name)),
                "attributes" => (
                    Field::new(name, schema::string_map(), false),
                    Arc::new(attrs.finish()) as ArrayRef,
                ),
                _ => {
                    let (i, field) = current
                        .schema()
                        .column_with_name(name)
                        .map(|(i, f)| (i, f.clone()))
                        .expect(name);
                    (field, current.column(i).clone())
                }
            };
            fields.push(field);
            columns.push(column);
        }
        let v1 = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(v1.clone(), columns).expect("v1 batch");
        let file =
            std::fs::File::create(spans_dir.join("0000000000001-000001.parquet")).expect("create");
        let props = WriterProperties::builder()
            .set_key_value_metadata(Some(vec![KeyValue::new(
                "lumen.schema_version".into(),
                "1".to_string(),
            )]))
            .build();
        let mut writer = ArrowWriter::try_new(file, v1, Some(props)).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");

        let store = Arc::new(Store::open(dir.path()).expect("open"));
        assert!(store.quarantined.is_empty(), "{:?}", store.quarantined);
        let upgraded = &store.spans.files()[0];
        assert_eq!(upgraded.schema_version, schema::SCHEMA_VERSION);
        assert!(
            !spans_dir.join("0000000000001-000001.parquet").exists(),
            "the old file is gone once the manifest names its rewrite"
        );
        ingest(&store, 2, 8).await;
        store.flush().await.expect("flush");
        let engine = QueryEngine::new(store.clone());
        let r = engine
            .sql(
                "SELECT count(*) AS n, count(events) AS with_events, \
                        count(DISTINCT trace_id) AS traces, count(request_id) AS request_ids \
                 FROM spans",
            )
            .await
            .expect("query over old and new files");
        assert_eq!(r.rows[0]["n"], 5);
        assert_eq!(
            r.rows[0]["with_events"], 2,
            "old rows read with null events"
        );
        assert_eq!(r.rows[0]["traces"], 2);
        assert_eq!(
            r.rows[0]["request_ids"], 3,
            "the request id moved from the old map to its column"
        );
        let old = engine
            .sql(&format!(
                "SELECT span_id FROM spans WHERE trace_id = '{}' ORDER BY span_id",
                "07".repeat(16)
            ))
            .await
            .expect("old rows by hex id");
        assert_eq!(old.rows.len(), 3);
        assert_eq!(old.rows[0]["span_id"], "01".repeat(8));
        let newest = store.spans.files().pop().expect("a file");
        assert_eq!(newest.schema_version, schema::SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn two_writers_sharing_a_bucket_each_query_the_others_files_exactly_once() {
        use crate::remote::Remote;
        let bucket = tempfile::tempdir().expect("bucket");
        let url = format!("file://{}/mesh", bucket.path().display());
        let options = StoreOptions {
            compact_min_files: 2,
            delete_grace: Duration::ZERO,
            ..StoreOptions::default()
        };
        let open = |dir: &Path| {
            Arc::new(Store::open_with(dir, options, crate::receiver::decode_record).expect("open"))
        };
        let (dir_a, dir_b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let a = open(dir_a.path());
        let b = open(dir_b.path());
        // A flushed a file before it had a bucket: attaching uploads it.
        ingest(&a, 3, 1).await;
        a.flush().await.expect("flush a");
        a.attach_remote(Arc::new(Remote::open(&url, "writer-a").expect("remote a")))
            .await
            .expect("attach a");
        b.attach_remote(Arc::new(Remote::open(&url, "writer-b").expect("remote b")))
            .await
            .expect("attach b");
        ingest(&b, 2, 2).await;
        b.flush().await.expect("flush b");
        ingest(&a, 4, 3).await;
        a.flush().await.expect("flush a again");
        for store in [&a, &b] {
            store.maintain(crate::now_ns()).await.expect("maintain");
        }
        let traces = |store: &Arc<Store>| {
            let engine = QueryEngine::new(store.clone());
            async move {
                let r = engine
                    .sql("SELECT count(*) AS n, count(DISTINCT trace_id) AS t FROM spans")
                    .await
                    .expect("query");
                (
                    r.rows[0]["n"].as_i64().expect("n"),
                    r.rows[0]["t"].as_i64().expect("t"),
                )
            }
        };
        // A compacted its two files (min 2), B re-read A's manifest after that.
        assert_eq!(a.spans.files().len(), 1, "{:?}", a.spans.files());
        b.maintain(crate::now_ns()).await.expect("maintain b");
        assert_eq!(traces(&a).await, (9, 3), "A sees its own rows and B's");
        assert_eq!(
            traces(&b).await,
            (9, 3),
            "B sees its own rows and A's, once"
        );
        // The bucket holds each writer's manifest and only the files it names (A's
        // compaction inputs were deleted after their grace, here none).
        for store in [&a, &b] {
            store.maintain(crate::now_ns()).await.expect("maintain");
        }
        let own = |store: &Arc<Store>| {
            let remote = store.remote().expect("remote").clone();
            async move {
                let mut names = remote.own_files("spans").await.expect("list");
                names.sort();
                names
            }
        };
        let listed = |store: &Arc<Store>| {
            let mut names: Vec<String> = store.spans.files().into_iter().map(|f| f.name).collect();
            names.sort();
            names
        };
        assert_eq!(own(&a).await, listed(&a));
        assert_eq!(own(&b).await, listed(&b));
        assert!(
            a.remote()
                .expect("remote")
                .own_manifest("spans")
                .await
                .expect("manifest")
                .is_some_and(|files| files == a.spans.files())
        );
    }

    #[tokio::test]
    async fn a_writer_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let first = crate::remote::writer_id(dir.path()).expect("id");
        assert!(crate::remote::valid_writer_id(&first));
        assert_eq!(crate::remote::writer_id(dir.path()).expect("id"), first);
        assert!(crate::remote::Remote::open("file:///tmp/x", "../escape").is_err());
        assert!(crate::remote::Remote::open("ftp://host/x", "w").is_err());
    }

    #[tokio::test]
    async fn ids_compare_with_hex_text_and_bad_hex_is_the_callers_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        ingest(&store, 3, 0xab).await;
        ingest(&store, 2, 0xcd).await;
        let engine = QueryEngine::new(store.clone());
        let count = |sql: String| {
            let engine = &engine;
            async move {
                engine.sql(&sql).await.expect("query").rows[0]["n"]
                    .as_i64()
                    .expect("n")
            }
        };
        let ab = "ab".repeat(16);
        let cd = "CD".repeat(16);
        assert_eq!(
            count(format!(
                "SELECT count(*) AS n FROM spans WHERE trace_id = '{ab}'"
            ))
            .await,
            3
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) AS n FROM spans WHERE '{cd}' = trace_id"
            ))
            .await,
            2
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) AS n FROM spans WHERE trace_id IN ('{ab}', '{cd}')"
            ))
            .await,
            5
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) AS n FROM spans WHERE trace_id <> '{ab}' AND span_id = '{}'",
                "01".repeat(8)
            ))
            .await,
            1
        );
        let r = engine
            .sql(&format!(
                "SELECT trace_id, span_id FROM spans WHERE trace_id = '{cd}' ORDER BY span_id"
            ))
            .await
            .expect("query");
        assert_eq!(
            r.rows[0]["trace_id"],
            "cd".repeat(16),
            "ids come back as hex"
        );
        assert_eq!(r.rows[1]["span_id"], "02".repeat(8));
        for bad in ["abc", "zz".repeat(16).as_str()] {
            match engine
                .sql(&format!(
                    "SELECT count(*) FROM spans WHERE trace_id = '{bad}'"
                ))
                .await
            {
                Err(crate::query::QueryError::Sql(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("trace_id") && msg.contains("32 hex digits"),
                        "{msg}"
                    )
                }
                other => panic!("expected a SQL error for {bad:?}, got {other:?}"),
            }
        }
    }

    async fn rolled_up_requests(store: Arc<Store>) -> i64 {
        let r = QueryEngine::new(store)
            .sql("SELECT coalesce(sum(requests), 0) AS n FROM rollups WHERE kind = 'service'")
            .await
            .expect("query");
        r.rows[0]["n"].as_i64().expect("n")
    }

    /// An export of `n` server spans of service "svc".
    async fn ingest_server_spans(store: &Store, n: u8, seed: u8) {
        ingest_with(store, n, seed, |s| s.kind = 2).await;
    }

    #[tokio::test]
    async fn rollups_count_each_span_once_flushed_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        ingest_server_spans(&store, 3, 1).await;
        assert_eq!(
            rolled_up_requests(store.clone()).await,
            3,
            "live from the memtable"
        );
        store.flush().await.expect("flush");
        assert_eq!(store.rollups.files().len(), 1, "written at flush");
        assert_eq!(
            rolled_up_requests(store.clone()).await,
            3,
            "from the file, not twice"
        );
        ingest_server_spans(&store, 4, 2).await;
        assert_eq!(rolled_up_requests(store.clone()).await, 7);
        drop(store);

        // A crash between the rollups manifest and the spans manifest of the next flush:
        // the rollups list a file for WAL record 2, which the spans never flushed.
        let rollups_dir = dir.path().join("rollups");
        let mut listed = crate::manifest::read(&rollups_dir, "rollups")
            .expect("manifest")
            .expect("listed");
        let mut unfinished = listed[0].clone();
        unfinished.name = "00000000000000000002-00000000000000000002.parquet".into();
        unfinished.max_lsn = 2;
        std::fs::copy(
            rollups_dir.join(&listed[0].name),
            rollups_dir.join(&unfinished.name),
        )
        .expect("copy");
        listed.push(unfinished.clone());
        crate::manifest::write(&rollups_dir, "rollups", &listed).expect("write");

        let store = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(
            store.rollups.files().len(),
            1,
            "the unfinished flush's rollups dropped"
        );
        assert!(!rollups_dir.join(&unfinished.name).exists());
        assert_eq!(
            count(store.clone()).await,
            7,
            "the spans come back from the WAL"
        );
        assert_eq!(rolled_up_requests(store.clone()).await, 7, "rolled up once");
        store.flush().await.expect("flush");
        assert_eq!(rolled_up_requests(store.clone()).await, 7);
        drop(store);
        let store = Arc::new(Store::open(dir.path()).expect("reopen"));
        assert_eq!(rolled_up_requests(store).await, 7, "and after a restart");
    }

    /// `n` spans with scattered trace ids, starting at `t0_ns`, 1 µs apart.
    async fn ingest_bulk(store: &Store, part: u64, n: u64, t0_ns: u64) {
        for chunk in 0..n.div_ceil(10_000) {
            let spans: Vec<Span> = (chunk * 10_000..((chunk + 1) * 10_000).min(n))
                .map(|i| {
                    // A mixed, never-zero id: row-group min/max cannot rule a lookup out.
                    let x = (part << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut trace_id = x.to_be_bytes().to_vec();
                    trace_id.extend_from_slice(&x.rotate_left(17).to_be_bytes());
                    Span {
                        trace_id,
                        span_id: (i + 1).to_be_bytes().to_vec(),
                        name: "op".into(),
                        start_time_unix_nano: t0_ns + i * 1_000,
                        end_time_unix_nano: t0_ns + i * 1_000 + 500,
                        ..Default::default()
                    }
                })
                .collect();
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let batch = spans_to_batch(&req).expect("converts");
            let reservation = store.budget().force_reserve(batch.get_array_memory_size());
            store
                .ingest(0, Bytes::from(req.encode_to_vec()), batch, reservation)
                .await
                .expect("ingest");
        }
    }

    /// A reader of one file of the spans table.
    fn spans_file(
        dir: &tempfile::TempDir,
        name: &str,
    ) -> datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<std::fs::File>
    {
        let file = std::fs::File::open(dir.path().join("spans").join(name)).expect("open file");
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("reader")
    }

    /// Rows of each big file [`two_big_files`] writes (over one splice row group).
    const N: u64 = 70_000;

    /// The spans table compacted once, which must merge something.
    async fn compact_spans(store: &Store) -> crate::manifest::DataFile {
        store
            .spans
            .compact()
            .await
            .expect("compact")
            .expect("a compaction")
    }

    /// A store that compacts at `min_files` files, holding two flushed files of [`N`] rows
    /// each, of consecutive time ranges.
    async fn two_big_files(min_files: usize) -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            compact_min_files: min_files,
            ..StoreOptions::default()
        };
        let store = Arc::new(
            Store::open_with(dir.path(), options, crate::receiver::decode_record).expect("open"),
        );
        for part in 0..2 {
            ingest_bulk(&store, part, N, 1_000_000_000_000 + part * 1_000_000_000).await;
            store.flush().await.expect("flush");
        }
        (dir, store)
    }

    #[tokio::test]
    async fn big_consecutive_files_compact_by_copying_their_row_groups() {
        let (dir, store) = two_big_files(2).await;
        let merged = compact_spans(&store).await;
        assert_eq!(merged.rows, 2 * N);
        assert_eq!(
            store
                .spans
                .stats
                .compactions_spliced
                .load(Ordering::Relaxed),
            1
        );
        // The copy is a whole, readable file sorted within each row group (here, of
        // consecutive ranges, throughout): rows, Arrow types, order, bloom filters.
        let reader = spans_file(&dir, &merged.name);
        assert_eq!(reader.metadata().num_row_groups(), 2);
        let mut last = i64::MIN;
        let mut rows = 0;
        for batch in reader.build().expect("build") {
            let batch = batch.expect("batch");
            let t = batch
                .column_by_name("start_time")
                .expect("start")
                .as_primitive::<datafusion::arrow::datatypes::TimestampNanosecondType>();
            for v in t.values().iter() {
                assert!(*v >= last, "sorted");
                last = *v;
            }
            rows += batch.num_rows();
        }
        assert_eq!(rows as u64, 2 * N);
        let engine = QueryEngine::new(store.clone());
        let r = engine
            .sql("SELECT count(*) AS n, arrow_typeof(min(start_time)) AS t FROM spans")
            .await
            .expect("query");
        assert_eq!(r.rows[0]["n"], 2 * N);
        assert_eq!(r.rows[0]["t"], "Timestamp(ns, \"UTC\")");
        let r = engine
            .sql(&format!(
                "EXPLAIN ANALYZE SELECT span_id FROM spans WHERE trace_id = '{}'",
                "ab".repeat(16)
            ))
            .await
            .expect("explain");
        let plan: String = r
            .rows
            .iter()
            .map(|row| row["plan"].as_str().unwrap_or_default().to_string())
            .collect();
        assert!(
            plan.contains("row_groups_pruned_bloom_filter=2 total \u{2192} 0 matched"),
            "the copied bloom filters still rule row groups out: {plan}"
        );
        // Small files are merged (re-encoded into one row group), not copied.
        ingest(&store, 3, 7).await;
        store.flush().await.expect("flush");
        ingest(&store, 3, 8).await;
        store.flush().await.expect("flush");
        let before = store
            .spans
            .stats
            .compactions_spliced
            .load(Ordering::Relaxed);
        store.spans.compact().await.expect("compact");
        assert_eq!(
            store
                .spans
                .stats
                .compactions_spliced
                .load(Ordering::Relaxed),
            before
        );
    }

    #[tokio::test]
    async fn a_small_file_among_big_ones_is_re_encoded_and_the_big_ones_copied() {
        let (dir, store) = two_big_files(3).await;
        // A quiet flush: a few rows, a small row group.
        ingest(&store, 5, 9).await;
        store.flush().await.expect("flush");
        let merged = compact_spans(&store).await;
        assert_eq!(merged.rows, 2 * N + 5);
        assert_eq!(
            store
                .spans
                .stats
                .compactions_spliced
                .load(Ordering::Relaxed),
            1,
            "the big row groups were copied"
        );
        // Two copied row groups and the small one written anew; every row readable once.
        let reader = spans_file(&dir, &merged.name);
        let sizes: Vec<i64> = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|rg| rg.num_rows())
            .collect();
        assert_eq!(sizes, [N as i64, N as i64, 5]);
        let engine = QueryEngine::new(store.clone());
        let r = engine
            .sql("SELECT count(*) AS n FROM spans")
            .await
            .expect("query");
        assert_eq!(r.rows[0]["n"], 2 * N + 5);
        // The side file it wrote the small rows to is gone.
        let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("spans"))
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn a_trace_id_lookup_skips_row_groups_by_bloom_filter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        // Trace ids 01… and 03… in one file: its min/max range covers 02…, only its bloom
        // filter can tell 02… is not there. 02… in the next file, 05… in a third.
        for seeds in [&[1u8, 3][..], &[2], &[5]] {
            for seed in seeds {
                ingest(&store, 4, *seed).await;
            }
            store.flush().await.expect("flush");
        }
        let engine = QueryEngine::new(store.clone());
        let wanted = "02".repeat(16);
        let r = engine
            .sql(&format!(
                "EXPLAIN ANALYZE SELECT span_id FROM spans WHERE trace_id = '{wanted}'"
            ))
            .await
            .expect("explain analyze");
        let plan: String = r
            .rows
            .iter()
            .map(|row| row["plan"].as_str().unwrap_or_default().to_string())
            .collect();
        let metric = |name: &str| {
            plan.split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            metric("row_groups_pruned_statistics"),
            "3 total \u{2192} 2 matched",
            "{plan}"
        );
        assert_eq!(
            metric("row_groups_pruned_bloom_filter"),
            "2 total \u{2192} 1 matched",
            "{plan}"
        );
        let r = engine
            .sql(&format!(
                "SELECT count(*) AS n FROM spans WHERE trace_id = '{wanted}'"
            ))
            .await
            .expect("query");
        assert_eq!(r.rows[0]["n"], 4);
    }
}
