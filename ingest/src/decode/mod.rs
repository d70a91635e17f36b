//! EVENTS payloads (JSON, encoding 0x01, and Arrow IPC streams, 0x02) into
//! Arrow record batches.
//!
//! The gateway decodes each EVENTS frame once, here, into a [`RecordBatch`]
//! with exactly the stream's schema ([`StreamDef::schema`]: the system columns
//! `device_id`, `ts`, `received_at`, then the declared ones). From there on
//! everything reads Arrow.
//!
//! A frame is atomic: the first problem found rejects the whole payload with
//! a [`PayloadError`], which becomes the REJECT frame's body
//! ([`PayloadError::into_reject`]).
//!
//! ```
//! use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};
//! use tributary_ingest::decode::decode_json;
//! use tributary_ingest::protocol::RejectCode;
//!
//! let def = StreamDef::new(
//!     "telemetry",
//!     vec![ColumnDef { name: "temp".into(), ty: ColumnType::Float64 }],
//!     4,
//! )
//! .unwrap();
//! let batch = decode_json(&def, br#"{"temp":21.5} {"temp":null}"#, "sensor-1", 1_700_000_000_000, 100)
//!     .unwrap();
//! assert_eq!(batch.num_rows(), 2);
//!
//! let err = decode_json(&def, br#"{"temp":"hot"}"#, "sensor-1", 0, 100).unwrap_err();
//! assert_eq!(err.code, RejectCode::InvalidField);
//! assert_eq!(
//!     err.message,
//!     r#"event 0: field 'temp' must be a number (DOUBLE), got string "hot""#
//! );
//! ```
//!
//! [`RecordBatch`]: arrow::record_batch::RecordBatch
//! [`StreamDef::schema`]: tributary_engine::event::StreamDef::schema

mod error;
mod ipc;
mod json;

#[cfg(test)]
mod ipc_tests;
#[cfg(test)]
mod tests;

pub use error::PayloadError;
pub(crate) use ipc::panic_is_contained;
pub use ipc::{ArrowDecoder, decode_arrow, encode_arrow};
pub use json::decode_json;
