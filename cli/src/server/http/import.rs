//! `POST /devices/import`: many devices from JSON lines or CSV in one
//! request.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tributary_registry::NewDevice;
use utoipa::ToSchema;

use super::devices::{CREATE_SHAPE, CreateDevice, create_one, parse_status};
use super::{ApiError, ApiState, Body, ErrorBody, refresh_devices};

/// The largest `POST /devices/import` body.
pub const IMPORT_MAX_BYTES: usize = 16 << 20;
/// The most devices one import creates.
pub const IMPORT_MAX_ROWS: usize = 100_000;

/// The formats `POST /devices/import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImportFormat {
    JsonLines,
    Csv,
}

impl ImportFormat {
    fn from_headers(headers: &HeaderMap) -> Result<ImportFormat, ApiError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "text/csv" => Ok(ImportFormat::Csv),
            "application/x-ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/json-lines"
            | "application/json" => Ok(ImportFormat::JsonLines),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Type '{content_type}' is not an import format; send JSON lines \
                     (application/x-ndjson) or CSV (text/csv)"
                ),
            )),
        }
    }
}

/// One row of an import file: the line it starts on, its id if one could be
/// read, and the device it describes or why it cannot be one.
struct ImportRow {
    line: usize,
    id: Option<String>,
    device: Result<NewDevice, ApiError>,
}

/// What an import did: a result for every row.
#[derive(Serialize, ToSchema)]
pub(super) struct ImportReport {
    created: u64,
    failed: u64,
    /// In file order: `{"line", "ok": true, ...the created device, its keys
    /// and token}` or `{"line", "ok": false, "id"?, "error": {"code",
    /// "message"}}`.
    #[schema(value_type = Vec<Object>)]
    results: Vec<Value>,
}

/// Creates many devices from JSON lines or CSV.
///
/// Each row is created as if posted to `POST /devices` on its own, in file
/// order; bad rows are reported with their line and change nothing. The
/// format comes from `Content-Type`: `application/x-ndjson` (also
/// `application/jsonl`, `application/json`) or `text/csv`.
#[utoipa::path(
    post,
    path = "/api/v1/devices/import",
    tag = "devices",
    request_body(content = String, description = "JSON lines (one `POST /devices` body per line) or CSV with a header of id,tags,metadata,status",
                 content_type = "application/x-ndjson"),
    responses(
        (status = 200, description = "A result for every row", body = ImportReport),
        (status = 400, description = "`invalid_request`: not UTF-8, a JSON array, a bad CSV header", body = ErrorBody),
        (status = 413, description = "`too_large`: over 16 MiB or 100,000 rows", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
    )
)]
pub(super) async fn import_devices(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Body(body): Body<IMPORT_MAX_BYTES>,
) -> Result<Json<ImportReport>, ApiError> {
    let format = ImportFormat::from_headers(&headers)?;
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::invalid_request(format!(
            "the body is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let rows = match format {
        ImportFormat::JsonLines => json_rows(text)?,
        ImportFormat::Csv => csv_rows(text)?,
    };
    if rows.len() > IMPORT_MAX_ROWS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the import has {} rows; at most {IMPORT_MAX_ROWS} are taken at once",
                rows.len()
            ),
        ));
    }
    // The import goes on if the client hangs up, so that what was created is
    // also in the devices table.
    let task = tokio::spawn(async move {
        let attempted = rows.iter().any(|r| r.device.is_ok());
        let report = import_rows(&state, rows).await;
        if attempted {
            refresh_devices(&state).await;
        }
        report
    });
    let report = task
        .await
        .map_err(|e| ApiError::internal(format!("the import failed: {e}")))?;
    Ok(Json(report))
}

/// Creates each row's device in order; a bad row is reported and changes nothing.
async fn import_rows(state: &ApiState, rows: Vec<ImportRow>) -> ImportReport {
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut results = Vec::with_capacity(rows.len());
    let (mut created, mut failed) = (0u64, 0u64);
    for row in rows {
        let outcome = match row.device {
            Err(e) => Err(e),
            Ok(new) => match first_line.get(&new.id) {
                Some(&line) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "duplicate_id",
                    format!("device '{}' is also on line {line} of this import", new.id),
                )),
                None => {
                    first_line.insert(new.id.clone(), row.line);
                    create_one(state, new).await.and_then(|created| {
                        serde_json::to_value(&created).map_err(|e| {
                            ApiError::internal(format!("device '{}': {e}", created.id()))
                        })
                    })
                }
            },
        };
        match outcome {
            Ok(mut device) => {
                created += 1;
                device["line"] = json!(row.line);
                device["ok"] = json!(true);
                results.push(device);
            }
            Err(e) => {
                failed += 1;
                let mut r = json!({"line": row.line, "ok": false, "error": e.body()});
                if let Some(id) = row.id {
                    r["id"] = json!(id);
                }
                results.push(r);
            }
        }
    }
    ImportReport {
        created,
        failed,
        results,
    }
}

/// JSON lines: one `POST /devices` body per line; blank lines are skipped.
fn json_rows(text: &str) -> Result<Vec<ImportRow>, ApiError> {
    if text.trim_start().starts_with('[') {
        return Err(ApiError::invalid_request(
            "the body is a JSON array; send one JSON object per line",
        ));
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let device = serde_json::from_str::<CreateDevice>(line)
            .map_err(|e| {
                ApiError::invalid_request(format!("not a JSON object {CREATE_SHAPE}: {e}"))
            })
            .and_then(CreateDevice::into_new_device);
        let id = match &device {
            Ok(d) => Some(d.id.clone()),
            Err(_) => serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_string)),
        };
        rows.push(ImportRow {
            line: i + 1,
            id,
            device,
        });
    }
    Ok(rows)
}

