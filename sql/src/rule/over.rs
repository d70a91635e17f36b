//! Rules with `OVER (PARTITION BY ... ORDER BY ts ...)`: one output row per
//! event, with `lag`, `row_number` or an aggregate over a frame of earlier
//! events of the same partition (`RANGE BETWEEN INTERVAL '1' MINUTE PRECEDING
//! AND CURRENT ROW`, `ROWS BETWEEN 9 PRECEDING AND CURRENT ROW`, or from the
//! partition's start).
//!
//! Results must not depend on the order events arrive in within the
//! watermark delay, so an event waits until its watermark passes it; then the
//! events released are taken per partition in event-time order. The frame
//! keeps the arguments of the events inside it, and an accumulator that adds
//! the newest and retracts the oldest.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions, StringArray,
    TimestampMillisecondArray, UInt32Array, new_empty_array,
};
use arrow::compute::{concat, concat_batches, filter_record_batch, not, take_record_batch};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use tributary_engine::log::Record;
use tributary_engine::rule::{Output, ProgramStats, RuleProgram};
use tributary_engine::snapshot::{Snapshot, split_by};

use super::arrival;
use super::steps::{Step, run_steps};
use super::target::Target;
use crate::window::Watermarks;

type DfResult<T> = datafusion::error::Result<T>;

/// The frame of an aggregate OVER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The current row and this many before it (None: all before it).
    Rows(Option<u64>),
    /// Rows whose `ts` is within this many ms before the current row's, and
    /// its peers (None: all before it).
    Range(Option<i64>),
}

/// One function computed OVER the partition.
#[derive(Debug, Clone)]
pub enum OverFn {
    Lag {
        arg: Arc<dyn PhysicalExpr>,
        offset: usize,
        default: ScalarValue,
    },
    RowNumber,
    Aggregate {
        expr: Arc<AggregateFunctionExpr>,
        args: Vec<Arc<dyn PhysicalExpr>>,
        frame: Frame,
    },
}

/// What one partition remembers for one function.
#[derive(Debug)]
enum FnState {
    Lag(VecDeque<ScalarValue>),
    RowNumber(u64),
    Aggregate {
        accumulator: Box<dyn Accumulator>,
        /// Event time and arguments of each row in the frame.
        frame: VecDeque<(i64, Vec<ArrayRef>)>,
    },
}

/// A compiled OVER rule.
pub struct OverProgram {
    pub(super) rule: String,
    pub(super) pre: Vec<Step>,
    pub(super) keys: Vec<Arc<dyn PhysicalExpr>>,
    pub(super) device_key: Option<usize>,
    pub(super) order: Arc<dyn PhysicalExpr>,
    pub(super) functions: Vec<OverFn>,
    /// One data type per function: the output column's.
    pub(super) types: Vec<DataType>,
    pub(super) window_schema: SchemaRef,
    pub(super) post: Vec<Step>,
    pub(super) output: SchemaRef,
    pub(super) target: Target,
    pub(super) late_schema: SchemaRef,
    pub(super) converter: RowConverter,
    pub(super) watermarks: Watermarks,
    /// Rows waiting for their watermark, and per row: event time, device
    /// (or none), partition and offset.
    pending: Vec<RecordBatch>,
    meta: Vec<(i64, u32, u32, u64)>,
    partitions: HashMap<Box<[u8]>, Vec<FnState>>,
    late_events: u64,
}

