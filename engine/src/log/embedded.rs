//! The embedded log: the default [`EventStream`], in the data directory.
//!
//! Layout: `<dir>/<stream>/meta.json`, `<dir>/<stream>/offsets.json` (consumer
//! offsets) and `<dir>/<stream>/p<N>/<base offset>.seg` (see [`super::segment`]).
//!
//! Each stream has one writer thread. Appends queue up for it; it takes every
//! append waiting, writes them, fsyncs each touched partition once (all at
//! once, on threads of their own), and only then answers them all (group
//! commit). Readers share an index of record positions and a cache of the
//! newest batches, so consumers following the tail never touch the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{
    DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions, StreamWriter,
    write_message,
};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::segment::{self, Entry, Format};
use super::{
    AppendFuture, AppendReceipt, ConsumerLag, DEFAULT_RETENTION_MS, EventStream, RETENTION,
    RETENTION_BYTES, Record,
};
use crate::event::StreamDef;
use crate::fsutil::{sync_dir, write_atomic};
use crate::{Error, Result};

/// How the embedded log behaves.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// fsync every group of appends before acknowledging them. Turning it off
    /// keeps acknowledged events safe from a crash of the process but not from
    /// a crash of the machine.
    pub fsync: bool,
    /// A partition starts a new segment once its current one reaches this size.
    pub segment_bytes: u64,
    /// Memory for the newest batches of each partition, served to readers
    /// without touching the disk.
    pub cache_bytes_per_partition: usize,
    /// Open without a writer: for reading a data directory another process may own.
    pub read_only: bool,
    /// Most bytes the log may hold on disk, all streams together. When an
    /// append would go past it, consumed segments are deleted whatever the
    /// streams' retention; if that is not enough the append fails with
    /// [`Error::Unavailable`] (devices are told to retry later).
    pub max_bytes: Option<u64>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: true,
            segment_bytes: 128 << 20,
            cache_bytes_per_partition: 16 << 20,
            read_only: false,
            max_bytes: None,
        }
    }
}

/// The embedded, durable, partitioned log.
pub struct EmbeddedLog {
    dir: PathBuf,
    options: LogOptions,
    streams: RwLock<HashMap<String, Arc<StreamLog>>>,
    /// Bytes of segment files on disk, all streams together.
    used: Arc<AtomicU64>,
}

#[derive(Serialize, Deserialize)]
struct StreamMeta {
    def: StreamDef,
}

type ConsumerOffsets = BTreeMap<String, BTreeMap<u32, u64>>;

struct StreamLog {
    schema: SchemaRef,
    /// The start of every record body: the IPC stream's schema message,
    /// encoded once rather than per append (see [`RecordEncoder`]).
    encoder: RecordEncoder,
    retention: Retention,
    partitions: Vec<Mutex<PartitionIndex>>,
    writer: Option<mpsc::Sender<WriteRequest>>,
    appended: watch::Sender<u64>,
    offsets: Mutex<ConsumerOffsets>,
    offsets_write: Mutex<()>,
    offsets_path: PathBuf,
}

/// How long consumed events stay, from the stream's options.
#[derive(Debug, Clone, Copy)]
struct Retention {
    age: Duration,
    /// Bytes a partition keeps, if bounded.
    bytes: Option<u64>,
}

impl Retention {
    fn of(def: &StreamDef) -> Retention {
        let age = def
            .options
            .get(RETENTION)
            .and_then(|t| crate::duration::parse_duration(t).ok())
            .unwrap_or(DEFAULT_RETENTION_MS);
        Retention {
            age: Duration::from_millis(age.max(0) as u64),
            bytes: def
                .options
                .get(RETENTION_BYTES)
                .and_then(|b| b.parse().ok()),
        }
    }
}

struct SegmentIndex {
    base: u64,
    path: PathBuf,
    file: Arc<File>,
    format: Format,
    entries: Vec<Entry>,
}

struct PartitionIndex {
    segments: Vec<SegmentIndex>,
    end: u64,
    cache: VecDeque<Record>,
    /// The memory each cached record's batch holds, in the cache's order
    /// (measured by the appender, off the writer thread).
    cache_sizes: VecDeque<usize>,
    cache_bytes: usize,
    /// Device → the highest sequence number of its records held durably.
    seqs: HashMap<String, u64>,
}

