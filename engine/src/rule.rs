//! The rule runtime: each rule is a consumer of its source stream that runs a
//! compiled [`RuleProgram`] over every new batch and sends the rows on.
//!
//! A rule queues its commands as it produces them, and checkpoints its state
//! with the input offsets it covers and its rows for streams about once a
//! second ([`crate::checkpoint`]); only then are those rows appended and the
//! offsets committed. After a crash it restores the checkpoint and reads on
//! from there: command ids are derived from the rule and the input (the
//! partition, offset and row, or the window and key), so commands produced
//! again are queued once, and the checkpoint's rows are appended under
//! sequence numbers the log recognises, so they are stored once.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::{RuleDef, RuleTarget};
use crate::checkpoint::{Checkpoint, Checkpoints, PendingRows};
use crate::commands::{CommandQueue, DEFAULT_TTL_MS, NewCommand};
use crate::event::now_millis;
use crate::log::{EventStream, Record, SharedEventStream};
use crate::snapshot::Snapshot;
use crate::{Error, Result};

/// What a rule produced from the records it was given.
#[derive(Debug, Default)]
pub struct Output {
    /// Rows for the rule's target.
    pub rows: Vec<Emitted>,
    /// Source events that arrived after their watermark, in the schema of
    /// the rule's late-events stream.
    pub late: Vec<RecordBatch>,
    /// Input the rule could not process (counted and skipped, never fatal).
    pub errors: Vec<String>,
}

/// Rows a rule emits, each with an id that a replay reproduces.
#[derive(Debug)]
pub struct Emitted {
    /// For `commands`: (device_id, name[, payload]). For a stream: the rows
    /// in that stream's full schema, system columns first.
    pub batch: RecordBatch,
    /// One per row; the same input always yields the same ids, so a command
    /// queued twice after a replay is queued once.
    pub ids: RowIds,
}

/// The ids of emitted rows, made into text only when a consumer needs them
/// (commands do; streams do not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowIds {
    List(Vec<String>),
    /// Rows of closed windows: `w:<start>:<end>:<key hash>`.
    Windows {
        starts: Vec<i64>,
        ends: Vec<i64>,
        keys: Vec<u64>,
    },
}

impl RowIds {
    /// The id of one row.
    pub fn get(&self, row: usize) -> Option<String> {
        match self {
            RowIds::List(ids) => ids.get(row).cloned(),
            RowIds::Windows { starts, ends, keys } => Some(format!(
                "w:{}:{}:{:016x}",
                starts.get(row)?,
                ends.get(row)?,
                keys.get(row)?
            )),
        }
    }
}

impl From<Vec<String>> for RowIds {
    fn from(ids: Vec<String>) -> Self {
        RowIds::List(ids)
    }
}

/// What a program reports about itself, for `SHOW RULES`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgramStats {
    /// Events dropped from windows because they came after their watermark.
    pub late_events: u64,
    /// Bytes of window state held now.
    pub state_bytes: u64,
    /// Windows (or sessions) open now.
    pub open_windows: u64,
}

/// A compiled rule: turns the records of its source stream into rows.
///
/// Programs never read a clock: event time comes from the records, and the
/// runtime passes the time in with [`advance`](RuleProgram::advance).
pub trait RuleProgram: Send + 'static {
    /// Runs the rule over records of one partition, in offset order.
    fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String>;

    /// Tells the program the time (ms since the epoch) while its source is
    /// quiet, so windows of devices that went silent can close.
    fn advance(&mut self, _now_ms: i64, _out: &mut Output) -> Result<(), String> {
        Ok(())
    }

    /// The lowest offset of `partition` that open state still depends on:
    /// the rule commits no further, so a restart rebuilds that state.
    fn retained_from(&self, _partition: u32) -> Option<u64> {
        None
    }

    /// Counters and the size of the state held.
    fn stats(&self) -> ProgramStats {
        ProgramStats::default()
    }

    /// Hands the program's state over when it is replaced.
    fn into_state(self: Box<Self>) -> Box<dyn Any + Send> {
        Box::new(())
    }

    /// Takes over the state of the program this one replaces; `false` when
    /// the plans are not compatible and the state was not taken.
    fn adopt_state(&mut self, _state: Box<dyn Any + Send>) -> bool {
        false
    }

    /// The program's state for a checkpoint, taken between two calls of
    /// [`process`](RuleProgram::process); `None` when this program cannot
    /// save its state (a restart then rebuilds it by re-reading the input
    /// from [`retained_from`](RuleProgram::retained_from)). A program without
    /// state returns an empty snapshot.
    fn snapshot(&mut self) -> Result<Option<Snapshot>, String> {
        Ok(None)
    }

    /// Takes the state of a checkpoint back, on a program just compiled from
    /// the same rule. An error (the snapshot is of another plan, or damaged)
    /// leaves the program as it was, empty.
    fn restore(&mut self, _snapshot: &Snapshot) -> Result<(), String> {
        Err("this rule cannot restore a checkpoint".into())
    }
}

/// Most events a rule reads from one partition in one go.
const READ_CHUNK: usize = 8192;

/// How often a quiet rule tells its program the time.
const TICK: Duration = Duration::from_secs(1);

/// Counters of one rule, shown by `SHOW RULES`.
#[derive(Debug, Default)]
pub struct RuleStats {
    pub events_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub commands_queued: AtomicU64,
    pub errors: AtomicU64,
    pub late_events: AtomicU64,
    pub state_bytes: AtomicU64,
    pub open_windows: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of a rule's counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RuleStatsSnapshot {
    pub events_in: u64,
    pub rows_out: u64,
    pub commands_queued: u64,
    pub errors: u64,
    pub late_events: u64,
    pub state_bytes: u64,
    pub open_windows: u64,
    pub last_error: Option<String>,
}

