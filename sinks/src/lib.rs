//! tributary-sinks: consumers of the event stream that store events.
//!
//! A sink reads a stream from its committed offset, writes what it read
//! somewhere durable, and only then commits. [`parquet`] is the first sink:
//! every event of every stream lands in ZSTD-compressed Parquet files under
//! `<storage>/<stream>/date=YYYY-MM-DD/hour=HH/`, written through
//! `object_store` so the folder can become an S3-compatible bucket.
//!
//! ```no_run
//! # async fn demo(log: tributary_engine::log::SharedEventStream, def: tributary_engine::event::StreamDef) -> tributary_sinks::Result<()> {
//! use tributary_sinks::parquet::{ParquetSinks, SinkOptions, Storage};
//! let storage = Storage::local("/tmp/tributary-data/storage")?;
//! let sinks = ParquetSinks::new(storage, log, SinkOptions::default());
//! sinks.start(&def)?;
//! // ... later, on shutdown: flush what was read.
//! sinks.shutdown().await;
//! # Ok(()) }
//! ```

pub mod parquet;

use std::path::PathBuf;

/// The sinks' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while storing events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store failed (disk full, permissions, network).
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// Parquet encoding failed.
    #[error("parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    /// Arrow failed to combine or split batches.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The event stream failed.
    #[error("event stream: {0}")]
    Engine(#[from] tributary_engine::Error),
    /// A local folder could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A broken invariant: a bug in Tributary.
    #[error("internal error: {0}")]
    Internal(String),
}
