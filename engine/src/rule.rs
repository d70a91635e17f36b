//! The rule runtime: each rule is a consumer of its source stream that runs a
//! compiled [`RuleProgram`] over every new batch and sends the rows on.
//!
//! A rule commits its input offsets only after its output is durable (commands
//! queued in the command queue). After a crash it replays from the last commit;
//! command ids are derived from the rule, the partition, the input offset and
//! the row, so a replay queues nothing twice.

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

/// A compiled rule: turns each batch of its source stream into output rows.
pub trait RuleProgram: Send + 'static {
    /// Runs the rule over one batch. `Ok(None)` means no output.
    fn process(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>, String>;
}

/// Most events a rule reads from one partition before committing.
const READ_CHUNK: usize = 8192;

/// Counters of one rule, shown by `SHOW RULES`.
#[derive(Debug, Default)]
pub struct RuleStats {
    pub events_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub commands_queued: AtomicU64,
    pub errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of a rule's counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RuleStatsSnapshot {
    pub events_in: u64,
    pub rows_out: u64,
    pub commands_queued: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl RuleStats {
    fn error(&self, message: String) {
        tracing::warn!(error = %message, "rule error");
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    /// The counters now.
    pub fn snapshot(&self) -> RuleStatsSnapshot {
        RuleStatsSnapshot {
            events_in: self.events_in.load(Ordering::Relaxed),
            rows_out: self.rows_out.load(Ordering::Relaxed),
            commands_queued: self.commands_queued.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

struct Running {
    stats: Arc<RuleStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
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
        if let RuleTarget::Stream(s) = &def.target {
            return Err(Error::User(format!(
                "rule '{}': output into stream '{s}' is not supported yet; use INSERT INTO commands",
                def.name
            )));
        }
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
            def: def.clone(),
            program,
            log: self.log.clone(),
            commands: self.commands.clone(),
            stats: stats.clone(),
        };
        let task = tokio::spawn(worker.run(stop_rx));
        running.insert(def.name.clone(), Running { stats, stop, task });
        Ok(())
    }

    /// Stops a rule and waits for it to finish the batch in hand.
    pub async fn stop(&self, name: &str) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
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
    def: RuleDef,
    program: Box<dyn RuleProgram>,
    log: SharedEventStream,
    commands: Arc<CommandQueue>,
    stats: Arc<RuleStats>,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.run_until_error(&mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    self.stats.error(format!("rule '{}': {e}", self.def.name));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn run_until_error(&mut self, stop: &mut watch::Receiver<bool>) -> Result<()> {
        let source = self.def.source.clone();
        let consumer = consumer_name(&self.def.name);
        let mut appended = self.log.watch(&source)?;
        let partitions = self.log.partitions(&source)?;
        let mut offsets = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            offsets.push(
                self.log
                    .committed(&consumer, &source, p)
                    .await?
                    .unwrap_or(0),
            );
        }
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            appended.borrow_and_update();
            let mut progressed = false;
            for p in 0..partitions {
                let records = self
                    .log
                    .read(&source, p, offsets[p as usize], READ_CHUNK)
                    .await?;
                let Some(end) = records.last().map(Record::end_offset) else {
                    continue;
                };
                let mut commands = Vec::new();
                for record in &records {
                    self.stats
                        .events_in
                        .fetch_add(record.batch.num_rows() as u64, Ordering::Relaxed);
                    match self.program.process(&record.batch) {
                        Ok(Some(out)) if out.num_rows() > 0 => {
                            self.stats
                                .rows_out
                                .fetch_add(out.num_rows() as u64, Ordering::Relaxed);
                            match rows_to_commands(&self.def.name, record, &out) {
                                Ok(rows) => {
                                    for c in rows {
                                        // One bad row (say, a payload over the limit) is
                                        // counted and skipped; it must not stall the rule.
                                        match CommandQueue::validate(&c) {
                                            Ok(()) => commands.push(c),
                                            Err(e) => self
                                                .stats
                                                .error(format!("rule '{}': {e}", self.def.name)),
                                        }
                                    }
                                }
                                Err(e) => self.stats.error(e),
                            }
                        }
                        Ok(_) => {}
                        // A batch the rule cannot process (say, a cast that
                        // fails on one value) is counted and skipped, so one
                        // bad event does not stop the rule for everyone.
                        Err(e) => self.stats.error(format!(
                            "events {}..{} of partition {p}: {e}",
                            record.offset,
                            record.end_offset()
                        )),
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
                self.log.commit(&consumer, &source, p, end).await?;
                offsets[p as usize] = end;
                progressed = true;
            }
            if !progressed {
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return Ok(()) },
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    }
}

/// Turns the rows of a rule into commands: column 1 is the device, column 2
/// the command name, column 3 (optional) the payload, sent as JSON.
pub fn rows_to_commands(
    rule: &str,
    input: &Record,
    out: &RecordBatch,
) -> Result<Vec<NewCommand>, String> {
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
            id: format!("{rule}:{}:{}:{row}", input.partition, input.offset),
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
        let input = Record {
            partition: 2,
            offset: 40,
            batch: out.clone(),
        };
        let cmds = rows_to_commands("hot", &input, &out).unwrap();
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
        fn process(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>, String> {
            let out = RecordBatch::try_from_iter(vec![
                ("device", batch.column(0).clone()),
                (
                    "name",
                    Arc::new(StringArray::from(vec!["set"; batch.num_rows()])) as _,
                ),
                ("payload", batch.column(3).clone()),
            ])
            .map_err(|e| e.to_string())?;
            Ok(Some(out))
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
