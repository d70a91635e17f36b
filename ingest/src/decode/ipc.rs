//! Arrow IPC payloads (encoding 0x02) into Arrow.
//!
//! The payload is an Arrow IPC *stream*: a schema message, record batches,
//! and an optional end-of-stream marker. Its columns are matched by name to
//! the stream's and converted to the stream's types where that loses
//! nothing; the result has exactly [`StreamDef::schema`], like
//! [`decode_json`](super::decode_json)'s, so nothing downstream can tell
//! the encodings apart.
//!
//! The payload comes from the network, and arrow's IPC reader trusts some of
//! what it reads: it allocates a message's declared lengths before reading
//! them, and panics on some malformed schemas and buffer offsets. So the
//! message framing is walked first and every length checked against the
//! payload ([`framing`]), and the reader itself runs under
//! `catch_unwind`; whatever it cannot read is `invalid_arrow`.
//!
//! [`StreamDef::schema`]: tributary_engine::event::StreamDef::schema

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Cursor;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, StringArray, TimestampMillisecondArray, new_null_array,
};
use arrow::buffer::Buffer;
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt64Type,
};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use tributary_engine::event::{ColumnType, DEVICE_ID, RECEIVED_AT, StreamDef, TIME_ZONE, TS};

use super::PayloadError;
use super::error::internal_batch_error;
use super::json::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, OUTSIDE_YEARS, quote};
use crate::protocol::RejectCode;

/// Marks an IPC message header ahead of its length (format 0.15 and later).
const CONTINUATION: [u8; 4] = [0xff; 4];

/// Decodes an Arrow IPC stream payload into a batch with exactly
/// `def.schema()`.
///
/// The arguments mean what they mean for
/// [`decode_json`](super::decode_json): `device_id` is the authenticated
/// device, `received_at_ms` the receive time (also `ts` where a row has
/// none), and at most `max_events` rows are accepted. Several record batches
/// in one payload are one frame: all of them are stored, or none.
///
/// ```
/// use std::sync::Arc;
/// use arrow::array::{Float64Array, RecordBatch};
/// use arrow::datatypes::{DataType, Field, Schema};
/// use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};
/// use tributary_ingest::decode::{decode_arrow, encode_arrow};
///
/// let def = StreamDef::new(
///     "telemetry",
///     vec![ColumnDef { name: "temp".into(), ty: ColumnType::Float64 }],
///     4,
/// )
/// .unwrap();
/// let schema = Arc::new(Schema::new(vec![Field::new("temp", DataType::Float64, true)]));
/// let batch = RecordBatch::try_new(
///     schema.clone(),
///     vec![Arc::new(Float64Array::from(vec![Some(21.5), None]))],
/// )
/// .unwrap();
/// let payload = encode_arrow(&schema, &[batch]).unwrap();
/// let decoded = decode_arrow(&def, &payload, "sensor-1", 1_700_000_000_000, 100).unwrap();
/// assert_eq!(decoded.schema(), def.schema());
/// assert_eq!(decoded.num_rows(), 2);
/// ```
pub fn decode_arrow(
    def: &StreamDef,
    payload: &[u8],
    device_id: &str,
    received_at_ms: i64,
    max_events: usize,
) -> Result<RecordBatch, PayloadError> {
    ArrowDecoder::default().decode(def, payload, device_id, received_at_ms, max_events)
}

/// Most payload schemas an [`ArrowDecoder`] remembers: a connection's
/// device sends one per stream it writes, and rarely more than a few.
const KNOWN_SCHEMAS: usize = 4;
/// Largest schema message remembered. A schema of the stream's own columns
/// takes about 100 bytes a column; custom metadata could make one as large
/// as a frame, and a connection should not keep four of those. Larger
/// schemas are read afresh each time.
const KNOWN_SCHEMA_BYTES: usize = 64 * 1024;

