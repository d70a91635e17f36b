//! A program's state as a set of named parts, for rule checkpoints.
//!
//! Small, structured parts are JSON; bulk parts (accumulator states, group
//! keys, per-device clocks) are Arrow arrays, written as Arrow IPC. A part's
//! arrays all have the same length (they become the columns of one record
//! batch); anything of another length goes in a part of its own.
//!
//! Reading a part back checks its shape: a snapshot from another plan, or a
//! damaged one, is an error that says which part is wrong, never a panic.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, RecordBatchOptions, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors of snapshots are plain text: they end up in a rule's last error.
pub type SnapshotResult<T> = std::result::Result<T, String>;

#[derive(Debug, Clone)]
enum Part {
    Json(serde_json::Value),
    Arrays(Vec<ArrayRef>),
}

/// Named parts of a program's state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    parts: BTreeMap<String, Part>,
}

const MAGIC: &[u8; 8] = b"TRBSNAP1";

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a value as JSON.
    pub fn put_json<T: Serialize>(&mut self, name: &str, value: &T) -> SnapshotResult<()> {
        let value =
            serde_json::to_value(value).map_err(|e| format!("snapshot part '{name}': {e}"))?;
        self.parts.insert(name.to_string(), Part::Json(value));
        Ok(())
    }

    /// Reads a JSON part back.
    pub fn json<T: DeserializeOwned>(&self, name: &str) -> SnapshotResult<T> {
        match self.parts.get(name) {
            Some(Part::Json(v)) => serde_json::from_value(v.clone())
                .map_err(|e| format!("snapshot part '{name}': {e}")),
            Some(Part::Arrays(_)) => Err(format!("snapshot part '{name}' is not JSON")),
            None => Err(format!("snapshot has no part '{name}'")),
        }
    }

    /// Stores arrays of equal length.
    pub fn put_arrays(&mut self, name: &str, arrays: Vec<ArrayRef>) -> SnapshotResult<()> {
        if let Some(first) = arrays.first()
            && let Some(other) = arrays.iter().find(|a| a.len() != first.len())
        {
            return Err(format!(
                "snapshot part '{name}': arrays of {} and {} values",
                first.len(),
                other.len()
            ));
        }
        self.parts.insert(name.to_string(), Part::Arrays(arrays));
        Ok(())
    }

    /// Reads an array part back: `count` arrays (any number when `None`).
    pub fn arrays(&self, name: &str, count: Option<usize>) -> SnapshotResult<Vec<ArrayRef>> {
        match self.parts.get(name) {
            Some(Part::Arrays(a)) => match count {
                Some(n) if n != a.len() => Err(format!(
                    "snapshot part '{name}' has {} arrays, expected {n}",
                    a.len()
                )),
                _ => Ok(a.clone()),
            },
            Some(Part::Json(_)) => Err(format!("snapshot part '{name}' is not Arrow")),
            None => Err(format!("snapshot has no part '{name}'")),
        }
    }

    fn array(&self, name: &str) -> SnapshotResult<ArrayRef> {
        Ok(self.arrays(name, Some(1))?.remove(0))
    }

    pub fn put_u32s(&mut self, name: &str, values: &[u32]) -> SnapshotResult<()> {
        self.put_arrays(name, vec![Arc::new(UInt32Array::from(values.to_vec()))])
    }

    pub fn u32s(&self, name: &str) -> SnapshotResult<Vec<u32>> {
        let a = self.array(name)?;
        let a = downcast::<UInt32Array>(name, &a)?;
        Ok(a.values().to_vec())
    }

    pub fn put_u64s(&mut self, name: &str, values: &[u64]) -> SnapshotResult<()> {
        self.put_arrays(name, vec![Arc::new(UInt64Array::from(values.to_vec()))])
    }

    pub fn u64s(&self, name: &str) -> SnapshotResult<Vec<u64>> {
        let a = self.array(name)?;
        let a = downcast::<UInt64Array>(name, &a)?;
        Ok(a.values().to_vec())
    }

    pub fn put_i64s(&mut self, name: &str, values: &[i64]) -> SnapshotResult<()> {
        self.put_arrays(name, vec![Arc::new(Int64Array::from(values.to_vec()))])
    }

    pub fn i64s(&self, name: &str) -> SnapshotResult<Vec<i64>> {
        let a = self.array(name)?;
        let a = downcast::<Int64Array>(name, &a)?;
        Ok(a.values().to_vec())
    }

    pub fn put_strings<'a>(
        &mut self,
        name: &str,
        values: impl IntoIterator<Item = &'a str>,
    ) -> SnapshotResult<()> {
        let array = StringArray::from_iter_values(values);
        self.put_arrays(name, vec![Arc::new(array)])
    }

    pub fn strings(&self, name: &str) -> SnapshotResult<Vec<String>> {
        let a = self.array(name)?;
        let a = downcast::<StringArray>(name, &a)?;
        Ok(a.iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    }

    /// Stores nested lists (`Vec<Vec<T>>`) as their lengths plus the values.
    pub fn put_nested_u32s(&mut self, name: &str, lists: &[Vec<u32>]) -> SnapshotResult<()> {
        let lens: Vec<u32> = lists.iter().map(|l| l.len() as u32).collect();
        let flat: Vec<u32> = lists.iter().flatten().copied().collect();
        self.put_u32s(&format!("{name}.len"), &lens)?;
        self.put_u32s(&format!("{name}.values"), &flat)
    }

    pub fn nested_u32s(&self, name: &str) -> SnapshotResult<Vec<Vec<u32>>> {
        let lens = self.u32s(&format!("{name}.len"))?;
        let flat = self.u32s(&format!("{name}.values"))?;
        split_by(name, &lens, flat)
    }

    /// The snapshot as bytes.
    pub fn encode(&self) -> SnapshotResult<Vec<u8>> {
        let mut header = Vec::new();
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        for (name, part) in &self.parts {
            match part {
                Part::Json(v) => header.push(serde_json::json!({ "name": name, "json": v })),
                Part::Arrays(arrays) => {
                    header.push(serde_json::json!({ "name": name, "arrays": arrays.len() }));
                    blobs.push(encode_arrays(name, arrays)?);
                }
            }
        }
        let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(16 + header.len());
        out.extend_from_slice(MAGIC);
        put_blob(&mut out, &header);
        for blob in &blobs {
            put_blob(&mut out, blob);
        }
        Ok(out)
    }

    /// Reads bytes written by [`encode`](Snapshot::encode).
    pub fn decode(bytes: &[u8]) -> SnapshotResult<Self> {
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or("not a Tributary state snapshot")?;
        let mut cursor = rest;
        let header = take_blob(&mut cursor).map_err(|e| format!("snapshot {e}"))?;
        let header: Vec<serde_json::Value> =
            serde_json::from_slice(header).map_err(|e| format!("snapshot header: {e}"))?;
        let mut parts = BTreeMap::new();
        for entry in header {
            let name = entry
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or("snapshot header: a part without a name")?
                .to_string();
            let part = if let Some(v) = entry.get("json") {
                Part::Json(v.clone())
            } else {
                let blob = take_blob(&mut cursor).map_err(|e| format!("snapshot {e}"))?;
                Part::Arrays(decode_arrays(&name, blob)?)
            };
            parts.insert(name, part);
        }
        if !cursor.is_empty() {
            return Err(format!(
                "snapshot has {} bytes after its last part",
                cursor.len()
            ));
        }
        Ok(Snapshot { parts })
    }
}