impl RuleStats {
    fn error(&self, message: String) {
        tracing::warn!(error = %message, "rule error");
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    fn program(&self, s: ProgramStats) {
        self.late_events.store(s.late_events, Ordering::Relaxed);
        self.state_bytes.store(s.state_bytes, Ordering::Relaxed);
        self.open_windows.store(s.open_windows, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> RuleStatsSnapshot {
        RuleStatsSnapshot {
            events_in: self.events_in.load(Ordering::Relaxed),
            rows_out: self.rows_out.load(Ordering::Relaxed),
            commands_queued: self.commands_queued.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            late_events: self.late_events.load(Ordering::Relaxed),
            state_bytes: self.state_bytes.load(Ordering::Relaxed),
            open_windows: self.open_windows.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// How a rule's rows for streams go on from one run of its worker to the
/// next (see [`crate::checkpoint`]).
struct Progress {
    /// The key its rows are appended under.
    producer: String,
    next_seq: u64,
    /// Rows numbered and saved in a checkpoint, not yet known to be appended.
    sealed: Vec<PendingRows>,
    /// Rows produced since the last checkpoint, per stream, in order.
    unsealed: Vec<(String, RecordBatch)>,
    unsealed_rows: usize,
}

impl Progress {
    /// A new producer for `rule` (a rule of that name created at
    /// `created_at`): its key is new, so no number it uses was used before.
    fn new(rule: &str, created_at: i64) -> Self {
        let mut nonce = [0u8; 8];
        // SystemRandom only fails when the OS has no entropy source at all;
        // the rule and its creation time still tell producers apart.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        Progress {
            producer: format!(
                "rule:{rule}:{created_at}:{:016x}",
                u64::from_le_bytes(nonce)
            ),
            next_seq: 1,
            sealed: Vec::new(),
            unsealed: Vec::new(),
            unsealed_rows: 0,
        }
    }

    fn from_checkpoint(c: &Checkpoint) -> Self {
        Progress {
            producer: c.producer.clone(),
            next_seq: c.next_seq,
            sealed: c.pending.clone(),
            unsealed: Vec::new(),
            unsealed_rows: 0,
        }
    }

    fn push(&mut self, stream: &str, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.unsealed_rows += batch.num_rows();
            self.unsealed.push((stream.to_string(), batch));
        }
    }

    /// Numbers the rows produced since the last checkpoint: one record per
    /// stream.
    fn seal(&mut self) -> Result<()> {
        let mut streams: Vec<String> = Vec::new();
        for (stream, _) in &self.unsealed {
            if !streams.contains(stream) {
                streams.push(stream.clone());
            }
        }
        for stream in streams {
            let batches: Vec<&RecordBatch> = self
                .unsealed
                .iter()
                .filter(|(s, _)| *s == stream)
                .map(|(_, b)| b)
                .collect();
            let batch = arrow::compute::concat_batches(&batches[0].schema(), batches)?;
            // Records of bounded size, whatever a checkpoint gathered.
            let mut start = 0;
            while start < batch.num_rows() {
                let len = SEALED_ROWS.min(batch.num_rows() - start);
                self.sealed.push(PendingRows {
                    stream: stream.clone(),
                    seq: self.next_seq,
                    batch: batch.slice(start, len),
                });
                self.next_seq += 1;
                start += len;
            }
        }
        self.unsealed.clear();
        self.unsealed_rows = 0;
        Ok(())
    }
}

/// Most rows in one record a rule appends.
const SEALED_ROWS: usize = 8192;

/// What a stopped worker hands back: its program, how far it read, and the
/// rows it has not appended yet.
struct Stopped {
    program: Box<dyn RuleProgram>,
    offsets: Option<Vec<u64>>,
    progress: Option<Progress>,
}

struct Running {
    stats: Arc<RuleStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Stopped>,
}

/// How a replaced rule went on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The new plan took the old one's window state and read position.
    StateKept,
    /// The plans differ: the new one rebuilds its state by re-reading the
    /// source from the old one's last commit.
    Rebuilt,
}

/// Runs every rule of the server.
pub struct RuleRuntime {
    log: SharedEventStream,
    commands: Arc<CommandQueue>,
    checkpoints: Checkpoints,
    running: Mutex<HashMap<String, Running>>,
}

/// The consumer name a rule commits its offsets under.
pub fn consumer_name(rule: &str) -> String {
    format!("rule:{rule}")
}

impl RuleRuntime {
    /// A runtime whose rules keep their checkpoints in `checkpoints`.
    pub fn new(
        log: SharedEventStream,
        commands: Arc<CommandQueue>,
        checkpoints: impl Into<std::path::PathBuf>,
    ) -> Self {
        RuleRuntime {
            log,
            commands,
            checkpoints: Checkpoints::new(checkpoints),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Makes a new rule start at the current end of its source, so it acts on
    /// events that arrive from now on, with no checkpoint. Call once, when the
    /// rule is created (or starts reading another source).
    pub async fn position_at_end(&self, def: &RuleDef) -> Result<()> {
        // A checkpoint left by an earlier rule of that name is not this one's.
        self.checkpoints.remove(&def.name).await?;
        let ends = (0..self.log.partitions(&def.source)?)
            .map(|p| Ok((p, self.log.end_offset(&def.source, p)?)))
            .collect::<Result<Vec<_>>>()?;
        self.log
            .commit(&consumer_name(&def.name), &def.source, &ends)
            .await
    }

    /// Starts running a rule from its checkpoint (or, without one, from its
    /// committed offsets).
    pub fn start(&self, def: &RuleDef, program: Box<dyn RuleProgram>) -> Result<()> {
        self.start_at(def, program, None, None)
    }

    fn start_at(
        &self,
        def: &RuleDef,
        program: Box<dyn RuleProgram>,
        offsets: Option<Vec<u64>>,
        progress: Option<Progress>,
    ) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(&def.name) {
            return Err(Error::AlreadyExists {
                kind: "rule",
                name: def.name.clone(),
            });
        }
        let stats = Arc::new(RuleStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            program,
            delivery: Delivery {
                def: def.clone(),
                log: self.log.clone(),
                commands: self.commands.clone(),
                stats: stats.clone(),
            },
            checkpoints: self.checkpoints.clone(),
            offsets,
            progress,
            undelivered: None,
            used: false,
            reload: false,
            saved: false,
            dirty: true,
            last_checkpoint: Instant::now(),
            checkpoint_cost: Duration::ZERO,
            saving: None,
        };
        let task = tokio::spawn(worker.run(stop_rx));
        running.insert(def.name.clone(), Running { stats, stop, task });
        Ok(())
    }

    /// Replaces a running (or stopped) rule with a new program, without
    /// losing an event: a compatible program takes over the old one's window
    /// state and position; any other re-reads from the old one's last commit.
    pub async fn replace(
        &self,
        def: &RuleDef,
        mut program: Box<dyn RuleProgram>,
    ) -> Result<Handover> {
        let Some(Stopped {
            program: old,
            offsets,
            progress,
        }) = self.stop_inner(&def.name).await
        else {
            // Not running: the new program starts from the checkpoint, which
            // it restores if the plans are compatible.
            if !def.paused {
                self.start_at(def, program, None, None)?;
            }
            return Ok(Handover::Rebuilt);
        };
        let (offsets, handover) = match offsets {
            Some(offsets) if program.adopt_state(old.into_state()) => {
                (Some(offsets), Handover::StateKept)
            }
            _ => {
                // The checkpoint's state is not this program's: a restart
                // before the new program's first checkpoint rebuilds from the
                // committed offsets, keeping the rows not yet appended.
                if let Some(progress) = &progress
                    && let Err(e) = self
                        .checkpoints
                        .save(Checkpoint {
                            rule: def.name.clone(),
                            source: def.source.clone(),
                            producer: progress.producer.clone(),
                            next_seq: progress.next_seq,
                            resume: None,
                            pending: progress.sealed.clone(),
                            state: None,
                        })
                        .await
                {
                    // The new worker saves its own first checkpoint at once.
                    tracing::warn!(rule = %def.name, error = %e, "saving the replaced rule's checkpoint");
                }
                (None, Handover::Rebuilt)
            }
        };
        if !def.paused {
            self.start_at(def, program, offsets, progress)?;
        }
        Ok(handover)
    }

    /// Stops a rule and waits for it to finish the batch in hand and save
    /// a last checkpoint.
    pub async fn stop(&self, name: &str) {
        self.stop_inner(name).await;
    }

    /// Stops a rule and deletes its checkpoint (the rule was dropped).
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.stop_inner(name).await;
        self.checkpoints.remove(name).await
    }

    async fn stop_inner(&self, name: &str) -> Option<Stopped> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        let _ = running.stop.send(true);
        running.task.await.ok()
    }

    /// Whether a rule is running now.
    pub fn is_running(&self, name: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Stops every rule.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// The counters of a running rule.
    pub fn stats(&self, name: &str) -> Option<RuleStatsSnapshot> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|r| r.stats.snapshot())
    }
}

/// A checkpoint is taken at least this often while a rule has news.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Rows for streams held back before a checkpoint is taken early.
const MAX_UNSEALED_ROWS: usize = 65_536;

/// The shortest pause between checkpoints of a rule whose source went
/// quiet, so rows for streams do not wait for [`CHECKPOINT_EVERY`]; at
/// least 20 times the last checkpoint's own time.
const QUIET_CHECKPOINT_GAP: Duration = Duration::from_millis(100);

struct Worker {
    program: Box<dyn RuleProgram>,
    delivery: Delivery,
    checkpoints: Checkpoints,
    /// How far the worker has read each partition (None until it knows).
    offsets: Option<Vec<u64>>,
    /// None until it is read from the checkpoint.
    progress: Option<Progress>,
    /// Output whose commands are not queued yet (the queue failed); it is
    /// delivered before anything else, and no checkpoint is taken before.
    undelivered: Option<Output>,
    /// The program's state may hold input that `offsets` does not cover (a
    /// call failed halfway): it must not read from `offsets` again.
    used: bool,
    /// Go back to the last checkpoint before going on.
    reload: bool,
    /// Whether a checkpoint was saved since this worker took its position.
    saved: bool,
    /// Whether anything happened since the last checkpoint.
    dirty: bool,
    last_checkpoint: Instant,
    /// How long the last checkpoint took to write.
    checkpoint_cost: Duration,
    /// The checkpoint being written, while the worker reads on.
    saving: Option<Saving>,
}

/// A checkpoint being written in the background: an fsync of the command
/// queue, then the file, then the rows it sealed, then the commits of its
/// offsets. The rule's state, offsets and rows were taken when it began, so
/// the worker reads and answers events meanwhile instead of waiting for
/// those fsyncs once a second (ten of them before the offsets went in one
/// write; a large part of event → command's p99). Commands are queued as
/// they are made, written but not fsynced, and go out at once; the queue's
/// fsync here makes them durable before the checkpoint moves past their
/// events. A power cut before it loses commands whose events the rule then
/// replays, queuing them again with the same ids.
struct Saving {
    task: JoinHandle<Result<()>>,
    started: Instant,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Stopped {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.run_until_error(&mut stop).await {
                Ok(()) => break,
                Err(e) => {
                    let d = &self.delivery;
                    d.stats.error(format!("rule '{}': {e}", d.def.name));
                    // Nothing may go on writing while the worker goes back.
                    if let Err(e) = self.finish_checkpoint().await {
                        let d = &self.delivery;
                        d.stats
                            .error(format!("rule '{}': checkpoint: {e}", d.def.name));
                    }
                    if std::mem::take(&mut self.reload) {
                        self.offsets = None;
                        self.progress = None;
                        self.undelivered = None;
                        self.saved = false;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Err(e) = self.last_checkpoint().await {
            let d = &self.delivery;
            d.stats
                .error(format!("rule '{}': last checkpoint: {e}", d.def.name));
        }
        Stopped {
            program: self.program,
            offsets: self.offsets,
            progress: self.progress,
        }
    }

    /// Saves what the worker has done, when it knows where it is.
    async fn last_checkpoint(&mut self) -> Result<()> {
        // One that failed in the background is taken again, whole, below.
        let earlier = self.finish_checkpoint().await;
        if self.offsets.is_none() || self.progress.is_none() || self.reload {
            return earlier;
        }
        if let Some(out) = self.undelivered.take() {
            self.take_output(out).await?;
        }
        self.checkpoint().await
    }

    /// Restores the program from the rule's checkpoint, or else positions
    /// it at the committed offsets, and appends the checkpoint's rows.
    async fn load(&mut self, partitions: u32) -> Result<()> {
        let d = &self.delivery;
        let source = &d.def.source;
        if self.progress.is_none() {
            // A damaged file is set aside by `load` (and reported); an I/O
            // error is returned, so the rule tries again.
            let checkpoint = self.checkpoints.load(&d.def.name).await?;
            let mut resume = None;
            if let Some(c) = &checkpoint {
                if let (Some(offsets), Some(state)) = (&c.resume, &c.state)
                    && c.source == *source
                    && offsets.len() == partitions as usize
                    && self.offsets.is_none()
                {
                    match self.program.restore(state) {
                        Ok(()) => {
                            resume = Some(offsets.clone());
                            self.used = false;
                        }
                        Err(e) => tracing::warn!(
                            rule = %d.def.name,
                            error = %e,
                            "the checkpoint's state does not fit the rule; rebuilding from the committed offsets"
                        ),
                    }
                }
                self.progress = Some(Progress::from_checkpoint(c));
            } else {
                self.progress = Some(Progress::new(&d.def.name, d.def.created_at));
            }
            if self.offsets.is_none() {
                self.offsets = resume;
            }
        }
        if self.offsets.is_none() {
            if self.used {
                // Reading from the commits again would count events twice.
                return Err(Error::Internal(format!(
                    "rule '{}' lost track of its input and cannot restore a checkpoint; \
                     replace or restart it",
                    d.def.name
                )));
            }
            let consumer = consumer_name(&d.def.name);
            let mut offsets = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                offsets.push(d.log.committed(&consumer, source, p).await?.unwrap_or(0));
            }
            self.offsets = Some(offsets);
        }
        self.append_sealed().await
    }

    async fn run_until_error(&mut self, stop: &mut watch::Receiver<bool>) -> Result<()> {
        let log = self.delivery.log.clone();
        let stats = self.delivery.stats.clone();
        let source = self.delivery.def.source.clone();
        let mut appended = log.watch(&source)?;
        let partitions = log.partitions(&source)?;
        if self.offsets.is_none() || self.progress.is_none() {
            self.load(partitions).await?;
        }
        if let Some(out) = self.undelivered.take() {
            self.take_output(out).await?;
        }
        if !self.saved {
            // From here on, going back to a checkpoint never means reading
            // from the commits with a program that has taken input.
            self.dirty = true;
            self.checkpoint().await?;
        }
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            if self.saving.as_ref().is_some_and(|s| s.task.is_finished()) {
                self.finish_checkpoint().await?;
            }
            appended.borrow_and_update();
            let mut progressed = false;
            for p in 0..partitions {
                let from = self.offset(p);
                let records = log.read(&source, p, from, READ_CHUNK).await?;
                let Some(end) = records.last().map(Record::end_offset) else {
                    continue;
                };
                let events: usize = records.iter().map(|r| r.batch.num_rows()).sum();
                stats.events_in.fetch_add(events as u64, Ordering::Relaxed);
                let mut out = Output::default();
                self.used = true;
                if let Err(e) = self.program.process(&records, &mut out) {
                    self.reload = true;
                    return Err(Error::Internal(e));
                }
                if let Some(offsets) = self.offsets.as_mut() {
                    offsets[p as usize] = end;
                }
                self.used = false;
                self.dirty = true;
                progressed = true;
                self.take_output(out).await?;
                if self.checkpoint_due(false) {
                    self.begin_checkpoint().await?;
                }
            }
            stats.program(self.program.stats());
            if !progressed {
                if self.checkpoint_due(true) {
                    self.begin_checkpoint().await?;
                    continue;
                }
                let nap = self.quiet_checkpoint_in().unwrap_or(TICK).min(TICK);
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return Ok(()) },
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(nap), if nap < TICK => {}
                    _ = tokio::time::sleep(TICK), if nap >= TICK => {
                        let mut out = Output::default();
                        self.used = true;
                        if let Err(e) = self.program.advance(now_millis(), &mut out) {
                            self.reload = true;
                            return Err(Error::Internal(e));
                        }
                        self.used = false;
                        self.take_output(out).await?;
                        stats.program(self.program.stats());
                    }
                }
            }
        }
    }