/// [`decode_arrow`] for one connection, remembering the payload schemas it
/// has read.
///
/// Every payload is a whole IPC stream, so a device repeats its schema at
/// the head of every frame. Parsing it, and matching its columns to the
/// stream's, was about half of decoding a one-row frame. The decoder keeps
/// the schema message's bytes with what was made of them: a frame whose
/// schema message is byte for byte one already read (for the same stream
/// definition) skips both.
#[derive(Default)]
pub struct ArrowDecoder {
    /// Most recently used first.
    known: Vec<KnownSchema>,
}

struct KnownSchema {
    /// The stream schema the plan was made for.
    stream: SchemaRef,
    /// The schema message's metadata (a flatbuffer), as it was sent, and
    /// the length of the body it declares.
    message: Box<[u8]>,
    body: usize,
    schema: SchemaRef,
    plan: Arc<Plan>,
}

impl ArrowDecoder {
    /// Decodes one payload, as [`decode_arrow`] does.
    pub fn decode(
        &mut self,
        def: &StreamDef,
        payload: &[u8],
        device_id: &str,
        received_at_ms: i64,
        max_events: usize,
    ) -> Result<RecordBatch, PayloadError> {
        if payload.is_empty() {
            return Err(empty());
        }
        let stream = def.schema();
        let mut known = None;
        let messages = framing(payload, |first| {
            known = self.known.iter().position(|k| {
                *k.message == *first && (Arc::ptr_eq(&k.stream, &stream) || k.stream == stream)
            });
            known.map(|i| self.known[i].body)
        })?;
        let read = {
            let _contained = Contained::enter();
            panic::catch_unwind(AssertUnwindSafe(|| {
                read_stream(
                    payload,
                    &messages,
                    known.map(|i| &self.known[i].schema),
                    max_events,
                )
            }))
        };
        let (schema, batch) = match read {
            Ok(read) => read?,
            Err(_) => {
                return Err(invalid_arrow(
                    "a message is malformed (its schema or buffers are inconsistent)".into(),
                ));
            }
        };
        let plan = match known {
            Some(i) => {
                let hit = self.known.remove(i);
                let plan = Arc::clone(&hit.plan);
                self.known.insert(0, hit);
                plan
            }
            None => {
                let plan = Arc::new(Plan::new(def, &schema)?);
                if messages[0].metadata.len() <= KNOWN_SCHEMA_BYTES {
                    self.known.truncate(KNOWN_SCHEMAS - 1);
                    self.known.insert(
                        0,
                        KnownSchema {
                            stream,
                            message: messages[0].metadata.into(),
                            body: messages[0].body.len(),
                            schema,
                            plan: Arc::clone(&plan),
                        },
                    );
                }
                plan
            }
        };
        convert(def, &batch, &plan, device_id, received_at_ms, payload)
    }

    /// How many schemas the decoder remembers.
    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.known.len()
    }
}

/// The payload's rows, read as `batch`, in the stream's schema.
fn convert(
    def: &StreamDef,
    batch: &RecordBatch,
    plan: &Plan,
    device_id: &str,
    received_at_ms: i64,
    payload: &[u8],
) -> Result<RecordBatch, PayloadError> {
    if batch.num_rows() == 0 {
        return Err(empty());
    }
    Converter {
        def,
        batch,
        device_id,
        received_at: received_at_ms,
        // Strings cannot legitimately expand past the payload holding them
        // except through shared view buffers, which a device has no need
        // for and which could otherwise inflate a 4 MiB frame without bound.
        max_string_bytes: payload.len(),
    }
    .convert(plan)
}

