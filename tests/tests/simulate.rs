//! `tributary simulate`: its summary's counts against what the server
//! stored (through SQL, and in Parquet read back by the parquet crate),
//! its rate, both encodings, and a server killed and restarted under it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use tributary_tests::{Server, parquet_files};

/// Runs `tributary simulate <args> --json` and returns its summary.
fn simulate(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["simulate", "--json"];
    all.extend_from_slice(args);
    let run = server.cli(&all);
    assert!(run.success, "simulate failed: {}{}", run.stdout, run.stderr);
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("simulate --json printed no JSON ({e}): {}", run.stdout))
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("the summary has no count '{key}': {summary}"))
}

/// Per device: how many rows, and how many distinct `seq`s, from SQL.
fn stored_per_device(server: &Server, stream: &str) -> HashMap<String, (u64, u64, i64)> {
    server
        .sql_json(&format!(
            "SELECT device_id, count(*) AS n, count(DISTINCT seq) AS distinct_seq, max(seq) AS top \
             FROM {stream} GROUP BY device_id"
        ))
        .into_iter()
        .map(|row| {
            (
                row["device_id"].as_str().unwrap().to_string(),
                (
                    row["n"].as_u64().unwrap(),
                    row["distinct_seq"].as_u64().unwrap(),
                    row["top"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Every (device, seq) of a stream's Parquet files, read with the parquet
/// crate, and the number of rows.
fn parquet_events(data_dir: &Path, stream: &str) -> (usize, HashSet<(String, i64)>) {
    let mut rows = 0;
    let mut keys = HashSet::new();
    for path in parquet_files(data_dir) {
        if !path.components().any(|c| c.as_os_str() == stream) {
            continue;
        }
        let file = std::fs::File::open(&path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let schema = batch.schema();
            let devices = batch
                .column(schema.index_of("device_id").unwrap())
                .as_string::<i32>();
            let seqs = batch
                .column(schema.index_of("seq").unwrap())
                .as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                rows += 1;
                keys.insert((devices.value(i).to_string(), seqs.value(i)));
            }
        }
    }
    (rows, keys)
}

#[test]
fn the_summary_counts_what_the_server_stored() {
    let mut server = Server::start();
    let json = simulate(
        &server,
        &[
            "--devices",
            "4",
            "--rate",
            "0",
            "--duration",
            "1500ms",
            "--batch",
            "25",
        ],
    );
    let sent = count(&json, "sent");
    assert!(sent > 0, "nothing was sent: {json}");
    assert_eq!(count(&json, "acked"), sent, "{json}");
    assert_eq!(count(&json, "rejected"), 0, "{json}");
    assert_eq!(count(&json, "lost"), 0, "{json}");
    assert_eq!(count(&json, "frames") * 25, sent, "{json}");
    assert_eq!(json["stream"], "sim");
    assert_eq!(json["encoding"], "json");
    for q in ["p50", "p99", "p999"] {
        assert!(
            json["ack_latency_ms"][q].as_f64().is_some_and(|v| v > 0.0),
            "no {q}: {json}"
        );
    }
    assert!(json["events_per_s"].as_f64().is_some_and(|v| v > 0.0));

    // The simulator made the devices and the stream.
    let stored = stored_per_device(&server, "sim");
    assert_eq!(stored.len(), 4, "{stored:?}");
    let total: u64 = stored.values().map(|(n, _, _)| n).sum();
    assert_eq!(total, sent);
    for (device, (n, distinct, top)) in &stored {
        assert!(device.starts_with("sim-"), "{device}");
        // seq counts from 0 per device, every one exactly once.
        assert_eq!(n, distinct, "{device}");
        assert_eq!(*top + 1, *n as i64, "{device}");
    }
    let (_, devices) = server.api("GET", "/api/v1/devices/sim-3", None);
    assert_eq!(devices["tags"]["simulated"], "true", "{devices}");

    // A second run, in Arrow, with the devices existing already (they get
    // fresh tokens), paced: it keeps to its rate.
    let json = simulate(
        &server,
        &[
            "--devices",
            "4",
            "--rate",
            "400",
            "--duration",
            "2s",
            "--batch",
            "10",
            "--encoding",
            "arrow",
            "--stream",
            "sim_arrow",
        ],
    );
    let paced = count(&json, "acked");
    assert_eq!(paced, count(&json, "sent"), "{json}");
    // 400 events/s for 2 s, in frames of 10 from 4 devices: at most one
    // frame per device ahead of the schedule.
    assert!((100..=800 + 40).contains(&paced), "{json}");
    let stored = stored_per_device(&server, "sim_arrow");
    assert_eq!(stored.values().map(|(n, _, _)| n).sum::<u64>(), paced);

    // What the summaries counted is in Parquet, each event once.
    server.stop();
    let (rows, keys) = parquet_events(&server.data_dir, "sim");
    assert_eq!(rows as u64, sent);
    assert_eq!(keys.len(), rows, "an event was stored twice");
}

#[test]
fn a_stream_without_the_simulators_columns_is_refused_with_a_reason() {
    let server = Server::start();
    server.sql_json("CREATE STREAM other (temp DOUBLE)");
    let run = server.cli(&["simulate", "--stream", "other", "--duration", "1s"]);
    assert!(!run.success);
    assert!(run.stderr.contains("has no column 'seq'"), "{}", run.stderr);
    let run = server.cli(&["simulate", "--devices", "0"]);
    assert!(!run.success);
    assert!(run.stderr.contains("--devices"), "{}", run.stderr);
}

#[test]
fn every_event_is_stored_once_across_a_server_kill() {
    let mut server = Server::start();
    let child = server.spawn_cli(&[
        "simulate",
        "--json",
        "--devices",
        "3",
        "--rate",
        "1500",
        "--duration",
        "5s",
        "--batch",
        "20",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    server.restart();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "simulate failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value = serde_json::from_str(stdout.trim()).unwrap();
    let sent = count(&json, "sent");
    assert_eq!(count(&json, "acked"), sent, "{json}");
    assert!(
        count(&json, "reconnects") >= 3,
        "every device reconnects: {json}"
    );

    let stored = stored_per_device(&server, "sim");
    let total: u64 = stored.values().map(|(n, _, _)| n).sum();
    assert_eq!(total, sent, "{stored:?}");
    for (device, (n, distinct, top)) in &stored {
        assert_eq!(n, distinct, "{device} has an event twice");
        assert_eq!(*top + 1, *n as i64, "{device} misses an event");
    }
    server.stop();
    let (rows, keys) = parquet_events(&server.data_dir, "sim");
    assert_eq!(rows as u64, sent);
    assert_eq!(keys.len(), rows);
}
