//! The sink task: stream → buffered batches → Parquet files → committed offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arrow::array::{Array, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{
    ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn, compute_leaves,
};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Storage;
use crate::{Error, Result};
use tributary_engine::event::{StreamDef, TS, now_millis};
use tributary_engine::log::SharedEventStream;

/// The consumer name the Parquet sink commits offsets under.
pub const SINK_CONSUMER: &str = "parquet";

const MILLIS_PER_HOUR: i64 = 3_600_000;

/// When the sink writes a file.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Flush once this many events are buffered.
    pub flush_rows: usize,
    /// Flush once the buffered batches hold this many bytes in memory.
    pub flush_bytes: usize,
    /// Flush events that have waited this long, however few.
    pub flush_interval: Duration,
    /// ZSTD level of the Parquet files.
    pub zstd_level: i32,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            flush_rows: 100_000,
            flush_bytes: 64 << 20,
            flush_interval: Duration::from_secs(5),
            zstd_level: 3,
        }
    }
}

struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// The Parquet sinks of every stream.
pub struct ParquetSinks {
    storage: Storage,
    log: SharedEventStream,
    options: SinkOptions,
    tasks: Mutex<HashMap<String, Task>>,
}

impl ParquetSinks {
    pub fn new(storage: Storage, log: SharedEventStream, options: SinkOptions) -> Self {
        ParquetSinks {
            storage,
            log,
            options,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The storage the sinks write.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Starts the sink of a stream (a no-op if it runs already).
    pub fn start(&self, def: &StreamDef) -> Result<()> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.contains_key(&def.name) {
            return Ok(());
        }
        let (stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            stream: def.name.clone(),
            schema: def.schema(),
            storage: self.storage.clone(),
            log: self.log.clone(),
            options: self.options.clone(),
            files_written: 0,
        };
        let handle = tokio::spawn(worker.run(stop_rx));
        tasks.insert(def.name.clone(), Task { stop, handle });
        Ok(())
    }

    /// Flushes what every sink has buffered and stops them.
    pub async fn shutdown(&self) {
        let tasks: Vec<Task> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in &tasks {
            let _ = t.stop.send(true);
        }
        for t in tasks {
            let _ = t.handle.await;
        }
    }
}

struct Worker {
    stream: String,
    schema: SchemaRef,
    storage: Storage,
    log: SharedEventStream,
    options: SinkOptions,
    files_written: u64,
}

/// Batches read but not yet written, grouped by event-time hour.
#[derive(Default)]
struct Buffer {
    hours: BTreeMap<i64, Vec<RecordBatch>>,
    rows: usize,
    bytes: usize,
    since: Option<Instant>,
}

impl Buffer {
    fn add(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.rows += batch.num_rows();
        self.bytes += batch.get_array_memory_size();
        self.since.get_or_insert_with(Instant::now);
        for (hour, part) in split_by_hour(batch)? {
            self.hours.entry(hour).or_default().push(part);
        }
        Ok(())
    }

    fn full(&self, o: &SinkOptions) -> bool {
        self.rows >= o.flush_rows || self.bytes >= o.flush_bytes
    }

    fn due(&self, o: &SinkOptions) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= o.flush_interval)
    }
}