struct WriteRequest {
    partition: u32,
    count: u32,
    /// The device the batch was appended for.
    key: String,
    /// The device's sequence number for the batch, 0 for none; for a run
    /// of batches, the last one's.
    seq: u64,
    /// A run of the device's batches stored as one record
    /// ([`EventStream::submit_run`]): each batch's sequence number and
    /// rows, in order. Empty for a single batch.
    run: Vec<(u64, u32)>,
    body: Vec<u8>,
    batch: RecordBatch,
    /// The batch's memory, for the cache's budget.
    memory: usize,
    reply: oneshot::Sender<Result<AppendReceipt>>,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`, recovering every stream found there.
    pub fn open(dir: impl Into<PathBuf>, options: LogOptions) -> Result<Self> {
        let dir = dir.into();
        if !options.read_only {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let log = EmbeddedLog {
            dir,
            options,
            streams: RwLock::new(HashMap::new()),
            used: Arc::new(AtomicU64::new(0)),
        };
        let entries = match fs::read_dir(&log.dir) {
            Ok(entries) => entries.collect::<std::io::Result<Vec<_>>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && log.options.read_only => {
                Ok(vec![])
            }
            Err(e) => Err(e),
        }
        .map_err(|e| Error::io(format!("list {}", log.dir.display()), e))?;
        for entry in entries {
            let meta_path = entry.path().join("meta.json");
            if !meta_path.exists() {
                continue;
            }
            let bytes = fs::read(&meta_path)
                .map_err(|e| Error::io(format!("read {}", meta_path.display()), e))?;
            let meta: StreamMeta = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: meta_path.clone(),
                reason: e.to_string(),
            })?;
            let stream = log.open_stream(&meta.def)?;
            log.write_streams().insert(meta.def.name.clone(), stream);
        }
        Ok(log)
    }

    fn write_streams(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<StreamLog>>> {
        self.streams.write().unwrap_or_else(|p| p.into_inner())
    }

    fn stream(&self, name: &str) -> Result<Arc<StreamLog>> {
        self.streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "stream",
                name: name.to_string(),
            })
    }

    /// Names of the streams the log holds.
    pub fn stream_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn open_stream(&self, def: &StreamDef) -> Result<Arc<StreamLog>> {
        let stream_dir = self.dir.join(&def.name);
        let mut partitions = Vec::with_capacity(def.partitions as usize);
        let mut writers = Vec::with_capacity(def.partitions as usize);
        for p in 0..def.partitions {
            let (index, writer) = open_partition(&stream_dir.join(format!("p{p}")), &self.options)?;
            let bytes: u64 = index
                .segments
                .iter()
                .filter_map(|s| s.file.metadata().ok())
                .map(|m| m.len())
                .sum();
            self.used.fetch_add(bytes, Ordering::Relaxed);
            partitions.push(Mutex::new(index));
            writers.push(writer);
        }
        let offsets_path = stream_dir.join("offsets.json");
        let offsets: ConsumerOffsets = match fs::read(&offsets_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: offsets_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(format!("read {}", offsets_path.display()), e)),
        };
        let (appended, _) = watch::channel(0);
        let mut stream = StreamLog {
            schema: def.schema(),
            encoder: RecordEncoder::new(&def.schema())?,
            retention: Retention::of(def),
            partitions,
            writer: None,
            appended,
            offsets: Mutex::new(offsets),
            offsets_write: Mutex::new(()),
            offsets_path,
        };
        if !self.options.read_only {
            let (tx, rx) = mpsc::channel();
            stream.writer = Some(tx);
            let stream = Arc::new(stream);
            let writer = Writer {
                stream: Arc::downgrade(&stream),
                dir: stream_dir,
                options: self.options.clone(),
                holes: vec![HashMap::new(); writers.len()],
                partitions: writers,
                used: self.used.clone(),
                retained_at: Instant::now(),
            };
            std::thread::Builder::new()
                .name(format!("log-{}", def.name))
                .spawn(move || writer.run(rx))
                .map_err(|e| Error::io("start the log writer thread", e))?;
            return Ok(stream);
        }
        Ok(Arc::new(stream))
    }
}

/// Recovers one partition: scans its segments, cuts a torn tail off the last one.
fn open_partition(dir: &Path, options: &LogOptions) -> Result<(PartitionIndex, ActiveSegment)> {
    if !options.read_only {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let mut bases: Vec<u64> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| segment::parse_segment_name(&e.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
    };
    bases.sort_unstable();
    let mut segments = Vec::with_capacity(bases.len());
    // What deleted segments held, then what the remaining ones hold.
    let mut seqs = read_seqs(dir)?;
    let mut end = bases.first().copied().unwrap_or(0);
    let last = bases.len().saturating_sub(1);
    for (i, base) in bases.iter().copied().enumerate() {
        let path = dir.join(segment::segment_name(base));
        if base != end {
            return Err(Error::Corrupt {
                path,
                reason: format!(
                    "segment starts at offset {base}, but the previous one ends at {end}"
                ),
            });
        }
        let scan = segment::scan(&path, base)?;
        if let Some(reason) = &scan.torn {
            if i != last {
                return Err(Error::Corrupt {
                    path,
                    reason: format!("{reason} in a segment that is not the last"),
                });
            }
            if !options.read_only {
                tracing::warn!(path = %path.display(), reason, kept_bytes = scan.valid_len, "cutting a torn record off the log");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                let keep = scan.valid_len.max(segment::MAGIC.len() as u64);
                if scan.valid_len < segment::MAGIC.len() as u64 {
                    f.set_len(0)
                        .and_then(|()| (&f).write_all(segment::MAGIC))
                        .map_err(|e| Error::io(format!("repair {}", path.display()), e))?;
                }
                f.set_len(keep)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Error::io(format!("truncate {}", path.display()), e))?;
            }
        }
        if let Some(e) = scan.entries.last() {
            end = e.offset + u64::from(e.count);
        }
        for q in scan.sequenced {
            let highest = seqs.entry(q.key).or_default();
            *highest = (*highest).max(q.seq);
        }
        let mut format = scan.format;
        if format == Format::V1 && scan.entries.is_empty() && !options.read_only {
            // Nothing in it yet: start it over in the current format.
            write_magic(&path)?;
            format = Format::V2;
        }
        let file =
            File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        segments.push(SegmentIndex {
            base,
            path,
            file: Arc::new(file),
            format,
            entries: scan.entries,
        });
    }
    let active = match segments.last() {
        // New records never go into a segment of the first format: the
        // first append starts a new segment.
        Some(seg) if !options.read_only && seg.format == Format::V2 => {
            let file = OpenOptions::new()
                .append(true)
                .open(&seg.path)
                .map_err(|e| Error::io(format!("open {}", seg.path.display()), e))?;
            let len = file
                .metadata()
                .map_err(|e| Error::io(format!("stat {}", seg.path.display()), e))?
                .len();
            Some(ActiveSegment {
                file: Some(file),
                len,
                records: seg.entries.len(),
                end,
                broken: None,
            })
        }
        _ => None,
    };
    Ok((
        PartitionIndex {
            segments,
            end,
            cache: VecDeque::new(),
            cache_sizes: VecDeque::new(),
            cache_bytes: 0,
            seqs,
        },
        active.unwrap_or(ActiveSegment {
            file: None,
            len: 0,
            records: 0,
            end,
            broken: None,
        }),
    ))
}

/// The writer thread's view of a partition's newest segment.
struct ActiveSegment {
    file: Option<File>,
    len: u64,
    records: usize,
    end: u64,
    /// Set when a failed write could not be undone (or an fsync failed):
    /// the file's tail is unknown, so nothing more goes into this
    /// partition until the server restarts and recovery checks it.
    broken: Option<String>,
}

struct Writer {
    stream: std::sync::Weak<StreamLog>,
    dir: PathBuf,
    options: LogOptions,
    partitions: Vec<ActiveSegment>,
    /// Per partition: device → the sequence numbers of its frames that
    /// failed to be stored or were refused. Until they are sent again, in
    /// order, the device's other new frames are refused: storing them
    /// would leave a gap that a resend could never fill (it would look
    /// like a duplicate).
    holes: Vec<HashMap<String, BTreeSet<u64>>>,
    /// Bytes of segment files on disk, all streams together.
    used: Arc<AtomicU64>,
    /// When retention last ran.
    retained_at: Instant,
}

/// Most refused sequence numbers remembered per device.
const MAX_MISSING: usize = 1 << 16;
/// How often an idle writer applies retention.
const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// The smallest segment a log with a byte limit rolls at.
const MIN_SEGMENT_BYTES: u64 = 64 << 10;

/// One partition's share of a group, sorted out.
#[derive(Default)]
struct Sorted {
    /// To write.
    write: Vec<WriteRequest>,
    /// Resends of records already in the log (or written earlier in the group).
    duplicates: Vec<WriteRequest>,
}

/// Most appends written under one fsync.
const MAX_GROUP: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriteRequest>) {
        loop {
            let first = match rx.recv_timeout(RETENTION_EVERY) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let Some(stream) = self.stream.upgrade() else {
                        return;
                    };
                    let pressure = self.under_pressure();
                    self.retain(&stream, pressure);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let Some(stream) = self.stream.upgrade() else {
                return;
            };
            self.write_group(&stream, group);
            if self.retained_at.elapsed() >= RETENTION_EVERY {
                let pressure = self.under_pressure();
                self.retain(&stream, pressure);
            }
        }
    }

    /// Segment size: a log with a byte limit rolls often enough that
    /// consumed segments can be deleted well before the limit.
    fn segment_bytes(&self) -> u64 {
        match self.options.max_bytes {
            Some(max) => self
                .options
                .segment_bytes
                .min((max / 16).max(MIN_SEGMENT_BYTES)),
            None => self.options.segment_bytes,
        }
    }

    /// Whether the log is near its byte limit: then every stream's writer
    /// deletes what its consumers have read, whatever the retention, so
    /// one idle stream cannot keep another from appending.
    fn under_pressure(&self) -> bool {
        self.options
            .max_bytes
            .is_some_and(|max| self.used.load(Ordering::Relaxed) >= max / 10 * 9)
    }

    /// Whether `bytes` more fit under the byte limit, deleting consumed
    /// segments of this stream first if they do not.
    fn make_room(&mut self, stream: &StreamLog, bytes: u64) -> Result<()> {
        let Some(max) = self.options.max_bytes else {
            return Ok(());
        };
        if self.used.load(Ordering::Relaxed) + bytes <= max {
            return Ok(());
        }
        self.retain(stream, true);
        let used = self.used.load(Ordering::Relaxed);
        if used + bytes <= max {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "the event log is full ({used} of {max} bytes, --log-max-bytes): its consumers have not read the oldest events yet; retry later"
        )))
    }

    /// Deletes segments every consumer has committed past, oldest first,
    /// once the stream's retention lets them go, or at once under
    /// `pressure` (the log is at its byte limit). The newest segment of a
    /// partition always stays.
    fn retain(&mut self, stream: &StreamLog, pressure: bool) {
        self.retained_at = Instant::now();
        let offsets = lock(&stream.offsets).clone();
        if offsets.is_empty() {
            return;
        }
        for p in 0..self.partitions.len() {
            // A consumer that never committed on this partition holds it all.
            let consumed = offsets
                .values()
                .map(|c| c.get(&(p as u32)).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            // Under pressure, a newest segment that has been read to its
            // end is closed, so that it can go too.
            let active = &self.partitions[p];
            if pressure
                && active.records > 0
                && active.broken.is_none()
                && consumed >= active.end
                && let Err(e) = self.roll(stream, p as u32)
            {
                tracing::warn!(dir = %self.dir.display(), partition = p, error = %e, "could not start a new segment");
            }
            if let Err(e) = self.retain_partition(stream, p, consumed, pressure) {
                tracing::warn!(dir = %self.dir.display(), partition = p, error = %e, "retention failed; will try again");
            }
        }
    }

    fn retain_partition(
        &mut self,
        stream: &StreamLog,
        p: usize,
        consumed: u64,
        pressure: bool,
    ) -> Result<()> {
        let now = SystemTime::now();
        let retention = stream.retention;
        let (doomed, seqs) = {
            let index = lock(&stream.partitions[p]);
            let sizes: Vec<(u64, Option<SystemTime>)> = index
                .segments
                .iter()
                .map(|s| {
                    let m = s.file.metadata().ok();
                    (
                        m.as_ref().map_or(0, |m| m.len()),
                        m.and_then(|m| m.modified().ok()),
                    )
                })
                .collect();
            let mut kept: u64 = sizes.iter().map(|(len, _)| len).sum();
            let mut doomed = 0;
            for (i, (len, modified)) in sizes
                .iter()
                .copied()
                .enumerate()
                .take(index.segments.len().saturating_sub(1))
            {
                if index.segments[i + 1].base > consumed {
                    break;
                }
                let old = modified
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= retention.age);
                let too_big = retention.bytes.is_some_and(|b| kept > b);
                if !(pressure || old || too_big) {
                    break;
                }
                kept -= len;
                doomed = i + 1;
            }
            (doomed, (doomed > 0).then(|| index.seqs.clone()))
        };
        let Some(seqs) = seqs else {
            return Ok(());
        };
        let dir = self.dir.join(format!("p{p}"));
        // First what the segments tell about devices' numbers, then the
        // segments: a crash in between loses nothing.
        if !seqs.is_empty() {
            let bytes = serde_json::to_vec(&seqs).map_err(|e| Error::Internal(e.to_string()))?;
            write_atomic(&dir.join(SEQS_FILE), &bytes)?;
        }
        let removed: Vec<SegmentIndex> = lock(&stream.partitions[p])
            .segments
            .drain(..doomed)
            .collect();
        for seg in removed {
            let len = seg.file.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&seg.path)
                .map_err(|e| Error::io(format!("delete {}", seg.path.display()), e))?;
            release(&self.used, len);
            tracing::debug!(path = %seg.path.display(), "deleted a consumed log segment");
        }
        sync_dir(&dir)
    }

    fn write_group(&mut self, stream: &StreamLog, group: Vec<WriteRequest>) {
        let mut by_partition: BTreeMap<u32, Vec<WriteRequest>> = BTreeMap::new();
        for req in group {
            by_partition.entry(req.partition).or_default().push(req);
        }
        let mut done = Vec::new();
        // Write every partition first, then make them durable, so one fsync
        // per partition covers the whole group, and the partitions' fsyncs
        // run at once.
        let mut written = Vec::new();
        for (p, reqs) in by_partition {
            let sorted = self.sort_out(stream, p, reqs);
            let bytes = sorted
                .write
                .iter()
                .map(|r| (r.body.len() + r.key.len()) as u64 + segment::HEADER_LEN)
                .sum::<u64>();
            if let Err(e) = self.make_room(stream, bytes) {
                self.fail(p, sorted, &e);
                continue;
            }
            match self.write_partition(stream, p, &sorted.write) {
                Ok(entries) => written.push((p, sorted, entries)),
                Err(e) => self.fail(p, sorted, &e),
            }
        }
        let to_sync: Vec<Option<u32>> = written
            .iter()
            .map(|(p, _, entries)| (!entries.is_empty()).then_some(*p))
            .collect();
        let synced = self.sync_partitions(&to_sync);
        for ((p, sorted, entries), synced) in written.into_iter().zip(synced) {
            let active = &mut self.partitions[p as usize];
            if let Err(e) = synced {
                // After a failed fsync the page cache cannot be trusted
                // (the bytes may or may not reach the disk). Cut the records
                // off as far as we can, tell nobody they are stored, and
                // take no more writes here until recovery has checked the
                // file on the next start.
                let first = entries.first().map(|e| e.pos);
                if let (Some(f), Some(pos)) = (&active.file, first)
                    && f.set_len(pos).is_ok()
                {
                    release(&self.used, active.len - pos);
                    active.len = pos;
                    active.records -= entries.len();
                    active.end = entries[0].offset;
                }
                active.broken = Some(format!(
                    "{e}; restart the server so recovery can check the log"
                ));
                tracing::error!(dir = %self.dir.display(), partition = p, error = %e, "fsync failed; the partition takes no more writes until a restart");
                self.fail(p, sorted, &e);
                continue;
            }
            done.push((p, sorted, entries));
        }
        let mut notify = false;
        for (p, sorted, entries) in done {
            let mut index = lock(&stream.partitions[p as usize]);
            for (req, entry) in sorted.write.into_iter().zip(entries) {
                if let Some(seg) = index.segments.last_mut() {
                    seg.entries.push(entry);
                }
                index.end = entry.offset + u64::from(entry.count);
                if req.seq > 0 {
                    let highest = index.seqs.entry(req.key).or_default();
                    *highest = (*highest).max(req.seq);
                }
                index.push_cache(
                    Record {
                        partition: p,
                        offset: entry.offset,
                        batch: req.batch,
                    },
                    req.memory,
                    self.options.cache_bytes_per_partition,
                );
                let _ = req.reply.send(Ok(AppendReceipt {
                    partition: p,
                    offset: entry.offset,
                    count: entry.count,
                    duplicate: false,
                }));
                notify = true;
            }
            for req in sorted.duplicates {
                let _ = req.reply.send(Ok(AppendReceipt {
                    partition: p,
                    offset: index.end,
                    count: 0,
                    duplicate: true,
                }));
            }
        }
        if notify {
            stream.appended.send_modify(|n| *n += 1);
        }
    }

    /// fsyncs the newest segment of each partition given (`None`: nothing
    /// was written there), and returns each one's result in order. Two or
    /// more run at once, each on its own thread: the disk takes them
    /// together, and the group waits for about one fsync rather than one
    /// per partition in turn.
    fn sync_partitions(&self, partitions: &[Option<u32>]) -> Vec<Result<()>> {
        let sync = |p: u32| -> Result<()> {
            match &self.partitions[p as usize].file {
                Some(f) if self.options.fsync => f
                    .sync_data()
                    .map_err(|e| Error::io(format!("fsync {}/p{p}", self.dir.display()), e)),
                _ => Ok(()),
            }
        };
        if !self.options.fsync || partitions.iter().flatten().count() < 2 {
            return partitions.iter().map(|p| p.map_or(Ok(()), sync)).collect();
        }
        std::thread::scope(|s| {
            let running: Vec<_> = partitions
                .iter()
                .map(|&p| {
                    let p = p?;
                    // Without a thread (the system has none to give), the
                    // fsync runs here, in turn.
                    let thread = std::thread::Builder::new()
                        .name("log-fsync".into())
                        .spawn_scoped(s, move || sync(p))
                        .map_err(|_| sync(p));
                    Some((p, thread))
                })
                .collect();
            running
                .into_iter()
                .map(|run| match run {
                    None => Ok(()),
                    Some((_, Err(done))) => done,
                    Some((p, Ok(thread))) => thread.join().unwrap_or_else(|_| {
                        Err(Error::Internal(format!(
                            "the fsync of partition {p} panicked"
                        )))
                    }),
                })
                .collect()
        })
    }

    /// Sorts a partition's requests into those to write and resends; refuses
    /// (answers at once) a device's new frames while earlier ones that
    /// failed must be sent again first, and remembers the refused ones too.
    fn sort_out(&mut self, stream: &StreamLog, p: u32, reqs: Vec<WriteRequest>) -> Sorted {
        let holes = &mut self.holes[p as usize];
        let index = lock(&stream.partitions[p as usize]);
        // Sequence numbers taken earlier in this group.
        let mut taken: HashMap<String, u64> = HashMap::new();
        let mut sorted = Sorted::default();
        for mut req in reqs {
            if req.seq == 0 {
                sorted.write.push(req);
                continue;
            }
            let highest = taken
                .get(&req.key)
                .or_else(|| index.seqs.get(&req.key))
                .copied()
                .unwrap_or(0);
            if req.seq <= highest {
                sorted.duplicates.push(req);
                continue;
            }
            // A run whose first batches the log holds already (a device
            // sending again what was stored before its connection broke):
            // only the rest is stored.
            if req.run.first().is_some_and(|(first, _)| *first <= highest)
                && let Err(e) = trim_run(&stream.encoder, &mut req, highest)
            {
                let _ = req.reply.send(Err(e));
                continue;
            }
            let first_seq = req.run.first().map_or(req.seq, |(seq, _)| *seq);
            if let Some(missing) = holes.get_mut(&req.key) {
                let first = missing.first().copied().unwrap_or(first_seq);
                if first_seq != first {
                    for seq in req.seqs() {
                        if missing.len() < MAX_MISSING {
                            missing.insert(seq);
                        }
                    }
                    let _ = req.reply.send(Err(Error::Unavailable(format!(
                        "frame {first_seq} of device '{}' waits: frames from {first} on were not stored; send frame {first} again first, then the rest in order",
                        req.key
                    ))));
                    continue;
                }
                // Refilled (for now: a failed write puts it back).
                for seq in req.seqs() {
                    missing.remove(&seq);
                }
                if missing.is_empty() {
                    holes.remove(&req.key);
                }
            }
            taken.insert(req.key.clone(), req.seq);
            sorted.write.push(req);
        }
        sorted
    }

    /// Fails a partition's share of a group, remembering each device's
    /// first lost sequence number.
    fn fail(&mut self, p: u32, sorted: Sorted, e: &Error) {
        let holes = &mut self.holes[p as usize];
        for req in &sorted.write {
            // The first of a run: the rest follow it when it is sent again.
            let first = req.run.first().map_or(req.seq, |(seq, _)| *seq);
            if first > 0 {
                holes.entry(req.key.clone()).or_default().insert(first);
            }
        }
        fail_all(sorted.write, e);
        fail_all(sorted.duplicates, e);
    }

    /// Writes the requests of one partition; on failure leaves the file as it was.
    fn write_partition(
        &mut self,
        stream: &StreamLog,
        p: u32,
        reqs: &[WriteRequest],
    ) -> Result<Vec<Entry>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(why) = &self.partitions[p as usize].broken {
            return Err(Error::Unavailable(format!(
                "partition {p} of this stream is out of service: {why}"
            )));
        }
        let needs_roll = {
            let a = &self.partitions[p as usize];
            a.file.is_none() || (a.len >= self.segment_bytes() && a.records > 0)
        };
        if needs_roll {
            self.roll(stream, p)?;
        }
        let active = &mut self.partitions[p as usize];
        let mut buf = Vec::with_capacity(
            reqs.iter()
                .map(|r| r.body.len() + r.key.len() + segment::HEADER_LEN as usize)
                .sum(),
        );
        let mut entries = Vec::with_capacity(reqs.len());
        let mut next = active.end;
        for r in reqs {
            let pos = active.len + buf.len() as u64;
            let head = segment::encode_record(&mut buf, next, r.count, r.seq, &r.key, &r.body);
            entries.push(Entry {
                offset: next,
                count: r.count,
                pos,
                head,
                len: r.body.len() as u32,
            });
            next += u64::from(r.count);
        }
        let file = active
            .file
            .as_mut()
            .ok_or_else(|| Error::Internal("log partition has no open segment".into()))?;
        if let Err(e) = file.write_all(&buf) {
            // Undo the partial write; if even that fails, the file's tail is
            // unknown and the partition stops taking writes.
            if let Err(undo) = file.set_len(active.len) {
                active.broken = Some(format!(
                    "a write failed ({e}) and could not be undone ({undo})"
                ));
            }
            return Err(Error::io(format!("write {}/p{p}", self.dir.display()), e));
        }
        self.used.fetch_add(buf.len() as u64, Ordering::Relaxed);
        active.len += buf.len() as u64;
        active.records += entries.len();
        active.end = next;
        Ok(entries)
    }

    fn roll(&mut self, stream: &StreamLog, p: u32) -> Result<()> {
        let dir = self.dir.join(format!("p{p}"));
        let base = self.partitions[p as usize].end;
        let path = dir.join(segment::segment_name(base));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        if let Err(e) = file
            .write_all(segment::MAGIC)
            .and_then(|()| file.sync_all())
        {
            // Out of space, say: leave no half-made segment behind.
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(Error::io(format!("write {}", path.display()), e));
        }
        if let Err(e) = sync_dir(&dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.used
            .fetch_add(segment::MAGIC.len() as u64, Ordering::Relaxed);
        let read =
            File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        lock(&stream.partitions[p as usize])
            .segments
            .push(SegmentIndex {
                base,
                path,
                file: Arc::new(read),
                format: Format::V2,
                entries: Vec::new(),
            });
        self.partitions[p as usize] = ActiveSegment {
            file: Some(file),
            len: segment::MAGIC.len() as u64,
            records: 0,
            end: base,
            broken: None,
        };
        Ok(())
    }
}

/// Takes `bytes` off a byte count, never below zero.
fn release(used: &AtomicU64, bytes: u64) {
    let _ = used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
        Some(u.saturating_sub(bytes))
    });
}

/// Per partition: the highest sequence number per device held by segments
/// since deleted (written before they are).
const SEQS_FILE: &str = "seqs.json";

fn read_seqs(dir: &Path) -> Result<HashMap<String, u64>> {
    let path = dir.join(SEQS_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// Starts a segment file over, empty, in the current format.
fn write_magic(path: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    f.set_len(0)
        .and_then(|()| (&f).write_all(segment::MAGIC))
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("rewrite {}", path.display()), e))
}

fn fail_all(reqs: Vec<WriteRequest>, e: &Error) {
    for r in reqs {
        let _ = r.reply.send(Err(match e {
            Error::Unavailable(why) => Error::Unavailable(why.clone()),
            e => Error::io(
                "append to the event log",
                std::io::Error::other(e.to_string()),
            ),
        }));
    }
}

impl WriteRequest {
    /// The sequence numbers of the request's batches.
    fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        let single = self.run.is_empty().then_some(self.seq);
        single
            .into_iter()
            .chain(self.run.iter().map(|(seq, _)| *seq))
    }
}

/// Drops from a run the batches the log holds already (sequence numbers up
/// to `highest`), re-encoding what is left. The caller has checked that the
/// run's last batch is above `highest`.
fn trim_run(encoder: &RecordEncoder, req: &mut WriteRequest, highest: u64) -> Result<()> {
    let held = req.run.iter().take_while(|(seq, _)| *seq <= highest);
    let skip: usize = held.clone().map(|(_, rows)| *rows as usize).sum();
    let held = held.count();
    let rows = req.batch.num_rows();
    if skip >= rows {
        return Err(Error::Internal(format!(
            "a run of {rows} events from device '{}' has {skip} events in its held batches",
            req.key
        )));
    }
    req.run.drain(..held);
    req.batch = req.batch.slice(skip, rows - skip);
    req.body = encoder.encode(&req.batch)?;
    req.count = (rows - skip) as u32;
    req.memory = req.batch.get_array_memory_size();
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PartitionIndex {
    fn push_cache(&mut self, record: Record, memory: usize, budget: usize) {
        self.cache_bytes += memory;
        self.cache.push_back(record);
        self.cache_sizes.push_back(memory);
        while self.cache_bytes > budget && self.cache.len() > 1 {
            self.cache.pop_front();
            if let Some(old) = self.cache_sizes.pop_front() {
                self.cache_bytes -= old;
            }
        }
    }

    /// Serves `from..` out of the cache when the cache reaches back that far.
    fn read_cached(&self, from: u64, max_events: usize) -> Option<Vec<Record>> {
        let front = self.cache.front()?;
        if front.offset > from {
            return None;
        }
        let start = self.cache.partition_point(|r| r.end_offset() <= from);
        let mut out = Vec::new();
        let mut events = 0;
        for r in self.cache.iter().skip(start) {
            if events >= max_events {
                break;
            }
            let r = slice_from(r.clone(), from);
            events += r.batch.num_rows();
            out.push(r);
        }
        Some(out)
    }

    /// The records holding `from..`, to be read from disk.
    fn locate(&self, from: u64, max_events: usize) -> Vec<(Arc<File>, PathBuf, Entry, Format)> {
        let mut out = Vec::new();
        let first_seg = self
            .segments
            .partition_point(|s| s.base <= from)
            .saturating_sub(1);
        let mut events = 0usize;
        for seg in &self.segments[first_seg..] {
            let start = seg
                .entries
                .partition_point(|e| e.offset + u64::from(e.count) <= from);
            for e in &seg.entries[start..] {
                if events >= max_events {
                    return out;
                }
                events += e.count as usize;
                out.push((seg.file.clone(), seg.path.clone(), *e, seg.format));
            }
        }
        out
    }
}

fn slice_from(record: Record, from: u64) -> Record {
    if record.offset >= from {
        return record;
    }
    let skip = (from - record.offset) as usize;
    let len = record.batch.num_rows().saturating_sub(skip);
    Record {
        partition: record.partition,
        offset: from,
        batch: record.batch.slice(skip.min(record.batch.num_rows()), len),
    }
}

/// Encodes one batch as the body of a log record.
pub(crate) fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut writer = StreamWriter::try_new(Vec::with_capacity(1024), &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    Ok(writer.into_inner()?)
}

/// The end-of-stream marker of an IPC stream: continuation, length 0.
const IPC_END: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];

/// Writes record bodies of one stream: the same bytes as
/// [`encode_batch`] (an IPC stream of the schema and one batch), with the
/// schema message encoded once. Encoding the schema for every append was
/// the largest single cost of a one-event frame.
struct RecordEncoder {
    header: Vec<u8>,
    options: IpcWriteOptions,
}

impl RecordEncoder {
    fn new(schema: &SchemaRef) -> Result<RecordEncoder> {
        let writer = StreamWriter::try_new(Vec::new(), schema)?;
        Ok(RecordEncoder {
            header: writer.get_ref().clone(),
            options: IpcWriteOptions::default(),
        })
    }

    fn encode(&self, batch: &RecordBatch) -> Result<Vec<u8>> {
        let mut tracker = DictionaryTracker::new(false);
        let (dictionaries, message) = IpcDataGenerator::default().encode(
            batch,
            &mut tracker,
            &self.options,
            &mut IpcWriteContext::default(),
        )?;
        if !dictionaries.is_empty() {
            // Streams have no dictionary columns; should one appear, the
            // general writer handles it.
            return encode_batch(batch);
        }
        let mut body = Vec::with_capacity(
            self.header.len() + message.ipc_message.len() + message.arrow_data.len() + 24,
        );
        body.extend_from_slice(&self.header);
        write_message(&mut body, message, &self.options)?;
        body.extend_from_slice(&IPC_END);
        Ok(body)
    }
}

fn decode_batch(body: &[u8], path: &Path) -> Result<RecordBatch> {
    let corrupt = |reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader =
        StreamReader::try_new(Cursor::new(body), None).map_err(|e| corrupt(e.to_string()))?;
    match reader.next() {
        Some(Ok(batch)) => Ok(batch),
        Some(Err(e)) => Err(corrupt(e.to_string())),
        None => Err(corrupt("record holds no batch".into())),
    }
}

impl EmbeddedLog {
    /// Checks one batch (or run) and hands it to the stream's writer.
    fn submit_request(
        &self,
        stream: &str,
        partition: u32,
        key: &str,
        seq: u64,
        run: Vec<(u64, u32)>,
        batch: RecordBatch,
    ) -> Result<AppendFuture> {
        let s = self.stream(stream)?;
        if partition as usize >= s.partitions.len() {
            return Err(Error::User(format!(
                "stream '{stream}' has {} partitions, not {}",
                s.partitions.len(),
                partition + 1
            )));
        }
        if key.len() > segment::MAX_KEY_LEN {
            return Err(Error::User(format!(
                "a key of {} bytes is longer than the log's limit of {} bytes",
                key.len(),
                segment::MAX_KEY_LEN
            )));
        }
        if batch.schema() != s.schema {
            return Err(Error::User(format!(
                "batch does not match the schema of stream '{stream}'"
            )));
        }
        let count = u32::try_from(batch.num_rows())
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| Error::User("a batch must hold between 1 and 2^32-1 events".into()))?;
        let body = s.encoder.encode(&batch)?;
        if body.len() > segment::MAX_BODY_LEN as usize {
            return Err(Error::User(format!(
                "a batch of {} bytes is larger than the log's limit of {} bytes; split it",
                body.len(),
                segment::MAX_BODY_LEN
            )));
        }
        let (reply, rx) = oneshot::channel();
        let writer = s
            .writer
            .as_ref()
            .ok_or_else(|| Error::User("the log is open read-only".into()))?;
        writer
            .send(WriteRequest {
                partition,
                count,
                key: key.to_string(),
                seq,
                run,
                body,
                memory: batch.get_array_memory_size(),
                batch,
                reply,
            })
            .map_err(|_| Error::ShuttingDown)?;
        Ok(Box::pin(async move {
            rx.await.map_err(|_| Error::ShuttingDown)?
        }))
    }
}

/// A run's sequence numbers increase strictly (or are all 0) and its
/// batches' rows add up to the batch's.
fn check_run(run: &[(u64, u32)], batch: &RecordBatch) -> Result<()> {
    if run.is_empty() || run.iter().any(|(_, rows)| *rows == 0) {
        return Err(Error::User(
            "a run holds at least one batch, each of at least one event".into(),
        ));
    }
    let numbered = run[0].0 > 0;
    let ordered = run.windows(2).all(|w| {
        if numbered {
            w[0].0 < w[1].0
        } else {
            w[1].0 == 0
        }
    });
    if !ordered {
        return Err(Error::User(
            "a run's sequence numbers must increase strictly, or all be 0".into(),
        ));
    }
    let rows: u64 = run.iter().map(|(_, rows)| u64::from(*rows)).sum();
    if rows != batch.num_rows() as u64 {
        return Err(Error::User(format!(
            "a run's batches hold {rows} events, its batch {}",
            batch.num_rows()
        )));
    }
    Ok(())
}

#[async_trait]
impl EventStream for EmbeddedLog {
    async fn create_stream(&self, def: &StreamDef) -> Result<()> {
        if self.options.read_only {
            return Err(Error::User("the log is open read-only".into()));
        }
        // Check and create under one lock, so two creators cannot race.
        let mut streams = self.write_streams();
        if let Some(existing) = streams.get(&def.name) {
            if existing.partitions.len() == def.partitions as usize
                && existing.schema == def.schema()
            {
                return Ok(());
            }
            return Err(Error::AlreadyExists {
                kind: "stream",
                name: def.name.clone(),
            });
        }
        let meta = serde_json::to_vec_pretty(&StreamMeta { def: def.clone() })
            .map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(&self.dir.join(&def.name).join("meta.json"), &meta)?;
        let stream = self.open_stream(def)?;
        streams.insert(def.name.clone(), stream);
        Ok(())
    }

    fn submit_to(
        &self,
        stream: &str,
        partition: u32,
        key: &str,
        seq: u64,
        batch: RecordBatch,
    ) -> Result<AppendFuture> {
        self.submit_request(stream, partition, key, seq, Vec::new(), batch)
    }

    /// One record for the whole run: one encoding, one index entry, one
    /// cache entry, and one record for every reader, rather than one per
    /// batch.
    fn submit_run(
        &self,
        stream: &str,
        key: &str,
        run: &[(u64, u32)],
        batch: RecordBatch,
    ) -> Result<AppendFuture> {
        check_run(run, &batch)?;
        let partition = super::partition_for(key, self.partitions(stream)?);
        let seq = run.last().map_or(0, |(seq, _)| *seq);
        // Unnumbered batches need no bookkeeping: they are appended anyway.
        let run = if seq == 0 { Vec::new() } else { run.to_vec() };
        self.submit_request(stream, partition, key, seq, run, batch)
    }

    fn partitions(&self, stream: &str) -> Result<u32> {
        Ok(self.stream(stream)?.partitions.len() as u32)
    }

    async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_events: usize,
    ) -> Result<Vec<Record>> {
        let s = self.stream(stream)?;
        let part = s.partitions.get(partition as usize).ok_or_else(|| {
            Error::User(format!("stream '{stream}' has no partition {partition}"))
        })?;
        let located = {
            let index = lock(part);
            if from >= index.end {
                return Ok(Vec::new());
            }
            // Retention only deletes what every consumer has read: a read
            // from before the oldest segment would silently skip events.
            if let Some(first) = index.segments.first()
                && from < first.base
            {
                return Err(Error::Unavailable(format!(
                    "events {from}..{} of stream '{stream}' partition {partition} were already deleted by retention",
                    first.base
                )));
            }
            if let Some(records) = index.read_cached(from, max_events) {
                return Ok(records);
            }
            index.locate(from, max_events)
        };
        tokio::task::spawn_blocking(move || {
            located
                .into_iter()
                .map(|(file, path, entry, format)| {
                    let body = segment::read_body(&file, &path, &entry, format)?;
                    let batch = decode_batch(&body, &path)?;
                    Ok(slice_from(
                        Record {
                            partition,
                            offset: entry.offset,
                            batch,
                        },
                        from,
                    ))
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Internal(format!("log reader task failed: {e}")))?
    }

    fn end_offset(&self, stream: &str, partition: u32) -> Result<u64> {
        let s = self.stream(stream)?;
        let part = s.partitions.get(partition as usize).ok_or_else(|| {
            Error::User(format!("stream '{stream}' has no partition {partition}"))
        })?;
        Ok(lock(part).end)
    }

    fn watch(&self, stream: &str) -> Result<watch::Receiver<u64>> {
        Ok(self.stream(stream)?.appended.subscribe())
    }

    async fn commit(&self, consumer: &str, stream: &str, offsets: &[(u32, u64)]) -> Result<()> {
        if self.options.read_only {
            return Err(Error::User("the log is open read-only".into()));
        }
        let s = self.stream(stream)?;
        if let Some((p, _)) = offsets
            .iter()
            .find(|(p, _)| *p as usize >= s.partitions.len())
        {
            return Err(Error::User(format!(
                "stream '{stream}' has no partition {p}"
            )));
        }
        let consumer = consumer.to_string();
        let offsets = offsets.to_vec();
        tokio::task::spawn_blocking(move || {
            // One writer at a time; readers of `offsets` are not held up by the fsync.
            let _writing = lock(&s.offsets_write);
            let mut next = lock(&s.offsets).clone();
            let slots = next.entry(consumer).or_default();
            let mut changed = false;
            for (partition, offset) in offsets {
                // A first commit is written even at offset 0: from then on the
                // consumer holds its events back from retention.
                changed |= slots.insert(partition, offset) != Some(offset);
            }
            if !changed {
                return Ok(());
            }
            let bytes = serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?;
            // Disk first: memory never claims an offset the file does not hold.
            write_atomic(&s.offsets_path, &bytes)?;
            *lock(&s.offsets) = next;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("offset commit task failed: {e}")))?
    }

    async fn forget(&self, consumer: &str, stream: &str) -> Result<()> {
        if self.options.read_only {
            return Err(Error::User("the log is open read-only".into()));
        }
        let s = self.stream(stream)?;
        let consumer = consumer.to_string();
        tokio::task::spawn_blocking(move || {
            let _writing = lock(&s.offsets_write);
            let mut next = lock(&s.offsets).clone();
            if next.remove(&consumer).is_none() {
                return Ok(());
            }
            let bytes = serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?;
            write_atomic(&s.offsets_path, &bytes)?;
            *lock(&s.offsets) = next;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("offset commit task failed: {e}")))?
    }

    async fn committed(&self, consumer: &str, stream: &str, partition: u32) -> Result<Option<u64>> {
        let s = self.stream(stream)?;
        let offsets = lock(&s.offsets);
        Ok(offsets
            .get(consumer)
            .and_then(|m| m.get(&partition))
            .copied())
    }

    fn lag(&self, stream: &str) -> Result<Vec<ConsumerLag>> {
        let s = self.stream(stream)?;
        let ends: Vec<u64> = s.partitions.iter().map(|p| lock(p).end).collect();
        let offsets = lock(&s.offsets);
        Ok(offsets
            .iter()
            .map(|(consumer, committed)| ConsumerLag {
                consumer: consumer.clone(),
                events: ends
                    .iter()
                    .zip(0u32..)
                    .map(|(end, p)| end.saturating_sub(committed.get(&p).copied().unwrap_or(0)))
                    .sum(),
            })
            .collect())
    }
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.dir)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ColumnDef, ColumnType};
    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};

    fn def(partitions: u32) -> StreamDef {
        StreamDef::new(
            "telemetry",
            vec![ColumnDef {
                name: "temp".into(),
                ty: ColumnType::Float64,
            }],
            partitions,
        )
        .unwrap()
    }

    /// The partitions' fsyncs run at once, and each partition gets its own
    /// result, in order: a pipe cannot be fsynced, so its partition's
    /// fsync fails, with its name, and the others' still succeed.
    #[test]
    fn partitions_sync_at_once_and_each_gets_its_own_result() {
        let dir = tempfile::tempdir().unwrap();
        let segment = |name: &str| {
            let mut f = File::create(dir.path().join(name)).unwrap();
            f.write_all(b"bytes to make durable").unwrap();
            Some(f)
        };
        let (_reader, pipe) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(pipe));
        let active = |file: Option<File>| ActiveSegment {
            file,
            len: 0,
            records: 0,
            end: 0,
            broken: None,
        };
        let writer = |fsync: bool, files: Vec<Option<File>>| Writer {
            stream: std::sync::Weak::new(),
            dir: dir.path().to_path_buf(),
            options: LogOptions {
                fsync,
                ..LogOptions::default()
            },
            holes: vec![HashMap::new(); files.len()],
            partitions: files.into_iter().map(active).collect(),
            used: Arc::new(AtomicU64::new(0)),
            retained_at: Instant::now(),
        };
        let w = writer(
            true,
            vec![segment("0.seg"), Some(pipe), None, segment("3.seg")],
        );

        let results = w.sync_partitions(&[Some(0), Some(1), None, Some(3)]);
        assert_eq!(results.len(), 4);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains(&format!("fsync {}/p1", dir.path().display())),
            "{err}"
        );
        assert!(results[2].is_ok() && results[3].is_ok(), "{results:?}");
        // One partition alone is synced on the writer's own thread, with
        // the same result.
        let alone = w.sync_partitions(&[None, Some(1)]);
        assert!(alone[0].is_ok() && alone[1].is_err(), "{alone:?}");

        // With fsync off, nothing is synced, so nothing fails.
        let (_reader, pipe) = std::io::pipe().unwrap();
        let off = writer(
            false,
            vec![
                Some(File::from(std::os::fd::OwnedFd::from(pipe))),
                segment("1.seg"),
            ],
        );
        let results = off.sync_partitions(&[Some(0), Some(1)]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    /// A consumer's offsets on several partitions are committed in one
    /// write and read back after a restart; a partition the stream does not
    /// have is refused, and nothing of that commit is kept.
    #[tokio::test]
    async fn offsets_of_several_partitions_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(3)).await.unwrap();
            log.commit("rule", "telemetry", &[(0, 4), (2, 9)])
                .await
                .unwrap();
            let wrong = log
                .commit("rule", "telemetry", &[(1, 5), (3, 1)])
                .await
                .unwrap_err();
            assert!(wrong.to_string().contains("no partition 3"), "{wrong}");
        }
        let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
        let mut committed = Vec::new();
        for p in 0..3 {
            committed.push(log.committed("rule", "telemetry", p).await.unwrap());
        }
        assert_eq!(committed, [Some(4), None, Some(9)]);
    }

    /// A consumer's lag is what its partitions hold past its commits, a
    /// partition it never committed counted whole; it survives a restart,
    /// `forget` drops the consumer, and an unknown stream is named.
    #[tokio::test]
    async fn each_consumer_lags_by_the_events_it_has_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let lag = |log: &EmbeddedLog| -> Vec<(String, u64)> {
            log.lag("telemetry")
                .unwrap()
                .into_iter()
                .map(|l| (l.consumer, l.events))
                .collect()
        };
        // Two devices on two different partitions of two.
        let (a, b) = ("dev-a", "dev-b");
        let (pa, pb) = (
            crate::log::partition_for(a, 2),
            crate::log::partition_for(b, 2),
        );
        assert_ne!(pa, pb);
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(2)).await.unwrap();
            assert_eq!(lag(&log), []);
            log.append("telemetry", a, batch(a, &[1.0, 2.0, 3.0]))
                .await
                .unwrap();
            log.append("telemetry", b, batch(b, &[4.0, 5.0]))
                .await
                .unwrap();
            log.commit("parquet", "telemetry", &[(pa, 1), (pb, 2)])
                .await
                .unwrap();
            log.commit("rule:hot", "telemetry", &[(pa, 3)])
                .await
                .unwrap();
            assert_eq!(
                lag(&log),
                [("parquet".to_string(), 2), ("rule:hot".to_string(), 2)]
            );
            log.append("telemetry", a, batch(a, &[6.0])).await.unwrap();
            assert_eq!(
                lag(&log),
                [("parquet".to_string(), 3), ("rule:hot".to_string(), 3)]
            );
        }
        let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(
            lag(&log),
            [("parquet".to_string(), 3), ("rule:hot".to_string(), 3)]
        );
        log.forget("rule:hot", "telemetry").await.unwrap();
        assert_eq!(lag(&log), [("parquet".to_string(), 3)]);
        let unknown = log.lag("nope").unwrap_err();
        assert!(unknown.to_string().contains("nope"), "{unknown}");
    }

    fn batch(device: &str, temps: &[f64]) -> RecordBatch {
        let n = temps.len();
        RecordBatch::try_new(
            def(1).schema(),
            vec![
                Arc::new(StringArray::from(vec![device; n])),
                Arc::new(TimestampMillisecondArray::from(vec![1_000i64; n]).with_timezone("UTC")),
                Arc::new(TimestampMillisecondArray::from(vec![2_000i64; n]).with_timezone("UTC")),
                Arc::new(Float64Array::from(temps.to_vec())),
            ],
        )
        .unwrap()
    }

    fn temps(records: &[Record]) -> Vec<f64> {
        records
            .iter()
            .flat_map(|r| {
                let a = r
                    .batch
                    .column(3)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap();
                a.values().to_vec()
            })
            .collect()
    }

    fn no_cache() -> LogOptions {
        LogOptions {
            cache_bytes_per_partition: 0,
            ..LogOptions::default()
        }
    }

    impl EmbeddedLog {
        /// The highest sequence number held for device `key` (0 if none).
        fn last_seq(&self, stream: &str, key: &str) -> Result<u64> {
            let s = self.stream(stream)?;
            let p = crate::log::partition_for(key, s.partitions.len() as u32);
            Ok(lock(&s.partitions[p as usize])
                .seqs
                .get(key)
                .copied()
                .unwrap_or(0))
        }
    }

    async fn send(log: &EmbeddedLog, device: &str, seq: u64, temp: f64) -> AppendReceipt {
        log.submit_sequenced("telemetry", device, seq, batch(device, &[temp]))
            .unwrap()
            .await
            .unwrap()
    }

    /// A device's resent batches are recognised by their sequence numbers,
    /// in the same run and after a restart, per device.
    #[test]
    fn record_bodies_are_the_bytes_of_a_whole_ipc_stream() {
        let schema = def(1).schema();
        let encoder = RecordEncoder::new(&schema).unwrap();
        for temps in [&[1.0][..], &[1.0, 2.5, -3.0], &[]] {
            let b = batch("dev-1", temps);
            let body = encoder.encode(&b).unwrap();
            assert_eq!(body, encode_batch(&b).unwrap());
            assert_eq!(decode_batch(&body, Path::new("test")).unwrap(), b);
        }
    }

    /// A run of a device's batches is one record; what the log holds of it
    /// already is left out, and the rest is stored once, across restarts.
    #[tokio::test]
    async fn a_run_of_batches_is_one_record_and_its_resent_part_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let run = |log: &EmbeddedLog, frames: &[(u64, &[f64])]| {
            let seqs: Vec<(u64, u32)> = frames
                .iter()
                .map(|(seq, t)| (*seq, t.len() as u32))
                .collect();
            let all: Vec<f64> = frames.iter().flat_map(|(_, t)| t.iter().copied()).collect();
            log.submit_run("telemetry", "d", &seqs, batch("d", &all))
                .unwrap()
        };
        let p = crate::log::partition_for("d", 2);
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(2)).await.unwrap();
            let r = run(&log, &[(1, &[1.0]), (2, &[2.0, 2.5]), (3, &[3.0])])
                .await
                .unwrap();
            assert_eq!((r.offset, r.count, r.duplicate), (0, 4, false));
            let stored = log.read("telemetry", p, 0, 100).await.unwrap();
            assert_eq!(stored.len(), 1, "one record for the run");
            assert_eq!(temps(&stored), [1.0, 2.0, 2.5, 3.0]);
            assert_eq!(log.last_seq("telemetry", "d").unwrap(), 3);
            // Sent again whole: a resend.
            let again = run(&log, &[(2, &[2.0, 2.5]), (3, &[3.0])]).await.unwrap();
            assert_eq!((again.count, again.duplicate), (0, true));
            // Sent again with new batches behind: only those are stored.
            let r = run(&log, &[(3, &[3.0]), (4, &[4.0]), (5, &[5.0, 5.5])])
                .await
                .unwrap();
            assert_eq!((r.offset, r.count, r.duplicate), (4, 3, false));
        }
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(log.last_seq("telemetry", "d").unwrap(), 5);
        let again = run(&log, &[(4, &[4.0]), (5, &[5.0, 5.5])]).await.unwrap();
        assert!(again.duplicate);
        let stored = log.read("telemetry", p, 0, 100).await.unwrap();
        assert_eq!(temps(&stored), [1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 5.5]);
        // A run that does not add up, or goes back, is refused whole.
        for bad in [
            vec![(6, 1), (6, 1)],
            vec![(7, 1), (6, 1)],
            vec![(6, 1), (7, 2)],
            vec![(6, 0), (7, 2)],
            vec![],
        ] {
            let e = log
                .submit_run("telemetry", "d", &bad, batch("d", &[1.0, 2.0]))
                .err()
                .unwrap_or_else(|| panic!("{bad:?} taken"));
            assert!(matches!(e, Error::User(_)), "{bad:?}: {e}");
        }
        assert_eq!(log.last_seq("telemetry", "d").unwrap(), 5);
    }

    #[tokio::test]
    async fn resent_batches_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(2)).await.unwrap();
            assert_eq!(log.last_seq("telemetry", "d1").unwrap(), 0);
            assert!(!send(&log, "d1", 1, 1.0).await.duplicate);
            assert!(!send(&log, "d1", 2, 2.0).await.duplicate);
            let again = send(&log, "d1", 2, 2.0).await;
            assert!(again.duplicate);
            assert_eq!(again.count, 0);
            // Another device's numbers are its own.
            assert!(!send(&log, "d2", 1, 10.0).await.duplicate);
            // Unnumbered batches are always appended.
            log.append("telemetry", "d1", batch("d1", &[3.0]))
                .await
                .unwrap();
            assert_eq!(log.last_seq("telemetry", "d1").unwrap(), 2);
            assert_eq!(log.last_seq("telemetry", "d2").unwrap(), 1);
        }
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(log.last_seq("telemetry", "d1").unwrap(), 2);
        assert!(send(&log, "d1", 1, 1.0).await.duplicate);
        assert!(send(&log, "d2", 1, 10.0).await.duplicate);
        // Numbers may skip; only going back is a resend.
        assert!(!send(&log, "d1", 7, 7.0).await.duplicate);
        assert!(send(&log, "d1", 5, 5.0).await.duplicate);
        let p1 = crate::log::partition_for("d1", 2);
        let stored = log.read("telemetry", p1, 0, 100).await.unwrap();
        assert_eq!(temps(&stored), [1.0, 2.0, 3.0, 7.0]);
        assert_eq!(log.last_seq("telemetry", "d1").unwrap(), 7);
    }

    /// Within one group commit too: the second of two equal numbers waits
    /// for the first and is a duplicate.
    #[tokio::test]
    async fn a_resend_in_the_same_group_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
        log.create_stream(&def(1)).await.unwrap();
        let futures: Vec<_> = [1u64, 1, 2, 1, 3]
            .iter()
            .map(|seq| {
                log.submit_sequenced("telemetry", "d", *seq, batch("d", &[*seq as f64]))
                    .unwrap()
            })
            .collect();
        let mut duplicates = Vec::new();
        for f in futures {
            duplicates.push(f.await.unwrap().duplicate);
        }
        assert_eq!(duplicates, [false, true, false, true, false]);
        let stored = log.read("telemetry", 0, 0, 100).await.unwrap();
        assert_eq!(temps(&stored), [1.0, 2.0, 3.0]);
    }

    /// A data directory from before keys and sequence numbers: its records
    /// are read, and new ones go to a new segment.
    #[tokio::test]
    async fn a_first_format_segment_is_read_and_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(1)).await.unwrap();
        }
        // Rewrite the partition as the first format would have.
        let p0 = dir.path().join("telemetry").join("p0");
        for e in fs::read_dir(&p0).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        let body = encode_batch(&batch("d", &[1.0, 2.0])).unwrap();
        let mut data = segment::MAGIC_V1.to_vec();
        let mut fields = Vec::new();
        fields.extend_from_slice(&0u64.to_le_bytes());
        fields.extend_from_slice(&2u32.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&fields);
        h.update(&body);
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&h.finalize().to_le_bytes());
        data.extend_from_slice(&fields);
        data.extend_from_slice(&body);
        fs::write(p0.join(segment::segment_name(0)), &data).unwrap();

        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(log.end_offset("telemetry", 0).unwrap(), 2);
        assert!(!send(&log, "d", 1, 3.0).await.duplicate);
        let stored = log.read("telemetry", 0, 0, 100).await.unwrap();
        assert_eq!(temps(&stored), [1.0, 2.0, 3.0]);
        assert!(p0.join(segment::segment_name(2)).exists());
        drop(log);
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        let stored = log.read("telemetry", 0, 0, 100).await.unwrap();
        assert_eq!(temps(&stored), [1.0, 2.0, 3.0]);
        assert_eq!(log.last_seq("telemetry", "d").unwrap(), 1);
    }

    #[tokio::test]
    async fn appends_are_read_back_from_cache_and_disk_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(1)).await.unwrap();
            let a = log
                .append("telemetry", "d1", batch("d1", &[1.0, 2.0]))
                .await
                .unwrap();
            let b = log
                .append("telemetry", "d1", batch("d1", &[3.0]))
                .await
                .unwrap();
            assert_eq!((a.offset, a.count, b.offset), (0, 2, 2));
            let all = log.read("telemetry", 0, 0, 100).await.unwrap();
            assert_eq!(temps(&all), [1.0, 2.0, 3.0]);
            let sliced = log.read("telemetry", 0, 1, 100).await.unwrap();
            assert_eq!(sliced[0].offset, 1);
            assert_eq!(temps(&sliced), [2.0, 3.0]);
        }
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(log.end_offset("telemetry", 0).unwrap(), 3);
        assert_eq!(
            temps(&log.read("telemetry", 0, 1, 100).await.unwrap()),
            [2.0, 3.0]
        );
        assert_eq!(
            temps(&log.read("telemetry", 0, 3, 100).await.unwrap()),
            Vec::<f64>::new()
        );
        let next = log
            .append("telemetry", "d1", batch("d1", &[4.0]))
            .await
            .unwrap();
        assert_eq!(next.offset, 3);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(1)).await.unwrap();
            log.append("telemetry", "d", batch("d", &[1.0]))
                .await
                .unwrap();
            log.append("telemetry", "d", batch("d", &[2.0]))
                .await
                .unwrap();
        }
        let seg = dir
            .path()
            .join("telemetry/p0")
            .join(segment::segment_name(0));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(log.end_offset("telemetry", 0).unwrap(), 1);
        log.append("telemetry", "d", batch("d", &[3.0]))
            .await
            .unwrap();
        drop(log);
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(
            temps(&log.read("telemetry", 0, 0, 10).await.unwrap()),
            [1.0, 3.0]
        );
    }

    #[tokio::test]
    async fn an_empty_segment_left_by_a_crash_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(1)).await.unwrap();
            log.append("telemetry", "d", batch("d", &[1.0]))
                .await
                .unwrap();
        }
        // A crash right after a roll created the next segment, before its header.
        File::create(
            dir.path()
                .join("telemetry/p0")
                .join(segment::segment_name(1)),
        )
        .unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
            log.append("telemetry", "d", batch("d", &[2.0]))
                .await
                .unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), no_cache()).unwrap();
        assert_eq!(
            temps(&log.read("telemetry", 0, 0, 10).await.unwrap()),
            [1.0, 2.0]
        );
    }

    #[tokio::test]
    async fn segments_roll_and_reads_cross_them() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            segment_bytes: 64,
            ..no_cache()
        };
        let log = EmbeddedLog::open(dir.path(), opts.clone()).unwrap();
        log.create_stream(&def(1)).await.unwrap();
        for i in 0..5 {
            log.append("telemetry", "d", batch("d", &[f64::from(i)]))
                .await
                .unwrap();
        }
        let segments = fs::read_dir(dir.path().join("telemetry/p0"))
            .unwrap()
            .count();
        assert!(segments >= 5, "{segments} segments");
        drop(log);
        let log = EmbeddedLog::open(dir.path(), opts).unwrap();
        assert_eq!(
            temps(&log.read("telemetry", 0, 2, 100).await.unwrap()),
            [2.0, 3.0, 4.0]
        );
        assert_eq!(
            temps(&log.read("telemetry", 0, 0, 2).await.unwrap()),
            [0.0, 1.0]
        );
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        let mut bases: Vec<u64> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| segment::parse_segment_name(&e.unwrap().file_name().to_string_lossy()))
            .collect();
        bases.sort_unstable();
        bases
    }

    /// Polls until `done` holds (retention runs on the writer's clock).
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 20s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Consumed segments go once the retention allows; what they told about
    /// devices' sequence numbers stays.
    #[tokio::test]
    async fn retention_deletes_consumed_segments_and_keeps_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            segment_bytes: 64,
            fsync: false,
            ..no_cache()
        };
        let mut stream = def(1);
        stream.options.insert(RETENTION.into(), "0s".into());
        let p0 = dir.path().join("telemetry/p0");
        {
            let log = EmbeddedLog::open(dir.path(), opts.clone()).unwrap();
            log.create_stream(&stream).await.unwrap();
            assert!(!send(&log, "old", 9, 0.0).await.duplicate);
            for i in 1..5 {
                assert!(!send(&log, "d", i, f64::from(i as u32)).await.duplicate);
            }
            // Nobody has committed: everything stays.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(segment_files(&p0), [0, 1, 2, 3, 4]);
            log.commit("reader", "telemetry", &[(0, 3)]).await.unwrap();
            log.commit("other", "telemetry", &[(0, 5)]).await.unwrap();
            until("segments before offset 3 deleted", || {
                segment_files(&p0) == [3, 4]
            })
            .await;
            // Reading what was deleted is an error, not a silent skip.
            let gone = log.read("telemetry", 0, 1, 100).await.unwrap_err();
            assert!(gone.to_string().contains("deleted by retention"), "{gone}");
            assert_eq!(
                temps(&log.read("telemetry", 0, 3, 100).await.unwrap()),
                [3.0, 4.0]
            );
            // A dropped consumer no longer holds anything back.
            log.forget("reader", "telemetry").await.unwrap();
            assert_eq!(log.committed("reader", "telemetry", 0).await.unwrap(), None);
            until("segment 3 deleted", || segment_files(&p0) == [4]).await;
        }
        let log = EmbeddedLog::open(dir.path(), opts).unwrap();
        assert_eq!(log.last_seq("telemetry", "old").unwrap(), 9);
        assert!(send(&log, "old", 9, 0.0).await.duplicate);
        assert!(send(&log, "d", 2, 0.0).await.duplicate);
        assert_eq!(log.end_offset("telemetry", 0).unwrap(), 5);
    }

    /// At its byte limit the log refuses appends (retry later) until its
    /// consumers catch up; then consumed segments go and appends succeed.
    #[tokio::test]
    async fn a_full_log_refuses_appends_until_consumers_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4 * MIN_SEGMENT_BYTES;
        let log = EmbeddedLog::open(
            dir.path(),
            LogOptions {
                fsync: false,
                max_bytes: Some(max),
                ..no_cache()
            },
        )
        .unwrap();
        log.create_stream(&def(1)).await.unwrap();
        log.commit("slow", "telemetry", &[(0, 0)]).await.unwrap();
        let temps_of = |i: u32| vec![f64::from(i); 20];
        let mut stored = 0u32;
        let refusal = loop {
            match log
                .append("telemetry", "d", batch("d", &temps_of(stored)))
                .await
            {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 100_000, "the log never filled");
        };
        assert!(matches!(refusal, Error::Unavailable(_)), "{refusal}");
        assert!(refusal.to_string().contains("full"), "{refusal}");
        assert!(log.used.load(Ordering::Relaxed) <= max);
        // Still full while the consumer has not moved.
        assert!(
            log.append("telemetry", "d", batch("d", &[1.0]))
                .await
                .is_err()
        );
        let end = log.end_offset("telemetry", 0).unwrap();
        log.commit("slow", "telemetry", &[(0, end)]).await.unwrap();
        log.append("telemetry", "d", batch("d", &temps_of(stored)))
            .await
            .unwrap();
        // Everything not yet consumed is still there.
        let rest = log.read("telemetry", 0, end, usize::MAX).await.unwrap();
        assert_eq!(temps(&rest), temps_of(stored));
    }

    /// Near the byte limit every stream deletes what its consumers have
    /// read, its newest segment included: an idle stream full of consumed
    /// events does not keep another stream from appending.
    #[tokio::test]
    async fn one_idle_stream_does_not_starve_another() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4 * MIN_SEGMENT_BYTES;
        let log = EmbeddedLog::open(
            dir.path(),
            LogOptions {
                fsync: false,
                max_bytes: Some(max),
                ..no_cache()
            },
        )
        .unwrap();
        let mut other = def(1);
        other.name = "other".into();
        log.create_stream(&def(1)).await.unwrap();
        log.create_stream(&other).await.unwrap();
        log.commit("reader", "telemetry", &[(0, 0)]).await.unwrap();
        log.commit("reader", "other", &[(0, 0)]).await.unwrap();
        // Fill the log from one stream, and read all of it.
        let full = loop {
            if let Err(e) = log.append("telemetry", "d", batch("d", &[1.0; 20])).await {
                break e;
            }
        };
        assert!(matches!(full, Error::Unavailable(_)), "{full}");
        let end = log.end_offset("telemetry", 0).unwrap();
        log.commit("reader", "telemetry", &[(0, end)])
            .await
            .unwrap();
        // The other stream gets room within a retention pass or two.
        let deadline = Instant::now() + Duration::from_secs(20);
        let other_batch =
            RecordBatch::try_new(other.schema(), batch("d", &[2.0]).columns().to_vec()).unwrap();
        while let Err(e) = log.append("other", "d", other_batch.clone()).await {
            assert!(Instant::now() < deadline, "still refused: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(log.used.load(Ordering::Relaxed) < max / 2);
    }

    /// A real ENOSPC (a segment that is `/dev/full`): the append fails, the
    /// device's later frames are refused until the failed ones are sent again in order,
    /// and nothing is lost or stored twice.
    #[tokio::test]
    async fn a_write_that_finds_the_disk_full_leaves_no_gap() {
        if !Path::new("/dev/full").exists() {
            panic!("this test needs /dev/full");
        }
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(
            dir.path(),
            LogOptions {
                segment_bytes: 64,
                ..no_cache()
            },
        )
        .unwrap();
        log.create_stream(&def(1)).await.unwrap();
        assert!(!send(&log, "d", 1, 1.0).await.duplicate);
        // The next append starts segment 1: make it a full disk.
        let p0 = dir.path().join("telemetry/p0");
        std::os::unix::fs::symlink("/dev/full", p0.join(segment::segment_name(1))).unwrap();
        let full = log
            .submit_sequenced("telemetry", "d", 2, batch("d", &[2.0]))
            .unwrap()
            .await
            .unwrap_err();
        assert!(full.to_string().contains("No space left"), "{full}");
        // The failed segment was cleared away; frame 3 may not skip frame 2.
        let skipped = log
            .submit_sequenced("telemetry", "d", 3, batch("d", &[3.0]))
            .unwrap()
            .await
            .unwrap_err();
        assert!(matches!(skipped, Error::Unavailable(_)), "{skipped}");
        assert!(
            skipped.to_string().contains("send frame 2 again"),
            "{skipped}"
        );
        assert!(!send(&log, "d", 2, 2.0).await.duplicate);
        // A new frame may not jump the refused frame 3 either: if it were
        // stored, the resent 3 would pass for a duplicate and be lost.
        let jumped = log
            .submit_sequenced("telemetry", "d", 4, batch("d", &[4.0]))
            .unwrap()
            .await
            .unwrap_err();
        assert!(
            jumped.to_string().contains("send frame 3 again"),
            "{jumped}"
        );
        assert!(!send(&log, "d", 3, 3.0).await.duplicate);
        assert!(!send(&log, "d", 4, 4.0).await.duplicate);
        assert_eq!(
            temps(&log.read("telemetry", 0, 0, 100).await.unwrap()),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_contiguous_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap());
        log.create_stream(&def(1)).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut offsets = Vec::new();
                for i in 0..20 {
                    let r = log
                        .append("telemetry", "d", batch("d", &[f64::from(t * 100 + i), 0.0]))
                        .await
                        .unwrap();
                    offsets.push(r.offset);
                }
                offsets
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..160).map(|i| i * 2).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn devices_keep_their_partition_and_consumer_offsets_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
            log.create_stream(&def(4)).await.unwrap();
            let a = log
                .append("telemetry", "dev-a", batch("dev-a", &[1.0]))
                .await
                .unwrap();
            let b = log
                .append("telemetry", "dev-a", batch("dev-a", &[2.0]))
                .await
                .unwrap();
            assert_eq!(a.partition, b.partition);
            assert_eq!(b.offset, 1);
            assert_eq!(
                log.committed("sink", "telemetry", a.partition)
                    .await
                    .unwrap(),
                None
            );
            log.commit("sink", "telemetry", &[(a.partition, 2)])
                .await
                .unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
        let p = crate::log::partition_for("dev-a", 4);
        assert_eq!(
            log.committed("sink", "telemetry", p).await.unwrap(),
            Some(2)
        );
        let ro = EmbeddedLog::open(
            dir.path(),
            LogOptions {
                read_only: true,
                ..LogOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            temps(&ro.read("telemetry", p, 0, 10).await.unwrap()),
            [1.0, 2.0]
        );
        assert!(
            ro.append("telemetry", "x", batch("x", &[1.0]))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn wrong_schema_and_unknown_stream_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap();
        let err = log
            .append("nope", "d", batch("d", &[1.0]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("'nope' does not exist"), "{err}");
        let other = StreamDef::new("other", vec![], 1).unwrap();
        log.create_stream(&other).await.unwrap();
        let err = log
            .append("other", "d", batch("d", &[1.0]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
    }
}
