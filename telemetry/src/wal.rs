//! The write-ahead log: every accepted export is appended here, and fsynced, before it is
//! acknowledged; rows reach the memtable only after that. On start the log is replayed into
//! the memtables, skipping what Parquet already holds.
//!
//! Layout: `<data>/wal/<first lsn:020>.wal` segments. A segment starts with the 8-byte magic
//! `LUMENWAL` and a little-endian `u32` format version; then records:
//!
//! ```text
//! u32 body length | u32 CRC-32 of the body | body = u64 lsn | u8 table | payload
//! ```
//!
//! all little-endian; the payload is the export request exactly as received (protobuf), so
//! replay goes through the same conversion as a live export. LSNs rise by one per record
//! across segments. A record that is short, fails its checksum or breaks the LSN order ends
//! what is read of its segment: the rest of that segment is reported and cut away.
//!
//! Group commit: one writer thread takes every request waiting in its queue, writes them in
//! one go and fsyncs once, so concurrent exports share the cost of an fsync.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// The magic at the start of each segment.
pub const MAGIC: &[u8; 8] = b"LUMENWAL";
/// Version of the record format, after the magic.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment header.
const HEADER: u64 = 12;
/// Bytes before a record's body: length and checksum.
const RECORD_HEAD: usize = 8;
/// Bytes of a body before its payload: LSN and table.
const BODY_HEAD: usize = 9;
/// Largest record body read back; anything longer is corruption.
pub const MAX_RECORD: usize = 256 * 1024 * 1024;
/// Most records written under one fsync.
const MAX_GROUP: usize = 4096;

/// Errors of the log, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write-ahead log stopped")]
    Closed,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub table: u8,
    pub payload: Bytes,
}

/// What replay found, for the start-up report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub segments: usize,
    pub records: usize,
    /// Bytes cut from segments whose tail was torn or corrupt, with the reason.
    pub cut: Vec<(PathBuf, u64, String)>,
    /// Highest LSN found (0 when the log is empty).
    pub last_lsn: u64,
}

/// A record waiting to be written; `apply` runs after the fsync, in LSN order, before the ack.
pub struct Pending {
    pub table: u8,
    pub payload: Bytes,
    pub apply: Box<dyn FnOnce(u64) + Send>,
    pub ack: oneshot::Sender<Result<u64, WalError>>,
}

/// The log's segments and its writer thread.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    tx: mpsc::Sender<Pending>,
    /// First LSN of each segment, oldest first; the last is being written.
    segments: Arc<Mutex<Vec<u64>>>,
    /// Records written and fsynced, and fsyncs done (for the service's own metrics).
    pub stats: Arc<WalStats>,
}

/// Counters of the log.
#[derive(Debug, Default)]
pub struct WalStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    /// The highest LSN written and applied.
    pub applied_lsn: AtomicU64,
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}.wal"))
}

/// Segments in `dir` by first LSN, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".wal")?.parse::<u64>().ok()
        })
        .collect();
    firsts.sort_unstable();
    Ok(firsts)
}

/// Reads every valid record of the log in `dir`, in order, calling `each`; cuts torn or
/// corrupt tails off their segments. Creates `dir` if needed.
pub fn replay(dir: &Path, mut each: impl FnMut(Record)) -> Result<ReplayReport, WalError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut report = ReplayReport::default();
    for first in list_segments(dir)? {
        let path = segment_path(dir, first);
        report.segments += 1;
        let (valid_end, len, reason) = read_segment(&path, &mut report.last_lsn, |r| {
            report.records += 1;
            each(r)
        })?;
        if let Some(reason) = reason {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            file.set_len(valid_end).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
            tracing::warn!(
                segment = %path.display(),
                cut_bytes = len - valid_end,
                kept_bytes = valid_end,
                reason = %reason,
                "write-ahead log tail was torn or corrupt, cut it off"
            );
            report.cut.push((path, len - valid_end, reason));
        }
    }
    Ok(report)
}

