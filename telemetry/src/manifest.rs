//! A table's manifest: the list of its Parquet files with what queries and maintenance need
//! to know without opening them (rows, bytes, time range, highest WAL LSN, layout version).
//! It is the only source of truth for which files exist: queries never list the directory.
//!
//! `<data>/<table>/manifest.json`, replaced atomically (written aside, fsynced, renamed,
//! directory fsynced). A file on disk that the manifest does not name is an orphan of a flush
//! or compaction that died before its manifest update; its rows are still in the WAL or in
//! the files it was to replace, so it is deleted at open.

use std::io::Write;
use std::path::{Path, PathBuf};

use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use datafusion::parquet::file::statistics::Statistics;
use serde::{Deserialize, Serialize};

use crate::schema;

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
/// Its file name inside a table's directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Parquet key-value metadata: the highest WAL LSN whose rows the file holds.
pub const WAL_LSN_KEY: &str = "lumen.wal_lsn";
/// Parquet key-value metadata: the table layout version the file was written with.
pub const SCHEMA_VERSION_KEY: &str = "lumen.schema_version";

/// One Parquet file of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// File name inside the table's directory.
    pub name: String,
    pub rows: u64,
    pub bytes: u64,
    /// Smallest and largest value of the table's time column, in ns since the epoch.
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    /// Every row of the table with a WAL LSN up to this one is in this file or an older one.
    pub max_lsn: u64,
    /// When its newest rows were stored (ns since the epoch): retention goes by this, not
    /// by the rows' own timestamps, so data sent late or with a skewed clock is kept as
    /// long as any other.
    pub created_ns: i64,
    pub schema_version: String,
    /// 0 for a flushed memtable, 1 for the result of a compaction.
    pub level: u32,
}

impl DataFile {
    /// Whether the file may hold rows with a time in `[lo, hi]` (bounds inclusive, open when
    /// `None`).
    pub fn overlaps(&self, lo: Option<i64>, hi: Option<i64>) -> bool {
        lo.is_none_or(|lo| self.max_time_ns >= lo) && hi.is_none_or(|hi| self.min_time_ns <= hi)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    table: String,
    files: Vec<DataFile>,
}

/// Reads a table's manifest; `Ok(None)` when there is none yet (a new or pre-manifest table).
pub fn read(dir: &Path, table: &str) -> Result<Option<Vec<DataFile>>, String> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    decode(&bytes, table, &path.display().to_string()).map(Some)
}

/// A manifest's file list from its bytes; `origin` names it in errors.
pub fn decode(bytes: &[u8], table: &str, origin: &str) -> Result<Vec<DataFile>, String> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("{origin}: {e}"))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(format!(
            "{origin}: manifest format {} is unknown to this build (reads {MANIFEST_FORMAT})",
            manifest.format
        ));
    }
    if manifest.table != table {
        return Err(format!(
            "{origin}: manifest of table {:?}, expected {table:?}",
            manifest.table
        ));
    }
    Ok(manifest.files)
}

/// A manifest's bytes.
pub fn encode(table: &str, files: &[DataFile]) -> std::io::Result<Vec<u8>> {
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        table: table.to_string(),
        files: files.to_vec(),
    };
    serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)
}

/// Replaces a table's manifest atomically.
pub fn write(dir: &Path, table: &str, files: &[DataFile]) -> std::io::Result<()> {
    let bytes = encode(table, files)?;
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Describes a Parquet file from its footer: rows, size, time range (from the time column's
/// statistics), WAL LSN and layout version. Fails on a file that is not Parquet, was not
/// written by Lumen or has a layout version this build cannot read.
pub fn describe(path: &Path, time_column: &str) -> Result<DataFile, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let bytes = file.metadata().map_err(|e| e.to_string())?.len();
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let meta = reader.metadata();
    let kv = meta.file_metadata().key_value_metadata();
    let get = |key: &str| {
        kv.and_then(|kv| kv.iter().find(|e| e.key == key))
            .and_then(|e| e.value.clone())
    };
    let schema_version = match get(SCHEMA_VERSION_KEY) {
        Some(v) if schema::READABLE_VERSIONS.contains(&v.as_str()) => v,
        Some(v) => return Err(format!("schema version {v} is unknown to this build")),
        None => return Err("no lumen.schema_version: not written by Lumen".into()),
    };
    let (mut min, mut max) = (i64::MAX, i64::MIN);
    let column = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == time_column);
    for rg in meta.row_groups() {
        let stats = column.and_then(|i| rg.column(i).statistics());
        match stats {
            Some(Statistics::Int64(s)) => {
                if let (Some(lo), Some(hi)) = (s.min_opt(), s.max_opt()) {
                    min = min.min(*lo);
                    max = max.max(*hi);
                }
            }
            // No statistics: the file cannot be pruned by time.
            _ if rg.num_rows() > 0 => {
                min = i64::MIN;
                max = i64::MAX;
            }
            _ => {}
        }
    }
    let created_ns = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Ok(DataFile {
        created_ns,
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rows: u64::try_from(meta.file_metadata().num_rows()).unwrap_or(0),
        bytes,
        min_time_ns: min,
        max_time_ns: max,
        max_lsn: get(WAL_LSN_KEY).and_then(|v| v.parse().ok()).unwrap_or(0),
        schema_version,
        level: 0,
    })
}

/// The Parquet files in a table's directory (by name), for finding orphans and migrating
/// a pre-manifest table.
pub fn parquet_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, min: i64, max: i64) -> DataFile {
        DataFile {
            name: name.into(),
            rows: 10,
            bytes: 100,
            min_time_ns: min,
            max_time_ns: max,
            max_lsn: 3,
            created_ns: 1,
            schema_version: "1".into(),
            level: 0,
        }
    }

    #[test]
    fn manifest_round_trips_and_refuses_what_it_does_not_know() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path(), "spans").expect("read"), None);
        let files = vec![file("a.parquet", 10, 20), file("b.parquet", 30, 40)];
        write(dir.path(), "spans", &files).expect("write");
        assert_eq!(read(dir.path(), "spans").expect("read"), Some(files));
        assert!(
            read(dir.path(), "metrics").is_err(),
            "another table's manifest"
        );
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            br#"{"format": 99, "table": "spans", "files": []}"#,
        )
        .expect("write");
        assert!(
            read(dir.path(), "spans")
                .expect_err("format")
                .contains("99")
        );
    }

    #[test]
    fn time_ranges_overlap_inclusively() {
        let f = file("a", 10, 20);
        assert!(f.overlaps(None, None));
        assert!(f.overlaps(Some(20), None));
        assert!(!f.overlaps(Some(21), None));
        assert!(f.overlaps(None, Some(10)));
        assert!(!f.overlaps(None, Some(9)));
        assert!(f.overlaps(Some(12), Some(15)));
        assert!(!f.overlaps(Some(0), Some(5)));
    }
}
