//! A restart keeps devices, streams, rules, queued commands and stored events.

use std::time::Duration;

use tributary_tests::Server;

use crate::e2e::{RULE, STREAM, count, wait_output};

#[test]
fn everything_survives_a_clean_restart_and_a_kill() {
    let mut server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    server.cli(&["sql", RULE]).ok();
    let token = server.add_device("boiler");
    // The device is offline: the rule's command waits in the queue.
    server
        .cli_with_stdin(
            &["send", "--device", "boiler", "--token", &token],
            Some("{\"temp\": 90}\n{\"temp\": 20}\n"),
        )
        .ok();
    let rules = server.sql_json("SHOW RULES");
    assert_eq!(rules[0]["commands_queued"], 1, "{rules:?}");

    server.stop();
    server.restart();
    assert_eq!(count(&server, "telemetry"), 2);
    assert_eq!(server.sql_json("SHOW STREAMS")[0]["name"], "telemetry");
    assert_eq!(server.sql_json("SHOW RULES")[0]["name"], "hot");
    let devices = server.cli(&["device", "list", "--json"]).ok();
    assert!(devices.stdout.contains("\"boiler\""), "{}", devices.stdout);

    // The queued command is delivered once the device connects.
    let listener = server.spawn_cli(&[
        "listen", "--device", "boiler", "--token", &token, "--count", "1",
    ]);
    let out = wait_output(listener, Duration::from_secs(30));
    assert!(out.contains("\"fan_on\""), "{out}");
    assert!(out.contains("\"90.0\""), "{out}");

    // The rule still runs after the restart, and acknowledged events survive SIGKILL.
    server
        .cli_with_stdin(
            &["send", "--device", "boiler", "--token", &token],
            Some("{\"temp\": 95}\n"),
        )
        .ok();
    server.kill();
    server.restart();
    assert_eq!(count(&server, "telemetry"), 3);
    let listener = server.spawn_cli(&[
        "listen", "--device", "boiler", "--token", &token, "--count", "1",
    ]);
    let out = wait_output(listener, Duration::from_secs(30));
    assert!(
        out.contains("\"95.0\""),
        "the command from before the kill: {out}"
    );
}

/// Regression: two servers on one data directory both ran, wrote the same
/// log offsets and stored the same events in Parquet twice. The second is
/// now refused before it touches anything, and says which server holds the
/// directory; the first goes on serving, and once it stops the directory
/// is free again.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let mut server = Server::start();
    let server_json = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("server.json")).unwrap()).unwrap()
    };
    let info = server_json(&server.data_dir);
    let mut second = std::process::Command::new(tributary_tests::binary())
        .args(["serve", "--data-dir"])
        .arg(&server.data_dir)
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that is let in runs until stopped: give it 30 s to be refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server started on the data directory of a running one");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let second = second.wait_with_output().unwrap();
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another tributary server")
            && stderr.contains(&format!("pid {}", info["pid"]))
            && stderr.contains(&server.data_dir.display().to_string()),
        "{stderr}"
    );
    // The first server's record of itself is untouched, and it still serves.
    assert_eq!(server_json(&server.data_dir), info);
    server.cli(&["sql", STREAM]).ok();

    server.stop();
    server.restart();
    assert_eq!(server.sql_json("SHOW STREAMS")[0]["name"], "telemetry");
}
