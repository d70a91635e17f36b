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

use arrow::array::{Array, ArrayRef, BooleanArray, TimestampMillisecondArray, new_empty_array};
use arrow::compute::{cast, filter};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

use super::WindowSpec;
use tributary_engine::event::TIME_ZONE;
use tributary_engine::snapshot::{Snapshot, split_by};

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
    /// The type of each group key column.
    key_types: Vec<DataType>,
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
            key_types: key_schema
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
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
        let accumulators = self.new_accumulators()?;
        let bytes = group_bytes(key, &accumulators);
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
        let keys = if self.key_types.is_empty() || groups.is_empty() {
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

    /// Fresh accumulators, one per aggregate.
    fn new_accumulators(&self) -> DfResult<Vec<Box<dyn Accumulator>>> {
        self.aggregates
            .iter()
            .map(|a| a.expr.create_accumulator())
            .collect()
    }

    /// Saves the open windows into `s`, every part named under `prefix`.
    ///
    /// Only live groups are saved, densely numbered; a key's sessions keep
    /// their order (an event bridging two sessions merges them into the
    /// first, which order-sensitive aggregates can tell). Group keys are
    /// saved as columns: Arrow's row format is not stable across versions.
    /// Device numbers are saved as they are: they are the watermarks'.
    pub fn snapshot(&mut self, s: &mut Snapshot, prefix: &str) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        let order = self.snapshot_order();
        s.put_json(
            &part("meta"),
            &SnapshotMeta {
                spec: spec_json(self.spec),
                per_device: self.per_device,
                key_columns: self.key_types.len(),
                aggregates: self
                    .aggregates
                    .iter()
                    .map(|a| a.expr.name().into())
                    .collect(),
                windows: order.len(),
            },
        )?;
        let live: Vec<&Group> = order
            .iter()
            .filter_map(|g| self.groups[*g as usize].as_ref())
            .collect();
        let column = |f: fn(&Group) -> i64| live.iter().map(|g| f(g)).collect::<Vec<_>>();
        s.put_i64s(&part("groups.start"), &column(|g| g.start))?;
        s.put_i64s(&part("groups.end"), &column(|g| g.end))?;
        s.put_i64s(&part("groups.last"), &column(|g| g.last))?;
        let devices: Vec<u32> = live.iter().map(|g| g.device).collect();
        s.put_u32s(&part("groups.device"), &devices)?;
        let from_len: Vec<u32> = live.iter().map(|g| g.from.len() as u32).collect();
        let (partitions, offsets): (Vec<u32>, Vec<u64>) =
            live.iter().flat_map(|g| g.from.iter().copied()).unzip();
        s.put_u32s(&part("groups.from.len"), &from_len)?;
        s.put_u32s(&part("groups.from.partition"), &partitions)?;
        s.put_u64s(&part("groups.from.offset"), &offsets)?;
        let keys = self
            .key_columns(live.iter().map(|g| &g.key[..]))
            .map_err(|e| format!("saving the window keys: {e}"))?;
        s.put_arrays(&part("groups.key"), keys)?;
        for (j, aggregate) in self.aggregates.iter().enumerate() {
            let failed = |e: datafusion::error::DataFusionError| {
                format!(
                    "saving aggregate {} ({}): {e}",
                    j + 1,
                    aggregate.expr.name()
                )
            };
            let fields = aggregate.expr.state_fields().map_err(failed)?;
            let mut columns = vec![Vec::with_capacity(order.len()); fields.len()];
            for &g in &order {
                let Some(group) = self.groups[g as usize].as_mut() else {
                    continue;
                };
                let state =
                    take_state(&aggregate.expr, &mut group.accumulators[j]).map_err(failed)?;
                if state.len() != fields.len() {
                    return Err(format!(
                        "saving aggregate {} ({}): a state of {} values, expected {}",
                        j + 1,
                        aggregate.expr.name(),
                        state.len(),
                        fields.len()
                    ));
                }
                for (column, value) in columns.iter_mut().zip(state) {
                    column.push(value);
                }
            }
            let arrays = columns
                .into_iter()
                .zip(&fields)
                .map(|(values, field)| state_array(values, field.data_type()))
                .collect::<DfResult<Vec<_>>>()
                .map_err(failed)?;
            s.put_arrays(&part(&format!("acc{j}")), arrays)?;
        }
        Ok(())
    }

    /// Live groups in the order they are saved: by number, except that a
    /// key's sessions are kept together, in their list's order.
    fn snapshot_order(&self) -> Vec<u32> {
        let mut placed = vec![false; self.groups.len()];
        let mut order = Vec::with_capacity(self.open());
        for (g, group) in self.groups.iter().enumerate() {
            let Some(group) = group else {
                continue;
            };
            let same_key = self.sessions.get(&group.key).into_iter().flatten();
            for &x in same_key.chain([&(g as u32)]) {
                let x_live = self.groups.get(x as usize).is_some_and(Option::is_some);
                if x_live && !placed[x as usize] {
                    placed[x as usize] = true;
                    order.push(x);
                }
            }
        }
        order
    }

    /// Group keys (Arrow's row format) as key columns of the declared types.
    fn key_columns<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) -> DfResult<Vec<ArrayRef>> {
        if self.key_types.is_empty() {
            return Ok(Vec::new());
        }
        let parser = self.converter.parser();
        let rows: Vec<_> = keys.map(|k| parser.parse(k)).collect();
        if rows.is_empty() {
            return Ok(self.key_types.iter().map(new_empty_array).collect());
        }
        self.converter
            .convert_rows(rows)?
            .into_iter()
            .zip(&self.key_types)
            .map(|(column, ty)| {
                if column.data_type() == ty {
                    Ok(column)
                } else {
                    Ok(cast(&column, ty)?)
                }
            })
            .collect()
    }

    /// Replaces this (empty, freshly built) state with the one saved under
    /// `prefix`, whose device numbers must be below `known_devices` (the
    /// devices the restored watermarks know). Nothing changes unless the
    /// whole snapshot is sound.
    pub fn restore(
        &mut self,
        s: &Snapshot,
        prefix: &str,
        known_devices: usize,
    ) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        let meta: SnapshotMeta = s.json(&part("meta"))?;
        self.check_meta(&meta)?;
        let n = meta.windows;
        let sized = |name: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(format!(
                    "snapshot part '{}' holds {len} values for {n} windows",
                    part(name)
                ))
            }
        };
        let starts = s.i64s(&part("groups.start"))?;
        sized("groups.start", starts.len())?;
        let ends = s.i64s(&part("groups.end"))?;
        sized("groups.end", ends.len())?;
        let lasts = s.i64s(&part("groups.last"))?;
        sized("groups.last", lasts.len())?;
        let devices = s.u32s(&part("groups.device"))?;
        sized("groups.device", devices.len())?;
        if let Some(d) = devices
            .iter()
            .find(|d| **d != NO_DEVICE && **d as usize >= known_devices)
        {
            return Err(format!(
                "snapshot part '{}' names device {d}, but the watermarks know {known_devices}",
                part("groups.device")
            ));
        }
        let from_len = s.u32s(&part("groups.from.len"))?;
        sized("groups.from.len", from_len.len())?;
        let partitions = s.u32s(&part("groups.from.partition"))?;
        let offsets = s.u64s(&part("groups.from.offset"))?;
        if partitions.len() != offsets.len() {
            return Err(format!(
                "snapshot parts '{}' and '{}' differ in length",
                part("groups.from.partition"),
                part("groups.from.offset")
            ));
        }
        let from = split_by(
            &part("groups.from"),
            &from_len,
            partitions.into_iter().zip(offsets).collect(),
        )?;
        let keys = self.restore_keys(s, &part("groups.key"), n)?;
        let mut states = Vec::with_capacity(self.aggregates.len());
        for (j, aggregate) in self.aggregates.iter().enumerate() {
            let name = part(&format!("acc{j}"));
            let fields = aggregate
                .expr
                .state_fields()
                .map_err(|e| format!("aggregate {}: {e}", j + 1))?;
            let arrays = s.arrays(&name, Some(fields.len()))?;
            for (array, field) in arrays.iter().zip(&fields) {
                if array.len() != n {
                    return Err(format!(
                        "snapshot part '{name}' holds {} values for {n} windows",
                        array.len()
                    ));
                }
                if !array.data_type().equals_datatype(field.data_type()) {
                    return Err(format!(
                        "snapshot part '{name}' holds {}, aggregate {} ({}) keeps {}",
                        array.data_type(),
                        j + 1,
                        aggregate.expr.name(),
                        field.data_type()
                    ));
                }
            }
            states.push(arrays);
        }

        let mut groups = Vec::with_capacity(n);
        for (i, (key, from)) in keys.into_iter().zip(from).enumerate() {
            let (start, end, last) = (starts[i], ends[i], lasts[i]);
            if !(start <= last && last <= end) {
                return Err(format!(
                    "saved window {i} is damaged: start {start}, last event {last}, end {end}"
                ));
            }
            let mut partitions: Vec<u32> = from.iter().map(|(p, _)| *p).collect();
            partitions.sort_unstable();
            if partitions.windows(2).any(|w| w[0] == w[1]) {
                return Err(format!(
                    "saved window {i} is damaged: a partition's offset twice"
                ));
            }
            let mut accumulators = self.new_accumulators().map_err(|e| e.to_string())?;
            let bytes = group_bytes(&key, &accumulators);
            for (j, (acc, arrays)) in accumulators.iter_mut().zip(&states).enumerate() {
                if arrays.is_empty() {
                    continue;
                }
                let row: Vec<ArrayRef> = arrays.iter().map(|a| a.slice(i, 1)).collect();
                acc.merge_batch(&row).map_err(|e| {
                    format!(
                        "restoring aggregate {} ({}) of saved window {i}: {e}",
                        j + 1,
                        self.aggregates[j].expr.name()
                    )
                })?;
            }
            groups.push(Some(Group {
                start,
                end,
                last,
                key,
                device: devices[i],
                accumulators,
                from,
                bytes,
            }));
        }

        let mut sessions: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut by_device: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut by_end = BTreeSet::new();
        let mut retained: BTreeMap<(u32, u64), u32> = BTreeMap::new();
        let mut bytes = 0;
        for (g, group) in groups.iter().flatten().enumerate() {
            let g = g as u32;
            sessions.entry(group.key.clone()).or_default().push(g);
            if self.per_device {
                by_device.entry(group.device).or_default().push(g);
            } else {
                by_end.insert((group.end, g));
            }
            for &(p, o) in &group.from {
                *retained.entry((p, o)).or_default() += 1;
            }
            bytes += group.bytes;
        }
        self.groups = groups;
        self.free = Vec::new();
        self.sessions = sessions;
        self.by_device = by_device;
        self.by_end = by_end;
        self.retained = retained;
        self.bytes = bytes;
        Ok(())
    }

    /// Whether saved windows were made by a state built like this one.
    fn check_meta(&self, meta: &SnapshotMeta) -> Result<(), String> {
        let names: Vec<&str> = self.aggregates.iter().map(|a| a.expr.name()).collect();
        if meta.aggregates.len() != names.len() {
            return Err(format!(
                "the saved windows have {} aggregates, this rule has {}",
                meta.aggregates.len(),
                names.len()
            ));
        }
        if let Some((j, (saved, now))) = meta
            .aggregates
            .iter()
            .zip(&names)
            .enumerate()
            .find(|(_, (saved, now))| saved != *now)
        {
            return Err(format!(
                "aggregate {} of the saved windows is '{saved}', this rule's is '{now}'",
                j + 1
            ));
        }
        if meta.spec != spec_json(self.spec) {
            return Err(format!(
                "the saved windows are {}, this rule's are {}",
                meta.spec, self.spec
            ));
        }
        if meta.per_device != self.per_device {
            let how = |per_device| {
                if per_device {
                    "per device"
                } else {
                    "across devices"
                }
            };
            return Err(format!(
                "the saved windows close {}, this rule's close {}",
                how(meta.per_device),
                how(self.per_device)
            ));
        }
        if meta.key_columns != self.key_types.len() {
            return Err(format!(
                "the saved windows have {} group keys, this rule has {}",
                meta.key_columns,
                self.key_types.len()
            ));
        }
        Ok(())
    }

    /// The saved key columns of `n` windows, in Arrow's row format.
    fn restore_keys(&self, s: &Snapshot, name: &str, n: usize) -> Result<Vec<Box<[u8]>>, String> {
        let columns = s.arrays(name, Some(self.key_types.len()))?;
        if columns.is_empty() {
            return Ok(vec![Box::default(); n]);
        }
        for (column, ty) in columns.iter().zip(&self.key_types) {
            if column.len() != n {
                return Err(format!(
                    "snapshot part '{name}' holds {} values for {n} windows",
                    column.len()
                ));
            }
            if column.data_type() != ty {
                return Err(format!(
                    "snapshot part '{name}' holds a key of {}, this rule's is {ty}",
                    column.data_type()
                ));
            }
        }
        let rows = self
            .converter
            .convert_columns(&columns)
            .map_err(|e| format!("snapshot part '{name}': {e}"))?;
        Ok(rows.iter().map(|r| r.data().into()).collect())
    }
}