impl OverProgram {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        rule: String,
        pre: Vec<Step>,
        keys: (Vec<Arc<dyn PhysicalExpr>>, Vec<SortField>, Option<usize>),
        order: Arc<dyn PhysicalExpr>,
        functions: Vec<OverFn>,
        types: Vec<DataType>,
        window_schema: SchemaRef,
        post: Vec<Step>,
        output: SchemaRef,
        target: Target,
        late_schema: SchemaRef,
        watermarks: Watermarks,
    ) -> DfResult<Self> {
        let (keys, fields, device_key) = keys;
        Ok(OverProgram {
            rule,
            pre,
            keys,
            device_key,
            order,
            functions,
            types,
            window_schema,
            post,
            output,
            target,
            late_schema,
            converter: RowConverter::new(fields)?,
            watermarks,
            pending: Vec::new(),
            meta: Vec::new(),
            partitions: HashMap::new(),
            late_events: 0,
        })
    }

    fn per_device(&self) -> bool {
        self.device_key.is_some()
    }

    /// Watermarks, late events and pending rows for raw rows starting at
    /// `offset` of `partition`. A per-device rule stops after the row at
    /// which a device went silent, so that the caller releases that device's
    /// rows (raising its watermark) before later rows are judged against its
    /// watermark: the same events give the same rows however they are
    /// batched. Returns the number of rows taken.
    fn ingest(
        &mut self,
        raw: &RecordBatch,
        partition: u32,
        offset: u64,
        out: &mut Output,
    ) -> DfResult<usize> {
        if raw.num_rows() == 0 {
            return Ok(0);
        }
        let per_device = self.per_device();
        let arrival = arrival::observe(&mut self.watermarks, raw, per_device)?;
        let taken = arrival.taken;
        let raw = raw.slice(0, taken);
        self.late_events += arrival.late.iter().filter(|l| **l).count() as u64;
        // Each on-time row's index in `raw`, for its offset.
        let positions: Vec<u32> = (0..taken as u32).collect();
        let kept_rows = UInt32Array::from(arrival::on_time(&positions, &arrival.late));
        let raw = arrival::split_late(&raw, &arrival.late, &self.rule, &self.late_schema, out)?;
        let Some((input, rows)) = run_steps(&self.pre, &raw)? else {
            return Ok(taken);
        };
        let n = input.num_rows();
        let order = self.order.evaluate(&input)?.into_array(n)?;
        let order = order
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("ORDER BY ts".into()))?;
        let device_names = match self.device_key {
            Some(k) => {
                let c = self.keys[k].evaluate(&input)?.into_array(n)?;
                Some(arrow::compute::cast(&c, &DataType::Utf8)?)
            }
            None => None,
        };
        let device_names = device_names
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        for (i, row) in rows.values().iter().enumerate() {
            let device = match device_names {
                Some(names) if !names.is_null(i) => self.watermarks.device(names.value(i)),
                _ => u32::MAX,
            };
            let original = kept_rows.value(*row as usize);
            self.meta.push((
                order.value(i),
                device,
                partition,
                offset + u64::from(original),
            ));
        }
        self.pending.push(input);
        Ok(taken)
    }

    /// Releases rows; a failure while evaluating them is counted and those
    /// rows are skipped, never returned as fatal (the runtime would re-feed
    /// input already taken in).
    fn release_or_count(&mut self, out: &mut Output) {
        if let Err(e) = self.release(out) {
            out.errors.push(format!("evaluating OVER: {e}"));
        }
    }

    /// Evaluates and emits the pending rows the watermarks have passed.
    fn release(&mut self, out: &mut Output) -> DfResult<()> {
        for d in self.watermarks.silent() {
            // A silent device's rows need not wait for more of its events.
            if let Some(max) = self.meta.iter().filter(|m| m.1 == d).map(|m| m.0).max() {
                self.watermarks.raise(d, max.saturating_add(1));
            }
        }
        if self.meta.is_empty() {
            return Ok(());
        }
        let global = self.watermarks.global_watermark();
        let ready: Vec<bool> = self
            .meta
            .iter()
            .map(|(ts, device, _, _)| {
                let wm = if *device == u32::MAX {
                    global
                } else {
                    self.watermarks.device_watermark(*device)
                };
                *ts < wm
            })
            .collect();
        if !ready.iter().any(|r| *r) {
            return Ok(());
        }
        let all = concat_batches(&self.pending[0].schema(), &self.pending)?;
        let mask = BooleanArray::from(ready.clone());
        let released = filter_record_batch(&all, &mask)?;
        let meta: Vec<_> = self
            .meta
            .iter()
            .zip(&ready)
            .filter(|(_, r)| **r)
            .map(|(m, _)| *m)
            .collect();
        let left = filter_record_batch(&all, &not(&mask)?)?;
        self.meta = self
            .meta
            .iter()
            .zip(&ready)
            .filter(|(_, r)| !**r)
            .map(|(m, _)| *m)
            .collect();
        self.pending = if left.num_rows() > 0 {
            vec![left]
        } else {
            Vec::new()
        };
        self.evaluate(released, meta, out)
    }

    fn evaluate(
        &mut self,
        released: RecordBatch,
        meta: Vec<(i64, u32, u32, u64)>,
        out: &mut Output,
    ) -> DfResult<()> {
        let n = released.num_rows();
        let keys = self
            .keys
            .iter()
            .map(|k| k.evaluate(&released)?.into_array(n))
            .collect::<DfResult<Vec<_>>>()?;
        let rows = if keys.is_empty() {
            None
        } else {
            Some(self.converter.convert_columns(&keys)?)
        };
        let key_of = |i: usize| rows.as_ref().map_or(&[][..], |r| r.row(i).data());
        // Each partition in event-time order (arrival breaks ties).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| {
            (key_of(*a), meta[*a].0, meta[*a].3).cmp(&(key_of(*b), meta[*b].0, meta[*b].3))
        });
        let sorted = take_record_batch(
            &released,
            &UInt32Array::from_iter_values(order.iter().map(|i| *i as u32)),
        )?;
        let args: Vec<Vec<ArrayRef>> = self
            .functions
            .iter()
            .map(|f| match f {
                OverFn::Lag { arg, .. } => Ok(vec![arg.evaluate(&sorted)?.into_array(n)?]),
                OverFn::RowNumber => Ok(Vec::new()),
                OverFn::Aggregate { args, .. } => args
                    .iter()
                    .map(|a| a.evaluate(&sorted)?.into_array(n))
                    .collect(),
            })
            .collect::<DfResult<_>>()?;
        let mut values: Vec<Vec<ScalarValue>> = vec![Vec::with_capacity(n); self.functions.len()];
        let mut i = 0;
        while i < n {
            // A peer group: same partition, same event time.
            let key = key_of(order[i]).to_vec();
            let ts = meta[order[i]].0;
            let mut j = i + 1;
            while j < n && meta[order[j]].0 == ts && key_of(order[j]) == key.as_slice() {
                j += 1;
            }
            if !self.partitions.contains_key(key.as_slice()) {
                let states = self
                    .functions
                    .iter()
                    .map(new_state)
                    .collect::<DfResult<Vec<_>>>()?;
                self.partitions
                    .insert(key.clone().into_boxed_slice(), states);
            }
            let states = self
                .partitions
                .get_mut(key.as_slice())
                .ok_or_else(|| DataFusionError::Internal("partition".into()))?;
            for (f, (function, state)) in self.functions.iter().zip(states.iter_mut()).enumerate() {
                step(function, state, &args[f], i, j, ts, &mut values[f])?;
            }
            i = j;
        }
        let mut columns = sorted.columns().to_vec();
        for (v, ty) in values.into_iter().zip(&self.types) {
            columns.push(to_array(v, ty)?);
        }
        let batch = RecordBatch::try_new(self.window_schema.clone(), columns)?;
        let Some((batch, kept)) = run_steps(&self.post, &batch)? else {
            return Ok(());
        };
        let batch = RecordBatch::try_new(self.output.clone(), batch.columns().to_vec())?;
        let ids: Vec<String> = kept
            .values()
            .iter()
            .map(|r| {
                let m = meta[order[*r as usize]];
                format!("o:{}:{}", m.2, m.3)
            })
            .collect();
        let times = kept
            .values()
            .iter()
            .map(|r| meta[order[*r as usize]].0)
            .collect();
        let emitted = self
            .target
            .emit(batch, ids, times, self.watermarks.now())
            .map_err(DataFusionError::Execution)?;
        out.rows.push(emitted);
        Ok(())
    }
}

