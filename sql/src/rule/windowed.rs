//! Rules over event-time windows: watermarks decide which events are late
//! and when windows close; the window state folds events into accumulators;
//! a closed window's row goes through HAVING and the SELECT list.

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;
use tributary_engine::event::TS;
use tributary_engine::log::Record;
use tributary_engine::rule::{Output, ProgramStats, RowIds, RuleProgram};
use tributary_engine::snapshot::Snapshot;

use super::arrival;
use super::stateless::time_column;
use super::steps::{Step, run_steps};
use super::target::Target;
use crate::window::{
    AlignedState, Batch, Closed, Group, TimeOptions, Watermarks, WindowSpec, WindowState,
    timestamps,
};

type DfResult<T> = datafusion::error::Result<T>;

/// Where each GROUP BY column of the plan gets its value when a window closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    WindowStart,
    WindowEnd,
    /// The n-th of the user's own group keys.
    User(usize),
}

/// A compiled windowed rule.
pub struct WindowedProgram {
    pub(super) rule: String,
    pub(super) spec: WindowSpec,
    /// Steps from the source (plus window columns) to the aggregate's input.
    pub(super) pre: Vec<Step>,
    /// The user's group keys, on the aggregate's input.
    pub(super) keys: Vec<Arc<dyn PhysicalExpr>>,
    /// The window-start column on the aggregate's input.
    pub(super) time: Arc<dyn PhysicalExpr>,
    /// Which user key is `device_id`, when windows close per device.
    pub(super) device_key: Option<usize>,
    pub(super) sources: Vec<KeySource>,
    /// The aggregate's output: group columns, then aggregates.
    pub(super) aggregate_schema: SchemaRef,
    /// HAVING and the SELECT list, over the aggregate's output.
    pub(super) post: Vec<Step>,
    pub(super) output: SchemaRef,
    pub(super) target: Target,
    /// The late-events stream's schema (the source's plus the rule).
    pub(super) late_schema: SchemaRef,
    /// Identifies the state's meaning: a replacement with the same
    /// signature can take the state over.
    pub(super) signature: String,
    pub(super) state: Live,
    /// Devices seen in the piece being processed (their windows may close).
    pub(super) touched: Vec<u32>,
}

/// What a windowed rule carries from batch to batch.
pub struct Live {
    pub(super) watermarks: Watermarks,
    pub(super) windows: Windows,
    pub(super) late_events: u64,
}

/// Open windows: aligned (tumble, hop) in vectorized slots, or sessions.
pub enum Windows {
    Aligned(AlignedState),
    Sessions {
        state: WindowState,
        /// Sessions closed and not yet emitted.
        closed: Vec<Group>,
    },
}

impl Windows {
    pub fn new(
        spec: WindowSpec,
        aggregates: Vec<crate::window::Aggregate>,
        key_schema: &SchemaRef,
        per_device: bool,
    ) -> DfResult<Self> {
        Ok(match spec {
            WindowSpec::Session { .. } => Windows::Sessions {
                state: WindowState::new(spec, aggregates, key_schema, per_device)?,
                closed: Vec::new(),
            },
            _ => Windows::Aligned(AlignedState::new(spec, aggregates, key_schema, per_device)?),
        })
    }

    fn aggregates(&self) -> &[crate::window::Aggregate] {
        match self {
            Windows::Aligned(a) => a.aggregates(),
            Windows::Sessions { state, .. } => state.aggregates(),
        }
    }

    fn update(&mut self, batch: &Batch<'_>) -> DfResult<()> {
        match self {
            Windows::Aligned(a) => a.update(batch),
            Windows::Sessions { state, .. } => state.update(batch),
        }
    }

    fn due_device(&mut self, device: u32, watermark: i64) {
        match self {
            Windows::Aligned(a) => a.due_device(device, watermark),
            Windows::Sessions { state, closed } => {
                closed.extend(state.close_device(device, watermark))
            }
        }
    }

    fn due_device_all(&mut self, device: u32) -> Option<i64> {
        match self {
            Windows::Aligned(a) => a.due_device_all(device),
            Windows::Sessions { state, closed } => {
                let groups = state.close_device_all(device);
                let end = groups.iter().map(|g| g.end).max();
                closed.extend(groups);
                end
            }
        }
    }

