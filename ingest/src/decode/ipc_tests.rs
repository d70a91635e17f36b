//! One test per mapping rule and per rejection of `decode_arrow`.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, Int8Array, Int16Array,
    Int32Array, Int64Array, LargeStringArray, NullArray, RecordBatch, StringArray, StringViewArray,
    StringViewBuilder, TimestampMicrosecondArray, TimestampMillisecondArray,
    TimestampNanosecondArray, TimestampSecondArray, UInt8Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{
    DataType, Field, Float32Type, Float64Type, Int32Type, Int64Type, Schema, SchemaRef,
    TimestampMillisecondType,
};
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

fn schema_of(columns: &[(&str, ArrayRef)]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}

fn batch(columns: &[(&str, ArrayRef)]) -> RecordBatch {
    let arrays = columns.iter().map(|(_, a)| Arc::clone(a)).collect();
    RecordBatch::try_new(schema_of(columns), arrays).unwrap()
}

/// One IPC stream holding one batch of these columns.
fn ipc(columns: &[(&str, ArrayRef)]) -> Vec<u8> {
    encode_arrow(&schema_of(columns), &[batch(columns)]).unwrap()
}

fn decode(payload: &[u8]) -> Result<RecordBatch, PayloadError> {
    decode_arrow(&def(), payload, DEVICE, NOW, 100)
}

fn rejected(payload: &[u8], code: RejectCode, event: Option<usize>, field: Option<&str>) -> String {
    let err = match decode(payload) {
        Ok(batch) => panic!("decoded to {batch:?}"),
        Err(err) => err,
    };
    assert_eq!(
        (err.code, err.event, err.field.as_deref()),
        (code, event, field),
        "{err}"
    );
    err.message
}

fn arr(a: impl Array + 'static) -> ArrayRef {
    Arc::new(a)
}

fn ts_column(batch: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    batch
        .column_by_name(name)
        .unwrap()
        .as_primitive::<TimestampMillisecondType>()
        .iter()
        .collect()
}

#[test]
fn every_type_lands_in_its_column_with_the_json_schema() {
    let payload = ipc(&[
        ("ok", arr(BooleanArray::from(vec![Some(true), None]))),
        ("count", arr(Int32Array::from(vec![Some(-7), None]))),
        ("total", arr(Int64Array::from(vec![Some(i64::MAX), None]))),
        ("ratio", arr(Float32Array::from(vec![Some(0.5), None]))),
        ("temp", arr(Float64Array::from(vec![Some(21.5), None]))),
        ("label", arr(StringArray::from(vec![Some("hall"), None]))),
        (
            "seen",
            arr(TimestampMillisecondArray::from(vec![Some(5), None]).with_timezone("UTC")),
        ),
        (
            "ts",
            arr(TimestampMillisecondArray::from(vec![
                Some(1_000),
                Some(2_000),
            ])),
        ),
        (
            "device_id",
            arr(StringArray::from(vec![Some(DEVICE), None])),
        ),
    ]);
    let out = decode(&payload).unwrap();
    let json = decode_json(&def(), br#"{"temp":1}"#, DEVICE, NOW, 100).unwrap();
    assert_eq!(out.schema(), def().schema());
    assert_eq!(out.schema(), json.schema());
    assert_eq!(out.num_rows(), 2);
    let device: Vec<_> = out.column(0).as_string::<i32>().iter().collect();
    assert_eq!(device, [Some(DEVICE), Some(DEVICE)]);
    assert_eq!(ts_column(&out, "ts"), [Some(1_000), Some(2_000)]);
    assert_eq!(ts_column(&out, "received_at"), [Some(NOW), Some(NOW)]);
    let ok: Vec<_> = out
        .column_by_name("ok")
        .unwrap()
        .as_boolean()
        .iter()
        .collect();
    assert_eq!(ok, [Some(true), None]);
    let count = out
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.iter().collect::<Vec<_>>(), [Some(-7), None]);
    let total = out
        .column_by_name("total")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(total.iter().collect::<Vec<_>>(), [Some(i64::MAX), None]);
    let ratio = out
        .column_by_name("ratio")
        .unwrap()
        .as_primitive::<Float32Type>();
    assert_eq!(ratio.iter().collect::<Vec<_>>(), [Some(0.5), None]);
    let temp = out
        .column_by_name("temp")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!(temp.iter().collect::<Vec<_>>(), [Some(21.5), None]);
    let label: Vec<_> = out
        .column_by_name("label")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .collect();
    assert_eq!(label, [Some("hall"), None]);
    assert_eq!(ts_column(&out, "seen"), [Some(5), None]);
}

