//! Rules without windows: each event is filtered and projected on its own.

use arrow::array::{Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use tributary_engine::event::{RECEIVED_AT, TS};
use tributary_engine::log::Record;
use tributary_engine::rule::{Emitted, Output, RuleProgram};
use tributary_engine::snapshot::Snapshot;

use super::steps::{Step, run_steps};
use super::target::Target;

/// A compiled stateless rule.
pub struct StatelessProgram {
    pub(super) steps: Vec<Step>,
    pub(super) output: SchemaRef,
    pub(super) target: Target,
}

impl RuleProgram for StatelessProgram {
    fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String> {
        for record in records {
            // A record the rule cannot process (say, a cast that fails on one
            // value) is counted and skipped: one bad event must not stop the
            // rule for everyone.
            match self.run(record) {
                Ok(Some(rows)) => out.rows.push(rows),
                Ok(None) => {}
                Err(e) => out.errors.push(format!(
                    "events {}..{} of partition {}: {e}",
                    record.offset,
                    record.end_offset(),
                    record.partition
                )),
            }
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>, String> {
        let mut s = Snapshot::new();
        s.put_json(PROGRAM, &KIND)?;
        Ok(Some(s))
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        match snapshot.json::<String>(PROGRAM) {
            Ok(kind) if kind == KIND => Ok(()),
            _ => Err("the checkpoint is of a rule with state; this one has none".into()),
        }
    }
}

/// The snapshot part naming the kind of program, and this program's kind.
const PROGRAM: &str = "program";
const KIND: &str = "stateless";

impl StatelessProgram {
    fn run(&self, record: &Record) -> Result<Option<Emitted>, String> {
        let Some((batch, rows)) =
            run_steps(&self.steps, &record.batch).map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        if batch.num_columns() != self.output.fields().len() {
            return Err("rule produced a different number of columns than planned".into());
        }
        let batch = RecordBatch::try_new(self.output.clone(), batch.columns().to_vec())
            .map_err(|e| e.to_string())?;
        let ids: Vec<String> = rows
            .values()
            .iter()
            .map(|r| format!("{}:{}:{r}", record.partition, record.offset))
            .collect();
        let times = time_column(&record.batch, TS);
        let times = rows
            .values()
            .iter()
            .map(|r| times.value(*r as usize))
            .collect();
        let now = time_column(&record.batch, RECEIVED_AT)
            .iter()
            .flatten()
            .max()
            .unwrap_or(0);
        self.target.emit(batch, ids, times, now).map(Some)
    }
}

/// A system time column of an event batch (always present, never null).
pub(super) fn time_column(batch: &RecordBatch, name: &str) -> TimestampMillisecondArray {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
        .cloned()
        .unwrap_or_else(|| TimestampMillisecondArray::from(vec![0; batch.num_rows()]))
}
