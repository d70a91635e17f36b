//! The DataFusion session every statement is planned in.

use datafusion::execution::context::SessionContext;
use datafusion::prelude::SessionConfig;

/// A fresh session configured the way Tributary plans SQL: spans kept for
/// error positions, no information schema, UTC.
pub fn new_session() -> SessionContext {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_target_partitions(2);
    let options = config.options_mut();
    options.sql_parser.collect_spans = true;
    options.sql_parser.enable_ident_normalization = true;
    SessionContext::new_with_config(config)
}
