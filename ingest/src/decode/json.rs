//! JSON payloads (encoding 0x01) into Arrow.
//!
//! serde_json drives a set of `DeserializeSeed` visitors that append each
//! value straight into the typed Arrow builder of its column: no
//! `serde_json::Value`, no per-event allocation on the happy path (keys and
//! strings are borrowed from the payload unless they contain escapes).
//!
//! Builder lengths double as bookkeeping: while event `i` is read, a column
//! whose builder already holds `i + 1` values has been set, so a repeated key
//! is caught, and a builder still at `i` when the object closes gets a null.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder,
    Int64Builder, StringArray, StringBuilder, TimestampMillisecondArray,
    TimestampMillisecondBuilder,
};
use arrow::record_batch::RecordBatch;
use chrono::DateTime;
use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use tributary_engine::event::{ColumnType, DEVICE_ID, RECEIVED_AT, StreamDef, TIME_ZONE, TS};

use super::PayloadError;
use super::error::internal_batch_error;
use crate::protocol::RejectCode;

/// 0000-01-01T00:00:00.000Z: RFC 3339 has four-digit years, and keeping
/// integer timestamps in the same range means every stored `ts` can be
/// written back out as RFC 3339.
pub(super) const MIN_TIMESTAMP_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z.
pub(super) const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Appended to a timestamp outside those bounds.
pub(super) const OUTSIDE_YEARS: &str = ", which is outside the years 0000 to 9999";

/// Strings quoted in error messages are cut to this many characters.
const QUOTE_CHARS: usize = 40;

/// Above this many declared columns, keys are looked up in a hash map rather
/// than by comparing against each name in turn.
const LINEAR_LOOKUP_MAX: usize = 16;

