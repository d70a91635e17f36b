//! tributary-sql: Tributary's SQL front end.
//!
//! It turns SQL text into what the engine runs and answers queries:
//! - [`statement::parse`] reads one statement: DataFusion's SQL plus
//!   `CREATE STREAM`, `CREATE RULE`, `SHOW STREAMS`, `SHOW RULES`,
//!   `DESCRIBE` and `DROP RULE`, with errors that carry line and column;
//! - [`rule::compile_rule`] plans a rule with DataFusion and lowers it into a
//!   [`RuleProgram`](tributary_engine::rule::RuleProgram) of physical
//!   expressions that the engine runs on every batch;
//! - [`query::QueryEngine`] runs `SELECT`s over each stream's Parquet files
//!   plus its hot tail.
//!
//! ```
//! use tributary_sql::statement::{parse, Statement};
//! let s = parse("CREATE STREAM telemetry (temp DOUBLE, humidity DOUBLE)").unwrap();
//! assert!(matches!(s, Statement::CreateStream { .. }));
//! let err = parse("SELEC 1").unwrap_err();
//! assert!(err.to_string().contains("line 1, column 1"));
//! ```

mod context;
mod error;
pub mod query;
pub mod rule;
pub mod statement;
pub mod window;

pub use error::{Error, Location, Result};
