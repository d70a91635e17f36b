//! Compiling `CREATE RULE` into a program the engine runs on every batch.
//!
//! The rule's query is planned and optimized by DataFusion against the
//! stream's schema, then lowered into a short list of steps (select columns,
//! filter, project) made of DataFusion physical expressions. Running a rule on
//! a batch evaluates those expressions directly: no per-batch planning.
//!
//! Rules read one stream and may use any scalar function, `WHERE`, `CASE`,
//! casts and aliases. Aggregates, windows and joins are refused with a clear
//! message until the window engine lands.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::DFSchema;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::utils::conjunction;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast;
use tributary_engine::catalog::{Catalog, RuleDef, RuleTarget};
use tributary_engine::rule::RuleProgram;

use crate::context::new_session;
use crate::error::{Error, Result};
use crate::statement::RuleStatement;

/// A planned rule, ready to run.
pub struct CompiledRule {
    pub def: RuleDef,
    pub program: Box<dyn RuleProgram>,
    /// Names of the columns the rule produces.
    pub output: SchemaRef,
}

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("def", &self.def)
            .finish()
    }
}

/// Plans a rule against the streams in `catalog`.
pub async fn compile_rule(
    rule: &RuleStatement,
    catalog: &Catalog,
    now_ms: i64,
) -> Result<CompiledRule> {
    tributary_engine::event::validate_name("rule", &rule.name)?;
    let ctx = new_session();
    let statement = DfStatement::Statement(Box::new(ast::Statement::Query(rule.query.clone())));
    let state = ctx.state();
    let mut source = None;
    for table in state.resolve_table_references(&statement)? {
        let name = table.table().to_string();
        let Some(def) = catalog.stream(&name) else {
            return Err(Error::plan(format!(
                "rule '{}' reads stream '{name}', which does not exist; create it with CREATE STREAM {name} (...)",
                rule.name
            )));
        };
        if source.as_ref().is_some_and(|s| s != &name) {
            return Err(Error::plan(format!(
                "rule '{}' reads more than one stream ({} and {name}); joins in rules are not supported yet",
                rule.name,
                source.unwrap_or_default()
            )));
        }
        let table = MemTable::try_new(def.schema(), vec![vec![]])?;
        ctx.register_table(name.as_str(), Arc::new(table))?;
        source = Some(name);
    }
    let Some(source) = source else {
        return Err(Error::plan(format!(
            "rule '{}' reads no stream; a rule is INSERT INTO ... SELECT ... FROM <stream>",
            rule.name
        )));
    };
    if let RuleTarget::Stream(target) = &rule.target {
        if catalog.stream(target).is_none() {
            return Err(Error::plan(format!(
                "rule '{}' inserts into '{target}', which is neither `commands` nor a stream",
                rule.name
            )));
        }
        return Err(Error::plan(format!(
            "rule '{}': INSERT INTO a stream is not supported yet; rules insert into `commands`",
            rule.name
        )));
    }
    let state = ctx.state();
    let plan = state.statement_to_plan(statement).await?;
    let plan = state.optimize(&plan)?;
    let mut steps = Vec::new();
    lower(&plan, &state, &mut steps, &rule.name)?;
    let output = Arc::new(Schema::new(
        plan.schema()
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    check_commands_output(&rule.name, &output)?;
    let def = RuleDef {
        name: rule.name.clone(),
        sql: rule.sql.clone(),
        source,
        target: rule.target.clone(),
        created_at: now_ms,
    };
    Ok(CompiledRule {
        def,
        program: Box::new(Program {
            steps,
            output: output.clone(),
        }),
        output,
    })
}

/// `INSERT INTO commands` takes (device_id, name[, payload]) by position.
fn check_commands_output(rule: &str, schema: &Schema) -> Result<()> {
    let n = schema.fields().len();
    if !(2..=3).contains(&n) {
        return Err(Error::plan(format!(
            "rule '{rule}': INSERT INTO commands takes (device_id, name[, payload]) in that order; the SELECT has {n} column(s)"
        )));
    }
    for (i, what) in [(0, "device_id"), (1, "name")] {
        let f = schema.field(i);
        if !matches!(
            f.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        ) {
            return Err(Error::plan(format!(
                "rule '{rule}': column {} of INSERT INTO commands is the {what} and must be text, but '{}' is {}",
                i + 1,
                f.name(),
                f.data_type()
            )));
        }
    }
    Ok(())
}

/// One step of a compiled rule.
enum Step {
    /// Keep these columns.
    Select(Vec<usize>),
    /// Keep the rows where the predicate is true.
    Filter(Arc<dyn PhysicalExpr>),
    /// Compute new columns.
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
    /// Produce nothing (the optimizer proved no row can pass).
    Nothing,
}

fn lower(
    plan: &LogicalPlan,
    state: &SessionState,
    steps: &mut Vec<Step>,
    rule: &str,
) -> Result<()> {
    let physical = |e: &datafusion::logical_expr::Expr, schema: &DFSchema| {
        state.create_physical_expr(e.clone(), schema)
    };
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
            lower(&f.input, state, steps, rule)?;
            steps.push(Step::Filter(physical(&f.predicate, f.input.schema())?));
        }
        LogicalPlan::Projection(p) => {
            lower(&p.input, state, steps, rule)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema()))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            let schema = Arc::new(Schema::new(
                p.schema
                    .fields()
                    .iter()
                    .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                    .collect::<Vec<_>>(),
            ));
            steps.push(Step::Project(exprs, schema));
        }
        LogicalPlan::SubqueryAlias(a) => lower(&a.input, state, steps, rule)?,
        LogicalPlan::EmptyRelation(e) if !e.produce_one_row => steps.push(Step::Nothing),
        LogicalPlan::Aggregate(_) => {
            return Err(unsupported(rule, "GROUP BY and aggregate functions"));
        }
        LogicalPlan::Window(_) => return Err(unsupported(rule, "window functions (OVER)")),
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
        "rule '{rule}': {what} are not supported in rules yet; rules filter and project single events"
    ))
}

