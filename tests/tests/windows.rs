//! Windowed rules through the real binary: events over QUIC, a tumbling
//! average per device with HAVING driving commands, a derived stream landing
//! in Parquet and answering SELECT, late events, and the rule lifecycle.

use std::time::Duration;

use arrow::array::{Array, Float64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tributary_tests::{Server, eventually, parquet_files};

use crate::e2e::wait_output;

/// 2025-11-27T10:00:00Z, a multiple of ten seconds.
const BASE: i64 = 1_764_237_600_000;

fn events(temps: &[(i64, f64)]) -> String {
    temps
        .iter()
        .map(|(s, t)| format!("{{\"ts\": {}, \"temp\": {t}}}\n", BASE + s * 1000))
        .collect()
}

#[test]
fn a_tumbling_average_drives_commands_and_feeds_a_derived_stream() {
    let server = Server::start();
    server
        .cli(&[
            "sql",
            "CREATE STREAM telemetry (temp DOUBLE) WITH (watermark_delay = '1s')",
        ])
        .ok();
    let one = server.add_device("sensor-1");
    let two = server.add_device("sensor-2");
    server
        .cli(&[
            "sql",
            "CREATE RULE overheat AS INSERT INTO commands SELECT device_id, 'cool_down', avg(temp) FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND) HAVING avg(temp) > 50",
        ])
        .ok();
    let created = server
        .cli(&[
            "sql",
            "CREATE STREAM temp_10s AS SELECT device_id, window_start, window_end, avg(temp) AS avg_temp, count(*) AS n FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
        ])
        .ok();
    assert!(
        created.stdout.contains("stream temp_10s created"),
        "{}",
        created.stdout
    );
    let listener = server.spawn_cli(&[
        "listen", "--device", "sensor-1", "--token", &one, "--count", "1",
    ]);

    // sensor-1 runs hot for ten seconds (one event out of order, within the
    // delay); sensor-2 stays cool. The event at 12 s moves each device's
    // watermark past the first window's end.
    let hot = events(&[
        (0, 60.0),
        (2, 62.0),
        (1, 58.0),
        (5, 61.0),
        (9, 59.0),
        (12, 20.0),
    ]);
    let cool = events(&[(0, 20.0), (5, 22.0), (12, 21.0)]);
    server
        .cli_with_stdin(
            &["send", "--device", "sensor-1", "--token", &one],
            Some(&hot),
        )
        .ok();
    server
        .cli_with_stdin(
            &["send", "--device", "sensor-2", "--token", &two],
            Some(&cool),
        )
        .ok();

    let out = wait_output(listener, Duration::from_secs(30));
    let command: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(command["name"], "cool_down");
    assert_eq!(command["payload"], 60.0);

    // The derived stream holds one row per device and window, queryable...
    let rows = eventually(Duration::from_secs(30), || {
        let rows = server.sql_json(
            "SELECT device_id, avg_temp, n, window_end - window_start AS len FROM temp_10s ORDER BY device_id",
        );
        (rows.len() == 2).then_some(rows)
    });
    assert_eq!(rows[0]["device_id"], "sensor-1");
    assert_eq!(rows[0]["avg_temp"], 60.0);
    assert_eq!(rows[0]["n"], 5);
    assert_eq!(rows[1]["device_id"], "sensor-2");
    assert_eq!(rows[1]["avg_temp"], 21.0);
    // ...and lands in Parquet, read back by the parquet crate's own reader.
    let storage = server.data_dir.join("storage/temp_10s");
    let averages = eventually(Duration::from_secs(30), || {
        let mut averages = Vec::new();
        for f in parquet_files(&storage) {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&f).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let avg = batch.column_by_name("avg_temp").unwrap();
                let avg = avg.as_any().downcast_ref::<Float64Array>().unwrap();
                averages.extend(avg.iter().flatten());
            }
        }
        averages.sort_by(f64::total_cmp);
        (averages.len() == 2).then_some(averages)
    });
    assert_eq!(averages, [21.0, 60.0]);

    // An event older than sensor-1's watermark is late: counted per rule and
    // kept in the late-events stream, not lost.
    server
        .cli_with_stdin(
            &["send", "--device", "sensor-1", "--token", &one],
            Some(&events(&[(3, 99.0)])),
        )
        .ok();
    let late = eventually(Duration::from_secs(30), || {
        let rows = server.sql_json("SELECT late_rule, temp FROM telemetry_late ORDER BY late_rule");
        (rows.len() == 2).then_some(rows)
    });
    assert_eq!(late[0]["late_rule"], "overheat");
    assert_eq!(late[1]["late_rule"], "temp_10s");
    assert_eq!(late[0]["temp"], 99.0);
    let rules = server.sql_json("SHOW RULES");
    let overheat = rules.iter().find(|r| r["name"] == "overheat").unwrap();
    assert_eq!(overheat["status"], "running");
    assert_eq!(overheat["late_events"], 1);
    // The 10-20 s windows of both devices are still open.
    assert_eq!(overheat["open_windows"], 2);
    assert!(overheat["state_bytes"].as_u64().unwrap() > 0);

    // EXPLAIN RULE says how the rule runs.
    let plan = server.cli(&["sql", "EXPLAIN RULE overheat"]).ok();
    assert!(plan.stdout.contains("tumble(10s)"), "{}", plan.stdout);
    assert!(
        plan.stdout.contains("each device's own watermark"),
        "{}",
        plan.stdout
    );

    // A replacement with a compatible plan keeps the open windows.
    let replaced = server
        .cli(&[
            "sql",
            "CREATE OR REPLACE RULE overheat AS INSERT INTO commands SELECT device_id, 'cool_down', avg(temp) FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND) HAVING avg(temp) > 10",
        ])
        .ok();
    assert!(
        replaced.stdout.contains("open windows carry over"),
        "{}",
        replaced.stdout
    );
    let rules = server.sql_json("SHOW RULES");
    let overheat = rules.iter().find(|r| r["name"] == "overheat").unwrap();
    assert_eq!(overheat["open_windows"], 2);

    server.cli(&["sql", "PAUSE RULE overheat"]).ok();
    let rules = server.sql_json("SHOW RULES");
    let overheat = rules.iter().find(|r| r["name"] == "overheat").unwrap();
    assert_eq!(overheat["status"], "paused");
    server.cli(&["sql", "RESUME RULE overheat"]).ok();
    let rules = server.sql_json("SHOW RULES");
    let overheat = rules.iter().find(|r| r["name"] == "overheat").unwrap();
    assert_eq!(overheat["status"], "running");
}