/// Reads one segment; returns where its valid part ends, its length, and why it stops
/// early (if it does).
fn read_segment(
    path: &Path,
    last_lsn: &mut u64,
    mut each: impl FnMut(Record),
) -> Result<(u64, u64, Option<String>), WalError> {
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER as usize];
    if len < HEADER || reader.read_exact(&mut header).is_err() {
        return Ok((0, len, Some("segment header is missing".into())));
    }
    if &header[..8] != MAGIC {
        return Ok((
            0,
            len,
            Some("not a write-ahead log segment (bad magic)".into()),
        ));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Ok((
            0,
            len,
            Some(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )),
        ));
    }
    let mut offset = HEADER;
    loop {
        if offset == len {
            return Ok((offset, len, None));
        }
        let mut head = [0u8; RECORD_HEAD];
        if reader.read_exact(&mut head).is_err() {
            return Ok((offset, len, Some("record header is torn".into())));
        }
        let body_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(BODY_HEAD..=MAX_RECORD).contains(&body_len)
            || offset + (RECORD_HEAD + body_len) as u64 > len
        {
            return Ok((
                offset,
                len,
                Some(format!("record of {body_len} bytes is torn")),
            ));
        }
        let mut body = vec![0u8; body_len];
        if reader.read_exact(&mut body).is_err() {
            return Ok((offset, len, Some("record body is torn".into())));
        }
        if crc32fast::hash(&body) != crc {
            return Ok((offset, len, Some("record checksum does not match".into())));
        }
        let mut lsn_bytes = [0u8; 8];
        lsn_bytes.copy_from_slice(&body[..8]);
        let lsn = u64::from_le_bytes(lsn_bytes);
        if lsn <= *last_lsn {
            return Ok((
                offset,
                len,
                Some(format!("record LSN {lsn} does not follow {}", *last_lsn)),
            ));
        }
        *last_lsn = lsn;
        let table = body[8];
        let payload = Bytes::from(body).slice(BODY_HEAD..);
        each(Record {
            lsn,
            table,
            payload,
        });
        offset += (RECORD_HEAD + body_len) as u64;
    }
}

/// A record's head: length, checksum, LSN and table, the bytes that go before its payload.
fn record_head(lsn: u64, table: u8, payload: &[u8]) -> [u8; RECORD_HEAD + BODY_HEAD] {
    let body_len = BODY_HEAD + payload.len();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(&[table]);
    hasher.update(payload);
    let mut head = [0u8; RECORD_HEAD + BODY_HEAD];
    head[..4].copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    head[4..8].copy_from_slice(&hasher.finalize().to_le_bytes());
    head[8..16].copy_from_slice(&lsn.to_le_bytes());
    head[16] = table;
    head
}