/// The compiled steps of a rule.
struct Program {
    steps: Vec<Step>,
    output: SchemaRef,
}

impl RuleProgram for Program {
    fn process(&mut self, batch: &RecordBatch) -> std::result::Result<Option<RecordBatch>, String> {
        run_steps(&self.steps, batch, &self.output).map_err(|e| e.to_string())
    }
}

fn run_steps(
    steps: &[Step],
    input: &RecordBatch,
    output: &SchemaRef,
) -> datafusion::error::Result<Option<RecordBatch>> {
    let mut batch = input.clone();
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
                        datafusion::error::DataFusionError::Internal(
                            "rule filter is not boolean".into(),
                        )
                    })?;
                filter_record_batch(&batch, mask)?
            }
            Step::Project(exprs, schema) => {
                let columns = exprs
                    .iter()
                    .map(|e| e.evaluate(&batch)?.into_array(batch.num_rows()))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                RecordBatch::try_new_with_options(schema.clone(), columns, &options)?
            }
        };
    }
    if batch.num_rows() == 0 {
        return Ok(None);
    }
    if batch.schema().fields().len() != output.fields().len() {
        return Err(datafusion::error::DataFusionError::Internal(
            "rule produced a different number of columns than planned".into(),
        ));
    }
    let columns: Vec<Arc<dyn Array>> = batch.columns().to_vec();
    Ok(Some(RecordBatch::try_new(output.clone(), columns)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statement::{Statement, parse};
    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};

    fn catalog() -> Catalog {
        let c = Catalog::in_memory();
        c.add_stream(
            StreamDef::new(
                "telemetry",
                vec![
                    ColumnDef {
                        name: "temp".into(),
                        ty: ColumnType::Float64,
                    },
                    ColumnDef {
                        name: "label".into(),
                        ty: ColumnType::Utf8,
                    },
                ],
                1,
            )
            .unwrap(),
        )
        .unwrap();
        c
    }

    fn events(temps: &[Option<f64>]) -> RecordBatch {
        let c = catalog();
        let n = temps.len();
        RecordBatch::try_new(
            c.stream("telemetry").unwrap().schema(),
            vec![
                Arc::new(StringArray::from(
                    (0..n).map(|i| format!("d{i}")).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMillisecondArray::from(vec![0i64; n]).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(vec![0i64; n]).with_timezone("UTC")),
                Arc::new(Float64Array::from(temps.to_vec())),
                Arc::new(StringArray::from(vec![Some("x"); n])),
            ],
        )
        .unwrap()
    }

    async fn compile(sql: &str) -> Result<CompiledRule> {
        let Statement::CreateRule(r) = parse(sql)? else {
            panic!("not a rule: {sql}")
        };
        compile_rule(&r, &catalog(), 0).await
    }

    #[tokio::test]
    async fn filter_and_project_run_on_batches() {
        let mut rule = compile(
            "CREATE RULE hot AS INSERT INTO commands SELECT device_id, 'fan_on' AS name, CAST(temp AS VARCHAR) AS payload FROM telemetry WHERE temp > 80",
        )
        .await
        .unwrap();
        assert_eq!(rule.def.source, "telemetry");
        let out = rule
            .program
            .process(&events(&[Some(85.5), Some(20.0), None, Some(99.0)]))
            .unwrap()
            .unwrap();
        assert_eq!(out.num_rows(), 2);
        let devices = arrow::compute::cast(out.column(0), &DataType::Utf8).unwrap();
        let devices = devices.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(devices.value(0), "d0");
        assert_eq!(devices.value(1), "d3");
        let payload = arrow::compute::cast(out.column(2), &DataType::Utf8).unwrap();
        assert_eq!(
            payload
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .value(0),
            "85.5"
        );
        assert!(
            rule.program
                .process(&events(&[Some(1.0)]))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn scalar_functions_and_case_work() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT upper(device_id), CASE WHEN temp > 50 THEN 'hot' ELSE 'cold' END, round(temp * 2) FROM telemetry WHERE label = 'x' AND temp IS NOT NULL",
        )
        .await
        .unwrap();
        let out = rule
            .program
            .process(&events(&[Some(60.2), None, Some(3.0)]))
            .unwrap()
            .unwrap();
        assert_eq!(out.num_rows(), 2);
    }

    #[tokio::test]
    async fn bad_rules_are_refused_with_reasons() {
        let cases = [
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x' FROM nope",
                "stream 'nope', which does not exist",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x' FROM telemetry WHERE tempp > 1",
                "tempp",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id FROM telemetry",
                "(device_id, name[, payload])",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT temp, 'x' FROM telemetry",
                "must be text",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', count(*) FROM telemetry GROUP BY device_id",
                "aggregate",
            ),
            (
                "CREATE RULE r AS INSERT INTO elsewhere SELECT device_id, 'x' FROM telemetry",
                "neither `commands` nor a stream",
            ),
        ];
        for (sql, expected) in cases {
            let err = compile(sql).await.unwrap_err();
            assert!(err.to_string().contains(expected), "{sql}: {err}");
            assert!(err.is_user_error(), "{sql}: {err}");
        }
    }

    #[tokio::test]
    async fn unknown_column_error_has_a_position() {
        let err = compile("CREATE RULE r AS INSERT INTO commands\nSELECT device_id, 'x' FROM telemetry WHERE tempp > 1")
            .await
            .unwrap_err();
        let loc = err.location().expect("a location");
        assert_eq!(loc.line, 2, "{err}");
    }
}
