//! The stateless part of a rule: select columns, filter, compute, lowered
//! from DataFusion's optimized logical plan into physical expressions that
//! run on each batch without any planning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, BooleanArray, RecordBatch, RecordBatchOptions, StringArray, UInt32Array,
};
use arrow::compute::{cast, filter, filter_record_batch, take, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;
use tributary_engine::devices::DeviceTable;

use crate::error::{Error, Result};

type DfResult<T> = datafusion::error::Result<T>;

/// One step of a compiled rule.
#[derive(Debug, Clone)]
pub enum Step {
    /// Keep these columns.
    Select(Vec<usize>),
    /// Keep the rows where the predicate is true.
    Filter(Arc<dyn PhysicalExpr>),
    /// Compute new columns.
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
    /// Produce nothing (the optimizer proved no row can pass).
    Nothing,
    /// Looks each row's device up in the registry's devices table.
    Join(Arc<DeviceJoin>),
}

/// A join of the rule's rows with the `devices` table, by key.
#[derive(Debug)]
pub struct DeviceJoin {
    devices: Arc<DeviceTable>,
    /// Filters and projections the optimizer put on the devices side.
    device_steps: Vec<Step>,
    device_key: Arc<dyn PhysicalExpr>,
    stream_key: Arc<dyn PhysicalExpr>,
    /// LEFT JOIN: rows without a device stay, with nulls.
    keep_unmatched: bool,
    /// Whether the stream's columns come first in the join's output.
    stream_first: bool,
    /// Non-equality conditions of the ON clause, over the join's output.
    filter: Option<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    /// The devices side for the snapshot version it was built from.
    prepared: Mutex<Option<Prepared>>,
}

#[derive(Debug)]
struct Prepared {
    version: u64,
    batch: RecordBatch,
    index: HashMap<String, u32>,
}

impl DeviceJoin {
    fn prepared(&self) -> DfResult<(RecordBatch, HashMap<String, u32>)> {
        let snapshot = self.devices.snapshot();
        let mut guard = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = guard.as_ref().filter(|p| p.version == snapshot.version) {
            return Ok((p.batch.clone(), p.index.clone()));
        }
        let batch = match run_steps(&self.device_steps, &snapshot.batch)? {
            Some((b, _)) => b,
            None => {
                let schema = match self.device_steps.iter().rev().find_map(|s| match s {
                    Step::Project(_, schema) => Some(schema.clone()),
                    _ => None,
                }) {
                    Some(schema) => schema,
                    None => snapshot.batch.schema(),
                };
                RecordBatch::new_empty(schema)
            }
        };
        let keys = cast(
            &self
                .device_key
                .evaluate(&batch)?
                .into_array(batch.num_rows())?,
            &DataType::Utf8,
        )?;
        let mut index = HashMap::new();
        if let Some(keys) = keys.as_any().downcast_ref::<StringArray>() {
            for (i, k) in keys.iter().enumerate() {
                if let Some(k) = k {
                    index.entry(k.to_string()).or_insert(i as u32);
                }
            }
        }
        *guard = Some(Prepared {
            version: snapshot.version,
            batch: batch.clone(),
            index: index.clone(),
        });
        Ok((batch, index))
    }

    fn run(&self, input: &RecordBatch, rows: &UInt32Array) -> DfResult<(RecordBatch, UInt32Array)> {
        let (devices, index) = self.prepared()?;
        let keys = cast(
            &self
                .stream_key
                .evaluate(input)?
                .into_array(input.num_rows())?,
            &DataType::Utf8,
        )?;
        let keys = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| DataFusionError::Internal("join key is not text".into()))?;
        let mut left = Vec::with_capacity(input.num_rows());
        let mut right = Vec::with_capacity(input.num_rows());
        for (i, key) in keys.iter().enumerate() {
            match key.and_then(|k| index.get(k)) {
                Some(d) => {
                    left.push(i as u32);
                    right.push(Some(*d));
                }
                None if self.keep_unmatched => {
                    left.push(i as u32);
                    right.push(None);
                }
                None => {}
            }
        }
        let left = UInt32Array::from(left);
        let right = UInt32Array::from(right);
        let stream = take_record_batch(input, &left)?;
        let device_columns = devices
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &right, None))
            .collect::<Result<Vec<_>, _>>()?;
        let mut columns = Vec::new();
        if self.stream_first {
            columns.extend(stream.columns().iter().cloned());
            columns.extend(device_columns);
        } else {
            columns.extend(device_columns);
            columns.extend(stream.columns().iter().cloned());
        }
        let options = RecordBatchOptions::new().with_row_count(Some(left.len()));
        let joined = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        let rows = take(rows, &left, None)?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("row numbers lost".into()))?;
        let Some(filter_expr) = &self.filter else {
            return Ok((joined, rows));
        };
        let mask = filter_expr
            .evaluate(&joined)?
            .into_array(joined.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| DataFusionError::Internal("join filter is not boolean".into()))?;
        let rows = filter(&rows, mask)?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("row numbers lost".into()))?;
        Ok((filter_record_batch(&joined, mask)?, rows))
    }
}

