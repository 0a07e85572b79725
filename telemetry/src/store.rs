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

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use tokio::sync::Notify;

use crate::budget::{Budget, Reservation};
use crate::schema;
use crate::wal::{self, ReplayReport, Wal, WalError};

/// Parquet key-value metadata: the highest WAL LSN whose rows the file holds.
pub const WAL_LSN_KEY: &str = "lumen.wal_lsn";
/// Parquet key-value metadata: the table layout version the file was written with.
pub const SCHEMA_VERSION_KEY: &str = "lumen.schema_version";

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
    pub flush_delay: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_buffered_bytes: 128 * 1024 * 1024,
            wal_segment_bytes: 16 * 1024 * 1024,
            wal_queue: 1024,
            flush_delay: std::time::Duration::ZERO,
        }
    }
}

/// Turns a WAL record's payload back into rows of its table (the receiver's conversion).
pub type Decode = fn(table: u8, payload: &[u8]) -> Result<RecordBatch, String>;

/// One table: schema, directory, memtable and flushed files.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    /// The id WAL records name this table by (a format contract).
    pub id: u8,
    pub schema: SchemaRef,
    dir: PathBuf,
    state: Mutex<TableState>,
    flush_lock: tokio::sync::Mutex<()>,
    flush_delay: std::time::Duration,
}

#[derive(Debug, Default)]
struct TableState {
    mem: Vec<Buffered>,
    files: Vec<PathBuf>,
    /// Every row of this table with a WAL LSN up to this one is in `files`.
    flushed_lsn: u64,
}

/// A batch in the memtable: its WAL LSN and the memory it holds.
#[derive(Debug)]
struct Buffered {
    lsn: u64,
    batch: RecordBatch,
    _reservation: Reservation,
}

/// What a query reads: immutable files plus the batches not yet flushed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub files: Vec<PathBuf>,
    pub batches: Vec<RecordBatch>,
}

/// The tables of one data directory and the log in front of them.
#[derive(Debug)]
pub struct Store {
    pub spans: Arc<Table>,
    pub metrics: Arc<Table>,
    wal: Wal,
    budget: Arc<Budget>,
    /// What the WAL replay at start found.
    pub replayed: ReplayReport,
    /// Parquet files set aside at start because they could not be read.
    pub quarantined: Vec<(PathBuf, String)>,
    flush_wanted: Notify,
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
        let open = |name, id, schema, quarantined: &mut Vec<_>| {
            Table::open(&dir, name, id, schema, quarantined).map(|mut t| {
                t.flush_delay = options.flush_delay;
                Arc::new(t)
            })
        };
        let spans = open("spans", 0, schema::SPANS.clone(), &mut quarantined)?;
        let metrics = open("metrics", 1, schema::METRICS.clone(), &mut quarantined)?;
        let budget = Budget::new(options.max_buffered_bytes);
        let tables = [&spans, &metrics];
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
        let wal = Wal::start(
            &wal_dir,
            next_lsn,
            options.wal_segment_bytes,
            options.wal_queue,
        )?;
        Ok(Store {
            spans,
            metrics,
            wal,
            budget,
            replayed,
            quarantined,
            flush_wanted: Notify::new(),
        })
    }

    pub fn tables(&self) -> [&Arc<Table>; 2] {
        [&self.spans, &self.metrics]
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
                Box::new(move |lsn| table.push(lsn, batch, reservation)),
            )
            .await?;
        if self.budget.used() > self.budget.cap() / 2 {
            self.flush_wanted.notify_one();
        }
        Ok(lsn)
    }

    /// Resolves when buffered rows pass half the budget (a flush is due early).
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

