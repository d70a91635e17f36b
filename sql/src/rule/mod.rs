//! Compiling `CREATE RULE` (and `CREATE STREAM ... AS SELECT`) into a
//! program the engine runs on every batch of the rule's source.
//!
//! The rule's query is planned and optimized by DataFusion against the
//! stream's schema, then lowered: stateless steps (select, filter, project)
//! made of DataFusion physical expressions, and for windowed rules the
//! aggregate's physical accumulators, folded per window as events arrive and
//! finished when the window closes. Nothing is planned per batch.

mod arrival;
mod over;
mod stateless;
mod steps;
mod target;
mod window_sql;
mod windowed;

use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::logical_expr::{Aggregate as AggregateNode, Expr, ExprSchemable, LogicalPlan};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast;
use tributary_engine::catalog::{Catalog, RESERVED_NAMES, RuleDef, RuleTarget};
use tributary_engine::devices::{DeviceTable, device_schema};
use tributary_engine::event::{DEVICE_ID, StreamDef, timestamp_type};
use tributary_engine::rule::RuleProgram;

use crate::context::new_session;
use crate::error::{Error, Result};
use crate::statement::RuleStatement;
use crate::window::{Aggregate, TimeOptions, Watermarks, WindowSpec};

pub use target::{LATE_RULE_COLUMN, late_stream};
pub use window_sql::{WINDOW_END, WINDOW_START};

use stateless::StatelessProgram;
use steps::{Lowering, lower, nullable_schema};
use target::{Target, derived_stream};
use windowed::{KeySource, Live, WindowedProgram, describe_time};

/// A planned rule, ready to run.
pub struct CompiledRule {
    pub def: RuleDef,
    pub program: Box<dyn RuleProgram>,
    /// The columns the rule produces.
    pub output: SchemaRef,
    /// Streams the rule needs that may not exist yet: the stream a
    /// `CREATE STREAM ... AS SELECT` feeds, and the late-events stream.
    pub new_streams: Vec<StreamDef>,
    /// What the rule does, step by step, for `EXPLAIN RULE`.
    pub explain: Vec<String>,
}

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("def", &self.def)
            .finish()
    }
}

/// Plans a rule against the streams in `catalog`. Nothing is changed: the
/// caller saves the rule (and its new streams) once this succeeds.
pub async fn compile_rule(
    rule: &RuleStatement,
    catalog: &Catalog,
    now_ms: i64,
) -> Result<CompiledRule> {
    compile_rule_with_devices(rule, catalog, &Arc::new(DeviceTable::default()), now_ms).await
}

/// Plans a rule whose joins with `devices` read `devices`.
pub async fn compile_rule_with_devices(
    rule: &RuleStatement,
    catalog: &Catalog,
    devices: &Arc<DeviceTable>,
    now_ms: i64,
) -> Result<CompiledRule> {
    tributary_engine::event::validate_name("rule", &rule.name)?;
    let mut query = rule.query.clone();
    let window_call = window_sql::take_window(&mut query)?;
    let grouping_at = window_sql::grouping_location(&query);
    let ctx = new_session();
    let statement = DfStatement::Statement(Box::new(ast::Statement::Query(query)));
    let state = ctx.state();
    let mut source: Option<StreamDef> = None;
    for table in state.resolve_table_references(&statement)? {
        let name = table.table().to_string();
        if name == "devices" {
            let table = MemTable::try_new(device_schema(), vec![vec![]])?;
            ctx.register_table("devices", Arc::new(table))?;
            continue;
        }
        if RESERVED_NAMES.contains(&name.as_str()) {
            return Err(Error::plan(format!(
                "rule '{}' reads '{name}'; rules read streams, and joins with '{name}' are not supported yet",
                rule.name
            )));
        }
        let Some(def) = catalog.stream(&name) else {
            return Err(Error::plan(format!(
                "rule '{}' reads stream '{name}', which does not exist; create it with CREATE STREAM {name} (...)",
                rule.name
            )));
        };
        if let Some(s) = source.as_ref().filter(|s| s.name != name) {
            return Err(Error::plan(format!(
                "rule '{}' reads more than one stream ({} and {name}); joins between streams are not supported",
                rule.name, s.name
            )));
        }
        let mut schema = Schema::clone(&def.schema());
        if window_call.is_some() {
            let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
            fields.push(Arc::new(Field::new(WINDOW_START, timestamp_type(), false)));
            fields.push(Arc::new(Field::new(WINDOW_END, timestamp_type(), false)));
            schema = Schema::new(fields);
        }
        let table = MemTable::try_new(Arc::new(schema), vec![vec![]])?;
        ctx.register_table(name.as_str(), Arc::new(table))?;
        source = Some(def);
    }
    let Some(source) = source else {
        return Err(Error::plan(format!(
            "rule '{}' reads no stream; a rule is INSERT INTO ... SELECT ... FROM <stream>",
            rule.name
        )));
    };
    let spec = match &window_call {
        Some(call) => Some(call.evaluate(&ctx).await?),
        None => None,
    };
    let state = ctx.state();
    let plan = state.statement_to_plan(statement).await?;
    let plan = state.optimize(&plan)?;
    let output = nullable_schema(plan.schema());

    let mut new_streams = Vec::new();
    let target = match &rule.target {
        RuleTarget::Commands => Target::commands(&rule.name, &output)?,
        RuleTarget::Stream(name) => {
            let def = match (&rule.creates_stream, catalog.stream(name)) {
                (Some(options), existing) => {
                    let def = derived_stream(name, &output, options)?;
                    match existing {
                        // The same definition: a restart, or a replacement
                        // with the same columns.
                        Some(e) if e == def => {}
                        Some(_) => {
                            return Err(Error::plan(format!(
                                "stream '{name}' already exists; choose another name for the derived stream"
                            )));
                        }
                        None => new_streams.push(def.clone()),
                    }
                    def
                }
                (None, Some(def)) => def,
                (None, None) => {
                    return Err(Error::plan(format!(
                        "rule '{}' inserts into '{name}', which is neither `commands` nor a stream",
                        rule.name
                    )));
                }
            };
            if def.name == source.name {
                return Err(Error::plan(format!(
                    "rule '{}' would insert into the stream it reads ('{name}'), feeding itself forever",
                    rule.name
                )));
            }
            Target::stream(&rule.name, &output, &def)?
        }
    };

    let cx = Lowering {
        state: &state,
        rule: &rule.name,
        devices,
    };
    let aggregate = find_aggregate(&plan);
    let over = find_window(&plan);
    let mut explain = vec![format!("source: {}", source.name)];
    let mut late_stream_name = None;
    let program: Box<dyn RuleProgram> = match (spec, aggregate) {
        (None, None) if over.is_some() => {
            let node = over.ok_or_else(|| Error::Internal("window node".into()))?;
            let time = TimeOptions::from_options(&source.options).map_err(Error::plan)?;
            let late = late_stream(&source)?;
            late_stream_name = Some(late.name.clone());
            if catalog.stream(&late.name).is_none() {
                new_streams.push(late.clone());
            }
            Box::new(over_program(
                &cx,
                time,
                node,
                &plan,
                output.clone(),
                target.clone(),
                late.schema(),
                &mut explain,
            )?)
        }
        (_, Some(_)) if over.is_some() => {
            return Err(Error::plan(format!(
                "rule '{}': a rule either aggregates over a window (GROUP BY) or computes per event (OVER), not both",
                rule.name
            )));
        }
        (None, None) => {
            let mut steps = Vec::new();
            lower(&plan, &cx, &mut steps, None)?;
            explain.extend(steps.iter().map(|s| format!("step: {s}")));
            Box::new(StatelessProgram {
                steps,
                output: output.clone(),
                target: target.clone(),
            })
        }
        (None, Some(_)) => {
            return Err(Error::Plan {
                message: format!(
                    "rule '{}': aggregates over a stream need a window, since the stream never ends; group by one, e.g. GROUP BY device_id, tumble(ts, INTERVAL '1' MINUTE)",
                    rule.name
                ),
                location: grouping_at,
            });
        }
        (Some(_), None) => {
            return Err(Error::Internal(
                "a windowed rule was planned without an aggregate".into(),
            ));
        }
        (Some(spec), Some(node)) => {
            let time = TimeOptions::from_options(&source.options).map_err(Error::plan)?;
            let late = late_stream(&source)?;
            late_stream_name = Some(late.name.clone());
            if catalog.stream(&late.name).is_none() {
                new_streams.push(late.clone());
            }
            let program = windowed(
                &cx,
                spec,
                time,
                node,
                &plan,
                output.clone(),
                target.clone(),
                late.schema(),
                &source,
                &mut explain,
            )?;
            Box::new(program)
        }
    };
    explain.push(format!("output: {}", describe_schema(&output)));
    explain.push(format!("target: {}", rule.target));
    explain.push(format!("plan:\n{}", plan.display_indent()));
    let def = RuleDef {
        name: rule.name.clone(),
        sql: rule.sql.clone(),
        source: source.name.clone(),
        target: rule.target.clone(),
        created_at: now_ms,
        paused: false,
        late_stream: late_stream_name,
    };
    Ok(CompiledRule {
        def,
        program,
        output,
        new_streams,
        explain,
    })
}