#[test]
fn narrower_types_convert_losslessly() {
    let payload = ipc(&[
        ("count", arr(Int8Array::from(vec![-128, 1, 2]))),
        ("total", arr(UInt64Array::from(vec![0, 1, i64::MAX as u64]))),
        ("ratio", half(vec![1.5; 3])),
        ("temp", arr(Float32Array::from(vec![0.25, 1.0, -2.0]))),
        ("label", arr(LargeStringArray::from(vec!["a", "bb", "ccc"]))),
    ]);
    let out = decode(&payload).unwrap();
    assert_eq!(out.schema(), def().schema());
    let count = out
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.values(), &[-128, 1, 2]);
    let total = out
        .column_by_name("total")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(total.values(), &[0, 1, i64::MAX]);
    let ratio = out
        .column_by_name("ratio")
        .unwrap()
        .as_primitive::<Float32Type>();
    assert_eq!(ratio.values(), &[1.5, 1.5, 1.5]);
    let temp = out
        .column_by_name("temp")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!(temp.values(), &[0.25, 1.0, -2.0]);
    let label: Vec<_> = out
        .column_by_name("label")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .collect();
    assert_eq!(label, [Some("a"), Some("bb"), Some("ccc")]);

    let payload = ipc(&[
        ("count", arr(UInt8Array::from(vec![255]))),
        ("total", arr(Int16Array::from(vec![-3]))),
        (
            "label",
            arr(StringViewArray::from(vec![
                "a view longer than twelve bytes",
            ])),
        ),
    ]);
    let out = decode(&payload).unwrap();
    let count = out
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.values(), &[255]);
    let total = out
        .column_by_name("total")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(total.values(), &[-3]);
    let label = out.column_by_name("label").unwrap().as_string::<i32>();
    assert_eq!(label.value(0), "a view longer than twelve bytes");
}

fn half(values: Vec<f32>) -> ArrayRef {
    arrow::compute::cast(&arr(Float32Array::from(values)), &DataType::Float16).unwrap()
}

#[test]
fn integers_of_any_width_fit_int_when_their_values_do() {
    let payload = ipc(&[
        (
            "count",
            arr(Int64Array::from(vec![Some(i32::MAX as i64), None])),
        ),
        ("total", arr(UInt32Array::from(vec![u32::MAX, 0]))),
    ]);
    let out = decode(&payload).unwrap();
    let count = out
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.iter().collect::<Vec<_>>(), [Some(i32::MAX), None]);
}

#[test]
fn timestamps_of_every_unit_become_milliseconds_dropping_sub_millisecond_digits() {
    for seen in [
        arr(TimestampSecondArray::from(vec![-1, 2])),
        arr(TimestampMillisecondArray::from(vec![-1_000, 2_000]).with_timezone("+02:00")),
        arr(TimestampMicrosecondArray::from(vec![-999_999, 2_000_999])),
        arr(TimestampNanosecondArray::from(vec![-999_999_999, 2_000_999_999]).with_timezone("UTC")),
        arr(Int64Array::from(vec![-1_000, 2_000])),
    ] {
        let ty = seen.data_type().clone();
        let payload = ipc(&[("seen", Arc::clone(&seen)), ("ts", seen)]);
        let out = decode(&payload).unwrap();
        assert_eq!(ts_column(&out, "seen"), [Some(-1_000), Some(2_000)], "{ty}");
        assert_eq!(ts_column(&out, "ts"), [Some(-1_000), Some(2_000)], "{ty}");
    }
}

#[test]
fn absent_and_null_columns_are_null_and_ts_defaults_to_received_at() {
    let payload = ipc(&[
        ("temp", arr(Float64Array::from(vec![Some(1.0), None]))),
        ("label", arr(NullArray::new(2))),
        (
            "ts",
            arr(TimestampMillisecondArray::from(vec![None, Some(7)])),
        ),
    ]);
    let out = decode(&payload).unwrap();
    assert_eq!(out.schema(), def().schema());
    assert_eq!(ts_column(&out, "ts"), [Some(NOW), Some(7)]);
    for name in ["ok", "count", "total", "ratio", "label", "seen"] {
        assert_eq!(out.column_by_name(name).unwrap().null_count(), 2, "{name}");
    }

    let out = decode(&ipc(&[("ok", arr(BooleanArray::from(vec![true])))])).unwrap();
    assert_eq!(ts_column(&out, "ts"), [Some(NOW)]);
    assert_eq!(out.column(0).as_string::<i32>().value(0), DEVICE);
}