    /// Queues the commands of an output at once (their ids make a replay
    /// harmless) and keeps its rows for streams for the next checkpoint.
    /// If the queue fails, the output is kept to be delivered again: the
    /// input that made it is not read twice.
    async fn take_output(&mut self, out: Output) -> Result<()> {
        if !out.rows.is_empty() || !out.late.is_empty() {
            self.dirty = true;
        }
        let rows = match self.delivery.queue_commands(&out).await {
            Ok(()) => self.delivery.stream_rows(out),
            Err(e) => {
                self.undelivered = Some(out);
                return Err(e);
            }
        };
        let progress = self.progress_mut()?;
        for (stream, batch) in rows {
            progress.push(&stream, batch);
        }
        Ok(())
    }

    fn progress_mut(&mut self) -> Result<&mut Progress> {
        self.progress
            .as_mut()
            .ok_or_else(|| Error::Internal("the rule's progress is not loaded".into()))
    }

    /// Whether to take a checkpoint now: regularly while busy, early when
    /// many rows wait, and soon after the source goes quiet when rows wait.
    fn checkpoint_due(&self, quiet: bool) -> bool {
        if !self.dirty {
            return false;
        }
        let waiting = self.progress.as_ref().map_or(0, |p| p.unsealed_rows);
        self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || waiting >= MAX_UNSEALED_ROWS
            || (quiet && self.quiet_checkpoint_in() == Some(Duration::ZERO))
    }

