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
