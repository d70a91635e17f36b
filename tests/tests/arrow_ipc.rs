//! EVENTS frames with an Arrow IPC payload (encoding 0x02,
//! docs/protocol.md section 6.1) over real QUIC to the real binary: a
//! 1000-row batch is stored and read back by `tributary sql` with its
//! values; bad batches are rejected with their codes and store nothing.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Array, Int16Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{Field, Schema};
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::RejectCode;
use tributary_tests::Server;

use crate::e2e::count;

const STREAM: &str =
    "CREATE STREAM readings (seq BIGINT, level INT, temp DOUBLE, label VARCHAR, seen TIMESTAMP)";
/// 2026-11-27T10:00:00Z.
const BASE_MS: i64 = 1_764_237_600_000;
const ROWS: usize = 1000;

fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns.into_iter().map(|(_, a)| a).collect()).unwrap()
}

fn good_batch() -> RecordBatch {
    let n = ROWS as i64;
    batch(vec![
        ("seq", Arc::new(Int64Array::from_iter_values(0..n))),
        (
            "level",
            // Int16 into INT; every tenth row null.
            Arc::new(Int16Array::from_iter(
                (0..ROWS).map(|i| (i % 10 != 0).then_some(i as i16)),
            )),
        ),
        // Float32 into DOUBLE.
        (
            "temp",
            Arc::new(Float32Array::from_iter_values(
                (0..ROWS).map(|i| i as f32 / 4.0),
            )),
        ),
        (
            "label",
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|i| format!("r{i}")),
            )),
        ),
        // Microseconds into TIMESTAMP (ms): the 7 µs are dropped.
        (
            "seen",
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|i| (BASE_MS + i) * 1000 + 7),
                )
                .with_timezone("UTC"),
            ),
        ),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| BASE_MS + i * 1000),
            )),
        ),
        (
            "device_id",
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                "a1", ROWS,
            ))),
        ),
    ])
}

fn rejected(outcome: Outcome) -> tributary_ingest::protocol::Reject {
    match outcome {
        Outcome::Rejected(r) => r,
        Outcome::Acked(a) => panic!("a bad batch was accepted: {a:?}"),
    }
}

#[test]
fn an_arrow_batch_is_stored_and_bad_ones_are_rejected() {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let token = server.add_device("a1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let options = ClientOptions::new(
            server.quic_addr().parse().unwrap(),
            server.ca(),
            "a1",
            &token,
        );
        let client = Client::connect(options).await.unwrap();

        // Rejected first, so the count below shows nothing of them stored.
        let bad_type = batch(vec![(
            "level",
            Arc::new(Float32Array::from(vec![1.0])) as ArrayRef,
        )]);
        let r = rejected(client.send_arrow("readings", &bad_type).await.unwrap());
        assert_eq!(r.code, RejectCode::InvalidField, "{}", r.message);
        assert_eq!((r.event, r.field.as_deref()), (None, Some("level")));
        assert!(
            r.message.contains("Float32") && r.message.contains("INT"),
            "{}",
            r.message
        );

        let overflow = batch(vec![(
            "level",
            Arc::new(Int64Array::from(vec![1, 2, 1 << 40])) as ArrayRef,
        )]);
        let r = rejected(client.send_arrow("readings", &overflow).await.unwrap());
        assert_eq!(r.code, RejectCode::InvalidField);
        assert_eq!((r.event, r.field.as_deref()), (Some(2), Some("level")));

        let unknown = batch(vec![(
            "humidity",
            Arc::new(Float32Array::from(vec![1.0])) as ArrayRef,
        )]);
        let r = rejected(client.send_arrow("readings", &unknown).await.unwrap());
        assert_eq!(r.code, RejectCode::UnknownField);
        assert_eq!(r.field.as_deref(), Some("humidity"));

        let other_device = batch(vec![(
            "device_id",
            Arc::new(StringArray::from(vec!["a1", "a2"])) as ArrayRef,
        )]);
        let r = rejected(client.send_arrow("readings", &other_device).await.unwrap());
        assert_eq!(r.code, RejectCode::InvalidDeviceId);
        assert_eq!((r.event, r.field.as_deref()), (Some(1), Some("device_id")));

        // Not an IPC stream at all, sent as encoding 0x02 by hand.
        let garbage = rejected(
            client
                .send_arrow_ipc("readings", b"{\"seq\":1}".to_vec())
                .await
                .unwrap(),
        );
        assert_eq!(
            garbage.code,
            RejectCode::InvalidArrow,
            "{}",
            garbage.message
        );

        let outcome = client.send_arrow("readings", &good_batch()).await.unwrap();
        let Outcome::Acked(ack) = outcome else {
            panic!("the good batch was rejected: {outcome:?}")
        };
        assert_eq!(ack.count, ROWS as u32);
        client.close().await;
    });

    assert_eq!(count(&server, "readings"), ROWS as u64);
    let rows = server.sql_json(
        "SELECT device_id, seq, level, temp, label, \
         CAST(seen AS BIGINT) AS seen, CAST(ts AS BIGINT) AS ts \
         FROM readings ORDER BY seq",
    );
    assert_eq!(rows.len(), ROWS);
    for (i, row) in rows.iter().enumerate() {
        let n = i as i64;
        assert_eq!(row["device_id"], "a1", "{row}");
        assert_eq!(row["seq"], n, "{row}");
        if i % 10 == 0 {
            assert!(row["level"].is_null(), "{row}");
        } else {
            assert_eq!(row["level"], n, "{row}");
        }
        assert_eq!(row["temp"].as_f64(), Some(i as f64 / 4.0), "{row}");
        assert_eq!(row["label"], format!("r{i}"), "{row}");
        assert_eq!(row["seen"], BASE_MS + n, "{row}");
        assert_eq!(row["ts"], BASE_MS + n * 1000, "{row}");
    }
}