thread_local! {
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as inside arrow's IPC reader, whose panics are caught
/// and become `invalid_arrow`, until dropped.
struct Contained;

impl Contained {
    fn enter() -> Self {
        CONTAINED.with(|c| c.set(true));
        Contained
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        CONTAINED.with(|c| c.set(false));
    }
}

/// Whether a panic now would come from arrow's IPC reader and be caught by
/// [`decode_arrow`]. The fuzz targets' panic hook lets those unwind and
/// aborts on every other.
pub(crate) fn panic_is_contained() -> bool {
    CONTAINED.with(Cell::get)
}

/// Encodes batches (all with `schema`) as an Arrow IPC stream, the payload
/// [`decode_arrow`] reads.
pub fn encode_arrow(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let mut writer = StreamWriter::try_new(Vec::new(), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

fn empty() -> PayloadError {
    PayloadError::new(
        RejectCode::EmptyFrame,
        "the payload holds no rows; send at least one".into(),
    )
}

fn invalid_arrow(detail: String) -> PayloadError {
    PayloadError::new(
        RejectCode::InvalidArrow,
        format!("the payload is not a readable Arrow IPC stream: {detail}"),
    )
}

/// One IPC message of a payload.
struct Message<'a> {
    /// Where it starts in the payload, for error messages.
    at: usize,
    /// Its metadata, a flatbuffer `Message`.
    metadata: &'a [u8],
    /// The metadata, verified; `None` for a known schema's message, which
    /// is byte for byte one verified before.
    header: Option<arrow::ipc::Message<'a>>,
    body: &'a [u8],
}

/// Walks the stream's messages (`[0xFFFFFFFF] <i32 metadata length>
/// <metadata> <body>`, until a zero length or the end) and checks that each
/// metadata length and declared body length lies within the payload, so
/// nothing read later allocates more than the payload's size, and that no
/// body is compressed (see [`uncompressed`]). `known` tells, from the first
/// message's metadata, whether it is a schema already read, and its body's
/// length: such a message is not parsed again.
fn framing(
    payload: &[u8],
    known: impl FnOnce(&[u8]) -> Option<usize>,
) -> Result<Vec<Message<'_>>, PayloadError> {
    let mut known = Some(known);
    let mut pos = 0;
    let mut messages = Vec::with_capacity(3);
    while pos < payload.len() {
        let at = pos;
        let word = |pos: &mut usize| -> Result<[u8; 4], PayloadError> {
            let bytes = payload
                .get(*pos..*pos + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .ok_or_else(|| {
                    invalid_arrow(format!("message header cut short at byte {}", *pos))
                })?;
            *pos += 4;
            Ok(bytes)
        };
        let mut len = word(&mut pos)?;
        if len == CONTINUATION {
            len = word(&mut pos)?;
        }
        let len = i32::from_le_bytes(len);
        if len == 0 {
            if pos != payload.len() {
                return Err(invalid_arrow(format!(
                    "{} bytes follow the end-of-stream marker",
                    payload.len() - pos
                )));
            }
            break;
        }
        let number = messages.len();
        let remaining = payload.len() - pos;
        let Some(len) = usize::try_from(len).ok().filter(|l| *l <= remaining) else {
            return Err(invalid_arrow(format!(
                "message {number} at byte {at} declares {len} bytes of metadata, \
                 but {remaining} remain"
            )));
        };
        let metadata = &payload[pos..pos + len];
        let (header, body) = match known.take().and_then(|known| known(metadata)) {
            Some(body) => (None, body as i64),
            None => {
                let header = arrow::ipc::root_as_message(metadata)
                    .map_err(|err| invalid_arrow(format!("message {number} at byte {at}: {err}")))
                    .and_then(|header| uncompressed(header, number, at))?;
                (Some(header), header.bodyLength())
            }
        };
        pos += len;
        let remaining = payload.len() - pos;
        let Some(body) = usize::try_from(body).ok().filter(|b| *b <= remaining) else {
            return Err(invalid_arrow(format!(
                "message {number} at byte {at} declares a {body}-byte body, \
                 but {remaining} bytes remain"
            )));
        };
        messages.push(Message {
            at,
            metadata,
            header,
            body: &payload[pos..pos + body],
        });
        pos += body;
    }
    if messages.is_empty() {
        return Err(invalid_arrow("it has no schema message".into()));
    }
    Ok(messages)
}

/// Reads the schema (unless `known`, the schema of an identical first
/// message) and every batch, and concatenates the batches.
fn read_stream(
    payload: &[u8],
    messages: &[Message<'_>],
    known: Option<&SchemaRef>,
    max_events: usize,
) -> Result<(SchemaRef, RecordBatch), PayloadError> {
    let schema = match known {
        Some(schema) => Arc::clone(schema),
        None => {
            // Only a known schema's message goes unparsed.
            let first = messages[0]
                .header
                .ok_or_else(|| invalid_arrow("message 0 was not parsed".into()))?;
            let fb = first.header_as_schema().ok_or_else(|| {
                invalid_arrow(format!(
                    "message 0 is a {:?}, not the schema",
                    first.header_type()
                ))
            })?;
            Arc::new(arrow::ipc::convert::fb_to_schema(fb))
        }
    };
    let mut batches = Vec::with_capacity(messages.len() - 1);
    let mut rows = 0usize;
    for (number, m) in messages.iter().enumerate().skip(1) {
        let Some(message) = m.header else {
            return Err(invalid_arrow(format!("message {number} was not parsed")));
        };
        let Some(fb) = message.header_as_record_batch() else {
            if message.header_as_dictionary_batch().is_some() {
                // Dictionaries are rare from devices; arrow's own reader
                // handles them (the framing is already checked).
                return read_with_dictionaries(payload, max_events);
            }
            return Err(invalid_arrow(format!(
                "message {number} at byte {} is a {:?}; after the schema, a stream holds \
                 record batches",
                m.at,
                message.header_type()
            )));
        };
        let body = Buffer::from(m.body);
        let batch = arrow::ipc::reader::read_record_batch(
            &body,
            fb,
            Arc::clone(&schema),
            &HashMap::new(),
            None,
            &message.version(),
        )
        .map_err(|err| invalid_arrow(format!("message {number} at byte {}: {err}", m.at)))?;
        rows = rows.saturating_add(batch.num_rows());
        if rows > max_events {
            return Err(too_many(max_events));
        }
        if batch.num_rows() > 0 {
            batches.push(batch);
        }
    }
    let batch = one_batch(&schema, batches)?;
    Ok((schema, batch))
}

/// The payload's batches as one; a lone batch, the usual case, is taken as
/// it is rather than copied.
fn one_batch(schema: &SchemaRef, batches: Vec<RecordBatch>) -> Result<RecordBatch, PayloadError> {
    match <[RecordBatch; 1]>::try_from(batches) {
        Ok([batch]) => Ok(batch),
        Err(batches) => concat_batches(schema, &batches)
            .map_err(|err| invalid_arrow(format!("its batches do not concatenate: {err}"))),
    }
}

/// Refuses a message with a compressed body: a compressed buffer declares
/// its own decompressed length, which the reader allocates before it looks
/// further, so a few bytes could ask for any amount of memory.
fn uncompressed(
    message: arrow::ipc::Message<'_>,
    number: usize,
    at: usize,
) -> Result<arrow::ipc::Message<'_>, PayloadError> {
    let compressed = message
        .header_as_record_batch()
        .is_some_and(|b| b.compression().is_some())
        || message
            .header_as_dictionary_batch()
            .and_then(|d| d.data())
            .is_some_and(|b| b.compression().is_some());
    if compressed {
        return Err(invalid_arrow(format!(
            "message {number} at byte {at} is compressed; send uncompressed IPC \
             (frames are small, and QUIC carries them as they are)"
        )));
    }
    Ok(message)
}

/// Reads a stream with dictionary batches through arrow's reader.
fn read_with_dictionaries(
    payload: &[u8],
    max_events: usize,
) -> Result<(SchemaRef, RecordBatch), PayloadError> {
    let reader = StreamReader::try_new(Cursor::new(payload), None)
        .map_err(|err| invalid_arrow(err.to_string()))?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    let mut rows = 0usize;
    for batch in reader {
        let batch = batch.map_err(|err| invalid_arrow(err.to_string()))?;
        rows = rows.saturating_add(batch.num_rows());
        if rows > max_events {
            return Err(too_many(max_events));
        }
        if batch.num_rows() > 0 {
            batches.push(batch);
        }
    }
    let batch = one_batch(&schema, batches)?;
    Ok((schema, batch))
}

fn too_many(max_events: usize) -> PayloadError {
    PayloadError::new(
        RejectCode::TooManyEvents,
        format!(
            "the payload holds more than {max_events} rows; send at most {max_events} per frame"
        ),
    )
}

/// Where each column of the stream comes from in the payload's schema.
struct Plan {
    ts: Option<usize>,
    device_id: Option<usize>,
    /// Per declared column, the payload column holding it, if any.
    columns: Vec<Option<usize>>,
}

impl Plan {
    /// Matches the payload's columns to the stream's, in payload order,
    /// rejecting the first that has no place or no lossless conversion.
    fn new(def: &StreamDef, schema: &SchemaRef) -> Result<Plan, PayloadError> {
        let declared: HashMap<&str, usize> = def
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let mut plan = Plan {
            ts: None,
            device_id: None,
            columns: vec![None; def.columns.len()],
        };
        for (index, field) in schema.fields().iter().enumerate() {
            let name = field.name().as_str();
            let ty = field.data_type();
            let (slot, target) = match name {
                TS => (&mut plan.ts, Target::Ts),
                DEVICE_ID => (&mut plan.device_id, Target::DeviceId),
                RECEIVED_AT => {
                    return Err(PayloadError {
                        code: RejectCode::UnknownField,
                        message: "column 'received_at' is set by the server when the frame \
                                  arrives; leave it out"
                            .into(),
                        event: None,
                        field: Some(RECEIVED_AT.into()),
                    });
                }
                _ => match declared.get(name) {
                    Some(&i) => (&mut plan.columns[i], Target::Column(def.columns[i].ty)),
                    None => {
                        return Err(PayloadError {
                            code: RejectCode::UnknownField,
                            message: unknown_column_message(def, name),
                            event: None,
                            field: Some(name.into()),
                        });
                    }
                },
            };
            if slot.is_some() {
                return Err(PayloadError {
                    code: RejectCode::InvalidEvent,
                    message: format!("column '{name}' appears more than once in the schema"),
                    event: None,
                    field: Some(name.into()),
                });
            }
            if !target.accepts(ty) {
                return Err(PayloadError {
                    code: RejectCode::InvalidField,
                    message: format!(
                        "column '{name}' has Arrow type {ty}, which does not convert losslessly \
                         to {}; send {}",
                        target.describe(),
                        target.accepted()
                    ),
                    event: None,
                    field: Some(name.into()),
                });
            }
            *slot = Some(index);
        }
        Ok(plan)
    }
}

fn unknown_column_message(def: &StreamDef, name: &str) -> String {
    let stream = &def.name;
    if def.columns.is_empty() {
        return format!(
            "unknown column '{name}'; stream '{stream}' declares no columns, so the payload may \
             only carry the optional ts and device_id"
        );
    }
    let columns = def
        .columns
        .iter()
        .map(|c| format!("{} ({})", c.name, c.ty))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "unknown column '{name}'; stream '{stream}' has columns {columns}, plus the optional \
         ts and device_id"
    )
}

/// What a payload column feeds.
#[derive(Clone, Copy)]
enum Target {
    Ts,
    DeviceId,
    Column(ColumnType),
}

impl Target {
    fn accepts(self, ty: &DataType) -> bool {
        use DataType as D;
        if *ty == D::Null {
            return true;
        }
        match self {
            Target::DeviceId => is_string(ty),
            Target::Ts | Target::Column(ColumnType::Timestamp) => {
                matches!(ty, D::Timestamp(_, _) | D::Int64)
            }
            Target::Column(ColumnType::Boolean) => *ty == D::Boolean,
            Target::Column(ColumnType::Int32 | ColumnType::Int64) => ty.is_integer(),
            Target::Column(ColumnType::Float32) => matches!(ty, D::Float16 | D::Float32),
            Target::Column(ColumnType::Float64) => {
                matches!(ty, D::Float16 | D::Float32 | D::Float64)
            }
            Target::Column(ColumnType::Utf8) => is_string(ty),
        }
    }

    fn describe(self) -> String {
        match self {
            Target::Ts => "ts (TIMESTAMP)".into(),
            Target::DeviceId => "device_id (VARCHAR)".into(),
            Target::Column(ty) => ty.sql_name().into(),
        }
    }

    /// The Arrow types accepted, for messages.
    fn accepted(self) -> &'static str {
        match self {
            Target::Ts | Target::Column(ColumnType::Timestamp) => {
                "Timestamp (any unit, any time zone) or Int64 epoch milliseconds"
            }
            Target::DeviceId | Target::Column(ColumnType::Utf8) => "Utf8, LargeUtf8 or Utf8View",
            Target::Column(ColumnType::Boolean) => "Boolean",
            Target::Column(ColumnType::Int32) => "an integer type (values must fit INT)",
            Target::Column(ColumnType::Int64) => "an integer type (values must fit BIGINT)",
            Target::Column(ColumnType::Float32) => "Float32 (or Float16)",
            Target::Column(ColumnType::Float64) => "Float64 (or Float32, Float16)",
        }
    }
}