fn downcast<'a, T: 'static>(name: &str, a: &'a ArrayRef) -> SnapshotResult<&'a T> {
    a.as_any().downcast_ref::<T>().ok_or_else(|| {
        format!(
            "snapshot part '{name}' holds {}, not the expected type",
            a.data_type()
        )
    })
}

/// Splits `flat` into lists of the given lengths.
pub fn split_by<T>(name: &str, lens: &[u32], flat: Vec<T>) -> SnapshotResult<Vec<Vec<T>>> {
    let total: u64 = lens.iter().map(|l| u64::from(*l)).sum();
    if total != flat.len() as u64 {
        return Err(format!(
            "snapshot part '{name}': lengths add up to {total}, but there are {} values",
            flat.len()
        ));
    }
    let mut values = flat.into_iter();
    Ok(lens
        .iter()
        .map(|l| values.by_ref().take(*l as usize).collect())
        .collect())
}

/// Appends a length-prefixed blob (shared with checkpoint files).
pub(crate) fn put_blob(out: &mut Vec<u8>, blob: &[u8]) {
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(blob);
}

/// Takes a blob written by [`put_blob`] off the front of `cursor`.
pub(crate) fn take_blob<'a>(cursor: &mut &'a [u8]) -> SnapshotResult<&'a [u8]> {
    let Some((len, rest)) = cursor.split_first_chunk::<8>() else {
        return Err("cut short".into());
    };
    let len = u64::from_le_bytes(*len);
    if len > rest.len() as u64 {
        return Err(format!(
            "cut short: a part of {len} bytes, {} left",
            rest.len()
        ));
    }
    let (blob, rest) = rest.split_at(len as usize);
    *cursor = rest;
    Ok(blob)
}

