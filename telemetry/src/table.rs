//! DataFusion's seam into the store: a `TableProvider` that scans a snapshot of a table, its
//! Parquet files through a listing table and its memtable through a memory table, unioned.
//!
//! Files come from the manifest (and, with a bucket, the other writers' manifests in it),
//! never a directory listing, and are pruned by time before
//! DataFusion sees them: filters on the table's time column (`start_time` of spans, `time`
//! of metrics) are turned into a range, and files whose manifest range misses it are not
//! read at all (EXPLAIN lists only the files left). Inside a file, DataFusion prunes row
//! groups by statistics and by the trace id bloom filters.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::ScalarValue;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider, TableType};
use datafusion::error::Result;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;

use crate::store::Table;

/// A table of the store, as SQL sees it.
#[derive(Debug)]
pub struct SnapshotTable {
    table: Arc<Table>,
}

impl SnapshotTable {
    pub fn new(table: Arc<Table>) -> SnapshotTable {
        SnapshotTable { table }
    }
}

#[async_trait::async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter is offered to the scan (for file and row-group pruning) and still
    /// applied above it.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self.table.snapshot();
        let schema = self.table.schema.clone();
        let (lo, hi) = time_bounds(filters, self.table.time_column);
        let files: Vec<_> = snapshot
            .files
            .iter()
            .filter(|f| f.overlaps(lo, hi))
            .collect();
        let mut plans = Vec::with_capacity(3);
        let local: Vec<String> = files
            .iter()
            .map(|f| snapshot.path(f).to_string_lossy().into_owned())
            .collect();
        // Other writers' files in the bucket, pruned the same way; one listing table per
        // object store, as DataFusion resolves the store from the first path.
        let peers: Vec<String> = snapshot
            .peer_files
            .iter()
            .filter(|p| p.file.overlaps(lo, hi))
            .map(|p| p.url.clone())
            .collect();
        for paths in [local, peers] {
            if paths.is_empty() {
                continue;
            }
            let urls = paths
                .iter()
                .map(ListingTableUrl::parse)
                .collect::<Result<Vec<_>>>()?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(options)
                .with_schema(schema.clone());
            let listing = ListingTable::try_new(config)?;
            plans.push(listing.scan(state, projection, filters, limit).await?);
        }
        let mem = MemTable::try_new(schema, vec![snapshot.batches])?;
        plans.push(mem.scan(state, projection, filters, limit).await?);
        UnionExec::try_new(plans)
    }
}

/// The range `[lo, hi]` (ns, inclusive; `None` open) that conjunctive filters on `column`
/// confine it to. Anything it does not understand leaves the range open: pruning is only
/// ever conservative.
pub fn time_bounds(filters: &[Expr], column: &str) -> (Option<i64>, Option<i64>) {
    let (mut lo, mut hi): (Option<i64>, Option<i64>) = (None, None);
    let mut raise = |v: i64| lo = Some(lo.map_or(v, |l| l.max(v)));
    let mut lower = |v: i64| hi = Some(hi.map_or(v, |h| h.min(v)));
    let mut bounds = Vec::new();
    for filter in filters {
        for e in split_conjunction(filter) {
            match e {
                Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                    let (value, op) = match (left.as_ref(), right.as_ref()) {
                        (Expr::Column(c), Expr::Literal(v, _)) if c.name == column => (v, *op),
                        (Expr::Literal(v, _), Expr::Column(c)) if c.name == column => {
                            match op.swap() {
                                Some(op) => (v, op),
                                None => continue,
                            }
                        }
                        _ => continue,
                    };
                    let Some(ns) = nanos(value) else { continue };
                    match op {
                        Operator::Gt | Operator::GtEq => bounds.push((Some(ns), None)),
                        Operator::Lt | Operator::LtEq => bounds.push((None, Some(ns))),
                        Operator::Eq => bounds.push((Some(ns), Some(ns))),
                        _ => {}
                    }
                }
                Expr::Between(b) if !b.negated => {
                    if let Expr::Column(c) = b.expr.as_ref()
                        && c.name == column
                        && let (Expr::Literal(l, _), Expr::Literal(h, _)) =
                            (b.low.as_ref(), b.high.as_ref())
                    {
                        bounds.push((nanos(l), nanos(h)));
                    }
                }
                _ => {}
            }
        }
    }
    for (l, h) in bounds {
        if let Some(l) = l {
            raise(l);
        }
        if let Some(h) = h {
            lower(h);
        }
    }
    (lo, hi)
}

/// A timestamp literal in nanoseconds since the epoch.
fn nanos(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(n), _) => Some(*n),
        ScalarValue::TimestampMicrosecond(Some(n), _) => n.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(n), _) => n.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(n), _) => n.checked_mul(1_000_000_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    fn ts(n: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(
            Some(n),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn time_filters_become_a_range_and_others_leave_it_open() {
        let c = || col("start_time");
        assert_eq!(time_bounds(&[], "start_time"), (None, None));
        assert_eq!(
            time_bounds(&[c().gt_eq(ts(10)), c().lt(ts(20))], "start_time"),
            (Some(10), Some(20))
        );
        assert_eq!(
            time_bounds(&[ts(10).lt_eq(c()).and(c().gt(ts(15)))], "start_time"),
            (Some(15), None)
        );
        assert_eq!(
            time_bounds(&[c().between(ts(5), ts(7))], "start_time"),
            (Some(5), Some(7))
        );
        assert_eq!(
            time_bounds(&[c().eq(ts(3))], "start_time"),
            (Some(3), Some(3))
        );
        assert_eq!(
            time_bounds(&[c().gt(ts(1)).or(c().lt(ts(0)))], "start_time"),
            (None, None),
            "a disjunction is not a range"
        );
        assert_eq!(
            time_bounds(&[col("end_time").gt(ts(1))], "start_time"),
            (None, None)
        );
        assert_eq!(
            time_bounds(&[c().not_between(ts(5), ts(7))], "start_time"),
            (None, None)
        );
        assert_eq!(
            time_bounds(
                &[c().gt_eq(lit(ScalarValue::TimestampMillisecond(Some(2), None)))],
                "start_time"
            ),
            (Some(2_000_000), None)
        );
    }
}