    fn due_global(&mut self, watermark: i64) {
        match self {
            Windows::Aligned(a) => a.due_global(watermark),
            Windows::Sessions { state, closed } => closed.extend(state.close_global(watermark)),
        }
    }

    fn take_due(&mut self) -> DfResult<Option<Closed>> {
        match self {
            Windows::Aligned(a) => a.take_due(),
            Windows::Sessions { state, closed } => {
                if closed.is_empty() {
                    return Ok(None);
                }
                state.finish(std::mem::take(closed)).map(Some)
            }
        }
    }

    fn retained_from(&self, partition: u32) -> Option<u64> {
        match self {
            Windows::Aligned(a) => a.retained_from(partition),
            Windows::Sessions { state, .. } => state.retained_from(partition),
        }
    }

    fn size(&self) -> usize {
        match self {
            Windows::Aligned(a) => a.size(),
            Windows::Sessions { state, .. } => state.size(),
        }
    }

    fn open(&self) -> usize {
        match self {
            Windows::Aligned(a) => a.open(),
            Windows::Sessions { state, .. } => state.open(),
        }
    }
}

/// State handed from a replaced program to its successor.
struct Handed {
    signature: String,
    state: Live,
}

impl WindowedProgram {
    fn per_device(&self) -> bool {
        self.device_key.is_some()
    }

    /// Watermarks, late events and window assignment over raw rows
    /// starting at `offset` of `partition`; returns the rows taken (see
    /// [`arrival::observe`]) and leaves the devices seen in `touched`.
    fn ingest(
        &mut self,
        raw: &RecordBatch,
        partition: u32,
        offset: u64,
        out: &mut Output,
    ) -> DfResult<usize> {
        let per_device = self.per_device();
        let arrival = arrival::observe(&mut self.state.watermarks, raw, per_device)?;
        self.touched = arrival.touched;
        let raw = raw.slice(0, arrival.taken);
        self.state.late_events += arrival.late.iter().filter(|l| **l).count() as u64;
        let raw = arrival::split_late(&raw, &arrival.late, &self.rule, &self.late_schema, out)?;
        if raw.num_rows() > 0 {
            let devices = arrival::on_time(&arrival.devices, &arrival.late);
            self.fold(&raw, &devices, partition, offset)?;
        }
        Ok(arrival.taken)
    }

