//! Where a rule's rows go: the command queue, or a stream (declared, or
//! derived from the rule's own query).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use tributary_engine::event::{ColumnDef, ColumnType, DEVICE_ID, RECEIVED_AT, StreamDef, TS};
use tributary_engine::rule::{Emitted, RowIds};

use crate::error::{Error, Result};
use crate::window::timestamps as timestamp_array;

/// How one column of the target stream is filled.
#[derive(Debug, Clone)]
pub enum Fill {
    /// From this column of the rule's output.
    Column(usize),
    /// `device_id` when the output has none: the rule's name.
    RuleName,
    /// `ts` when the output has none: the row's event time.
    EventTime,
    /// `received_at`: when the row was made.
    Now,
    Null,
}

/// A rule's destination, checked against its output when it is compiled.
#[derive(Debug, Clone)]
pub enum Target {
    Commands,
    Stream {
        rule: String,
        schema: SchemaRef,
        fills: Vec<Fill>,
    },
}

impl Target {
    /// `INSERT INTO commands` takes (device_id, name[, payload]) by position.
    pub fn commands(rule: &str, output: &Schema) -> Result<Target> {
        let n = output.fields().len();
        if !(2..=3).contains(&n) {
            return Err(Error::plan(format!(
                "rule '{rule}': INSERT INTO commands takes (device_id, name[, payload]) in that order; the SELECT has {n} column(s)"
            )));
        }
        for (i, what) in [(0, "device_id"), (1, "name")] {
            let f = output.field(i);
            if !matches!(
                f.data_type(),
                DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
            ) {
                return Err(Error::plan(format!(
                    "rule '{rule}': column {} of INSERT INTO commands is the {what} and must be text, but '{}' is {}",
                    i + 1,
                    f.name(),
                    f.data_type()
                )));
            }
        }
        Ok(Target::Commands)
    }

