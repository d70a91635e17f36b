//! One test per rule and per rejection of `decode_json`.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
use chrono::DateTime;
use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};

use super::*;
use crate::protocol::RejectCode;

const DEVICE: &str = "sensor-1";
const NOW: i64 = 1_700_000_000_000;

fn def() -> StreamDef {
    let col = |name: &str, ty| ColumnDef {
        name: name.into(),
        ty,
    };
    StreamDef::new(
        "telemetry",
        vec![
            col("ok", ColumnType::Boolean),
            col("count", ColumnType::Int32),
            col("total", ColumnType::Int64),
            col("ratio", ColumnType::Float32),
            col("temp", ColumnType::Float64),
            col("label", ColumnType::Utf8),
            col("seen", ColumnType::Timestamp),
        ],
        4,
    )
    .unwrap()
}

fn decode(payload: &str) -> Result<RecordBatch, PayloadError> {
    decode_json(&def(), payload.as_bytes(), DEVICE, NOW, 100)
}

fn reject(payload: &str) -> PayloadError {
    match decode(payload) {
        Ok(batch) => panic!("{payload} decoded to {batch:?}"),
        Err(err) => err,
    }
}

/// Asserts the rejection's code, event and field, and returns its message.
fn rejected(payload: &str, code: RejectCode, event: Option<usize>, field: Option<&str>) -> String {
    let err = reject(payload);
    assert_eq!(
        (err.code, err.event, err.field.as_deref()),
        (code, event, field),
        "{payload}: {err}"
    );
    err.message
}

