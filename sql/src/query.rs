//! Ad-hoc queries over stored events: the Parquet files of each stream plus
//! the hot tail still in the log, read together as one table per stream.
//!
//! Text columns are read as Arrow's string views (`Utf8View`) while a query
//! runs: the Parquet reader then points into each page's dictionary instead
//! of copying every value, and DataFusion groups and compares short strings
//! within their 16-byte views. On the end-to-end bench's 64 M events that
//! made `GROUP BY status` 2.2x and the per-device group-bys 1.5x faster.
//! Answers are cast back, so a query's text columns are `Utf8` as declared.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
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
                let batch = cast_batch(&snapshot.batch, &with_views(&snapshot.batch.schema()))?;
                let table =
                    datafusion::catalog::MemTable::try_new(batch.schema(), vec![vec![batch]])?;
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
                Arc::new(StreamTable::new(def.schema(), data)?),
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
        let planned: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let schema = without_views(&planned);
        let batches = df
            .collect()
            .await?
            .iter()
            .map(|batch| cast_batch(batch, &schema))
            .collect::<Result<_>>()?;
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
    /// The table of a stream declared with `schema`; its text columns are
    /// string views (the tail is cast to match).
    pub fn new(schema: SchemaRef, data: StreamData) -> Result<Self> {
        let schema = with_views(&schema);
        let tail = data
            .tail
            .iter()
            .map(|batch| cast_batch(batch, &schema))
            .collect::<Result<_>>()?;
        Ok(StreamTable {
            schema,
            data: StreamData {
                files: data.files,
                tail,
            },
        })
    }
}

/// `ty` with `from` replaced by `to`, at the top and in a map's values
/// (`tags`: the keys stay as they are).
fn retype(ty: &DataType, from: &DataType, to: &DataType) -> DataType {
    match ty {
        ty if ty == from => to.clone(),
        DataType::Map(entries, sorted) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => {
                let value = kv[1].as_ref().clone();
                let value = value.with_data_type(retype(kv[1].data_type(), from, to));
                let kv = vec![kv[0].as_ref().clone(), value];
                let entries = entries.as_ref().clone();
                let entries = entries.with_data_type(DataType::Struct(kv.into()));
                DataType::Map(Arc::new(entries), *sorted)
            }
            _ => ty.clone(),
        },
        _ => ty.clone(),
    }
}

/// `schema` with [`retype`] applied to each column.
fn retyped(schema: &SchemaRef, from: &DataType, to: &DataType) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let ty = retype(f.data_type(), from, to);
            f.as_ref().clone().with_data_type(ty)
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Text columns (and the text values of maps) as string views, for reading:
/// a stream's columns, and the registry's `devices`, whose `id` is joined
/// to millions of events and whose `tags['site']` is grouped on.
fn with_views(schema: &SchemaRef) -> SchemaRef {
    retyped(schema, &DataType::Utf8, &DataType::Utf8View)
}

/// String views as the plain text columns streams declare, for answers.
fn without_views(schema: &SchemaRef) -> SchemaRef {
    retyped(schema, &DataType::Utf8View, &DataType::Utf8)
}