    /// Adds the window columns, runs the pre-aggregate steps and folds the
    /// rows into their windows.
    fn fold(
        &mut self,
        raw: &RecordBatch,
        row_devices: &[u32],
        partition: u32,
        offset: u64,
    ) -> DfResult<()> {
        let ts = time_column(raw, TS);
        let mut expanded: Option<Vec<u32>> = None;
        let (raw, starts) = match self.spec {
            WindowSpec::Tumble { size } => {
                // Consecutive events mostly share a window: divide only
                // when one leaves the window of the one before.
                let mut window = (i64::MAX, i64::MIN);
                let starts: Vec<i64> = ts
                    .values()
                    .iter()
                    .map(|t| {
                        if *t < window.0 || *t >= window.1 {
                            let start = t - t.rem_euclid(size);
                            window = (start, start.saturating_add(size));
                        }
                        window.0
                    })
                    .collect();
                (raw.clone(), starts)
            }
            WindowSpec::Hop { .. } => {
                let mut indices = Vec::new();
                let mut starts = Vec::new();
                let mut buf = Vec::new();
                for (i, t) in ts.values().iter().enumerate() {
                    self.spec.starts(*t, &mut buf);
                    for s in &buf {
                        indices.push(i as u32);
                        starts.push(*s);
                    }
                }
                let taken = take_record_batch(raw, &UInt32Array::from(indices.clone()))?;
                expanded = Some(indices);
                (taken, starts)
            }
            WindowSpec::Session { .. } => (raw.clone(), ts.values().to_vec()),
        };
        let size = self.spec.size().unwrap_or(0);
        let ends = starts.iter().map(|s| s + size).collect();
        let mut columns = raw.columns().to_vec();
        columns.push(timestamps(starts));
        columns.push(timestamps(ends));
        let mut fields: Vec<_> = raw.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            super::window_sql::WINDOW_START,
            tributary_engine::event::timestamp_type(),
            false,
        )));
        fields.push(Arc::new(arrow::datatypes::Field::new(
            super::window_sql::WINDOW_END,
            tributary_engine::event::timestamp_type(),
            false,
        )));
        let augmented =
            RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
        let Some((input, kept)) = run_steps(&self.pre, &augmented)? else {
            return Ok(());
        };
        let n = input.num_rows();
        let eval = |e: &Arc<dyn PhysicalExpr>| e.evaluate(&input)?.into_array(n);
        let keys = self
            .keys
            .iter()
            .map(eval)
            .collect::<DfResult<Vec<ArrayRef>>>()?;
        let time = eval(&self.time)?;
        let time = time
            .as_any()
            .downcast_ref::<arrow::array::TimestampMillisecondArray>()
            .ok_or_else(|| datafusion::error::DataFusionError::Internal("window time".into()))?;
        let mut args = Vec::new();
        let mut filters = Vec::new();
        for a in self.state.windows.aggregates() {
            let mut values = a.args.iter().map(eval).collect::<DfResult<Vec<_>>>()?;
            // An ordered aggregate (`first_value(x ORDER BY ts)`) takes its
            // ORDER BY columns after its arguments, as DataFusion's
            // AggregateExec passes them (`all_expressions`).
            for sort in a.expr.order_bys() {
                values.push(eval(&sort.expr)?);
            }
            args.push(values);
            filters.push(match &a.filter {
                Some(f) => Some(
                    eval(f)?
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .cloned()
                        .ok_or_else(|| {
                            datafusion::error::DataFusionError::Internal(
                                "FILTER is not boolean".into(),
                            )
                        })?,
                ),
                None => None,
            });
        }
        // Each row's device, as the watermarks know it: windows keyed by
        // device close on the clock of the device that sent the events.
        let mapped: Vec<u32>;
        let devices: &[u32] = if self.device_key.is_none() {
            &[]
        } else if expanded.is_none() && kept.len() == row_devices.len() {
            // Every row was kept, in order.
            row_devices
        } else {
            mapped = kept
                .values()
                .iter()
                .map(|r| {
                    let r = match &expanded {
                        Some(e) => e[*r as usize] as usize,
                        None => *r as usize,
                    };
                    row_devices.get(r).copied().unwrap_or(u32::MAX)
                })
                .collect();
            &mapped
        };
        self.state.windows.update(&Batch {
            times: time.values(),
            keys: &keys,
            devices,
            args: &args,
            filters: &filters,
            partition,
            offset,
        })
    }

    /// Closes windows; a failure while finishing them (say, HAVING fails on
    /// one window's value) is counted and those rows are skipped. It is not
    /// returned as fatal: the runtime would re-feed input already folded.
    fn close_or_count(&mut self, touched: &[u32], out: &mut Output) {
        if let Err(e) = self.close(touched, out) {
            out.errors.push(format!("closing windows: {e}"));
        }
    }

    /// Closes what the watermarks allow and emits the rows.
    fn close(&mut self, touched: &[u32], out: &mut Output) -> DfResult<()> {
        let live = &mut self.state;
        if self.device_key.is_some() {
            for d in touched {
                let wm = live.watermarks.device_watermark(*d);
                live.windows.due_device(*d, wm);
            }
            for d in live.watermarks.silent() {
                if let Some(end) = live.windows.due_device_all(d) {
                    live.watermarks.raise(d, end);
                }
            }
        } else {
            live.watermarks.silent();
            live.windows.due_global(live.watermarks.global_watermark());
        }
        let Some(closed) = live.windows.take_due()? else {
            return Ok(());
        };
        let now = live.watermarks.now();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for source in &self.sources {
            columns.push(match source {
                KeySource::WindowStart => timestamps(closed.starts.clone()),
                KeySource::WindowEnd => timestamps(closed.ends.clone()),
                KeySource::User(k) => closed.keys[*k].clone(),
            });
        }
        columns.extend(closed.values.iter().cloned());
        let columns = columns
            .into_iter()
            .zip(self.aggregate_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    arrow::compute::cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(self.aggregate_schema.clone(), columns)?;
        let Some((batch, rows)) = run_steps(&self.post, &batch)? else {
            return Ok(());
        };
        let batch = RecordBatch::try_new(self.output.clone(), batch.columns().to_vec())?;
        let picked =
            |v: &[i64]| -> Vec<i64> { rows.values().iter().map(|r| v[*r as usize]).collect() };
        let ids = RowIds::Windows {
            starts: picked(&closed.starts),
            ends: picked(&closed.ends),
            keys: rows
                .values()
                .iter()
                .map(|r| closed.key_hashes[*r as usize])
                .collect(),
        };
        let times = rows
            .values()
            .iter()
            .map(|r| closed.ends[*r as usize])
            .collect();
        let emitted = self
            .target
            .emit(batch, ids, times, now)
            .map_err(datafusion::error::DataFusionError::Execution)?;
        out.rows.push(emitted);
        Ok(())
    }
}

