//! Tumbling and hopping windows, vectorized: every open (window, group key)
//! pair of a rule is one group of a single DataFusion `GroupsAccumulator`
//! per aggregate, so a batch is folded with one `update_batch` call per
//! aggregate, whatever the number of devices and windows it touches.
//!
//! Groups become *due* when their watermark passes the window's end; windows
//! keyed by device close on each device's own clock, so groups fall due in
//! any order. Due groups are finished through the partial-then-final path
//! DataFusion's aggregates already support, so every aggregate behaves the
//! same: the accumulators' state is taken out, the due groups' share is
//! merged into fresh accumulators and evaluated, and the rest is merged back
//! in place. Emitted groups leave holes in the numbering until the holes
//! outnumber the open groups; then the open ones are renumbered densely.

use std::collections::BTreeMap;

use arrow::array::{Array, ArrayRef, UInt32Array, new_empty_array};
use arrow::compute::{TakeOptions, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::RowConverter;
use datafusion::common::HashMap;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;

use tributary_engine::snapshot::Snapshot;

use super::WindowSpec;
use super::state::{Aggregate, Batch, Closed, key_converter, value_types};

type DfResult<T> = datafusion::error::Result<T>;

/// Indices are checked: a bad one is an error, never a panic.
const CHECKED: Option<TakeOptions> = Some(TakeOptions { check_bounds: true });

/// The key of a group whose row was emitted (a hole in the numbering).
const EMITTED: u32 = u32::MAX;

/// Renumbering is not worth it below this many groups.
const COMPACT_MIN: usize = 1024;

/// A slot in a snapshot: (window start, live groups, first offsets).
type SavedSlot = (i64, usize, Vec<(u32, u64)>);

/// The open groups of one window start.
#[derive(Default)]
struct Slot {
    /// Its groups (kept for windows across devices, which close a slot at
    /// a time).
    groups: Vec<u32>,
    /// Groups not yet due.
    live: usize,
    /// First offset of each partition that fed the slot.
    from: Vec<(u32, u64)>,
}

/// Open tumbling or hopping windows of one rule.
pub struct AlignedState {
    size: i64,
    aggregates: Vec<Aggregate>,
    value_types: Vec<DataType>,
    /// One per aggregate, over every open group.
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    converter: RowConverter,
    key_count: usize,
    per_device: bool,
    /// Group keys (Arrow row format) seen so far, interned.
    key_ids: HashMap<Box<[u8]>, u32>,
    key_bytes: Vec<Box<[u8]>>,
    key_hashes: Vec<u64>,
    /// Key id → its open windows: (window start, group).
    open: Vec<Vec<(i64, u32)>>,
    /// Device → its key ids (windows keyed by device).
    device_keys: Vec<Vec<u32>>,
    /// Device → its key id, when the key is the device alone.
    device_key_id: Vec<u32>,
    /// Group → its key id, or [`EMITTED`].
    group_keys: Vec<u32>,
    /// Group → its window start.
    group_starts: Vec<i64>,
    /// Groups that are neither emitted nor due.
    live: usize,
    slots: BTreeMap<i64, Slot>,
    /// Groups whose watermark passed their end, to emit.
    due: Vec<u32>,
    /// Buffers reused from batch to batch.
    scratch_ids: Vec<u32>,
    scratch_indices: Vec<usize>,
}

impl std::fmt::Debug for AlignedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedState")
            .field("slots", &self.slots.len())
            .field("open", &self.live)
            .finish()
    }
}

fn new_accumulator(a: &Aggregate) -> DfResult<Box<dyn GroupsAccumulator>> {
    if a.expr.groups_accumulator_supported() {
        return a.expr.create_groups_accumulator();
    }
    let expr = a.expr.clone();
    Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
        expr.create_accumulator()
    })))
}