/// What a snapshot of open windows was made by, checked on restore.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotMeta {
    spec: serde_json::Value,
    per_device: bool,
    key_columns: usize,
    /// The aggregates' names, in order.
    aggregates: Vec<String>,
    windows: usize,
}

/// A window spec as JSON (`WindowSpec` has no serde of its own).
fn spec_json(spec: WindowSpec) -> serde_json::Value {
    match spec {
        WindowSpec::Tumble { size } => serde_json::json!({ "tumble": { "size": size } }),
        WindowSpec::Hop { slide, size } => {
            serde_json::json!({ "hop": { "slide": slide, "size": size } })
        }
        WindowSpec::Session { gap } => serde_json::json!({ "session": { "gap": gap } }),
    }
}

/// Bytes counted for a new group in the state size.
fn group_bytes(key: &[u8], accumulators: &[Box<dyn Accumulator>]) -> usize {
    std::mem::size_of::<Group>() + key.len() + accumulators.iter().map(|a| a.size()).sum::<usize>()
}

/// An accumulator's state, leaving an equal accumulator in its place.
/// `state()` may consume what it returns (`string_agg` and `count(DISTINCT)`
/// over strings do), so the state is merged back into a fresh one, the way a
/// restore rebuilds it.
fn take_state(
    expr: &AggregateFunctionExpr,
    acc: &mut Box<dyn Accumulator>,
) -> DfResult<Vec<ScalarValue>> {
    let state = acc.state()?;
    let mut fresh = expr.create_accumulator()?;
    if !state.is_empty() {
        let arrays = state
            .iter()
            .map(ScalarValue::to_array)
            .collect::<DfResult<Vec<_>>>()?;
        fresh.merge_batch(&arrays)?;
    }
    *acc = fresh;
    Ok(state)
}