fn new_state(f: &OverFn) -> DfResult<FnState> {
    Ok(match f {
        OverFn::Lag { .. } => FnState::Lag(VecDeque::new()),
        OverFn::RowNumber => FnState::RowNumber(0),
        OverFn::Aggregate { expr, frame, .. } => FnState::Aggregate {
            accumulator: new_accumulator(expr, *frame)?,
            frame: VecDeque::new(),
        },
    })
}

fn new_accumulator(expr: &AggregateFunctionExpr, frame: Frame) -> DfResult<Box<dyn Accumulator>> {
    if bounded(frame) {
        expr.create_sliding_accumulator()
    } else {
        expr.create_accumulator()
    }
}

/// Values of one type as an array of `ty` (also when there are none).
fn to_array(values: Vec<ScalarValue>, ty: &DataType) -> DfResult<ArrayRef> {
    let array = if values.is_empty() {
        new_empty_array(ty)
    } else {
        ScalarValue::iter_to_array(values)?
    };
    Ok(if array.data_type() == ty {
        array
    } else {
        arrow::compute::cast(&array, ty)?
    })
}

/// Whether a frame drops old rows (and so needs an accumulator that retracts).
pub fn bounded(frame: Frame) -> bool {
    matches!(frame, Frame::Rows(Some(_)) | Frame::Range(Some(_)))
}

/// Computes one function for the peer rows `from..to` (sorted order).
fn step(
    function: &OverFn,
    state: &mut FnState,
    args: &[ArrayRef],
    from: usize,
    to: usize,
    ts: i64,
    values: &mut Vec<ScalarValue>,
) -> DfResult<()> {
    match (function, state) {
        (
            OverFn::Lag {
                offset, default, ..
            },
            FnState::Lag(history),
        ) => {
            for r in from..to {
                let v = if history.len() >= *offset && *offset > 0 {
                    history[history.len() - offset].clone()
                } else if *offset == 0 {
                    ScalarValue::try_from_array(&args[0], r)?
                } else {
                    default.clone()
                };
                values.push(v);
                history.push_back(ScalarValue::try_from_array(&args[0], r)?);
                while history.len() > *offset {
                    history.pop_front();
                }
            }
        }
        (OverFn::RowNumber, FnState::RowNumber(n)) => {
            for _ in from..to {
                *n += 1;
                values.push(ScalarValue::UInt64(Some(*n)));
            }
        }
        (
            OverFn::Aggregate { frame, .. },
            FnState::Aggregate {
                accumulator,
                frame: rows,
            },
        ) => {
            let row_args =
                |r: usize| -> Vec<ArrayRef> { args.iter().map(|a| a.slice(r, 1)).collect() };
            match frame {
                Frame::Range(range) => {
                    // Peers enter together, then the frame is trimmed.
                    for r in from..to {
                        let a = row_args(r);
                        accumulator.update_batch(&a)?;
                        if range.is_some() {
                            rows.push_back((ts, a));
                        }
                    }
                    if let Some(range) = range {
                        while rows.front().is_some_and(|(t, _)| *t < ts - range) {
                            if let Some((_, a)) = rows.pop_front() {
                                accumulator.retract_batch(&a)?;
                            }
                        }
                    }
                    let v = accumulator.evaluate()?;
                    for _ in from..to {
                        values.push(v.clone());
                    }
                }
                Frame::Rows(preceding) => {
                    for r in from..to {
                        let a = row_args(r);
                        accumulator.update_batch(&a)?;
                        if let Some(p) = preceding {
                            rows.push_back((ts, a));
                            while rows.len() as u64 > p + 1 {
                                if let Some((_, a)) = rows.pop_front() {
                                    accumulator.retract_batch(&a)?;
                                }
                            }
                        }
                        values.push(accumulator.evaluate()?);
                    }
                }
            }
        }
        _ => return Err(DataFusionError::Internal("OVER state mismatch".into())),
    }
    Ok(())
}

/// The snapshot part that names the kind of program and its plan.
const PROGRAM: &str = "program";
const KIND: &str = "over";
/// The prefix of the watermarks' parts.
const WATERMARKS: &str = "wm";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedProgram {
    kind: String,
    signature: String,
    late_events: u64,
}

/// Snapshot errors are text (they end up in the rule's last error).
fn text(e: DataFusionError) -> String {
    e.to_string()
}

