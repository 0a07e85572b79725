//! One table of the store: its memtable, its Parquet files as its manifest lists them, and
//! the maintenance that changes that list (flush, compaction, retention). Every change of
//! the file list happens under the table's maintenance lock in the same order: write the new
//! file(s) aside and rename them in, replace the manifest, then swap the in-memory state
//! under the state lock. Files taken out of the list are deleted only after a grace period,
//! so a query that took its snapshot before the swap can still read them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute;
use datafusion::arrow::datatypes::{SchemaRef, TimestampNanosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;

use super::{StoreError, StoreOptions, order, splice, upgrade};
use crate::budget::Reservation;
use crate::manifest::{self, DataFile, SCHEMA_VERSION_KEY, WAL_LSN_KEY};
use crate::remote::{PeerFile, Remote};
use crate::{rollup, schema};

/// One table: schema, directory, memtable and files.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    /// The id WAL records name this table by (a format contract).
    pub id: u8,
    pub schema: SchemaRef,
    /// The timestamp column files are pruned and retained by.
    pub time_column: &'static str,
    dir: PathBuf,
    state: Mutex<TableState>,
    /// Held by whatever changes the file list: flush, compaction, retention.
    maintenance: tokio::sync::Mutex<()>,
    options: StoreOptions,
    /// Files out of the manifest, deleted once their grace period is over.
    obsolete: Mutex<Vec<(PathBuf, Instant)>>,
    pub stats: TableStats,
    /// Shared by the tables of a store: a flush that moves rows between two tables' views
    /// (spans to their rollups) swaps both under the write side; a snapshot that reads two
    /// tables (rollups and the spans memtable) takes the read side.
    view: Arc<RwLock<()>>,
    /// The table this one's flushes derive rows into (spans: rollups).
    derived: OnceLock<Arc<Table>>,
    /// The table whose memtable this one's snapshots derive live rows from (rollups: spans).
    live_source: OnceLock<Weak<Table>>,
    /// The bucket this table's files are published to, if any (`crate::remote`).
    remote: OnceLock<Arc<Remote>>,
    shared: Mutex<SharedState>,
}

/// What a table knows of the bucket.
#[derive(Debug, Default)]
struct SharedState {
    /// Other writers' files, as of the last refresh.
    peers: Vec<PeerFile>,
    /// The manifest in the bucket is behind the local one (a publish failed).
    manifest_behind: bool,
    /// This writer's objects to delete from the bucket once their grace is over.
    deletions: Vec<(String, Instant)>,
}

/// What a table is: its name (and directory), WAL id, schema and time column.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: &'static str,
    pub id: u8,
    pub schema: SchemaRef,
    pub time_column: &'static str,
}

/// Counters of a table's maintenance, for the service's own metrics.
#[derive(Debug, Default)]
pub struct TableStats {
    pub rows_ingested: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_micros: AtomicU64,
    pub flush_failures: AtomicU64,
    pub compactions: AtomicU64,
    pub compaction_micros: AtomicU64,
    /// Compactions that copied their inputs' row groups instead of re-encoding them.
    pub compactions_spliced: AtomicU64,
    pub files_expired: AtomicU64,
    pub remote_uploads: AtomicU64,
    pub remote_upload_bytes: AtomicU64,
    pub remote_failures: AtomicU64,
}

#[derive(Debug, Default)]
struct TableState {
    mem: Vec<Buffered>,
    files: Vec<DataFile>,
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
    pub dir: PathBuf,
    pub files: Vec<DataFile>,
    pub batches: Vec<RecordBatch>,
    /// Other writers' files in the bucket.
    pub peer_files: Vec<PeerFile>,
}