fn ms(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn ts_column(batch: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    batch
        .column_by_name(name)
        .unwrap()
        .as_primitive::<TimestampMillisecondType>()
        .iter()
        .collect()
}

const FULL: &str = r#"{"ok":true,"count":-7,"total":9007199254740993,"ratio":0.5,"temp":21.5,"label":"a\"b","seen":"2025-01-02T03:04:05.678+02:00","ts":1700000000123}"#;

#[test]
fn every_type_lands_in_its_arrow_column() {
    let batch = decode(FULL).unwrap();
    assert_eq!(batch.schema(), def().schema());
    assert_eq!(batch.num_rows(), 1);
    let col = |name| batch.column_by_name(name).unwrap();
    assert!(col("ok").as_boolean().value(0));
    assert_eq!(col("count").as_primitive::<Int32Type>().value(0), -7);
    assert_eq!(
        col("total").as_primitive::<Int64Type>().value(0),
        9_007_199_254_740_993,
        "integers are not routed through f64"
    );
    assert_eq!(col("ratio").as_primitive::<Float32Type>().value(0), 0.5);
    assert_eq!(col("temp").as_primitive::<Float64Type>().value(0), 21.5);
    assert_eq!(col("label").as_string::<i32>().value(0), "a\"b");
    assert_eq!(
        ts_column(&batch, "seen"),
        [Some(ms("2025-01-02T01:04:05.678Z"))]
    );
    assert_eq!(ts_column(&batch, "ts"), [Some(1_700_000_000_123)]);
    assert_eq!(ts_column(&batch, "received_at"), [Some(NOW)]);
    assert_eq!(col("device_id").as_string::<i32>().value(0), DEVICE);
}

#[test]
fn object_array_and_json_lines_are_the_same_events() {
    let a = r#"{"temp":1}"#;
    let b = r#"{"temp":2,"label":"x"}"#;
    let lines = decode(&format!("{a}\n{b}\n")).unwrap();
    let array = decode(&format!(" [ {a} ,\n {b} ] \n")).unwrap();
    let spaced = decode(&format!("{a}  {b}")).unwrap();
    let glued = decode(&format!("{a}{b}")).unwrap();
    let pretty = decode("{\n  \"temp\": 1\n}\n{\n  \"temp\": 2,\n  \"label\": \"x\"\n}").unwrap();
    assert_eq!(lines.num_rows(), 2);
    for other in [&array, &spaced, &glued, &pretty] {
        assert_eq!(other, &lines);
    }
    let single = decode(a).unwrap();
    assert_eq!(single.num_rows(), 1);
    assert_eq!(single, lines.slice(0, 1));
}

#[test]
fn missing_and_null_fields_are_null_and_ts_defaults_to_received_at() {
    let batch =
        decode(r#"{} {"temp":null,"ts":null,"label":null} {"ts":"1970-01-01T00:00:01Z"}"#).unwrap();
    assert_eq!(batch.num_rows(), 3);
    for name in ["ok", "count", "total", "ratio", "temp", "label", "seen"] {
        let column = batch.column_by_name(name).unwrap();
        assert_eq!(column.null_count(), 3, "{name}");
    }
    assert_eq!(ts_column(&batch, "ts"), [Some(NOW), Some(NOW), Some(1000)]);
    for name in ["device_id", "ts", "received_at"] {
        assert_eq!(batch.column_by_name(name).unwrap().null_count(), 0);
    }
}

#[test]
fn device_id_in_the_payload_must_be_the_authenticated_one() {
    let batch = decode(r#"{"device_id":"sensor-1","temp":1} {"device_id":null}"#).unwrap();
    let ids = batch
        .column_by_name("device_id")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(ids.iter().collect::<Vec<_>>(), [Some(DEVICE), Some(DEVICE)]);

    let message = rejected(
        r#"{"temp":1} {"device_id":"sensor-2"}"#,
        RejectCode::InvalidDeviceId,
        Some(1),
        Some("device_id"),
    );
    assert_eq!(
        message,
        r#"event 1: field 'device_id' is string "sensor-2" but this connection is authenticated as "sensor-1"; leave device_id out or set it to "sensor-1""#
    );
    let message = rejected(
        r#"{"device_id":7}"#,
        RejectCode::InvalidDeviceId,
        Some(0),
        Some("device_id"),
    );
    assert!(message.contains("is number 7"), "{message}");
    rejected(
        r#"{"device_id":{"id":"sensor-1"}}"#,
        RejectCode::InvalidDeviceId,
        Some(0),
        Some("device_id"),
    );
}

#[test]
fn received_at_is_set_by_the_server() {
    let message = rejected(
        r#"{"received_at":1}"#,
        RejectCode::UnknownField,
        Some(0),
        Some("received_at"),
    );
    assert!(message.contains("set by the server"), "{message}");
}

#[test]
fn unknown_fields_are_named_with_the_stream_columns() {
    let message = rejected(
        r#"{"temp":1} {"temp":2} {"tmp":3}"#,
        RejectCode::UnknownField,
        Some(2),
        Some("tmp"),
    );
    assert_eq!(
        message,
        "event 2: unknown field 'tmp'; stream 'telemetry' has columns ok (BOOLEAN), count (INT), \
         total (BIGINT), ratio (REAL), temp (DOUBLE), label (VARCHAR), seen (TIMESTAMP), plus the \
         optional ts and device_id"
    );
    // Keys are case-sensitive.
    rejected(
        r#"{"Temp":1}"#,
        RejectCode::UnknownField,
        Some(0),
        Some("Temp"),
    );

    let bare = StreamDef::new("bare", vec![], 1).unwrap();
    let err = decode_json(&bare, br#"{"x":1}"#, DEVICE, NOW, 10).unwrap_err();
    assert!(err.message.contains("declares no columns"), "{err}");
    let batch = decode_json(&bare, br#"{"ts":5}"#, DEVICE, NOW, 10).unwrap();
    assert_eq!(batch.num_columns(), 3);
}

#[test]
fn wrong_type_message_names_event_field_expectation_and_value() {
    let message = rejected(
        r#"{"temp":"hot"}"#,
        RejectCode::InvalidField,
        Some(0),
        Some("temp"),
    );
    assert_eq!(
        message,
        r#"event 0: field 'temp' must be a number (DOUBLE), got string "hot""#
    );
}

/// `(payload field and value, what the message must say it got)`.
fn invalid(field: &str, value: &str, got: &str) {
    let payload = format!(r#"{{"temp":0}} {{"{field}":{value}}}"#);
    let message = rejected(&payload, RejectCode::InvalidField, Some(1), Some(field));
    assert!(
        message.starts_with(&format!("event 1: field '{field}' must be ")),
        "{message}"
    );
    assert!(
        message.contains(&format!("got {got}")),
        "{payload}: {message}"
    );
}

#[test]
fn booleans() {
    let batch = decode(r#"{"ok":false}"#).unwrap();
    assert!(!batch.column_by_name("ok").unwrap().as_boolean().value(0));
    invalid("ok", "1", "number 1");
    invalid("ok", r#""true""#, r#"string "true""#);
}

#[test]
fn int_takes_integers_in_range_only() {
    let batch = decode(r#"{"count":2147483647} {"count":-2147483648} {"count":0}"#).unwrap();
    let values: Vec<_> = batch
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>()
        .values()
        .to_vec();
    assert_eq!(values, [i32::MAX, i32::MIN, 0]);
    invalid("count", "2147483648", "number 2147483648");
    invalid("count", "-2147483649", "number -2147483649");
    invalid("count", "1.5", "number 1.5");
    invalid("count", "20.0", "number 20.0");
    invalid("count", "2e1", "number 20.0");
    invalid("count", r#""5""#, r#"string "5""#);
    invalid("count", "true", "boolean true");
}

#[test]
fn bigint_takes_integers_in_range_only() {
    let batch = decode(r#"{"total":9223372036854775807} {"total":-9223372036854775808}"#).unwrap();
    let values: Vec<_> = batch
        .column_by_name("total")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(values, [i64::MAX, i64::MIN]);
    invalid(
        "total",
        "9223372036854775808",
        "number 9223372036854775808, which is out of range for BIGINT",
    );
    invalid("total", "0.1", "number 0.1");
    // Beyond u64, serde_json reads a float; still not an integer column's value.
    invalid("total", "1e30", "number 1e30");
}

#[test]
fn real_and_double_take_any_number() {
    let batch =
        decode(r#"{"ratio":3,"temp":-4} {"ratio":1e-3,"temp":1e300} {"ratio":18446744073709551615,"temp":18446744073709551615}"#)
            .unwrap();
    let ratio = batch
        .column_by_name("ratio")
        .unwrap()
        .as_primitive::<Float32Type>();
    let temp = batch
        .column_by_name("temp")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!(ratio.values().to_vec(), [3.0, 1e-3, u64::MAX as f32]);
    assert_eq!(temp.values().to_vec(), [-4.0, 1e300, u64::MAX as f64]);
    invalid(
        "ratio",
        "1e39",
        "number 1e39, which is out of range for REAL",
    );
    invalid("ratio", r#""0.5""#, r#"string "0.5""#);
    invalid("temp", "true", "boolean true");
    invalid("temp", "[1]", "an array");
}

#[test]
fn varchar_takes_strings_only() {
    let batch = decode(r#"{"label":""} {"label":"caf\u00e9 \ud83d\ude00"}"#).unwrap();
    let labels = batch.column_by_name("label").unwrap().as_string::<i32>();
    assert_eq!(labels.value(0), "");
    assert_eq!(labels.value(1), "café 😀");
    invalid("label", "5", "number 5");
    invalid("label", "false", "boolean false");
    invalid("label", "[\"a\"]", "an array");
    invalid("label", r#"{"a":1}"#, "an object");
}

#[test]
fn timestamps_take_rfc3339_or_epoch_millis() {
    let batch = decode(
        r#"{"seen":"2025-01-02T03:04:05Z","ts":"2025-01-02T03:04:05.123456789-05:30"}
           {"seen":0,"ts":-1}
           {"seen":"9999-12-31T23:59:59.999Z","ts":253402300799999}
           {"seen":"0000-01-01T00:00:00Z","ts":-62167219200000}"#,
    )
    .unwrap();
    assert_eq!(
        ts_column(&batch, "seen"),
        [
            Some(ms("2025-01-02T03:04:05Z")),
            Some(0),
            Some(253_402_300_799_999),
            Some(-62_167_219_200_000)
        ]
    );
    assert_eq!(
        ts_column(&batch, "ts"),
        [
            Some(ms("2025-01-02T08:34:05.123Z")),
            Some(-1),
            Some(253_402_300_799_999),
            Some(-62_167_219_200_000)
        ]
    );
    // The documented bounds are exactly the RFC 3339 years.
    assert_eq!(ms("9999-12-31T23:59:59.999Z"), 253_402_300_799_999);
    assert_eq!(ms("0000-01-01T00:00:00Z"), -62_167_219_200_000);

    invalid(
        "seen",
        r#""yesterday""#,
        r#"string "yesterday" (not RFC 3339:"#,
    );
    invalid(
        "seen",
        r#""2025-01-02 03:04""#,
        r#"string "2025-01-02 03:04""#,
    );
    invalid("seen", "1.5", "number 1.5");
    invalid("seen", "true", "boolean true");
    invalid(
        "seen",
        "253402300800000",
        "number 253402300800000, which is outside the years 0000 to 9999",
    );
    invalid(
        "seen",
        "-62167219200001",
        "number -62167219200001, which is outside",
    );
    invalid(
        "seen",
        "18446744073709551615",
        "number 18446744073709551615, which is outside",
    );
    invalid("ts", r#""soon""#, r#"string "soon""#);
    invalid("ts", "{}", "an object");
    let message = rejected(
        r#"{"ts":"x"}"#,
        RejectCode::InvalidField,
        Some(0),
        Some("ts"),
    );
    assert!(
        message.contains("must be an RFC 3339 string or epoch milliseconds (TIMESTAMP)"),
        "{message}"
    );
}

#[test]
fn long_strings_are_cut_in_messages() {
    let long = "x".repeat(1000);
    let message = rejected(
        &format!(r#"{{"temp":"{long}"}}"#),
        RejectCode::InvalidField,
        Some(0),
        Some("temp"),
    );
    assert!(
        message.ends_with(&format!("got string \"{}\"…", "x".repeat(40))),
        "{message}"
    );
}

#[test]
fn escaped_keys_and_values_are_read() {
    let batch = decode(r#"{"te\u006dp":1.5,"l\u0061bel":"tab\there"}"#).unwrap();
    assert_eq!(
        batch
            .column_by_name("temp")
            .unwrap()
            .as_primitive::<Float64Type>()
            .value(0),
        1.5
    );
    assert_eq!(
        batch
            .column_by_name("label")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "tab\there"
    );
}

#[test]
fn repeated_keys_are_invalid_events() {
    for (payload, field) in [
        (r#"{"temp":1,"temp":2}"#, "temp"),
        (r#"{"temp":null,"temp":2}"#, "temp"),
        (r#"{"ts":1,"ts":2}"#, "ts"),
        (r#"{"ts":null,"ts":2}"#, "ts"),
        (
            r#"{"device_id":"sensor-1","device_id":"sensor-1"}"#,
            "device_id",
        ),
    ] {
        let message = rejected(payload, RejectCode::InvalidEvent, Some(0), Some(field));
        assert!(message.contains("appears more than once"), "{message}");
    }
}

#[test]
fn events_must_be_objects() {
    for (payload, index, got) in [
        ("5", 0, "number 5"),
        (r#""x""#, 0, r#"string "x""#),
        ("null", 0, "null"),
        ("[1]", 0, "number 1"),
        ("[{}, [], {}]", 1, "an array"),
        ("[[]]", 0, "an array"),
        ("{} {} true", 2, "boolean true"),
        ("{} -1.5", 1, "number -1.5"),
    ] {
        let message = rejected(payload, RejectCode::InvalidEvent, Some(index), None);
        assert_eq!(
            message,
            format!("event {index} is not a JSON object, got {got}")
        );
    }
}

#[test]
fn malformed_json_reports_line_and_column() {
    let message = rejected(
        "{\"temp\":1}\n{\"temp\":2,}\n",
        RejectCode::InvalidJson,
        Some(1),
        None,
    );
    assert!(
        message.starts_with("invalid JSON in event 1:") && message.contains("line 2 column 11"),
        "{message}"
    );
    let message = rejected(r#"{"temp":1"#, RejectCode::InvalidJson, Some(0), None);
    assert!(message.contains("EOF while parsing an object"), "{message}");

    // Input that ends inside a value is malformed, not the end of the events.
    for payload in [
        r#"{"temp":1} "x}"#,
        r#"{"temp":1} "x"#,
        "{} tr",
        "{} -",
        "{} 1.",
        "{} {",
        "{} ]",
        "{} }",
        "{} ,",
        "[{}] {}",
        "[{}]]",
        "[{},]",
        "[{} {}]",
        "[{}",
        "\u{feff}{}",
    ] {
        let err = reject(payload);
        assert_eq!(err.code, RejectCode::InvalidJson, "{payload}: {err}");
        assert!(err.message.contains("line 1 column"), "{payload}: {err}");
    }

    let err = decode_json(&def(), b"{\"label\":\"\xff\"}", DEVICE, NOW, 10).unwrap_err();
    assert_eq!(err.code, RejectCode::InvalidJson, "{err}");
}

#[test]
fn empty_payloads() {
    for payload in ["", " \n\t\r ", "[]", " [ ] "] {
        let message = rejected(payload, RejectCode::EmptyFrame, None, None);
        assert!(message.contains("no events"), "{message}");
    }
}

#[test]
fn too_many_events() {
    let def = def();
    let ok = decode_json(&def, b"{} {}", DEVICE, NOW, 2).unwrap();
    assert_eq!(ok.num_rows(), 2);
    for payload in [&b"{} {} {}"[..], b"[{},{},{}]", b"{} {} 5"] {
        let err = decode_json(&def, payload, DEVICE, NOW, 2).unwrap_err();
        assert_eq!(
            (err.code, err.event, err.field.as_deref()),
            (RejectCode::TooManyEvents, None, None)
        );
        assert!(err.message.contains("more than 2 events"), "{err}");
    }
}

#[test]
fn the_first_bad_event_is_reported() {
    // Event 1 is bad twice over; event 2 too. Only event 1's first problem counts.
    let payload = r#"[{"temp":1},{"count":"x","temp":"y"},{"nope":1}]"#;
    rejected(payload, RejectCode::InvalidField, Some(1), Some("count"));
}

#[test]
fn wide_streams_use_the_hashed_lookup() {
    let columns = (0..40)
        .map(|i| ColumnDef {
            name: format!("c{i}"),
            ty: ColumnType::Int64,
        })
        .collect();
    let def = StreamDef::new("wide", columns, 1).unwrap();
    let batch = decode_json(&def, br#"{"c39":39,"c0":0} {"c17":17}"#, DEVICE, NOW, 10).unwrap();
    let c39 = batch
        .column_by_name("c39")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(c39.iter().collect::<Vec<_>>(), [Some(39), None]);
    let c17 = batch
        .column_by_name("c17")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(c17.iter().collect::<Vec<_>>(), [None, Some(17)]);
    let err = decode_json(&def, br#"{"c40":1}"#, DEVICE, NOW, 10).unwrap_err();
    assert_eq!(err.code, RejectCode::UnknownField);
}

#[test]
fn a_full_frame_of_events() {
    let mut payload = String::new();
    for i in 0..10_000 {
        payload.push_str(&format!(
            "{{\"ok\":{},\"count\":{i},\"temp\":{}.25,\"label\":\"dev-{}\",\"ts\":{}}}\n",
            i % 2 == 0,
            i,
            i % 7,
            NOW + i
        ));
    }
    let batch = decode_json(&def(), payload.as_bytes(), DEVICE, NOW, 10_000).unwrap();
    assert_eq!(batch.num_rows(), 10_000);
    let count = batch
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.value(9_999), 9_999);
    assert_eq!(batch.column_by_name("seen").unwrap().null_count(), 10_000);
    let err = decode_json(&def(), payload.as_bytes(), DEVICE, NOW, 9_999).unwrap_err();
    assert_eq!(err.code, RejectCode::TooManyEvents);
}

#[test]
fn errors_become_reject_frames() {
    let err = reject(r#"{"temp":"hot"}"#);
    let reject = err.clone().into_reject(42);
    assert_eq!(reject.seq, 42);
    assert_eq!(reject.code, RejectCode::InvalidField);
    assert_eq!(reject.message, err.message);
    assert_eq!(
        (reject.event, reject.field.as_deref()),
        (Some(0), Some("temp"))
    );
    assert_eq!(err.to_string(), err.message);
}

#[test]
fn mangled_payloads_never_panic() {
    // xorshift64: deterministic, so a failure reproduces.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = [
        FULL.to_string(),
        format!("[{FULL},{FULL}]"),
        format!("{FULL}\n{FULL}\n"),
        r#"{"device_id":"sensor-1","seen":-1,"label":"\u00e9\n"}"#.to_string(),
    ];
    let alphabet = b"{}[]\":,\\ \n0123456789.-+eEtrufalsn\xff";
    let def = def();
    for round in 0..20_000 {
        let mut bytes = seeds[round % seeds.len()].clone().into_bytes();
        for _ in 0..=next() % 4 {
            let i = (next() % bytes.len() as u64) as usize;
            match next() % 3 {
                0 => bytes[i] = alphabet[(next() % alphabet.len() as u64) as usize],
                1 => {
                    bytes.remove(i);
                }
                _ => bytes.truncate(i),
            }
            if bytes.is_empty() {
                break;
            }
        }
        match decode_json(&def, &bytes, DEVICE, NOW, 3) {
            Ok(batch) => {
                assert!((1..=3).contains(&batch.num_rows()));
                assert_eq!(batch.schema(), def.schema());
            }
            Err(err) => assert!(!err.message.is_empty()),
        }
    }
}