    /// With rows waiting on a quiet source: how long until the checkpoint
    /// that appends them. The gap keeps checkpoints from taking over the
    /// rule's time when events trickle in.
    fn quiet_checkpoint_in(&self) -> Option<Duration> {
        let waiting = self.progress.as_ref().map_or(0, |p| p.unsealed_rows);
        if !self.dirty || waiting == 0 {
            return None;
        }
        let gap = QUIET_CHECKPOINT_GAP.max(self.checkpoint_cost * 20);
        Some(gap.saturating_sub(self.last_checkpoint.elapsed()))
    }

    /// Saves the program's state with the offsets it covers and the rows
    /// produced so far, then appends those rows and commits the offsets;
    /// returns when all of it is done.
    async fn checkpoint(&mut self) -> Result<()> {
        self.begin_checkpoint().await?;
        self.finish_checkpoint().await
    }

    /// Takes the program's state, the offsets it covers and the rows
    /// produced so far, and writes them in the background ([`Saving`]).
    /// A checkpoint still being written is finished first: each appends its
    /// rows after the last one's.
    async fn begin_checkpoint(&mut self) -> Result<()> {
        self.finish_checkpoint().await?;
        if self.undelivered.is_some() {
            return Err(Error::Internal(
                "a checkpoint must wait for the commands to be queued".into(),
            ));
        }
        let started = Instant::now();
        let state = match self.program.snapshot() {
            Ok(state) => state,
            Err(e) => {
                // Taking the state out may have left the program damaged:
                // go back to the last checkpoint.
                self.reload = true;
                return Err(Error::Internal(format!("saving its state: {e}")));
            }
        };
        let offsets = self.offsets.clone().unwrap_or_default();
        // Events that open windows still depend on stay, so a rule can
        // rebuild its state without a checkpoint.
        let commits: Vec<(u32, u64)> = offsets
            .iter()
            .enumerate()
            .map(|(p, offset)| {
                let keep = self.program.retained_from(p as u32);
                (p as u32, keep.map_or(*offset, |r| r.min(*offset)))
            })
            .collect();
        let d = &self.delivery;
        let (rule, source) = (d.def.name.clone(), d.def.source.clone());
        let (log, consumer) = (d.log.clone(), consumer_name(&d.def.name));
        let checkpoints = self.checkpoints.clone();
        // Only a rule that queues commands has any to make durable.
        let commands = matches!(d.def.target, RuleTarget::Commands).then(|| d.commands.clone());
        let progress = self.progress_mut()?;
        progress.seal()?;
        let rows = progress.sealed.clone();
        let producer = progress.producer.clone();
        let checkpoint = Checkpoint {
            rule,
            source: source.clone(),
            producer: producer.clone(),
            next_seq: progress.next_seq,
            resume: state.is_some().then(|| offsets.clone()),
            pending: progress.sealed.clone(),
            state,
        };
        let task = tokio::spawn(async move {
            // The commands of the events this checkpoint moves past are
            // durable before it is.
            if let Some(commands) = commands {
                commands.blocking(CommandQueue::sync).await?;
            }
            checkpoints.save(checkpoint).await?;
            append_rows(log.as_ref(), &producer, &rows).await?;
            log.commit(&consumer, &source, &commits).await
        });
        self.saving = Some(Saving { task, started });
        self.dirty = false;
        self.last_checkpoint = started;
        Ok(())
    }

