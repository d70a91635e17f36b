//! Ad-hoc queries over stored events: the Parquet files of each stream plus
//! the hot tail still in the log, read together as one table per stream.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::sql::parser::Statement as DfStatement;
use tributary_engine::catalog::Catalog;

use crate::context::new_session;
use crate::error::{Error, Result};

/// What a query reads of one stream.
#[derive(Debug, Clone, Default)]
pub struct StreamData {
    /// Absolute paths of the stream's Parquet files.
    pub files: Vec<PathBuf>,
    /// Events not yet in any file.
    pub tail: Vec<RecordBatch>,
}

/// Gives a consistent view of a stream's stored events.
#[async_trait]
pub trait StreamSource: Send + Sync {
    async fn stream_data(&self, stream: &str) -> Result<StreamData>;
}

/// The result of a query.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Runs `SELECT`s over the streams of a catalog.
pub struct QueryEngine {
    catalog: Arc<Catalog>,
    source: Arc<dyn StreamSource>,
    devices: Option<Arc<tributary_engine::devices::DeviceTable>>,
    commands: Option<Arc<tributary_engine::commands::CommandQueue>>,
}

impl QueryEngine {
    pub fn new(catalog: Arc<Catalog>, source: Arc<dyn StreamSource>) -> Self {
        QueryEngine {
            catalog,
            source,
            devices: None,
            commands: None,
        }
    }

    /// Lets queries read the registry's devices as the table `devices`.
    pub fn with_devices(mut self, devices: Arc<tributary_engine::devices::DeviceTable>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// Lets queries read the command queue as the table `commands` (read
    /// afresh by every query that names it; rules never see it).
    pub fn with_commands(
        mut self,
        commands: Arc<tributary_engine::commands::CommandQueue>,
    ) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Whether a query statement reads the `devices` table.
    pub fn reads_devices(&self, statement: &DfStatement) -> bool {
        self.devices.is_some()
            && new_session()
                .state()
                .resolve_table_references(statement)
                .is_ok_and(|tables| tables.iter().any(|t| t.table() == "devices"))
    }

    /// Plans and runs one query statement.
    pub async fn run(&self, statement: DfStatement) -> Result<QueryResult> {
        let ctx = new_session();
        let state = ctx.state();
        for table in state.resolve_table_references(&statement)? {
            let name = table.table().to_string();
            if let (Some(devices), "devices") = (&self.devices, name.as_str()) {
                let snapshot = devices.snapshot();
                let table = datafusion::catalog::MemTable::try_new(
                    snapshot.batch.schema(),
                    vec![vec![snapshot.batch.clone()]],
                )?;
                ctx.register_table("devices", Arc::new(table))?;
                continue;
            }
            if let (Some(commands), "commands") = (&self.commands, name.as_str()) {
                let batch = commands.blocking(|q| q.table()).await?;
                let table =
                    datafusion::catalog::MemTable::try_new(batch.schema(), vec![vec![batch]])?;
                ctx.register_table("commands", Arc::new(table))?;
                continue;
            }
            let Some(def) = self.catalog.stream(&name) else {
                // Leave it to the planner, whose error names the table and its position.
                continue;
            };
            let data = self.source.stream_data(&name).await?;
            ctx.register_table(
                name.as_str(),
                Arc::new(StreamTable::new(def.schema(), data)),
            )?;
        }
        let plan = ctx
            .state()
            .statement_to_plan(statement)
            .await
            .map_err(|e| {
                let err = Error::from(e);
                match err {
                    Error::Plan { message, location } if message.contains("not found") => {
                        Error::Plan {
                            message: format!("{message}; streams: {}", self.stream_list()),
                            location,
                        }
                    }
                    other => other,
                }
            })?;
        let df = ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok(QueryResult { schema, batches })
    }

    fn stream_list(&self) -> String {
        let names: Vec<String> = self.catalog.streams().into_iter().map(|s| s.name).collect();
        if names.is_empty() {
            "none yet (CREATE STREAM declares one)".into()
        } else {
            names.join(", ")
        }
    }
}

/// One stream as a table: its Parquet files and its hot tail.
#[derive(Debug)]
pub struct StreamTable {
    schema: SchemaRef,
    data: StreamData,
}

impl StreamTable {
    pub fn new(schema: SchemaRef, data: StreamData) -> Self {
        StreamTable { schema, data }
    }
}

#[async_trait]
impl TableProvider for StreamTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Parquet prunes with them; the filter still runs above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if !self.data.files.is_empty() {
            let urls = self
                .data
                .files
                .iter()
                .map(|f| ListingTableUrl::parse(f.to_string_lossy()))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(options)
                .with_schema(self.schema.clone());
            let table = ListingTable::try_new(config)?;
            inputs.push(table.scan(state, projection, filters, limit).await?);
        }
        if !self.data.tail.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                std::slice::from_ref(&self.data.tail),
                self.schema.clone(),
                projection.cloned(),
            )?);
        }
        if inputs.is_empty() {
            let projected = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}