/// Decodes a JSON payload (one object, an array of objects, or JSON lines)
/// into a batch with exactly `def.schema()`.
///
/// `device_id` is the authenticated device and fills the `device_id` column;
/// `received_at_ms` fills `received_at`, and `ts` where an event has none.
/// At most `max_events` events are accepted.
pub fn decode_json(
    def: &StreamDef,
    payload: &[u8],
    device_id: &str,
    received_at_ms: i64,
    max_events: usize,
) -> Result<RecordBatch, PayloadError> {
    let mut state = State::new(def, payload.len(), device_id, received_at_ms, max_events);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let parsed = if first_non_whitespace(payload) == Some(b'[') {
        de.deserialize_seq(ArrayVisitor { state: &mut state })
            .and_then(|()| de.end())
    } else {
        read_concatenated(&mut de, &mut state, payload)
    };
    if let Err(err) = parsed {
        return Err(state.into_error(err));
    }
    if state.events == 0 {
        return Err(PayloadError::new(
            RejectCode::EmptyFrame,
            "the payload holds no events; send at least one JSON object".into(),
        ));
    }
    state.finish()
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn first_non_whitespace(payload: &[u8]) -> Option<u8> {
    payload.iter().copied().find(|b| !is_json_whitespace(*b))
}

/// Reads objects one after another (a single object is the one-line case)
/// until the input ends.
///
/// serde_json's `Deserializer` cannot say whether input remains without
/// building an error, and building one rescans the input for its line and
/// column, which would make this quadratic. So the end is recognised from
/// the error reading one more value produces: end of input while expecting
/// a value, with nothing consumed, and the last non-whitespace byte closing
/// an object (or no such byte at all). A value cut short at the end (`tr`,
/// `-`, `"abc`) fails one of those tests and stays an error.
fn read_concatenated(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
    state: &mut State<'_>,
    payload: &[u8],
) -> Result<(), serde_json::Error> {
    loop {
        let started = state.events;
        match (EventSeed { state: &mut *state }).deserialize(&mut *de) {
            Ok(()) => {}
            Err(err) if state.events == started && is_end_of_input(&err, payload) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

fn is_end_of_input(err: &serde_json::Error, payload: &[u8]) -> bool {
    let last = payload
        .iter()
        .rev()
        .copied()
        .find(|b| !is_json_whitespace(*b));
    err.is_eof()
        && matches!(last, None | Some(b'}'))
        // An unterminated string can also end in `}`; only "EOF while parsing
        // a value" means nothing of a new value was read.
        && err.to_string().starts_with("EOF while parsing a value")
}

/// Everything one decode call accumulates.
struct State<'a> {
    def: &'a StreamDef,
    device_id: &'a str,
    received_at: i64,
    max_events: usize,
    lookup: Lookup<'a>,
    columns: Vec<ColumnBuilder>,
    ts: ColumnBuilder,
    /// Events started so far.
    events: usize,
    /// Whether event `events - 1` is being read (for syntax error messages).
    in_event: bool,
    /// A value's problem, left by a value visitor that cannot see the event
    /// index or field name; the map visitor turns it into `failure`.
    problem: Option<Problem>,
    /// The rejection found by a visitor. serde only carries an opaque error
    /// out of the parser, so the structured one waits here.
    failure: Option<PayloadError>,
}

impl<'a> State<'a> {
    fn new(
        def: &'a StreamDef,
        payload_len: usize,
        device_id: &'a str,
        received_at: i64,
        max_events: usize,
    ) -> Self {
        // A guess to spare most regrowth: small events are rarely under ~24
        // bytes. Builders still grow when it is short.
        let rows = (payload_len / 24 + 1).min(max_events.max(1)).min(8192);
        State {
            def,
            device_id,
            received_at,
            max_events,
            lookup: Lookup::new(def),
            columns: def
                .columns
                .iter()
                .map(|c| ColumnBuilder::new(c.ty, rows))
                .collect(),
            ts: ColumnBuilder::new(ColumnType::Timestamp, rows),
            events: 0,
            in_event: false,
            problem: None,
            failure: None,
        }
    }

    /// Starts the next event, returning its index.
    fn begin_event<E: de::Error>(&mut self) -> Result<usize, E> {
        let index = self.events;
        if index >= self.max_events {
            return Err(self.fail(PayloadError::new(
                RejectCode::TooManyEvents,
                format!(
                    "the payload holds more than {} events; send at most {} per frame",
                    self.max_events, self.max_events
                ),
            )));
        }
        self.events += 1;
        self.in_event = true;
        Ok(index)
    }

    /// Completes event `index`: absent columns become null, absent `ts` the
    /// receive time.
    fn end_event(&mut self, index: usize) {
        for column in &mut self.columns {
            if column.len() == index {
                column.append_null();
            }
        }
        if self.ts.len() == index {
            self.ts.append_timestamp(self.received_at);
        }
        self.in_event = false;
    }

    fn fail<E: de::Error>(&mut self, err: PayloadError) -> E {
        self.failure = Some(err);
        E::custom("payload rejected")
    }

    /// Maps a value visitor's error: its recorded problem if it left one,
    /// otherwise a syntax error passed through.
    fn value_error<E: de::Error>(
        &mut self,
        err: E,
        index: usize,
        field: &str,
        ty: ColumnType,
    ) -> E {
        match self.problem.take() {
            Some(problem) => {
                let message = format!(
                    "event {index}: field '{field}' must be {}, got {}{}",
                    ty.json_expectation(),
                    problem.found,
                    problem.detail
                );
                self.fail(
                    PayloadError::new(RejectCode::InvalidField, message).at(index, Some(field)),
                )
            }
            None => err,
        }
    }

    fn into_error(mut self, err: serde_json::Error) -> PayloadError {
        if let Some(failure) = self.failure.take() {
            return failure;
        }
        let event = self.in_event.then(|| self.events - 1);
        let message = match event {
            Some(index) => format!("invalid JSON in event {index}: {err}"),
            None => format!("invalid JSON: {err}"),
        };
        PayloadError {
            code: RejectCode::InvalidJson,
            message,
            event,
            field: None,
        }
    }

    fn unknown_field_message(&self, index: usize, key: &str) -> String {
        let stream = &self.def.name;
        if self.def.columns.is_empty() {
            return format!(
                "event {index}: unknown field '{key}'; stream '{stream}' declares no columns, \
                 so events may only carry the optional ts and device_id"
            );
        }
        let columns = self
            .def
            .columns
            .iter()
            .map(|c| format!("{} ({})", c.name, c.ty))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "event {index}: unknown field '{key}'; stream '{stream}' has columns {columns}, \
             plus the optional ts and device_id"
        )
    }

    fn finish(self) -> Result<RecordBatch, PayloadError> {
        let rows = self.events;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(3 + self.columns.len());
        arrays.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(self.device_id, rows),
        )));
        arrays.push(self.ts.finish());
        arrays.push(Arc::new(
            TimestampMillisecondArray::from_value(self.received_at, rows).with_timezone(TIME_ZONE),
        ));
        arrays.extend(self.columns.into_iter().map(ColumnBuilder::finish));
        RecordBatch::try_new(self.def.schema(), arrays)
            .map_err(|err| internal_batch_error(&self.def.name, err))
    }
}