/// The columns an import CSV may have; `id` is required.
const CSV_COLUMNS: [&str; 4] = ["id", "tags", "metadata", "status"];

/// CSV with a header naming some of `id,tags,metadata,status`; tags are
/// `k=v;k2=v2`, metadata a JSON object, empty cells mean none.
fn csv_rows(text: &str) -> Result<Vec<ImportRow>, ApiError> {
    let mut records = csv_records(text)?.into_iter();
    let Some((_, header)) = records.next() else {
        return Ok(Vec::new());
    };
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    for (i, name) in header.iter().enumerate() {
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return Err(ApiError::invalid_request(format!(
                "line 1: unknown CSV column '{name}'; the columns are id, tags, metadata, status"
            )));
        }
        if header[..i].contains(name) {
            return Err(ApiError::invalid_request(format!(
                "line 1: CSV column '{name}' appears twice"
            )));
        }
    }
    let column = |name: &str| header.iter().position(|h| h == name);
    let Some(id_col) = column("id") else {
        return Err(ApiError::invalid_request(
            "line 1: the CSV header has no 'id' column (expected id,tags,metadata,status)",
        ));
    };
    let (tags_col, metadata_col, status_col) =
        (column("tags"), column("metadata"), column("status"));
    Ok(records
        .map(|(line, fields)| {
            let id = fields.get(id_col).cloned();
            let device = if fields.len() != header.len() {
                Err(ApiError::invalid_request(format!(
                    "{} fields where the header has {} ({})",
                    fields.len(),
                    header.len(),
                    header.join(",")
                )))
            } else {
                let cell = |col: Option<usize>| col.map(|c| fields[c].as_str()).unwrap_or("");
                csv_device(
                    &fields[id_col],
                    cell(tags_col),
                    cell(metadata_col),
                    cell(status_col),
                )
            };
            ImportRow { line, id, device }
        })
        .collect())
}

fn csv_device(id: &str, tags: &str, metadata: &str, status: &str) -> Result<NewDevice, ApiError> {
    let mut tag_map = BTreeMap::new();
    for pair in tags.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(ApiError::invalid_device(format!(
                "tag '{pair}' is not key=value (tags are written k=v;k2=v2)"
            )));
        };
        if tag_map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::invalid_device(format!(
                "tag '{k}' is given twice"
            )));
        }
    }
    let metadata = if metadata.trim().is_empty() {
        Map::new()
    } else {
        serde_json::from_str(metadata).map_err(|e| {
            ApiError::invalid_request(format!("metadata must be a JSON object: {e}"))
        })?
    };
    let status = status.trim();
    Ok(NewDevice {
        id: id.to_string(),
        tags: tag_map,
        metadata,
        status: if status.is_empty() {
            None
        } else {
            Some(parse_status(status)?)
        },
    })
}

/// Splits CSV (RFC 4180: `,` separators, `"` quoting with `""` for a quote,
/// LF or CRLF line ends) into records, each with the line it starts on.
/// Blank lines are skipped. A quoted field may span lines, which JSON
/// metadata sometimes does.
fn csv_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, ApiError> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let (mut line, mut start_line) = (1, 1);
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => in_quotes = true,
            ',' => fields.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_record(&mut fields, &mut field, &mut records, start_line);
                line += 1;
                start_line = line;
            }
            c => field.push(c),
        }
    }
    if in_quotes {
        return Err(ApiError::invalid_request(format!(
            "line {start_line}: a quoted CSV field is never closed"
        )));
    }
    if !field.is_empty() || !fields.is_empty() {
        end_record(&mut fields, &mut field, &mut records, start_line);
    }
    Ok(records)
}

/// Ends the record being read; a blank line is no record.
fn end_record(
    fields: &mut Vec<String>,
    field: &mut String,
    records: &mut Vec<(usize, Vec<String>)>,
    start_line: usize,
) {
    fields.push(std::mem::take(field));
    let record = std::mem::take(fields);
    if !(record.len() == 1 && record[0].trim().is_empty()) {
        records.push((start_line, record));
    }
}

#[cfg(test)]
mod tests {
    use tributary_registry::DeviceStatus;

    use super::*;

    #[test]
    fn csv_records_quote_and_count_lines() {
        let text = "id,metadata\r\na,\"{\"\"k\"\": 1}\"\n\nb,\"{\n}\"\nc,\n";
        let records = csv_records(text).unwrap();
        let lines: Vec<usize> = records.iter().map(|r| r.0).collect();
        assert_eq!(lines, [1, 2, 4, 6]);
        assert_eq!(records[1].1, ["a", "{\"k\": 1}"]);
        assert_eq!(records[2].1, ["b", "{\n}"]);
        assert_eq!(records[3].1, ["c", ""]);
        assert!(
            csv_records("id\n\"open\n")
                .unwrap_err()
                .message
                .contains("line 2")
        );
    }

    #[test]
    fn csv_cells_become_devices() {
        let d = csv_device("a", "site=n; floor=3", "{\"x\": [1]}", "disabled").unwrap();
        assert_eq!(d.tags["floor"], "3");
        assert_eq!(d.metadata["x"], json!([1]));
        assert_eq!(d.status, Some(DeviceStatus::Disabled));
        assert_eq!(
            csv_device("a", "site", "", "").unwrap_err().code,
            "invalid_device"
        );
        assert_eq!(
            csv_device("a", "", "[1]", "").unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            csv_device("a", "", "", "paused").unwrap_err().code,
            "invalid_device"
        );
    }
}