/// Splits a batch into one batch per event-time hour (usually just one).
fn split_by_hour(batch: RecordBatch) -> Result<Vec<(i64, RecordBatch)>> {
    let ts = batch
        .column_by_name(TS)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
        .ok_or_else(|| Error::Internal("stream batch has no millisecond ts column".into()))?;
    let hour = |i: usize| ts.value(i).div_euclid(MILLIS_PER_HOUR);
    let first = hour(0);
    if (1..ts.len()).all(|i| hour(i) == first) {
        return Ok(vec![(first, batch)]);
    }
    let mut rows: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for i in 0..ts.len() {
        rows.entry(hour(i)).or_default().push(i as u32);
    }
    rows.into_iter()
        .map(|(h, idx)| Ok((h, take_record_batch(&batch, &UInt32Array::from(idx))?)))
        .collect()
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        const FIRST_PAUSE: Duration = Duration::from_millis(200);
        let mut backoff = FIRST_PAUSE;
        loop {
            let started = Instant::now();
            match self.run_until_error(&mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(stream = %self.stream, error = %e, "parquet sink failed; retrying from the last committed offset");
                    if *stop.borrow() {
                        return;
                    }
                    // A sink that ran for a minute since its last failure
                    // starts over with short pauses.
                    if started.elapsed() >= Duration::from_secs(60) {
                        backoff = FIRST_PAUSE;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn run_until_error(&mut self, stop: &mut watch::Receiver<bool>) -> Result<()> {
        let mut in_flight = None;
        let result = self.pump(stop, &mut in_flight).await;
        // Never leave a flush running: after an error the sink recovers
        // from the files and offsets, which that flush may still be writing.
        let settled = settle(&mut in_flight).await;
        result.and(settled)
    }

    /// Reads the stream into buffers and flushes them, one flush writing
    /// while the next buffer fills (`in_flight`). A flush starts only once
    /// the one before it has committed, so the files past the committed
    /// offsets are always those of one flush, as recovery expects.
    async fn pump(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        in_flight: &mut Option<JoinHandle<Result<()>>>,
    ) -> Result<()> {
        let partitions = self.log.partitions(&self.stream)?;
        let mut appended = self.log.watch(&self.stream)?;
        let mut committed = Vec::with_capacity(partitions as usize);
        let mut first = Vec::new();
        for p in 0..partitions {
            let at = self.log.committed(SINK_CONSUMER, &self.stream, p).await?;
            if at.is_none() {
                first.push((p, 0));
            }
            committed.push(at.unwrap_or(0));
        }
        if !first.is_empty() {
            // Say so before the first flush: from now on the log keeps
            // every event until the sink has stored it.
            self.log.commit(SINK_CONSUMER, &self.stream, &first).await?;
        }
        self.recover(&mut committed).await?;
        let mut read = committed.clone();
        let mut buffer = Buffer::default();
        loop {
            let stopping = *stop.borrow();
            appended.borrow_and_update();
            let mut got = false;
            'partitions: for (p, position) in read.iter_mut().enumerate() {
                loop {
                    if buffer.full(&self.options) {
                        break 'partitions;
                    }
                    let records = self
                        .log
                        .read(&self.stream, p as u32, *position, 8192)
                        .await?;
                    let Some(end) = records.last().map(|r| r.end_offset()) else {
                        break;
                    };
                    for r in records {
                        buffer.add(r.batch)?;
                    }
                    *position = end;
                    got = true;
                }
            }
            if buffer.rows > 0
                && (stopping || buffer.full(&self.options) || buffer.due(&self.options))
            {
                let flush = self.prepare_flush(std::mem::take(&mut buffer), &committed, &read)?;
                settle(in_flight).await?;
                *in_flight = Some(tokio::spawn(flush.write()));
                committed.clone_from(&read);
                continue;
            }
            if stopping {
                return settle(in_flight).await;
            }
            if got {
                continue;
            }
            let deadline = buffer
                .since
                .and_then(|t| t.checked_add(self.options.flush_interval));
            tokio::select! {
                changed = appended.changed() => if changed.is_err() { return Ok(()) },
                _ = sleep_until(deadline) => {}
                _ = stop.changed() => {}
                // A failed flush ends the run now, not at the next flush.
                done = finished(in_flight) => done?,
            }
        }
    }

    /// Names the files of one flush (one per event hour) and what they
    /// record about it.
    fn prepare_flush(&mut self, buffer: Buffer, from: &[u64], to: &[u64]) -> Result<Flush> {
        let offsets: BTreeMap<usize, [u64; 2]> = from
            .iter()
            .zip(to)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(p, (a, b))| (p, [*a, *b]))
            .collect();
        let now = now_millis();
        let info = FlushInfo {
            id: format!("{now}-{}", self.files_written),
            files: buffer.hours.len(),
            offsets: offsets.iter().map(|(p, r)| (*p as u32, *r)).collect(),
        };
        let metadata = vec![
            KeyValue::new(STREAM_KEY.to_string(), self.stream.clone()),
            KeyValue::new(
                FLUSH_KEY.to_string(),
                serde_json::to_string(&info).map_err(|e| Error::Internal(e.to_string()))?,
            ),
        ];
        let mut files = Vec::with_capacity(buffer.hours.len());
        for hour in buffer.hours.keys() {
            self.files_written += 1;
            files.push(file_path(&self.stream, *hour, now, self.files_written)?);
        }
        Ok(Flush {
            stream: self.stream.clone(),
            schema: self.schema.clone(),
            storage: self.storage.clone(),
            log: self.log.clone(),
            zstd_level: self.options.zstd_level,
            buffer,
            files,
            metadata,
            ends: offsets
                .iter()
                .map(|(p, [_, end])| (*p as u32, *end))
                .collect(),
        })
    }
}

/// One flush, ready to write: its buffer, its files' paths and metadata,
/// and the offsets to commit once the files are durable.
struct Flush {
    stream: String,
    schema: SchemaRef,
    storage: Storage,
    log: SharedEventStream,
    zstd_level: i32,
    buffer: Buffer,
    files: Vec<ObjectPath>,
    metadata: Vec<KeyValue>,
    ends: Vec<(u32, u64)>,
}

impl Flush {
    /// Encodes one file per hour, puts them, makes them durable, then
    /// commits the offsets they cover.
    async fn write(self) -> Result<()> {
        let Flush {
            stream,
            schema,
            storage,
            log,
            zstd_level,
            buffer,
            files,
            metadata,
            ends,
        } = self;
        let encoded: Vec<Bytes> = tokio::task::spawn_blocking(move || {
            buffer
                .hours
                .into_values()
                .map(|batches| encode_parquet(&schema, &batches, zstd_level, metadata.clone()))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Error::Internal(format!("parquet encoder task failed: {e}")))??;

        let _publishing = storage.visibility.write().await;
        let mut rows_bytes = 0;
        let mut put = 0;
        let mut stored = Ok(0);
        for (path, bytes) in files.iter().zip(encoded) {
            rows_bytes += bytes.len();
            if let Err(e) = storage.store().put(path, bytes.into()).await {
                stored = Err(e.into());
                break;
            }
            put += 1;
        }
        if stored.is_ok() {
            stored = storage.make_durable(&files).await;
        }
        let folders = match stored {
            Ok(folders) => folders,
            Err(e) => {
                // Queries would see these events twice, in the files and
                // in the log, until the sink recovers: take them back.
                for path in &files[..put] {
                    if let Err(gone) = storage.store().delete(path).await {
                        tracing::warn!(stream = %stream, file = %path, error = %gone, "could not delete a file of a failed flush; recovery will");
                    }
                }
                return Err(e);
            }
        };
        log.commit(SINK_CONSUMER, &stream, &ends).await?;
        tracing::debug!(stream = %stream, files = files.len(), bytes = rows_bytes, folders_synced = folders, "flushed parquet");
        Ok(())
    }
}

/// Waits for the flush in flight, if any, and takes it.
async fn settle(in_flight: &mut Option<JoinHandle<Result<()>>>) -> Result<()> {
    match in_flight {
        Some(_) => finished(in_flight).await,
        None => Ok(()),
    }
}

/// Resolves when the flush in flight has finished (taking it); never if
/// there is none.
async fn finished(in_flight: &mut Option<JoinHandle<Result<()>>>) -> Result<()> {
    match in_flight {
        Some(flush) => {
            let done = flush
                .await
                .map_err(|e| Error::Internal(format!("parquet flush task failed: {e}")));
            *in_flight = None;
            done?
        }
        None => std::future::pending().await,
    }
}

/// Key-value metadata key naming the stream a file belongs to.
pub const STREAM_KEY: &str = "tributary.stream";
/// Key-value metadata key describing the flush a file belongs to.
pub const FLUSH_KEY: &str = "tributary.flush";

/// What every file of one flush records about it: the flush, how many files
/// it wrote, and the log offsets (`[start, end)` per partition) it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushInfo {
    pub id: String,
    pub files: usize,
    pub offsets: BTreeMap<u32, [u64; 2]>,
}

impl Worker {
    /// Makes the files and the committed offsets agree after a crash. A
    /// flush puts its files and then commits; a crash in between leaves
    /// files past the committed offsets. If all of that flush's files are
    /// there, its offsets are committed now (so its events are not written
    /// twice); if only some are, they are deleted (and written again).
    async fn recover(&self, committed: &mut [u64]) -> Result<()> {
        let _publishing = self.storage.visibility.write().await;
        let mut pending: HashMap<String, (FlushInfo, Vec<ObjectPath>)> = HashMap::new();
        for path in self.storage.object_paths(&self.stream).await? {
            let Some(info) = self.storage.flush_info(&path).await? else {
                continue;
            };
            let ahead = info
                .offsets
                .iter()
                .any(|(p, [_, end])| committed.get(*p as usize).is_some_and(|c| end > c));
            if ahead {
                pending
                    .entry(info.id.clone())
                    .or_insert_with(|| (info, Vec::new()))
                    .1
                    .push(path);
            }
        }
        for (id, (info, paths)) in pending {
            if paths.len() == info.files {
                tracing::warn!(stream = %self.stream, flush = %id, "a flush finished before a crash; committing its offsets");
                // A crash of the process can come between the put and its fsync.
                self.storage.make_durable(&paths).await?;
                let mut ends = Vec::new();
                for (p, [_, end]) in &info.offsets {
                    if let Some(c) = committed.get_mut(*p as usize)
                        && *end > *c
                    {
                        ends.push((*p, *end));
                        *c = *end;
                    }
                }
                self.log.commit(SINK_CONSUMER, &self.stream, &ends).await?;
            } else {
                tracing::warn!(stream = %self.stream, flush = %id, found = paths.len(), expected = info.files, "deleting the files of a flush a crash cut short");
                for path in paths {
                    self.storage.store().delete(&path).await?;
                }
            }
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// `<stream>/date=YYYY-MM-DD/hour=HH/<written at ms>-<n>.parquet`
fn file_path(stream: &str, hour: i64, now_ms: i64, n: u64) -> Result<ObjectPath> {
    let start = chrono::DateTime::from_timestamp(hour * 3600, 0)
        .ok_or_else(|| Error::Internal(format!("event hour {hour} is out of range")))?;
    Ok(ObjectPath::from(format!(
        "{stream}/date={}/hour={}/{now_ms:013}-{n:06}.parquet",
        start.format("%Y-%m-%d"),
        start.format("%H"),
    )))
}

/// One Parquet file, ZSTD-compressed, from batches of one schema.
pub(crate) fn encode_parquet(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    zstd_level: i32,
    metadata: Vec<KeyValue>,
) -> Result<Bytes> {
    let batch = concat_batches(schema, batches)?;
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_key_value_metadata(Some(metadata));
    // Integers are stored as deltas rather than through a dictionary:
    // counters and sequence numbers are all distinct, so their dictionary
    // is as large as the column and costs a hash per value, and a small
    // range of codes packs into as few bits either way. Floats, times and
    // strings keep the dictionary, which falls back to plain values by
    // itself once it grows too large (sensor readings are often few
    // distinct values; docs/benchmarks.md, "Parquet: integers as deltas").
    for field in schema.fields() {
        if matches!(field.data_type(), DataType::Int32 | DataType::Int64) {
            let column = ColumnPath::from(field.name().as_str());
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, Encoding::DELTA_BINARY_PACKED);
        }
    }
    write_row_groups(schema, &batch, props.build())
}

/// Writes `batch` as row groups of at most the properties' row count,
/// encoding the columns of each row group at once, one column per thread
/// up to the machine's cores. The same file `ArrowWriter` writes (its
/// Arrow schema in the key-value metadata included), which encodes one
/// column after another; encoding is most of a flush's work
/// (docs/benchmarks.md, "The Parquet sink falls behind less"). Row groups
/// are split by rows only: a limit in bytes is not supported.
fn write_row_groups(
    schema: &SchemaRef,
    batch: &RecordBatch,
    props: WriterProperties,
) -> Result<Bytes> {
    if props.max_row_group_bytes().is_some() {
        return Err(Error::Internal(
            "Parquet row groups are split by rows only, not by bytes".into(),
        ));
    }
    let row_group_rows = props.max_row_group_row_count().unwrap_or(usize::MAX);
    let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
    let (mut file, columns) = writer.into_serialized_writer()?;
    let rows = batch.num_rows();
    let step = row_group_rows.max(1);
    for (index, start) in (0..rows).step_by(step).enumerate() {
        let part = batch.slice(start, step.min(rows - start));
        let mut jobs = Vec::new();
        let mut writers = columns.create_column_writers(index)?.into_iter();
        for (field, array) in schema.fields().iter().zip(part.columns()) {
            for leaf in compute_leaves(field, array)? {
                let writer = writers.next().ok_or_else(|| {
                    Error::Internal(format!("no Parquet column writer for '{}'", field.name()))
                })?;
                jobs.push(Mutex::new(Some((writer, leaf))));
            }
        }
        let mut group = file.next_row_group()?;
        for chunk in encode_columns(&jobs) {
            chunk?.append_to_row_group(&mut group)?;
        }
        group.close()?;
    }
    Ok(Bytes::from(file.into_inner()?))
}

/// Encodes each column chunk, in order: the calling thread and up to one
/// more thread per core take the next column until none is left. Threads
/// that cannot be had leave their share to the others.
fn encode_columns(
    jobs: &[Mutex<Option<(ArrowColumnWriter, ArrowLeafColumn)>>],
) -> Vec<Result<ArrowColumnChunk>> {
    let results: Vec<Mutex<Option<Result<ArrowColumnChunk>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { return };
            let taken = job.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((mut writer, leaf)) = taken {
                let chunk = writer
                    .write(&leaf)
                    .and_then(|()| writer.close())
                    .map_err(Error::from);
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(chunk);
            }
        }
    };
    let helpers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len())
        .saturating_sub(1);
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name("parquet-encode".into())
                .spawn_scoped(scope, work);
            if spawned.is_err() {
                break;
            }
        }
        work();
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err(Error::Internal("a Parquet column was not encoded".into())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use futures::stream::BoxStream;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use tributary_engine::event::{ColumnDef, ColumnType};
    use tributary_engine::log::{EmbeddedLog, LogOptions};

    fn def() -> StreamDef {
        StreamDef::new(
            "telemetry",
            vec![ColumnDef {
                name: "temp".into(),
                ty: ColumnType::Float64,
            }],
            2,
        )
        .unwrap()
    }

    fn batch(device: &str, ts: &[i64]) -> RecordBatch {
        let n = ts.len();
        RecordBatch::try_new(
            def().schema(),
            vec![
                Arc::new(StringArray::from(vec![device; n])),
                Arc::new(TimestampMillisecondArray::from(ts.to_vec()).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(vec![0i64; n]).with_timezone("UTC")),
                Arc::new(Float64Array::from(
                    (0..n).map(|i| i as f64).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    /// Flush after flush lands, and a flush that fails is written again
    /// once the store takes it: the sink's lag holds meanwhile, the flushes
    /// before it stay, and every event lands once.
    #[tokio::test]
    async fn a_failed_flush_is_written_again_and_every_event_lands_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, storage) = log_and_storage(dir.path()).await;
        // A file where the second hour's folder goes: its puts fail.
        let blocker = dir.path().join("storage/telemetry/date=1970-01-01/hour=01");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"not a folder").unwrap();
        let parquet_lag = || parquet_lag(&log);

        let sinks = flushing_every_ten(&storage, &log);
        let mut sent: Vec<i64> = Vec::new();
        // Hour 00, ten events at a time: a flush each, or a few together.
        for i in 0..5 {
            let ts: Vec<i64> = (0..10).map(|j| 1_000 + i * 10 + j).collect();
            sent.extend(&ts);
            log.append("telemetry", "a", batch("a", &ts)).await.unwrap();
        }
        until("hour 00 stored", || parquet_lag() == Some(0)).await;
        let hour_00_files = storage
            .snapshot(log.as_ref(), "telemetry")
            .await
            .unwrap()
            .files
            .len();
        // Hour 01 cannot be written; these flushes put their hour 00 file
        // first, then fail.
        for i in 0..3 {
            let ts: Vec<i64> = (0..10)
                .map(|j| if j < 5 { 100_000 } else { 3_601_000 } + i * 10 + j)
                .collect();
            sent.extend(&ts);
            log.append("telemetry", "a", batch("a", &ts)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(parquet_lag(), Some(30));
        // A query sees each event once: the failed flushes' files are gone.
        let seen = storage.snapshot(log.as_ref(), "telemetry").await.unwrap();
        assert_eq!(seen.files.len(), hour_00_files, "{:?}", seen.files);
        let rows: usize = seen.files.iter().map(|f| read_rows(f)).sum::<usize>()
            + seen.tail.iter().map(|b| b.num_rows()).sum::<usize>();
        assert_eq!(rows, sent.len());
        std::fs::remove_file(&blocker).unwrap();
        until("hour 01 stored", || parquet_lag() == Some(0)).await;
        sinks.shutdown().await;

        let files = parquet_files(&storage, &log).await;
        let hour = |h: &str| {
            files
                .iter()
                .filter(|f| f.to_string_lossy().contains(h))
                .count()
        };
        assert!(
            hour("hour=00") > hour_00_files && hour("hour=01") >= 1,
            "{files:?}"
        );
        sent.sort_unstable();
        assert_eq!(stored_times(&files), sent);
    }

    /// A flush writes only once the one before it has committed, while the
    /// next buffer fills. The first flush's put is held while the second
    /// flush is ready; then the first fails. The second must not commit
    /// past it: after the retry, every event lands once.
    #[tokio::test]
    async fn a_flush_writes_only_after_the_one_before_has_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (log, storage) = log_and_storage(dir.path()).await;
        let held = Arc::new(HeldPuts {
            inner: Mutex::new(None),
            permits: tokio::sync::Semaphore::new(0),
            begun: AtomicUsize::new(0),
            fail_next: AtomicBool::new(false),
        });
        let storage = storage.wrapped(|inner| {
            *held.inner.lock().unwrap() = Some(inner);
            held.clone()
        });
        let parquet_lag = || parquet_lag(&log);
        let sinks = flushing_every_ten(&storage, &log);
        let mut sent: Vec<i64> = (0..10).map(|j| 1_000 + j).collect();
        log.append("telemetry", "a", batch("a", &sent))
            .await
            .unwrap();
        until("the first put", || held.begun() == 1).await;
        let ts: Vec<i64> = (0..10).map(|j| 2_000 + j).collect();
        sent.extend(&ts);
        log.append("telemetry", "a", batch("a", &ts)).await.unwrap();
        // Time for the sink to read the second buffer and make it a flush.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            held.begun(),
            1,
            "the second flush put before the first committed"
        );
        assert_eq!(parquet_lag(), Some(20));
        held.fail_next.store(true, Ordering::SeqCst);
        held.release(1_000);
        until("every event stored", || parquet_lag() == Some(0)).await;
        sinks.shutdown().await;

        let files = parquet_files(&storage, &log).await;
        assert_eq!(stored_times(&files), sent);
    }

    /// The Parquet sink's lag on `telemetry`.
    fn parquet_lag(log: &SharedEventStream) -> Option<u64> {
        log.lag("telemetry")
            .unwrap()
            .into_iter()
            .find(|l| l.consumer == SINK_CONSUMER)
            .map(|l| l.events)
    }

    /// A started sink for `telemetry` that flushes every ten events.
    fn flushing_every_ten(storage: &Storage, log: &SharedEventStream) -> ParquetSinks {
        let sinks = ParquetSinks::new(
            storage.clone(),
            log.clone(),
            SinkOptions {
                flush_rows: 10,
                flush_interval: Duration::from_secs(3600),
                ..SinkOptions::default()
            },
        );
        sinks.start(&def()).unwrap();
        sinks
    }

    /// The Parquet files of `telemetry`.
    async fn parquet_files(storage: &Storage, log: &SharedEventStream) -> Vec<std::path::PathBuf> {
        storage
            .snapshot(log.as_ref(), "telemetry")
            .await
            .unwrap()
            .files
    }

    /// Every event time in the files, read back by parquet's reader, sorted.
    fn stored_times(files: &[std::path::PathBuf]) -> Vec<i64> {
        let mut times = Vec::new();
        for f in files {
            let rows = read_back(std::fs::read(f).unwrap().into(), &def().schema());
            let ts = rows
                .column_by_name(TS)
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .unwrap();
            times.extend(ts.values().iter());
        }
        times.sort_unstable();
        times
    }

    /// Waits until `done`, failing after 20 s with `what`.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// An object store whose puts each wait for a permit
    /// ([`release`](HeldPuts::release)) and can be made to fail;
    /// everything else goes straight to the store it wraps.
    #[derive(Debug)]
    struct HeldPuts {
        inner: Mutex<Option<Arc<dyn ObjectStore>>>,
        permits: tokio::sync::Semaphore,
        begun: AtomicUsize,
        /// The next put to get its permit fails.
        fail_next: AtomicBool,
    }

    impl HeldPuts {
        fn store(&self) -> Arc<dyn ObjectStore> {
            self.inner.lock().unwrap().clone().expect("a wrapped store")
        }
        fn begun(&self) -> usize {
            self.begun.load(Ordering::SeqCst)
        }
        fn release(&self, puts: usize) {
            self.permits.add_permits(puts);
        }
    }

    impl std::fmt::Display for HeldPuts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "HeldPuts")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for HeldPuts {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.begun.fetch_add(1, Ordering::SeqCst);
            self.permits.acquire().await.expect("never closed").forget();
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Err(object_store::Error::Generic {
                    store: "HeldPuts",
                    source: "the put was made to fail".into(),
                });
            }
            self.store().put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.store().put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.store().get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
            self.store().delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.store().list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<ListResult> {
            self.store().list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.store().copy_opts(from, to, options).await
        }
    }

    /// A Parquet file's rows, read by parquet's own reader, as one batch.
    fn read_back(file: Bytes, schema: &SchemaRef) -> RecordBatch {
        let read: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        concat_batches(schema, &read).unwrap()
    }

    /// A log under `dir` with the `telemetry` stream, and the Parquet
    /// storage beside it.
    async fn log_and_storage(dir: &std::path::Path) -> (SharedEventStream, Storage) {
        let log: SharedEventStream =
            Arc::new(EmbeddedLog::open(dir.join("log"), LogOptions::default()).unwrap());
        log.create_stream(&def()).await.unwrap();
        (log, Storage::local(dir.join("storage")).unwrap())
    }

    fn read_rows(path: &std::path::Path) -> usize {
        let file = std::fs::File::open(path).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum()
    }

    #[test]
    fn batches_split_by_event_hour() {
        let parts = split_by_hour(batch("d", &[0, 3_600_000, 10, 7_200_001])).unwrap();
        let sizes: Vec<_> = parts.iter().map(|(h, b)| (*h, b.num_rows())).collect();
        assert_eq!(sizes, [(0, 2), (1, 1), (2, 1)]);
    }

    /// Integer columns are written as deltas, without a dictionary; the
    /// others keep theirs. The values read back as they went in.
    #[test]
    fn integers_are_stored_as_deltas_and_the_rest_with_a_dictionary() {
        use arrow::array::{Int32Array, Int64Array};
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let columns = [
            ("seq", ColumnType::Int64),
            ("code", ColumnType::Int32),
            ("temp", ColumnType::Float64),
            ("status", ColumnType::Utf8),
        ];
        let def = StreamDef::new(
            "t",
            columns
                .iter()
                .map(|(name, ty)| ColumnDef {
                    name: (*name).into(),
                    ty: *ty,
                })
                .collect(),
            1,
        )
        .unwrap();
        let n = 1_000;
        let seq: Vec<i64> = (1..=n).collect();
        let code: Vec<i32> = (0..n as i32).map(|i| i % 4).collect();
        let batch = RecordBatch::try_new(
            def.schema(),
            vec![
                Arc::new(StringArray::from(vec!["d"; n as usize])),
                Arc::new(TimestampMillisecondArray::from(seq.clone()).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(seq.clone()).with_timezone("UTC")),
                Arc::new(Int64Array::from(seq.clone())),
                Arc::new(Int32Array::from(code.clone())),
                Arc::new(Float64Array::from(vec![21.5; n as usize])),
                Arc::new(StringArray::from(vec!["ok"; n as usize])),
            ],
        )
        .unwrap();
        let bytes =
            encode_parquet(&def.schema(), std::slice::from_ref(&batch), 3, Vec::new()).unwrap();

        let reader = SerializedFileReader::new(bytes.clone()).unwrap();
        let row_group = reader.metadata().row_group(0);
        let encodings = |name: &str| {
            let column = row_group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"));
            column.encodings().collect::<Vec<Encoding>>()
        };
        for name in ["seq", "code"] {
            let e = encodings(name);
            assert!(e.contains(&Encoding::DELTA_BINARY_PACKED), "{name}: {e:?}");
            assert!(!e.contains(&Encoding::RLE_DICTIONARY), "{name}: {e:?}");
        }
        for name in ["device_id", "ts", "temp", "status"] {
            let e = encodings(name);
            assert!(e.contains(&Encoding::RLE_DICTIONARY), "{name}: {e:?}");
        }

        assert_eq!(read_back(bytes, &def.schema()), batch);
    }

    /// Columns encoded at once make the very file `ArrowWriter` makes one
    /// column after another, byte for byte, row groups split the same way;
    /// parquet's reader reads back the rows written, and their Arrow types.
    #[test]
    fn columns_encoded_at_once_make_the_file_arrow_writer_makes() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let n = 2_500;
        let ts: Vec<i64> = (0..n).map(|i| 1_700_000_000_000 + i * 7).collect();
        let devices: Vec<String> = (0..n).map(|i| format!("dev-{}", i % 13)).collect();
        let temps: Vec<f64> = (0..n).map(|i| (i % 50) as f64 / 4.0).collect();
        let batch = RecordBatch::try_new(
            def().schema(),
            vec![
                Arc::new(StringArray::from(devices)),
                Arc::new(TimestampMillisecondArray::from(ts.clone()).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
                Arc::new(Float64Array::from(temps)),
            ],
        )
        .unwrap();
        let metadata = vec![KeyValue::new("k".to_string(), "v".to_string())];
        for row_group_rows in [1_000, 10_000] {
            let props = || {
                WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap()))
                    .set_key_value_metadata(Some(metadata.clone()))
                    .set_max_row_group_row_count(Some(row_group_rows))
                    .build()
            };
            let ours = write_row_groups(&def().schema(), &batch, props()).unwrap();
            let mut one_by_one =
                ArrowWriter::try_new(Vec::new(), def().schema(), Some(props())).unwrap();
            one_by_one.write(&batch).unwrap();
            let theirs = one_by_one.into_inner().unwrap();
            assert!(ours[..] == theirs[..], "{row_group_rows} rows per group");

            let reader = SerializedFileReader::new(ours.clone()).unwrap();
            let groups = reader.metadata().num_row_groups();
            assert_eq!(groups, (n as usize).div_ceil(row_group_rows));
            assert_eq!(read_back(ours, &def().schema()), batch);
        }
    }

    #[test]
    fn paths_follow_the_documented_layout() {
        let p = file_path("telemetry", 491_000, 5, 1).unwrap();
        assert_eq!(
            p.as_ref(),
            "telemetry/date=2026-01-05/hour=08/0000000000005-000001.parquet"
        );
    }

    #[tokio::test]
    async fn sink_writes_files_commits_and_snapshots_see_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, storage) = log_and_storage(dir.path()).await;
        log.append("telemetry", "a", batch("a", &[1_000, 3_601_000]))
            .await
            .unwrap();
        log.append("telemetry", "b", batch("b", &[2_000]))
            .await
            .unwrap();

        let before = storage.snapshot(log.as_ref(), "telemetry").await.unwrap();
        assert!(before.files.is_empty());
        assert_eq!(before.tail.iter().map(|b| b.num_rows()).sum::<usize>(), 3);

        let sinks = ParquetSinks::new(
            storage.clone(),
            log.clone(),
            SinkOptions {
                flush_interval: Duration::from_secs(3600),
                ..SinkOptions::default()
            },
        );
        sinks.start(&def()).unwrap();
        // Shutdown flushes what was read, however young.
        tokio::time::sleep(Duration::from_millis(200)).await;
        sinks.shutdown().await;

        let after = storage.snapshot(log.as_ref(), "telemetry").await.unwrap();
        assert!(after.tail.is_empty());
        assert_eq!(after.files.len(), 2, "{:?}", after.files);
        assert!(
            after.files[0]
                .to_string_lossy()
                .contains("date=1970-01-01/hour=00")
        );
        assert!(after.files[1].to_string_lossy().contains("hour=01"));
        let total: usize = after.files.iter().map(|f| read_rows(f)).sum();
        assert_eq!(total, 3);
    }

    /// Writes the file a crashed flush left behind: all of the log's events
    /// of partition `p`, claiming to be one of `files` files.
    async fn leave_crashed_flush(
        storage: &Storage,
        log: &SharedEventStream,
        p: u32,
        files: usize,
    ) -> usize {
        let records = log.read("telemetry", p, 0, 1000).await.unwrap();
        let end = records.last().unwrap().end_offset();
        let batches: Vec<_> = records.into_iter().map(|r| r.batch).collect();
        let rows = batches.iter().map(|b| b.num_rows()).sum();
        let info = FlushInfo {
            id: "crashed".into(),
            files,
            offsets: BTreeMap::from([(p, [0, end])]),
        };
        let metadata = vec![KeyValue::new(
            FLUSH_KEY.to_string(),
            serde_json::to_string(&info).unwrap(),
        )];
        let bytes = encode_parquet(&def().schema(), &batches, 3, metadata).unwrap();
        let path =
            ObjectPath::from("telemetry/date=1970-01-01/hour=00/0000000000001-000001.parquet");
        storage.store().put(&path, bytes.into()).await.unwrap();
        rows
    }

    async fn run_sink_once(storage: &Storage, log: &SharedEventStream) {
        let sinks = ParquetSinks::new(storage.clone(), log.clone(), SinkOptions::default());
        sinks.start(&def()).unwrap();
        // Shutdown alone makes the sink recover, read everything and flush.
        sinks.shutdown().await;
    }

    #[tokio::test]
    async fn after_a_crash_a_complete_flush_is_committed_and_a_partial_one_deleted() {
        for (files, kept) in [(1, true), (2, false)] {
            let dir = tempfile::tempdir().unwrap();
            let (log, storage) = log_and_storage(dir.path()).await;
            let receipt = log
                .append("telemetry", "a", batch("a", &[1, 2, 3]))
                .await
                .unwrap();
            let rows = leave_crashed_flush(&storage, &log, receipt.partition, files).await;
            assert_eq!(rows, 3);

            run_sink_once(&storage, &log).await;

            let snapshot = storage.snapshot(log.as_ref(), "telemetry").await.unwrap();
            assert!(snapshot.tail.is_empty());
            let total: usize = snapshot.files.iter().map(|f| read_rows(f)).sum();
            assert_eq!(
                total, 3,
                "each event stored once (complete flush kept: {kept})"
            );
            let crashed = snapshot
                .files
                .iter()
                .any(|f| f.ends_with("0000000000001-000001.parquet"));
            assert_eq!(crashed, kept);
        }
    }
}