/// Writes every byte of `slices` (a vectored write, retried until done): the group's
/// payloads go to the file from where they are, without a copy into one buffer.
fn write_all_vectored(
    file: &mut File,
    mut slices: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Wal {
    /// Starts the writer on a new segment whose first LSN is `next_lsn` (older segments stay
    /// until [`Wal::remove_through`] says their records are in Parquet).
    pub fn start(
        dir: &Path,
        next_lsn: u64,
        segment_bytes: u64,
        queue: usize,
    ) -> Result<Wal, WalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = list_segments(dir)?;
        let next_lsn = next_lsn.max(1);
        let (file, path) = new_segment(dir, next_lsn)?;
        segments.retain(|&f| f != next_lsn);
        segments.push(next_lsn);
        let segments = Arc::new(Mutex::new(segments));
        let stats = Arc::new(WalStats::default());
        stats.applied_lsn.store(next_lsn - 1, Ordering::Release);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            path,
            written: HEADER,
            next_lsn,
            segment_bytes,
            segments: segments.clone(),
            stats: stats.clone(),
            heads: Vec::new(),
        };
        std::thread::Builder::new()
            .name("lumen-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(io(dir))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            tx,
            segments,
            stats,
        })
    }

    /// Appends a record, fsyncs it (with whatever else is waiting), runs `apply` with its LSN
    /// and returns the LSN. Waits for room in the writer's queue.
    pub async fn append(
        &self,
        table: u8,
        payload: Bytes,
        apply: Box<dyn FnOnce(u64) + Send>,
    ) -> Result<u64, WalError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Pending {
                table,
                payload,
                apply,
                ack,
            })
            .await
            .map_err(|_| WalError::Closed)?;
        done.await.map_err(|_| WalError::Closed)?
    }

    /// Deletes the segments all of whose records have LSN ≤ `durable` (they are in Parquet).
    /// The segment being written is never deleted.
    pub fn remove_through(&self, durable: u64) -> Result<usize, WalError> {
        let doomed: Vec<u64> = {
            let Ok(mut segments) = self.segments.lock() else {
                return Ok(0);
            };
            let mut doomed = Vec::new();
            while segments.len() > 1 && segments[1].saturating_sub(1) <= durable {
                doomed.push(segments.remove(0));
            }
            doomed
        };
        for first in &doomed {
            let path = segment_path(&self.dir, *first);
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }

    /// Bytes of every segment on disk.
    pub fn disk_bytes(&self) -> u64 {
        let firsts = self.segments.lock().map(|s| s.clone()).unwrap_or_default();
        firsts
            .iter()
            .filter_map(|f| std::fs::metadata(segment_path(&self.dir, *f)).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn new_segment(dir: &Path, first_lsn: u64) -> Result<(File, PathBuf), WalError> {
    let path = segment_path(dir, first_lsn);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(io(&path))?;
    let mut header = Vec::with_capacity(HEADER as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.write_all(&header).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

struct Writer {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    written: u64,
    next_lsn: u64,
    segment_bytes: u64,
    segments: Arc<Mutex<Vec<u64>>>,
    stats: Arc<WalStats>,
    /// The group's record heads, kept between groups.
    heads: Vec<[u8; RECORD_HEAD + BODY_HEAD]>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut group = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            self.commit(&mut group);
        }
        tracing::debug!("write-ahead log writer stopped");
    }

    /// Writes and fsyncs a group, then applies and acknowledges each record in LSN order.
    fn commit(&mut self, group: &mut Vec<Pending>) {
        if self.written > HEADER
            && self.written >= self.segment_bytes
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "write-ahead log rotation failed, writing on");
        }
        let first_lsn = self.next_lsn;
        self.heads.clear();
        self.heads.extend(
            group
                .iter()
                .enumerate()
                .map(|(i, p)| record_head(first_lsn + i as u64, p.table, &p.payload)),
        );
        let mut slices: Vec<std::io::IoSlice<'_>> = self
            .heads
            .iter()
            .zip(group.iter())
            .flat_map(|(head, p)| {
                [
                    std::io::IoSlice::new(head),
                    std::io::IoSlice::new(&p.payload),
                ]
            })
            .collect();
        let group_bytes: usize = slices.iter().map(|s| s.len()).sum();
        let result =
            write_all_vectored(&mut self.file, &mut slices).and_then(|()| self.file.sync_data());
        drop(slices);
        if let Err(source) = result {
            // Cut whatever part of the group reached the file, so the LSNs can be reused.
            let _ = self.file.set_len(self.written);
            let _ = self.file.seek(SeekFrom::Start(self.written));
            let message = source.to_string();
            tracing::error!(segment = %self.path.display(), error = %message, "write-ahead log write failed, exports refused");
            for p in group.drain(..) {
                let _ = p.ack.send(Err(WalError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::new(source.kind(), message.clone()),
                }));
            }
            return;
        }
        self.written += group_bytes as u64;
        self.next_lsn += group.len() as u64;
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .records
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(group_bytes as u64, Ordering::Relaxed);
        let mut lsn = first_lsn;
        let acks: Vec<_> = group
            .drain(..)
            .map(|p| {
                (p.apply)(lsn);
                lsn += 1;
                (p.ack, lsn - 1)
            })
            .collect();
        self.stats.applied_lsn.store(lsn - 1, Ordering::Release);
        for (ack, lsn) in acks {
            let _ = ack.send(Ok(lsn));
        }
    }

    fn rotate(&mut self) -> Result<(), WalError> {
        let (file, path) = new_segment(&self.dir, self.next_lsn)?;
        self.file = file;
        self.path = path;
        self.written = HEADER;
        if let Ok(mut segments) = self.segments.lock() {
            segments.push(self.next_lsn);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(dir: &Path) -> (Vec<Record>, ReplayReport) {
        let mut records = Vec::new();
        let report = replay(dir, |r| records.push(r)).expect("replay");
        (records, report)
    }

    #[test]
    fn a_vectored_write_of_more_slices_than_one_writev_takes_writes_them_all() {
        // IOV_MAX is 1,024 on Linux; a group of up to 4,096 records gives twice as many
        // slices, so the write must go on where each writev stopped.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut file = File::create(&path).expect("create");
        let chunks: Vec<Vec<u8>> = (0..3000u32).map(|i| i.to_le_bytes().repeat(3)).collect();
        let mut slices: Vec<std::io::IoSlice<'_>> =
            chunks.iter().map(|c| std::io::IoSlice::new(c)).collect();
        write_all_vectored(&mut file, &mut slices).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), chunks.concat());
    }

    #[tokio::test]
    async fn records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::start(dir.path(), 1, 64, 16).expect("start");
        let applied = Arc::new(Mutex::new(Vec::new()));
        for i in 0..5u8 {
            let applied = applied.clone();
            let lsn = wal
                .append(
                    i % 2,
                    Bytes::from(vec![i; 40]),
                    Box::new(move |lsn| applied.lock().expect("lock").push(lsn)),
                )
                .await
                .expect("append");
            assert_eq!(lsn, u64::from(i) + 1);
        }
        assert_eq!(*applied.lock().expect("lock"), vec![1, 2, 3, 4, 5]);
        assert!(
            wal.segments.lock().expect("lock").len() > 1,
            "64-byte segments rotate"
        );
        let (records, report) = collect(dir.path());
        assert_eq!(records.len(), 5);
        assert!(report.cut.is_empty(), "{report:?}");
        assert_eq!(report.last_lsn, 5);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.lsn, i as u64 + 1);
            assert_eq!(r.table, (i % 2) as u8);
            assert_eq!(r.payload.as_ref(), &[i as u8; 40][..]);
        }
        let removed = wal.remove_through(3).expect("remove");
        assert!(removed >= 1);
        let (records, _) = collect(dir.path());
        assert!(
            records.iter().all(|r| r.lsn > 2),
            "only segments wholly ≤ 3 go"
        );
        assert!(records.iter().any(|r| r.lsn == 5));
    }

    #[tokio::test]
    async fn a_torn_or_corrupt_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::start(dir.path(), 1, 1 << 20, 16).expect("start");
            for i in 0..3u8 {
                wal.append(0, Bytes::from(vec![i; 100]), Box::new(|_| {}))
                    .await
                    .expect("append");
            }
        }
        let seg = segment_path(dir.path(), 1);
        let full = std::fs::metadata(&seg).expect("meta").len();
        // Torn: the last record loses its final 10 bytes.
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.set_len(full - 10).expect("truncate");
        drop(f);
        let (records, report) = collect(dir.path());
        assert_eq!(records.len(), 2, "{report:?}");
        assert_eq!(report.cut.len(), 1);
        let kept = std::fs::metadata(&seg).expect("meta").len();
        assert_eq!(kept, HEADER + 2 * (RECORD_HEAD + BODY_HEAD + 100) as u64);
        // Corrupt: flip a byte of the second record's payload.
        let mut bytes = std::fs::read(&seg).expect("read");
        let n = bytes.len();
        bytes[n - 5] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("write");
        let (records, report) = collect(dir.path());
        assert_eq!(records.len(), 1);
        assert!(report.cut[0].2.contains("checksum"), "{report:?}");
        // A clean log reads with nothing cut, and a new writer continues after it.
        let (_, report) = collect(dir.path());
        assert!(report.cut.is_empty());
        let wal = Wal::start(dir.path(), report.last_lsn + 1, 1 << 20, 4).expect("restart");
        let lsn = wal
            .append(1, Bytes::from_static(b"x"), Box::new(|_| {}))
            .await
            .expect("append");
        assert_eq!(lsn, 2);
        drop(wal);
        let (records, report) = collect(dir.path());
        assert_eq!(
            records.iter().map(|r| r.lsn).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(report.cut.is_empty(), "{report:?}");
    }

    #[test]
    fn garbage_files_are_cut_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(segment_path(dir.path(), 7), b"not a wal at all").expect("write");
        let (records, report) = collect(dir.path());
        assert!(records.is_empty());
        assert!(report.cut[0].2.contains("magic"), "{report:?}");
    }
}
