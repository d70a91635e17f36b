//! The event stream: a durable, partitioned, append-only log of Arrow batches
//! with consumer offsets.
//!
//! [`EventStream`] is the seam; [`EmbeddedLog`] is the implementation that
//! lives in the data directory. Offsets count events, not batches: a batch of
//! 10 events appended at offset 100 holds offsets 100..110, and the next append
//! to that partition starts at 110. Records go to the partition of their key
//! ([`partition_for`]): a device's events always go to the same partition, so
//! they stay in the order the device sent them. A rule appends each device's
//! rows to that device's partition, under the rule's own producer key (see
//! [`crate::checkpoint`]).
//!
//! # The same contract on NATS JetStream and Kafka
//!
//! [`EventStream`] is kept small so that other stores can implement it. This
//! is how each part maps; a NATS JetStream backend comes next.
//!
//! | here | NATS JetStream | Kafka |
//! |---|---|---|
//! | stream | a JetStream stream per Tributary stream | a topic |
//! | partition *p* | subject `<stream>.p<p>` (one stream, a subject per partition) | partition *p* |
//! | offset (counts events) | the message's stream sequence, mapped to event offsets by keeping the running event count in a header (`Trb-Offset`) | the record offset, same: a `trb-offset` header |
//! | record (one batch) | one message: the Arrow IPC bytes | one record: the Arrow IPC bytes |
//! | `submit` resolving when durable | publish and wait for the PubAck (`R3` replicas: acked once replicated) | `acks=all` and wait for the produce response |
//! | `submit_sequenced` (device resends) | `Nats-Msg-Id: <device>/<seq>` within the stream's duplicate window, and the highest `seq` per device kept beside it for resends older than the window | an idempotent producer per gateway (its own sequence covers the gateway's retries), plus the highest `seq` per device, checked before producing; `submit_to` names the partition (the subject `<stream>.p<p>`, the record's partition) |
//! | `commit` / `committed` | a durable pull consumer per Tributary consumer, acked up to the offset (`AckAll`) | a consumer group per Tributary consumer, offsets committed after the output is durable |
//! | `forget` | delete the durable consumer | delete the consumer group's offsets |
//! | `lag` | each durable consumer's pending count (`num_pending`) | each consumer group's lag: the end offsets less its committed ones |
//! | retention after every consumer read | `Interest` retention, or `Limits` with `MaxAge`/`MaxBytes` | `retention.ms` / `retention.bytes` (Kafka does not wait for consumers) |
//! | a full store: `Error::Unavailable` (`crate::Error`) | publish fails with "insufficient resources" or "maximum bytes exceeded" | `NOT_ENOUGH_REPLICAS`, a broker's full disk: retriable errors |
//! | `watch` | a consumer's pending count or an ordered push consumer | polling the end offsets |

mod embedded;
mod segment;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio::sync::watch;

use crate::Result;
use crate::event::StreamDef;

pub use embedded::{EmbeddedLog, LogOptions};

/// Stream option: how long consumed events stay in the log (`'1h'`).
pub const RETENTION: &str = "retention";
/// Stream option: how many bytes of consumed events a partition keeps.
pub const RETENTION_BYTES: &str = "retention_bytes";
/// How long consumed events stay in the log unless the stream says.
pub const DEFAULT_RETENTION_MS: i64 = 3_600_000;

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    pub partition: u32,
    /// Offset of the batch's first event.
    pub offset: u64,
    /// Number of events appended.
    pub count: u32,
    /// The batch was a resend: the log already held the device's record
    /// with that sequence number, so nothing was appended (`count` is 0 and
    /// `offset` is only the partition's end).
    pub duplicate: bool,
}

/// One batch read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: u32,
    /// Offset of the batch's first event.
    pub offset: u64,
    pub batch: RecordBatch,
}

impl Record {
    /// The offset just past this record's last event.
    pub fn end_offset(&self) -> u64 {
        self.offset + self.batch.num_rows() as u64
    }
}

