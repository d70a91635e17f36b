//! tributary-engine: the event model, the durable event stream, the rule
//! runtime and the command queue.
//!
//! The engine knows nothing of QUIC, HTTP or SQL text. It owns:
//! - [`event`]: stream definitions and their Arrow schemas with the system
//!   columns `device_id`, `ts` and `received_at`;
//! - [`log`]: the [`EventStream`](log::EventStream) trait and its embedded,
//!   durable implementation;
//!
//! ```
//! use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};
//! let def = StreamDef::new(
//!     "telemetry",
//!     vec![ColumnDef { name: "temp".into(), ty: ColumnType::Float64 }],
//!     4,
//! )
//! .unwrap();
//! assert_eq!(def.schema().fields().len(), 4);
//! ```

pub mod catalog;
pub mod checkpoint;
pub mod commands;
pub mod devices;
pub mod duration;
mod error;
pub mod event;
pub mod fsutil;
pub mod log;
pub mod rule;
pub mod snapshot;

pub use error::{Error, Result};