/// `batch` with its columns cast to `schema`'s types (same columns, in order).
fn cast_batch(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| arrow::compute::cast(column, field.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("casting a query's string columns: {e}")))?;
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::Internal(format!("casting a query's string columns: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Array, ArrayRef, Float64Array, Int64Array, StringArray, TimestampMillisecondArray,
    };
    use datafusion::parquet::arrow::ArrowWriter;
    use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};

    struct Fixed(StreamData);

    #[async_trait]
    impl StreamSource for Fixed {
        async fn stream_data(&self, _stream: &str) -> Result<StreamData> {
            Ok(self.0.clone())
        }
    }

    fn def() -> StreamDef {
        StreamDef::new(
            "sim",
            vec![
                ColumnDef {
                    name: "temperature".into(),
                    ty: ColumnType::Float64,
                },
                ColumnDef {
                    name: "status".into(),
                    ty: ColumnType::Utf8,
                },
            ],
            1,
        )
        .unwrap()
    }

    fn batch(device: &str, statuses: &[&str]) -> RecordBatch {
        let n = statuses.len();
        RecordBatch::try_new(
            def().schema(),
            vec![
                Arc::new(StringArray::from(vec![device; n])),
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(0..n as i64).with_timezone("UTC"),
                ),
                Arc::new(TimestampMillisecondArray::from(vec![0i64; n]).with_timezone("UTC")),
                Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))),
                Arc::new(StringArray::from(statuses.to_vec())),
            ],
        )
        .unwrap()
    }

    async fn query(engine: &QueryEngine, sql: &str) -> QueryResult {
        let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
        let statement = datafusion::sql::parser::DFParser::parse_sql_with_dialect(sql, &dialect)
            .unwrap()
            .pop_front()
            .unwrap();
        engine.run(statement).await.unwrap()
    }

    fn strings(result: &QueryResult, column: usize) -> Vec<String> {
        result
            .batches
            .iter()
            .flat_map(|b| {
                let a = b
                    .column(column)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap();
                (0..a.len())
                    .map(|i| a.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Stored files and the log's tail are read together, grouped and
    /// filtered (the filter inside the Parquet reader), and the text columns
    /// come back as the `Utf8` the stream declares, not as the string views
    /// the query reads them as.
    #[tokio::test]
    async fn files_and_tail_are_one_table_and_text_comes_back_as_declared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.parquet");
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = ArrowWriter::try_new(file, def().schema(), None).unwrap();
        writer
            .write(&batch("a", &["ok", "error", "ok", "warn"]))
            .unwrap();
        writer.close().unwrap();

        let catalog = Arc::new(Catalog::in_memory());
        catalog.add_stream(def()).unwrap();
        let data = StreamData {
            files: vec![path],
            tail: vec![batch("b", &["error", "ok"])],
        };
        let table = StreamTable::new(def().schema(), data.clone()).unwrap();
        let status = table.schema().field_with_name("status").unwrap().clone();
        assert_eq!(status.data_type(), &DataType::Utf8View, "read as views");
        let engine = QueryEngine::new(catalog, Arc::new(Fixed(data)));

        let grouped = query(
            &engine,
            "SELECT status, count(*) AS n FROM sim GROUP BY status ORDER BY status",
        )
        .await;
        assert_eq!(grouped.schema.field(0).data_type(), &DataType::Utf8);
        assert_eq!(grouped.batches[0].schema(), grouped.schema);
        assert_eq!(strings(&grouped, 0), ["error", "ok", "warn"]);
        let counts: Vec<i64> = grouped
            .batches
            .iter()
            .flat_map(|b| {
                let a = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                a.values().to_vec()
            })
            .collect();
        assert_eq!(counts, [2, 3, 1]);

        let errors = query(
            &engine,
            "SELECT device_id, status, temperature FROM sim WHERE status = 'error' ORDER BY device_id",
        )
        .await;
        assert_eq!(errors.num_rows(), 2);
        assert_eq!(strings(&errors, 0), ["a", "b"]);
        assert_eq!(strings(&errors, 1), ["error", "error"]);
        for field in errors.schema.fields() {
            assert_ne!(field.data_type(), &DataType::Utf8View, "{field}");
        }
    }

    /// The registry's `tags` map goes to string views and back intact.
    #[test]
    fn a_map_of_text_goes_to_views_and_back() {
        use arrow::array::{MapBuilder, StringBuilder};
        let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        tags.keys().append_value("site");
        tags.values().append_value("north");
        tags.append(true).unwrap();
        tags.append(true).unwrap();
        let ids: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
        let batch = RecordBatch::try_from_iter([
            ("id", ids),
            ("tags", Arc::new(tags.finish()) as ArrayRef),
        ])
        .unwrap();

        let viewed = cast_batch(&batch, &with_views(&batch.schema())).unwrap();
        assert_eq!(viewed.schema().field(0).data_type(), &DataType::Utf8View);
        let DataType::Map(entries, _) = viewed.schema().field(1).data_type().clone() else {
            panic!("tags is not a map");
        };
        let DataType::Struct(kv) = entries.data_type() else {
            panic!("entries are not a struct");
        };
        assert_eq!(kv[0].data_type(), &DataType::Utf8, "keys stay as they are");
        assert_eq!(kv[1].data_type(), &DataType::Utf8View);

        let back = cast_batch(&viewed, &without_views(&viewed.schema())).unwrap();
        assert_eq!(back, batch);
    }
}
