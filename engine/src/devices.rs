//! The devices as rules see them: an Arrow snapshot of the registry that
//! rules join against (`JOIN devices d ON t.device_id = d.id`). The server
//! replaces the snapshot whenever the registry changes; each rule notices
//! the new version on its next batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use arrow::array::{ArrayRef, MapBuilder, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::event::TIME_ZONE;

/// One device, as the registry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    /// `enabled` or `disabled`.
    pub status: String,
    /// The device's metadata, a JSON object as text.
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Whether the device has an authenticated connection now.
    pub connected: bool,
    /// Its last frame of any kind, if it ever connected.
    pub last_seen: Option<i64>,
    /// The event time of its last event, if it ever sent one.
    pub last_event_at: Option<i64>,
    /// Its reported properties (device twin), a JSON object as text.
    pub properties: String,
    /// Its desired properties (device twin), a JSON object as text.
    pub desired: String,
}

/// One version of the devices table.
#[derive(Debug)]
pub struct DeviceSnapshot {
    pub version: u64,
    pub batch: RecordBatch,
}

/// The shared, replaceable devices table.
#[derive(Debug)]
pub struct DeviceTable {
    current: RwLock<Arc<DeviceSnapshot>>,
}

impl Default for DeviceTable {
    fn default() -> Self {
        DeviceTable {
            current: RwLock::new(Arc::new(DeviceSnapshot {
                version: 0,
                batch: RecordBatch::new_empty(device_schema()),
            })),
        }
    }
}

/// The columns of the `devices` table: `id`, `tags` (a map of text to text,
/// read as `tags['site']`), `status`, `metadata` (a JSON object as text),
/// `created_at`, `updated_at`, `connected`, `last_seen`, `last_event_at`,
/// `properties` (reported, a JSON object as text) and `desired` (likewise).
pub fn device_schema() -> SchemaRef {
    let entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("keys", DataType::Utf8, false),
                Field::new("values", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("tags", DataType::Map(Arc::new(entries), false), false),
        Field::new("status", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, false),
        Field::new("created_at", crate::event::timestamp_type(), false),
        Field::new("updated_at", crate::event::timestamp_type(), false),
        Field::new("connected", DataType::Boolean, false),
        Field::new("last_seen", crate::event::timestamp_type(), true),
        Field::new("last_event_at", crate::event::timestamp_type(), true),
        Field::new("properties", DataType::Utf8, false),
        Field::new("desired", DataType::Utf8, false),
    ]))
}

impl DeviceTable {
    /// The table now.
    pub fn snapshot(&self) -> Arc<DeviceSnapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the table with these devices.
    pub fn replace(&self, devices: &[DeviceRow]) -> crate::Result<()> {
        let ids = StringArray::from_iter_values(devices.iter().map(|d| d.id.as_str()));
        let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for d in devices {
            for (k, v) in &d.tags {
                tags.keys().append_value(k);
                tags.values().append_value(v);
            }
            tags.append(true)?;
        }
        let status = StringArray::from_iter_values(devices.iter().map(|d| d.status.as_str()));
        let metadata = StringArray::from_iter_values(devices.iter().map(|d| d.metadata.as_str()));
        let time = |f: fn(&DeviceRow) -> i64| {
            Arc::new(
                arrow::array::TimestampMillisecondArray::from_iter_values(devices.iter().map(f))
                    .with_timezone(TIME_ZONE),
            )
        };
        let optional_time = |f: fn(&DeviceRow) -> Option<i64>| {
            Arc::new(
                arrow::array::TimestampMillisecondArray::from_iter(devices.iter().map(f))
                    .with_timezone(TIME_ZONE),
            )
        };
        let connected =
            arrow::array::BooleanArray::from_iter(devices.iter().map(|d| Some(d.connected)));
        let properties =
            StringArray::from_iter_values(devices.iter().map(|d| d.properties.as_str()));
        let desired = StringArray::from_iter_values(devices.iter().map(|d| d.desired.as_str()));
        let schema = device_schema();
        let tags: ArrayRef = Arc::new(tags.finish());
        // The builder names its fields its own way; give the column the
        // table's type.
        let tags = arrow::compute::cast(&tags, schema.field(1).data_type())?;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(ids),
                tags,
                Arc::new(status),
                Arc::new(metadata),
                time(|d| d.created_at),
                time(|d| d.updated_at),
                Arc::new(connected),
                optional_time(|d| d.last_seen),
                optional_time(|d| d.last_event_at),
                Arc::new(properties),
                Arc::new(desired),
            ],
        )?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(DeviceSnapshot {
            version: current.version + 1,
            batch,
        });
        Ok(())
    }
}

/// Row of each device id in a snapshot's batch.
pub fn index_by_id(batch: &RecordBatch, id_column: usize) -> HashMap<String, u32> {
    let mut index = HashMap::new();
    if let Some(ids) = batch
        .columns()
        .get(id_column)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
    {
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = id {
                index.insert(id.to_string(), i as u32);
            }
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_table_has_a_new_version_and_the_tags() {
        let t = DeviceTable::default();
        assert_eq!(t.snapshot().batch.num_rows(), 0);
        t.replace(&[DeviceRow {
            id: "pump-7".into(),
            tags: BTreeMap::from([("site".into(), "berlin".into())]),
            status: "enabled".into(),
            metadata: r#"{"model":"x1"}"#.into(),
            created_at: 5,
            updated_at: 6,
            connected: true,
            last_seen: Some(7),
            last_event_at: None,
            properties: r#"{"fw":"1.2"}"#.into(),
            desired: "{}".into(),
        }])
        .unwrap();
        let s = t.snapshot();
        assert_eq!(s.version, 1);
        assert_eq!(s.batch.num_rows(), 1);
        assert_eq!(index_by_id(&s.batch, 0)["pump-7"], 0);
    }
}
