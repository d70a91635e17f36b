//! What every stateful rule does first with the records it is given: one
//! batch per call, a pass over the watermarks that marks late events, and
//! the late events set aside for the late-events stream.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use tributary_engine::event::{DEVICE_ID, RECEIVED_AT, TS};
use tributary_engine::log::Record;
use tributary_engine::rule::Output;

use super::stateless::time_column;
use crate::window::Watermarks;

type DfResult<T> = datafusion::error::Result<T>;

/// What the watermark pass found in the first `taken` rows of a batch.
pub struct Arrival {
    /// Rows looked at. A per-device rule stops after the row at which a
    /// device went silent, so the caller can act on that (close its windows,
    /// release its rows) before later rows are judged against its watermark:
    /// the same events then give the same rows however they are batched.
    pub taken: usize,
    /// Per row: whether it came after its watermark.
    pub late: Vec<bool>,
    /// Per row: its device, as the watermarks number devices.
    pub devices: Vec<u32>,
    /// The devices seen, each once.
    pub touched: Vec<u32>,
}

/// Runs the watermarks over a batch of events, in arrival order.
pub fn observe(
    watermarks: &mut Watermarks,
    raw: &RecordBatch,
    per_device: bool,
) -> DfResult<Arrival> {
    let rows = raw.num_rows();
    let ids = raw
        .column_by_name(DEVICE_ID)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| DataFusionError::Internal("events without device_id".into()))?;
    let ts = time_column(raw, TS);
    let received = time_column(raw, RECEIVED_AT);
    let mut arrival = Arrival {
        taken: rows,
        late: Vec::with_capacity(rows),
        devices: Vec::with_capacity(rows),
        touched: Vec::new(),
    };
    let mut device = u32::MAX;
    let mut now = watermarks.now();
    for i in 0..rows {
        if i == 0 || ids.value(i) != ids.value(i - 1) {
            device = watermarks.device(ids.value(i));
            arrival.touched.push(device);
        }
        arrival
            .late
            .push(watermarks.observe(device, ts.value(i), received.value(i), per_device));
        arrival.devices.push(device);
        // A device can only fall silent when the arrival clock moves.
        if per_device && received.value(i) > now {
            now = received.value(i);
            let silent = watermarks.silent();
            if !silent.is_empty() {
                // The caller's close or release collects them.
                watermarks.requeue_silent(silent);
                arrival.taken = i + 1;
                break;
            }
        }
    }
    arrival.touched.sort_unstable();
    arrival.touched.dedup();
    Ok(arrival)
}

/// Sets the late rows aside (in the late-events stream's schema, naming the
/// rule) and returns the others.
pub fn split_late(
    raw: &RecordBatch,
    late: &[bool],
    rule: &str,
    late_schema: &SchemaRef,
    out: &mut Output,
) -> DfResult<RecordBatch> {
    if !late.contains(&true) {
        return Ok(raw.clone());
    }
    let mask = BooleanArray::from(late.to_vec());
    let late_rows = filter_record_batch(raw, &mask)?;
    let mut columns = late_rows.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![
        rule;
        late_rows.num_rows()
    ])));
    out.late
        .push(RecordBatch::try_new(late_schema.clone(), columns)?);
    Ok(filter_record_batch(raw, &arrow::compute::not(&mask)?)?)
}

/// Keeps the entries of `values` whose row was on time.
pub fn on_time<T: Copy>(values: &[T], late: &[bool]) -> Vec<T> {
    values
        .iter()
        .zip(late)
        .filter(|(_, l)| !**l)
        .map(|(v, _)| *v)
        .collect()
}

/// Feeds the records of one call to `ingest` in pieces (it returns how many
/// rows it took), calling `after` after each piece and once when there is
/// nothing to ingest. A piece that fails is counted in `out.errors` and the
/// rest of the call skipped: the events stay in the log and in Parquet.
pub fn in_pieces<P>(
    program: &mut P,
    records: &[Record],
    out: &mut Output,
    mut ingest: impl FnMut(&mut P, &RecordBatch, u32, u64, &mut Output) -> DfResult<usize>,
    mut after: impl FnMut(&mut P, &mut Output),
) {
    let skip = |e: &dyn std::fmt::Display, out: &mut Output| {
        let (from, to) = (
            records.first().map_or(0, |r| r.offset),
            records.last().map_or(0, Record::end_offset),
        );
        out.errors.push(format!("events {from}..{to}: {e}"));
    };
    let raw = match records {
        [] => None,
        [one] => Some(one.batch.clone()),
        [first, ..] => {
            match concat_batches(&first.batch.schema(), records.iter().map(|r| &r.batch)) {
                Ok(b) => Some(b),
                Err(e) => {
                    skip(&e, out);
                    None
                }
            }
        }
    };
    let Some(raw) = raw else {
        after(program, out);
        return;
    };
    let (partition, offset) = (records[0].partition, records[0].offset);
    let mut start = 0;
    loop {
        let rest = raw.slice(start, raw.num_rows() - start);
        match ingest(program, &rest, partition, offset + start as u64, out) {
            Ok(taken) => start += taken.max(1),
            Err(e) => {
                skip(&e, out);
                start = raw.num_rows();
            }
        }
        after(program, out);
        if start >= raw.num_rows() {
            return;
        }
    }
}
