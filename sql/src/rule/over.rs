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
    Array, ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::compute::{concat_batches, filter_record_batch, not, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use tributary_engine::log::Record;
use tributary_engine::rule::{Output, ProgramStats, RuleProgram};

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
            let array = if v.is_empty() {
                arrow::array::new_empty_array(ty)
            } else {
                ScalarValue::iter_to_array(v)?
            };
            columns.push(if array.data_type() == ty {
                array
            } else {
                arrow::compute::cast(&array, ty)?
            });
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
            accumulator: if bounded(*frame) {
                expr.create_sliding_accumulator()?
            } else {
                expr.create_accumulator()?
            },
            frame: VecDeque::new(),
        },
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
}