#[test]
fn device_id_must_be_the_authenticated_one() {
    for device in [
        arr(StringArray::from(vec![Some(DEVICE), None, Some(DEVICE)])),
        arr(LargeStringArray::from(vec![
            Some(DEVICE),
            None,
            Some(DEVICE),
        ])),
        arr(StringViewArray::from(vec![
            Some(DEVICE),
            None,
            Some(DEVICE),
        ])),
        arr(NullArray::new(3)),
    ] {
        let ty = device.data_type().clone();
        let out = decode(&ipc(&[("device_id", device)])).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(out.num_rows(), 3);
    }
    let payload = ipc(&[(
        "device_id",
        arr(StringArray::from(vec![
            Some(DEVICE),
            None,
            Some("sensor-2"),
        ])),
    )]);
    let message = rejected(
        &payload,
        RejectCode::InvalidDeviceId,
        Some(2),
        Some("device_id"),
    );
    assert_eq!(
        message,
        r#"event 2: field 'device_id' is string "sensor-2" but this connection is authenticated as "sensor-1"; leave device_id out or set it to "sensor-1""#
    );
    rejected(
        &ipc(&[("device_id", arr(Int32Array::from(vec![1])))]),
        RejectCode::InvalidField,
        None,
        Some("device_id"),
    );
}

#[test]
fn received_at_is_set_by_the_server() {
    let payload = ipc(&[("received_at", arr(TimestampMillisecondArray::from(vec![1])))]);
    rejected(
        &payload,
        RejectCode::UnknownField,
        None,
        Some("received_at"),
    );
}

#[test]
fn unknown_columns_are_named_with_the_stream_columns() {
    let payload = ipc(&[
        ("temp", arr(Float64Array::from(vec![1.0]))),
        ("humidity", arr(Float64Array::from(vec![1.0]))),
    ]);
    let message = rejected(&payload, RejectCode::UnknownField, None, Some("humidity"));
    assert_eq!(
        message,
        "unknown column 'humidity'; stream 'telemetry' has columns ok (BOOLEAN), count (INT), \
         total (BIGINT), ratio (REAL), temp (DOUBLE), label (VARCHAR), seen (TIMESTAMP), plus \
         the optional ts and device_id"
    );
}

#[test]
fn a_repeated_column_is_invalid_event() {
    let payload = ipc(&[
        ("temp", arr(Float64Array::from(vec![1.0]))),
        ("temp", arr(Float64Array::from(vec![2.0]))),
    ]);
    rejected(&payload, RejectCode::InvalidEvent, None, Some("temp"));
}

#[test]
fn a_type_that_does_not_convert_losslessly_names_field_and_both_types() {
    let message = rejected(
        &ipc(&[("ratio", arr(Float64Array::from(vec![1.0])))]),
        RejectCode::InvalidField,
        None,
        Some("ratio"),
    );
    assert_eq!(
        message,
        "column 'ratio' has Arrow type Float64, which does not convert losslessly to REAL; \
         send Float32 (or Float16)"
    );
    for (name, array) in [
        ("count", arr(StringArray::from(vec!["1"]))),
        ("temp", arr(Int64Array::from(vec![1]))),
        ("ok", arr(Int8Array::from(vec![1]))),
        ("label", arr(Int32Array::from(vec![1]))),
        ("seen", arr(StringArray::from(vec!["2024-01-01T00:00:00Z"]))),
        ("ts", arr(Int32Array::from(vec![1]))),
    ] {
        let ty = array.data_type().to_string();
        let message = rejected(
            &ipc(&[(name, array)]),
            RejectCode::InvalidField,
            None,
            Some(name),
        );
        assert!(message.contains(&ty), "{message}");
    }
}

