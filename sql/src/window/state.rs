//! The state of open session windows: one set of DataFusion accumulators
//! per (session, group key), never the raw events. (Tumbling and hopping
//! windows, whose bounds are known in advance, are vectorized in
//! `aligned.rs`.)
//!
//! Events are folded into their group's accumulators as they come, a run of
//! consecutive rows of the same group at a time (a device's frame is one run).
//! A window's row is produced once, when it closes: keys, `window_start`,
//! `window_end`, then the final value of every aggregate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, TimestampMillisecondArray};
use arrow::compute::filter;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

use super::WindowSpec;
use tributary_engine::event::TIME_ZONE;

type DfResult<T> = datafusion::error::Result<T>;

/// No device: the group is not keyed by device.
pub(super) const NO_DEVICE: u32 = u32::MAX;

/// One aggregate of a windowed rule.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub expr: Arc<AggregateFunctionExpr>,
    /// Its arguments, evaluated on the rule's pre-aggregate rows.
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    /// `FILTER (WHERE ...)`, if any.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// One open window of one group.
#[derive(Debug)]
pub struct Group {
    pub(super) start: i64,
    pub end: i64,
    /// Newest event time in a session (sessions end `gap` after it).
    pub(super) last: i64,
    /// The group key in Arrow's row format.
    pub(super) key: Box<[u8]>,
    pub(super) device: u32,
    pub(super) accumulators: Vec<Box<dyn Accumulator>>,
    /// The first offset of each partition that fed this group.
    pub(super) from: Vec<(u32, u64)>,
    /// Bytes counted for this group in the state size.
    pub(super) bytes: usize,
}

/// Windows that closed, ready to become rows.
#[derive(Debug)]
pub struct Closed {
    pub starts: Vec<i64>,
    pub ends: Vec<i64>,
    /// The user's group keys, one array per key.
    pub keys: Vec<ArrayRef>,
    /// A stable hash of each group key (row ids are derived from it).
    pub key_hashes: Vec<u64>,
    /// One array per aggregate.
    pub values: Vec<ArrayRef>,
}

impl Closed {
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }
}

/// Open windows of one rule.
pub struct WindowState {
    pub(super) spec: WindowSpec,
    aggregates: Vec<Aggregate>,
    /// The type each aggregate's final value must have.
    value_types: Vec<DataType>,
    converter: RowConverter,
    key_count: usize,
    /// Whether windows close per device (the group key holds `device_id`).
    pub(super) per_device: bool,
    pub(super) groups: Vec<Option<Group>>,
    free: Vec<u32>,
    /// Sessions: key bytes → the open sessions of that key.
    pub(super) sessions: HashMap<Box<[u8]>, Vec<u32>>,
    /// Open groups of each device (windows keyed by device).
    pub(super) by_device: HashMap<u32, Vec<u32>>,
    /// Open groups by end (windows across devices).
    pub(super) by_end: BTreeSet<(i64, u32)>,
    /// Open groups per first offset, per partition.
    retained: BTreeMap<(u32, u64), u32>,
    pub(super) bytes: usize,
}

impl std::fmt::Debug for WindowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowState")
            .field("spec", &self.spec)
            .field("open", &self.open())
            .finish()
    }
}

/// The rows of one `update` call.
pub struct Batch<'a> {
    /// Per row: the window start (aligned windows) or the event time (sessions).
    pub times: &'a [i64],
    /// The user's group keys, evaluated.
    pub keys: &'a [ArrayRef],
    /// Per row: the device (windows keyed by device), else empty.
    pub devices: &'a [u32],
    /// Per aggregate: its arguments, evaluated.
    pub args: &'a [Vec<ArrayRef>],
    /// Per aggregate: its FILTER mask, evaluated.
    pub filters: &'a [Option<BooleanArray>],
    pub partition: u32,
    /// The first offset of the records these rows came from.
    pub offset: u64,
}

impl WindowState {
    /// Empty state for windows `spec` over group keys of `key_schema`.
    pub fn new(
        spec: WindowSpec,
        aggregates: Vec<Aggregate>,
        key_schema: &SchemaRef,
        per_device: bool,
    ) -> DfResult<Self> {
        let converter = key_converter(key_schema)?;
        let value_types = value_types(&aggregates);
        Ok(WindowState {
            spec,
            aggregates,
            value_types,
            converter,
            key_count: key_schema.fields().len(),
            per_device,
            groups: Vec::new(),
            free: Vec::new(),
            sessions: HashMap::new(),
            by_device: HashMap::new(),
            by_end: BTreeSet::new(),
            retained: BTreeMap::new(),
            bytes: 0,
        })
    }

