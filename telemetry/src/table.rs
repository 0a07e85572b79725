//! DataFusion's seam into the store: a `TableProvider` that scans a snapshot of a table, its
//! Parquet files through a listing table and its memtable through a memory table, unioned.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
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

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self
            .table
            .snapshot()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let schema = self.table.schema.clone();
        let mut plans = Vec::with_capacity(2);
        if !snapshot.files.is_empty() {
            let urls = snapshot
                .files
                .iter()
                .map(|p| ListingTableUrl::parse(p.to_string_lossy()))
                .collect::<Result<Vec<_>>>()?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(options)
                .with_schema(schema.clone());
            let files = ListingTable::try_new(config)?;
            plans.push(files.scan(state, projection, filters, limit).await?);
        }
        let mem = MemTable::try_new(schema, vec![snapshot.batches])?;
        plans.push(mem.scan(state, projection, filters, limit).await?);
        UnionExec::try_new(plans)
    }
}
