//! The stateless part of a rule: select columns, filter, compute, lowered
//! from DataFusion's optimized logical plan into physical expressions that
//! run on each batch without any planning.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, RecordBatchOptions, UInt32Array};
use arrow::compute::{filter, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;

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
    state: &SessionState,
    steps: &mut Vec<Step>,
    rule: &str,
    stop_at: Option<&LogicalPlan>,
) -> Result<()> {
    if stop_at.is_some_and(|s| std::ptr::eq(s, plan)) {
        return Ok(());
    }
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
            lower(&f.input, state, steps, rule, stop_at)?;
            steps.push(Step::Filter(physical(&f.predicate, f.input.schema())?));
        }
        LogicalPlan::Projection(p) => {
            lower(&p.input, state, steps, rule, stop_at)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema()))
                .collect::<DfResult<Vec<_>>>()?;
            steps.push(Step::Project(exprs, nullable_schema(&p.schema)));
        }
        LogicalPlan::SubqueryAlias(a) => lower(&a.input, state, steps, rule, stop_at)?,
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
        LogicalPlan::Join(_) => return Err(unsupported(rule, "joins")),
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