/// An accumulator in the state `saved` (what `state()` returned) whose frame
/// holds `rows`.
///
/// Merging the saved state into a new accumulator is exact for sums,
/// averages and variances, floats included, but a sliding min or max keeps
/// its whole frame in a queue that its state (the current minimum) does not
/// hold, and would retract the wrong values. Replaying the frame's rows
/// rebuilds that queue exactly, and a sliding float sum only up to rounding:
/// so a bounded frame is replayed, and the saved state merged instead when
/// the replay does not come to the same state.
fn revive(
    expr: &AggregateFunctionExpr,
    frame: Frame,
    saved: &[ScalarValue],
    rows: &VecDeque<(i64, Vec<ArrayRef>)>,
) -> DfResult<Box<dyn Accumulator>> {
    let replay = || -> DfResult<Box<dyn Accumulator>> {
        let mut accumulator = new_accumulator(expr, frame)?;
        for (_, args) in rows {
            accumulator.update_batch(args)?;
        }
        Ok(accumulator)
    };
    // `state()` may consume the state: the replay that is kept is a new one.
    if bounded(frame) && replay()?.state()? == saved {
        return replay();
    }
    let mut accumulator = new_accumulator(expr, frame)?;
    let saved = saved
        .iter()
        .map(ScalarValue::to_array)
        .collect::<DfResult<Vec<_>>>()?;
    accumulator.merge_batch(&saved)?;
    Ok(accumulator)
}

impl OverProgram {
    /// The plan as text, to refuse a checkpoint of another plan: what shapes
    /// the state (the input columns, partition keys, functions and frames,
    /// time options) and what the rows become.
    fn signature(&self) -> String {
        let list = |items: Vec<String>| items.join(", ");
        let fields = |schema: &Schema| {
            list(
                schema
                    .fields()
                    .iter()
                    .map(|f| format!("{}: {}", f.name(), f.data_type()))
                    .collect(),
            )
        };
        let functions = self
            .functions
            .iter()
            .map(|f| match f {
                OverFn::Lag {
                    arg,
                    offset,
                    default,
                } => format!("lag({arg}, {offset}, {default:?})"),
                OverFn::RowNumber => "row_number()".into(),
                OverFn::Aggregate { expr, frame, .. } => format!("{} {frame:?}", expr.name()),
            })
            .collect();
        format!(
            "over [{}] of [{}] partition by [{}] (device key {:?}) order by {} | before [{}] | after [{}] | output [{}] | {:?}",
            list(functions),
            fields(&self.input_schema()),
            list(self.keys.iter().map(|k| k.to_string()).collect()),
            self.device_key,
            self.order,
            list(self.pre.iter().map(|s| s.to_string()).collect()),
            list(self.post.iter().map(|s| s.to_string()).collect()),
            fields(&self.output),
            self.watermarks.options(),
        )
    }

    /// The columns of pending rows: the window's input.
    fn input_schema(&self) -> Schema {
        let fields = self.window_schema.fields();
        let n = fields.len().saturating_sub(self.functions.len());
        Schema::new(fields[..n].to_vec())
    }

    fn save_pending(&self, s: &mut Snapshot) -> Result<(), String> {
        let columns = match self.pending.first() {
            None => self
                .input_schema()
                .fields()
                .iter()
                .map(|f| new_empty_array(f.data_type()))
                .collect(),
            Some(first) => concat_batches(&first.schema(), &self.pending)
                .map_err(|e| e.to_string())?
                .columns()
                .to_vec(),
        };
        s.put_arrays("pending", columns)?;
        let column =
            |f: fn(&(i64, u32, u32, u64)) -> i64| -> Vec<i64> { self.meta.iter().map(f).collect() };
        s.put_i64s("pending.ts", &column(|m| m.0))?;
        let devices: Vec<u32> = self.meta.iter().map(|m| m.1).collect();
        s.put_u32s("pending.device", &devices)?;
        let partitions: Vec<u32> = self.meta.iter().map(|m| m.2).collect();
        s.put_u32s("pending.partition", &partitions)?;
        let offsets: Vec<u64> = self.meta.iter().map(|m| m.3).collect();
        s.put_u64s("pending.offset", &offsets)
    }