impl AlignedState {
    pub fn new(
        spec: WindowSpec,
        aggregates: Vec<Aggregate>,
        key_schema: &SchemaRef,
        per_device: bool,
    ) -> DfResult<Self> {
        let converter = key_converter(key_schema)?;
        let value_types = value_types(&aggregates);
        let accumulators = aggregates
            .iter()
            .map(new_accumulator)
            .collect::<DfResult<Vec<_>>>()?;
        Ok(AlignedState {
            size: spec.size().unwrap_or(1),
            aggregates,
            value_types,
            accumulators,
            converter,
            key_count: key_schema.fields().len(),
            per_device,
            key_ids: HashMap::default(),
            key_bytes: Vec::new(),
            key_hashes: Vec::new(),
            open: Vec::new(),
            device_keys: Vec::new(),
            device_key_id: Vec::new(),
            group_keys: Vec::new(),
            group_starts: Vec::new(),
            live: 0,
            slots: BTreeMap::new(),
            due: Vec::new(),
            scratch_ids: Vec::new(),
            scratch_indices: Vec::new(),
        })
    }

    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }

    /// Open (window, group) pairs.
    pub fn open(&self) -> usize {
        self.live + self.due.len()
    }

    /// Bytes held, roughly.
    pub fn size(&self) -> usize {
        let accumulators: usize = self.accumulators.iter().map(|a| a.size()).sum();
        let groups = self.group_keys.capacity() * 12;
        let open: usize = self.open.iter().map(|o| 24 + o.capacity() * 16).sum();
        let slots: usize = self
            .slots
            .values()
            .map(|s| 64 + s.groups.capacity() * 4 + s.from.capacity() * 16)
            .sum();
        let keys: usize = self.key_bytes.iter().map(|k| k.len() + 48).sum();
        accumulators + groups + open + slots + keys
    }

    pub fn retained_from(&self, partition: u32) -> Option<u64> {
        self.slots
            .values()
            .flat_map(|s| s.from.iter())
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .min()
    }

    /// The key id of each row when the key is the device alone: no row
    /// conversion, a lookup per run of one device's rows.
    fn device_key_ids(&mut self, batch: &Batch<'_>) -> DfResult<Option<Vec<u32>>> {
        let rows = batch.times.len();
        if !(self.per_device && self.key_count == 1 && batch.devices.len() == rows)
            || batch.devices.contains(&u32::MAX)
        {
            return Ok(None);
        }
        let mut ids = std::mem::take(&mut self.scratch_ids);
        ids.clear();
        let mut last = u32::MAX;
        let mut current = 0;
        for (i, d) in batch.devices.iter().enumerate() {
            if *d != last {
                last = *d;
                current = match self.device_key_id.get(*d as usize).copied() {
                    Some(id) if id != u32::MAX => id,
                    _ => {
                        let row = self
                            .converter
                            .convert_columns(&[batch.keys[0].slice(i, 1)])?;
                        let id = self.intern(row.row(0).data(), Some(*d));
                        if self.device_key_id.len() <= *d as usize {
                            self.device_key_id.resize(*d as usize + 1, u32::MAX);
                        }
                        self.device_key_id[*d as usize] = id;
                        id
                    }
                };
            }
            ids.push(current);
        }
        Ok(Some(ids))
    }

    /// The id of a key, adding it if new.
    fn intern(&mut self, key: &[u8], device: Option<u32>) -> u32 {
        if let Some(id) = self.key_ids.get(key) {
            return *id;
        }
        let id = self.key_bytes.len() as u32;
        let bytes: Box<[u8]> = key.into();
        self.key_ids.insert(bytes.clone(), id);
        self.key_hashes.push(super::state::key_hash(&bytes));
        self.key_bytes.push(bytes);
        self.open.push(Vec::new());
        if self.per_device
            && let Some(d) = device
        {
            let d = d as usize;
            if self.device_keys.len() <= d {
                self.device_keys.resize_with(d + 1, Vec::new);
            }
            self.device_keys[d].push(id);
        }
        id
    }

    /// Folds rows into their windows: `times` holds each row's window start.
    pub fn update(&mut self, batch: &Batch<'_>) -> DfResult<()> {
        if batch.times.is_empty() {
            return Ok(());
        }
        let ids = match self.device_key_ids(batch)? {
            Some(ids) => ids,
            None => self.key_ids_of(batch)?,
        };
        let folded = self.fold_rows(batch, &ids);
        self.scratch_ids = ids;
        folded
    }

    /// The key id of each row, through Arrow's row format.
    fn key_ids_of(&mut self, batch: &Batch<'_>) -> DfResult<Vec<u32>> {
        let rows = batch.times.len();
        let converted = if self.key_count > 0 {
            Some(self.converter.convert_columns(batch.keys)?)
        } else {
            None
        };
        let key_of = |i: usize| converted.as_ref().map_or(&[][..], |k| k.row(i).data());
        // Intern the keys, once per run of equal keys.
        let mut ids = Vec::with_capacity(rows);
        let mut current = 0;
        for i in 0..rows {
            if i == 0 || key_of(i) != key_of(i - 1) {
                current = self.intern(key_of(i), batch.devices.get(i).copied());
            }
            ids.push(current);
        }
        Ok(ids)
    }

    /// A new group for window `start` of key `key`.
    fn new_group(&mut self, key: u32, start: i64) -> u32 {
        let g = self.group_keys.len() as u32;
        self.group_keys.push(key);
        self.group_starts.push(start);
        self.open[key as usize].push((start, g));
        let slot = self.slots.entry(start).or_default();
        if !self.per_device {
            slot.groups.push(g);
        }
        slot.live += 1;
        self.live += 1;
        g
    }

    fn fold_rows(&mut self, batch: &Batch<'_>, ids: &[u32]) -> DfResult<()> {
        let mut indices = std::mem::take(&mut self.scratch_indices);
        indices.clear();
        // The window starts these rows fall in: a handful per batch.
        let mut fed: Vec<i64> = Vec::new();
        let mut last = (u32::MAX, i64::MIN);
        let mut group = 0u32;
        for (key, start) in ids.iter().zip(batch.times) {
            if (*key, *start) != last {
                last = (*key, *start);
                group = match self.open[*key as usize].iter().find(|(s, _)| s == start) {
                    Some((_, g)) => *g,
                    None => self.new_group(*key, *start),
                };
                if !fed.contains(start) {
                    fed.push(*start);
                }
            }
            indices.push(group as usize);
        }
        for start in fed {
            if let Some(slot) = self.slots.get_mut(&start)
                && !slot.from.iter().any(|(p, _)| *p == batch.partition)
            {
                slot.from.push((batch.partition, batch.offset));
            }
        }
        let total = self.group_keys.len();
        let result = self
            .accumulators
            .iter_mut()
            .enumerate()
            .try_for_each(|(j, acc)| {
                acc.update_batch(&batch.args[j], &indices, batch.filters[j].as_ref(), total)
            });
        self.scratch_indices = indices;
        result
    }

    /// Counts a group as due: it leaves its slot's open groups.
    fn mark(
        slots: &mut BTreeMap<i64, Slot>,
        due: &mut Vec<u32>,
        live: &mut usize,
        start: i64,
        group: u32,
    ) {
        due.push(group);
        *live -= 1;
        if let Some(slot) = slots.get_mut(&start) {
            slot.live -= 1;
            if slot.live == 0 {
                slots.remove(&start);
            }
        }
    }

    /// Marks the windows of `device` that end at or before `watermark` due.
    pub fn due_device(&mut self, device: u32, watermark: i64) {
        let last_start = watermark.saturating_sub(self.size);
        let Some(keys) = self.device_keys.get(device as usize) else {
            return;
        };
        for key in keys {
            self.open[*key as usize].retain(|(start, g)| {
                if *start > last_start {
                    return true;
                }
                Self::mark(&mut self.slots, &mut self.due, &mut self.live, *start, *g);
                false
            });
        }
    }

    /// Marks every window of `device` due (it went silent); returns the
    /// latest end among them.
    pub fn due_device_all(&mut self, device: u32) -> Option<i64> {
        let keys = self.device_keys.get(device as usize)?;
        let mut latest = None;
        for key in keys {
            for (start, g) in std::mem::take(&mut self.open[*key as usize]) {
                Self::mark(&mut self.slots, &mut self.due, &mut self.live, start, g);
                latest = latest.max(Some(start + self.size));
            }
        }
        latest
    }

    /// Marks every window that ends at or before `watermark` due.
    pub fn due_global(&mut self, watermark: i64) {
        let last_start = watermark.saturating_sub(self.size);
        while let Some(entry) = self.slots.first_entry() {
            if *entry.key() > last_start {
                break;
            }
            let start = *entry.key();
            let slot = entry.remove();
            for g in slot.groups {
                let key = self.group_keys[g as usize];
                if key == EMITTED {
                    continue;
                }
                self.open[key as usize].retain(|(s, _)| *s != start);
                self.due.push(g);
                self.live -= 1;
            }
        }
    }

    /// Finishes the due windows.
    pub fn take_due(&mut self) -> DfResult<Option<Closed>> {
        if self.due.is_empty() {
            return Ok(None);
        }
        // In window order, for readers of the output.
        let mut order: Vec<(i64, u32)> = self
            .due
            .drain(..)
            .map(|g| (self.group_starts[g as usize], g))
            .collect();
        order.sort_unstable();
        let due: Vec<u32> = order.iter().map(|(_, g)| *g).collect();
        let starts: Vec<i64> = order.iter().map(|(s, _)| *s).collect();
        let keys: Vec<u32> = due.iter().map(|g| self.group_keys[*g as usize]).collect();
        for g in &due {
            self.group_keys[*g as usize] = EMITTED;
        }
        let values = self.finish(due)?;
        let key_hashes: Vec<u64> = keys.iter().map(|k| self.key_hashes[*k as usize]).collect();
        let key_columns = if self.key_count == 0 {
            Vec::new()
        } else {
            let parser = self.converter.parser();
            self.converter.convert_rows(
                keys.iter()
                    .map(|k| parser.parse(&self.key_bytes[*k as usize])),
            )?
        };
        let ends = starts.iter().map(|s| s + self.size).collect();
        Ok(Some(Closed {
            starts,
            ends,
            keys: key_columns,
            key_hashes,
            values,
        }))
    }

    /// The final values of the `due` groups (already marked emitted). The
    /// open groups stay where they are, and so does the spent state of the
    /// emitted ones, never read again, until the holes outnumber the open
    /// groups: then the open ones are renumbered densely.
    fn finish(&mut self, due: Vec<u32>) -> DfResult<Vec<ArrayRef>> {
        let total = self.group_keys.len();
        let due_count = due.len();
        let due_idx = UInt32Array::from(due);
        let mut values = Vec::with_capacity(self.accumulators.len());
        if self.live == 0 {
            // Nothing stays open: evaluate everything, keep the due rows.
            for acc in self.accumulators.iter_mut() {
                values.push(take(
                    acc.evaluate(EmitTo::All)?.as_ref(),
                    &due_idx,
                    CHECKED,
                )?);
            }
            self.group_keys.clear();
            self.group_starts.clear();
        } else {
            let compact = total >= COMPACT_MIN && self.live * 2 < total;
            let kept: Option<Vec<u32>> = compact.then(|| {
                (0..total as u32)
                    .filter(|g| self.group_keys[*g as usize] != EMITTED)
                    .collect()
            });
            let kept_idx = kept.as_ref().map(|k| UInt32Array::from(k.clone()));
            let due_groups: Vec<usize> = (0..due_count).collect();
            let mut identity = std::mem::take(&mut self.scratch_indices);
            identity.clear();
            identity.extend(0..kept.as_ref().map_or(total, Vec::len));
            for (j, acc) in self.accumulators.iter_mut().enumerate() {
                let state = acc.state(EmitTo::All)?;
                let pick = |idx: &UInt32Array| {
                    state
                        .iter()
                        .map(|s| take(s.as_ref(), idx, CHECKED))
                        .collect::<Result<Vec<_>, _>>()
                };
                let mut finished = new_accumulator(&self.aggregates[j])?;
                finished.merge_batch(&pick(&due_idx)?, &due_groups, due_count)?;
                values.push(finished.evaluate(EmitTo::All)?);
                // `state(EmitTo::All)` left the accumulator empty: put the
                // open groups back (with the spent ones, unless compacting).
                match &kept_idx {
                    Some(idx) => acc.merge_batch(&pick(idx)?, &identity, identity.len())?,
                    None => acc.merge_batch(&state, &identity, total)?,
                }
            }
            self.scratch_indices = identity;
            if let Some(kept) = kept {
                self.renumber(&kept);
            }
        }
        values
            .into_iter()
            .zip(&self.value_types)
            .map(|(array, ty)| {
                Ok(if array.data_type() == ty {
                    array
                } else {
                    arrow::compute::cast(&array, ty)?
                })
            })
            .collect()
    }

    /// Saves the open windows into `s`, under `prefix`, as they are numbered
    /// now (emitted groups' spent state included), so a restore continues
    /// exactly where this state is. Device numbers are the watermarks'.
    pub fn snapshot(&mut self, s: &mut Snapshot, prefix: &str) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        let slots: Vec<SavedSlot> = self
            .slots
            .iter()
            .map(|(start, slot)| (*start, slot.live, slot.from.clone()))
            .collect();
        s.put_json(
            &part("meta"),
            &serde_json::json!({
                "size": self.size,
                "key_count": self.key_count,
                "per_device": self.per_device,
                "aggregates": self.accumulators.len(),
                "live": self.live,
                "keys": self.key_bytes.len(),
                "slots": slots,
            }),
        )?;
        let slot_groups: Vec<Vec<u32>> = self.slots.values().map(|s| s.groups.clone()).collect();
        s.put_nested_u32s(&part("slot_groups"), &slot_groups)?;
        // Keys as typed columns: Arrow's row format is not promised to stay
        // the same from one Arrow version to the next.
        let key_columns = if self.key_count == 0 || self.key_bytes.is_empty() {
            Vec::new()
        } else {
            let parser = self.converter.parser();
            self.converter
                .convert_rows(self.key_bytes.iter().map(|k| parser.parse(k)))
                .map_err(|e| e.to_string())?
        };
        s.put_arrays(&part("keys"), key_columns)?;
        let open_len: Vec<u32> = self.open.iter().map(|o| o.len() as u32).collect();
        let (open_start, open_group): (Vec<i64>, Vec<u32>) =
            self.open.iter().flatten().copied().unzip();
        s.put_u32s(&part("open.len"), &open_len)?;
        s.put_i64s(&part("open.start"), &open_start)?;
        s.put_u32s(&part("open.group"), &open_group)?;
        s.put_nested_u32s(&part("device_keys"), &self.device_keys)?;
        s.put_u32s(&part("device_key_id"), &self.device_key_id)?;
        s.put_u32s(&part("group_keys"), &self.group_keys)?;
        s.put_i64s(&part("group_starts"), &self.group_starts)?;
        s.put_u32s(&part("due"), &self.due)?;
        let total = self.group_keys.len();
        let identity: Vec<usize> = (0..total).collect();
        for (j, acc) in self.accumulators.iter_mut().enumerate() {
            let state = if total == 0 {
                // The state of no groups, which accumulators behind a
                // `GroupsAccumulatorAdapter` (`approx_distinct`) fail to
                // build.
                let fields = self.aggregates[j]
                    .expr
                    .state_fields()
                    .map_err(|e| e.to_string())?;
                fields
                    .iter()
                    .map(|f| new_empty_array(f.data_type()))
                    .collect()
            } else {
                // Taking the state empties the accumulator: put it straight
                // back.
                let state = acc.state(EmitTo::All).map_err(|e| e.to_string())?;
                acc.merge_batch(&state, &identity, total)
                    .map_err(|e| e.to_string())?;
                state
            };
            s.put_arrays(&part(&format!("acc{j}")), state)?;
        }
        Ok(())
    }

    /// Replaces this (new, empty) state with the one saved under `prefix`,
    /// whose device numbers must be below `devices` (the devices the
    /// restored watermarks know). Nothing changes unless it all fits.
    pub fn restore(&mut self, s: &Snapshot, prefix: &str, devices: usize) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        #[derive(serde::Deserialize)]
        struct Meta {
            size: i64,
            key_count: usize,
            per_device: bool,
            aggregates: usize,
            live: usize,
            keys: usize,
            slots: Vec<SavedSlot>,
        }
        let meta: Meta = s.json(&part("meta"))?;
        if (meta.size, meta.key_count, meta.per_device, meta.aggregates)
            != (
                self.size,
                self.key_count,
                self.per_device,
                self.accumulators.len(),
            )
        {
            return Err("the saved windows are of another plan".into());
        }
        let damaged = |what: &str| format!("the saved windows are damaged: {what}");
        let keys = meta.keys;
        let key_columns = s.arrays(&part("keys"), None)?;
        let key_bytes: Vec<Box<[u8]>> = if key_columns.is_empty() {
            if self.key_count > 0 && keys > 0 {
                return Err(damaged("group keys"));
            }
            vec![Box::default(); keys]
        } else {
            if key_columns.len() != self.key_count || key_columns[0].len() != keys {
                return Err(damaged("group keys"));
            }
            let rows = self
                .converter
                .convert_columns(&key_columns)
                .map_err(|e| format!("the saved group keys do not fit this rule: {e}"))?;
            rows.iter().map(|r| r.data().into()).collect()
        };
        let group_keys = s.u32s(&part("group_keys"))?;
        let group_starts = s.i64s(&part("group_starts"))?;
        let total = group_keys.len();
        if group_starts.len() != total
            || group_keys
                .iter()
                .any(|k| *k != EMITTED && *k as usize >= keys)
        {
            return Err(damaged("group keys"));
        }
        let in_range = |groups: &[u32]| groups.iter().all(|g| (*g as usize) < total);
        let open_len = s.u32s(&part("open.len"))?;
        let open_start = s.i64s(&part("open.start"))?;
        let open_group = s.u32s(&part("open.group"))?;
        if open_len.len() != keys || open_start.len() != open_group.len() || !in_range(&open_group)
        {
            return Err(damaged("open windows"));
        }
        let open = tributary_engine::snapshot::split_by(
            &part("open"),
            &open_len,
            open_start.into_iter().zip(open_group).collect(),
        )?;
        let device_keys = s.nested_u32s(&part("device_keys"))?;
        let device_key_id = s.u32s(&part("device_key_id"))?;
        if device_keys.iter().flatten().any(|k| *k as usize >= keys)
            || device_key_id
                .iter()
                .any(|k| *k != u32::MAX && *k as usize >= keys)
        {
            return Err(damaged("device keys"));
        }
        if device_keys.len() > devices || device_key_id.len() > devices {
            return Err(damaged("they refer to devices the watermarks do not know"));
        }
        let due = s.u32s(&part("due"))?;
        let slot_groups = s.nested_u32s(&part("slot_groups"))?;
        if slot_groups.len() != meta.slots.len()
            || !in_range(&due)
            || !slot_groups.iter().all(|g| in_range(g))
        {
            return Err(damaged("slots"));
        }
        // The numbering must agree with itself: closing windows indexes
        // keys by group and counts down `live` and each slot's live groups.
        let mut open_at = vec![false; total];
        let mut live_by_start: BTreeMap<i64, usize> = BTreeMap::new();
        for (key, windows) in open.iter().enumerate() {
            for &(start, g) in windows {
                let g = g as usize;
                if open_at[g] || group_keys[g] as usize != key || group_starts[g] != start {
                    return Err(damaged("open windows"));
                }
                open_at[g] = true;
                *live_by_start.entry(start).or_default() += 1;
            }
        }
        let live: usize = live_by_start.values().sum();
        let mut due_at = vec![false; total];
        for g in &due {
            let g = *g as usize;
            if due_at[g] || open_at[g] || group_keys[g] == EMITTED {
                return Err(damaged("due windows"));
            }
            due_at[g] = true;
        }
        let unemitted = group_keys.iter().filter(|k| **k != EMITTED).count();
        if meta.live != live || unemitted != live + due.len() {
            return Err(damaged("open windows"));
        }
        let slot_lives: BTreeMap<i64, usize> =
            meta.slots.iter().map(|(s, l, _)| (*s, *l)).collect();
        if slot_lives.len() != meta.slots.len() || slot_lives != live_by_start {
            return Err(damaged("slots"));
        }
        // Windows across devices close a slot's groups at once (each open
        // group of its start, once); per device, slots only count.
        let mut in_slot = vec![false; total];
        for ((start, live, _), groups) in meta.slots.iter().zip(&slot_groups) {
            let expected = if self.per_device { 0 } else { *live };
            if groups.len() != expected {
                return Err(damaged("slots"));
            }
            for g in groups {
                let g = *g as usize;
                if in_slot[g] || !open_at[g] || group_starts[g] != *start {
                    return Err(damaged("slots"));
                }
                in_slot[g] = true;
            }
        }
        let mut accumulators = Vec::with_capacity(self.aggregates.len());
        let identity: Vec<usize> = (0..total).collect();
        for (j, a) in self.aggregates.iter().enumerate() {
            let state = s.arrays(&part(&format!("acc{j}")), None)?;
            // Accumulators take their state's columns as given: a column of
            // another type, or one missing, would panic in `merge_batch`.
            let fields = a.expr.state_fields().map_err(|e| e.to_string())?;
            if state.len() != fields.len()
                || state
                    .iter()
                    .zip(&fields)
                    .any(|(a, f)| a.len() != total || !a.data_type().equals_datatype(f.data_type()))
            {
                return Err(damaged(&format!("the state of aggregate {}", j + 1)));
            }
            let mut acc = new_accumulator(a).map_err(|e| e.to_string())?;
            acc.merge_batch(&state, &identity, total)
                .map_err(|e| format!("aggregate {}: {e}", j + 1))?;
            accumulators.push(acc);
        }
        let key_ids: HashMap<Box<[u8]>, u32> = key_bytes
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u32))
            .collect();
        if key_ids.len() != keys {
            return Err(damaged("a group key saved twice"));
        }
        self.accumulators = accumulators;
        self.key_ids = key_ids;
        self.key_hashes = key_bytes
            .iter()
            .map(|k| super::state::key_hash(k))
            .collect();
        self.key_bytes = key_bytes;
        self.open = open;
        self.device_keys = device_keys;
        self.device_key_id = device_key_id;
        self.group_keys = group_keys;
        self.group_starts = group_starts;
        self.live = meta.live;
        self.slots = meta
            .slots
            .into_iter()
            .zip(slot_groups)
            .map(|((start, live, from), groups)| (start, Slot { groups, live, from }))
            .collect();
        self.due = due;
        Ok(())
    }

    /// Numbers the `kept` groups 0, 1, ... in order.
    fn renumber(&mut self, kept: &[u32]) {
        let mut new_id = vec![EMITTED; self.group_keys.len()];
        for (n, g) in kept.iter().enumerate() {
            new_id[*g as usize] = n as u32;
        }
        self.group_keys = kept.iter().map(|g| self.group_keys[*g as usize]).collect();
        self.group_starts = kept
            .iter()
            .map(|g| self.group_starts[*g as usize])
            .collect();
        for open in &mut self.open {
            for (_, g) in open.iter_mut() {
                *g = new_id[*g as usize];
            }
        }
        for slot in self.slots.values_mut() {
            for g in &mut slot.groups {
                *g = new_id[*g as usize];
            }
        }
    }
}
