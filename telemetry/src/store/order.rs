//! Row order within a file: every file is sorted by its table's time column. A flush sorts
//! the memtable (by index, then gathers rows a chunk at a time, so the memtable is never
//! copied whole); a compaction merges its sorted inputs as streams, holding one batch per
//! input. Sorted by time, a trace's spans sit together, timestamps delta-encode to a byte or
//! two, and a time-range query reads only the row groups of its range.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use datafusion::arrow::array::{Array, AsArray, PrimitiveArray};
use datafusion::arrow::compute::interleave_record_batch;
use datafusion::arrow::datatypes::TimestampNanosecondType;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

/// Rows per batch handed to the Parquet writer.
pub const CHUNK_ROWS: usize = 8192;

fn times<'a>(
    batch: &'a RecordBatch,
    column: &str,
) -> Result<&'a PrimitiveArray<TimestampNanosecondType>, ArrowError> {
    batch
        .column_by_name(column)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        .ok_or_else(|| ArrowError::SchemaError(format!("no timestamp column {column}")))
}

/// The key of one row: its time (nulls first), then where it came from, so the order is
/// total and the same on every run.
fn key(times: &PrimitiveArray<TimestampNanosecondType>, row: usize) -> i64 {
    if times.is_null(row) {
        i64::MIN
    } else {
        times.value(row)
    }
}

/// The rows of `batches` ordered by `column`, in batches of at most [`CHUNK_ROWS`].
pub fn sorted(
    batches: Vec<RecordBatch>,
    column: &str,
) -> Result<impl Iterator<Item = Result<RecordBatch, ArrowError>>, ArrowError> {
    let mut order: Vec<(i64, u32, u32)> =
        Vec::with_capacity(batches.iter().map(RecordBatch::num_rows).sum());
    for (b, batch) in batches.iter().enumerate() {
        let t = times(batch, column)?;
        let b = u32::try_from(b).map_err(|e| ArrowError::ComputeError(e.to_string()))?;
        for row in 0..batch.num_rows() {
            let r = u32::try_from(row).map_err(|e| ArrowError::ComputeError(e.to_string()))?;
            order.push((key(t, row), b, r));
        }
    }
    order.sort_unstable();
    let mut rest = order.into_iter().peekable();
    Ok(std::iter::from_fn(move || {
        rest.peek()?;
        let indices: Vec<(usize, usize)> = rest
            .by_ref()
            .take(CHUNK_ROWS)
            .map(|(_, b, r)| (b as usize, r as usize))
            .collect();
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        Some(interleave_record_batch(&refs, &indices))
    }))
}

/// One input of a merge: a sorted stream of batches and where it has got to.
struct Cursor<I> {
    input: I,
    batch: Option<RecordBatch>,
    row: usize,
    /// The batch's slot in the merge's `held` list.
    slot: usize,
}

/// Merges inputs that are each sorted by `column` into batches of at most [`CHUNK_ROWS`],
/// sorted by `column`. An input is opened only once the merge reaches its smallest key
/// (files of consecutive time ranges are then read one after the other, never all at
/// once: each open Parquet reader holds a row group), and it holds one batch per open
/// input plus those the current chunk points into.
pub struct Merge<I, F> {
    column: String,
    /// Inputs not opened yet, by their smallest key (ascending).
    pending: std::collections::VecDeque<(i64, F)>,
    cursors: Vec<Cursor<I>>,
    heap: BinaryHeap<Reverse<(i64, usize)>>,
    held: Vec<RecordBatch>,
}