    /// Waits for the checkpoint being written, if there is one. Once it is
    /// written its rows are appended, so they are no longer pending; if it
    /// failed, they are, and the next checkpoint saves them again.
    async fn finish_checkpoint(&mut self) -> Result<()> {
        let Some(saving) = self.saving.take() else {
            return Ok(());
        };
        let written = match saving.task.await {
            Ok(written) => written,
            Err(e) => Err(Error::Internal(format!("checkpoint task: {e}"))),
        };
        if let Err(e) = written {
            self.dirty = true;
            return Err(e);
        }
        self.saved = true;
        self.checkpoint_cost = saving.started.elapsed();
        // Nothing was sealed since it began: it finishes before the next.
        self.progress_mut()?.sealed.clear();
        Ok(())
    }

    /// Appends the rows of the last checkpoint, each device's rows to its
    /// partition; the log drops those it already holds.
    async fn append_sealed(&mut self) -> Result<()> {
        let log = self.delivery.log.clone();
        let progress = self.progress_mut()?;
        append_rows(log.as_ref(), &progress.producer, &progress.sealed).await?;
        progress.sealed.clear();
        Ok(())
    }

    fn offset(&self, partition: u32) -> u64 {
        self.offsets
            .as_ref()
            .and_then(|o| o.get(partition as usize).copied())
            .unwrap_or(0)
    }
}

/// Appends a checkpoint's rows under `producer`, each device's rows to its
/// partition, and waits until they are durable. Submitted in order, so they
/// are appended in order; the log drops the numbers it already holds.
async fn append_rows(log: &dyn EventStream, producer: &str, rows: &[PendingRows]) -> Result<()> {
    let mut receipts = Vec::with_capacity(rows.len());
    for pending in rows {
        let partitions = log.partitions(&pending.stream)?;
        for (p, part) in by_partition(&pending.batch, partitions)? {
            receipts.push(log.submit_to(&pending.stream, p, producer, pending.seq, part)?);
        }
    }
    for receipt in receipts {
        receipt.await?;
    }
    Ok(())
}

/// Splits rows whose first column is the device id by the device's
/// partition, keeping their order within each partition.
fn by_partition(batch: &RecordBatch, partitions: u32) -> Result<Vec<(u32, RecordBatch)>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let devices = cast(batch.column(0), &DataType::Utf8)?;
    let devices = devices
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .ok_or_else(|| Error::Internal("device column is not text".into()))?;
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); partitions.max(1) as usize];
    for i in 0..batch.num_rows() {
        let device = if devices.is_null(i) {
            ""
        } else {
            devices.value(i)
        };
        rows[crate::log::partition_for(device, partitions) as usize].push(i as u32);
    }
    let mut parts = Vec::new();
    for (p, rows) in rows.into_iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let part = if rows.len() == batch.num_rows() {
            batch.clone()
        } else {
            let indices = arrow::array::UInt32Array::from(rows);
            arrow::compute::take_record_batch(batch, &indices)?
        };
        parts.push((p as u32, part));
    }
    Ok(parts)
}

/// Where a rule's output goes.
struct Delivery {
    def: RuleDef,
    log: SharedEventStream,
    commands: Arc<CommandQueue>,
    stats: Arc<RuleStats>,
}