fn is_string(ty: &DataType) -> bool {
    matches!(
        ty,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Builds the output columns from the concatenated payload batch.
struct Converter<'a> {
    def: &'a StreamDef,
    batch: &'a RecordBatch,
    device_id: &'a str,
    received_at: i64,
    max_string_bytes: usize,
}

impl Converter<'_> {
    fn convert(&self, plan: &Plan) -> Result<RecordBatch, PayloadError> {
        let rows = self.batch.num_rows();
        if let Some(i) = plan.device_id {
            self.check_device_id(self.batch.column(i))?;
        }
        let ts = match plan.ts {
            Some(i) => self.timestamps(self.batch.column(i), TS, Some(self.received_at))?,
            None => TimestampMillisecondArray::from_value(self.received_at, rows)
                .with_timezone(TIME_ZONE),
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(3 + self.def.columns.len());
        arrays.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(self.device_id, rows),
        )));
        arrays.push(Arc::new(ts));
        arrays.push(Arc::new(
            TimestampMillisecondArray::from_value(self.received_at, rows).with_timezone(TIME_ZONE),
        ));
        for (column, source) in self.def.columns.iter().zip(&plan.columns) {
            let array = match source {
                Some(i) => self.column(self.batch.column(*i), &column.name, column.ty)?,
                None => new_null_array(&column.ty.data_type(), rows),
            };
            arrays.push(array);
        }
        RecordBatch::try_new(self.def.schema(), arrays)
            .map_err(|err| internal_batch_error(&self.def.name, err))
    }

    fn check_device_id(&self, array: &ArrayRef) -> Result<(), PayloadError> {
        let expected = self.device_id;
        let mismatch = |values: &mut dyn Iterator<Item = Option<&str>>| {
            values
                .enumerate()
                .find_map(|(row, v)| v.filter(|v| *v != expected).map(|v| (row, quote(v))))
        };
        let found = match array.data_type() {
            DataType::Utf8 => mismatch(&mut array.as_string::<i32>().iter()),
            DataType::LargeUtf8 => mismatch(&mut array.as_string::<i64>().iter()),
            DataType::Utf8View => mismatch(&mut array.as_string_view().iter()),
            _ => None,
        };
        match found {
            None => Ok(()),
            Some((row, found)) => Err(PayloadError::new(
                RejectCode::InvalidDeviceId,
                format!(
                    "event {row}: field 'device_id' is {found} but this connection is \
                     authenticated as {expected:?}; leave device_id out or set it to {expected:?}"
                ),
            )
            .at(row, Some(DEVICE_ID))),
        }
    }

    fn column(
        &self,
        array: &ArrayRef,
        name: &str,
        ty: ColumnType,
    ) -> Result<ArrayRef, PayloadError> {
        let rows = array.len();
        if *array.data_type() == DataType::Null {
            return Ok(new_null_array(&ty.data_type(), rows));
        }
        Ok(match ty {
            ColumnType::Boolean => Arc::clone(array),
            ColumnType::Int32 => {
                let wide = self.integers(array, name, ty)?;
                if let Some(row) = wide
                    .iter()
                    .position(|v| v.is_some_and(|v| i32::try_from(v).is_err()))
                {
                    return Err(out_of_range(row, name, ty, wide.value(row)));
                }
                self.cast(&(Arc::new(wide) as ArrayRef), &DataType::Int32)?
            }
            ColumnType::Int64 => Arc::new(self.integers(array, name, ty)?),
            ColumnType::Float32 => {
                let floats = self.cast(array, &DataType::Float32)?;
                check_finite(floats.as_primitive::<Float32Type>().iter(), name, ty)?;
                floats
            }
            ColumnType::Float64 => {
                let floats = self.cast(array, &DataType::Float64)?;
                check_finite(floats.as_primitive::<Float64Type>().iter(), name, ty)?;
                floats
            }
            ColumnType::Utf8 => {
                let bytes: usize = match array.data_type() {
                    DataType::Utf8View => array
                        .as_string_view()
                        .views()
                        .iter()
                        .map(|v| (*v as u32) as usize)
                        .sum(),
                    _ => 0,
                };
                if bytes > self.max_string_bytes {
                    return Err(PayloadError {
                        code: RejectCode::InvalidField,
                        message: format!(
                            "column '{name}' holds {bytes} bytes of strings, more than the \
                             {}-byte payload; send Utf8 rather than shared views",
                            self.max_string_bytes
                        ),
                        event: None,
                        field: Some(name.into()),
                    });
                }
                self.cast(array, &DataType::Utf8)?
            }
            ColumnType::Timestamp => Arc::new(self.timestamps(array, name, None)?),
        })
    }

    /// Any integer column as BIGINT values; UInt64 above the BIGINT range
    /// is rejected at its row.
    fn integers(
        &self,
        array: &ArrayRef,
        name: &str,
        ty: ColumnType,
    ) -> Result<Int64Array, PayloadError> {
        if *array.data_type() == DataType::UInt64 {
            let values = array.as_primitive::<UInt64Type>();
            if let Some(row) = values
                .iter()
                .position(|v| v.is_some_and(|v| i64::try_from(v).is_err()))
            {
                return Err(out_of_range(row, name, ty, values.value(row)));
            }
        }
        let wide = self.cast(array, &DataType::Int64)?;
        Ok(wide.as_primitive::<Int64Type>().clone())
    }

    /// A timestamp column in milliseconds (sub-millisecond digits dropped,
    /// as for JSON), within years 0000 to 9999. Nulls stay null, or become
    /// `null_as` (for `ts`).
    fn timestamps(
        &self,
        array: &ArrayRef,
        name: &str,
        null_as: Option<i64>,
    ) -> Result<TimestampMillisecondArray, PayloadError> {
        let rows = array.len();
        let (values, per_ms): (Vec<Option<i64>>, Scale) = match array.data_type() {
            DataType::Null => (vec![None; rows], Scale::Milli),
            DataType::Int64 => (
                array.as_primitive::<Int64Type>().iter().collect(),
                Scale::Milli,
            ),
            DataType::Timestamp(unit, _) => match unit {
                TimeUnit::Second => (
                    array.as_primitive::<TimestampSecondType>().iter().collect(),
                    Scale::Second,
                ),
                TimeUnit::Millisecond => (
                    array
                        .as_primitive::<TimestampMillisecondType>()
                        .iter()
                        .collect(),
                    Scale::Milli,
                ),
                TimeUnit::Microsecond => (
                    array
                        .as_primitive::<TimestampMicrosecondType>()
                        .iter()
                        .collect(),
                    Scale::Divide(1_000),
                ),
                TimeUnit::Nanosecond => (
                    array
                        .as_primitive::<TimestampNanosecondType>()
                        .iter()
                        .collect(),
                    Scale::Divide(1_000_000),
                ),
            },
            other => {
                return Err(self.internal(format!(
                    "column '{name}' of type {other} passed as a timestamp"
                )));
            }
        };
        let mut out = Vec::with_capacity(rows);
        for (row, value) in values.into_iter().enumerate() {
            let ms = match value {
                None => {
                    out.push(null_as);
                    continue;
                }
                Some(v) => match per_ms {
                    Scale::Milli => Some(v),
                    Scale::Second => v.checked_mul(1_000),
                    Scale::Divide(d) => Some(v.div_euclid(d)),
                },
            };
            match ms.filter(|ms| (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(ms)) {
                Some(ms) => out.push(Some(ms)),
                None => {
                    let raw = value.unwrap_or_default();
                    return Err(PayloadError::new(
                        RejectCode::InvalidField,
                        format!(
                            "event {row}: field '{name}' must be a time in TIMESTAMP's range, got \
                             {raw} {}{OUTSIDE_YEARS}",
                            per_ms.unit()
                        ),
                    )
                    .at(row, Some(name)));
                }
            }
        }
        Ok(TimestampMillisecondArray::from(out).with_timezone(TIME_ZONE))
    }

    fn cast(&self, array: &ArrayRef, to: &DataType) -> Result<ArrayRef, PayloadError> {
        if array.data_type() == to {
            return Ok(Arc::clone(array));
        }
        cast(array, to).map_err(|err| {
            self.internal(format!("converting {} to {to}: {err}", array.data_type()))
        })
    }

    /// A conversion the schema check allowed failed: a bug, not the
    /// device's fault.
    fn internal(&self, detail: String) -> PayloadError {
        PayloadError::new(
            RejectCode::Unavailable,
            format!(
                "internal error decoding Arrow for stream '{}': {detail}",
                self.def.name
            ),
        )
    }
}

