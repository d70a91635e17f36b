//! The rule runtime: each rule is a consumer of its source stream that runs a
//! compiled [`RuleProgram`] over every new batch and sends the rows on.
//!
//! A rule commits its input offsets only after its output is durable (commands
//! queued in the command queue). After a crash it replays from the last commit;
//! command ids are derived from the rule, the partition, the input offset and
//! the row, so a replay queues nothing twice.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::{RuleDef, RuleTarget};
use crate::commands::{CommandQueue, DEFAULT_TTL_MS, NewCommand};
use crate::event::now_millis;
use crate::log::{Record, SharedEventStream};
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
}

/// Most events a rule reads from one partition before committing.
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

/// What a stopped worker hands back: its program and how far it read.
struct Stopped {
    program: Box<dyn RuleProgram>,
    offsets: Option<Vec<u64>>,
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
    running: Mutex<HashMap<String, Running>>,
}

/// The consumer name a rule commits its offsets under.
pub fn consumer_name(rule: &str) -> String {
    format!("rule:{rule}")
}

impl RuleRuntime {
    pub fn new(log: SharedEventStream, commands: Arc<CommandQueue>) -> Self {
        RuleRuntime {
            log,
            commands,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Makes a new rule start at the current end of its source, so it acts on
    /// events that arrive from now on. Call once, when the rule is created.
    pub async fn position_at_end(&self, def: &RuleDef) -> Result<()> {
        let consumer = consumer_name(&def.name);
        for p in 0..self.log.partitions(&def.source)? {
            let end = self.log.end_offset(&def.source, p)?;
            self.log.commit(&consumer, &def.source, p, end).await?;
        }
        Ok(())
    }

    /// Starts running a rule from its committed offsets.
    pub fn start(&self, def: &RuleDef, program: Box<dyn RuleProgram>) -> Result<()> {
        self.start_at(def, program, None)
    }

    fn start_at(
        &self,
        def: &RuleDef,
        program: Box<dyn RuleProgram>,
        offsets: Option<Vec<u64>>,
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
            offsets,
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
        let stopped = self.stop_inner(&def.name).await;
        let (offsets, handover) = match stopped {
            Some(Stopped {
                program: old,
                offsets: Some(offsets),
            }) => {
                if program.adopt_state(old.into_state()) {
                    (Some(offsets), Handover::StateKept)
                } else {
                    (None, Handover::Rebuilt)
                }
            }
            _ => (None, Handover::Rebuilt),
        };
        if !def.paused {
            self.start_at(def, program, offsets)?;
        }
        Ok(handover)
    }

    /// Stops a rule and waits for it to finish the batch in hand.
    pub async fn stop(&self, name: &str) {
        self.stop_inner(name).await;
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

struct Worker {
    program: Box<dyn RuleProgram>,
    delivery: Delivery,
    /// How far the worker has read each partition (None until it knows).
    offsets: Option<Vec<u64>>,
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
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        Stopped {
            program: self.program,
            offsets: self.offsets,
        }
    }

    async fn run_until_error(&mut self, stop: &mut watch::Receiver<bool>) -> Result<()> {
        let log = self.delivery.log.clone();
        let stats = self.delivery.stats.clone();
        let source = self.delivery.def.source.clone();
        let consumer = consumer_name(&self.delivery.def.name);
        let mut appended = log.watch(&source)?;
        let partitions = log.partitions(&source)?;
        if self.offsets.is_none() {
            let mut offsets = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                offsets.push(log.committed(&consumer, &source, p).await?.unwrap_or(0));
            }
            self.offsets = Some(offsets);
        }
        loop {
            if *stop.borrow() {
                return Ok(());
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
                if let Err(e) = self.program.process(&records, &mut out) {
                    // The program could not run at all: try again later from
                    // the same offsets rather than skip events.
                    return Err(Error::Internal(e));
                }
                self.delivery.deliver(out).await?;
                let keep = self.program.retained_from(p).map_or(end, |r| r.min(end));
                log.commit(&consumer, &source, p, keep).await?;
                if let Some(offsets) = self.offsets.as_mut() {
                    offsets[p as usize] = end;
                }
                progressed = true;
            }
            stats.program(self.program.stats());
            if !progressed {
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return Ok(()) },
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(TICK) => {
                        let mut out = Output::default();
                        self.program
                            .advance(now_millis(), &mut out)
                            .map_err(Error::Internal)?;
                        self.delivery.deliver(out).await?;
                        stats.program(self.program.stats());
                    }
                }
            }
        }
    }

