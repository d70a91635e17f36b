//! Commands over a real QUIC connection, through the real binary
//! (docs/protocol.md, section 8): commands wait for offline devices and
//! expire when their time-to-live passes, devices answer them (acknowledge,
//! reject, fail, respond to a call), callers wait for those answers, keys
//! make sends idempotent, and order holds across reconnects.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tributary_ingest::client::{Client, ClientOptions};
use tributary_ingest::protocol::Command;
use tributary_tests::{Server, eventually};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(server: &Server, device: &str, token: &str) -> Client {
    let options = ClientOptions::new(
        server.quic_addr().parse().unwrap(),
        server.ca(),
        device,
        token,
    );
    Client::connect(options)
        .await
        .unwrap_or_else(|e| panic!("{device} could not connect: {e}"))
}

async fn next_command(client: &Client) -> Command {
    tokio::time::timeout(Duration::from_secs(10), client.next_command())
        .await
        .expect("no COMMAND within 10s")
        .expect("the session ended")
        .expect("the session ended")
}

/// Asserts that no command arrives for `wait`.
async fn no_command(client: &Client, wait: Duration) {
    if let Ok(got) = tokio::time::timeout(wait, client.next_command()).await {
        panic!("expected no command, got {got:?}");
    }
}

/// Runs a blocking CLI call from inside the runtime.
fn cli(server: &Server, args: &[&str]) -> tributary_tests::Run {
    tokio::task::block_in_place(|| server.cli(args))
}

/// `command send ... --json`: the command as JSON.
fn send(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["command", "send"];
    all.extend_from_slice(args);
    all.push("--json");
    let run = cli(server, &all).ok();
    serde_json::from_str(run.stdout.trim()).unwrap()
}

fn status(server: &Server, id: &str) -> Value {
    let run = cli(server, &["command", "status", id, "--json"]).ok();
    serde_json::from_str(run.stdout.trim()).unwrap()
}

fn id_of(command: &Value) -> String {
    command["id"].as_str().unwrap().to_string()
}

#[test]
fn offline_devices_get_their_commands_on_connect_and_expired_ones_never() {
    let server = Server::start();
    let token = server.add_device("d1");
    runtime().block_on(async {
        let waiting = send(&server, &["d1", "reboot", r#"{"delay_s":5}"#]);
        assert_eq!(waiting["status"], "queued");
        let stale = send(&server, &["d1", "stale", "--ttl", "1s"]);
        let started = Instant::now();
        // The sweep flips it while the device stays offline.
        let expired = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(5), || {
                let s = server.api_expect(
                    "GET",
                    &format!("/api/v1/commands/{}", id_of(&stale)),
                    None,
                    200,
                );
                (s["status"] == "expired").then_some(s)
            })
        });
        assert!(started.elapsed() < Duration::from_secs(10), "{expired}");
        assert_eq!(status(&server, &id_of(&waiting))["status"], "queued");

        let client = connect(&server, "d1", &token).await;
        let got = next_command(&client).await;
        assert_eq!(
            (got.id.as_str(), got.name.as_str(), &got.payload, got.call),
            (
                id_of(&waiting).as_str(),
                "reboot",
                &json!({"delay_s": 5}),
                false
            )
        );
        client.ack_command(&got.id).await.unwrap();
        no_command(&client, Duration::from_millis(1500)).await;
        let acked = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(5), || {
                let s = status(&server, &got.id);
                (s["status"] == "acknowledged").then_some(s)
            })
        });
        assert!(acked["answered_at"].is_i64(), "{acked}");

        // The queue as SQL.
        let rows = tokio::task::block_in_place(|| {
            server.sql_json(
                "SELECT id, name, status, reason FROM commands WHERE device_id = 'd1' ORDER BY name",
            )
        });
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            (&rows[0]["name"], &rows[0]["status"]),
            (&json!("reboot"), &json!("acknowledged"))
        );
        assert_eq!(
            (&rows[1]["name"], &rows[1]["status"]),
            (&json!("stale"), &json!("expired"))
        );
        client.close().await;
    });
}

#[test]
fn devices_reject_and_fail_with_reasons_and_keys_deliver_once() {
    let server = Server::start();
    let token = server.add_device("d1");
    runtime().block_on(async {
        let client = connect(&server, "d1", &token).await;

        let reset = send(&server, &["d1", "factory_reset"]);
        let got = next_command(&client).await;
        assert_eq!(got.id, id_of(&reset));
        client
            .reject_command(&got.id, "battery below 20%")
            .await
            .unwrap();
        let shown = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(5), || {
                let run = server.cli(&["command", "status", &got.id]).ok();
                run.stdout.contains("rejected").then_some(run.stdout)
            })
        });
        assert!(shown.contains("reason:    battery below 20%"), "{shown}");

        let flash = send(&server, &["d1", "flash", r#"{"image":"v2"}"#]);
        let got = next_command(&client).await;
        assert_eq!(got.id, id_of(&flash));
        client
            .fail_command(&got.id, "checksum mismatch")
            .await
            .unwrap();
        let failed = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(5), || {
                let s = status(&server, &got.id);
                (s["status"] == "failed").then_some(s)
            })
        });
        assert_eq!(failed["reason"], "checksum mismatch");
        // A second answer changes nothing.
        client.ack_command(&got.id).await.unwrap();

        // The same idempotency key twice: one command, delivered once.
        let body = json!({"name": "open_valve", "idempotency_key": "valve-7"});
        let first = tokio::task::block_in_place(|| {
            server.api_expect("POST", "/api/v1/devices/d1/commands", Some(&body), 201)
        });
        let again = send(
            &server,
            &["d1", "open_valve", "--idempotency-key", "valve-7"],
        );
        assert_eq!(id_of(&again), id_of(&first));
        let repeat = tokio::task::block_in_place(|| {
            server.api_expect("POST", "/api/v1/devices/d1/commands", Some(&body), 200)
        });
        assert_eq!(id_of(&repeat), id_of(&first));
        let got = next_command(&client).await;
        assert_eq!(got.id, id_of(&first));
        no_command(&client, Duration::from_millis(1500)).await;
        let listed = tokio::task::block_in_place(|| {
            server.api_expect("GET", "/api/v1/commands?device=d1&limit=10", None, 200)
        });
        let names: Vec<_> = listed["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        // Newest first, the valve once.
        assert_eq!(names, ["open_valve", "flash", "factory_reset"]);
        client.close().await;
    });
}