#[derive(Clone, Copy)]
enum Scale {
    Second,
    Milli,
    Divide(i64),
}

impl Scale {
    fn unit(self) -> &'static str {
        match self {
            Scale::Second => "s",
            Scale::Milli => "ms",
            Scale::Divide(1_000) => "µs",
            Scale::Divide(_) => "ns",
        }
    }
}

fn out_of_range(
    row: usize,
    name: &str,
    ty: ColumnType,
    value: impl std::fmt::Display,
) -> PayloadError {
    PayloadError::new(
        RejectCode::InvalidField,
        format!(
            "event {row}: field '{name}' must be {}, got {value}, which is out of range for {ty}",
            ty.json_expectation()
        ),
    )
    .at(row, Some(name))
}

/// NaN and infinities are refused, as JSON cannot carry them either.
fn check_finite<T: Into<f64>>(
    values: impl Iterator<Item = Option<T>>,
    name: &str,
    ty: ColumnType,
) -> Result<(), PayloadError> {
    for (row, value) in values.enumerate() {
        if let Some(v) = value.map(Into::into).filter(|v: &f64| !v.is_finite()) {
            return Err(PayloadError::new(
                RejectCode::InvalidField,
                format!("event {row}: field '{name}' must be a finite number ({ty}), got {v}"),
            )
            .at(row, Some(name)));
        }
    }
    Ok(())
}
