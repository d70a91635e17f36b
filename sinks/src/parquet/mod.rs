//! The Parquet sink and the storage it writes.
//!
//! One sink task per stream reads every partition, buffers batches per
//! event-time hour, and flushes when a buffer reaches a row or byte threshold
//! or grows older than the flush interval. A flush writes one file per hour
//! into the object store (a single atomic put: a file is either whole or not
//! there) and then commits the stream offsets it covers.
//!
//! Queries see the files plus the hot tail (events in the log that no file
//! holds yet). Every file records in its footer the flush it belongs to
//! ([`FlushInfo`]: how many files, which offsets); after a crash between
//! writing a flush's files and committing its offsets, the sink commits a
//! complete flush and deletes an incomplete one, so no event is stored twice.
//! [`Storage::snapshot`] takes both under a lock the sink holds
//! while it publishes a file and commits its offsets, so a query sees every
//! event exactly once.

mod sink;
mod storage;

pub use sink::{ParquetSinks, SINK_CONSUMER, SinkOptions};
pub use storage::{Storage, StreamSnapshot};
