//! Criterion benchmarks live in `benches/benches/`. This library holds the
//! parts of the end-to-end benchmark (`src/bin/e2e.rs`) that measure one
//! thing each against a running server:
//!
//! - [`latency`]: event → command latency through a filter rule at a fixed
//!   event rate ([`latency::event_to_command`]);
//! - [`queries`]: the same queries with Tributary and with DuckDB over the
//!   same Parquet files ([`queries::compare`]).

pub mod latency;
pub mod queries;