fn describe_schema(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The plan's Aggregate node, if any.
fn find_aggregate(plan: &LogicalPlan) -> Option<&AggregateNode> {
    match plan {
        LogicalPlan::Aggregate(a) => Some(a),
        other => other.inputs().into_iter().find_map(find_aggregate),
    }
}

#[allow(clippy::too_many_arguments)]
fn windowed(
    cx: &Lowering<'_>,
    spec: WindowSpec,
    time: TimeOptions,
    node: &AggregateNode,
    plan: &LogicalPlan,
    output: SchemaRef,
    target: Target,
    late_schema: SchemaRef,
    source: &StreamDef,
    explain: &mut Vec<String>,
) -> Result<WindowedProgram> {
    let (rule, state) = (cx.rule, cx.state);
    let aggregate_plan = plan_node(plan, node)
        .ok_or_else(|| Error::Internal("the aggregate is not part of the plan".into()))?;
    // Below the aggregate: stateless steps over the source.
    let mut pre = Vec::new();
    lower(&node.input, cx, &mut pre, None)?;
    // Above it: HAVING and the SELECT list.
    let mut post = Vec::new();
    lower(plan, cx, &mut post, Some(aggregate_plan))?;

    let input_schema = node.input.schema();
    let input_arrow = input_schema.as_arrow();
    let mut sources = Vec::new();
    let mut keys = Vec::new();
    let mut key_fields = Vec::new();
    let mut device_key = None;
    let mut time_expr = None;
    if node
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(Error::plan(format!(
            "rule '{rule}': GROUPING SETS, CUBE and ROLLUP are not supported in rules"
        )));
    }
    for e in &node.group_expr {
        let column = match e {
            Expr::Column(c) => Some(c.name.as_str()),
            _ => None,
        };
        match column {
            Some(WINDOW_START) => {
                sources.push(KeySource::WindowStart);
                time_expr = Some(state.create_physical_expr(e.clone(), input_schema)?);
            }
            Some(WINDOW_END) => sources.push(KeySource::WindowEnd),
            _ => {
                if column == Some(DEVICE_ID) {
                    device_key = Some(keys.len());
                }
                sources.push(KeySource::User(keys.len()));
                let field = e.to_field(input_schema)?.1;
                key_fields.push(Field::new(
                    format!("k{}", keys.len()),
                    field.data_type().clone(),
                    true,
                ));
                keys.push(state.create_physical_expr(e.clone(), input_schema)?);
            }
        }
    }
    let time_expr = time_expr.ok_or_else(|| {
        Error::Internal("the window start is not among the grouping columns".into())
    })?;
    let mut aggregates = Vec::new();
    for e in &node.aggr_expr {
        // The builder that replaces this needs a planning context DataFusion
        // keeps to itself; the result is the same.
        #[allow(deprecated)]
        let (expr, filter, _) =
            datafusion::physical_planner::create_aggregate_expr_and_maybe_filter(
                e,
                input_schema,
                input_arrow,
                state.execution_props(),
            )?;
        aggregates.push(aggregate(expr, filter));
    }
    let aggregate_schema = nullable_schema(&node.schema);
    let per_device = device_key.is_some();
    explain.push(format!("window: {spec} over ts"));
    explain.push(describe_time(time, per_device));
    explain.extend(pre.iter().map(|s| format!("before the window: {s}")));
    explain.push(format!(
        "group by: {}",
        node.group_expr
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    explain.push(format!(
        "aggregates (kept as accumulator state per open window): {}",
        node.aggr_expr
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    explain.extend(post.iter().map(|s| format!("when a window closes: {s}")));
    explain.push(format!("late events go to: {}_late", source.name));
    let signature = format!(
        "{}|{spec}|{time:?}|{}|{:?}|{:?}",
        source.name,
        node.input.display_indent(),
        node.group_expr,
        node.aggr_expr
    );
    let windows = windowed::Windows::new(
        spec,
        aggregates,
        &Arc::new(Schema::new(key_fields)),
        per_device,
    )?;
    Ok(WindowedProgram {
        rule: rule.to_string(),
        spec,
        pre,
        keys,
        time: time_expr,
        device_key,
        sources,
        aggregate_schema,
        post,
        output,
        target,
        late_schema,
        signature,
        state: Live {
            watermarks: Watermarks::new(time, !per_device),
            windows,
            late_events: 0,
        },
        touched: Vec::new(),
    })
}

fn aggregate(
    expr: Arc<AggregateFunctionExpr>,
    filter: Option<Arc<dyn datafusion::physical_expr::PhysicalExpr>>,
) -> Aggregate {
    Aggregate {
        args: expr.expressions(),
        expr,
        filter,
    }
}

/// The plan's Window node (OVER), if any.
fn find_window(plan: &LogicalPlan) -> Option<&datafusion::logical_expr::Window> {
    match plan {
        LogicalPlan::Window(w) => Some(w),
        other => other.inputs().into_iter().find_map(find_window),
    }
}

#[allow(clippy::too_many_arguments)]
fn over_program(
    cx: &Lowering<'_>,
    time: TimeOptions,
    node: &datafusion::logical_expr::Window,
    plan: &LogicalPlan,
    output: SchemaRef,
    target: Target,
    late_schema: SchemaRef,
    explain: &mut Vec<String>,
) -> Result<over::OverProgram> {
    use datafusion::logical_expr::{WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition};
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    let (rule, state) = (cx.rule, cx.state);

    let holder = find_plan(
        plan,
        &|p| matches!(p, LogicalPlan::Window(w) if std::ptr::eq(w, node)),
    )
    .ok_or_else(|| Error::Internal("the window is not part of the plan".into()))?;
    let mut pre = Vec::new();
    lower(&node.input, cx, &mut pre, None)?;
    let mut post = Vec::new();
    lower(plan, cx, &mut post, Some(holder))?;
    let input_schema = node.input.schema();
    let input_arrow = Arc::new(input_schema.as_arrow().clone());
    let unsupported = |what: String| {
        Error::plan(format!(
            "rule '{rule}': {what}; rules support OVER (PARTITION BY ... ORDER BY ts [ROWS|RANGE BETWEEN ... PRECEDING AND CURRENT ROW]) with lag, row_number and aggregates"
        ))
    };
    let mut partition: Option<Vec<Expr>> = None;
    let mut functions = Vec::new();
    let mut names = Vec::new();
    for e in &node.window_expr {
        let Expr::WindowFunction(w) = e.clone().unalias() else {
            return Err(unsupported(format!("{e} is not a window function")));
        };
        let params = &w.params;
        match &partition {
            Some(p) if p != &params.partition_by => {
                return Err(unsupported(
                    "every OVER in a rule must use the same PARTITION BY".into(),
                ));
            }
            _ => partition = Some(params.partition_by.clone()),
        }
        let ordered_by_ts = params.order_by.len() == 1
            && params.order_by[0].asc
            && matches!(&params.order_by[0].expr, Expr::Column(c) if c.name == tributary_engine::event::TS);
        if !ordered_by_ts {
            return Err(unsupported(format!(
                "{e}: OVER must be ORDER BY ts (ascending), the event time"
            )));
        }
        if params.filter.is_some() || params.distinct {
            return Err(unsupported(format!("{e}: FILTER and DISTINCT")));
        }
        let physical = |x: &Expr| state.create_physical_expr(x.clone(), input_schema);
        let function = match &w.fun {
            WindowFunctionDefinition::WindowUDF(udf) => match udf.name() {
                "lag" => {
                    let arg = params
                        .args
                        .first()
                        .ok_or_else(|| unsupported("lag needs an argument".into()))?;
                    let offset = match params.args.get(1) {
                        None => 1,
                        Some(Expr::Literal(v, _)) => usize::try_from(
                            v.cast_to(&arrow::datatypes::DataType::Int64)
                                .ok()
                                .and_then(|v| match v {
                                    datafusion::common::ScalarValue::Int64(Some(n)) => Some(n),
                                    _ => None,
                                })
                                .unwrap_or(-1),
                        )
                        .map_err(|_| unsupported("lag's offset must be a whole number".into()))?,
                        Some(other) => {
                            return Err(unsupported(format!(
                                "lag's offset {other} must be a constant"
                            )));
                        }
                    };
                    let ty = e.to_field(node.schema.as_ref())?.1.data_type().clone();
                    let default = match params.args.get(2) {
                        None => datafusion::common::ScalarValue::try_new_null(&ty)?,
                        Some(Expr::Literal(v, _)) => v.cast_to(&ty)?,
                        Some(other) => {
                            return Err(unsupported(format!(
                                "lag's default {other} must be a constant"
                            )));
                        }
                    };
                    over::OverFn::Lag {
                        arg: physical(arg)?,
                        offset,
                        default,
                    }
                }
                "row_number" => over::OverFn::RowNumber,
                other => return Err(unsupported(format!("window function {other}"))),
            },
            WindowFunctionDefinition::AggregateUDF(udf) => {
                let frame = &params.window_frame;
                if !matches!(frame.end_bound, WindowFrameBound::CurrentRow) {
                    return Err(unsupported(format!(
                        "{e}: a frame must end at CURRENT ROW (a stream has no following rows yet)"
                    )));
                }
                let start = match &frame.start_bound {
                    WindowFrameBound::Preceding(v) if v.is_null() => None,
                    WindowFrameBound::Preceding(v) => Some(v.clone()),
                    WindowFrameBound::CurrentRow => {
                        Some(datafusion::common::ScalarValue::UInt64(Some(0)))
                    }
                    WindowFrameBound::Following(_) => {
                        return Err(unsupported(format!("{e}: FOLLOWING")));
                    }
                };
                let frame = match frame.units {
                    WindowFrameUnits::Rows => over::Frame::Rows(match start {
                        None => None,
                        Some(v) => Some(match v.cast_to(&arrow::datatypes::DataType::UInt64)? {
                            datafusion::common::ScalarValue::UInt64(Some(n)) => n,
                            _ => return Err(unsupported(format!("{e}: ROWS needs a count"))),
                        }),
                    }),
                    WindowFrameUnits::Range => over::Frame::Range(match start {
                        None => None,
                        Some(v) => Some(frame_ms(&v).ok_or_else(|| {
                            unsupported(format!(
                                "{e}: RANGE over ts takes an INTERVAL (months have no fixed length)"
                            ))
                        })?),
                    }),
                    WindowFrameUnits::Groups => {
                        return Err(unsupported(format!("{e}: GROUPS frames")));
                    }
                };
                let args = params
                    .args
                    .iter()
                    .map(physical)
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                let expr = AggregateExprBuilder::new(udf.clone(), args.clone())
                    .schema(input_arrow.clone())
                    .alias(e.schema_name().to_string())
                    .build()?;
                let expr = Arc::new(expr);
                if over::bounded(frame) {
                    expr.create_sliding_accumulator().map_err(|_| {
                        unsupported(format!(
                            "{e}: {} cannot drop rows from a bounded frame; use a frame from the partition's start",
                            udf.name()
                        ))
                    })?;
                }
                over::OverFn::Aggregate { expr, args, frame }
            }
        };
        functions.push(function);
        names.push(e.to_string());
    }
    let partition = partition.unwrap_or_default();
    let mut keys = Vec::new();
    let mut fields = Vec::new();
    let mut device_key = None;
    for (i, p) in partition.iter().enumerate() {
        if matches!(p, Expr::Column(c) if c.name == DEVICE_ID) {
            device_key = Some(i);
        }
        fields.push(arrow::row::SortField::new(
            p.to_field(input_schema)?.1.data_type().clone(),
        ));
        keys.push(state.create_physical_expr(p.clone(), input_schema)?);
    }
    let order = state.create_physical_expr(
        Expr::Column(datafusion::common::Column::from_name(
            tributary_engine::event::TS,
        )),
        input_schema,
    )?;
    let window_schema = nullable_schema(&node.schema);
    let types = window_schema.fields()[input_schema.fields().len()..]
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    let per_device = device_key.is_some();
    explain.extend(pre.iter().map(|s| format!("before OVER: {s}")));
    explain.push(format!("per event: {}", names.join(", ")));
    explain.push(format!(
        "events wait for their watermark, then go in ts order per partition; {}",
        describe_time(time, per_device)
    ));
    explain.extend(post.iter().map(|s| format!("after OVER: {s}")));
    Ok(over::OverProgram::new(
        rule.to_string(),
        pre,
        (keys, fields, device_key),
        order,
        functions,
        types,
        window_schema,
        post,
        output,
        target,
        late_schema,
        Watermarks::new(time, !per_device),
    )?)
}

/// A RANGE frame's start, in ms.
fn frame_ms(v: &datafusion::common::ScalarValue) -> Option<i64> {
    use datafusion::common::ScalarValue;
    match v {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            Some(i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            Some(i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds))
        }
        _ => None,
    }
}

/// The first node of `plan` (itself included) that matches.
fn find_plan<'a>(
    plan: &'a LogicalPlan,
    matches: &dyn Fn(&LogicalPlan) -> bool,
) -> Option<&'a LogicalPlan> {
    if matches(plan) {
        return Some(plan);
    }
    plan.inputs()
        .into_iter()
        .find_map(|p| find_plan(p, matches))
}

/// `node` as the `LogicalPlan` that holds it, found in `plan`.
fn plan_node<'a>(plan: &'a LogicalPlan, node: &AggregateNode) -> Option<&'a LogicalPlan> {
    match plan {
        LogicalPlan::Aggregate(a) if std::ptr::eq(a, node) => Some(plan),
        other => other.inputs().into_iter().find_map(|p| plan_node(p, node)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statement::{Statement, parse};
    use arrow::array::RecordBatch;
    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::DataType;
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

    /// Runs a program over one record and returns the rows it emitted.
    fn run(program: &mut Box<dyn RuleProgram>, batch: RecordBatch) -> Option<RecordBatch> {
        let record = tributary_engine::log::Record {
            partition: 0,
            offset: 0,
            batch,
        };
        let mut out = tributary_engine::rule::Output::default();
        program.process(&[record], &mut out).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let batches: Vec<_> = out.rows.into_iter().map(|e| e.batch).collect();
        if batches.is_empty() {
            return None;
        }
        Some(arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap())
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
        let out = run(
            &mut rule.program,
            events(&[Some(85.5), Some(20.0), None, Some(99.0)]),
        )
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
        assert!(run(&mut rule.program, events(&[Some(1.0)])).is_none());
    }

    #[tokio::test]
    async fn scalar_functions_and_case_work() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT upper(device_id), CASE WHEN temp > 50 THEN 'hot' ELSE 'cold' END, round(temp * 2) FROM telemetry WHERE label = 'x' AND temp IS NOT NULL",
        )
        .await
        .unwrap();
        let out = run(&mut rule.program, events(&[Some(60.2), None, Some(3.0)])).unwrap();
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
                "need a window",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id, tumble(received_at, INTERVAL '1' SECOND)",
                "first argument is `ts`",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id, hop(ts, INTERVAL '3' SECOND, INTERVAL '10' SECOND)",
                "whole number of slides",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '1' MONTH)",
                "months",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id, tumble(ts)",
                "takes 2 arguments",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(nope) FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '1' SECOND)",
                "nope",
            ),
            (
                "CREATE RULE r AS INSERT INTO telemetry SELECT device_id, temp FROM telemetry",
                "feeding itself",
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

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::statement::{Statement, parse};
    use arrow::array::RecordBatch;
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use tributary_engine::event::{ColumnDef, ColumnType};
    use tributary_engine::log::Record;
    use tributary_engine::rule::Output;

    pub(super) fn catalog(delay: &str) -> Catalog {
        catalog_with(&[("watermark_delay", delay)])
    }

    /// The stream `t (temp DOUBLE)` with these options.
    fn catalog_with(options: &[(&str, &str)]) -> Catalog {
        let c = Catalog::in_memory();
        let mut def = StreamDef::new(
            "t",
            vec![ColumnDef {
                name: "temp".into(),
                ty: ColumnType::Float64,
            }],
            1,
        )
        .unwrap();
        for (name, value) in options {
            def.options.insert(name.to_string(), value.to_string());
        }
        c.add_stream(def).unwrap();
        c
    }

    pub(super) fn batch(rows: &[(&str, i64, f64)]) -> Record {
        let schema = catalog("0s").stream("t").unwrap().schema();
        let ts: Vec<i64> = rows.iter().map(|r| r.1).collect();
        Record {
            partition: 0,
            offset: 0,
            batch: RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(
                        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                    )),
                    Arc::new(TimestampMillisecondArray::from(ts.clone()).with_timezone("UTC")),
                    Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
                    Arc::new(Float64Array::from(
                        rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                    )),
                ],
            )
            .unwrap(),
        }
    }

    async fn compile(sql: &str, delay: &str) -> CompiledRule {
        let Statement::CreateRule(r) = parse(sql).unwrap() else {
            panic!("not a rule")
        };
        compile_rule(&r, &catalog(delay), 0).await.unwrap()
    }

    #[tokio::test]
    async fn tumbling_average_per_device_emits_when_the_watermark_passes() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'avg', avg(temp) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND) HAVING count(*) > 1",
            "2s",
        )
        .await;
        let mut out = Output::default();
        rule.program
            .process(
                &[batch(&[
                    ("a", 1_000, 10.0),
                    ("a", 9_000, 20.0),
                    ("b", 500, 1.0),
                    // Out of order within the delay: still counts.
                    ("a", 8_500, 30.0),
                    ("a", 11_000, 0.0),
                ])],
                &mut out,
            )
            .unwrap();
        // a's watermark is 9s: its first window is still open.
        assert!(out.rows.is_empty());
        rule.program
            .process(
                &[batch(&[("a", 12_000, 0.0), ("a", 1_000, 99.0)])],
                &mut out,
            )
            .unwrap();
        assert_eq!(out.rows.len(), 1);
        let rows = &out.rows[0].batch;
        assert_eq!(rows.num_rows(), 1);
        let avg = rows
            .column(2)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(avg.value(0), 20.0);
        assert_eq!(
            out.late.len(),
            1,
            "the event at 1s came after a's watermark"
        );
        assert_eq!(rule.program.stats().late_events, 1);
        // b's window stays open on its own clock.
        assert_eq!(rule.program.stats().open_windows, 2);
        // The id is derived from the window and the key, so a replay repeats it.
        assert!(out.rows[0].ids.get(0).unwrap().starts_with("w:0:10000:"));
    }

    /// Regression: a HAVING that failed on one window's value used to make
    /// `process` fail, and the runtime re-fed records already folded.
    #[tokio::test]
    async fn a_window_whose_having_fails_is_counted_and_the_rule_goes_on() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'avg', avg(temp) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND) HAVING CAST(avg(temp) AS TINYINT) > 0",
            "0s",
        )
        .await;
        let mut out = Output::default();
        rule.program
            .process(
                &[batch(&[("a", 1_000, 1000.0), ("a", 11_000, 5.0)])],
                &mut out,
            )
            .unwrap();
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert!(out.rows.is_empty());
        rule.program
            .process(&[batch(&[("a", 21_000, 0.0)])], &mut out)
            .unwrap();
        let avg = out.rows[0]
            .batch
            .column(2)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(avg.values(), &[5.0]);
    }

    /// Thousands of devices whose windows close one device at a time, in
    /// arrival order: open windows stay correct while emitted ones leave
    /// holes in the state and the state is renumbered.
    #[tokio::test]
    async fn many_devices_closing_their_windows_one_by_one() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'n', count(*) * 100000 + CAST(sum(temp) AS BIGINT) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
            "0s",
        )
        .await;
        const DEVICES: usize = 1500;
        let names: Vec<String> = (0..DEVICES).map(|d| format!("device-{d}")).collect();
        // Each device sends 45 events a second apart, from its own start,
        // in frames of 1 to 12 events; frames of devices interleave.
        let mut next = vec![0usize; DEVICES];
        let mut expected = std::collections::HashMap::new();
        let mut frames: Vec<Record> = Vec::new();
        let mut turn = 0usize;
        while next.iter().any(|n| *n < 45) {
            turn += 1;
            let d = (turn * 7919) % DEVICES;
            let take = (1 + (turn * 31) % 12).min(45 - next[d]);
            let rows: Vec<(&str, i64, f64)> = (next[d]..next[d] + take)
                .map(|i| {
                    let ts = (d as i64 % 10) * 1_000 + i as i64 * 1_000;
                    let temp = ((d * 13 + i * 7) % 50) as f64;
                    let e = expected
                        .entry((d, ts - ts % 10_000))
                        .or_insert((0i64, 0i64));
                    e.0 += 1;
                    e.1 += temp as i64;
                    (names[d].as_str(), ts, temp)
                })
                .collect();
            next[d] += take;
            frames.push(batch(&rows));
        }
        let mut out = Output::default();
        let mut at = 0;
        let mut size = 1;
        while at < frames.len() {
            let end = (at + size).min(frames.len());
            rule.program.process(&frames[at..end], &mut out).unwrap();
            at = end;
            size = size % 97 + 13;
        }
        // The last windows close when their devices fall silent.
        rule.program.advance(i64::MAX / 2, &mut out).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(rule.program.stats().open_windows, 0);
        let mut got = std::collections::HashMap::new();
        for emitted in &out.rows {
            let b = &emitted.batch;
            let devices = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let values = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            for row in 0..b.num_rows() {
                let id = emitted.ids.get(row).unwrap();
                // "w:<start>:<end>:<key hash>"
                let start: i64 = id.split(':').nth(1).unwrap().parse().unwrap();
                let d: usize = devices.value(row)["device-".len()..].parse().unwrap();
                let value = values.value(row);
                let before = got.insert((d, start), (value / 100000, value % 100000));
                assert!(before.is_none(), "window {id} emitted twice");
            }
        }
        assert_eq!(got.len(), expected.len());
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(k, v)| got.get(k) != Some(v))
            .take(5)
            .map(|(k, v)| (k, v, got.get(k)))
            .collect();
        assert!(wrong.is_empty(), "(window, expected, got): {wrong:?}");
    }

    #[tokio::test]
    async fn windows_across_devices_wait_for_the_slowest_active_device() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT 'all', 'n', count(*) FROM t GROUP BY tumble(ts, INTERVAL '10' SECOND)",
            "0s",
        )
        .await;
        let mut out = Output::default();
        rule.program
            .process(
                &[batch(&[
                    ("a", 1_000, 0.0),
                    ("b", 2_000, 0.0),
                    ("a", 15_000, 0.0),
                ])],
                &mut out,
            )
            .unwrap();
        assert!(out.rows.is_empty(), "b still holds the first window open");
        rule.program
            .process(&[batch(&[("b", 10_000, 0.0)])], &mut out)
            .unwrap();
        let n = out.rows[0]
            .batch
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(n.value(0), 2);
    }

    #[tokio::test]
    async fn sessions_merge_when_an_event_bridges_them() {
        let mut rule = compile(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'n', count(*) FROM t GROUP BY device_id, session(ts, INTERVAL '5' SECOND)",
            "10s",
        )
        .await;
        let mut out = Output::default();
        rule.program
            .process(
                &[batch(&[
                    ("a", 0, 0.0),
                    ("a", 8_000, 0.0),
                    ("a", 4_000, 0.0),
                    ("a", 40_000, 0.0),
                ])],
                &mut out,
            )
            .unwrap();
        let n = out.rows[0]
            .batch
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(n.values(), &[3]);
    }

    // Checkpoints of windowed rules: a program restored from a snapshot goes
    // on exactly like the one the snapshot was taken from.

    use tributary_engine::snapshot::Snapshot;

    /// What a run is fed: records to process, or a time to `advance` to
    /// while the source is quiet.
    enum Step {
        Records(Vec<Record>),
        Advance(i64),
    }

    /// The stream of the checkpoint tests: events may be 2 s out of order,
    /// and a device silent for 4 s (of arrival time) stops holding windows.
    fn checkpoint_catalog() -> Catalog {
        catalog_with(&[("watermark_delay", "2s"), ("idle_timeout", "4s")])
    }

    async fn program_in(sql: &str, catalog: &Catalog) -> Box<dyn RuleProgram> {
        let Statement::CreateRule(r) = parse(sql).unwrap() else {
            panic!("not a rule: {sql}")
        };
        compile_rule(&r, catalog, 0)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .program
    }

    /// Six devices over 40 s, on two partitions: mostly forward, now and then
    /// a step back within the delay or behind the watermark (late). Device e
    /// stops early, device f goes quiet for a while and comes back, so the
    /// idle timeout closes their windows, on arrival of others' events or on
    /// `advance`. Ends with an `advance` far in the future.
    fn checkpoint_steps() -> Vec<Step> {
        let temps = [1e17, 1.0, 0.1, 0.7, -3.5, 2.25, -0.0, 0.3, 42.0];
        let mut offsets = [0u64; 2];
        let mut steps = Vec::new();
        let mut pending = Vec::new();
        for r in 0..40i64 {
            let rows: Vec<(&str, i64, f64)> = (0..6i64)
                .filter_map(|i| {
                    let device = ["a", "b", "c", "d", "e", "f"][((r + i) % 6) as usize];
                    if (device == "e" && r >= 12) || (device == "f" && (6..20).contains(&r)) {
                        return None;
                    }
                    let back = match (r * 6 + i) % 11 {
                        3 => 1_500,
                        7 => 6_000,
                        _ => 0,
                    };
                    let ts = r * 1_000 + i * 150 - back;
                    Some((device, ts, temps[((r * 6 + i) % 9) as usize]))
                })
                .collect();
            let mut record = batch(&rows);
            record.partition = u32::from(r % 3 == 2);
            record.offset = offsets[record.partition as usize];
            offsets[record.partition as usize] += rows.len() as u64;
            pending.push(record);
            // One, two or three records at a time.
            if pending.len() as i64 > r % 3 {
                steps.push(Step::Records(std::mem::take(&mut pending)));
            }
            // The source goes quiet now and then: e and f fall silent on
            // the clock rather than on others' events.
            if r % 9 == 8 {
                steps.push(Step::Advance(r * 1_000 + 2_500));
            }
        }
        if !pending.is_empty() {
            steps.push(Step::Records(pending));
        }
        steps.push(Step::Advance(i64::MAX / 2));
        steps
    }

    /// 1,500 devices sending 45 events each, a second apart from their own
    /// start, in interleaved frames of 1 to 12 events, processed 13 to 109
    /// frames at a time: their windows close one device at a time, leaving
    /// holes in the aligned state until it is renumbered.
    fn many_device_steps() -> Vec<Step> {
        const DEVICES: usize = 1500;
        let names: Vec<String> = (0..DEVICES).map(|d| format!("device-{d}")).collect();
        let mut next = vec![0usize; DEVICES];
        let mut frames = Vec::new();
        let mut offset = 0;
        let mut turn = 0usize;
        while next.iter().any(|n| *n < 45) {
            turn += 1;
            let d = (turn * 7919) % DEVICES;
            let take = (1 + (turn * 31) % 12).min(45 - next[d]);
            if take == 0 {
                continue;
            }
            let rows: Vec<(&str, i64, f64)> = (next[d]..next[d] + take)
                .map(|i| {
                    let ts = (d as i64 % 10) * 1_000 + i as i64 * 1_000;
                    (names[d].as_str(), ts, ((d * 13 + i * 7) % 50) as f64)
                })
                .collect();
            next[d] += take;
            let mut record = batch(&rows);
            record.offset = offset;
            offset += rows.len() as u64;
            frames.push(record);
        }
        let mut steps = Vec::new();
        let mut size = 1;
        while !frames.is_empty() {
            let rest = frames.split_off(size.min(frames.len()));
            steps.push(Step::Records(std::mem::replace(&mut frames, rest)));
            size = size % 97 + 13;
        }
        steps.push(Step::Advance(i64::MAX / 2));
        steps
    }

    fn run_step(program: &mut Box<dyn RuleProgram>, step: &Step) -> Output {
        let mut out = Output::default();
        match step {
            Step::Records(records) => program.process(records, &mut out).unwrap(),
            Step::Advance(now) => program.advance(*now, &mut out).unwrap(),
        }
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out
    }

    fn run_all(program: &mut Box<dyn RuleProgram>, steps: &[Step]) -> Vec<Output> {
        steps.iter().map(|s| run_step(program, s)).collect()
    }

    /// Two outputs hold the same rows, ids and late events.
    pub(super) fn assert_same(what: &str, got: &Output, expected: &Output) {
        assert_eq!(got.rows.len(), expected.rows.len(), "{what}: emissions");
        for (g, e) in got.rows.iter().zip(&expected.rows) {
            assert_eq!(g.batch, e.batch, "{what}: rows");
            assert_eq!(g.ids, e.ids, "{what}: ids");
        }
        assert_eq!(got.late, expected.late, "{what}: late events");
    }

    fn assert_same_runs(what: &str, got: &[Output], expected: &[Output]) {
        assert_eq!(got.len(), expected.len(), "{what}: steps");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert_same(&format!("{what}, step {i}"), g, e);
        }
    }

    /// A snapshot as a checkpoint holds it: encoded and decoded again.
    fn checkpoint(program: &mut Box<dyn RuleProgram>) -> Snapshot {
        let snapshot = program
            .snapshot()
            .unwrap()
            .expect("windowed rules save their state");
        Snapshot::decode(&snapshot.encode().unwrap()).unwrap()
    }

    /// Runs `steps` through `sql` without interruption, and through a
    /// program snapshotted before every step; before each step in
    /// `restore_at` (given the step and the snapshot), a program restored
    /// from that snapshot runs the rest.
    /// Both must emit what the uninterrupted run emits, step by step.
    /// Returns the snapshots.
    async fn goes_on_alike(
        sql: &str,
        catalog: &Catalog,
        steps: &[Step],
        mut restore_at: impl FnMut(usize, &Snapshot) -> bool,
    ) -> Vec<Snapshot> {
        let mut reference = program_in(sql, catalog).await;
        let expected = run_all(&mut reference, steps);
        assert!(
            expected.iter().any(|o| !o.rows.is_empty()),
            "{sql}: no rows at all"
        );
        let mut live = program_in(sql, catalog).await;
        let mut snapshots = Vec::new();
        for (cut, step) in steps.iter().enumerate() {
            let snapshot = checkpoint(&mut live);
            if restore_at(cut, &snapshot) {
                let mut restored = program_in(sql, catalog).await;
                restored.restore(&snapshot).unwrap();
                let (got, was) = (restored.stats(), live.stats());
                assert_eq!(got.late_events, was.late_events, "{sql}: late events");
                assert_eq!(got.open_windows, was.open_windows, "{sql}: open windows");
                for p in 0..3 {
                    assert_eq!(restored.retained_from(p), live.retained_from(p), "{sql}");
                }
                let what = format!("{sql}, restored before step {cut}");
                let got = run_all(&mut restored, &steps[cut..]);
                assert_same_runs(&what, &got, &expected[cut..]);
                let (got, was) = (restored.stats(), reference.stats());
                assert_eq!(got.late_events, was.late_events, "{what}: late at the end");
                assert_eq!(
                    got.open_windows, was.open_windows,
                    "{what}: open at the end"
                );
            }
            snapshots.push(snapshot);
            let what = format!("{sql}, snapshotted before every step, step {cut}");
            assert_same(&what, &run_step(&mut live, step), &expected[cut]);
        }
        snapshots
    }

    /// Per device: several aggregates, HAVING.
    const TUMBLE_PER_DEVICE: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('avg', avg(temp), 'n', count(*), 'sum', sum(temp), 'min', min(temp), 'max', max(temp)) FROM t GROUP BY device_id, tumble(ts, INTERVAL '5' SECOND) HAVING count(*) > 1";
    /// Across devices: windows close on the global watermark.
    const TUMBLE_ACROSS: &str = "CREATE RULE r AS INSERT INTO commands SELECT 'all', 'x', named_struct('n', count(*), 'avg', avg(temp), 'max', max(temp)) FROM t GROUP BY tumble(ts, INTERVAL '4' SECOND)";
    const HOP_PER_DEVICE: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('n', count(*), 'sum', sum(temp)) FROM t GROUP BY device_id, hop(ts, INTERVAL '2' SECOND, INTERVAL '6' SECOND)";
    const SESSION_PER_DEVICE: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('n', count(*), 'avg', avg(temp), 'first', first_value(temp ORDER BY ts)) FROM t GROUP BY device_id, session(ts, INTERVAL '1200' MILLISECOND)";

    #[tokio::test]
    async fn a_restored_windowed_rule_goes_on_like_the_one_it_was_saved_from() {
        let catalog = checkpoint_catalog();
        let steps = checkpoint_steps();
        let rules = [
            TUMBLE_PER_DEVICE,
            TUMBLE_ACROSS,
            HOP_PER_DEVICE,
            SESSION_PER_DEVICE,
            // A key besides the device, computed, and a filter before the
            // window.
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('pos', temp > 0, 'n', count(*), 'min', min(temp)) FROM t WHERE temp < 100 GROUP BY device_id, temp > 0, tumble(ts, INTERVAL '5' SECOND)",
            // A key across devices.
            "CREATE RULE r AS INSERT INTO commands SELECT 'all', 'x', named_struct('pos', temp > 0, 'n', count(*)) FROM t GROUP BY temp > 0, hop(ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND)",
            // Ordered aggregates, a sketch, FILTER. (`count(DISTINCT ...)`
            // is refused by rules.)
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('first', first_value(temp ORDER BY ts), 'last', last_value(temp ORDER BY ts), 'distinct', approx_distinct(CAST(temp AS BIGINT)), 'hot', count(*) FILTER (WHERE temp > 0.5)) FROM t GROUP BY device_id, tumble(ts, INTERVAL '5' SECOND)",
            "CREATE RULE r AS INSERT INTO commands SELECT 'all', 'x', named_struct('n', count(*), 'devices', approx_distinct(device_id)) FROM t GROUP BY session(ts, INTERVAL '700' MILLISECOND)",
            // Into a stream: rows carry the watermarks' time.
            "CREATE STREAM averages AS SELECT device_id, window_start, window_end, avg(temp) AS avg FROM t GROUP BY device_id, tumble(ts, INTERVAL '3' SECOND)",
        ];
        for sql in rules {
            goes_on_alike(sql, &catalog, &steps, |_, _| true).await;
        }
        // The events hold what the test means them to.
        let mut all = program_in(TUMBLE_PER_DEVICE, &catalog).await;
        let out = run_all(&mut all, &steps);
        assert!(out.iter().any(|o| !o.late.is_empty()), "late events");
        let advanced: usize = steps
            .iter()
            .zip(&out)
            .filter(|(s, o)| {
                matches!(s, Step::Advance(n) if *n < i64::MAX / 2) && !o.rows.is_empty()
            })
            .count();
        assert!(advanced > 0, "windows of idle devices closed on `advance`");

        // Enough groups that the aligned state renumbers them between
        // snapshots: restoring holes and a renumbered state both work.
        let steps = many_device_steps();
        let sql = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'n', named_struct('n', count(*), 'sum', sum(temp), 'avg', avg(temp)) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)";
        // Restored: with holes, before any renumbering; just after each of
        // the first renumberings; before the last step.
        let (mut groups, mut renumbered, mut holes) = (0, 0, false);
        let last = steps.len() - 1;
        goes_on_alike(
            sql,
            &catalog_with(&[("watermark_delay", "0s")]),
            &steps,
            |cut, snapshot| {
                let keys = snapshot.u32s("windows.group_keys").unwrap();
                let before = std::mem::replace(&mut groups, keys.len());
                if !keys.is_empty() && keys.len() < before {
                    renumbered += 1;
                    return renumbered <= 2;
                }
                let first_holes = !holes && keys.contains(&u32::MAX);
                holes |= first_holes;
                first_holes || cut == last
            },
        )
        .await;
        assert!(holes, "snapshots hold emitted groups");
        assert!(
            renumbered > 0,
            "the groups were renumbered between two snapshots"
        );
    }

    /// A checkpoint of `sql` after the first `steps`.
    async fn saved_after(sql: &str, catalog: &Catalog, steps: &[Step]) -> Snapshot {
        let mut program = program_in(sql, catalog).await;
        run_all(&mut program, steps);
        checkpoint(&mut program)
    }

    /// Restoring `snapshot` into `sql` fails, without a panic, and the
    /// program then runs like a new one: the error, or what went wrong.
    async fn refused(
        what: &str,
        sql: &str,
        catalog: &Catalog,
        snapshot: &Snapshot,
    ) -> Result<String, String> {
        let steps = checkpoint_steps();
        let mut program = program_in(sql, catalog).await;
        let fresh = run_all(&mut program_in(sql, catalog).await, &steps);
        let quietly =
            |f: &mut dyn FnMut()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
        let mut restored = Ok(());
        if !quietly(&mut || restored = program.restore(snapshot)) {
            return Err(format!("{what}: restore panicked"));
        }
        let err = match restored {
            Ok(()) => return Err(format!("{what}: restored")),
            Err(e) => e,
        };
        let stats = program.stats();
        if (stats.open_windows, stats.late_events) != (0, 0) {
            return Err(format!("{what}: the refused program holds state"));
        }
        if !quietly(&mut || {
            let got = run_all(&mut program, &steps);
            assert_same_runs(&format!("{what}: after the refusal"), &got, &fresh);
        }) {
            return Err(format!("{what}: the refused program is not a new one"));
        }
        Ok(err)
    }

    #[tokio::test]
    async fn a_checkpoint_of_another_windowed_rule_is_refused() {
        let catalog = checkpoint_catalog();
        let steps = checkpoint_steps();
        let before = &steps[..steps.len() / 2];
        let wider = TUMBLE_PER_DEVICE.replace("'5' SECOND", "'10' SECOND");
        let other_aggregate = TUMBLE_PER_DEVICE.replace("max(temp)", "stddev(temp)");
        let other_key =
            TUMBLE_PER_DEVICE.replace("GROUP BY device_id,", "GROUP BY device_id, temp > 0,");
        let stateless = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'hot', temp FROM t WHERE temp > 1";
        let over = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', lag(temp) OVER (PARTITION BY device_id ORDER BY ts) FROM t";
        // (rule saved, rule restoring)
        let pairs = [
            (wider.as_str(), TUMBLE_PER_DEVICE),
            (other_aggregate.as_str(), TUMBLE_PER_DEVICE),
            (other_key.as_str(), TUMBLE_PER_DEVICE),
            (TUMBLE_ACROSS, TUMBLE_PER_DEVICE),
            (TUMBLE_PER_DEVICE, TUMBLE_ACROSS),
            (HOP_PER_DEVICE, TUMBLE_PER_DEVICE),
            (SESSION_PER_DEVICE, TUMBLE_PER_DEVICE),
            (TUMBLE_PER_DEVICE, SESSION_PER_DEVICE),
            (TUMBLE_PER_DEVICE, HOP_PER_DEVICE),
            (stateless, TUMBLE_PER_DEVICE),
            (over, TUMBLE_PER_DEVICE),
            (over, SESSION_PER_DEVICE),
        ];
        for (saved, restoring) in pairs {
            let snapshot = saved_after(saved, &catalog, before).await;
            let what = format!("{saved} into {restoring}");
            let err = refused(&what, restoring, &catalog, &snapshot)
                .await
                .unwrap();
            assert!(!err.contains("damaged"), "{what}: {err}");
            // The same state under the restoring rule's name and signature:
            // the windows and watermarks themselves are refused.
            if saved == stateless || saved == over {
                continue;
            }
            let own = saved_after(restoring, &catalog, before).await;
            let mut forged = snapshot.clone();
            let program: serde_json::Value = own.json("program").unwrap();
            forged.put_json("program", &program).unwrap();
            let what = format!("forged {what}");
            let err = refused(&what, restoring, &catalog, &forged).await.unwrap();
            assert_ne!(err, "the checkpoint is of another plan", "{what}");
        }
        // The same rule over a stream with another watermark delay.
        let other_delay = catalog_with(&[("watermark_delay", "3s"), ("idle_timeout", "4s")]);
        let snapshot = saved_after(TUMBLE_PER_DEVICE, &other_delay, before).await;
        let err = refused("another delay", TUMBLE_PER_DEVICE, &catalog, &snapshot)
            .await
            .unwrap();
        assert!(err.contains("another plan"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_windowed_checkpoint_is_an_error_not_a_panic() {
        use arrow::array::{ArrayRef, StringArray, UInt32Array};

        let catalog = checkpoint_catalog();
        let steps = checkpoint_steps();
        let mut damages: Vec<(&str, &str, Snapshot)> = Vec::new();

        // Tumbling windows per device, with windows open and some emitted.
        let sql = TUMBLE_PER_DEVICE;
        let good = saved_after(sql, &catalog, &steps[..steps.len() / 2]).await;
        let meta: serde_json::Value = good.json("windows.meta").unwrap();
        let keys = meta["keys"].as_u64().unwrap() as u32;
        let group_keys = good.u32s("windows.group_keys").unwrap();
        let total = group_keys.len() as u32;
        let open_len = good.u32s("windows.open.len").unwrap();
        let open_group = good.u32s("windows.open.group").unwrap();
        assert!(!open_group.is_empty() && group_keys.contains(&u32::MAX));
        let devices = good.strings("watermarks.names").unwrap().len();
        let mut add = |what, edit: &dyn Fn(&mut Snapshot)| {
            let mut s = good.clone();
            edit(&mut s);
            damages.push((what, sql, s));
        };
        add("a group too many", &|s| {
            let mut g = group_keys.clone();
            g.push(0);
            s.put_u32s("windows.group_keys", &g).unwrap();
        });
        add("a group of an unknown key", &|s| {
            let mut g = group_keys.clone();
            g[0] = keys + 5;
            s.put_u32s("windows.group_keys", &g).unwrap();
        });
        add("open windows of emitted groups", &|s| {
            s.put_u32s("windows.group_keys", &vec![u32::MAX; total as usize])
                .unwrap();
        });
        add("a group start missing", &|s| {
            let starts = s.i64s("windows.group_starts").unwrap();
            s.put_i64s("windows.group_starts", &starts[1..]).unwrap();
        });
        add("open windows of unknown groups", &|s| {
            s.put_u32s("windows.open.group", &vec![total + 3; open_group.len()])
                .unwrap();
        });
        add("open windows of one group twice", &|s| {
            s.put_u32s("windows.open.group", &vec![open_group[0]; open_group.len()])
                .unwrap();
        });
        add("open windows that add up wrong", &|s| {
            let mut l = open_len.clone();
            l[0] += 1;
            s.put_u32s("windows.open.len", &l).unwrap();
        });
        add("open windows of fewer keys", &|s| {
            s.put_u32s("windows.open.len", &open_len[1..]).unwrap();
        });
        add("keys of an unknown device", &|s| {
            let mut k = s.u32s("windows.device_keys.len").unwrap();
            k.resize(devices + 1000, 0);
            *k.last_mut().unwrap() = 1;
            s.put_u32s("windows.device_keys.len", &k).unwrap();
            let mut v = s.u32s("windows.device_keys.values").unwrap();
            v.push(0);
            s.put_u32s("windows.device_keys.values", &v).unwrap();
        });
        add("a device of an unknown key", &|s| {
            s.put_u32s(
                "windows.device_keys.values",
                &vec![keys + 1; open_len.len()],
            )
            .unwrap();
        });
        add("a device key id out of range", &|s| {
            s.put_u32s("windows.device_key_id", &vec![keys; devices])
                .unwrap();
        });
        add("a due group out of range", &|s| {
            s.put_u32s("windows.due", &[total + 1]).unwrap();
        });
        add("slots of another count", &|s| {
            let slots = meta["slots"].as_array().unwrap().len();
            s.put_u32s("windows.slot_groups.len", &vec![0; slots + 1])
                .unwrap();
        });
        add("no live window counted", &|s| {
            let mut m = meta.clone();
            m["live"] = 0.into();
            s.put_json("windows.meta", &m).unwrap();
        });
        add("slots with no live windows", &|s| {
            let mut m = meta.clone();
            for slot in m["slots"].as_array_mut().unwrap() {
                slot[1] = 0.into();
            }
            s.put_json("windows.meta", &m).unwrap();
        });
        add("an aggregate's state of another shape", &|s| {
            s.put_u32s("windows.acc0", &[1, 2, 3]).unwrap();
        });
        add("an aggregate's state of other types", &|s| {
            let text: ArrayRef = Arc::new(StringArray::from(vec!["x"; total as usize]));
            s.put_arrays("windows.acc0", vec![text.clone(), text])
                .unwrap();
        });
        add("a count of another type", &|s| {
            let n: ArrayRef = Arc::new(Float64Array::from(vec![1.0; total as usize]));
            s.put_arrays("windows.acc1", vec![n]).unwrap();
        });
        add("a state with a column too few", &|s| {
            let state = s.arrays("windows.acc0", None).unwrap();
            s.put_arrays("windows.acc0", state[..1].to_vec()).unwrap();
        });
        add("keys of another type", &|s| {
            s.put_u32s("windows.keys", &vec![7; keys as usize]).unwrap();
        });
        add("keys of another count", &|s| {
            s.put_strings("windows.keys", ["a"]).unwrap();
        });
        add("no windows at all", &|s| {
            s.put_json("windows.meta", &serde_json::json!({})).unwrap();
        });
        add("a device too few", &|s| {
            let names = s.strings("watermarks.names").unwrap();
            s.put_strings("watermarks.names", names[1..].iter().map(String::as_str))
                .unwrap();
        });
        add("a device twice", &|s| {
            s.put_strings("watermarks.names", vec!["a"; devices])
                .unwrap();
        });
        add("clocks of another count", &|s| {
            s.put_i64s("watermarks.flags", &[1]).unwrap();
        });
        add("an unknown device waiting", &|s| {
            s.put_u32s("watermarks.by_arrival.device", &[1000]).unwrap();
            s.put_i64s("watermarks.by_arrival.time", &[0]).unwrap();
        });
        add("an unknown device silent", &|s| {
            s.put_u32s("watermarks.pending_silent", &[devices as u32])
                .unwrap();
        });
        add("a queue of two lengths", &|s| {
            s.put_i64s("watermarks.by_watermark.time", &[1, 2, 3])
                .unwrap();
        });
        add("no late count", &|s| {
            s.put_json(
                "program",
                &serde_json::json!({"kind": "windowed", "signature": "x"}),
            )
            .unwrap();
        });

        // Windows across devices: slots hold their groups.
        let sql = TUMBLE_ACROSS;
        let good = saved_after(sql, &catalog, &steps[..steps.len() / 2]).await;
        let slot_values = good.u32s("windows.slot_groups.values").unwrap();
        assert!(!slot_values.is_empty());
        let total = good.u32s("windows.group_keys").unwrap().len() as u32;
        let mut s = good.clone();
        s.put_u32s(
            "windows.slot_groups.values",
            &vec![total; slot_values.len()],
        )
        .unwrap();
        damages.push(("slot groups out of range", sql, s));
        let mut s = good.clone();
        s.put_u32s("windows.group_keys", &vec![u32::MAX; total as usize])
            .unwrap();
        damages.push(("slots of emitted groups", sql, s));
        let mut s = good.clone();
        s.put_u32s("windows.slot_groups.len", &[slot_values.len() as u32 + 1])
            .unwrap();
        damages.push(("slot groups that add up wrong", sql, s));

        // Sessions per device.
        let sql = SESSION_PER_DEVICE;
        let good = saved_after(sql, &catalog, &steps[..steps.len() / 2]).await;
        let windows = good.i64s("windows.groups.start").unwrap().len();
        assert!(windows > 0);
        let mut s = good.clone();
        s.put_u32s("windows.groups.device", &vec![1000; windows])
            .unwrap();
        damages.push(("sessions of an unknown device", sql, s));
        let mut s = good.clone();
        s.put_i64s("windows.groups.end", &vec![i64::MIN; windows])
            .unwrap();
        damages.push(("sessions ending before they start", sql, s));
        let mut s = good.clone();
        s.put_u32s("windows.groups.device", &[0]).unwrap();
        damages.push(("a device for one session", sql, s));
        let mut s = good.clone();
        let text: ArrayRef = Arc::new(StringArray::from(vec!["x"; windows]));
        s.put_arrays("windows.acc1", vec![text.clone(), text])
            .unwrap();
        damages.push(("a session's average of other types", sql, s));
        let mut s = good.clone();
        s.put_arrays(
            "windows.groups.key",
            vec![Arc::new(UInt32Array::from(vec![1; windows])) as ArrayRef],
        )
        .unwrap();
        damages.push(("session keys of another type", sql, s));

        let mut failed = Vec::new();
        for (what, sql, damaged) in damages {
            let damaged = Snapshot::decode(&damaged.encode().unwrap()).unwrap();
            if let Err(e) = refused(what, sql, &catalog, &damaged).await {
                failed.push(e);
            }
        }
        assert!(failed.is_empty(), "not refused cleanly: {failed:?}");
    }
}

#[cfg(test)]
mod over_tests {
    use super::window_tests::batch;
    use super::*;
    use crate::statement::{Statement, parse};
    use tributary_engine::rule::Output;

    /// The window tests' stream, with a 2-second watermark delay.
    fn catalog() -> Catalog {
        super::window_tests::catalog("2s")
    }

    #[tokio::test]
    async fn lag_and_a_sliding_average_per_device_in_event_time_order() {
        let Statement::CreateRule(r) = parse(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('prev', lag(temp) OVER w, 'avg', avg(temp) OVER (PARTITION BY device_id ORDER BY ts RANGE BETWEEN INTERVAL '2' SECOND PRECEDING AND CURRENT ROW)) FROM t WINDOW w AS (PARTITION BY device_id ORDER BY ts)",
        )
        .unwrap() else {
            panic!()
        };
        let mut rule = compile_rule(&r, &catalog(), 0).await.unwrap();
        let mut out = Output::default();
        // 2 s arrives before 1 s (within the delay): the rule sees them in
        // event-time order once the watermark passes.
        rule.program
            .process(
                &[batch(&[
                    ("a", 0, 10.0),
                    ("a", 2_000, 30.0),
                    ("a", 1_000, 20.0),
                    ("a", 10_000, 0.0),
                ])],
                &mut out,
            )
            .unwrap();
        let rows = &out.rows[0].batch;
        assert_eq!(rows.num_rows(), 3);
        let payloads = tributary_engine::rule::payload_values(rows.column(2)).unwrap();
        assert_eq!(payloads[0], serde_json::json!({"prev": null, "avg": 10.0}));
        assert_eq!(payloads[1], serde_json::json!({"prev": 10.0, "avg": 15.0}));
        assert_eq!(payloads[2], serde_json::json!({"prev": 20.0, "avg": 20.0}));
        assert_eq!(out.rows[0].ids.get(2).unwrap(), "o:0:1");
    }

    #[tokio::test]
    async fn unsupported_over_clauses_are_refused() {
        for (sql, expected) in [
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', lag(temp) OVER (PARTITION BY device_id ORDER BY temp) FROM t",
                "ORDER BY ts",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', sum(temp) OVER (PARTITION BY device_id ORDER BY ts ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING) FROM t",
                "CURRENT ROW",
            ),
            (
                "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', lead(temp) OVER (PARTITION BY device_id ORDER BY ts) FROM t",
                "lead",
            ),
        ] {
            let Statement::CreateRule(r) = parse(sql).unwrap() else {
                panic!()
            };
            let err = compile_rule(&r, &catalog(), 0).await.unwrap_err();
            assert!(err.to_string().contains(expected), "{sql}: {err}");
        }
    }
}

#[cfg(test)]
mod documented_rules {
    use super::*;
    use crate::statement::{Statement, parse};
    use tributary_engine::event::{ColumnDef, ColumnType};

    /// Every rule shown in docs/sql.md plans.
    #[tokio::test]
    async fn the_examples_in_the_sql_guide_compile() {
        let catalog = Catalog::in_memory();
        let column = |name: &str, ty| ColumnDef {
            name: name.into(),
            ty,
        };
        catalog
            .add_stream(
                StreamDef::new(
                    "telemetry",
                    vec![
                        column("temp", ColumnType::Float64),
                        column("humidity", ColumnType::Float64),
                        column("status", ColumnType::Utf8),
                        column("site", ColumnType::Utf8),
                    ],
                    4,
                )
                .unwrap(),
            )
            .unwrap();
        catalog
            .add_stream(
                StreamDef::new("alarms", vec![column("value", ColumnType::Float64)], 4).unwrap(),
            )
            .unwrap();
        let guide = include_str!("../../../docs/sql.md");
        let mut checked = 0;
        for block in guide.split("```sql").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            // Statements in a block start at column 0 with CREATE.
            let mut statements = Vec::new();
            for line in block.lines() {
                if line.starts_with("CREATE RULE") || line.starts_with("CREATE STREAM") {
                    statements.push(String::new());
                }
                if line.starts_with("--") {
                    continue;
                }
                if let Some(s) = statements.last_mut() {
                    s.push_str(line);
                    s.push('\n');
                }
            }
            for sql in statements {
                // Syntax summaries with [optional] parts are not examples.
                if sql.contains('[') && !sql.contains("['") {
                    continue;
                }
                let Statement::CreateRule(rule) =
                    parse(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
                else {
                    continue;
                };
                if let Err(e) = compile_rule(&rule, &catalog, 0).await
                    && !sql.contains("SELECT ...")
                {
                    panic!("{sql}: {e}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} examples found");
    }
}
