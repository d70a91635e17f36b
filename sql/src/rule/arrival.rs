//! What every stateful rule does first with the records it is given: one
//! batch per call, a pass over the watermarks that marks late events, and
//! the late events set aside for the late-events stream.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BooleanArray, PrimitiveArray, RecordBatch,
    RecordBatchOptions, StringArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{concat, filter_record_batch};
use arrow::datatypes::{
    DataType, Float64Type, Int64Type, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use arrow::error::ArrowError;
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
        many => match concat_records(many) {
            Ok(b) => Some(b),
            Err(e) => {
                skip(&e, out);
                None
            }
        },
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

/// The records of one call as one batch. Records are small (one frame
/// each), so the common column types are copied here, column by column,
/// without Arrow's per-array bookkeeping; other types and columns with
/// nulls go through `concat`.
fn concat_records(records: &[Record]) -> Result<RecordBatch, ArrowError> {
    let first = &records[0].batch;
    let rows = records.iter().map(|r| r.batch.num_rows()).sum();
    // Records of one stream usually share their schema: then the column
    // types need no checking, array by array.
    let typed = records
        .iter()
        .all(|r| Arc::ptr_eq(r.batch.schema_ref(), first.schema_ref()));
    let mut arrays: Vec<&dyn Array> = Vec::with_capacity(records.len());
    let mut columns = Vec::with_capacity(first.num_columns());
    for c in 0..first.num_columns() {
        arrays.clear();
        for r in records {
            let column = r.batch.columns().get(c).ok_or_else(|| {
                ArrowError::InvalidArgumentError(format!(
                    "record at offset {} has {} columns, not {}",
                    r.offset,
                    r.batch.num_columns(),
                    first.num_columns()
                ))
            })?;
            arrays.push(column.as_ref());
        }
        columns.push(concat_column(&arrays, rows, typed)?);
    }
    RecordBatch::try_new_with_options(
        first.schema(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}

/// One column of many records; `typed` when they are known to share its type.
fn concat_column(arrays: &[&dyn Array], rows: usize, typed: bool) -> Result<ArrayRef, ArrowError> {
    let ty = arrays[0].data_type();
    if arrays
        .iter()
        .all(|a| a.null_count() == 0 && (typed || a.data_type() == ty))
    {
        match ty {
            DataType::Utf8 => {
                if let Some(strings) = concat_strings(arrays, rows)? {
                    return Ok(Arc::new(strings));
                }
            }
            DataType::Float64 => return Ok(concat_values::<Float64Type>(arrays, rows, ty)),
            DataType::Int64 => return Ok(concat_values::<Int64Type>(arrays, rows, ty)),
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                return Ok(concat_values::<TimestampMillisecondType>(arrays, rows, ty));
            }
            _ => {}
        }
    }
    concat(arrays)
}

/// Primitive arrays of type `ty`, without nulls.
fn concat_values<T: ArrowPrimitiveType>(
    arrays: &[&dyn Array],
    rows: usize,
    ty: &DataType,
) -> ArrayRef {
    let mut values = Vec::with_capacity(rows);
    for a in arrays {
        values.extend_from_slice(a.as_primitive::<T>().values());
    }
    Arc::new(PrimitiveArray::<T>::new(values.into(), None).with_data_type(ty.clone()))
}

/// String arrays without nulls; `None` past 2 GiB of text.
fn concat_strings(arrays: &[&dyn Array], rows: usize) -> Result<Option<StringArray>, ArrowError> {
    let span = |s: &StringArray| {
        let o = s.value_offsets();
        (o[0] as usize, o[s.len()] as usize)
    };
    let bytes: usize = arrays
        .iter()
        .map(|a| {
            let (from, to) = span(a.as_string::<i32>());
            to - from
        })
        .sum();
    if bytes > i32::MAX as usize {
        return Ok(None);
    }
    let mut offsets = Vec::with_capacity(rows + 1);
    offsets.push(0i32);
    let mut data: Vec<u8> = Vec::with_capacity(bytes);
    for a in arrays {
        let s = a.as_string::<i32>();
        let (from, to) = span(s);
        // Fits: the total is below i32::MAX.
        let shift = data.len() as i32 - from as i32;
        offsets.extend(s.value_offsets()[1..].iter().map(|o| o + shift));
        data.extend_from_slice(&s.values()[from..to]);
    }
    StringArray::try_new(OffsetBuffer::new(offsets.into()), data.into(), None).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int32Array, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};

    fn record(offset: u64, batch: RecordBatch) -> Record {
        Record {
            partition: 0,
            offset,
            batch,
        }
    }

    /// The typed copies give what Arrow's own concatenation gives: sliced
    /// arrays, nulls, other types, separate but equal schemas.
    #[test]
    fn concatenated_records_equal_arrows_concatenation() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("x", DataType::Float64, true),
            Field::new("n", DataType::Int32, true),
        ]));
        let batch = |ids: Vec<Option<&str>>, xs: Vec<Option<f64>>| {
            let n = ids.len();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(ids)),
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values((0..n as i64).map(|t| t * 7))
                            .with_timezone("UTC"),
                    ),
                    Arc::new(Float64Array::from(xs)),
                    Arc::new(Int32Array::from_iter_values(0..n as i32)),
                ],
            )
            .unwrap()
        };
        let a = batch(vec![Some("a"), Some("bb"), Some("ccc")], vec![Some(1.0); 3]);
        let b = batch(vec![Some("dddd"), Some("é"), Some("f")], vec![Some(2.0); 3]).slice(1, 2);
        let c = batch(vec![Some("g"), None], vec![None, Some(3.0)]);
        // The same schema, not the same `Arc`.
        let d = RecordBatch::try_new(
            Arc::new(schema.as_ref().clone()),
            batch(vec![Some("h")], vec![Some(4.0)]).columns().to_vec(),
        )
        .unwrap();
        let cases = [
            vec![a.clone(), b.clone()],
            vec![a.clone(), b.clone(), c.clone()],
            vec![b.clone(), a.clone(), d.clone()],
            vec![c, d, a, b],
        ];
        for batches in cases {
            let records: Vec<Record> = batches
                .iter()
                .enumerate()
                .map(|(i, b)| record(i as u64, b.clone()))
                .collect();
            let ours = concat_records(&records).unwrap();
            let arrows = arrow::compute::concat_batches(&schema, &batches).unwrap();
            assert_eq!(ours, arrows);
        }
    }

    #[test]
    fn records_of_different_shapes_are_an_error_not_a_panic() {
        let one = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)])),
            vec![Arc::new(arrow::array::Int64Array::from(vec![1]))],
        )
        .unwrap();
        let two = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, false)])),
            vec![Arc::new(StringArray::from(vec!["1"]))],
        )
        .unwrap();
        let empty = RecordBatch::new_empty(Arc::new(Schema::empty()));
        assert!(concat_records(&[record(0, one.clone()), record(1, two)]).is_err());
        let e = concat_records(&[record(0, one), record(5, empty)]).unwrap_err();
        assert!(e.to_string().contains("offset 5"), "{e}");
    }
}