    /// Saves each partition's function states, in key order. An accumulator
    /// whose state was taken is replaced by the one a restore makes of it.
    fn save_partitions(&mut self, s: &mut Snapshot) -> Result<(), String> {
        let input = self.input_schema();
        let mut partitions: Vec<(&Box<[u8]>, &mut Vec<FnState>)> =
            self.partitions.iter_mut().collect();
        partitions.sort_by(|a, b| a.0.cmp(b.0));
        // Keys as typed columns: Arrow's row format is not promised to stay
        // the same from one Arrow version to the next.
        s.put_u64s("keys.count", &[partitions.len() as u64])?;
        let key_columns = if self.keys.is_empty() || partitions.is_empty() {
            Vec::new()
        } else {
            let parser = self.converter.parser();
            self.converter
                .convert_rows(partitions.iter().map(|(k, _)| parser.parse(k)))
                .map_err(|e| e.to_string())?
        };
        s.put_arrays("keys", key_columns)?;
        for (f, function) in self.functions.iter().enumerate() {
            let part = |name: &str| format!("fn{f}.{name}");
            let mismatch = || format!("OVER function {} has the state of another", f + 1);
            match function {
                OverFn::Lag { arg, .. } => {
                    let mut lens = Vec::with_capacity(partitions.len());
                    let mut values = Vec::new();
                    for (_, states) in &partitions {
                        let Some(FnState::Lag(history)) = states.get(f) else {
                            return Err(mismatch());
                        };
                        lens.push(history.len() as u32);
                        values.extend(history.iter().cloned());
                    }
                    let ty = arg.data_type(&input).map_err(text)?;
                    s.put_u32s(&part("len"), &lens)?;
                    s.put_arrays(&part("values"), vec![to_array(values, &ty).map_err(text)?])?;
                }
                OverFn::RowNumber => {
                    let mut counts = Vec::with_capacity(partitions.len());
                    for (_, states) in &partitions {
                        let Some(FnState::RowNumber(n)) = states.get(f) else {
                            return Err(mismatch());
                        };
                        counts.push(*n);
                    }
                    s.put_u64s(&part("count"), &counts)?;
                }
                OverFn::Aggregate { expr, args, frame } => {
                    let fields = expr.state_fields().map_err(text)?;
                    let mut state: Vec<Vec<ScalarValue>> = vec![Vec::new(); fields.len()];
                    let mut lens = Vec::with_capacity(partitions.len());
                    let mut times = Vec::new();
                    let mut frame_args: Vec<Vec<ArrayRef>> = vec![Vec::new(); args.len()];
                    for (_, states) in partitions.iter_mut() {
                        let Some(FnState::Aggregate {
                            accumulator,
                            frame: rows,
                        }) = states.get_mut(f)
                        else {
                            return Err(mismatch());
                        };
                        let values = accumulator.state().map_err(text)?;
                        if values.len() != fields.len() {
                            return Err(format!(
                                "{}: a state of {} values, expected {}",
                                expr.name(),
                                values.len(),
                                fields.len()
                            ));
                        }
                        *accumulator = revive(expr, *frame, &values, rows).map_err(text)?;
                        for (column, v) in state.iter_mut().zip(values) {
                            column.push(v);
                        }
                        lens.push(rows.len() as u32);
                        for (ts, row) in rows.iter() {
                            times.push(*ts);
                            for (column, a) in frame_args.iter_mut().zip(row) {
                                column.push(a.clone());
                            }
                        }
                    }
                    let state = state
                        .into_iter()
                        .zip(&fields)
                        .map(|(v, field)| to_array(v, field.data_type()))
                        .collect::<DfResult<Vec<_>>>()
                        .map_err(text)?;
                    s.put_arrays(&part("state"), state)?;
                    s.put_u32s(&part("frame.len"), &lens)?;
                    s.put_i64s(&part("frame.ts"), &times)?;
                    let frame_args = frame_args
                        .iter()
                        .zip(args)
                        .map(|(pieces, arg)| match pieces.as_slice() {
                            [] => Ok(new_empty_array(&arg.data_type(&input)?)),
                            pieces => {
                                let pieces: Vec<&dyn Array> =
                                    pieces.iter().map(|a| a.as_ref()).collect();
                                Ok(concat(&pieces)?)
                            }
                        })
                        .collect::<DfResult<Vec<_>>>()
                        .map_err(text)?;
                    s.put_arrays(&part("frame.args"), frame_args)?;
                }
            }
        }
        Ok(())
    }

