//! A device's twin and connection state over a real QUIC connection
//! (docs/protocol.md, sections 4.6 and 8.1): desired properties set through
//! the API reach the connected device and a reconnecting one, reported
//! properties reach the registry, and the API shows where the connection
//! stands, live while it lasts and stored once it ended.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tributary_ingest::Error as IngestError;
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::{Desired, RefusedCode};
use tributary_tests::{Server, eventually, unix_now};

use crate::e2e::STREAM;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn setup() -> (Server, String) {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let token = server
        .add_device_with_keys("d1")
        .primary_token(unix_now() + 3600);
    (server, token)
}

async fn connect(server: &Server, token: &str) -> Client {
    let options = ClientOptions::new(
        server.quic_addr().parse().unwrap(),
        server.ca(),
        "d1",
        token,
    );
    Client::connect(options)
        .await
        .unwrap_or_else(|e| panic!("d1 could not connect: {e}"))
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Changes d1's desired properties through the API (a merge patch).
fn patch_desired(server: &Server, patch: Value) -> Value {
    tokio::task::block_in_place(|| {
        server.api_expect(
            "PATCH",
            "/api/v1/devices/d1/twin/desired",
            Some(&patch),
            200,
        )
    })
}

async fn next_desired(client: &Client) -> Desired {
    tokio::time::timeout(Duration::from_secs(5), client.next_desired())
        .await
        .expect("no DESIRED within 5s")
        .expect("the session ended")
}

#[test]
fn desired_properties_reach_the_device_live_and_on_reconnect() {
    let (server, token) = setup();
    runtime().block_on(async {
        let client = connect(&server, &token).await;
        assert_eq!(client.desired(), None, "nothing desired yet");

        patch_desired(&server, json!({"interval_s": 30}));
        let first = next_desired(&client).await;
        assert_eq!(first.version, 1);
        assert_eq!(first.properties, object(json!({"interval_s": 30})));

        // Each change arrives whole, with its version.
        patch_desired(&server, json!({"mode": "eco"}));
        let second = next_desired(&client).await;
        assert_eq!(second.version, 2);
        assert_eq!(
            second.properties,
            object(json!({"interval_s": 30, "mode": "eco"}))
        );
        client.close().await;

        // A change while the device is away waits for its next connection.
        patch_desired(&server, json!({"interval_s": null}));
        let again = connect(&server, &token).await;
        let third = next_desired(&again).await;
        assert_eq!(third.version, 3);
        assert_eq!(third.properties, object(json!({"mode": "eco"})));
        assert_eq!(again.desired(), Some(third));
        again.close().await;
    });
}

#[test]
fn reported_properties_reach_the_registry() {
    let (server, token) = setup();
    runtime().block_on(async {
        let client = connect(&server, &token).await;
        let v1 = client
            .report(object(json!({"firmware": "1.4.2", "battery": 80})))
            .await
            .unwrap();
        let v2 = client
            .report(object(json!({"battery": null, "net": {"rssi": -70}})))
            .await
            .unwrap();
        assert_eq!((v1, v2), (1, 2));

        // Too large: refused, nothing changed, and the session goes on.
        let huge = object(json!({"blob": "x".repeat(1_100_000)}));
        match client.report(huge).await {
            Err(IngestError::Refused { code, message }) => {
                assert_eq!(code, RefusedCode::InvalidProperties, "{message}");
                assert!(message.contains("1048576"), "{message}");
            }
            other => panic!("a report over 1 MiB: {other:?}"),
        }
        match client
            .send("telemetry", &br#"{"temp": 1}"#[..])
            .await
            .unwrap()
        {
            Outcome::Acked(ack) => assert_eq!(ack.count, 1),
            other => panic!("{other:?}"),
        }
        let twin = tokio::task::block_in_place(|| {
            server.api_expect("GET", "/api/v1/devices/d1/twin", None, 200)
        });
        assert_eq!(
            twin["reported"],
            json!({"firmware": "1.4.2", "net": {"rssi": -70}}),
            "{twin}"
        );
        assert_eq!(twin["reported_version"], 2);

        // Replacing, rather than merging.
        let v3 = client
            .report_replacing(object(json!({"firmware": "2.0.0"})))
            .await
            .unwrap();
        assert_eq!(v3, 3);
        client.close().await;
    });
    let twin = server.api_expect("GET", "/api/v1/devices/d1/twin", None, 200);
    assert_eq!(twin["reported"], json!({"firmware": "2.0.0"}), "{twin}");
    assert_eq!(twin["reported_version"], 3);
    assert_eq!(twin["desired_version"], 0);
}

/// d1's `connection` object as `GET /api/v1/devices/d1` shows it.
fn connection(server: &Server) -> Value {
    let device =
        tokio::task::block_in_place(|| server.api_expect("GET", "/api/v1/devices/d1", None, 200));
    device["connection"].clone()
}

#[test]
fn the_api_shows_where_the_connection_stands() {
    let (mut server, token) = setup();
    assert_eq!(connection_blocking(&server), Value::Null, "never connected");
    runtime().block_on(async {
        let client = connect(&server, &token).await;
        let live = connection(&server);
        assert_eq!(live["connected"], true, "{live}");
        assert_eq!(live["reason"], Value::Null, "{live}");
        let since = live["since"].as_i64().unwrap();
        let seen = live["last_seen"].as_i64().unwrap();
        assert!(seen >= since, "{live}");

        // Every frame moves last_seen; stored events move last_event_at.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let ts = 1_764_237_600_000_i64;
        let event = format!(
            r#"[{{"temp": 1, "ts": {}}}, {{"temp": 2, "ts": {ts}}}]"#,
            ts - 5000
        );
        match client.send("telemetry", event.into_bytes()).await.unwrap() {
            Outcome::Acked(ack) => assert_eq!(ack.count, 2),
            other => panic!("{other:?}"),
        }
        let moved = connection(&server);
        assert_eq!(moved["connected"], true, "{moved}");
        assert_eq!(moved["since"], since, "{moved}");
        assert!(
            moved["last_seen"].as_i64().unwrap() >= seen + 1000,
            "{moved}"
        );
        assert_eq!(moved["last_event_at"], ts, "{moved}");
        client.close().await;

        let ended = eventually(Duration::from_secs(10), || {
            let c = connection(&server);
            (c["connected"] == false).then_some(c)
        });
        assert_eq!(ended["reason"], "closed by the device", "{ended}");
        assert_eq!(ended["last_event_at"], ts, "{ended}");
        assert!(
            ended["last_seen"].as_i64().unwrap() >= moved["last_seen"].as_i64().unwrap(),
            "{ended}"
        );
        assert!(ended["since"].as_i64().unwrap() >= since, "{ended}");

        // Connected again: the last event is remembered across connections.
        let again = connect(&server, &token).await;
        let back = connection(&server);
        assert_eq!(back["connected"], true, "{back}");
        assert_eq!(back["last_event_at"], ts, "{back}");
        // The server stops while the device is connected.
        tokio::task::block_in_place(|| server.stop());
        let _ = tokio::time::timeout(Duration::from_secs(5), again.closed()).await;
    });
    server.restart();
    let stopped = connection_blocking(&server);
    assert_eq!(stopped["connected"], false, "{stopped}");
    assert_eq!(stopped["reason"], "server stopped", "{stopped}");
    assert_eq!(stopped["last_event_at"], 1_764_237_600_000_i64, "{stopped}");
}

fn connection_blocking(server: &Server) -> Value {
    server.api_expect("GET", "/api/v1/devices/d1", None, 200)["connection"].clone()
}

/// Runs a query from async code without stalling the runtime.
fn sql(server: &Server, statement: &str) -> Vec<Value> {
    tokio::task::block_in_place(|| server.sql_json(statement))
}

/// The SQL `devices` table shows the connection and the twin: a query sees
/// them as they are when it runs, and a rule joining `devices` sees a
/// device connect and report properties without anyone touching the API.
#[test]
fn the_devices_table_shows_connection_and_properties() {
    let (server, token) = setup();
    server
        .cli(&[
            "sql",
            "CREATE STREAM seen AS SELECT t.device_id, t.temp, d.connected, d.properties \
             FROM telemetry t JOIN devices d ON t.device_id = d.id",
        ])
        .ok();
    let row = |server: &Server| {
        sql(
            server,
            "SELECT connected, last_seen, properties, desired FROM devices WHERE id = 'd1'",
        )
        .remove(0)
    };
    let before = tokio::task::block_in_place(|| row(&server));
    assert_eq!(before["connected"], false, "{before}");
    assert_eq!(before["last_seen"], Value::Null, "{before}");
    assert_eq!(before["properties"], "{}", "{before}");

    runtime().block_on(async {
        let client = connect(&server, &token).await;
        client
            .report(object(json!({"firmware": "3.1"})))
            .await
            .unwrap();
        // The rule's copy follows the registry's announcements (nothing
        // here queries `devices`, which would reload it too). The connection
        // and the report are announced separately, so the join may first see
        // the device connected with no properties yet: wait until it sees
        // both, then check the row it wrote.
        let mut sent = 0;
        let rows = eventually(Duration::from_secs(10), || {
            sent += 1;
            let event = format!(r#"{{"temp": {sent}}}"#);
            let outcome = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(client.send("telemetry", event.into_bytes()))
            });
            assert!(matches!(outcome, Ok(Outcome::Acked(_))), "{outcome:?}");
            let rows = sql(
                &server,
                r#"SELECT * FROM seen WHERE connected AND properties = '{"firmware":"3.1"}'"#,
            );
            (!rows.is_empty()).then_some(rows)
        });
        assert_eq!(rows[0]["device_id"], "d1", "{rows:?}");
        assert_eq!(rows[0]["connected"], true, "{rows:?}");
        let live = row(&server);
        assert_eq!(live["connected"], true, "{live}");
        assert!(!live["last_seen"].is_null(), "{live}");
        assert_eq!(live["properties"], r#"{"firmware":"3.1"}"#, "{live}");
        client.close().await;

        let after = eventually(Duration::from_secs(10), || {
            let r = row(&server);
            (r["connected"] == false).then_some(r)
        });
        assert!(!after["last_seen"].is_null(), "{after}");
    });
}
