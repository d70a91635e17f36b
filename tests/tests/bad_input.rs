//! Bad input of every kind gets a clear error and leaves nothing half-done.

use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::{ErrorCode, RejectCode};
use tributary_tests::Server;

use crate::e2e::{STREAM, count};

fn setup() -> (Server, String) {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let token = server.add_device("d1");
    (server, token)
}

fn send(server: &Server, token: &str, stream: &str, events: &str) -> tributary_tests::Run {
    server.cli_with_stdin(
        &[
            "send", "--device", "d1", "--token", token, "--stream", stream,
        ],
        Some(events),
    )
}

#[test]
fn wrong_token_and_unknown_device_are_refused() {
    let (server, _token) = setup();
    let run = send(&server, "trb_not-the-token", "telemetry", "{\"temp\": 1}\n");
    assert!(!run.success);
    assert!(run.stderr.contains("unauthorized"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("unknown device, or a token not signed by its keys"),
        "{}",
        run.stderr
    );
    let run = server.cli_with_stdin(
        &[
            "send",
            "--device",
            "ghost",
            "--token",
            "trb_x",
            "--stream",
            "telemetry",
        ],
        Some("{\"temp\": 1}\n"),
    );
    assert!(!run.success);
    assert!(run.stderr.contains("unauthorized"), "{}", run.stderr);
    // listen refuses the same way, at once.
    let run = server.cli(&["listen", "--device", "ghost", "--token", "trb_x"]);
    assert!(!run.success);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("unauthorized")),
        "{}",
        run.stderr
    );
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn payload_errors_name_the_line_field_and_type_and_store_nothing() {
    let (server, token) = setup();
    let cases = [
        (
            "{\"temp\": \"hot\"}\n",
            vec!["line 1", "'temp'", "DOUBLE", "invalid_field"],
        ),
        ("{\"tmp\": 1}\n", vec!["line 1", "'tmp'", "unknown_field"]),
        ("{\"temp\": 1}\n{\"temp\": \n", vec!["invalid_json"]),
        ("[1, 2]\n", vec!["invalid_event"]),
        (
            "{\"temp\": 1, \"device_id\": \"someone-else\"}\n",
            vec!["invalid_device_id"],
        ),
    ];
    for (events, expected) in cases {
        let run = send(&server, &token, "telemetry", events);
        assert!(!run.success, "{events} was accepted");
        for e in expected {
            assert!(
                run.stderr.contains(e),
                "{events}: expected {e} in: {}",
                run.stderr
            );
        }
        assert!(
            run.stderr
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count()
                >= 1,
            "{}",
            run.stderr
        );
    }
    // One bad event rejects its whole frame: the good events around it are not stored.
    let run = send(
        &server,
        &token,
        "telemetry",
        "{\"temp\": 1}\n{\"temp\": true}\n{\"temp\": 3}\n",
    );
    assert!(!run.success);
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    assert!(
        run.stderr.contains("lines 1-3 were not stored"),
        "{}",
        run.stderr
    );
    assert_eq!(count(&server, "telemetry"), 0);
    // Good frames still go through on the same connection after a bad one.
    let run = server.cli_with_stdin(
        &["send", "--device", "d1", "--token", &token, "--batch", "1"],
        Some("{\"temp\": 1}\n{\"temp\": \"x\"}\n{\"temp\": 3}\n"),
    );
    assert!(!run.success);
    assert!(
        run.stderr.contains("2 of 3 events accepted"),
        "{}",
        run.stderr
    );
    assert_eq!(count(&server, "telemetry"), 2);
}

#[test]
fn unknown_stream_is_rejected() {
    let (server, token) = setup();
    let run = send(&server, &token, "nope", "{\"temp\": 1}\n");
    assert!(!run.success);
    assert!(
        run.stderr.contains("stream 'nope' does not exist"),
        "{}",
        run.stderr
    );
}

#[test]
fn sql_errors_say_what_and_where() {
    let (server, _) = setup();
    let run = server.cli(&["sql", "SELEC count(*) FROM telemetry"]);
    assert!(!run.success);
    assert!(run.stderr.contains("line 1, column 1"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);

    let run = server.cli(&["sql", "SELECT tempp FROM telemetry"]);
    assert!(!run.success);
    assert!(run.stderr.contains("tempp"), "{}", run.stderr);

    let run = server.cli(&["sql", "SELECT * FROM nowhere"]);
    assert!(!run.success);
    assert!(run.stderr.contains("nowhere"), "{}", run.stderr);
    assert!(run.stderr.contains("streams: telemetry"), "{}", run.stderr);

    let run = server.cli(&[
        "sql",
        "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'x' FROM missing WHERE temp > 1",
    ]);
    assert!(!run.success);
    assert!(
        run.stderr
            .contains("rule 'r' reads stream 'missing', which does not exist"),
        "{}",
        run.stderr
    );
    assert!(
        server.sql_json("SHOW RULES").is_empty(),
        "a refused rule must not be half-created"
    );

    let run = server.cli(&["sql", STREAM]);
    assert!(!run.success);
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);

    let run = server.cli(&["sql", "CREATE STREAM bad (x BLOB)"]);
    assert!(!run.success);
    assert!(
        run.stderr.contains("unsupported type BLOB"),
        "{}",
        run.stderr
    );

    let run = server.cli(&["sql", "SELECT 1", "--token", "wrong"]);
    assert!(!run.success);
    assert!(
        run.stderr.contains("admin token is not valid"),
        "{}",
        run.stderr
    );
}

/// The protocol level, through the client library: codes and fields as a
/// client written from docs/protocol.md sees them.
#[test]
fn reject_frames_carry_code_event_and_field() {
    let (server, token) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let options = ClientOptions {
            server: server.quic_addr().parse().unwrap(),
            server_name: "localhost".into(),
            ca: server.ca(),
            device_id: "d1".into(),
            token: token.clone(),
            commands: true,
            idempotent: false,
            identity: None,
            group: None,
        };
        let client = Client::connect(options.clone()).await.unwrap();
        let outcome = client
            .send(
                "telemetry",
                br#"[{"temp": 1}, {"temp": 2, "humidity": "wet"}]"#.to_vec(),
            )
            .await
            .unwrap();
        let Outcome::Rejected(r) = outcome else {
            panic!("accepted a bad frame")
        };
        assert_eq!(r.code, RejectCode::InvalidField);
        assert_eq!(r.event, Some(1));
        assert_eq!(r.field.as_deref(), Some("humidity"));
        let ok = client
            .send("telemetry", br#"{"temp": 5}"#.to_vec())
            .await
            .unwrap();
        assert!(matches!(ok, Outcome::Acked(a) if a.count == 1), "{ok:?}");
        client.close().await;

        let bad = Client::connect(ClientOptions {
            token: "trb_wrong".into(),
            ..options
        })
        .await;
        match bad {
            Err(tributary_ingest::Error::Server { code, message }) => {
                assert_eq!(code, ErrorCode::Unauthorized);
                assert!(message.contains("d1"), "{message}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a wrong token was accepted"),
        }
    });
}