/// One state field of every saved group, as the field's type.
fn state_array(values: Vec<ScalarValue>, ty: &DataType) -> DfResult<ArrayRef> {
    if values.is_empty() {
        return Ok(new_empty_array(ty));
    }
    let array = ScalarValue::iter_to_array(values)?;
    if array.data_type().equals_datatype(ty) {
        Ok(array)
    } else {
        Ok(cast(&array, ty)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, RecordBatch, StringArray};
    use arrow::datatypes::{Field, FieldRef, Schema};
    use datafusion::functions_aggregate::{
        array_agg::array_agg_udaf, count::count_udaf, sum::sum_udaf,
    };
    use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
    use datafusion::logical_expr::{AggregateUDF, AggregateUDFImpl, Signature, Volatility};
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    const GAP: i64 = 10;

    /// Event time, group key, value.
    type Event = (i64, &'static str, f64);

    fn rows_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Float64, false),
            Field::new("tag", DataType::Utf8, false),
        ]))
    }

    /// An aggregate without state (its value is a constant): zero state
    /// arrays must save and restore.
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct Stateless {
        signature: Signature,
    }

    impl AggregateUDFImpl for Stateless {
        fn name(&self) -> &str {
            "stateless"
        }
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
            Ok(DataType::Int64)
        }
        fn accumulator(&self, _: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
            Ok(Box::new(Seven))
        }
        fn state_fields(&self, _: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
            Ok(Vec::new())
        }
    }

    #[derive(Debug)]
    struct Seven;

    impl Accumulator for Seven {
        fn update_batch(&mut self, _: &[ArrayRef]) -> DfResult<()> {
            Ok(())
        }
        fn evaluate(&mut self) -> DfResult<ScalarValue> {
            Ok(ScalarValue::Int64(Some(7)))
        }
        fn size(&self) -> usize {
            std::mem::size_of::<Self>()
        }
        fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
            Ok(Vec::new())
        }
        fn merge_batch(&mut self, _: &[ArrayRef]) -> DfResult<()> {
            Ok(())
        }
    }

    /// `sum(v)`; `count(DISTINCT tag)`, whose `state()` empties it;
    /// `array_agg(v)`, which tells merge order; `stateless(v)`.
    fn aggregates(names: &[&str]) -> Vec<Aggregate> {
        let schema = rows_schema();
        names
            .iter()
            .map(|name| {
                let (udf, arg) = match *name {
                    "sum" => (sum_udaf(), "v"),
                    "tags" => (count_udaf(), "tag"),
                    "values" => (array_agg_udaf(), "v"),
                    "stateless" => (
                        Arc::new(AggregateUDF::from(Stateless {
                            signature: Signature::any(1, Volatility::Immutable),
                        })),
                        "v",
                    ),
                    other => panic!("no aggregate {other}"),
                };
                let mut builder = AggregateExprBuilder::new(udf, vec![col(arg, &schema).unwrap()])
                    .schema(schema.clone())
                    .alias(*name);
                if *name == "tags" {
                    builder = builder.distinct();
                }
                let expr = Arc::new(builder.build().unwrap());
                Aggregate {
                    args: expr.expressions(),
                    expr,
                    filter: None,
                }
            })
            .collect()
    }

    fn sessions(per_device: bool, names: &[&str]) -> WindowState {
        let keys = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        WindowState::new(
            WindowSpec::Session { gap: GAP },
            aggregates(names),
            &keys,
            per_device,
        )
        .unwrap()
    }

    /// Windows keyed by device: the key is the device ("a" is device 0).
    fn device(key: &str) -> u32 {
        u32::from(key.as_bytes()[0] - b'a')
    }

    fn feed(w: &mut WindowState, events: &[Event], partition: u32, offset: u64) {
        let times: Vec<i64> = events.iter().map(|e| e.0).collect();
        let k: ArrayRef = Arc::new(StringArray::from_iter_values(events.iter().map(|e| e.1)));
        let v = Float64Array::from_iter_values(events.iter().map(|e| e.2));
        let tag = StringArray::from_iter_values(events.iter().map(|e| format!("t{}", e.2 % 3.0)));
        let rows = RecordBatch::try_new(rows_schema(), vec![k.clone(), Arc::new(v), Arc::new(tag)])
            .unwrap();
        let args: Vec<Vec<ArrayRef>> = w
            .aggregates()
            .iter()
            .map(|a| {
                a.args
                    .iter()
                    .map(|e| {
                        e.evaluate(&rows)
                            .unwrap()
                            .into_array(rows.num_rows())
                            .unwrap()
                    })
                    .collect()
            })
            .collect();
        let devices: Vec<u32> = if w.per_device {
            events.iter().map(|e| device(e.1)).collect()
        } else {
            Vec::new()
        };
        w.update(&Batch {
            times: &times,
            keys: &[k],
            devices: &devices,
            args: &args,
            filters: &vec![None; args.len()],
            partition,
            offset,
        })
        .unwrap();
    }

    /// Closes the windows that end at or before `watermark`.
    fn close(w: &mut WindowState, watermark: i64) -> Closed {
        let groups = if w.per_device {
            let mut devices: Vec<u32> = w.by_device.keys().copied().collect();
            devices.sort_unstable();
            devices
                .into_iter()
                .flat_map(|d| w.close_device(d, watermark))
                .collect()
        } else {
            w.close_global(watermark)
        };
        w.finish(groups).unwrap()
    }

    type Rows = (Vec<i64>, Vec<i64>, Vec<u64>, Vec<ArrayRef>, Vec<ArrayRef>);

    fn rows(c: Closed) -> Rows {
        (c.starts, c.ends, c.key_hashes, c.keys, c.values)
    }

    fn round_trip(s: &Snapshot) -> Snapshot {
        Snapshot::decode(&s.encode().unwrap()).unwrap()
    }

    const AGGREGATES: [&str; 4] = ["sum", "tags", "values", "stateless"];

    /// Feeds sessions, saves them, restores them into a new state, then
    /// checks that the original, the restored state and one never saved
    /// produce the same rows from the same further events.
    fn sessions_continue_after_a_restore(per_device: bool) {
        let mut plain = sessions(per_device, &AGGREGATES);
        let mut saved = sessions(per_device, &AGGREGATES);
        let mut closed_before = Vec::new();
        for w in [&mut plain, &mut saved] {
            feed(
                w,
                &[(0, "x", 1.0), (5, "a", 2.0), (7, "b", 3.0), (12, "a", 4.0)],
                0,
                0,
            );
            // x closes: a's second session below reuses its number, so a's
            // sessions are not in number order.
            closed_before.push(rows(close(w, 12)));
            feed(w, &[(30, "a", 5.0), (31, "c", 6.0), (33, "b", 7.0)], 1, 100);
            feed(w, &[(8, "b", 8.0), (32, "c", 9.0)], 0, 5);
        }
        assert_eq!(closed_before[0].0, vec![0]);
        assert_eq!(closed_before[0], closed_before[1]);

        let mut s = Snapshot::new();
        saved.snapshot(&mut s, "w").unwrap();
        let s = round_trip(&s);
        let mut restored = sessions(per_device, &AGGREGATES);
        restored.restore(&s, "w", usize::MAX).unwrap();
        assert_eq!(restored.open(), saved.open());
        assert_eq!(restored.open(), 5);
        assert_eq!(restored.bytes, saved.bytes);
        assert_eq!(saved.bytes, plain.bytes);
        for p in 0..2 {
            assert_eq!(restored.retained_from(p), saved.retained_from(p));
        }
        assert_eq!(restored.retained_from(0), Some(0));

        let mut out = Vec::new();
        for w in [&mut plain, &mut saved, &mut restored] {
            // 21 bridges a's two sessions; 40 extends b's second one.
            feed(
                w,
                &[(21, "a", 9.0), (22, "a", 10.0), (40, "b", 11.0)],
                1,
                200,
            );
            let early = rows(close(w, 32));
            feed(w, &[(60, "c", 12.0), (35, "d", 13.0)], 0, 300);
            out.push((early, rows(close(w, i64::MAX)), w.open()));
        }
        assert_eq!(out[0], out[1], "taking a snapshot changed the live state");
        assert_eq!(out[0], out[2], "the restored state differs");
        let (early, all, open) = &out[0];
        assert_eq!(early.0, vec![7], "b's first session");
        assert_eq!(all.0.len(), 5);
        assert_eq!(*open, 0);
        // The merged session of a kept its first session's values first.
        let values = all.4[2].as_any().downcast_ref::<arrow::array::ListArray>();
        let a = all.0.iter().position(|s| *s == 5).unwrap();
        let a = values.unwrap().value(a);
        let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(a.values().to_vec(), vec![2.0, 4.0, 5.0, 9.0, 10.0]);
    }

    #[test]
    fn sessions_across_devices_continue_after_a_restore() {
        sessions_continue_after_a_restore(false);
    }

    #[test]
    fn sessions_per_device_continue_after_a_restore() {
        sessions_continue_after_a_restore(true);
    }

    #[test]
    fn a_state_without_windows_restores() {
        let mut empty = sessions(false, &AGGREGATES);
        let mut s = Snapshot::new();
        empty.snapshot(&mut s, "w").unwrap();
        let mut restored = sessions(false, &AGGREGATES);
        restored.restore(&round_trip(&s), "w", usize::MAX).unwrap();
        assert_eq!(restored.open(), 0);
        assert_eq!(restored.bytes, 0);
        feed(&mut restored, &[(1, "a", 1.0)], 0, 0);
        let closed = close(&mut restored, i64::MAX);
        assert_eq!(closed.starts, vec![1]);
    }

    #[test]
    fn a_snapshot_of_other_windows_is_refused() {
        let mut saved = sessions(false, &["sum", "values"]);
        feed(&mut saved, &[(0, "a", 1.0), (3, "b", 2.0)], 0, 0);
        let mut s = Snapshot::new();
        saved.snapshot(&mut s, "w").unwrap();

        let mut fewer = sessions(false, &["sum"]);
        let err = fewer.restore(&s, "w", usize::MAX).unwrap_err();
        assert!(err.contains("2 aggregates"), "{err}");
        let mut other = sessions(false, &["sum", "tags"]);
        let err = other.restore(&s, "w", usize::MAX).unwrap_err();
        assert!(err.contains("aggregate 2"), "{err}");
        let mut per_device = sessions(true, &["sum", "values"]);
        let err = per_device.restore(&s, "w", usize::MAX).unwrap_err();
        assert!(err.contains("per device"), "{err}");
        let err = fewer.restore(&s, "elsewhere", usize::MAX).unwrap_err();
        assert!(err.contains("elsewhere.meta"), "{err}");
        assert_eq!(fewer.open(), 0);
    }

    #[test]
    fn a_damaged_snapshot_is_an_error_not_a_panic() {
        let mut saved = sessions(true, &["sum", "values"]);
        feed(&mut saved, &[(0, "a", 1.0), (3, "b", 2.0)], 0, 0);
        let mut s = Snapshot::new();
        saved.snapshot(&mut s, "w").unwrap();
        let restore = |s: &Snapshot| {
            let mut w = sessions(true, &["sum", "values"]);
            let result = w.restore(s, "w", usize::MAX);
            // A failed restore leaves the state as it was.
            assert!(result.is_ok() || w.open() == 0);
            result
        };
        restore(&s).unwrap();

        let mut short = s.clone();
        short.put_i64s("w.groups.start", &[0]).unwrap();
        let err = restore(&short).unwrap_err();
        assert!(err.contains("w.groups.start"), "{err}");

        let mut wrong_type = s.clone();
        wrong_type.put_strings("w.acc0", ["1", "2"]).unwrap();
        let err = restore(&wrong_type).unwrap_err();
        assert!(err.contains("w.acc0"), "{err}");

        let mut no_state = s.clone();
        no_state.put_arrays("w.acc1", Vec::new()).unwrap();
        let err = restore(&no_state).unwrap_err();
        assert!(err.contains("w.acc1"), "{err}");

        let mut keys = s.clone();
        keys.put_u32s("w.groups.key", &[1, 2]).unwrap();
        let err = restore(&keys).unwrap_err();
        assert!(err.contains("w.groups.key"), "{err}");

        let mut times = s.clone();
        times.put_i64s("w.groups.last", &[100, 100]).unwrap();
        let err = restore(&times).unwrap_err();
        assert!(err.contains("damaged"), "{err}");

        let mut offsets = s.clone();
        offsets.put_u32s("w.groups.from.len", &[2, 2]).unwrap();
        assert!(restore(&offsets).is_err());
    }
}