    /// Rows into stream `def`: output columns are matched to the stream's
    /// by name; `device_id` and `ts` are optional.
    pub fn stream(rule: &str, output: &Schema, def: &StreamDef) -> Result<Target> {
        let schema = def.schema();
        let position = |name: &str| output.fields().iter().position(|f| f.name() == name);
        for f in output.fields() {
            let name = f.name().as_str();
            if name == RECEIVED_AT {
                return Err(Error::plan(format!(
                    "rule '{rule}': received_at is set when a row is written; rename the output column"
                )));
            }
            let Ok(target) = schema.field_with_name(name) else {
                return Err(Error::plan(format!(
                    "rule '{rule}': stream '{}' has no column '{name}'; its columns are {}",
                    def.name,
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            if !arrow::compute::can_cast_types(f.data_type(), target.data_type()) {
                return Err(Error::plan(format!(
                    "rule '{rule}': column '{name}' is {}, but stream '{}' stores {} there",
                    f.data_type(),
                    def.name,
                    target.data_type()
                )));
            }
        }
        let fills = schema
            .fields()
            .iter()
            .map(|f| match (f.name().as_str(), position(f.name())) {
                (_, Some(i)) => Fill::Column(i),
                (DEVICE_ID, None) => Fill::RuleName,
                (TS, None) => Fill::EventTime,
                (RECEIVED_AT, None) => Fill::Now,
                _ => Fill::Null,
            })
            .collect();
        Ok(Target::Stream {
            rule: rule.to_string(),
            schema,
            fills,
        })
    }

    /// The rows as the target takes them.
    pub fn emit(
        &self,
        batch: RecordBatch,
        ids: impl Into<RowIds>,
        times: Vec<i64>,
        now: i64,
    ) -> std::result::Result<Emitted, String> {
        let (rule, schema, fills) = match self {
            Target::Commands => {
                return Ok(Emitted {
                    batch,
                    ids: ids.into(),
                });
            }
            Target::Stream {
                rule,
                schema,
                fills,
            } => (rule, schema, fills),
        };
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(fills.len());
        for (field, fill) in schema.fields().iter().zip(fills) {
            let column = match fill {
                Fill::Column(i) => {
                    let c = cast(batch.column(*i), field.data_type()).map_err(|e| {
                        format!("column '{}' into {}: {e}", field.name(), field.data_type())
                    })?;
                    if !field.is_nullable() && c.null_count() > 0 {
                        // device_id and ts are never null in a stream.
                        if field.name() == DEVICE_ID {
                            let c = c
                                .as_any()
                                .downcast_ref::<StringArray>()
                                .ok_or("device_id is not text")?;
                            Arc::new(StringArray::from_iter_values(
                                c.iter().map(|v| v.unwrap_or(rule.as_str()).to_string()),
                            )) as ArrayRef
                        } else {
                            let c = c
                                .as_any()
                                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                                .ok_or("ts is not a timestamp")?;
                            timestamp_array(
                                c.iter().zip(&times).map(|(v, t)| v.unwrap_or(*t)).collect(),
                            )
                        }
                    } else {
                        c
                    }
                }
                Fill::RuleName => Arc::new(StringArray::from(vec![rule.as_str(); rows])),
                Fill::EventTime => timestamp_array(times.clone()),
                Fill::Now => timestamp_array(vec![now; rows]),
                Fill::Null => new_null_array(field.data_type(), rows),
            };
            columns.push(column);
        }
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
        Ok(Emitted {
            batch,
            ids: ids.into(),
        })
    }
}

/// The stream a `CREATE STREAM name AS SELECT` makes: one column per output
/// column (`device_id` and `ts` become the system columns).
pub fn derived_stream(
    name: &str,
    output: &Schema,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<StreamDef> {
    let mut columns = Vec::new();
    for f in output.fields() {
        let n = f.name().as_str();
        if n == DEVICE_ID || n == TS {
            continue;
        }
        let ty = column_type(f.data_type()).ok_or_else(|| {
            Error::plan(format!(
                "derived stream '{name}': column '{n}' is {}, which a stream cannot store; CAST it to DOUBLE, BIGINT or VARCHAR",
                f.data_type()
            ))
        })?;
        columns.push(ColumnDef {
            name: n.to_string(),
            ty,
        });
    }
    let partitions = options
        .get("partitions")
        .and_then(|p| p.parse().ok())
        .unwrap_or(tributary_engine::event::DEFAULT_PARTITIONS);
    let mut def = StreamDef::new(name, columns, partitions)?;
    def.options = options
        .iter()
        .filter(|(k, _)| k.as_str() != "partitions")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(def)
}

/// The stream column type that holds values of `t`.
fn column_type(t: &DataType) -> Option<ColumnType> {
    Some(match t {
        DataType::Boolean => ColumnType::Boolean,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::UInt8 | DataType::UInt16 => {
            ColumnType::Int32
        }
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => ColumnType::Int64,
        DataType::Float16 | DataType::Float32 => ColumnType::Float32,
        DataType::Float64 | DataType::Decimal128(..) | DataType::Decimal256(..) => {
            ColumnType::Float64
        }
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => ColumnType::Utf8,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => ColumnType::Timestamp,
        _ => return None,
    })
}

/// The late-events stream of `source`: its columns plus the rule that found
/// the event late.
pub fn late_stream(source: &StreamDef) -> Result<StreamDef> {
    let mut columns = source.columns.clone();
    columns.push(ColumnDef {
        name: LATE_RULE_COLUMN.into(),
        ty: ColumnType::Utf8,
    });
    let name = format!("{}_late", source.name);
    StreamDef::new(&name, columns, source.partitions).map_err(|_| {
        Error::plan(format!(
            "stream '{}' cannot have a late-events stream '{name}': the name is too long or the stream has a column '{LATE_RULE_COLUMN}'",
            source.name
        ))
    })
}

/// The column of a late-events stream naming the rule.
pub const LATE_RULE_COLUMN: &str = "late_rule";