impl Table {
    fn open(
        root: &Path,
        name: &'static str,
        id: u8,
        schema: SchemaRef,
        quarantined: &mut Vec<(PathBuf, String)>,
    ) -> Result<Table, StoreError> {
        let dir = root.join(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut files = Vec::new();
        let mut flushed_lsn = 0;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            let file_name = path.to_string_lossy();
            if file_name.ends_with(".parquet.tmp") {
                // A flush that died before its rename: its rows are still in the WAL.
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            if !file_name.ends_with(".parquet") {
                continue;
            }
            match read_footer(&path) {
                Ok(lsn) => {
                    flushed_lsn = flushed_lsn.max(lsn);
                    files.push(path);
                }
                Err(reason) => {
                    let aside = root.join("quarantine").join(name);
                    std::fs::create_dir_all(&aside).map_err(io(&aside))?;
                    let target = aside.join(path.file_name().unwrap_or_default());
                    std::fs::rename(&path, &target).map_err(io(&path))?;
                    tracing::error!(file = %path.display(), moved_to = %target.display(), reason = %reason, "unreadable Parquet file quarantined");
                    quarantined.push((target, reason));
                }
            }
        }
        Ok(Table {
            name,
            id,
            schema,
            dir,
            state: Mutex::new(TableState {
                files,
                flushed_lsn,
                ..Default::default()
            }),
            flush_lock: tokio::sync::Mutex::new(()),
            flush_delay: std::time::Duration::ZERO,
        })
    }

    /// Adds a durable batch to the memtable; it is queryable at once.
    fn push(&self, lsn: u64, batch: RecordBatch, reservation: Reservation) {
        if batch.num_rows() == 0 {
            return;
        }
        // A poisoned lock means a reader panicked mid-clone; the state itself is intact.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.mem.push(Buffered {
            lsn,
            batch,
            _reservation: reservation,
        });
    }

    fn flushed_lsn(&self) -> u64 {
        self.state.lock().map(|s| s.flushed_lsn).unwrap_or_default()
    }

    fn first_buffered_lsn(&self) -> Option<u64> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mem
            .first()
            .map(|b| b.lsn)
    }

    /// Rows in the memtable.
    pub fn buffered_rows(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.mem.iter().map(|b| b.batch.num_rows()).sum())
            .unwrap_or_default()
    }

    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(Snapshot {
            files: state.files.clone(),
            batches: state.mem.iter().map(|b| b.batch.clone()).collect(),
        })
    }

    /// Writes the memtable to a new Parquet file (written aside, fsynced, renamed into place,
    /// directory fsynced) and swaps the flushed batches for the file. Returns the file, if
    /// any rows were written.
    pub async fn flush(&self) -> Result<Option<PathBuf>, StoreError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        if !self.flush_delay.is_zero() && self.first_buffered_lsn().is_some() {
            tokio::time::sleep(self.flush_delay).await;
        }
        let (batches, first_lsn, last_lsn) = {
            let state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
            let (Some(first), Some(last)) = (state.mem.first(), state.mem.last()) else {
                return Ok(None);
            };
            let batches: Vec<RecordBatch> = state.mem.iter().map(|b| b.batch.clone()).collect();
            (batches, first.lsn, last.lsn)
        };
        let path = self
            .dir
            .join(format!("{first_lsn:020}-{last_lsn:020}.parquet"));
        let schema = self.schema.clone();
        let write_path = path.clone();
        let n = batches.len();
        tokio::task::spawn_blocking(move || {
            write_parquet(&write_path, &schema, &batches, last_lsn)
        })
        .await
        .map_err(|e| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        let flushed_rows: usize = state.mem.drain(..n).map(|b| b.batch.num_rows()).sum();
        state.files.push(path.clone());
        state.flushed_lsn = state.flushed_lsn.max(last_lsn);
        tracing::debug!(table = self.name, rows = flushed_rows, file = %path.display(), "flushed memtable");
        Ok(Some(path))
    }
}

/// Reads a Parquet footer: the file's WAL LSN (0 for files from before the WAL). Fails on a
/// file that is not Parquet or was written by an unknown layout version.
fn read_footer(path: &Path) -> Result<u64, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let kv = reader.metadata().file_metadata().key_value_metadata();
    let get = |key: &str| {
        kv.and_then(|kv| kv.iter().find(|e| e.key == key))
            .and_then(|e| e.value.clone())
    };
    match get(SCHEMA_VERSION_KEY) {
        Some(v) if schema::READABLE_VERSIONS.contains(&v.as_str()) => {}
        Some(v) => return Err(format!("schema version {v} is unknown to this build")),
        None => return Err("no lumen.schema_version: not written by Lumen".into()),
    }
    Ok(get(WAL_LSN_KEY).and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Streams `batches` into one Parquet file, one write per batch (no concatenation).
fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    last_lsn: u64,
) -> Result<(), StoreError> {
    let tmp = path.with_extension("parquet.tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(
                SCHEMA_VERSION_KEY.to_string(),
                schema::SCHEMA_VERSION.to_string(),
            ),
            KeyValue::new(WAL_LSN_KEY.to_string(), last_lsn.to_string()),
        ]))
        .build();
    let parquet_err = |source| StoreError::Parquet {
        path: tmp.clone(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_err)?;
    for batch in batches {
        writer.write(batch).map_err(parquet_err)?;
    }
    let file = writer.into_inner().map_err(parquet_err)?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        wal::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_to_batch;
    use crate::query::QueryEngine;
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
        let req = request(n, seed);
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
        assert!(file.extension().is_some_and(|e| e == "parquet"));
        let snap = store.spans.snapshot().expect("snapshot");
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
        assert_eq!(reopened.spans.snapshot().expect("snapshot").files.len(), 2);
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
    async fn unreadable_and_unknown_version_files_are_quarantined() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        ingest(&store, 2, 1).await;
        store.flush().await.expect("flush");
        drop(store);
        std::fs::write(dir.path().join("spans/garbage.parquet"), b"PAR1 nope").expect("write");
        let reopened = Arc::new(Store::open(dir.path()).expect("reopen despite a bad file"));
        assert_eq!(reopened.quarantined.len(), 1, "{:?}", reopened.quarantined);
        assert!(dir.path().join("quarantine/spans/garbage.parquet").exists());
        assert_eq!(
            count(reopened).await,
            2,
            "queries go on over the good files"
        );
    }
}
