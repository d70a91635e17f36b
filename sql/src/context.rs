//! The DataFusion session every statement is planned in.

use std::sync::{Arc, OnceLock};

use datafusion::common::DFSchema;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::context::SessionContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::GetFieldAccess;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawFieldAccessExpr};
use datafusion::prelude::SessionConfig;

/// The runtime every session shares, and with it DataFusion's caches:
/// Parquet footers, file statistics and listings. Without it each query
/// read the footer of every file of a stream again (hundreds of files, on
/// every `SELECT`). Stored files never change once written; a file's
/// cached statistics are checked against its size and modification time.
fn runtime() -> Arc<RuntimeEnv> {
    static RUNTIME: OnceLock<Arc<RuntimeEnv>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Arc::new(RuntimeEnv::default()))
        .clone()
}

/// A fresh session configured the way Tributary plans SQL: spans kept for
/// error positions, no information schema, UTC.
pub fn new_session() -> SessionContext {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_target_partitions(2);
    let options = config.options_mut();
    options.sql_parser.collect_spans = true;
    options.sql_parser.enable_ident_normalization = true;
    // Filters run inside the Parquet decoder: the other columns are decoded
    // only for rows that pass (`WHERE status = 'error'` over 64 M events
    // went from 1.42 s to 0.87 s), cheapest filter first.
    options.execution.parquet.pushdown_filters = true;
    options.execution.parquet.reorder_filters = true;
    // A hash join's build-side keys pushed into the probe side's scan: with
    // filters inside the decoder they are checked on every row, and a join
    // with `devices` keeps nearly every row (that join went from 2.0 s to
    // 2.7 s with them on). Our files hold every device, so the keys prune
    // no row group either.
    options.optimizer.enable_join_dynamic_filter_pushdown = false;
    let ctx = SessionContext::new_with_config_rt(config, runtime());
    // `tags['site']`: read a map (or struct) field. DataFusion plans this
    // with its nested-functions feature, which is large; `get_field` is all
    // it needs.
    let mut state = ctx.state();
    if state.register_expr_planner(Arc::new(FieldAccess)).is_ok() {
        return SessionContext::new_with_state(state);
    }
    ctx
}

/// Plans `expr['name']` as `get_field(expr, 'name')`.
#[derive(Debug)]
struct FieldAccess;

impl ExprPlanner for FieldAccess {
    fn plan_field_access(
        &self,
        expr: RawFieldAccessExpr,
        _schema: &DFSchema,
    ) -> datafusion::error::Result<PlannerResult<RawFieldAccessExpr>> {
        match expr.field_access {
            GetFieldAccess::NamedStructField { name } => Ok(PlannerResult::Planned(
                datafusion::functions::core::expr_fn::get_field(expr.expr, name),
            )),
            other => Ok(PlannerResult::Original(RawFieldAccessExpr {
                field_access: other,
                expr: expr.expr,
            })),
        }
    }
}