impl Delivery {
    /// Queues a program's commands, counts its errors. They are written
    /// but not fsynced: the checkpoint that moves past their events syncs
    /// the queue first ([`CommandQueue::enqueue_unsynced`]).
    async fn queue_commands(&self, out: &Output) -> Result<()> {
        for e in &out.errors {
            self.stats.error(format!("rule '{}': {e}", self.def.name));
        }
        let RuleTarget::Commands = &self.def.target else {
            return Ok(());
        };
        let mut commands = Vec::new();
        for emitted in &out.rows {
            match rows_to_commands(&self.def.name, emitted) {
                Ok(rows) => {
                    for c in rows {
                        // One bad row (say, a payload over the limit) is
                        // counted and skipped; it must not stall the rule.
                        match CommandQueue::validate(&c) {
                            Ok(()) => commands.push(c),
                            Err(e) => self.stats.error(format!("rule '{}': {e}", self.def.name)),
                        }
                    }
                }
                Err(e) => self.stats.error(e),
            }
        }
        if !commands.is_empty() {
            let now = now_millis();
            let queued = self
                .commands
                .blocking(move |q| q.enqueue_unsynced(&commands, now))
                .await?;
            self.stats
                .commands_queued
                .fetch_add(queued as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A program's rows for streams (the target's and late events'), to be
    /// appended with the next checkpoint.
    fn stream_rows(&self, out: Output) -> Vec<(String, RecordBatch)> {
        let mut rows = Vec::new();
        for emitted in out.rows {
            self.stats
                .rows_out
                .fetch_add(emitted.batch.num_rows() as u64, Ordering::Relaxed);
            if let RuleTarget::Stream(target) = &self.def.target {
                rows.push((target.clone(), emitted.batch));
            }
        }
        if let Some(late_stream) = &self.def.late_stream {
            for batch in out.late {
                rows.push((late_stream.clone(), batch));
            }
        }
        rows
    }
}

/// Turns the rows of a rule into commands: column 1 is the device, column 2
/// the command name, column 3 (optional) the payload, sent as JSON.
pub fn rows_to_commands(rule: &str, emitted: &Emitted) -> Result<Vec<NewCommand>, String> {
    let out = &emitted.batch;
    if out.num_columns() < 2 {
        return Err(format!(
            "rule '{rule}' must select a device id and a command name, got {} column(s)",
            out.num_columns()
        ));
    }
    let as_utf8 = |i: usize| {
        cast(out.column(i), &DataType::Utf8)
            .map_err(|e| format!("rule '{rule}': column {}: {e}", i + 1))
    };
    let devices = as_utf8(0)?;
    let names = as_utf8(1)?;
    let devices = devices
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .ok_or("device column is not text")?;
    let names = names
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .ok_or("name column is not text")?;
    let payloads = if out.num_columns() >= 3 {
        payload_values(out.column(2)).map_err(|e| format!("rule '{rule}': payload: {e}"))?
    } else {
        vec![serde_json::Value::Null; out.num_rows()]
    };
    let mut commands = Vec::with_capacity(out.num_rows());
    for (row, payload) in payloads.into_iter().enumerate() {
        if devices.is_null(row) || names.is_null(row) {
            continue;
        }
        commands.push(NewCommand {
            id: format!("{rule}:{}", emitted.ids.get(row).unwrap_or_default()),
            device_id: devices.value(row).to_string(),
            name: names.value(row).to_string(),
            payload,
            source: format!("rule:{rule}"),
            ttl_ms: DEFAULT_TTL_MS,
            ..NewCommand::default()
        });
    }
    Ok(commands)
}

/// Each value of an Arrow column as JSON (strings stay strings, structs
/// become objects, nulls become null).
pub fn payload_values(column: &Arc<dyn Array>) -> Result<Vec<serde_json::Value>, String> {
    let rows = column.len();
    let column = match column.data_type() {
        DataType::Utf8View | DataType::LargeUtf8 => {
            cast(column, &DataType::Utf8).map_err(|e| e.to_string())?
        }
        _ => column.clone(),
    };
    let schema = Arc::new(Schema::new(vec![Field::new(
        "v",
        column.data_type().clone(),
        true,
    )]));
    let batch = RecordBatch::try_new(schema, vec![column]).map_err(|e| e.to_string())?;
    let mut writer = arrow::json::writer::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(Vec::new());
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    let text = writer.into_inner();
    let values: Vec<serde_json::Map<String, serde_json::Value>> = if rows == 0 {
        Vec::new()
    } else {
        serde_json::from_slice(&text).map_err(|e| e.to_string())?
    };
    Ok(values
        .into_iter()
        .map(|mut m| m.remove("v").unwrap_or(serde_json::Value::Null))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use serde_json::json;

    #[test]
    fn rows_become_commands_with_deterministic_ids() {
        let out = RecordBatch::try_from_iter(vec![
            (
                "d",
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])) as _,
            ),
            (
                "n",
                Arc::new(StringArray::from(vec!["on", "on", "off"])) as _,
            ),
            (
                "p",
                Arc::new(Float64Array::from(vec![Some(1.5), Some(2.0), None])) as _,
            ),
        ])
        .unwrap();
        let emitted = Emitted {
            batch: out,
            ids: vec!["2:40:0".to_string(), "2:40:1".into(), "2:40:2".into()].into(),
        };
        let cmds = rows_to_commands("hot", &emitted).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].id, "hot:2:40:0");
        assert_eq!(cmds[0].payload, json!(1.5));
        assert_eq!(cmds[1].id, "hot:2:40:2");
        assert_eq!(cmds[1].device_id, "c");
        assert_eq!(cmds[1].payload, json!(null));
    }

    #[test]
    fn string_payloads_stay_strings() {
        let col: Arc<dyn Array> = Arc::new(StringArray::from(vec!["85.5"]));
        assert_eq!(payload_values(&col).unwrap(), vec![json!("85.5")]);
    }

    /// Passes each event through as (device_id, 'set', label).
    struct Echo;

    impl RuleProgram for Echo {
        fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String> {
            for record in records {
                let batch = &record.batch;
                let rows = RecordBatch::try_from_iter(vec![
                    ("device", batch.column(0).clone()),
                    (
                        "name",
                        Arc::new(StringArray::from(vec!["set"; batch.num_rows()])) as _,
                    ),
                    ("payload", batch.column(3).clone()),
                ])
                .map_err(|e| e.to_string())?;
                out.rows.push(Emitted {
                    batch: rows,
                    ids: (0..batch.num_rows())
                        .map(|i| format!("{}:{i}", record.offset))
                        .collect::<Vec<_>>()
                        .into(),
                });
            }
            Ok(())
        }
    }

    /// Stream `s` (one text column, `label`) in `log`, and a runtime running
    /// the rule `echo` (an [`Echo`]) on it from its end, into `queue`.
    async fn echo_rule(
        log: SharedEventStream,
        dir: &std::path::Path,
    ) -> (crate::event::StreamDef, Arc<CommandQueue>, RuleRuntime) {
        use crate::catalog::{RuleDef, RuleTarget};
        use crate::event::{ColumnDef, ColumnType, StreamDef};

        let def = StreamDef::new(
            "s",
            vec![ColumnDef {
                name: "label".into(),
                ty: ColumnType::Utf8,
            }],
            1,
        )
        .unwrap();
        log.create_stream(&def).await.unwrap();
        let queue = Arc::new(CommandQueue::open(&dir.join("commands.db")).unwrap());
        let runtime = RuleRuntime::new(log, queue.clone(), dir.join("checkpoints"));
        let rule = RuleDef {
            name: "echo".into(),
            sql: String::new(),
            source: "s".into(),
            target: RuleTarget::Commands,
            created_at: 0,
            paused: false,
            late_stream: None,
        };
        runtime.position_at_end(&rule).await.unwrap();
        runtime.start(&rule, Box::new(Echo)).unwrap();
        (def, queue, runtime)
    }

    #[tokio::test]
    async fn a_row_the_queue_refuses_is_counted_and_the_rule_goes_on() {
        use crate::log::{EmbeddedLog, LogOptions, SharedEventStream};

        let dir = tempfile::tempdir().unwrap();
        let log: SharedEventStream =
            Arc::new(EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap());
        let (def, queue, runtime) = echo_rule(log.clone(), dir.path()).await;

        let too_big = "x".repeat(crate::commands::MAX_PAYLOAD_BYTES + 1);
        let ts = arrow::array::TimestampMillisecondArray::from(vec![0i64, 0]).with_timezone("UTC");
        let batch = RecordBatch::try_new(
            def.schema(),
            vec![
                Arc::new(StringArray::from(vec!["d", "d"])),
                Arc::new(ts.clone()),
                Arc::new(ts),
                Arc::new(StringArray::from(vec![too_big.as_str(), "fine"])),
            ],
        )
        .unwrap();
        log.append("s", "d", batch).await.unwrap();

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let stats = loop {
            let stats = runtime.stats("echo").unwrap();
            // The bad row is counted before the good one is queued.
            if stats.commands_queued > 0 {
                break stats;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rule stalled: {stats:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        runtime.shutdown().await;
        assert_eq!(stats.commands_queued, 1, "{stats:?}");
        assert_eq!(stats.errors, 1, "{stats:?}");
        assert!(stats.last_error.unwrap().contains("payload"));
        let pending = queue.pending("d", 0).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].payload, json!("fine"));
    }

    /// A log whose appends of rule rows can be made to fail, and whose
    /// offset commits wait while the test holds `commits` for writing.
    struct Flaky {
        inner: SharedEventStream,
        fail: std::sync::atomic::AtomicBool,
        commits: tokio::sync::RwLock<()>,
        /// Commits that have begun (some may be waiting on `commits`).
        committing: AtomicU64,
    }

    impl Flaky {
        fn new(inner: SharedEventStream) -> Self {
            Flaky {
                inner,
                fail: false.into(),
                commits: tokio::sync::RwLock::new(()),
                committing: AtomicU64::new(0),
            }
        }
    }

    #[async_trait::async_trait]
    impl crate::log::EventStream for Flaky {
        async fn create_stream(&self, def: &crate::event::StreamDef) -> Result<()> {
            self.inner.create_stream(def).await
        }
        fn submit_to(
            &self,
            stream: &str,
            partition: u32,
            key: &str,
            seq: u64,
            batch: RecordBatch,
        ) -> Result<crate::log::AppendFuture> {
            if seq > 0 && self.fail.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("the disk is full".into()));
            }
            self.inner.submit_to(stream, partition, key, seq, batch)
        }
        fn partitions(&self, stream: &str) -> Result<u32> {
            self.inner.partitions(stream)
        }
        async fn read(
            &self,
            stream: &str,
            partition: u32,
            from: u64,
            max_events: usize,
        ) -> Result<Vec<Record>> {
            self.inner.read(stream, partition, from, max_events).await
        }
        fn end_offset(&self, stream: &str, partition: u32) -> Result<u64> {
            self.inner.end_offset(stream, partition)
        }
        fn watch(&self, stream: &str) -> Result<watch::Receiver<u64>> {
            self.inner.watch(stream)
        }
        async fn commit(&self, c: &str, stream: &str, offsets: &[(u32, u64)]) -> Result<()> {
            self.committing.fetch_add(1, Ordering::SeqCst);
            let _open = self.commits.read().await;
            self.inner.commit(c, stream, offsets).await
        }
        async fn forget(&self, consumer: &str, stream: &str) -> Result<()> {
            self.inner.forget(consumer, stream).await
        }
        async fn committed(&self, c: &str, stream: &str, p: u32) -> Result<Option<u64>> {
            self.inner.committed(c, stream, p).await
        }
        fn lag(&self, stream: &str) -> Result<Vec<crate::log::ConsumerLag>> {
            self.inner.lag(stream)
        }
    }

    /// Numbers the events it sees, 1, 2, 3, ..., as rows of stream `out`;
    /// the count is its state.
    struct Counter {
        seen: i64,
        out: arrow::datatypes::SchemaRef,
    }

    impl RuleProgram for Counter {
        fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String> {
            for record in records {
                let b = &record.batch;
                let n: Vec<i64> = (0..b.num_rows() as i64)
                    .map(|i| self.seen + i + 1)
                    .collect();
                self.seen += b.num_rows() as i64;
                let rows = RecordBatch::try_new(
                    self.out.clone(),
                    vec![
                        b.column(0).clone(),
                        b.column(1).clone(),
                        b.column(2).clone(),
                        Arc::new(arrow::array::Int64Array::from(n)),
                    ],
                )
                .map_err(|e| e.to_string())?;
                out.rows.push(Emitted {
                    batch: rows,
                    ids: Vec::<String>::new().into(),
                });
            }
            Ok(())
        }

        fn snapshot(&mut self) -> Result<Option<Snapshot>, String> {
            let mut s = Snapshot::new();
            s.put_i64s("seen", &[self.seen])?;
            Ok(Some(s))
        }

        fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
            self.seen = snapshot.i64s("seen")?[0];
            Ok(())
        }
    }

    /// The numbers in stream `out`, in order.
    async fn numbers(log: &SharedEventStream) -> Vec<i64> {
        let mut all = Vec::new();
        for p in 0..log.partitions("out").unwrap() {
            for r in log.read("out", p, 0, usize::MAX).await.unwrap() {
                let n = r
                    .batch
                    .column(3)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap()
                    .clone();
                all.extend(n.values().iter().copied());
            }
        }
        all
    }

    /// A rule answers events while its checkpoint is being written: the
    /// checkpoint's last step, the commit of its offsets, is held, and the
    /// commands for events that arrive meanwhile are queued all the same,
    /// without an fsync. Once the commit goes through, it covers what the
    /// checkpoint took, and the last checkpoint made every command durable.
    #[tokio::test]
    async fn a_rule_answers_events_while_its_checkpoint_is_written() {
        use crate::log::{EmbeddedLog, LogOptions};

        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky::new(Arc::new(
            EmbeddedLog::open(dir.path().join("log"), LogOptions::default()).unwrap(),
        )));
        let log: SharedEventStream = flaky.clone();
        let (def, queue, runtime) = echo_rule(log.clone(), dir.path()).await;
        let send = |label: &'static str| {
            let log = log.clone();
            let schema = def.schema();
            async move {
                let ts =
                    arrow::array::TimestampMillisecondArray::from(vec![0i64]).with_timezone("UTC");
                let batch = RecordBatch::try_new(
                    schema,
                    vec![
                        Arc::new(StringArray::from(vec!["d"])),
                        Arc::new(ts.clone()),
                        Arc::new(ts),
                        Arc::new(StringArray::from(vec![label])),
                    ],
                )
                .unwrap();
                log.append("s", "d", batch).await.unwrap().offset
            }
        };
        async fn until(what: &str, done: impl Fn() -> bool) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "no {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let queued = || runtime.stats("echo").unwrap().commands_queued;

        send("one").await;
        until("first command", || queued() == 1).await;
        // The worker's first checkpoint is behind it: hold every commit from
        // now on, and let a second checkpoint fall due.
        let held = flaky.commits.write().await;
        let before = flaky.committing.load(Ordering::SeqCst);
        tokio::time::sleep(CHECKPOINT_EVERY + Duration::from_millis(100)).await;
        send("two").await;
        until("commit of a second checkpoint", || {
            flaky.committing.load(Ordering::SeqCst) > before
        })
        .await;
        let third = send("three").await;
        until("third command while the commit is held", || queued() == 3).await;
        // The held checkpoint synced the queue before its commit began; the
        // third command came after, and waited for no fsync.
        assert!(queue.has_unsynced(), "the third command was fsynced");
        drop(held);
        runtime.shutdown().await;
        assert!(
            !queue.has_unsynced(),
            "the last checkpoint left commands a power cut could lose"
        );

        let labels: Vec<serde_json::Value> = queue
            .pending("d", 0)
            .unwrap()
            .into_iter()
            .map(|c| c.payload)
            .collect();
        assert_eq!(labels, [json!("one"), json!("two"), json!("three")]);
        // The last checkpoint, at shutdown, covers all three events.
        let committed = log.committed(&consumer_name("echo"), "s", 0).await.unwrap();
        assert_eq!(committed, Some(third + 1));
    }

    /// A rule's rows for a stream go out once each, in order, whether their
    /// append fails and is retried or the rule restarts from its checkpoint
    /// (its state restored, not rebuilt).
    #[tokio::test]
    async fn rows_for_streams_are_appended_once_across_failures_and_restarts() {
        use crate::catalog::{RuleDef, RuleTarget};
        use crate::event::{ColumnDef, ColumnType, StreamDef};
        use crate::log::{EmbeddedLog, LogOptions};

        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky::new(Arc::new(
            EmbeddedLog::open(dir.path().join("log"), LogOptions::default()).unwrap(),
        )));
        let log: SharedEventStream = flaky.clone();
        let column = |name: &str| ColumnDef {
            name: name.into(),
            ty: ColumnType::Int64,
        };
        let source = StreamDef::new("s", vec![column("x")], 2).unwrap();
        let out = StreamDef::new("out", vec![column("n")], 2).unwrap();
        log.create_stream(&source).await.unwrap();
        log.create_stream(&out).await.unwrap();
        let queue = Arc::new(CommandQueue::open_in_memory().unwrap());
        let rule = RuleDef {
            name: "count".into(),
            sql: String::new(),
            source: "s".into(),
            target: RuleTarget::Stream("out".into()),
            created_at: 0,
            paused: false,
            late_stream: None,
        };
        let counter = || {
            Box::new(Counter {
                seen: 0,
                out: out.schema(),
            })
        };
        let send = |device: &'static str, count: usize| {
            let log = log.clone();
            let schema = source.schema();
            async move {
                let ts = arrow::array::TimestampMillisecondArray::from(vec![0i64; count])
                    .with_timezone("UTC");
                let batch = RecordBatch::try_new(
                    schema,
                    vec![
                        Arc::new(StringArray::from(vec![device; count])),
                        Arc::new(ts.clone()),
                        Arc::new(ts),
                        Arc::new(arrow::array::Int64Array::from(vec![0i64; count])),
                    ],
                )
                .unwrap();
                log.append("s", device, batch).await.unwrap();
            }
        };
        let until = |want: usize| {
            let log = log.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let got = numbers(&log).await;
                    if got.len() >= want {
                        return got;
                    }
                    assert!(std::time::Instant::now() < deadline, "only {got:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let checkpoints = dir.path().join("checkpoints");

        let runtime = RuleRuntime::new(log.clone(), queue.clone(), &checkpoints);
        runtime.position_at_end(&rule).await.unwrap();
        runtime.start(&rule, counter()).unwrap();
        send("a", 3).await;
        send("b", 2).await;
        assert_eq!(until(5).await.len(), 5);

        // The appends fail: the rows wait in the checkpoint, the rule retries.
        flaky.fail.store(true, Ordering::SeqCst);
        send("a", 4).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while runtime.stats("count").unwrap().errors == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the append never failed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(numbers(&log).await.len(), 5);
        flaky.fail.store(false, Ordering::SeqCst);
        assert_eq!(until(9).await.len(), 9);
        runtime.shutdown().await;

        // A new runtime, as after a restart: the count goes on from the
        // checkpoint, and the rows the checkpoint still lists are not
        // appended again.
        let runtime = RuleRuntime::new(log.clone(), queue.clone(), &checkpoints);
        runtime.start(&rule, counter()).unwrap();
        send("b", 1).await;
        let mut got = until(10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        runtime.shutdown().await;
        assert_eq!(numbers(&log).await.len(), 10);
        got.sort_unstable();
        assert_eq!(got, (1..=10).collect::<Vec<i64>>());
        // Each device's rows are in its own partition of the target.
        for p in 0..2 {
            for r in log.read("out", p, 0, usize::MAX).await.unwrap() {
                let devices = r
                    .batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap();
                for d in devices.iter().flatten() {
                    assert_eq!(crate::log::partition_for(d, 2), p, "{d}");
                }
            }
        }

        // Dropped: the next rule of that name starts afresh.
        let runtime = RuleRuntime::new(log.clone(), queue, &checkpoints);
        runtime.remove("count").await.unwrap();
        assert!(!checkpoints.join("count.ckpt").exists());
    }
}