#[test]
fn values_out_of_range_are_invalid_field_at_their_row() {
    let message = rejected(
        &ipc(&[(
            "count",
            arr(Int64Array::from(vec![Some(1), None, Some(1 << 31)])),
        )]),
        RejectCode::InvalidField,
        Some(2),
        Some("count"),
    );
    assert_eq!(
        message,
        "event 2: field 'count' must be an integer between -2147483648 and 2147483647 (INT), \
         got 2147483648, which is out of range for INT"
    );
    rejected(
        &ipc(&[("total", arr(UInt64Array::from(vec![1, u64::MAX])))]),
        RejectCode::InvalidField,
        Some(1),
        Some("total"),
    );
    rejected(
        &ipc(&[("seen", arr(TimestampSecondArray::from(vec![0, i64::MAX])))]),
        RejectCode::InvalidField,
        Some(1),
        Some("seen"),
    );
    let message = rejected(
        &ipc(&[("ts", arr(Int64Array::from(vec![253_402_300_800_000])))]),
        RejectCode::InvalidField,
        Some(0),
        Some("ts"),
    );
    assert!(
        message.ends_with("outside the years 0000 to 9999"),
        "{message}"
    );
    rejected(
        &ipc(&[("temp", arr(Float64Array::from(vec![1.0, f64::NAN])))]),
        RejectCode::InvalidField,
        Some(1),
        Some("temp"),
    );
    rejected(
        &ipc(&[("ratio", arr(Float32Array::from(vec![f32::INFINITY])))]),
        RejectCode::InvalidField,
        Some(0),
        Some("ratio"),
    );
}

#[test]
fn too_many_rows_is_too_many_events_even_across_batches() {
    let columns = [("temp", arr(Float64Array::from(vec![1.0; 60])))];
    let b = batch(&columns);
    let payload = encode_arrow(&b.schema(), std::slice::from_ref(&b)).unwrap();
    assert_eq!(decode(&payload).unwrap().num_rows(), 60);
    let payload = encode_arrow(&b.schema(), &[b.clone(), b]).unwrap();
    rejected(&payload, RejectCode::TooManyEvents, None, None);
}

#[test]
fn several_batches_are_one_atomic_frame() {
    let first = batch(&[("count", arr(Int32Array::from(vec![1, 2])))]);
    let second = batch(&[("count", arr(Int32Array::from(vec![3])))]);
    let empty = batch(&[("count", arr(Int32Array::from(Vec::<i32>::new())))]);
    let payload = encode_arrow(&first.schema(), &[first.clone(), empty, second]).unwrap();
    let out = decode(&payload).unwrap();
    let count = out
        .column_by_name("count")
        .unwrap()
        .as_primitive::<Int32Type>();
    assert_eq!(count.values(), &[1, 2, 3]);

    let schema = Arc::new(Schema::new(vec![Field::new(
        "count",
        DataType::Int64,
        true,
    )]));
    let ok = RecordBatch::try_new(schema.clone(), vec![arr(Int64Array::from(vec![1, 2]))]).unwrap();
    let bad = RecordBatch::try_new(
        schema.clone(),
        vec![arr(Int64Array::from(vec![3, 1 << 40]))],
    )
    .unwrap();
    let payload = encode_arrow(&schema, &[ok, bad]).unwrap();
    // Rows are numbered across batches.
    rejected(&payload, RejectCode::InvalidField, Some(3), Some("count"));
}

#[test]
fn no_rows_is_empty_frame() {
    rejected(b"", RejectCode::EmptyFrame, None, None);
    let empty = batch(&[("count", arr(Int32Array::from(Vec::<i32>::new())))]);
    rejected(
        &encode_arrow(&empty.schema(), &[]).unwrap(),
        RejectCode::EmptyFrame,
        None,
        None,
    );
    rejected(
        &encode_arrow(&empty.schema(), &[empty.clone(), empty]).unwrap(),
        RejectCode::EmptyFrame,
        None,
        None,
    );
}

#[test]
fn bytes_that_are_not_an_ipc_stream_are_invalid_arrow() {
    let good = ipc(&[("temp", arr(Float64Array::from(vec![1.0, 2.0])))]);
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"xyz");
    let mut huge_metadata = vec![0xff; 4];
    huge_metadata.extend_from_slice(&i32::MAX.to_le_bytes());
    let mut negative = vec![0xff; 4];
    negative.extend_from_slice(&(-8i32).to_le_bytes());
    for payload in [
        br#"{"temp":1}"#.to_vec(),
        b"\0".to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..7].to_vec(),
        trailing,
        huge_metadata,
        negative,
        vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
        vec![0; 8],
    ] {
        let err = decode(&payload).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidArrow, "{payload:?}: {err}");
        assert_eq!((err.event, err.field), (None, None));
    }
}

