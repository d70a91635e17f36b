//! Printing query results: a table for people, CSV and JSON for scripts.

use std::io::Write;

use anyhow::Result;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;

/// How `tributary sql` and `tributary query` print rows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An aligned table.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per line.
    Jsonl,
}

/// Writes a result in the chosen format.
pub fn print(
    out: &mut dyn Write,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: Format,
) -> Result<()> {
    // A statement's outcome ("stream telemetry created") is one `result` cell:
    // print it as a line, not a one-cell table.
    let is_message = schema.fields().len() == 1
        && schema.field(0).name() == "result"
        && schema.field(0).data_type() == &DataType::Utf8;
    match format {
        Format::Table if is_message => {
            for b in batches {
                if let Some(a) = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                {
                    for v in a.iter().flatten() {
                        writeln!(out, "{v}")?;
                    }
                }
            }
        }
        Format::Table => {
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            if rows == 0 {
                let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(out, "(no rows; columns: {})", names.join(", "))?;
            } else {
                writeln!(
                    out,
                    "{}",
                    arrow::util::pretty::pretty_format_batches(batches)?
                )?;
                writeln!(out, "({rows} row{})", if rows == 1 { "" } else { "s" })?;
            }
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            if batches.is_empty() {
                writer.write(&RecordBatch::new_empty(schema.clone()))?;
            }
            for b in batches {
                writer.write(b)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::writer::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(Vec::new());
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
            let bytes = writer.into_inner();
            if bytes.is_empty() {
                writeln!(out, "[]")?;
            } else {
                out.write_all(&bytes)?;
                writeln!(out)?;
            }
        }
        Format::Jsonl => {
            let mut writer = arrow::json::writer::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(&mut *out);
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}