#[test]
fn refused_rules_say_where_and_leave_no_trace() {
    let server = Server::start();
    server
        .cli(&["sql", "CREATE STREAM telemetry (temp DOUBLE)"])
        .ok();
    let cases = [
        (
            "CREATE RULE r AS INSERT INTO commands\nSELECT device_id, 'x', avg(nope)\nFROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
            "nope",
        ),
        (
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id",
            "need a window",
        ),
        (
            "CREATE STREAM derived AS SELECT device_id, avg(temp) AS a FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '1' MONTH)",
            "months",
        ),
        (
            "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x', avg(temp) FROM telemetry GROUP BY device_id, tumble(ts, 'soon')",
            "duration",
        ),
        (
            "CREATE STREAM s2 (x DOUBLE) WITH (watermark_delay = 'later')",
            "watermark_delay",
        ),
    ];
    for (sql, expected) in cases {
        let run = server.cli(&["sql", sql]);
        assert!(!run.success, "{sql} was accepted");
        assert!(run.stderr.contains(expected), "{sql}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
    let located = server.cli(&[
        "sql",
        "CREATE RULE r AS INSERT INTO commands\nSELECT device_id, 'x', avg(nope)\nFROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
    ]);
    assert!(located.stderr.contains("line 2"), "{}", located.stderr);
    assert!(server.sql_json("SHOW RULES").is_empty());
    let streams = server.sql_json("SHOW STREAMS");
    let names: Vec<_> = streams
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["telemetry"]);
}

#[test]
fn rules_join_the_registry_and_see_devices_added_later() {
    let server = Server::start();
    server
        .cli(&["sql", "CREATE STREAM telemetry (temp DOUBLE)"])
        .ok();
    // Each device's limit lives in the registry, as a tag.
    server
        .cli(&[
            "sql",
            "CREATE RULE over_limit AS INSERT INTO commands SELECT t.device_id, 'over_limit', t.temp FROM telemetry t JOIN devices d ON t.device_id = d.id WHERE t.temp > CAST(d.tags['max_temp'] AS DOUBLE)",
        ])
        .ok();
    // Added after the rule: the rule sees it on its next batch.
    let added = server
        .cli(&["device", "add", "boiler", "--tag", "max_temp=90", "--json"])
        .ok();
    let token: serde_json::Value = serde_json::from_str(added.stdout.trim()).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let listener = server.spawn_cli(&[
        "listen", "--device", "boiler", "--token", &token, "--count", "1",
    ]);
    server
        .cli_with_stdin(
            &["send", "--device", "boiler", "--token", &token],
            Some("{\"temp\": 80}\n{\"temp\": 95}\n"),
        )
        .ok();
    let out = wait_output(listener, Duration::from_secs(30));
    let command: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(command["name"], "over_limit");
    assert_eq!(command["payload"], 95.0);
    let tags = server.sql_json("SELECT id, tags['max_temp'] AS max_temp FROM devices");
    assert_eq!(tags[0]["id"], "boiler");
    assert_eq!(tags[0]["max_temp"], "90");
}

#[test]
fn a_crash_does_not_lose_the_events_of_an_open_window() {
    let mut server = Server::start();
    server
        .cli(&[
            "sql",
            "CREATE STREAM telemetry (temp DOUBLE) WITH (watermark_delay = '1s')",
        ])
        .ok();
    let token = server.add_device("sensor-1");
    server
        .cli(&[
            "sql",
            "CREATE RULE sums AS INSERT INTO commands SELECT device_id, 'sum', sum(temp) FROM telemetry GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)",
        ])
        .ok();
    // Three events open the first window; the rule has read them, but the
    // window is open when the server dies.
    server
        .cli_with_stdin(
            &["send", "--device", "sensor-1", "--token", &token],
            Some(&events(&[(1, 1.0), (2, 2.0), (3, 3.0)])),
        )
        .ok();
    eventually(Duration::from_secs(30), || {
        let rules = server.sql_json("SHOW RULES");
        (rules[0]["events_in"] == 3).then_some(())
    });
    server.kill();
    server.restart();
    let listener = server.spawn_cli(&[
        "listen", "--device", "sensor-1", "--token", &token, "--count", "1",
    ]);
    // After the restart the rule re-reads the open window's events, so the
    // window closes with all of them.
    server
        .cli_with_stdin(
            &["send", "--device", "sensor-1", "--token", &token],
            Some(&events(&[(4, 4.0), (15, 0.0)])),
        )
        .ok();
    let out = wait_output(listener, Duration::from_secs(30));
    let command: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(command["name"], "sum");
    assert_eq!(command["payload"], 10.0);
}