#[test]
fn a_body_length_beyond_the_payload_is_refused_before_allocating() {
    // Patch the record batch's bodyLength to i64::MAX: the reader would
    // allocate that much before reading it.
    let good = ipc(&[("temp", arr(Float64Array::from(vec![1.0, 2.0])))]);
    let body_len = 16u64.to_le_bytes();
    let mut patched = 0;
    let mut bad = good.clone();
    for i in 0..bad.len() - 8 {
        if bad[i..i + 8] == body_len {
            bad[i..i + 8].copy_from_slice(&i64::MAX.to_le_bytes());
            patched += 1;
        }
    }
    assert!(patched > 0);
    assert_eq!(decode(&bad).unwrap_err().code, RejectCode::InvalidArrow);
}

#[test]
fn shared_string_views_cannot_inflate_the_payload() {
    // 100 views of one 1000-byte string: 100 kB of VARCHAR from ~2 kB.
    let long = "x".repeat(1000);
    let mut views = StringViewBuilder::new().with_deduplicate_strings();
    for _ in 0..100 {
        views.append_value(&long);
    }
    let views = views.finish();
    let payload = ipc(&[("label", arr(views))]);
    assert!(payload.len() < 100_000);
    rejected(&payload, RejectCode::InvalidField, None, Some("label"));
}

#[test]
fn matches_decode_json_for_the_same_events() {
    let json = decode_json(
        &def(),
        br#"{"count":1,"label":"a","ts":1000} {"count":null,"temp":2.5}"#,
        DEVICE,
        NOW,
        100,
    )
    .unwrap();
    let arrow = decode(&ipc(&[
        ("count", arr(Int32Array::from(vec![Some(1), None]))),
        ("label", arr(StringArray::from(vec![Some("a"), None]))),
        ("ts", arr(Int64Array::from(vec![Some(1000), None]))),
        ("temp", arr(Float64Array::from(vec![None, Some(2.5)]))),
    ]))
    .unwrap();
    assert_eq!(arrow, json);
}

/// A compressed buffer declares its decompressed size, which arrow's
/// reader allocates up front: a tiny payload could ask for exabytes (the
/// fuzz corpus replay hit exactly that). Compressed bodies are refused
/// before the reader sees them.
#[test]
fn compressed_bodies_are_refused_before_the_reader_allocates() {
    use arrow::ipc::CompressionType;
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
    let columns = [("temp", arr(Float64Array::from(vec![1.5, 2.5])))];
    // arrow's lz4 feature is on when the whole workspace is built (another
    // crate asks for it), off when this crate is built alone; without it
    // the reader cannot decompress either, so there is nothing to refuse.
    let Ok(options) =
        IpcWriteOptions::default().try_with_compression(Some(CompressionType::LZ4_FRAME))
    else {
        return;
    };
    let mut payload = Vec::new();
    let written = StreamWriter::try_new_with_options(&mut payload, &schema_of(&columns), options)
        .and_then(|mut writer| {
            writer.write(&batch(&columns))?;
            writer.finish()
        });
    // The options take LZ4 either way; only the write finds the codec missing.
    if written.is_err() {
        return;
    }
    let message = rejected(&payload, RejectCode::InvalidArrow, None, None);
    assert!(message.contains("compressed"), "{message}");
}

fn decode_with(
    decoder: &mut ArrowDecoder,
    def: &StreamDef,
    payload: &[u8],
) -> Result<RecordBatch, PayloadError> {
    decoder.decode(def, payload, DEVICE, NOW, 100)
}

