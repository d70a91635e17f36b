//! The event model: stream definitions, their Arrow schemas and the system columns.
//!
//! Every stream has three system columns ahead of its own:
//!
//! | column        | type                       | set by                                        |
//! |---------------|----------------------------|-----------------------------------------------|
//! | `device_id`   | `Utf8`, not null           | the gateway: always the authenticated device  |
//! | `ts`          | `Timestamp(ms, UTC)`, not null | the payload's `ts`, else the receive time |
//! | `received_at` | `Timestamp(ms, UTC)`, not null | the gateway's clock when the frame arrived |

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Name of the system column holding the authenticated device's id.
pub const DEVICE_ID: &str = "device_id";
/// Name of the system column holding event time.
pub const TS: &str = "ts";
/// Name of the system column holding the time the gateway received the event.
pub const RECEIVED_AT: &str = "received_at";
/// The system columns, in schema order.
pub const SYSTEM_COLUMNS: [&str; 3] = [DEVICE_ID, TS, RECEIVED_AT];
/// Time zone of the timestamp columns.
pub const TIME_ZONE: &str = "UTC";
/// Longest stream, rule or column name.
pub const MAX_NAME_LEN: usize = 64;

/// The Arrow type of `ts` and `received_at`.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(TIME_ZONE.into()))
}

/// The column types a stream may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Boolean,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    Timestamp,
}

impl ColumnType {
    /// The Arrow type this column is stored as.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Timestamp => timestamp_type(),
        }
    }

    /// The SQL name users write and see.
    pub fn sql_name(self) -> &'static str {
        match self {
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Int32 => "INT",
            ColumnType::Int64 => "BIGINT",
            ColumnType::Float32 => "REAL",
            ColumnType::Float64 => "DOUBLE",
            ColumnType::Utf8 => "VARCHAR",
            ColumnType::Timestamp => "TIMESTAMP",
        }
    }

    /// What a JSON payload must hold for this column, for error messages.
    pub fn json_expectation(self) -> &'static str {
        match self {
            ColumnType::Boolean => "a boolean (BOOLEAN)",
            ColumnType::Int32 => "an integer between -2147483648 and 2147483647 (INT)",
            ColumnType::Int64 => "an integer (BIGINT)",
            ColumnType::Float32 => "a number (REAL)",
            ColumnType::Float64 => "a number (DOUBLE)",
            ColumnType::Utf8 => "a string (VARCHAR)",
            ColumnType::Timestamp => "an RFC 3339 string or epoch milliseconds (TIMESTAMP)",
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_name())
    }
}

/// One user-declared column of a stream. All user columns are nullable:
/// a field missing from an event is stored as null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// A declared stream: its name, its own columns and its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDef {
    pub name: String,
    pub columns: Vec<ColumnDef>,
    /// Number of log partitions; a device's events always go to the same one.
    pub partitions: u32,
    /// Options from `WITH (...)`, kept as written.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The Arrow schema, built on first use and shared from then on: every
    /// frame's batch carries it, and the log compares it per append, so a
    /// fresh one each time showed up in profiles (building, comparing
    /// field by field, dropping).
    #[serde(skip)]
    schema: SchemaCache,
}

/// A stream's Arrow schema once built. It follows from the columns, so it
/// takes no part in comparing definitions.
#[derive(Debug, Clone, Default)]
struct SchemaCache(std::sync::OnceLock<SchemaRef>);

impl PartialEq for SchemaCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SchemaCache {}

/// Default number of partitions of a new stream.
pub const DEFAULT_PARTITIONS: u32 = 4;
/// Most partitions a stream may have.
pub const MAX_PARTITIONS: u32 = 256;

impl StreamDef {
    /// Checks names and types and builds the definition.
    pub fn new(name: &str, columns: Vec<ColumnDef>, partitions: u32) -> Result<Self> {
        validate_name("stream", name)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(Error::User(format!(
                "stream '{name}': partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &columns {
            validate_name("column", &c.name)?;
            if SYSTEM_COLUMNS.contains(&c.name.as_str()) {
                return Err(Error::User(format!(
                    "stream '{name}': column '{}' is a system column every stream already has; remove it",
                    c.name
                )));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(Error::User(format!(
                    "stream '{name}': column '{}' is declared twice",
                    c.name
                )));
            }
        }
        Ok(StreamDef {
            name: name.to_string(),
            columns,
            partitions,
            options: BTreeMap::new(),
            schema: SchemaCache::default(),
        })
    }

    /// The full Arrow schema: system columns first, then the declared ones.
    pub fn schema(&self) -> SchemaRef {
        self.schema.0.get_or_init(|| self.build_schema()).clone()
    }

    fn build_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(DEVICE_ID, DataType::Utf8, false),
            Field::new(TS, timestamp_type(), false),
            Field::new(RECEIVED_AT, timestamp_type(), false),
        ];
        fields.extend(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.ty.data_type(), true)),
        );
        Arc::new(Schema::new(fields))
    }

    /// The declared column called `name`, if any.
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Stream, rule and column names: a letter or `_` first, then letters, digits
/// and `_`, at most [`MAX_NAME_LEN`] bytes. They become directory names and SQL
/// identifiers, so nothing else is allowed.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok_first || !ok_rest || name.len() > MAX_NAME_LEN {
        return Err(Error::User(format!(
            "invalid {kind} name '{name}': use a letter or '_' followed by letters, digits or '_', at most {MAX_NAME_LEN} characters"
        )));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, from the system clock. Only the edges of
/// the system (gateway, sinks, command queue callers) read the clock; everything
/// else takes `now` as an argument.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_puts_system_columns_first() {
        let def = StreamDef::new(
            "telemetry",
            vec![ColumnDef {
                name: "temp".into(),
                ty: ColumnType::Float64,
            }],
            4,
        )
        .unwrap();
        let schema = def.schema();
        let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["device_id", "ts", "received_at", "temp"]);
        assert!(!schema.field(0).is_nullable());
        assert!(schema.field(3).is_nullable());
    }

    #[test]
    fn rejects_system_and_duplicate_columns_and_bad_names() {
        let col = |n: &str| ColumnDef {
            name: n.into(),
            ty: ColumnType::Int64,
        };
        let err = StreamDef::new("s", vec![col("ts")], 1).unwrap_err();
        assert!(err.to_string().contains("system column"), "{err}");
        let err = StreamDef::new("s", vec![col("a"), col("a")], 1).unwrap_err();
        assert!(err.to_string().contains("declared twice"), "{err}");
        assert!(StreamDef::new("1abc", vec![], 1).is_err());
        assert!(StreamDef::new("a/b", vec![], 1).is_err());
        assert!(StreamDef::new("ok_name", vec![], 0).is_err());
    }
}
