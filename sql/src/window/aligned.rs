//! Tumbling and hopping windows, vectorized: all groups of one window (a
//! "slot", keyed by its start) share one DataFusion `GroupsAccumulator` per
//! aggregate, so a batch is folded with one `update_batch` call per
//! aggregate and slot, whatever the number of devices.
//!
//! Groups become *due* when their watermark passes the window's end. A slot
//! whose groups are all due is finished with `EmitTo::All`. When only some
//! are (windows keyed by device close on each device's own clock), the slot's
//! state is taken out, the due groups are finished from their share of it and
//! the rest is merged back: the partial-then-final path DataFusion's
//! aggregates already support, so every aggregate behaves the same.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{Array, ArrayRef, BooleanArray, UInt32Array};
use arrow::compute::{and, concat, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::RowConverter;
use datafusion::common::HashMap;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;

use super::WindowSpec;
use super::state::{Aggregate, Batch, Closed, key_converter, value_types};

type DfResult<T> = datafusion::error::Result<T>;

/// The groups of one window.
struct Slot {
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Key id → group index.
    groups: HashMap<u32, u32>,
    /// Group index → key id.
    keys: Vec<u32>,
    due: Vec<bool>,
    due_count: usize,
    /// First offset of each partition that fed the slot.
    from: Vec<(u32, u64)>,
}

/// Open tumbling or hopping windows of one rule.
pub struct AlignedState {
    size: i64,
    aggregates: Vec<Aggregate>,
    value_types: Vec<DataType>,
    converter: RowConverter,
    key_count: usize,
    per_device: bool,
    /// Group keys (Arrow row format) seen so far, interned.
    key_ids: HashMap<Box<[u8]>, u32>,
    key_bytes: Vec<Box<[u8]>>,
    key_hashes: Vec<u64>,
    /// Device → its keys (windows keyed by device).
    device_keys: HashMap<u32, Vec<u32>>,
    /// Device → its key id, when the key is the device alone.
    device_key_id: Vec<u32>,
    slots: BTreeMap<i64, Slot>,
    /// Slots with due groups.
    dirty: BTreeSet<i64>,
    /// Buffers reused from batch to batch.
    scratch_ids: Vec<u32>,
    scratch_indices: Vec<usize>,
}

impl std::fmt::Debug for AlignedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedState")
            .field("slots", &self.slots.len())
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
        Ok(AlignedState {
            size: spec.size().unwrap_or(1),
            aggregates,
            value_types,
            converter,
            key_count: key_schema.fields().len(),
            per_device,
            key_ids: HashMap::default(),
            key_bytes: Vec::new(),
            key_hashes: Vec::new(),
            device_keys: HashMap::default(),
            device_key_id: Vec::new(),
            slots: BTreeMap::new(),
            dirty: BTreeSet::new(),
            scratch_ids: Vec::new(),
            scratch_indices: Vec::new(),
        })
    }

    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }

    /// Open (window, group) pairs.
    pub fn open(&self) -> usize {
        self.slots.values().map(|s| s.keys.len()).sum()
    }

    /// Bytes held, roughly.
    pub fn size(&self) -> usize {
        let slots: usize = self
            .slots
            .values()
            .map(|s| {
                s.accumulators.iter().map(|a| a.size()).sum::<usize>()
                    + s.groups.capacity() * 16
                    + s.keys.capacity() * 5
            })
            .sum();
        slots + self.key_bytes.iter().map(|k| k.len() + 40).sum::<usize>()
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
        if self.per_device
            && let Some(d) = device
        {
            self.device_keys.entry(d).or_default().push(id);
        }
        id
    }

    /// Folds rows into their windows: `times` holds each row's window start.
    pub fn update(&mut self, batch: &Batch<'_>) -> DfResult<()> {
        let rows = batch.times.len();
        if rows == 0 {
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

    fn fold_rows(&mut self, batch: &Batch<'_>, ids: &[u32]) -> DfResult<()> {
        let rows = batch.times.len();
        // The windows these rows fall in: usually one or two per batch.
        let mut starts: Vec<i64> = Vec::new();
        for (i, s) in batch.times.iter().enumerate() {
            if (i == 0 || *s != batch.times[i - 1]) && !starts.contains(s) {
                starts.push(*s);
            }
        }
        let mut indices = std::mem::take(&mut self.scratch_indices);
        indices.clear();
        indices.resize(rows, 0);
        let single = starts.len() == 1;
        for start in starts {
            let slot = match self.slots.get_mut(&start) {
                Some(s) => s,
                None => {
                    let accumulators = self
                        .aggregates
                        .iter()
                        .map(new_accumulator)
                        .collect::<DfResult<Vec<_>>>()?;
                    self.slots.entry(start).or_insert(Slot {
                        accumulators,
                        groups: HashMap::default(),
                        keys: Vec::new(),
                        due: Vec::new(),
                        due_count: 0,
                        from: Vec::new(),
                    })
                }
            };
            if !slot.from.iter().any(|(p, _)| *p == batch.partition) {
                slot.from.push((batch.partition, batch.offset));
            }
            let all = single;
            let mut mask = Vec::with_capacity(if single { 0 } else { rows });
            let mut last_key = u32::MAX;
            let mut last_group = 0u32;
            for i in 0..rows {
                if !single {
                    if batch.times[i] != start {
                        mask.push(false);
                        indices[i] = 0;
                        continue;
                    }
                    mask.push(true);
                }
                let key = ids[i];
                if key != last_key {
                    last_group = match slot.groups.get(&key) {
                        Some(g) => *g,
                        None => {
                            let g = slot.keys.len() as u32;
                            slot.groups.insert(key, g);
                            slot.keys.push(key);
                            slot.due.push(false);
                            g
                        }
                    };
                    last_key = key;
                }
                indices[i] = last_group as usize;
            }
            let total = slot.keys.len();
            let in_slot = (!all).then(|| BooleanArray::from(mask));
            for (j, acc) in slot.accumulators.iter_mut().enumerate() {
                let filter = match (&in_slot, &batch.filters[j]) {
                    (None, None) => None,
                    (Some(m), None) => Some(m.clone()),
                    (None, Some(f)) => Some(f.clone()),
                    (Some(m), Some(f)) => Some(and(m, f)?),
                };
                acc.update_batch(&batch.args[j], &indices, filter.as_ref(), total)?;
            }
        }
        self.scratch_indices = indices;
        Ok(())
    }

    fn mark(slot: &mut Slot, group: u32) -> bool {
        let g = group as usize;
        if slot.due[g] {
            return false;
        }
        slot.due[g] = true;
        slot.due_count += 1;
        true
    }

    /// Marks the windows of `device` that end at or before `watermark` due.
    pub fn due_device(&mut self, device: u32, watermark: i64) {
        let Some(keys) = self.device_keys.get(&device) else {
            return;
        };
        let last_start = watermark.saturating_sub(self.size);
        for (start, slot) in self.slots.range_mut(..=last_start) {
            for key in keys {
                if let Some(g) = slot.groups.get(key).copied()
                    && Self::mark(slot, g)
                {
                    self.dirty.insert(*start);
                }
            }
        }
    }

    /// Marks every window of `device` due (it went silent); returns the
    /// latest end among them.
    pub fn due_device_all(&mut self, device: u32) -> Option<i64> {
        let keys = self.device_keys.get(&device)?;
        let mut latest = None;
        for (start, slot) in self.slots.iter_mut() {
            for key in keys {
                if let Some(g) = slot.groups.get(key).copied() {
                    Self::mark(slot, g);
                    self.dirty.insert(*start);
                    latest = Some(start + self.size);
                }
            }
        }
        latest
    }

    /// Marks every window that ends at or before `watermark` due.
    pub fn due_global(&mut self, watermark: i64) {
        let last_start = watermark.saturating_sub(self.size);
        for (start, slot) in self.slots.range_mut(..=last_start) {
            for g in 0..slot.keys.len() as u32 {
                Self::mark(slot, g);
            }
            if slot.due_count > 0 {
                self.dirty.insert(*start);
            }
        }
    }

    /// Finishes the due windows.
    pub fn take_due(&mut self) -> DfResult<Option<Closed>> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        let mut starts = Vec::new();
        let mut keys: Vec<u32> = Vec::new();
        let mut values: Vec<Vec<ArrayRef>> = vec![Vec::new(); self.aggregates.len()];
        for start in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.slots.get_mut(&start) else {
                continue;
            };
            if slot.due_count == 0 {
                continue;
            }
            if slot.due_count == slot.keys.len() {
                let Some(mut slot) = self.slots.remove(&start) else {
                    continue;
                };
                for (j, acc) in slot.accumulators.iter_mut().enumerate() {
                    values[j].push(acc.evaluate(EmitTo::All)?);
                }
                starts.extend(std::iter::repeat_n(start, slot.keys.len()));
                keys.extend(slot.keys);
                continue;
            }
            // Some groups are due: take the state out, finish theirs, merge
            // the rest back.
            let due: Vec<u32> = (0..slot.keys.len() as u32)
                .filter(|g| slot.due[*g as usize])
                .collect();
            let kept: Vec<u32> = (0..slot.keys.len() as u32)
                .filter(|g| !slot.due[*g as usize])
                .collect();
            let due_idx = UInt32Array::from(due.clone());
            let kept_idx = UInt32Array::from(kept.clone());
            let due_groups: Vec<usize> = (0..due.len()).collect();
            let kept_groups: Vec<usize> = (0..kept.len()).collect();
            for (j, acc) in slot.accumulators.iter_mut().enumerate() {
                let state = acc.state(EmitTo::All)?;
                let pick = |idx: &UInt32Array| {
                    state
                        .iter()
                        .map(|s| take(s.as_ref(), idx, None))
                        .collect::<Result<Vec<_>, _>>()
                };
                let mut finished = new_accumulator(&self.aggregates[j])?;
                finished.merge_batch(&pick(&due_idx)?, &due_groups, due.len())?;
                values[j].push(finished.evaluate(EmitTo::All)?);
                // `state(EmitTo::All)` left the accumulator empty.
                acc.merge_batch(&pick(&kept_idx)?, &kept_groups, kept.len())?;
            }
            starts.extend(std::iter::repeat_n(start, due.len()));
            keys.extend(due.iter().map(|g| slot.keys[*g as usize]));
            let kept_keys: Vec<u32> = kept.iter().map(|g| slot.keys[*g as usize]).collect();
            slot.groups = kept_keys
                .iter()
                .enumerate()
                .map(|(g, k)| (*k, g as u32))
                .collect();
            slot.keys = kept_keys;
            slot.due = vec![false; slot.keys.len()];
            slot.due_count = 0;
        }
        if starts.is_empty() {
            return Ok(None);
        }
        let values = values
            .into_iter()
            .zip(&self.value_types)
            .map(|(parts, ty)| {
                let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
                let array = concat(&refs)?;
                Ok(if array.data_type() == ty {
                    array
                } else {
                    arrow::compute::cast(&array, ty)?
                })
            })
            .collect::<DfResult<Vec<_>>>()?;
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
}