    fn offset(&self, partition: u32) -> u64 {
        self.offsets
            .as_ref()
            .and_then(|o| o.get(partition as usize).copied())
            .unwrap_or(0)
    }
}

/// Where a rule's output goes.
struct Delivery {
    def: RuleDef,
    log: SharedEventStream,
    commands: Arc<CommandQueue>,
    stats: Arc<RuleStats>,
}

impl Delivery {
    /// Makes a program's output durable: commands queued, rows and late
    /// events appended. Only then may the input be committed.
    async fn deliver(&self, out: Output) -> Result<()> {
        for e in out.errors {
            self.stats.error(format!("rule '{}': {e}", self.def.name));
        }
        let mut commands = Vec::new();
        for emitted in &out.rows {
            self.stats
                .rows_out
                .fetch_add(emitted.batch.num_rows() as u64, Ordering::Relaxed);
            match &self.def.target {
                RuleTarget::Commands => match rows_to_commands(&self.def.name, emitted) {
                    Ok(rows) => {
                        for c in rows {
                            // One bad row (say, a payload over the limit) is
                            // counted and skipped; it must not stall the rule.
                            match CommandQueue::validate(&c) {
                                Ok(()) => commands.push(c),
                                Err(e) => {
                                    self.stats.error(format!("rule '{}': {e}", self.def.name))
                                }
                            }
                        }
                    }
                    Err(e) => self.stats.error(e),
                },
                RuleTarget::Stream(target) => {
                    append_by_device(&self.log, target, &emitted.batch).await?;
                }
            }
        }
        if !commands.is_empty() {
            let now = now_millis();
            let queued = self
                .commands
                .blocking(move |q| q.enqueue(&commands, now))
                .await?;
            self.stats
                .commands_queued
                .fetch_add(queued as u64, Ordering::Relaxed);
        }
        if let Some(late_stream) = &self.def.late_stream {
            for batch in &out.late {
                append_by_device(&self.log, late_stream, batch).await?;
            }
        }
        Ok(())
    }
}

/// Appends rows whose first column is the device id, each to its device's
/// partition.
async fn append_by_device(
    log: &SharedEventStream,
    stream: &str,
    batch: &RecordBatch,
) -> Result<()> {
    if batch.num_rows() == 0 {
        return Ok(());
    }
    let partitions = log.partitions(stream)?;
    let devices = cast(batch.column(0), &DataType::Utf8)?;
    let devices = devices
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .ok_or_else(|| Error::Internal("device column is not text".into()))?;
    let mut rows: HashMap<u32, (String, Vec<u32>)> = HashMap::new();
    for i in 0..batch.num_rows() {
        let device = if devices.is_null(i) {
            ""
        } else {
            devices.value(i)
        };
        let p = crate::log::partition_for(device, partitions);
        rows.entry(p)
            .or_insert_with(|| (device.to_string(), Vec::new()))
            .1
            .push(i as u32);
    }
    let mut parts: Vec<_> = rows.into_values().collect();
    parts.sort_by_key(|(_, rows)| rows[0]);
    for (key, rows) in parts {
        let part = if rows.len() == batch.num_rows() {
            batch.clone()
        } else {
            let indices = arrow::array::UInt32Array::from(rows);
            arrow::compute::take_record_batch(batch, &indices)?
        };
        log.append(stream, &key, part).await?;
    }
    Ok(())
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

    #[tokio::test]
    async fn a_row_the_queue_refuses_is_counted_and_the_rule_goes_on() {
        use crate::catalog::{RuleDef, RuleTarget};
        use crate::event::{ColumnDef, ColumnType, StreamDef};
        use crate::log::{EmbeddedLog, LogOptions, SharedEventStream};

        let dir = tempfile::tempdir().unwrap();
        let log: SharedEventStream =
            Arc::new(EmbeddedLog::open(dir.path(), LogOptions::default()).unwrap());
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
        let queue = Arc::new(CommandQueue::open_in_memory().unwrap());
        let runtime = RuleRuntime::new(log.clone(), queue.clone());
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
}