/// What a key of an event refers to.
enum Key {
    Column(usize),
    Ts,
    DeviceId,
    ReceivedAt,
    Unknown(String),
}

/// Key → declared column index.
enum Lookup<'a> {
    Linear(Vec<&'a str>),
    Hashed(HashMap<&'a str, usize>),
}

impl<'a> Lookup<'a> {
    fn new(def: &'a StreamDef) -> Self {
        let names = def.columns.iter().map(|c| c.name.as_str());
        if def.columns.len() <= LINEAR_LOOKUP_MAX {
            Lookup::Linear(names.collect())
        } else {
            Lookup::Hashed(names.enumerate().map(|(i, n)| (n, i)).collect())
        }
    }

    fn resolve(&self, key: &str) -> Key {
        match key {
            TS => return Key::Ts,
            DEVICE_ID => return Key::DeviceId,
            RECEIVED_AT => return Key::ReceivedAt,
            _ => {}
        }
        let found = match self {
            Lookup::Linear(names) => names.iter().position(|n| *n == key),
            Lookup::Hashed(map) => map.get(key).copied(),
        };
        found.map_or_else(|| Key::Unknown(key.to_owned()), Key::Column)
    }
}

struct KeySeed<'s, 'a>(&'s Lookup<'a>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(self.0.resolve(key))
    }
}

/// Reads one event: an object, or something else that is rejected.
struct EventSeed<'s, 'a> {
    state: &'s mut State<'a>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // `any` rather than `map`, so a non-object reaches a visit method and
        // the rejection can say what was found.
        d.deserialize_any(self)
    }
}