    /// The pending rows and their event time, device, partition and offset;
    /// devices are numbered as in `watermarks`.
    #[allow(clippy::type_complexity)]
    fn load_pending(
        &self,
        s: &Snapshot,
        watermarks: &Watermarks,
    ) -> Result<(Vec<RecordBatch>, Vec<(i64, u32, u32, u64)>), String> {
        let input = Arc::new(self.input_schema());
        let columns = s.arrays("pending", Some(input.fields().len()))?;
        for (column, field) in columns.iter().zip(input.fields()) {
            if column.data_type() != field.data_type() {
                return Err(format!(
                    "the saved pending rows' column '{}' holds {}, the rule reads {}",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                ));
            }
        }
        let rows = columns.first().map_or(0, |c| c.len());
        let ts = s.i64s("pending.ts")?;
        let devices = s.u32s("pending.device")?;
        let partitions = s.u32s("pending.partition")?;
        let offsets = s.u64s("pending.offset")?;
        if [ts.len(), devices.len(), partitions.len(), offsets.len()] != [rows; 4] {
            return Err(format!(
                "the saved pending rows are damaged: {rows} rows, but {} event times, {} devices, {} partitions and {} offsets",
                ts.len(),
                devices.len(),
                partitions.len(),
                offsets.len()
            ));
        }
        if let Some(d) = devices
            .iter()
            .find(|d| **d != u32::MAX && **d as usize >= watermarks.len())
        {
            return Err(format!(
                "the saved pending rows are damaged: device {d} of {}",
                watermarks.len()
            ));
        }
        let meta = (0..rows)
            .map(|i| (ts[i], devices[i], partitions[i], offsets[i]))
            .collect();
        if rows == 0 {
            return Ok((Vec::new(), meta));
        }
        let batch = RecordBatch::try_new_with_options(
            input,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .map_err(|e| format!("the saved pending rows: {e}"))?;
        Ok((vec![batch], meta))
    }

    /// The saved partition keys, in Arrow's row format.
    fn load_keys(&self, s: &Snapshot) -> Result<Vec<Box<[u8]>>, String> {
        let count = match s.u64s("keys.count")?.as_slice() {
            [n] => *n as usize,
            _ => return Err("the saved partition keys are damaged: no count".into()),
        };
        let columns = s.arrays("keys", None)?;
        if columns.is_empty() {
            return if count == 0 || (self.keys.is_empty() && count == 1) {
                Ok(vec![Box::default(); count])
            } else {
                Err(format!(
                    "the saved partition keys are damaged: {count} keys without values"
                ))
            };
        }
        if columns.len() != self.keys.len() || columns.iter().any(|c| c.len() != count) {
            return Err(format!(
                "the saved partition keys are damaged: {} columns for {} keys",
                columns.len(),
                self.keys.len()
            ));
        }
        let rows = self
            .converter
            .convert_columns(&columns)
            .map_err(|e| format!("the saved partition keys do not fit this rule: {e}"))?;
        Ok(rows.iter().map(|r| r.data().into()).collect())
    }

    fn load_partitions(&self, s: &Snapshot) -> Result<HashMap<Box<[u8]>, Vec<FnState>>, String> {
        let input = self.input_schema();
        let keys = self.load_keys(s)?;
        let n = keys.len();
        let mut states: Vec<Vec<FnState>> = (0..n)
            .map(|_| Vec::with_capacity(self.functions.len()))
            .collect();
        for (f, function) in self.functions.iter().enumerate() {
            let part = |name: &str| format!("fn{f}.{name}");
            let damaged = |what: &str| {
                format!(
                    "the saved state of OVER function {} is damaged: {what}",
                    f + 1
                )
            };
            let of_type = |array: &ArrayRef, ty: &DataType, what: &str| {
                if array.data_type() == ty {
                    Ok(())
                } else {
                    Err(damaged(&format!(
                        "{what} of type {}, expected {ty}",
                        array.data_type()
                    )))
                }
            };
            let scalars = |array: &ArrayRef| {
                (0..array.len())
                    .map(|i| ScalarValue::try_from_array(array, i))
                    .collect::<DfResult<Vec<_>>>()
                    .map_err(text)
            };
            match function {
                OverFn::Lag { arg, offset, .. } => {
                    let lens = s.u32s(&part("len"))?;
                    if lens.len() != n {
                        return Err(damaged(&format!(
                            "{} histories for {n} partitions",
                            lens.len()
                        )));
                    }
                    if lens.iter().any(|l| *l as usize > *offset) {
                        return Err(damaged("a history longer than the lag"));
                    }
                    let values = s.arrays(&part("values"), Some(1))?.remove(0);
                    of_type(&values, &arg.data_type(&input).map_err(text)?, "values")?;
                    let histories = split_by(&part("len"), &lens, scalars(&values)?)?;
                    for (states, history) in states.iter_mut().zip(histories) {
                        states.push(FnState::Lag(history.into()));
                    }
                }
                OverFn::RowNumber => {
                    let counts = s.u64s(&part("count"))?;
                    if counts.len() != n {
                        return Err(damaged(&format!(
                            "{} counts for {n} partitions",
                            counts.len()
                        )));
                    }
                    for (states, count) in states.iter_mut().zip(counts) {
                        states.push(FnState::RowNumber(count));
                    }
                }
                OverFn::Aggregate { expr, args, frame } => {
                    let fields = expr.state_fields().map_err(text)?;
                    let state = s.arrays(&part("state"), Some(fields.len()))?;
                    for (array, field) in state.iter().zip(&fields) {
                        of_type(array, field.data_type(), "a state")?;
                        if array.len() != n {
                            return Err(damaged(&format!(
                                "{} states for {n} partitions",
                                array.len()
                            )));
                        }
                    }
                    let lens = s.u32s(&part("frame.len"))?;
                    let times = s.i64s(&part("frame.ts"))?;
                    let frame_args = s.arrays(&part("frame.args"), Some(args.len()))?;
                    if lens.len() != n {
                        return Err(damaged(&format!(
                            "{} frames for {n} partitions",
                            lens.len()
                        )));
                    }
                    let most = match frame {
                        Frame::Rows(Some(p)) => p.saturating_add(1),
                        Frame::Range(Some(_)) => u64::MAX,
                        Frame::Rows(None) | Frame::Range(None) => 0,
                    };
                    if lens.iter().any(|l| u64::from(*l) > most) {
                        return Err(damaged("more rows in a frame than it keeps"));
                    }
                    for (array, arg) in frame_args.iter().zip(args) {
                        of_type(array, &arg.data_type(&input).map_err(text)?, "frame rows")?;
                        if array.len() != times.len() {
                            return Err(damaged(&format!(
                                "{} frame rows with {} event times",
                                array.len(),
                                times.len()
                            )));
                        }
                    }
                    let rows: Vec<(i64, Vec<ArrayRef>)> = times
                        .iter()
                        .enumerate()
                        .map(|(r, ts)| (*ts, frame_args.iter().map(|a| a.slice(r, 1)).collect()))
                        .collect();
                    let frames = split_by(&part("frame.len"), &lens, rows)?;
                    for (p, (states, rows)) in states.iter_mut().zip(frames).enumerate() {
                        let saved = state
                            .iter()
                            .map(|a| ScalarValue::try_from_array(a, p))
                            .collect::<DfResult<Vec<_>>>()
                            .map_err(text)?;
                        let rows = VecDeque::from(rows);
                        let accumulator = revive(expr, *frame, &saved, &rows)
                            .map_err(|e| damaged(&e.to_string()))?;
                        states.push(FnState::Aggregate {
                            accumulator,
                            frame: rows,
                        });
                    }
                }
            }
        }
        let partitions: HashMap<_, _> = keys.into_iter().zip(states).collect();
        if partitions.len() != n {
            return Err("the saved OVER partitions are damaged: a key appears twice".into());
        }
        Ok(partitions)
    }
}

impl RuleProgram for OverProgram {
    fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String> {
        arrival::in_pieces(self, records, out, Self::ingest, Self::release_or_count);
        Ok(())
    }

