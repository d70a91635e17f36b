//! The whole path: device → QUIC → log → rule → command back, and Parquet.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Child;
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array, StringArray, TimestampMillisecondArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tributary_tests::{Server, eventually, parquet_files};

pub const STREAM: &str = "CREATE STREAM telemetry (temp DOUBLE, humidity DOUBLE)";
pub const RULE: &str = "CREATE RULE hot AS INSERT INTO commands SELECT device_id, 'fan_on' AS name, CAST(temp AS VARCHAR) AS payload FROM telemetry WHERE temp > 80";

/// Waits for a child to exit and returns its stdout.
pub fn wait_output(mut child: Child, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(
                status.success(),
                "child failed: {status}\nstdout: {out}\nstderr: {err}"
            );
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("child did not finish within {timeout:?}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn count(server: &Server, stream: &str) -> u64 {
    let rows = server.sql_json(&format!("SELECT count(*) AS n FROM {stream}"));
    rows[0]["n"].as_u64().unwrap()
}

#[test]
fn event_to_command_and_parquet_through_the_real_binary() {
    let mut server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let token = server.add_device("sensor-1");
    server.cli(&["sql", RULE]).ok();
    let listener = server.spawn_cli(&[
        "listen", "--device", "sensor-1", "--token", &token, "--count", "1",
    ]);

    let events = "{\"temp\": 21.5, \"humidity\": 40}\n{\"temp\": 85.5, \"humidity\": 41, \"ts\": \"2026-11-27T10:00:00Z\"}\n{\"temp\": 30, \"ts\": 1764237600000}\n";
    let sent = server
        .cli_with_stdin(
            &["send", "--device", "sensor-1", "--token", &token],
            Some(events),
        )
        .ok();
    assert!(sent.stdout.contains("3 events accepted"), "{}", sent.stdout);

    // The rule turns the one hot event into a command for the device.
    let out = wait_output(listener, Duration::from_secs(30));
    let command: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(command["name"], "fan_on");
    assert_eq!(command["payload"], "85.5");
    assert!(command["id"].as_str().unwrap().starts_with("hot:"));

    // Queries see every event at once (Parquet plus the log's tail)...
    assert_eq!(count(&server, "telemetry"), 3);
    let rows =
        server.sql_json("SELECT device_id, temp FROM telemetry WHERE temp > 25 ORDER BY temp");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["device_id"], "sensor-1");
    assert_eq!(rows[1]["temp"], 85.5);

    // ...and the Parquet files, read back by the parquet crate's own reader,
    // hold exactly those events under the documented layout.
    let storage = server.data_dir.join("storage/telemetry");
    let files = eventually(Duration::from_secs(30), || {
        let files = parquet_files(&storage);
        let rows: usize = files.iter().map(|f| rows_in(f)).sum();
        (rows == 3).then_some(files)
    });
    let mut devices = BTreeSet::new();
    let mut temps = Vec::new();
    let mut timestamps = Vec::new();
    for f in &files {
        let relative = f
            .strip_prefix(&storage)
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(relative.starts_with("date="), "{relative}");
        assert!(relative.contains("/hour="), "{relative}");
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = cast(batch.column_by_name("device_id").unwrap(), &DataType::Utf8).unwrap();
            let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
            devices.extend(ids.iter().flatten().map(str::to_string));
            let t = batch.column_by_name("temp").unwrap();
            temps.extend(
                t.as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .iter()
                    .flatten(),
            );
            let ts = batch.column_by_name("ts").unwrap();
            let ts = ts
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .unwrap();
            timestamps.extend(ts.iter().flatten());
        }
    }
    assert_eq!(devices, BTreeSet::from(["sensor-1".to_string()]));
    temps.sort_by(f64::total_cmp);
    assert_eq!(temps, [21.5, 30.0, 85.5]);
    assert!(timestamps.contains(&1_764_237_600_000), "{timestamps:?}");
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("date=2025-11-27/hour=10")),
        "{files:?}"
    );
    // A file written after the first query shows up in the next one.
    assert_eq!(count(&server, "telemetry"), 3);

    // `query` reads the files directly, so it refuses while a server owns them...
    let busy = server.cli(&["query", "SELECT count(*) FROM telemetry"]);
    assert!(!busy.success);
    assert!(busy.stderr.contains("is running"), "{}", busy.stderr);
    // ...and gives the same answer once the server is gone.
    server.stop();
    let offline = server
        .cli(&[
            "query",
            "SELECT count(*) AS n FROM telemetry",
            "--format",
            "csv",
        ])
        .ok();
    assert_eq!(offline.stdout.trim(), "n\n3");
}

fn rows_in(f: &std::path::Path) -> usize {
    let Ok(file) = std::fs::File::open(f) else {
        return 0;
    };
    let Ok(builder) = ParquetRecordBatchReaderBuilder::try_new(file) else {
        return 0;
    };
    builder.metadata().file_metadata().num_rows() as usize
}

#[test]
fn show_describe_formats_and_device_management() {
    let server = Server::start();
    let created = server.cli(&["sql", STREAM]).ok();
    assert_eq!(created.stdout.trim(), "stream telemetry created");
    server.cli(&["sql", RULE]).ok();

    let streams = server.sql_json("SHOW STREAMS");
    assert_eq!(streams[0]["name"], "telemetry");
    assert_eq!(streams[0]["columns"], "temp DOUBLE, humidity DOUBLE");
    let rules = server.sql_json("SHOW RULES");
    assert_eq!(rules[0]["name"], "hot");
    assert_eq!(rules[0]["status"], "running");
    assert_eq!(rules[0]["target"], "commands");
    let columns = server.sql_json("DESCRIBE telemetry");
    let names: Vec<_> = columns
        .iter()
        .map(|c| c["column"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["device_id", "ts", "received_at", "temp", "humidity"]
    );

    let csv = server
        .cli(&["sql", "SELECT 1 AS a, 'x' AS b", "--format", "csv"])
        .ok();
    assert_eq!(csv.stdout, "a,b\n1,x\n");
    let table = server.cli(&["sql", "SELECT 1 AS a"]).ok();
    assert!(table.stdout.contains("| a |"), "{}", table.stdout);

    server
        .cli(&["device", "add", "pump-7", "--tag", "site=berlin"])
        .ok();
    let list = server.cli(&["device", "list", "--json"]).ok();
    let devices: serde_json::Value = serde_json::from_str(list.stdout.trim()).unwrap();
    assert_eq!(devices[0]["id"], "pump-7");
    assert_eq!(devices[0]["tags"]["site"], "berlin");
    assert_eq!(devices[0]["connected"], false);
    let table = server.cli(&["device", "list"]).ok();
    assert!(table.stdout.contains("site=berlin"), "{}", table.stdout);
    server.cli(&["device", "remove", "pump-7"]).ok();
    let again = server.cli(&["device", "remove", "pump-7"]);
    assert!(!again.success);
    assert!(again.stderr.contains("does not exist"), "{}", again.stderr);

    server.cli(&["sql", "DROP RULE hot"]).ok();
    assert!(server.sql_json("SHOW RULES").is_empty());
}