impl EventSeed<'_, '_> {
    fn not_object<E: de::Error>(self, found: String) -> Result<(), E> {
        let index = self.state.begin_event()?;
        let err = PayloadError::new(
            RejectCode::InvalidEvent,
            format!("event {index} is not a JSON object, got {found}"),
        )
        .at(index, None);
        Err(self.state.fail(err))
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.state;
        let def = state.def;
        let index = state.begin_event()?;
        let mut saw_device_id = false;
        while let Some(key) = map.next_key_seed(KeySeed(&state.lookup))? {
            match key {
                Key::Column(i) => {
                    let column = &def.columns[i];
                    if state.columns[i].len() > index {
                        return Err(state.fail(repeated(index, &column.name)));
                    }
                    let seed = ValueSeed {
                        builder: &mut state.columns[i],
                        null_timestamp: None,
                        problem: &mut state.problem,
                    };
                    if let Err(err) = map.next_value_seed(seed) {
                        return Err(state.value_error(err, index, &column.name, column.ty));
                    }
                }
                Key::Ts => {
                    if state.ts.len() > index {
                        return Err(state.fail(repeated(index, TS)));
                    }
                    let seed = ValueSeed {
                        builder: &mut state.ts,
                        null_timestamp: Some(state.received_at),
                        problem: &mut state.problem,
                    };
                    if let Err(err) = map.next_value_seed(seed) {
                        return Err(state.value_error(err, index, TS, ColumnType::Timestamp));
                    }
                }
                Key::DeviceId => {
                    if saw_device_id {
                        return Err(state.fail(repeated(index, DEVICE_ID)));
                    }
                    saw_device_id = true;
                    let seed = DeviceIdSeed {
                        expected: state.device_id,
                        problem: &mut state.problem,
                    };
                    if let Err(err) = map.next_value_seed(seed) {
                        let Some(problem) = state.problem.take() else {
                            return Err(err);
                        };
                        let message = format!(
                            "event {index}: field 'device_id' is {} but this connection is \
                             authenticated as {:?}; leave device_id out or set it to {:?}",
                            problem.found, state.device_id, state.device_id
                        );
                        let err = PayloadError::new(RejectCode::InvalidDeviceId, message)
                            .at(index, Some(DEVICE_ID));
                        return Err(state.fail(err));
                    }
                }
                Key::ReceivedAt => {
                    let err = PayloadError::new(
                        RejectCode::UnknownField,
                        format!(
                            "event {index}: field 'received_at' is set by the server when the \
                             frame arrives; leave it out"
                        ),
                    )
                    .at(index, Some(RECEIVED_AT));
                    return Err(state.fail(err));
                }
                Key::Unknown(key) => {
                    let message = state.unknown_field_message(index, &key);
                    let err =
                        PayloadError::new(RejectCode::UnknownField, message).at(index, Some(&key));
                    return Err(state.fail(err));
                }
            }
        }
        state.end_event(index);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_object("an array".into())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.not_object(format!("boolean {v}"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.not_object(format!("number {v}"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.not_object(format!("number {v}"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.not_object(format!("number {v:?}"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.not_object(quote(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object("null".into())
    }
}

fn repeated(index: usize, field: &str) -> PayloadError {
    PayloadError::new(
        RejectCode::InvalidEvent,
        format!("event {index}: field '{field}' appears more than once"),
    )
    .at(index, Some(field))
}

/// `string "…"`, cut short for messages.
pub(super) fn quote(v: &str) -> String {
    let mut chars = v.char_indices();
    match chars.nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("string {:?}…", &v[..cut]),
        None => format!("string {v:?}"),
    }
}

/// What was wrong with a value, without the event and field (which the
/// value visitor does not know).
struct Problem {
    /// What was found, e.g. `string "hot"`.
    found: String,
    /// Appended after `found`, e.g. `, which is out of range for REAL`.
    detail: String,
}

/// One declared column's builder.
enum ColumnBuilder {
    Boolean(BooleanBuilder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Utf8(StringBuilder),
    Timestamp(TimestampMillisecondBuilder),
}

impl ColumnBuilder {
    fn new(ty: ColumnType, rows: usize) -> Self {
        match ty {
            ColumnType::Boolean => ColumnBuilder::Boolean(BooleanBuilder::with_capacity(rows)),
            ColumnType::Int32 => ColumnBuilder::Int32(Int32Builder::with_capacity(rows)),
            ColumnType::Int64 => ColumnBuilder::Int64(Int64Builder::with_capacity(rows)),
            ColumnType::Float32 => ColumnBuilder::Float32(Float32Builder::with_capacity(rows)),
            ColumnType::Float64 => ColumnBuilder::Float64(Float64Builder::with_capacity(rows)),
            ColumnType::Utf8 => ColumnBuilder::Utf8(StringBuilder::with_capacity(rows, rows * 8)),
            ColumnType::Timestamp => ColumnBuilder::Timestamp(
                TimestampMillisecondBuilder::with_capacity(rows).with_timezone(TIME_ZONE),
            ),
        }
    }

    fn ty(&self) -> ColumnType {
        match self {
            ColumnBuilder::Boolean(_) => ColumnType::Boolean,
            ColumnBuilder::Int32(_) => ColumnType::Int32,
            ColumnBuilder::Int64(_) => ColumnType::Int64,
            ColumnBuilder::Float32(_) => ColumnType::Float32,
            ColumnBuilder::Float64(_) => ColumnType::Float64,
            ColumnBuilder::Utf8(_) => ColumnType::Utf8,
            ColumnBuilder::Timestamp(_) => ColumnType::Timestamp,
        }
    }

    fn len(&self) -> usize {
        match self {
            ColumnBuilder::Boolean(b) => b.len(),
            ColumnBuilder::Int32(b) => b.len(),
            ColumnBuilder::Int64(b) => b.len(),
            ColumnBuilder::Float32(b) => b.len(),
            ColumnBuilder::Float64(b) => b.len(),
            ColumnBuilder::Utf8(b) => b.len(),
            ColumnBuilder::Timestamp(b) => b.len(),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Boolean(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Utf8(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) => b.append_null(),
        }
    }

    /// Only the `ts` builder (always a timestamp) is filled this way.
    fn append_timestamp(&mut self, ms: i64) {
        if let ColumnBuilder::Timestamp(b) = self {
            b.append_value(ms);
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            ColumnBuilder::Boolean(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Utf8(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(mut b) => Arc::new(b.finish()),
        }
    }
}

/// Reads one value into one builder. A value the column cannot hold leaves a
/// [`Problem`] and fails the parse.
struct ValueSeed<'s> {
    builder: &'s mut ColumnBuilder,
    /// What `null` means: `None` stores null; `Some(ms)` stores that time
    /// (for `ts`, which is never null).
    null_timestamp: Option<i64>,
    problem: &'s mut Option<Problem>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    fn reject<E: de::Error>(self, found: String, detail: &str) -> Result<(), E> {
        *self.problem = Some(Problem {
            found,
            detail: detail.to_owned(),
        });
        Err(E::custom("invalid value"))
    }

    fn timestamp<E: de::Error>(self, ms: i64, found: impl FnOnce() -> String) -> Result<(), E> {
        if !(MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&ms) {
            return self.reject(found(), OUTSIDE_YEARS);
        }
        self.builder.append_timestamp(ms);
        Ok(())
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.builder.ty().json_expectation())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.builder {
            ColumnBuilder::Boolean(b) => b.append_value(v),
            _ => return self.reject(format!("boolean {v}"), ""),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match self.builder {
            ColumnBuilder::Int32(b) => match i32::try_from(v) {
                Ok(v) => b.append_value(v),
                Err(_) => return self.reject(format!("number {v}"), ""),
            },
            ColumnBuilder::Int64(b) => b.append_value(v),
            ColumnBuilder::Float32(b) => b.append_value(v as f32),
            ColumnBuilder::Float64(b) => b.append_value(v as f64),
            ColumnBuilder::Timestamp(_) => return self.timestamp(v, || format!("number {v}")),
            ColumnBuilder::Boolean(_) | ColumnBuilder::Utf8(_) => {
                return self.reject(format!("number {v}"), "");
            }
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        // serde_json hands non-negative integers here; they share the signed
        // path whenever they fit, and are out of range otherwise.
        match i64::try_from(v) {
            Ok(signed) => self.visit_i64(signed),
            Err(_) => match self.builder {
                ColumnBuilder::Float32(b) => {
                    b.append_value(v as f32);
                    Ok(())
                }
                ColumnBuilder::Float64(b) => {
                    b.append_value(v as f64);
                    Ok(())
                }
                ColumnBuilder::Int64(_) => {
                    self.reject(format!("number {v}"), ", which is out of range for BIGINT")
                }
                ColumnBuilder::Timestamp(_) => self.reject(format!("number {v}"), OUTSIDE_YEARS),
                _ => self.reject(format!("number {v}"), ""),
            },
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.builder {
            ColumnBuilder::Float64(b) => b.append_value(v),
            ColumnBuilder::Float32(b) => {
                let narrow = v as f32;
                // serde_json only yields finite numbers; a finite f64 that
                // turns infinite did not fit.
                if narrow.is_infinite() {
                    return self
                        .reject(format!("number {v:?}"), ", which is out of range for REAL");
                }
                b.append_value(narrow);
            }
            _ => return self.reject(format!("number {v:?}"), ""),
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.builder {
            ColumnBuilder::Utf8(b) => b.append_value(v),
            ColumnBuilder::Timestamp(_) => {
                return match DateTime::parse_from_rfc3339(v) {
                    Ok(t) => self.timestamp(t.timestamp_millis(), || quote(v)),
                    Err(err) => self.reject(quote(v), &format!(" (not RFC 3339: {err})")),
                };
            }
            _ => return self.reject(quote(v), ""),
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        match self.null_timestamp {
            Some(ms) => self.builder.append_timestamp(ms),
            None => self.builder.append_null(),
        }
        Ok(())
    }

    // Returning before touching the contents is fine: the whole parse stops.
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.reject("an array".into(), "")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.reject("an object".into(), "")
    }
}

/// Reads an event's `device_id`, which must be null or the authenticated id.
struct DeviceIdSeed<'s> {
    expected: &'s str,
    problem: &'s mut Option<Problem>,
}

impl DeviceIdSeed<'_> {
    fn reject<E: de::Error>(self, found: String) -> Result<(), E> {
        *self.problem = Some(Problem {
            found,
            detail: String::new(),
        });
        Err(E::custom("invalid device_id"))
    }
}

impl<'de> DeserializeSeed<'de> for DeviceIdSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DeviceIdSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the string {:?}", self.expected)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if v == self.expected {
            Ok(())
        } else {
            self.reject(quote(v))
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.reject(format!("boolean {v}"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.reject(format!("number {v}"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.reject(format!("number {v}"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.reject(format!("number {v:?}"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.reject("an array".into())
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.reject("an object".into())
    }
}

/// The top level of an array payload: each element is an event.
struct ArrayVisitor<'s, 'a> {
    state: &'s mut State<'a>,
}

impl<'de> Visitor<'de> for ArrayVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of JSON objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(EventSeed {
                state: &mut *self.state,
            })?
            .is_some()
        {}
        Ok(())
    }
}