impl RuleProgram for WindowedProgram {
    fn process(&mut self, records: &[Record], out: &mut Output) -> Result<(), String> {
        arrival::in_pieces(self, records, out, Self::ingest, |p, out| {
            let touched = std::mem::take(&mut p.touched);
            p.close_or_count(&touched, out);
        });
        Ok(())
    }

    fn advance(&mut self, now_ms: i64, out: &mut Output) -> Result<(), String> {
        let silent = self.state.watermarks.advance(now_ms);
        if self.device_key.is_some() {
            // `close` collects the silent devices itself.
            self.state.watermarks.requeue_silent(silent);
        }
        self.close_or_count(&[], out);
        Ok(())
    }

    fn retained_from(&self, partition: u32) -> Option<u64> {
        self.state.windows.retained_from(partition)
    }

    fn stats(&self) -> ProgramStats {
        ProgramStats {
            late_events: self.state.late_events,
            state_bytes: (self.state.windows.size() + self.state.watermarks.size()) as u64,
            open_windows: self.state.windows.open() as u64,
        }
    }

    fn into_state(self: Box<Self>) -> Box<dyn Any + Send> {
        Box::new(Handed {
            signature: self.signature,
            state: self.state,
        })
    }

    fn adopt_state(&mut self, state: Box<dyn Any + Send>) -> bool {
        match state.downcast::<Handed>() {
            Ok(handed) if handed.signature == self.signature => {
                self.state = handed.state;
                true
            }
            _ => false,
        }
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>, String> {
        let mut s = Snapshot::new();
        s.put_json(
            "program",
            &serde_json::json!({
                "kind": "windowed",
                "signature": self.signature,
                "late_events": self.state.late_events,
            }),
        )?;
        self.state.watermarks.snapshot(&mut s, "watermarks")?;
        match &mut self.state.windows {
            Windows::Aligned(a) => a.snapshot(&mut s, "windows")?,
            Windows::Sessions { state, closed } => {
                if !closed.is_empty() {
                    return Err("closed sessions are still to be emitted".into());
                }
                state.snapshot(&mut s, "windows")?
            }
        }
        Ok(Some(s))
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Meta {
            kind: String,
            signature: String,
            late_events: u64,
        }
        let meta: Meta = snapshot.json("program")?;
        if meta.kind != "windowed" || meta.signature != self.signature {
            return Err("the checkpoint is of another plan".into());
        }
        // Windows name devices by the watermarks' numbers: they are
        // checked against the saved watermarks before anything changes.
        let mut watermarks = self.state.watermarks.clone();
        watermarks.restore(snapshot, "watermarks")?;
        let devices = watermarks.len();
        match &mut self.state.windows {
            Windows::Aligned(a) => a.restore(snapshot, "windows", devices)?,
            Windows::Sessions { state, .. } => state.restore(snapshot, "windows", devices)?,
        }
        self.state.watermarks = watermarks;
        self.state.late_events = meta.late_events;
        Ok(())
    }
}

/// Keeps the options in a program's description.
pub fn describe_time(options: TimeOptions, per_device: bool) -> String {
    format!(
        "windows close on {} watermark (watermark_delay {}, idle_timeout {})",
        if per_device {
            "each device's own"
        } else {
            "the lowest active device's"
        },
        crate::window::format_duration(options.watermark_delay),
        crate::window::format_duration(options.idle_timeout)
    )
}