/// What lowering a plan needs besides the plan.
pub struct Lowering<'a> {
    pub state: &'a SessionState,
    pub rule: &'a str,
    pub devices: &'a Arc<DeviceTable>,
}

/// Whether a plan reads the `devices` table.
fn reads_devices(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(scan) => scan.table_name.table() == "devices",
        other => other.inputs().into_iter().any(reads_devices),
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Select(c) => write!(f, "select columns {c:?}"),
            Step::Filter(p) => write!(f, "filter {p}"),
            Step::Project(e, _) => {
                let list: Vec<String> = e.iter().map(|e| e.to_string()).collect();
                write!(f, "project {}", list.join(", "))
            }
            Step::Nothing => write!(f, "nothing passes"),
            Step::Join(j) => write!(
                f,
                "{} devices on {} = {}",
                if j.keep_unmatched {
                    "left join"
                } else {
                    "join"
                },
                j.stream_key,
                j.device_key
            ),
        }
    }
}

/// The schema of a plan node with every column nullable (rules produce
/// nulls wherever an expression does).
pub fn nullable_schema(schema: &DFSchema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// Lowers the stateless plan from `plan` down to its table scan, or down to
/// `stop_at` (an Aggregate whose output the steps then read).
pub fn lower(
    plan: &LogicalPlan,
    cx: &Lowering<'_>,
    steps: &mut Vec<Step>,
    stop_at: Option<&LogicalPlan>,
) -> Result<()> {
    if stop_at.is_some_and(|s| std::ptr::eq(s, plan)) {
        return Ok(());
    }
    let (state, rule) = (cx.state, cx.rule);
    let physical = |e: &Expr, schema: &DFSchema| state.create_physical_expr(e.clone(), schema);
    match plan {
        LogicalPlan::TableScan(scan) => {
            if scan.fetch.is_some() {
                return Err(unsupported(rule, "LIMIT"));
            }
            if let Some(projection) = &scan.projection {
                steps.push(Step::Select(projection.clone()));
            }
            if let Some(predicate) = conjunction(scan.filters.iter().cloned()) {
                steps.push(Step::Filter(physical(&predicate, &scan.projected_schema)?));
            }
        }
        LogicalPlan::Filter(f) => {
            lower(&f.input, cx, steps, stop_at)?;
            steps.push(Step::Filter(physical(&f.predicate, f.input.schema())?));
        }
        LogicalPlan::Projection(p) => {
            lower(&p.input, cx, steps, stop_at)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema()))
                .collect::<DfResult<Vec<_>>>()?;
            steps.push(Step::Project(exprs, nullable_schema(&p.schema)));
        }
        LogicalPlan::SubqueryAlias(a) => lower(&a.input, cx, steps, stop_at)?,
        LogicalPlan::EmptyRelation(e) if !e.produce_one_row => steps.push(Step::Nothing),
        LogicalPlan::Aggregate(_) => {
            return Err(Error::plan(format!(
                "rule '{rule}': only one level of GROUP BY is supported in a rule (count(DISTINCT ...) needs two; use approx_distinct)"
            )));
        }
        LogicalPlan::Window(_) => {
            return Err(Error::plan(format!(
                "rule '{rule}': only one level of OVER is supported in a rule"
            )));
        }
        LogicalPlan::Join(join) => {
            let left_is_devices = reads_devices(&join.left);
            let right_is_devices = reads_devices(&join.right);
            let (stream_side, device_side, stream_first) = match (left_is_devices, right_is_devices)
            {
                (false, true) => (&join.left, &join.right, true),
                (true, false) => (&join.right, &join.left, false),
                _ => {
                    return Err(Error::plan(format!(
                        "rule '{rule}': a rule joins its stream with `devices` only (JOIN devices d ON t.device_id = d.id)"
                    )));
                }
            };
            use datafusion::logical_expr::JoinType;
            let keep_unmatched = match (join.join_type, stream_first) {
                (JoinType::Inner, _) => false,
                (JoinType::Left, true) | (JoinType::Right, false) => true,
                (other, _) => {
                    return Err(Error::plan(format!(
                        "rule '{rule}': {other} JOIN with devices is not supported; use JOIN or LEFT JOIN devices"
                    )));
                }
            };
            let [(l, r)] = join.on.as_slice() else {
                return Err(Error::plan(format!(
                    "rule '{rule}': join devices on one equality, e.g. ON t.device_id = d.id"
                )));
            };
            let (stream_key, device_key) = if stream_first { (l, r) } else { (r, l) };
            lower(stream_side, cx, steps, stop_at)?;
            let mut device_steps = Vec::new();
            lower(device_side, cx, &mut device_steps, None)?;
            let schema = nullable_schema(&join.schema);
            let filter = match &join.filter {
                Some(f) => Some(physical(f, &join.schema)?),
                None => None,
            };
            steps.push(Step::Join(Arc::new(DeviceJoin {
                devices: cx.devices.clone(),
                device_steps,
                device_key: physical(device_key, device_side.schema())?,
                stream_key: physical(stream_key, stream_side.schema())?,
                keep_unmatched,
                stream_first,
                filter,
                schema,
                prepared: Mutex::new(None),
            })));
        }
        LogicalPlan::Sort(_) => return Err(unsupported(rule, "ORDER BY")),
        LogicalPlan::Limit(_) => return Err(unsupported(rule, "LIMIT")),
        LogicalPlan::Distinct(_) => return Err(unsupported(rule, "DISTINCT")),
        LogicalPlan::Union(_) => return Err(unsupported(rule, "UNION")),
        other => {
            return Err(Error::plan(format!(
                "rule '{rule}': {} is not supported in rules",
                other.display()
            )));
        }
    }
    Ok(())
}