/// The durable event stream.
///
/// Consumers read a partition from their committed offset, produce their own
/// durable output, and only then [`commit`](EventStream::commit): after a crash
/// they replay from the last commit, so what they produce must tolerate replays.
#[async_trait]
pub trait EventStream: Send + Sync + 'static {
    /// Creates the storage for a stream; a no-op when it already exists with
    /// the same number of partitions.
    async fn create_stream(&self, def: &StreamDef) -> Result<()>;

    /// Queues one batch of the device `key` for appending and returns at once
    /// with a future that resolves when the batch is durable. Batches submitted
    /// one after another are appended in that order, which is how a gateway
    /// keeps a device's frames in order while many are in flight.
    fn submit(&self, stream: &str, key: &str, batch: RecordBatch) -> Result<AppendFuture> {
        self.submit_sequenced(stream, key, 0, batch)
    }

    /// [`submit`](EventStream::submit) for a device that numbers its batches:
    /// `seq` (greater than 0) increases strictly with each batch the device
    /// sends, across connections and restarts. The log keeps, durably with
    /// the records, the highest `seq` it holds per device and stream:
    ///
    /// - a batch whose `seq` is not above it is a resend of one already
    ///   stored (its acknowledgement was lost): nothing is appended and the
    ///   receipt says `duplicate`;
    /// - after a batch failed to be stored, the device's batches with a
    ///   higher `seq` fail with [`Error::Unavailable`](crate::Error::Unavailable) until that one is sent
    ///   again, so a gap can never be mistaken for a resend.
    ///
    /// `seq` 0 appends unconditionally.
    ///
    /// On other stores: NATS JetStream does the same with a message id per
    /// batch (`Nats-Msg-Id: <device>/<seq>`) in its duplicate window; Kafka
    /// with an idempotent producer per gateway, whose own sequence numbers
    /// cover the gateway's retries, plus this check against the highest
    /// `seq` per device for resends across connections.
    fn submit_sequenced(
        &self,
        stream: &str,
        key: &str,
        seq: u64,
        batch: RecordBatch,
    ) -> Result<AppendFuture> {
        let partition = partition_for(key, self.partitions(stream)?);
        self.submit_to(stream, partition, key, seq, batch)
    }

    /// [`submit_sequenced`](EventStream::submit_sequenced) into a chosen
    /// partition: how a rule appends each device's rows to that device's
    /// partition under the rule's own key. Sequence numbers are kept per
    /// partition and key.
    fn submit_to(
        &self,
        stream: &str,
        partition: u32,
        key: &str,
        seq: u64,
        batch: RecordBatch,
    ) -> Result<AppendFuture>;

    /// Several of the device `key`'s batches, one after another, appended
    /// as one: `run` holds each batch's sequence number (as for
    /// [`submit_sequenced`](EventStream::submit_sequenced), increasing
    /// strictly; or all 0) and its number of events, in order, and `batch`
    /// their events, concatenated. How a gateway stores the small frames a
    /// device has pipelined at a cost close to one frame's.
    ///
    /// Batches the log holds already (resends) are left out and the rest
    /// stored; the receipt counts the events stored, which are those of the
    /// run's last batches (a batch holds at least one event, so the count
    /// says which). The embedded log stores the rest as one record, so all
    /// of it or none; this default submits each batch in turn, so if it
    /// fails, earlier batches may have been stored (numbered batches then
    /// count as resends when sent again).
    fn submit_run(
        &self,
        stream: &str,
        key: &str,
        run: &[(u64, u32)],
        batch: RecordBatch,
    ) -> Result<AppendFuture> {
        let mut appends = Vec::with_capacity(run.len());
        let mut at = 0usize;
        for (seq, rows) in run {
            let rows = *rows as usize;
            if at + rows > batch.num_rows() {
                return Err(crate::Error::User(
                    "a run's batches hold more events than its batch".into(),
                ));
            }
            appends.push(self.submit_sequenced(stream, key, *seq, batch.slice(at, rows))?);
            at += rows;
        }
        Ok(Box::pin(async move {
            let mut total: Option<AppendReceipt> = None;
            for append in appends {
                let r = append.await?;
                total = Some(match total {
                    None => r,
                    Some(t) if t.count == 0 => AppendReceipt {
                        offset: r.offset,
                        ..r
                    },
                    Some(t) => AppendReceipt {
                        count: t.count + r.count,
                        duplicate: false,
                        ..t
                    },
                });
            }
            total.ok_or_else(|| crate::Error::User("a run holds at least one batch".into()))
        }))
    }

    /// Appends one batch for the device `key`; returns only once the batch is durable.
    async fn append(&self, stream: &str, key: &str, batch: RecordBatch) -> Result<AppendReceipt> {
        self.submit(stream, key, batch)?.await
    }

    /// The number of partitions of `stream`.
    fn partitions(&self, stream: &str) -> Result<u32>;

    /// Reads batches holding events at or after `from`, at most about
    /// `max_events` events (always at least one batch when there is data).
    /// A batch that starts before `from` is sliced so it starts at `from`.
    /// Fails with `Unavailable` when retention already deleted events from
    /// `from` on (no consumer that committed can ask for those).
    async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_events: usize,
    ) -> Result<Vec<Record>>;

    /// The offset the next append to the partition will get.
    fn end_offset(&self, stream: &str, partition: u32) -> Result<u64>;

    /// A receiver that changes whenever anything is appended to `stream`.
    fn watch(&self, stream: &str) -> Result<watch::Receiver<u64>>;

    /// Records that `consumer` has durably handled everything before each
    /// `(partition, offset)`: all of them at once, in one durable write.
    async fn commit(&self, consumer: &str, stream: &str, offsets: &[(u32, u64)]) -> Result<()>;

    /// Forgets `consumer` (a dropped rule): it no longer holds events back
    /// from retention.
    async fn forget(&self, consumer: &str, stream: &str) -> Result<()>;

    /// The committed offset of `consumer` on a partition; `None` if it never committed.
    async fn committed(&self, consumer: &str, stream: &str, partition: u32) -> Result<Option<u64>>;

    /// How far each consumer of `stream` that has committed is behind its
    /// end: the events appended that it has not committed yet, all
    /// partitions together (a partition it never committed counts from
    /// 0). Sorted by consumer.
    fn lag(&self, stream: &str) -> Result<Vec<ConsumerLag>>;
}

/// Events of a stream a consumer has not committed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerLag {
    pub consumer: String,
    pub events: u64,
}

/// Resolves when a submitted batch is durable.
pub type AppendFuture = Pin<Box<dyn Future<Output = Result<AppendReceipt>> + Send>>;

/// A shared event stream.
pub type SharedEventStream = Arc<dyn EventStream>;

/// The partition a device's events go to: FNV-1a of the device id, so the
/// mapping is stable across restarts, machines and Rust versions.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(partition_for("sensor-1", 4), partition_for("sensor-1", 4));
        for i in 0..100 {
            assert!(partition_for(&format!("d{i}"), 7) < 7);
        }
        assert_eq!(partition_for("anything", 1), 0);
    }
}