fn encode_arrays(name: &str, arrays: &[ArrayRef]) -> SnapshotResult<Vec<u8>> {
    let fields: Vec<Field> = arrays
        .iter()
        .enumerate()
        .map(|(i, a)| Field::new(format!("c{i}"), a.data_type().clone(), true))
        .collect();
    let rows = arrays.first().map_or(0, |a| a.len());
    let batch = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        arrays.to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| format!("snapshot part '{name}': {e}"))?;
    let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())
        .map_err(|e| format!("snapshot part '{name}': {e}"))?;
    writer
        .write(&batch)
        .and_then(|()| writer.finish())
        .map_err(|e| format!("snapshot part '{name}': {e}"))?;
    writer
        .into_inner()
        .map_err(|e| format!("snapshot part '{name}': {e}"))
}

fn decode_arrays(name: &str, blob: &[u8]) -> SnapshotResult<Vec<ArrayRef>> {
    let reader = StreamReader::try_new(Cursor::new(blob), None)
        .map_err(|e| format!("snapshot part '{name}': {e}"))?;
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch.map_err(|e| format!("snapshot part '{name}': {e}"))?);
    }
    match batches.len() {
        1 => Ok(batches.remove(0).columns().to_vec()),
        n => Err(format!(
            "snapshot part '{name}' holds {n} batches, expected 1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Float64Array;

    #[test]
    fn every_kind_of_part_comes_back() {
        let mut s = Snapshot::new();
        s.put_json("meta", &serde_json::json!({"size": 60_000, "late": 3}))
            .unwrap();
        s.put_u32s("groups", &[3, 1, 4]).unwrap();
        s.put_i64s("starts", &[-5, 0, i64::MAX]).unwrap();
        s.put_u64s("offsets", &[]).unwrap();
        s.put_strings("names", ["d1", "ünïcode"]).unwrap();
        s.put_nested_u32s("open", &[vec![1, 2], vec![], vec![3]])
            .unwrap();
        s.put_arrays(
            "acc",
            vec![
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(UInt64Array::from(vec![2, 0])),
            ],
        )
        .unwrap();
        s.put_arrays("none", vec![]).unwrap();
        let back = Snapshot::decode(&s.encode().unwrap()).unwrap();
        let meta: serde_json::Value = back.json("meta").unwrap();
        assert_eq!(meta["size"], 60_000);
        assert_eq!(back.u32s("groups").unwrap(), vec![3, 1, 4]);
        assert_eq!(back.i64s("starts").unwrap(), vec![-5, 0, i64::MAX]);
        assert!(back.u64s("offsets").unwrap().is_empty());
        assert_eq!(back.strings("names").unwrap()[1], "ünïcode");
        assert_eq!(
            back.nested_u32s("open").unwrap(),
            vec![vec![1, 2], vec![], vec![3]]
        );
        let acc = back.arrays("acc", Some(2)).unwrap();
        assert!(acc[0].is_null(1));
        assert!(back.arrays("none", Some(0)).unwrap().is_empty());
    }

    #[test]
    fn wrong_or_damaged_parts_are_errors() {
        let mut s = Snapshot::new();
        s.put_u32s("groups", &[1, 2]).unwrap();
        assert!(
            s.put_arrays(
                "bad",
                vec![
                    Arc::new(UInt32Array::from(vec![1])),
                    Arc::new(UInt32Array::from(vec![1, 2])),
                ],
            )
            .is_err()
        );
        let bytes = s.encode().unwrap();
        let back = Snapshot::decode(&bytes).unwrap();
        assert!(back.i64s("groups").unwrap_err().contains("groups"));
        assert!(back.u32s("missing").unwrap_err().contains("missing"));
        for cut in [0, 8, 12, bytes.len() - 1] {
            assert!(Snapshot::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(split_by("x", &[2, 2], vec![1, 2, 3]).is_err());
    }
}