/// A connection's decoder remembers a schema it has read, and a frame that
/// repeats it byte for byte skips parsing it: every frame's rows are still
/// read, checked and converted, and another stream definition is matched
/// afresh.
#[test]
fn a_repeated_schema_is_remembered_and_every_frame_still_checked() {
    let mut decoder = ArrowDecoder::default();
    let frame = |count: i64, temp: f64| {
        ipc(&[
            ("count", arr(Int64Array::from(vec![count]))),
            ("temp", arr(Float64Array::from(vec![temp]))),
        ])
    };
    for (count, temp) in [(1, 20.5), (2, 21.5), (3, 22.5)] {
        let payload = frame(count, temp);
        assert_eq!(
            decode_with(&mut decoder, &def(), &payload).unwrap(),
            decode(&payload).unwrap()
        );
    }
    assert_eq!(decoder.remembered(), 1, "one schema, read once");
    // The same schema, a value out of INT's range, at its row.
    let err = decode_with(&mut decoder, &def(), &frame(1 << 40, 1.0)).unwrap_err();
    assert_eq!(
        (err.code, err.event, err.field.as_deref()),
        (RejectCode::InvalidField, Some(0), Some("count")),
        "{err}"
    );
    let err = decode_with(&mut decoder, &def(), &frame(1, f64::NAN)).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("temp"), "{err}");
    // The same schema, a broken batch: its body declared past the end.
    let mut broken = frame(4, 1.0);
    let cut = broken.len() - 8 - 4;
    broken.truncate(cut);
    let err = decode_with(&mut decoder, &def(), &broken).unwrap_err();
    assert_eq!(err.code, RejectCode::InvalidArrow, "{err}");
    // Another definition of the stream, without `count`: matched afresh.
    let narrower = StreamDef::new(
        "telemetry",
        vec![ColumnDef {
            name: "temp".into(),
            ty: ColumnType::Float64,
        }],
        4,
    )
    .unwrap();
    let err = decode_with(&mut decoder, &narrower, &frame(5, 1.0)).unwrap_err();
    assert_eq!(
        (err.code, err.field.as_deref()),
        (RejectCode::UnknownField, Some("count")),
        "{err}"
    );
    // And back: still decoded for the first definition, whose plan is kept.
    assert_eq!(
        decode_with(&mut decoder, &def(), &frame(6, 1.0))
            .unwrap()
            .num_rows(),
        1
    );
    assert_eq!(decoder.remembered(), 1, "a refused plan is not kept");
}

/// Every single-byte corruption of a frame whose schema the decoder knows
/// is refused or decoded, never a panic; the decoder goes on decoding
/// good frames after each.
#[test]
fn corrupt_frames_after_a_known_schema_never_panic() {
    let mut decoder = ArrowDecoder::default();
    let good = ipc(&[
        ("count", arr(Int32Array::from(vec![Some(1), None, Some(3)]))),
        (
            "label",
            arr(StringArray::from(vec![Some("a"), Some("bc"), None])),
        ),
        ("temp", arr(Float64Array::from(vec![1.5, 2.5, 3.5]))),
    ]);
    let expected = decoder.decode(&def(), &good, DEVICE, NOW, 100).unwrap();
    for i in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            let _ = decoder.decode(&def(), &bad, DEVICE, NOW, 100);
            assert_eq!(
                decoder.decode(&def(), &good, DEVICE, NOW, 100).unwrap(),
                expected,
                "after flipping byte {i} with {flip:#x}"
            );
        }
    }
}

/// Dictionary-encoded columns take arrow's own reader and are refused by
/// name, as any type without a lossless conversion is.
#[test]
fn dictionary_columns_are_refused_by_name() {
    use arrow::array::DictionaryArray;
    use arrow::datatypes::Int8Type;
    let labels: DictionaryArray<Int8Type> = vec!["a", "b", "a"].into_iter().collect();
    let message = rejected(
        &ipc(&[("label", arr(labels))]),
        RejectCode::InvalidField,
        None,
        Some("label"),
    );
    assert!(message.contains("Dictionary"), "{message}");
}

/// A schema message larger than a stream's columns need (custom metadata
/// can make it as large as the frame) is read every time rather than kept
/// by the connection.
#[test]
fn large_schema_messages_are_not_remembered() {
    let mut decoder = ArrowDecoder::default();
    let columns = [("temp", arr(Float64Array::from(vec![1.5])))];
    let small = ipc(&columns);
    decoder.decode(&def(), &small, DEVICE, NOW, 100).unwrap();
    assert_eq!(decoder.remembered(), 1);
    let schema = Arc::new(Schema::new_with_metadata(
        vec![Field::new("temp", DataType::Float64, true)],
        [("note".to_string(), "x".repeat(100_000))].into(),
    ));
    let large = encode_arrow(
        &schema,
        &[RecordBatch::try_new(
            Arc::clone(&schema),
            vec![arr(Float64Array::from(vec![2.5]))],
        )
        .unwrap()],
    )
    .unwrap();
    for _ in 0..3 {
        let decoded = decoder.decode(&def(), &large, DEVICE, NOW, 100).unwrap();
        assert_eq!(decoded.num_rows(), 1);
    }
    assert_eq!(decoder.remembered(), 1);
}
