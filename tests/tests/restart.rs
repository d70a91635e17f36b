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