#[test]
fn calls_return_the_answer_time_out_or_say_offline() {
    let server = Server::start();
    let token = server.add_device("d1");
    let silent_token = server.add_device("d2");
    runtime().block_on(async {
        // Offline: refused at once, recorded failed.
        let run = cli(
            &server,
            &["command", "call", "d1", "ping", "--timeout", "5s"],
        );
        assert!(!run.success, "{run:?}");
        assert!(run.stderr.contains("not connected"), "{run:?}");
        let failed = tokio::task::block_in_place(|| {
            server.api_expect("GET", "/api/v1/commands?device=d1&status=failed", None, 200)
        });
        assert_eq!(failed["commands"][0]["reason"], "device offline");
        let (code, body) = tokio::task::block_in_place(|| {
            server.api(
                "POST",
                "/api/v1/devices/d1/calls",
                Some(&json!({"name": "ping", "timeout": "5s"})),
            )
        });
        assert_eq!(
            (code, &body["error"]["code"]),
            (409, &json!("device_offline"))
        );

        // A responder answers calls, and refuses one method.
        let client = std::sync::Arc::new(connect(&server, "d1", &token).await);
        let responder = {
            let client = client.clone();
            tokio::spawn(async move {
                while let Ok(Some(c)) = client.next_command().await {
                    assert!(c.call, "{c:?}");
                    if c.name == "self_destruct" {
                        client.reject_command(&c.id, "not today").await.unwrap();
                    } else {
                        let answer = json!({"pong": c.payload, "method": c.name});
                        client.respond(&c.id, answer).await.unwrap();
                    }
                }
            })
        };
        let run = cli(
            &server,
            &[
                "command",
                "call",
                "d1",
                "ping",
                r#"{"n":1}"#,
                "--timeout",
                "10s",
            ],
        )
        .ok();
        let response: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(response, json!({"pong": {"n": 1}, "method": "ping"}));
        let run = cli(
            &server,
            &["command", "call", "d1", "self_destruct", "--timeout", "10s"],
        );
        assert!(!run.success, "{run:?}");
        assert!(
            run.stderr.contains("rejected") && run.stderr.contains("not today"),
            "{run:?}"
        );
        responder.abort();

        // Connected but never answering: the call waits for its deadline.
        let silent = connect(&server, "d2", &silent_token).await;
        let started = Instant::now();
        let run = cli(
            &server,
            &["command", "call", "d2", "slow", "--timeout", "2s"],
        );
        let took = started.elapsed();
        assert!(!run.success, "{run:?}");
        assert!(run.stderr.contains("did not answer"), "{run:?}");
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        let listed = tokio::task::block_in_place(|| {
            server.api_expect("GET", "/api/v1/commands?device=d2", None, 200)
        });
        let call = &listed["commands"][0];
        assert_eq!(
            (&call["status"], &call["call"]),
            (&json!("expired"), &json!(true))
        );
        // The device did get it, marked as a call; its late answer is ignored.
        let got = next_command(&silent).await;
        assert!(got.call);
        silent.respond(&got.id, json!("late")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(status(&server, &got.id)["status"], "expired");
        silent.close().await;
    });
}

#[test]
fn order_holds_across_a_reconnect_and_latest_wins_supersedes() {
    let server = Server::start();
    let token = server.add_device("d1");
    runtime().block_on(async {
        let sent: Vec<String> = (1..=5)
            .map(|i| id_of(&send(&server, &["d1", &format!("step{i}")])))
            .collect();

        let first = connect(&server, "d1", &token).await;
        for id in &sent[..2] {
            assert_eq!(&next_command(&first).await.id, id);
        }
        first.close().await;

        let second = connect(&server, "d1", &token).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            let c = next_command(&second).await;
            got.push(c.id.clone());
            second.ack_command(&c.id).await.unwrap();
        }
        assert_eq!(got, sent);
        second.close().await;

        // Latest wins: of three set-points queued while offline, the last
        // supersedes the two before it.
        let setpoints: Vec<String> = (1..=3)
            .map(|t| {
                id_of(&send(
                    &server,
                    &["d1", "setpoint", &t.to_string(), "--latest-wins"],
                ))
            })
            .collect();
        // Each one superseded the set-point queued before it.
        for (older, newer) in setpoints.iter().zip(&setpoints[1..]) {
            let older = status(&server, older);
            assert_eq!(older["status"], "superseded");
            assert_eq!(older["reason"], json!(format!("superseded by {newer}")));
        }
        let third = connect(&server, "d1", &token).await;
        let c = next_command(&third).await;
        assert_eq!(
            (c.id.as_str(), &c.payload),
            (setpoints[2].as_str(), &json!(3))
        );
        no_command(&third, Duration::from_millis(1000)).await;
        let run = cli(
            &server,
            &[
                "command",
                "list",
                "--device",
                "d1",
                "--status",
                "superseded",
            ],
        )
        .ok();
        assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
        third.close().await;
    });
}