impl<I, F> Merge<I, F>
where
    I: Iterator<Item = Result<RecordBatch, ArrowError>>,
    F: FnOnce() -> I,
{
    /// `inputs`: each input's smallest key (a lower bound is enough) and how to open it.
    pub fn new(mut inputs: Vec<(i64, F)>, column: &str) -> Merge<I, F> {
        inputs.sort_by_key(|(min, _)| *min);
        Merge {
            column: column.to_string(),
            pending: inputs.into(),
            cursors: Vec::new(),
            heap: BinaryHeap::new(),
            held: Vec::new(),
        }
    }

    /// Opens the pending inputs whose smallest key is not above the merge's next key.
    fn open_due(&mut self) -> Result<(), ArrowError> {
        loop {
            let next = self.heap.peek().map(|Reverse((k, _))| *k);
            match self.pending.front() {
                Some((min, _)) if next.is_none_or(|k| *min <= k) => {
                    let Some((_, open)) = self.pending.pop_front() else {
                        return Ok(());
                    };
                    let i = self.cursors.len();
                    self.cursors.push(Cursor {
                        input: open(),
                        batch: None,
                        row: 0,
                        slot: 0,
                    });
                    if self.advance(i)? {
                        self.push(i)?;
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Moves input `i` to its next non-empty batch; false when it has none left.
    fn advance(&mut self, i: usize) -> Result<bool, ArrowError> {
        let cursor = &mut self.cursors[i];
        loop {
            match cursor.input.next() {
                None => {
                    cursor.batch = None;
                    return Ok(false);
                }
                Some(batch) => {
                    let batch = batch?;
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    cursor.slot = self.held.len();
                    self.held.push(batch.clone());
                    cursor.batch = Some(batch);
                    cursor.row = 0;
                    return Ok(true);
                }
            }
        }
    }

    fn push(&mut self, i: usize) -> Result<(), ArrowError> {
        let cursor = &self.cursors[i];
        if let Some(batch) = &cursor.batch {
            let k = key(times(batch, &self.column)?, cursor.row);
            self.heap.push(Reverse((k, i)));
        }
        Ok(())
    }

    fn next_chunk(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        let mut indices = Vec::with_capacity(CHUNK_ROWS);
        while indices.len() < CHUNK_ROWS {
            self.open_due()?;
            let Some(Reverse((_, i))) = self.heap.pop() else {
                break;
            };
            let cursor = &mut self.cursors[i];
            indices.push((cursor.slot, cursor.row));
            cursor.row += 1;
            let exhausted = cursor
                .batch
                .as_ref()
                .is_some_and(|b| cursor.row >= b.num_rows());
            if !exhausted || self.advance(i)? {
                self.push(i)?;
            }
        }
        if indices.is_empty() {
            return Ok(None);
        }
        let chunk = {
            let refs: Vec<&RecordBatch> = self.held.iter().collect();
            interleave_record_batch(&refs, &indices)?
        };
        // Keep only the batches the cursors are still in, renumbered; finished inputs
        // (and their readers) are dropped.
        self.held.clear();
        self.cursors.retain(|c| c.batch.is_some());
        self.heap.clear();
        for i in 0..self.cursors.len() {
            let cursor = &mut self.cursors[i];
            if let Some(batch) = &cursor.batch {
                cursor.slot = self.held.len();
                self.held.push(batch.clone());
            }
            self.push(i)?;
        }
        Ok(Some(chunk))
    }

    /// Inputs open at once so far is at most this (for tests).
    #[cfg(test)]
    fn open_inputs(&self) -> usize {
        self.cursors.len()
    }
}

impl<I, F> Iterator for Merge<I, F>
where
    I: Iterator<Item = Result<RecordBatch, ArrowError>>,
    F: FnOnce() -> I,
{
    type Item = Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, TimestampNanosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(times: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("t", crate::schema::timestamp(), false),
            Field::new("v", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(times.to_vec()).with_timezone("UTC")),
                Arc::new(Int64Array::from(
                    times.iter().map(|t| t * 10).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch")
    }

    fn collect(chunks: impl Iterator<Item = Result<RecordBatch, ArrowError>>) -> Vec<(i64, i64)> {
        chunks
            .flat_map(|c| {
                let c = c.expect("chunk");
                let t = c
                    .column(0)
                    .as_primitive::<TimestampNanosecondType>()
                    .clone();
                let v = c
                    .column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .clone();
                (0..c.num_rows())
                    .map(move |i| (t.value(i), v.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn sort_orders_rows_across_batches_and_keeps_them_whole() {
        let rows = collect(
            sorted(vec![batch(&[5, 1, 9]), batch(&[3, 7]), batch(&[])], "t").expect("sorts"),
        );
        assert_eq!(rows, vec![(1, 10), (3, 30), (5, 50), (7, 70), (9, 90)]);
    }

    #[test]
    fn merge_interleaves_sorted_inputs_in_chunks() {
        // Enough rows that the merge emits several chunks and crosses input batches.
        let a: Vec<i64> = (0..20_000).map(|i| i * 2).collect();
        let b: Vec<i64> = (0..15_000).map(|i| i * 3).collect();
        let inputs = vec![
            (
                0,
                vec![Ok(batch(&a[..7000])), Ok(batch(&[])), Ok(batch(&a[7000..]))],
            ),
            (0, vec![Ok(batch(&b[..9000])), Ok(batch(&b[9000..]))]),
            (i64::MAX, Vec::new()),
        ];
        let merged = collect(Merge::new(lazy(inputs), "t"));
        assert_eq!(merged.len(), 35_000);
        assert!(merged.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(merged.iter().all(|(t, v)| *v == t * 10));
    }

    #[test]
    fn a_failing_input_fails_the_merge() {
        let inputs = vec![
            (1, vec![Ok(batch(&[1, 2]))]),
            (0, vec![Err(ArrowError::ComputeError("disk".into()))]),
        ];
        assert!(Merge::new(lazy(inputs), "t").any(|c| c.is_err()));
    }

    type Input = std::vec::IntoIter<Result<RecordBatch, ArrowError>>;

    fn lazy(
        inputs: Vec<(i64, Vec<Result<RecordBatch, ArrowError>>)>,
    ) -> Vec<(i64, impl FnOnce() -> Input)> {
        inputs
            .into_iter()
            .map(|(min, batches)| (min, move || batches.into_iter()))
            .collect()
    }

    #[test]
    fn inputs_of_consecutive_ranges_are_read_one_after_the_other() {
        let ranges: Vec<Vec<i64>> = (0..5)
            .map(|f| (f * 20_000..(f + 1) * 20_000).collect())
            .collect();
        let inputs = ranges
            .iter()
            .rev()
            .map(|r| (r[0], vec![Ok(batch(&r[..10_000])), Ok(batch(&r[10_000..]))]))
            .collect();
        let mut merge = Merge::new(lazy(inputs), "t");
        let mut rows = Vec::new();
        while let Some(chunk) = merge.next() {
            assert!(
                merge.open_inputs() <= 2,
                "one input open, plus the next at a seam"
            );
            rows.extend(collect(std::iter::once(chunk)));
        }
        assert_eq!(rows.len(), 100_000);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
