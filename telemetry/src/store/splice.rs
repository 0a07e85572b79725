//! Compaction without re-encoding: when the inputs' rows are already in big row groups, the
//! merged file is their row groups one after the other (in time order), each column chunk
//! copied byte for byte with its statistics, page index and bloom filter. Every row group
//! stays sorted by time and keeps its own min/max, so pruning and compression are what a
//! merge would give; only rows of overlapping inputs (spans that arrived late) are not
//! interleaved across row groups. It costs a copy instead of a decode and an encode of
//! every row, which is most of the store's CPU under load. Row groups under
//! [`MIN_SPLICE_ROW_GROUP`] rows (a quiet flush's) are read, sorted and written anew as one
//! more input, so one small file no longer makes a compaction re-encode every big one; when
//! every row group is small, the streaming merge takes them all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::parquet::arrow::ARROW_SCHEMA_META_KEY;
use datafusion::parquet::bloom_filter::Sbbf;
use datafusion::parquet::column::writer::ColumnCloseResult;
use datafusion::parquet::file::metadata::{
    KeyValue, PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader,
};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::writer::SerializedFileWriter;

use super::StoreError;
use crate::manifest::{DataFile, SCHEMA_VERSION_KEY, WAL_LSN_KEY};
use crate::schema;

/// Row groups at least this big are kept as they are; smaller ones are worth re-encoding
/// into bigger ones (a merge), which is cheap while they are small.
pub const MIN_SPLICE_ROW_GROUP: i64 = 64 * 1024;

/// Whether `inputs` may be spliced as far as the manifest tells: all of the current layout.
pub fn current_layout(inputs: &[DataFile]) -> bool {
    inputs
        .iter()
        .all(|f| f.schema_version == schema::SCHEMA_VERSION)
}

fn parquet_err(
    path: &Path,
) -> impl FnOnce(datafusion::parquet::errors::ParquetError) -> StoreError + '_ {
    move |source| StoreError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One input of a splice: a file's metadata and the row groups of it to copy.
#[derive(Debug)]
pub struct Part {
    pub path: PathBuf,
    pub meta: ParquetMetaData,
    pub row_groups: Vec<usize>,
}

impl Part {
    /// Its row groups under [`MIN_SPLICE_ROW_GROUP`] rows (re-encoded, not copied) and
    /// their rows, taken out of the ones to copy.
    pub fn take_small(&mut self) -> (Vec<usize>, i64) {
        let rgs = self.meta.row_groups();
        let (small, big): (Vec<usize>, Vec<usize>) = self
            .row_groups
            .iter()
            .partition(|&&i| rgs[i].num_rows() < MIN_SPLICE_ROW_GROUP);
        self.row_groups = big;
        let rows = small.iter().map(|&i| rgs[i].num_rows()).sum();
        (small, rows)
    }
}

/// Reads each source's footer and page index, keeping their order, every row group to be
/// copied; `None` when they cannot be spliced (schemas that differ).
pub fn plan(sources: &[PathBuf]) -> Result<Option<Vec<Part>>, StoreError> {
    let mut out: Vec<Part> = Vec::with_capacity(sources.len());
    for path in sources {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(&file)
            .map_err(parquet_err(path))?;
        if let Some(first) = out.first()
            && first.meta.file_metadata().schema_descr().root_schema()
                != meta.file_metadata().schema_descr().root_schema()
        {
            return Ok(None);
        }
        out.push(Part {
            path: path.clone(),
            row_groups: (0..meta.num_row_groups()).collect(),
            meta,
        });
    }
    Ok(Some(out))
}

/// Writes the chosen row groups of `inputs`, in the order given (the caller sorts them by
/// first time), into `path` (aside, fsync, rename, directory fsync). Returns the new file's
/// size.
pub fn splice(path: &Path, inputs: &[Part], max_lsn: u64) -> Result<u64, StoreError> {
    let Some(Part { meta: first, .. }) = inputs.first() else {
        return Err(StoreError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("nothing to splice"),
        });
    };
    let schema = first.file_metadata().schema_descr().root_schema_ptr();
    // The Arrow schema the files were written with, so readers get the same Arrow types.
    let arrow_schema = first
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == ARROW_SCHEMA_META_KEY).cloned());
    let mut kv = vec![
        KeyValue::new(
            SCHEMA_VERSION_KEY.to_string(),
            schema::SCHEMA_VERSION.to_string(),
        ),
        KeyValue::new(WAL_LSN_KEY.to_string(), max_lsn.to_string()),
    ];
    kv.extend(arrow_schema);
    let props = Arc::new(
        WriterProperties::builder()
            .set_key_value_metadata(Some(kv))
            .build(),
    );
    let tmp = path.with_extension("parquet.tmp");
    let out = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut writer = SerializedFileWriter::new(out, schema, props).map_err(parquet_err(&tmp))?;
    for Part {
        path: src,
        meta,
        row_groups,
    } in inputs
    {
        if row_groups.is_empty() {
            continue;
        }
        let file = std::fs::File::open(src).map_err(io_err(src))?;
        for &rg_idx in row_groups {
            let rg = meta.row_group(rg_idx);
            let column_indexes = meta.column_index().and_then(|ci| ci.get(rg_idx));
            let offset_indexes = meta.offset_index().and_then(|oi| oi.get(rg_idx));
            let mut rg_out = writer.next_row_group().map_err(parquet_err(&tmp))?;
            for (col_idx, column) in rg.columns().iter().enumerate() {
                let bloom_filter =
                    Sbbf::read_from_column_chunk(column, &file).map_err(parquet_err(src))?;
                let result = ColumnCloseResult {
                    bytes_written: u64::try_from(column.compressed_size()).unwrap_or(0),
                    rows_written: u64::try_from(rg.num_rows()).unwrap_or(0),
                    metadata: column.clone(),
                    bloom_filter,
                    column_index: column_indexes.and_then(|c| c.get(col_idx)).cloned(),
                    offset_index: offset_indexes.and_then(|o| o.get(col_idx)).cloned(),
                };
                rg_out
                    .append_column(&file, result)
                    .map_err(parquet_err(src))?;
            }
            rg_out.close().map_err(parquet_err(&tmp))?;
        }
    }
    let out = writer.into_inner().map_err(parquet_err(&tmp))?;
    out.sync_all().map_err(io_err(&tmp))?;
    let bytes = out.metadata().map_err(io_err(&tmp))?.len();
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        crate::wal::sync_dir(dir)?;
    }
    Ok(bytes)
}