fn unsupported(rule: &str, what: &str) -> Error {
    Error::plan(format!(
        "rule '{rule}': {what} are not supported in rules; rules filter, project and aggregate over windows"
    ))
}

/// Runs steps over a batch. Returns the result and, for each of its rows,
/// the input row it came from.
pub fn run_steps(
    steps: &[Step],
    input: &RecordBatch,
) -> DfResult<Option<(RecordBatch, UInt32Array)>> {
    let mut batch = input.clone();
    let mut rows = UInt32Array::from_iter_values(0..input.num_rows() as u32);
    for step in steps {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        batch = match step {
            Step::Nothing => return Ok(None),
            Step::Join(join) => {
                let (joined, kept) = join.run(&batch, &rows)?;
                rows = kept;
                joined
            }
            Step::Select(columns) => batch.project(columns)?,
            Step::Filter(predicate) => {
                let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                let mask = mask
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        DataFusionError::Internal("rule filter is not boolean".into())
                    })?;
                if mask.true_count() == mask.len() && mask.null_count() == 0 {
                    continue;
                }
                let kept = filter(&rows, mask)?;
                rows = kept
                    .as_any()
                    .downcast_ref::<UInt32Array>()
                    .cloned()
                    .ok_or_else(|| DataFusionError::Internal("row numbers lost".into()))?;
                filter_record_batch(&batch, mask)?
            }
            Step::Project(exprs, schema) => {
                let columns = exprs
                    .iter()
                    .map(|e| e.evaluate(&batch)?.into_array(batch.num_rows()))
                    .collect::<DfResult<Vec<_>>>()?;
                let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                RecordBatch::try_new_with_options(schema.clone(), columns, &options)?
            }
        };
    }
    if batch.num_rows() == 0 {
        return Ok(None);
    }
    Ok(Some((batch, rows)))
}