    /// The aggregates, in output order.
    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }

    /// Open windows (groups) now.
    pub fn open(&self) -> usize {
        self.groups.len() - self.free.len()
    }

    /// Bytes of state held, roughly.
    pub fn size(&self) -> usize {
        self.bytes + self.sessions.capacity() * 48 + self.retained.len() * 32
    }

    /// The lowest offset of `partition` an open window was fed from.
    pub fn retained_from(&self, partition: u32) -> Option<u64> {
        self.retained
            .range((partition, 0)..=(partition, u64::MAX))
            .next()
            .map(|((_, offset), _)| *offset)
    }

    fn converted_keys(&self, keys: &[ArrayRef]) -> DfResult<Option<Rows>> {
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.converter.convert_columns(keys)?))
    }

    /// Folds rows into their windows.
    pub fn update(&mut self, batch: &Batch<'_>) -> DfResult<()> {
        let rows = batch.times.len();
        if rows == 0 {
            return Ok(());
        }
        // Tumbling and hopping windows live in `AlignedState`.
        let WindowSpec::Session { gap } = self.spec else {
            return Err(datafusion::error::DataFusionError::Internal(
                "row-at-a-time window state is for sessions".into(),
            ));
        };
        let keys = self.converted_keys(batch.keys)?;
        self.update_sessions(batch, keys.as_ref(), gap)
    }

    /// A new open group.
    pub(super) fn create(
        &mut self,
        start: i64,
        end: i64,
        last: i64,
        key: &[u8],
        device: u32,
    ) -> DfResult<u32> {
        let accumulators = self
            .aggregates
            .iter()
            .map(|a| a.expr.create_accumulator())
            .collect::<DfResult<Vec<_>>>()?;
        let bytes = std::mem::size_of::<Group>()
            + key.len()
            + accumulators.iter().map(|a| a.size()).sum::<usize>();
        self.bytes += bytes;
        let group = Group {
            start,
            end,
            last,
            key: key.into(),
            device,
            accumulators,
            from: Vec::new(),
            bytes,
        };
        let g = match self.free.pop() {
            Some(g) => {
                self.groups[g as usize] = Some(group);
                g
            }
            None => {
                self.groups.push(Some(group));
                (self.groups.len() - 1) as u32
            }
        };
        if self.per_device {
            self.by_device.entry(device).or_default().push(g);
        } else {
            self.by_end.insert((end, g));
        }
        Ok(g)
    }

    /// Records that `g` holds events from `partition` at or after `offset`.
    pub(super) fn touch(&mut self, g: u32, partition: u32, offset: u64) {
        let Some(group) = self.groups[g as usize].as_mut() else {
            return;
        };
        if group.from.iter().any(|(p, _)| *p == partition) {
            return;
        }
        group.from.push((partition, offset));
        *self.retained.entry((partition, offset)).or_default() += 1;
    }

    /// Like [`Self::touch`], but moves an existing entry back to `offset`
    /// when that is older.
    pub(super) fn touch_at_most(&mut self, g: u32, partition: u32, offset: u64) {
        let Some(group) = self.groups[g as usize].as_mut() else {
            return;
        };
        match group.from.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, o)) if *o <= offset => {}
            Some((_, o)) => {
                let old = *o;
                *o = offset;
                if let Some(n) = self.retained.get_mut(&(partition, old)) {
                    *n -= 1;
                    if *n == 0 {
                        self.retained.remove(&(partition, old));
                    }
                }
                *self.retained.entry((partition, offset)).or_default() += 1;
            }
            None => {
                group.from.push((partition, offset));
                *self.retained.entry((partition, offset)).or_default() += 1;
            }
        }
    }

    /// Folds rows `offset..offset + len` of the batch into group `g`.
    pub(super) fn fold(
        &mut self,
        g: u32,
        batch: &Batch<'_>,
        offset: usize,
        len: usize,
    ) -> DfResult<()> {
        let Some(group) = self.groups[g as usize].as_mut() else {
            return Ok(());
        };
        for (i, acc) in group.accumulators.iter_mut().enumerate() {
            let mut args: Vec<ArrayRef> =
                batch.args[i].iter().map(|a| a.slice(offset, len)).collect();
            if let Some(mask) = &batch.filters[i] {
                let mask = mask.slice(offset, len);
                args = args
                    .iter()
                    .map(|a| filter(a.as_ref(), &mask))
                    .collect::<Result<_, _>>()?;
            }
            acc.update_batch(&args)?;
        }
        Ok(())
    }

    /// Removes an open group from every index and returns it.
    pub(super) fn remove(&mut self, g: u32) -> Option<Group> {
        let group = self.groups.get_mut(g as usize)?.take()?;
        self.free.push(g);
        self.bytes = self.bytes.saturating_sub(group.bytes);
        for (p, o) in &group.from {
            if let Some(n) = self.retained.get_mut(&(*p, *o)) {
                *n -= 1;
                if *n == 0 {
                    self.retained.remove(&(*p, *o));
                }
            }
        }
        if self.per_device {
            if let Some(list) = self.by_device.get_mut(&group.device) {
                list.retain(|x| *x != g);
                if list.is_empty() {
                    self.by_device.remove(&group.device);
                }
            }
        } else {
            self.by_end.remove(&(group.end, g));
        }
        if let Some(list) = self.sessions.get_mut(&group.key) {
            list.retain(|x| *x != g);
            if list.is_empty() {
                self.sessions.remove(&group.key);
            }
        }
        Some(group)
    }

    /// Closes the windows of `device` that end at or before `watermark`.
    pub fn close_device(&mut self, device: u32, watermark: i64) -> Vec<Group> {
        let due: Vec<u32> = self
            .by_device
            .get(&device)
            .map(|list| {
                list.iter()
                    .copied()
                    .filter(|g| {
                        self.groups[*g as usize]
                            .as_ref()
                            .is_some_and(|x| x.end <= watermark)
                    })
                    .collect()
            })
            .unwrap_or_default();
        due.into_iter().filter_map(|g| self.remove(g)).collect()
    }

    /// Closes every window of `device` (it went silent).
    pub fn close_device_all(&mut self, device: u32) -> Vec<Group> {
        self.close_device(device, i64::MAX)
    }

    /// Closes windows across devices that end at or before `watermark`.
    pub fn close_global(&mut self, watermark: i64) -> Vec<Group> {
        let mut out = Vec::new();
        while let Some(&(end, g)) = self.by_end.first() {
            if end > watermark {
                break;
            }
            out.extend(self.remove(g));
        }
        out
    }

    /// Turns closed groups into columns, ordered by end, start and key.
    pub fn finish(&self, mut groups: Vec<Group>) -> DfResult<Closed> {
        groups.sort_by(|a, b| (a.end, a.start, &a.key).cmp(&(b.end, b.start, &b.key)));
        let parser = self.converter.parser();
        let keys = if self.key_count == 0 || groups.is_empty() {
            Vec::new()
        } else {
            self.converter
                .convert_rows(groups.iter().map(|g| parser.parse(&g.key)))?
        };
        let mut values: Vec<Vec<ScalarValue>> =
            vec![Vec::with_capacity(groups.len()); self.aggregates.len()];
        let mut starts = Vec::with_capacity(groups.len());
        let mut ends = Vec::with_capacity(groups.len());
        let mut key_hashes = Vec::with_capacity(groups.len());
        for mut g in groups {
            starts.push(g.start);
            ends.push(g.end);
            for (i, acc) in g.accumulators.iter_mut().enumerate() {
                values[i].push(acc.evaluate()?);
            }
            key_hashes.push(key_hash(&g.key));
        }
        let values = values
            .into_iter()
            .zip(&self.value_types)
            .map(|(v, ty)| {
                if v.is_empty() {
                    return Ok(arrow::array::new_empty_array(ty));
                }
                let array = ScalarValue::iter_to_array(v)?;
                if array.data_type() == ty {
                    Ok(array)
                } else {
                    Ok(arrow::compute::cast(&array, ty)?)
                }
            })
            .collect::<DfResult<Vec<_>>>()?;
        Ok(Closed {
            starts,
            ends,
            keys,
            key_hashes,
            values,
        })
    }
}

/// Converts group keys to Arrow's row format, to compare and intern them.
pub(super) fn key_converter(key_schema: &SchemaRef) -> DfResult<RowConverter> {
    Ok(RowConverter::new(
        key_schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}

/// The type each aggregate's final value has.
pub(super) fn value_types(aggregates: &[Aggregate]) -> Vec<DataType> {
    aggregates
        .iter()
        .map(|a| a.expr.field().data_type().clone())
        .collect()
}

/// A stable 64-bit hash of a group key (FNV-1a): row ids derive from it, so
/// it must not change between runs or versions.
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Window starts or ends as a `TIMESTAMP` column.
pub fn timestamps(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone(TIME_ZONE))
}