impl Snapshot {
    pub fn path(&self, file: &DataFile) -> PathBuf {
        self.dir.join(&file.name)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Table {
    /// Opens a table's directory through its manifest: files it names that are missing or
    /// of the wrong size are quarantined, files it does not name are orphans and deleted. A
    /// table without a manifest (written before there was one) gets one from its files'
    /// footers, quarantining those that cannot be read.
    pub(super) fn open(
        root: &Path,
        spec: TableSpec,
        options: StoreOptions,
        view: Arc<RwLock<()>>,
        quarantined: &mut Vec<(PathBuf, String)>,
    ) -> Result<Table, StoreError> {
        let TableSpec {
            name,
            id,
            schema,
            time_column,
        } = spec;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                // A flush, compaction or manifest write that died before its rename.
                std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        let on_disk = manifest::parquet_files(&dir).map_err(io(&dir))?;
        let mut quarantine = |path: &Path, reason: String| -> Result<(), StoreError> {
            let aside = root.join("quarantine").join(name);
            std::fs::create_dir_all(&aside).map_err(io(&aside))?;
            let target = aside.join(path.file_name().unwrap_or_default());
            if path.exists() {
                std::fs::rename(path, &target).map_err(io(path))?;
            }
            tracing::error!(file = %path.display(), moved_to = %target.display(), reason = %reason, "Parquet file quarantined, queries go on without it");
            quarantined.push((target, reason));
            Ok(())
        };
        let listed = manifest::read(&dir, name).unwrap_or_else(|e| {
            tracing::error!(table = name, error = %e, "manifest unreadable, rebuilding it from the files' footers");
            None
        });
        let mut files = Vec::new();
        let rewrite;
        match listed {
            Some(listed) => {
                rewrite = listed.len();
                for file in listed {
                    let path = dir.join(&file.name);
                    match std::fs::metadata(&path) {
                        Ok(m) if m.len() == file.bytes => files.push(file),
                        Ok(m) => quarantine(
                            &path,
                            format!("{} bytes, the manifest says {}", m.len(), file.bytes),
                        )?,
                        Err(e) => quarantine(&path, format!("listed in the manifest: {e}"))?,
                    }
                }
                for path in on_disk {
                    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    if !files.iter().any(|f| Some(&f.name) == file_name.as_ref()) {
                        match std::fs::remove_file(&path) {
                            Ok(()) => {
                                tracing::warn!(file = %path.display(), "orphan Parquet file (not in the manifest) deleted: its rows are in the WAL or in the files it was to replace")
                            }
                            // Quarantined above.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(io(&path)(e)),
                        }
                    }
                }
            }
            None => {
                rewrite = usize::MAX;
                for path in on_disk {
                    match manifest::describe(&path, time_column) {
                        Ok(file) => files.push(file),
                        Err(reason) => quarantine(&path, reason)?,
                    }
                }
            }
        }
        // Files of an older layout are rewritten into the current one, so queries, merges
        // and the Parquet readers only ever meet one layout. New file in, manifest, then
        // the old file out: a crash in between leaves an orphan or an old file to redo.
        let mut upgraded = Vec::new();
        let mut kept = Vec::with_capacity(files.len());
        for file in files {
            if file.schema_version == schema::SCHEMA_VERSION {
                kept.push(file);
                continue;
            }
            let src = dir.join(&file.name);
            let stem = file.name.trim_end_matches(".parquet");
            let new_name = format!("{stem}-v{}.parquet", schema::SCHEMA_VERSION);
            let promoted = upgrade::promoted(name);
            let conformed = read_parquet(&src).map(|b| {
                b.and_then(|b| {
                    upgrade::conform_batch(&b, &schema, promoted).map_err(|source| {
                        StoreError::Arrow {
                            table: name.to_string(),
                            source,
                        }
                    })
                })
            });
            match write_parquet(&dir.join(&new_name), &schema, conformed, file.max_lsn) {
                Ok(bytes) => {
                    tracing::info!(table = name, file = %file.name, from = %file.schema_version, to = schema::SCHEMA_VERSION, "file rewritten into the current layout");
                    upgraded.push(src);
                    kept.push(DataFile {
                        name: new_name,
                        bytes,
                        schema_version: schema::SCHEMA_VERSION.to_string(),
                        ..file
                    });
                }
                Err(e) => {
                    let _ = std::fs::remove_file(dir.join(&new_name));
                    quarantine(
                        &src,
                        format!(
                            "rewriting layout {} as {}: {e}",
                            file.schema_version,
                            schema::SCHEMA_VERSION
                        ),
                    )?;
                }
            }
        }
        let files = kept;
        if files.len() != rewrite || !upgraded.is_empty() {
            manifest::write(&dir, name, &files).map_err(io(&dir))?;
        }
        for old in upgraded {
            std::fs::remove_file(&old).map_err(io(&old))?;
        }
        let flushed_lsn = files.iter().map(|f| f.max_lsn).max().unwrap_or(0);
        Ok(Table {
            name,
            id,
            schema,
            time_column,
            dir,
            state: Mutex::new(TableState {
                files,
                flushed_lsn,
                ..Default::default()
            }),
            maintenance: tokio::sync::Mutex::new(()),
            options,
            obsolete: Mutex::new(Vec::new()),
            stats: TableStats::default(),
            view,
            derived: OnceLock::new(),
            live_source: OnceLock::new(),
            remote: OnceLock::new(),
            shared: Mutex::new(SharedState::default()),
        })
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes this table to `remote` from now on, after bringing the bucket in line
    /// with the local manifest: local files the bucket lacks are uploaded, the manifest
    /// published, and this writer's objects the manifest does not name are deleted after
    /// the grace period (a peer may still be reading them).
    pub(super) async fn attach_remote(&self, remote: Arc<Remote>) -> Result<(), StoreError> {
        let _maintenance = self.maintenance.lock().await;
        let _ = self.remote.set(remote.clone());
        let there = remote.own_files(self.name).await?;
        let files = self.files();
        for f in files.iter().filter(|f| !there.contains(&f.name)) {
            self.upload(f).await?;
        }
        remote.put_manifest(self.name, &files).await?;
        let at = Instant::now() + self.options.delete_grace;
        let mut shared = self.shared();
        for name in there {
            if !files.iter().any(|f| f.name == name) {
                shared.deletions.push((name, at));
            }
        }
        Ok(())
    }

    /// Uploads one of this table's local files to the bucket, if there is one.
    async fn upload(&self, file: &DataFile) -> Result<(), StoreError> {
        let Some(remote) = self.remote.get() else {
            return Ok(());
        };
        match remote
            .upload(self.name, &self.dir.join(&file.name), &file.name)
            .await
        {
            Ok(()) => {
                self.stats.remote_uploads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .remote_upload_bytes
                    .fetch_add(file.bytes, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.remote_failures.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// Publishes the local manifest to the bucket. A failure is logged and retried at the
    /// next maintenance: the local state has already moved on, and the bucket's manifest
    /// still names only files that are there (retired ones stay until their grace ends).
    async fn publish_manifest(&self) {
        let Some(remote) = self.remote.get() else {
            return;
        };
        let files = self.files();
        match remote.put_manifest(self.name, &files).await {
            Ok(()) => self.shared().manifest_behind = false,
            Err(e) => {
                self.stats.remote_failures.fetch_add(1, Ordering::Relaxed);
                self.shared().manifest_behind = true;
                tracing::error!(table = self.name, error = %e, "publishing the manifest to the bucket failed, retried at the next maintenance");
            }
        }
    }

    /// Bucket upkeep: republishes a manifest that is behind, deletes retired objects whose
    /// grace is over and re-reads the other writers' manifests.
    pub(super) async fn sync_remote(&self) -> Result<(), StoreError> {
        let Some(remote) = self.remote.get() else {
            return Ok(());
        };
        if self.shared().manifest_behind {
            let _maintenance = self.maintenance.lock().await;
            self.publish_manifest().await;
        }
        let now = Instant::now();
        let due: Vec<String> = {
            let mut shared = self.shared();
            let (due, keep): (Vec<_>, Vec<_>) =
                shared.deletions.drain(..).partition(|(_, at)| *at <= now);
            shared.deletions = keep;
            due.into_iter().map(|(n, _)| n).collect()
        };
        for (i, name) in due.iter().enumerate() {
            if let Err(e) = remote.delete(self.name, name).await {
                self.stats.remote_failures.fetch_add(1, Ordering::Relaxed);
                // Try again next time, with the ones not reached.
                let mut shared = self.shared();
                shared
                    .deletions
                    .extend(due[i..].iter().map(|n| (n.clone(), now)));
                return Err(e.into());
            }
        }
        match remote.peer_files(self.name).await {
            Ok(peers) => {
                self.shared().peers = peers;
                Ok(())
            }
            Err(e) => {
                self.stats.remote_failures.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// Makes `rollups` the rollup table of `spans`: each spans flush writes the rollup of
    /// what it flushed there, and rollup snapshots add the rollup of the spans memtable.
    pub(super) fn link_rollups(spans: &Arc<Table>, rollups: &Arc<Table>) {
        let _ = spans.derived.set(rollups.clone());
        let _ = rollups.live_source.set(Arc::downgrade(spans));
    }

    /// Drops the files holding rows derived from WAL records above `lsn`: the source rows
    /// were not durably flushed, will be replayed and derived again. Returns how many.
    pub(super) fn drop_above(&self, lsn: u64) -> Result<usize, StoreError> {
        let files = self.files();
        let (keep, drop): (Vec<DataFile>, Vec<DataFile>) =
            files.into_iter().partition(|f| f.max_lsn <= lsn);
        if drop.is_empty() {
            return Ok(0);
        }
        manifest::write(&self.dir, self.name, &keep).map_err(io(&self.dir))?;
        for f in &drop {
            let path = self.dir.join(&f.name);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(io(&path)(e));
            }
            tracing::warn!(table = self.name, file = %f.name, "derived rows of an unfinished flush dropped, they are derived again from the WAL");
        }
        self.state().files = keep;
        Ok(drop.len())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TableState> {
        // A poisoned lock means a reader panicked mid-clone; the state itself is intact.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a durable batch to the memtable; it is queryable at once.
    pub(super) fn push(&self, lsn: u64, batch: RecordBatch, reservation: Reservation) {
        if batch.num_rows() == 0 {
            return;
        }
        self.state().mem.push(Buffered {
            lsn,
            batch,
            _reservation: reservation,
        });
    }

    pub(super) fn flushed_lsn(&self) -> u64 {
        self.state().flushed_lsn
    }

    pub(super) fn first_buffered_lsn(&self) -> Option<u64> {
        self.state().mem.first().map(|b| b.lsn)
    }

    /// Bytes the memtable's batches hold (their reservations).
    pub fn buffered_bytes(&self) -> usize {
        self.state()
            .mem
            .iter()
            .map(|b| b._reservation.bytes())
            .sum()
    }

    /// Rows in the memtable.
    pub fn buffered_rows(&self) -> usize {
        self.state().mem.iter().map(|b| b.batch.num_rows()).sum()
    }

    /// The files the manifest lists.
    pub fn files(&self) -> Vec<DataFile> {
        self.state().files.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        let (files, mut batches, source_mem) = {
            let _view = self.view.read().unwrap_or_else(|p| p.into_inner());
            let state = self.state();
            let source_mem: Vec<RecordBatch> = self
                .live_source
                .get()
                .and_then(Weak::upgrade)
                .map(|source| source.state().mem.iter().map(|b| b.batch.clone()).collect())
                .unwrap_or_default();
            let mem: Vec<RecordBatch> = state.mem.iter().map(|b| b.batch.clone()).collect();
            (state.files.clone(), mem, source_mem)
        };
        if !source_mem.is_empty() {
            match rollup::rollup(&source_mem) {
                Ok(Some(live)) => batches.push(live),
                Ok(None) => {}
                Err(e) => tracing::error!(table = self.name, error = %e, "rolling up the memtable"),
            }
        }
        Snapshot {
            dir: self.dir.clone(),
            files,
            batches,
            peer_files: self.shared().peers.clone(),
        }
    }

    /// Writes the memtable to a new Parquet file, adds it to the manifest and swaps the
    /// flushed batches for it. Returns the file, if any rows were written.
    pub async fn flush(&self) -> Result<Option<DataFile>, StoreError> {
        let _maintenance = self.maintenance.lock().await;
        if !self.options.flush_delay.is_zero() && self.first_buffered_lsn().is_some() {
            tokio::time::sleep(self.options.flush_delay).await;
        }
        let (batches, first_lsn, last_lsn) = {
            let state = self.state();
            let (Some(first), Some(last)) = (state.mem.first(), state.mem.last()) else {
                return Ok(None);
            };
            let batches: Vec<RecordBatch> = state.mem.iter().map(|b| b.batch.clone()).collect();
            (batches, first.lsn, last.lsn)
        };
        let started = Instant::now();
        let n = batches.len();
        let derived = self.derived.get().is_some().then(|| batches.clone());
        let written = match self.write_file(batches, first_lsn, last_lsn).await {
            Ok(file) => self.upload(&file).await.map(|()| file),
            Err(e) => Err(e),
        };
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let derived = match derived {
            Some(batches) => {
                blocking(&self.dir, move |_| {
                    rollup::rollup(&batches).map_err(|source| StoreError::Arrow {
                        table: "rollups".into(),
                        source,
                    })
                })
                .await?
            }
            None => None,
        };
        // The derived rows' file and manifest go first: a crash before this table's manifest
        // leaves them above its flushed LSN, and Store::open drops them.
        let target = self.derived.get().filter(|_| derived.is_some());
        let _target_maintenance = match target {
            Some(t) => Some(t.maintenance.lock().await),
            None => None,
        };
        let mut target_files = None;
        if let (Some(target), Some(batch)) = (target, derived) {
            let added = target.write_file(vec![batch], first_lsn, last_lsn).await?;
            target.upload(&added).await?;
            let mut list = target.files();
            list.push(added);
            target.replace_manifest(&list).await?;
            target_files = Some(list);
        }
        let mut files = self.files();
        files.push(file.clone());
        self.replace_manifest(&files).await?;
        {
            let _view = self.view.write().unwrap_or_else(|p| p.into_inner());
            if let (Some(target), Some(list)) = (target, target_files) {
                target.state().files = list;
            }
            let mut state = self.state();
            state.mem.drain(..n);
            state.files = files;
            state.flushed_lsn = state.flushed_lsn.max(last_lsn);
        }
        if let Some(target) = target {
            target.publish_manifest().await;
        }
        self.publish_manifest().await;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .flush_micros
            .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
        tracing::debug!(table = self.name, rows = file.rows, file = %file.name, "flushed memtable");
        Ok(Some(file))
    }

    /// Writes `batches` as a new level-0 file of this table (not yet in its manifest).
    async fn write_file(
        &self,
        batches: Vec<RecordBatch>,
        first_lsn: u64,
        last_lsn: u64,
    ) -> Result<DataFile, StoreError> {
        let name = format!("{first_lsn:020}-{last_lsn:020}.parquet");
        let path = self.dir.join(&name);
        let (schema, time_column, table) = (self.schema.clone(), self.time_column, self.name);
        blocking(&path, move |path| {
            let (min, max) = time_range(&batches, time_column);
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            let arrow = |source| StoreError::Arrow {
                table: table.to_string(),
                source,
            };
            let sorted = order::sorted(batches, time_column).map_err(arrow)?;
            let bytes = write_parquet(path, &schema, sorted.map(|b| b.map_err(arrow)), last_lsn)?;
            Ok(DataFile {
                name,
                rows,
                bytes,
                min_time_ns: min,
                max_time_ns: max,
                max_lsn: last_lsn,
                created_ns: crate::now_ns(),
                schema_version: schema::SCHEMA_VERSION.to_string(),
                level: 0,
            })
        })
        .await
    }

    /// Merges the oldest files of the lowest level that has `compact_min_files` of them (at
    /// most `compact_max_files`, at most `compact_target_bytes` together) into one file of
    /// the next level. Returns the new file, if it made one.
    pub async fn compact(&self) -> Result<Option<DataFile>, StoreError> {
        let _maintenance = self.maintenance.lock().await;
        let files = self.files();
        let opts = self.options;
        let Some(inputs) = pick_compaction(&files, &opts) else {
            return Ok(None);
        };
        let started = Instant::now();
        let level = inputs[0].level + 1;
        let max_lsn = inputs.iter().map(|f| f.max_lsn).max().unwrap_or(0);
        let min_lsn = inputs.iter().map(|f| f.max_lsn).min().unwrap_or(0);
        let name = format!("L{level}-{min_lsn:020}-{max_lsn:020}.parquet");
        let path = self.dir.join(&name);
        let sources: Vec<(i64, PathBuf)> = inputs
            .iter()
            .map(|f| (f.min_time_ns, self.dir.join(&f.name)))
            .collect();
        let schema = self.schema.clone();
        let merged = DataFile {
            name,
            rows: inputs.iter().map(|f| f.rows).sum(),
            bytes: 0,
            min_time_ns: inputs
                .iter()
                .map(|f| f.min_time_ns)
                .min()
                .unwrap_or(i64::MIN),
            max_time_ns: inputs
                .iter()
                .map(|f| f.max_time_ns)
                .max()
                .unwrap_or(i64::MAX),
            max_lsn,
            created_ns: inputs.iter().map(|f| f.created_ns).max().unwrap_or(0),
            schema_version: schema::SCHEMA_VERSION.to_string(),
            level,
        };
        let (time_column, table) = (self.time_column, self.name);
        let spliceable = splice::current_layout(&inputs);
        let (bytes, spliced) = blocking(&path, move |path| {
            // Inputs in big row groups: their row groups are copied as they are (no decode,
            // no encode), in time order.
            if spliceable {
                let mut by_time = sources.clone();
                by_time.sort_by_key(|(min, _)| *min);
                let paths: Vec<PathBuf> = by_time.into_iter().map(|(_, p)| p).collect();
                if let Some(mut parts) = splice::plan(&paths)? {
                    // Small row groups (a quiet flush's) are merged as streams (each is sorted)
                    // and written anew as one more input; the big ones are copied.
                    let small: Vec<(PathBuf, Vec<usize>)> = parts
                        .iter_mut()
                        .map(|p| (p.path.clone(), p.take_small().0))
                        .filter(|(_, rgs)| !rgs.is_empty())
                        .collect();
                    if parts.iter().any(|p| !p.row_groups.is_empty()) {
                        let side = path.with_extension("side.tmp");
                        if !small.is_empty() {
                            // Each small row group an input, opened when the merge gets to it
                            // (its file's first time is a lower bound of its own).
                            let first_time = |src: &PathBuf| {
                                sources
                                    .iter()
                                    .find(|(_, p)| p == src)
                                    .map_or(i64::MIN, |(min, _)| *min)
                            };
                            let inputs = small
                                .into_iter()
                                .flat_map(|(src, rgs)| {
                                    let min = first_time(&src);
                                    rgs.into_iter().map(move |rg| {
                                        let src = src.clone();
                                        (min, move || {
                                            read_row_groups(&src, Some(vec![rg]))
                                                .map(|b| b.map_err(external))
                                        })
                                    })
                                })
                                .collect();
                            let rows = order::Merge::new(inputs, time_column).map(|b| {
                                b.map_err(|source| StoreError::Arrow {
                                    table: table.to_string(),
                                    source,
                                })
                            });
                            write_parquet(&side, &schema, rows, max_lsn)?;
                            parts.extend(
                                splice::plan(std::slice::from_ref(&side))?.unwrap_or_default(),
                            );
                        }
                        let spliced = splice::splice(path, &parts, max_lsn);
                        if side.exists() {
                            let _ = std::fs::remove_file(&side);
                        }
                        return spliced.map(|b| (b, true));
                    }
                }
            }
            // Each input is sorted by time (files of an older layout may not be; their rows
            // are merged all the same, only less ordered).
            let inputs = sources
                .into_iter()
                .map(|(min, src)| (min, move || read_parquet(&src).map(|b| b.map_err(external))))
                .collect();
            let merged = order::Merge::new(inputs, time_column).map(|b| {
                b.map_err(|source| StoreError::Arrow {
                    table: table.to_string(),
                    source,
                })
            });
            write_parquet(path, &schema, merged, max_lsn).map(|b| (b, false))
        })
        .await?;
        if spliced {
            self.stats
                .compactions_spliced
                .fetch_add(1, Ordering::Relaxed);
        }
        let merged = DataFile { bytes, ..merged };
        self.upload(&merged).await?;
        let names: Vec<&str> = inputs.iter().map(|f| f.name.as_str()).collect();
        let mut next: Vec<DataFile> = files
            .iter()
            .filter(|f| !names.contains(&f.name.as_str()))
            .cloned()
            .collect();
        next.push(merged.clone());
        self.replace_manifest(&next).await?;
        self.state().files = next;
        self.retire(inputs.iter().map(|f| f.name.clone()));
        self.publish_manifest().await;
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .compaction_micros
            .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
        tracing::info!(table = self.name, inputs = inputs.len(), rows = merged.rows, bytes = merged.bytes, file = %merged.name, spliced, "compacted");
        Ok(Some(merged))
    }

    /// Drops whole files past the retention: those whose rows were all stored longer than
    /// `retention_age` before `now_ns`, then the oldest until the table fits in
    /// `retention_bytes`. Returns how many files it dropped.
    pub async fn expire(&self, now_ns: i64) -> Result<usize, StoreError> {
        let _maintenance = self.maintenance.lock().await;
        let mut files = self.files();
        let before = files.len();
        let mut dropped = Vec::new();
        if let Some(age) = self.options.retention_age {
            let cutoff = now_ns.saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX));
            files.retain(|f| {
                let keep = f.created_ns >= cutoff;
                if !keep {
                    dropped.push(f.name.clone());
                }
                keep
            });
        }
        if let Some(cap) = self.options.retention_bytes {
            files.sort_by_key(|f| f.created_ns);
            let mut total: u64 = files.iter().map(|f| f.bytes).sum();
            while total > cap && !files.is_empty() {
                let f = files.remove(0);
                total -= f.bytes;
                dropped.push(f.name);
            }
        }
        if files.len() == before {
            return Ok(0);
        }
        self.replace_manifest(&files).await?;
        self.state().files = files;
        let n = dropped.len();
        self.retire(dropped.into_iter());
        self.publish_manifest().await;
        self.stats
            .files_expired
            .fetch_add(n as u64, Ordering::Relaxed);
        tracing::info!(table = self.name, files = n, "files past retention dropped");
        Ok(n)
    }

    /// Deletes the retired files whose grace period is over.
    pub fn sweep(&self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = {
            let mut obsolete = self.obsolete.lock().unwrap_or_else(|p| p.into_inner());
            let (due, keep): (Vec<_>, Vec<_>) = obsolete.drain(..).partition(|(_, at)| *at <= now);
            *obsolete = keep;
            due.into_iter().map(|(p, _)| p).collect()
        };
        for path in due {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %path.display(), error = %e, "deleting a retired file");
            }
        }
    }

    fn retire(&self, names: impl Iterator<Item = String>) {
        let at = Instant::now() + self.options.delete_grace;
        let names: Vec<String> = names.collect();
        if self.remote.get().is_some() {
            self.shared()
                .deletions
                .extend(names.iter().map(|n| (n.clone(), at)));
        }
        let mut obsolete = self.obsolete.lock().unwrap_or_else(|p| p.into_inner());
        obsolete.extend(names.into_iter().map(|n| (self.dir.join(n), at)));
    }

    async fn replace_manifest(&self, files: &[DataFile]) -> Result<(), StoreError> {
        let (dir, name, files) = (self.dir.clone(), self.name, files.to_vec());
        let path = dir.join(manifest::MANIFEST_FILE);
        blocking(&path, move |_| {
            manifest::write(&dir, name, &files).map_err(|source| StoreError::Io {
                path: dir.join(manifest::MANIFEST_FILE),
                source,
            })
        })
        .await
    }
}

/// The inputs of the next compaction, if one is due.
fn pick_compaction(files: &[DataFile], opts: &StoreOptions) -> Option<Vec<DataFile>> {
    let mut levels: Vec<u32> = files.iter().map(|f| f.level).collect();
    levels.sort_unstable();
    levels.dedup();
    for level in levels {
        let mut picked = Vec::new();
        let mut bytes = 0u64;
        for f in files
            .iter()
            .filter(|f| f.level == level && f.schema_version == schema::SCHEMA_VERSION)
        {
            if picked.len() >= opts.compact_max_files
                || (!picked.is_empty() && bytes + f.bytes > opts.compact_target_bytes)
            {
                break;
            }
            bytes += f.bytes;
            picked.push(f.clone());
        }
        if picked.len() >= opts.compact_min_files.max(2) {
            return Some(picked);
        }
    }
    None
}

/// A store error carried through an Arrow iterator.
fn external(e: StoreError) -> datafusion::arrow::error::ArrowError {
    datafusion::arrow::error::ArrowError::ExternalError(Box::new(e))
}

/// Runs file work off the async threads, naming `path` if the task itself fails.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce(&Path) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || work(&owned))
        .await
        .map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Smallest and largest value of a timestamp column over `batches`.
fn time_range(batches: &[RecordBatch], column: &str) -> (i64, i64) {
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for batch in batches {
        let Some(col) = batch.column_by_name(column) else {
            return (i64::MIN, i64::MAX);
        };
        let Some(ts) = col.as_primitive_opt::<TimestampNanosecondType>() else {
            return (i64::MIN, i64::MAX);
        };
        if ts.null_count() == ts.len() {
            continue;
        }
        if let (Some(a), Some(b)) = (compute::min(ts), compute::max(ts)) {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    (lo, hi)
}

/// The batches of one Parquet file, read a row group at a time.
/// The batches of one Parquet file: the given row groups, or all.
fn read_row_groups(
    path: &Path,
    row_groups: Option<Vec<usize>>,
) -> Box<dyn Iterator<Item = Result<RecordBatch, StoreError>>> {
    let parquet_err = |source| StoreError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = std::fs::File::open(path)
        .map_err(io(path))
        .and_then(|f| ParquetRecordBatchReaderBuilder::try_new(f).map_err(parquet_err))
        .and_then(|b| {
            match row_groups {
                Some(rgs) => b.with_row_groups(rgs).with_batch_size(order::CHUNK_ROWS),
                None => b,
            }
            .build()
            .map_err(parquet_err)
        });
    match reader {
        Ok(reader) => {
            let path = path.to_path_buf();
            Box::new(reader.map(move |b| {
                b.map_err(|source| StoreError::Arrow {
                    table: path.display().to_string(),
                    source,
                })
            }))
        }
        Err(e) => Box::new(std::iter::once(Err(e))),
    }
}

fn read_parquet(path: &Path) -> Box<dyn Iterator<Item = Result<RecordBatch, StoreError>>> {
    read_row_groups(path, None)
}

/// Encodings by column type: timestamps and durations (sorted or nearly, so their deltas
/// are small) are delta-encoded; ids and request ids (random, so a dictionary never pays)
/// are stored plain; everything else keeps Parquet's dictionary, which is what makes the
/// low-cardinality text columns (service, route, status, cluster) nearly free.
fn column_encodings(
    mut props: datafusion::parquet::file::properties::WriterPropertiesBuilder,
    schema: &SchemaRef,
) -> datafusion::parquet::file::properties::WriterPropertiesBuilder {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::parquet::basic::Encoding;
    use datafusion::parquet::schema::types::ColumnPath;
    // Leaf paths as the Arrow writer names them (lists' items are `list.item`).
    fn leaves(
        prefix: Vec<String>,
        field: &datafusion::arrow::datatypes::Field,
        out: &mut Vec<(Vec<String>, DataType, String)>,
    ) {
        let mut path = prefix;
        path.push(field.name().clone());
        match field.data_type() {
            DataType::List(item) => {
                path.push("list".into());
                leaves(path, item, out);
            }
            DataType::Struct(fields) => {
                for f in fields {
                    leaves(path.clone(), f, out);
                }
            }
            other => out.push((path, other.clone(), field.name().clone())),
        }
    }
    let mut all = Vec::new();
    for field in schema.fields() {
        leaves(Vec::new(), field, &mut all);
    }
    for (path, ty, name) in all {
        let column = ColumnPath::new(path);
        let delta = matches!(ty, DataType::Timestamp(..)) || name == "duration_ns";
        let plain = matches!(ty, DataType::FixedSizeBinary(_)) || name == "request_id";
        if delta {
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, Encoding::DELTA_BINARY_PACKED);
        } else if plain {
            props = props.set_column_dictionary_enabled(column, false);
        }
    }
    props
}

/// Streams `batches` into a new Parquet file at `path` (written aside, fsynced, renamed,
/// directory fsynced), one write per batch. Returns the file's size.
fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, StoreError>>,
    last_lsn: u64,
) -> Result<u64, StoreError> {
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let props = column_encodings(
        WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())),
        schema,
    )
    // Trace-by-id lookups skip the row groups whose filter says the id is not there.
    .set_column_bloom_filter_enabled("trace_id".into(), true)
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
        writer.write(&batch?).map_err(parquet_err)?;
    }
    let file = writer.into_inner().map_err(parquet_err)?;
    file.sync_all().map_err(io(&tmp))?;
    let bytes = file.metadata().map_err(io(&tmp))?.len();
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        crate::wal::sync_dir(dir)?;
    }
    Ok(bytes)
}
