//! The columnar store: per table, an in-memory list of Arrow batches (the memtable) and the
//! Parquet files it has been flushed to. Readers take a snapshot (files + batches) under the
//! same lock flushes swap under, so a row is always seen exactly once.
//!
//! Write path: receiver → [`Table::append`] → memtable → [`Table::flush`] → Parquet (zstd) in
//! `<data>/<table>/`. Read path: [`Table::snapshot`] → `crate::table::SnapshotTable`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;

use crate::schema;

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
    #[error("store lock poisoned")]
    Poisoned,
}

/// One table: schema, directory, memtable and flushed files.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub schema: SchemaRef,
    dir: PathBuf,
    state: Mutex<TableState>,
    flush_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct TableState {
    mem: Vec<RecordBatch>,
    files: Vec<PathBuf>,
    seq: u64,
}

/// What a query reads: immutable files plus the batches not yet flushed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub files: Vec<PathBuf>,
    pub batches: Vec<RecordBatch>,
}

/// The tables of one data directory.
#[derive(Debug)]
pub struct Store {
    pub spans: Arc<Table>,
    pub metrics: Arc<Table>,
}

impl Store {
    /// Opens (creating if needed) a data directory, picking up Parquet files already there.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Store {
            spans: Arc::new(Table::open(&dir, "spans", schema::SPANS.clone())?),
            metrics: Arc::new(Table::open(&dir, "metrics", schema::METRICS.clone())?),
        })
    }

    pub fn tables(&self) -> [&Arc<Table>; 2] {
        [&self.spans, &self.metrics]
    }

    /// Flushes every table's memtable to Parquet.
    pub async fn flush(&self) -> Result<(), StoreError> {
        for table in self.tables() {
            table.flush().await?;
        }
        Ok(())
    }
}

impl Table {
    fn open(root: &Path, name: &'static str, schema: SchemaRef) -> Result<Table, StoreError> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        files.sort();
        Ok(Table {
            name,
            schema,
            dir,
            state: Mutex::new(TableState {
                seq: files.len() as u64,
                files,
                ..Default::default()
            }),
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Adds a batch to the memtable; it is queryable at once.
    pub fn append(&self, batch: RecordBatch) -> Result<(), StoreError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        state.mem.push(batch);
        Ok(())
    }

    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(Snapshot {
            files: state.files.clone(),
            batches: state.mem.clone(),
        })
    }

    /// Writes the memtable to a new Parquet file (written aside, then renamed into place)
    /// and swaps the flushed batches for the file. Returns the file, if any rows were written.
    pub async fn flush(&self) -> Result<Option<PathBuf>, StoreError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        let (batches, seq) = {
            let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
            if state.mem.is_empty() {
                return Ok(None);
            }
            state.seq += 1;
            (state.mem.clone(), state.seq)
        };
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let path = self.dir.join(format!("{millis:013}-{seq:06}.parquet"));
        let schema = self.schema.clone();
        let table = self.name.to_string();
        let write_path = path.clone();
        let n = batches.len();
        tokio::task::spawn_blocking(move || write_parquet(&write_path, &schema, &table, &batches))
            .await
            .map_err(|e| StoreError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let mut state = self.state.lock().map_err(|_| StoreError::Poisoned)?;
        let flushed_rows: usize = state.mem.drain(..n).map(|b| b.num_rows()).sum();
        state.files.push(path.clone());
        tracing::debug!(table = self.name, rows = flushed_rows, file = %path.display(), "flushed memtable");
        Ok(Some(path))
    }
}

fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    table: &str,
    batches: &[RecordBatch],
) -> Result<(), StoreError> {
    let batch = concat_batches(schema, batches).map_err(|source| StoreError::Arrow {
        table: table.to_string(),
        source,
    })?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(|source| StoreError::Io {
        path: tmp.clone(),
        source,
    })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "lumen.schema_version".to_string(),
            schema::SCHEMA_VERSION.to_string(),
        )]))
        .build();
    let parquet_err = |source| StoreError::Parquet {
        path: tmp.clone(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    let file = writer.into_inner().map_err(parquet_err)?;
    file.sync_all().map_err(|source| StoreError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::spans_to_batch;
    use crate::query::QueryEngine;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn batch(n: u8) -> RecordBatch {
        let spans = (0..n)
            .map(|i| Span {
                trace_id: vec![i + 1; 16],
                span_id: vec![i + 1; 8],
                ..Default::default()
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
        spans_to_batch(&req).expect("converts")
    }

    async fn count(store: Arc<Store>) -> i64 {
        let r = QueryEngine::new(store)
            .sql("SELECT count(*) AS n FROM spans")
            .await
            .expect("query");
        r.rows[0]["n"].as_i64().expect("n")
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
        store.spans.append(batch(3)).expect("append");
        store.spans.append(batch(2)).expect("append");
        assert_eq!(count(store.clone()).await, 5, "memtable rows are queryable");
        let file = store.spans.flush().await.expect("flush").expect("a file");
        assert!(file.extension().is_some_and(|e| e == "parquet"));
        let snap = store.spans.snapshot().expect("snapshot");
        assert_eq!((snap.files.len(), snap.batches.len()), (1, 0));
        store.spans.append(batch(4)).expect("append");
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
        let leftovers = std::fs::read_dir(dir.path().join("spans"))
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "no temporary files left behind");
    }
}