    fn advance(&mut self, now_ms: i64, out: &mut Output) -> Result<(), String> {
        let silent = self.watermarks.advance(now_ms);
        self.watermarks.requeue_silent(silent);
        self.release_or_count(out);
        Ok(())
    }

    fn retained_from(&self, partition: u32) -> Option<u64> {
        self.meta
            .iter()
            .filter(|m| m.2 == partition)
            .map(|m| m.3)
            .min()
    }

    fn stats(&self) -> ProgramStats {
        let frames: usize = self
            .partitions
            .values()
            .flatten()
            .map(|s| match s {
                FnState::Lag(h) => h.len() * 32,
                FnState::RowNumber(_) => 8,
                FnState::Aggregate { accumulator, frame } => accumulator.size() + frame.len() * 64,
            })
            .sum();
        let pending: usize = self.pending.iter().map(|b| b.get_array_memory_size()).sum();
        ProgramStats {
            late_events: self.late_events,
            state_bytes: (frames + pending + self.watermarks.size()) as u64,
            open_windows: self.partitions.len() as u64,
        }
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>, String> {
        let mut s = Snapshot::new();
        s.put_json(
            PROGRAM,
            &SavedProgram {
                kind: KIND.into(),
                signature: self.signature(),
                late_events: self.late_events,
            },
        )?;
        self.watermarks.snapshot(&mut s, WATERMARKS)?;
        self.save_pending(&mut s)?;
        self.save_partitions(&mut s)?;
        Ok(Some(s))
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let saved: SavedProgram = snapshot
            .json(PROGRAM)
            .map_err(|e| format!("the checkpoint is not of an OVER rule ({e})"))?;
        if saved.kind != KIND {
            return Err(format!(
                "the checkpoint is of a {} rule, not of an OVER rule",
                saved.kind
            ));
        }
        if saved.signature != self.signature() {
            return Err(format!(
                "the checkpoint is of another plan (its OVER functions, partitions, columns or time options differ): saved {}, now {}",
                saved.signature,
                self.signature()
            ));
        }
        // Everything is read before anything is replaced, so that a damaged
        // snapshot leaves the program as it was.
        let mut watermarks = self.watermarks.clone();
        watermarks.restore(snapshot, WATERMARKS)?;
        let (pending, meta) = self.load_pending(snapshot, &watermarks)?;
        let partitions = self.load_partitions(snapshot)?;
        self.watermarks = watermarks;
        self.pending = pending;
        self.meta = meta;
        self.partitions = partitions;
        self.late_events = saved.late_events;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::window_tests::assert_same;
    use tributary_engine::log::Record;
    use tributary_engine::rule::Output;
    use tributary_engine::snapshot::Snapshot;

    use super::super::window_tests::{batch, catalog};
    use crate::rule::compile_rule;
    use crate::statement::{Statement, parse};

    /// Lag, row number, a sliding float average (whose replayed sum differs
    /// from the live one by rounding), a sliding min (whose state does not
    /// hold its frame), a running sum and a count per device.
    const PER_DEVICE: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('prev', lag(temp, 2) OVER w, 'n', row_number() OVER w, 'avg', avg(temp) OVER (PARTITION BY device_id ORDER BY ts RANGE BETWEEN INTERVAL '3' SECOND PRECEDING AND CURRENT ROW), 'min', min(temp) OVER (PARTITION BY device_id ORDER BY ts ROWS BETWEEN 2 PRECEDING AND CURRENT ROW), 'sum', sum(temp) OVER w, 'count', count(*) OVER w) FROM t WINDOW w AS (PARTITION BY device_id ORDER BY ts)";
    /// One partition across devices, on the lowest device's watermark.
    const GLOBAL: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', named_struct('max', max(temp) OVER (ORDER BY ts ROWS BETWEEN 3 PRECEDING AND CURRENT ROW), 'prev', lag(temp) OVER (ORDER BY ts)) FROM t";

    async fn program(sql: &str) -> Box<dyn tributary_engine::rule::RuleProgram> {
        let Statement::CreateRule(r) = parse(sql).unwrap() else {
            panic!("not a rule: {sql}")
        };
        compile_rule(&r, &catalog("2s"), 0).await.unwrap().program
    }

    /// Events of devices a, b and c, out of order within the delay, some
    /// late, in records at consecutive offsets.
    fn records() -> Vec<Record> {
        let temps = [1e17, 1.0, 0.1, 0.7, -3.5, 2.25, 1e17, 0.3];
        let mut records = Vec::new();
        let mut offset = 0;
        for r in 0..12i64 {
            let rows: Vec<(&str, i64, f64)> = (0..5i64)
                .map(|i| {
                    let device = ["a", "b", "c"][((r + i) % 3) as usize];
                    // Mostly forward, now and then a step back: within the
                    // delay, or behind the watermark (late).
                    let back = match (r * 5 + i) % 7 {
                        3 => 1_500,
                        5 => 6_000,
                        _ => 0,
                    };
                    let ts = r * 2_000 + i * 300 - back;
                    (device, ts, temps[((r * 5 + i) % 8) as usize])
                })
                .collect();
            let mut record = batch(&rows);
            record.offset = offset;
            offset += rows.len() as u64;
            records.push(record);
        }
        records
    }

    /// Feeds records two at a time; `finish` then lets every device fall
    /// silent, which releases the rows still waiting.
    fn feed(
        program: &mut Box<dyn tributary_engine::rule::RuleProgram>,
        records: &[Record],
        finish: bool,
    ) -> Output {
        let mut out = Output::default();
        for pair in records.chunks(2) {
            program.process(pair, &mut out).unwrap();
        }
        if finish {
            program.advance(i64::MAX / 2, &mut out).unwrap();
        }
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out
    }

    #[tokio::test]
    async fn a_restored_over_rule_goes_on_like_the_one_it_was_saved_from() {
        let records = records();
        for sql in [PER_DEVICE, GLOBAL] {
            for cut in 1..records.len() {
                let (before, after) = records.split_at(cut);
                let mut uninterrupted = program(sql).await;
                feed(&mut uninterrupted, before, false);
                let expected = feed(&mut uninterrupted, after, true);
                assert!(!expected.rows.is_empty());

                let mut live = program(sql).await;
                feed(&mut live, before, false);
                let snapshot = live.snapshot().unwrap().expect("OVER rules save state");
                let snapshot = Snapshot::decode(&snapshot.encode().unwrap()).unwrap();
                let mut restored = program(sql).await;
                restored.restore(&snapshot).unwrap();
                assert_eq!(restored.stats().late_events, live.stats().late_events);
                assert_eq!(restored.stats().open_windows, live.stats().open_windows);
                for p in 0..2 {
                    assert_eq!(restored.retained_from(p), live.retained_from(p));
                }

                let what = format!("{sql}, restored after {cut} records");
                assert_same(&what, &feed(&mut restored, after, true), &expected);
                // Taking the snapshot left the live program as it was.
                let what = format!("{sql}, snapshot taken after {cut} records");
                assert_same(&what, &feed(&mut live, after, true), &expected);
            }
        }
        let mut all = program(PER_DEVICE).await;
        let out = feed(&mut all, &records, true);
        assert!(!out.late.is_empty(), "the events include late ones");
    }

    #[tokio::test]
    async fn a_checkpoint_of_another_rule_is_refused() {
        let records = records();
        let mut saved = program(PER_DEVICE).await;
        feed(&mut saved, &records[..5], false);
        let snapshot = saved.snapshot().unwrap().unwrap();
        let wider = PER_DEVICE.replace("2 PRECEDING", "4 PRECEDING");
        for sql in [GLOBAL, wider.as_str()] {
            let mut other = program(sql).await;
            let err = other.restore(&snapshot).unwrap_err();
            assert!(err.contains("another plan"), "{err}");
            // The refused program is still a new one.
            let mut fresh = program(sql).await;
            assert_same(
                sql,
                &feed(&mut other, &records, true),
                &feed(&mut fresh, &records, true),
            );
        }
        let mut windowed = program(
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'n', count(*) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
        )
        .await;
        feed(&mut windowed, &records[..5], false);
        let snapshot = windowed.snapshot().unwrap().unwrap();
        let err = program(PER_DEVICE).await.restore(&snapshot).unwrap_err();
        assert!(err.contains("not of an OVER rule"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_checkpoint_is_an_error_and_changes_nothing() {
        let records = records();
        let mut saved = program(PER_DEVICE).await;
        feed(&mut saved, &records[..5], false);
        let good = saved.snapshot().unwrap().unwrap();
        let mut damages: Vec<(&str, Snapshot)> = Vec::new();
        let mut s = good.clone();
        s.put_i64s("pending.ts", &[1, 2]).unwrap();
        damages.push(("pending rows", s));
        let mut s = good.clone();
        let devices = vec![1_000; good.u32s("pending.device").unwrap().len()];
        s.put_u32s("pending.device", &devices).unwrap();
        damages.push(("device 1000", s));
        let mut s = good.clone();
        s.put_strings("keys", ["k", "k", "k", "k"]).unwrap();
        damages.push(("partitions", s));
        let mut s = good.clone();
        s.put_u64s("keys.count", &[1_000]).unwrap();
        damages.push(("partitions", s));
        let mut s = good.clone();
        s.put_strings("wm.names", ["a"]).unwrap();
        damages.push(("watermarks", s));
        // Whatever kind each function is, its parts are now wrong.
        for f in 0..6 {
            let mut s = good.clone();
            for part in ["len", "count", "state", "frame.len", "frame.args"] {
                s.put_u32s(&format!("fn{f}.{part}"), &[u32::MAX; 3])
                    .unwrap();
            }
            damages.push(("a function's state", s));
        }
        for (what, damaged) in damages {
            let damaged = Snapshot::decode(&damaged.encode().unwrap()).unwrap();
            let mut restored = program(PER_DEVICE).await;
            let err = restored.restore(&damaged).unwrap_err();
            assert!(!err.is_empty(), "{what}");
            let mut fresh = program(PER_DEVICE).await;
            assert_same(
                what,
                &feed(&mut restored, &records, true),
                &feed(&mut fresh, &records, true),
            );
        }
    }
}
