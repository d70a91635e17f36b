//! The gateway's limits over real QUIC (docs/protocol.md section 12): each
//! exceeded limit is answered with its documented code, nothing of a
//! refused frame is stored, and the server keeps serving other devices
//! meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tributary_ingest::client::{CONNECTION_REFUSED, Client, ClientOptions, Outcome};
use tributary_ingest::protocol::{self, ErrorCode, Frame, FrameDecoder, Hello, Reject, RejectCode};
use tributary_tests::{Server, eventually, unix_now};

use crate::e2e::STREAM;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A server with `flags`, the telemetry stream, and devices d1 and d2;
/// returns their tokens.
fn setup(flags: &[&str]) -> (Server, String, String) {
    let server = Server::start_with(flags);
    server.cli(&["sql", STREAM]).ok();
    let token = |id: &str| {
        server
            .add_device_with_keys(id)
            .primary_token(unix_now() + 3600)
    };
    let (t1, t2) = (token("d1"), token("d2"));
    (server, t1, t2)
}

fn options(server: &Server, device: &str, token: &str) -> ClientOptions {
    let mut options = ClientOptions::new(
        server.quic_addr().parse().unwrap(),
        server.ca(),
        device,
        token,
    );
    options.commands = false;
    options
}

async fn connect(server: &Server, device: &str, token: &str) -> Client {
    Client::connect(options(server, device, token))
        .await
        .unwrap_or_else(|e| panic!("{device} could not connect: {e}"))
}

/// `n` telemetry events as a JSON array, `pad` bytes of whitespace in each.
fn events(n: usize, pad: usize) -> Vec<u8> {
    let one = format!("{{\"temp\": 20.5{}}}", " ".repeat(pad));
    format!("[{}]", vec![one; n].join(",")).into_bytes()
}

async fn send(client: &Client, payload: Vec<u8>) -> Outcome {
    client.send("telemetry", payload).await.unwrap()
}

fn rejected(outcome: Outcome) -> Reject {
    match outcome {
        Outcome::Rejected(r) => r,
        other => panic!("expected a REJECT, got {other:?}"),
    }
}

fn acked(outcome: Outcome) -> u32 {
    match outcome {
        Outcome::Acked(a) => a.count,
        other => panic!("expected an ACK, got {other:?}"),
    }
}

/// How many events of `device` the server stored.
fn stored(server: &Server, device: &str) -> i64 {
    let rows = tokio::task::block_in_place(|| {
        server.sql_json(&format!(
            "SELECT count(*) AS n FROM telemetry WHERE device_id = '{device}'"
        ))
    });
    rows[0]["n"].as_i64().unwrap()
}

/// A bare QUIC connection, for what the client library will not do: stay
/// silent, send oversized frames.
struct Raw {
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl Raw {
    /// Completes the TLS handshake only. `keep_alive: false` sends no QUIC
    /// keep-alives, as a device that went quiet.
    async fn handshake(server: &Server, keep_alive: bool) -> Result<Raw, quinn::ConnectionError> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap()))
            .keep_alive_interval(keep_alive.then_some(Duration::from_secs(1)));
        Raw::handshake_with(server, transport).await
    }

    async fn handshake_with(
        server: &Server,
        transport: quinn::TransportConfig,
    ) -> Result<Raw, quinn::ConnectionError> {
        let addr: SocketAddr = server.quic_addr().parse().unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut config = tributary_ingest::tls::client_config(&server.ca()).unwrap();
        config.transport_config(Arc::new(transport));
        endpoint.set_default_client_config(config);
        let connection = endpoint.connect(addr, "localhost").unwrap().await?;
        Ok(Raw {
            _endpoint: endpoint,
            connection,
        })
    }

    /// Opens the session stream, says HELLO as `device` and reads WELCOME.
    async fn session(
        &self,
        device: &str,
        token: &str,
    ) -> (quinn::SendStream, quinn::RecvStream, FrameDecoder) {
        let (mut send, mut recv) = self.connection.open_bi().await.unwrap();
        let hello = Frame::Hello(Hello {
            version: protocol::VERSION,
            device_id: device.into(),
            token: token.into(),
            commands: false,
            idempotent: false,
            group: None,
            twin: false,
        });
        send.write_all(&hello.encode_to_vec()).await.unwrap();
        let mut decoder = FrameDecoder::new(protocol::DEFAULT_MAX_FRAME_BYTES);
        let welcome = next_frame(&mut recv, &mut decoder).await;
        assert!(matches!(welcome, Some(Frame::Welcome(_))), "{welcome:?}");
        (send, recv, decoder)
    }

    /// The application close code the server closed with, once it has.
    async fn close_code(&self, within: Duration) -> Option<u32> {
        let closed = tokio::time::timeout(within, self.connection.closed())
            .await
            .expect("the server did not close the connection in time");
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                u32::try_from(close.error_code.into_inner()).ok()
            }
            _ => None,
        }
    }
}

async fn next_frame(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Option<Frame> {
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return Some(frame);
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            _ => return None,
        }
    }
}

#[test]
fn a_frame_over_the_size_limit_ends_only_its_own_session() {
    let (server, t1, t2) = setup(&["--max-frame-bytes", "1KiB"]);
    runtime().block_on(async {
        let other = connect(&server, "d2", &t2).await;
        assert_eq!(other.welcome().max_frame_bytes, 1024);
        let raw = Raw::handshake(&server, true).await.unwrap();
        let (mut out, mut recv, mut decoder) = raw.session("d1", &t1).await;
        // The length alone gives it away: 1025 bytes announced.
        out.write_all(&1025u32.to_be_bytes()).await.unwrap();
        match next_frame(&mut recv, &mut decoder).await {
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::FrameTooLarge, "{e:?}");
                assert!(e.message.contains("1025"), "{e:?}");
            }
            other => panic!("expected ERROR frame_too_large, got {other:?}"),
        }
        let code = raw.close_code(Duration::from_secs(5)).await;
        assert_eq!(code, Some(ErrorCode::FrameTooLarge.close_code()));
        // Whatever fits is still taken, from the other device.
        assert_eq!(acked(send(&other, events(3, 0)).await), 3);
    });
    assert_eq!(stored(&server, "d2"), 3);
}

#[test]
fn a_frame_with_too_many_events_is_rejected_and_the_session_goes_on() {
    let (server, t1, _) = setup(&["--max-events-per-frame", "5"]);
    runtime().block_on(async {
        let client = connect(&server, "d1", &t1).await;
        assert_eq!(client.welcome().max_events_per_frame, 5);
        let r = rejected(send(&client, events(6, 0)).await);
        assert_eq!(r.code, RejectCode::TooManyEvents, "{r:?}");
        assert!(r.message.contains('5'), "{r:?}");
        assert_eq!(acked(send(&client, events(5, 0)).await), 5);
    });
    assert_eq!(stored(&server, "d1"), 5);
}

#[test]
fn a_device_over_its_event_rate_is_told_when_to_send_again() {
    // 20 events/s: a second's worth, then a frame putting the device 3 s
    // into debt, so the refusal does not depend on how fast this machine is.
    let (server, t1, t2) = setup(&["--device-events-per-s", "20"]);
    runtime().block_on(async {
        let d1 = connect(&server, "d1", &t1).await;
        let d2 = connect(&server, "d2", &t2).await;
        assert_eq!(acked(send(&d1, events(20, 0)).await), 20);
        assert_eq!(acked(send(&d1, events(60, 0)).await), 60);
        let r = rejected(send(&d1, events(1, 0)).await);
        assert_eq!(r.code, RejectCode::RateLimited, "{r:?}");
        assert!(r.message.contains("20 events/s"), "{r:?}");
        let wait = r
            .retry_after_ms
            .expect("rate_limited carries retry_after_ms");
        assert!((1..=3000).contains(&wait), "{r:?}");
        // Another device has its own allowance.
        assert_eq!(acked(send(&d2, events(20, 0)).await), 20);
        // Reconnecting does not forgive the debt.
        d1.close().await;
        let d1 = connect(&server, "d1", &t1).await;
        let again = rejected(send(&d1, events(1, 0)).await);
        assert_eq!(again.code, RejectCode::RateLimited, "{again:?}");
        // Once the time is up the device is taken again.
        let wait = again.retry_after_ms.unwrap();
        tokio::time::sleep(Duration::from_millis(wait + 100)).await;
        assert_eq!(acked(send(&d1, events(1, 0)).await), 1);
    });
    assert_eq!(stored(&server, "d1"), 81);
    assert_eq!(stored(&server, "d2"), 20);
}

#[test]
fn byte_rates_follow_each_devices_registry_entry_live() {
    let (server, t1, t2) = setup(&["--device-bytes-per-s", "1KiB"]);
    // d2 is a field gateway: no byte limit of its own.
    server.api_expect(
        "PATCH",
        "/api/v1/devices/d2",
        Some(&json!({"metadata": {"limits": {"bytes_per_s": 0}}})),
        200,
    );
    // A malformed override is refused where it is written.
    let (status, body) = server.api(
        "PATCH",
        "/api/v1/devices/d2",
        Some(&json!({"metadata": {"limits": {"bytes_per_s": "lots"}}})),
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_device", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits"),
        "{body}"
    );
    runtime().block_on(async {
        let d1 = connect(&server, "d1", &t1).await;
        let d2 = connect(&server, "d2", &t2).await;
        // About 3 KiB per frame: the first puts d1 two seconds into debt.
        let frame = || events(10, 300);
        assert_eq!(acked(send(&d1, frame()).await), 10);
        let r = rejected(send(&d1, frame()).await);
        assert_eq!(r.code, RejectCode::RateLimited, "{r:?}");
        assert!(r.message.contains("1024 bytes/s"), "{r:?}");
        for _ in 0..10 {
            assert_eq!(acked(send(&d2, frame()).await), 10);
        }
        // Lifting d1's limit applies to its live session.
        tokio::task::block_in_place(|| {
            server.api_expect(
                "PATCH",
                "/api/v1/devices/d1",
                Some(&json!({"metadata": {"limits": {"bytes_per_s": 0}}})),
                200,
            )
        });
        let started = Instant::now();
        loop {
            match send(&d1, frame()).await {
                Outcome::Acked(_) => {}
                Outcome::Rejected(r) if r.code == RejectCode::RateLimited => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "the new limit never applied: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                other => panic!("{other:?}"),
            }
            // Taken: now several in a row go through at once.
            for _ in 0..5 {
                assert_eq!(acked(send(&d1, frame()).await), 10);
            }
            break;
        }
    });
}

#[test]
fn connections_over_the_maximum_are_refused_before_their_handshake() {
    let (server, t1, t2) = setup(&["--max-connections", "2"]);
    let t3 = server
        .add_device_with_keys("d3")
        .primary_token(unix_now() + 3600);
    runtime().block_on(async {
        let d1 = connect(&server, "d1", &t1).await;
        let d2 = connect(&server, "d2", &t2).await;
        let err = Client::connect(options(&server, "d3", &t3))
            .await
            .err()
            .expect("a third connection is refused");
        assert!(err.to_string().contains(CONNECTION_REFUSED), "{err}");
        assert_eq!(acked(send(&d1, events(1, 0)).await), 1);
        // A place freed is a place taken.
        d2.close().await;
        let d3 = eventually_connect(&server, "d3", &t3).await;
        assert_eq!(acked(send(&d3, events(1, 0)).await), 1);
    });
}

/// Connects, retrying while a limit refuses the connection.
async fn eventually_connect(server: &Server, device: &str, token: &str) -> Client {
    let started = Instant::now();
    loop {
        match Client::connect(options(server, device, token)).await {
            Ok(client) => return client,
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                assert!(e.to_string().contains(CONNECTION_REFUSED), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{device} could not connect: {e}"),
        }
    }
}

#[test]
fn new_connections_over_the_rate_are_refused() {
    let (server, t1, t2) = setup(&["--connection-rate", "1"]);
    runtime().block_on(async {
        // The bucket starts full: one connection, then none for a second.
        let d1 = connect(&server, "d1", &t1).await;
        let err = Client::connect(options(&server, "d2", &t2))
            .await
            .err()
            .expect("a second connection within the second is refused");
        assert!(err.to_string().contains(CONNECTION_REFUSED), "{err}");
        assert_eq!(acked(send(&d1, events(1, 0)).await), 1);
        // A second later there is room again.
        let d2 = eventually_connect(&server, "d2", &t2).await;
        assert_eq!(acked(send(&d2, events(1, 0)).await), 1);
    });
}

#[test]
fn half_open_connections_cannot_crowd_out_connected_devices() {
    let (server, t1, t2) = setup(&["--max-pending-connections", "3", "--hello-timeout", "2s"]);
    runtime().block_on(async {
        let d1 = connect(&server, "d1", &t1).await;
        // Three handshakes that never say HELLO fill the unauthenticated
        // places; more are refused.
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(Raw::handshake(&server, true).await.unwrap());
        }
        for _ in 0..3 {
            let refused = Raw::handshake(&server, true).await.err().unwrap();
            assert!(
                matches!(&refused, quinn::ConnectionError::ConnectionClosed(c)
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
                "{refused}"
            );
        }
        // The connected device is served all along.
        for _ in 0..5 {
            assert_eq!(acked(send(&d1, events(1, 0)).await), 1);
        }
        // The silent ones are closed at the HELLO timeout...
        for raw in &silent {
            assert_eq!(
                raw.close_code(Duration::from_secs(10)).await,
                Some(ErrorCode::HelloTimeout.close_code())
            );
        }
        // ...and their places are free again.
        let d2 = eventually_connect(&server, "d2", &t2).await;
        assert_eq!(acked(send(&d2, events(1, 0)).await), 1);
    });
}

#[test]
fn a_silent_device_is_dropped_at_the_idle_timeout_unless_kept_alive() {
    let (server, t1, _) = setup(&["--idle-timeout", "2s", "--keep-alive", "0s"]);
    let started = Instant::now();
    runtime().block_on(async {
        let raw = Raw::handshake(&server, false).await.unwrap();
        let _session = raw.session("d1", &t1).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), raw.connection.closed())
            .await
            .expect("the idle connection was not dropped");
        assert!(
            matches!(closed, quinn::ConnectionError::TimedOut),
            "{closed}"
        );
    });
    assert!(started.elapsed() >= Duration::from_secs(2));
    let state = eventually(Duration::from_secs(10), || {
        let c = server.api_expect("GET", "/api/v1/devices/d1", None, 200)["connection"].clone();
        (c["connected"] == false).then_some(c)
    });
    assert_eq!(state["reason"], "idle timeout", "{state}");

    // The server's own keep-alives hold a quiet device (one behind a NAT
    // that sends nothing) past the idle timeout.
    let (server, t1, _) = setup(&["--idle-timeout", "2s", "--keep-alive", "500ms"]);
    runtime().block_on(async {
        let raw = Raw::handshake(&server, false).await.unwrap();
        let (_send, _recv, _decoder) = raw.session("d1", &t1).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            raw.connection.close_reason().is_none(),
            "{:?}",
            raw.connection.close_reason()
        );
    });
}

/// The limit flags are checked when the server starts.
#[test]
fn bad_limit_flags_say_which_and_why() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tributary_tests::binary())
        .args(["serve", "--data-dir"])
        .arg(data.path())
        .args(["--max-frame-bytes", "8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-frame-bytes") && stderr.contains("16 bytes to 1GiB"),
        "{stderr}"
    );
    assert!(!Path::new(&data.path().join("server.json")).exists());
}

/// `tributary send` paces itself by the REJECTs' `retry_after_ms`: every
/// event lands, none twice.
#[test]
fn the_cli_sender_waits_out_its_rate_limit() {
    let (server, t1, _) = setup(&["--device-events-per-s", "100"]);
    let lines: String = (0..300).map(|i| format!("{{\"temp\": {i}}}\n")).collect();
    let started = Instant::now();
    let run = server
        .cli_with_stdin(
            &[
                "send",
                "--device",
                "d1",
                "--token",
                &t1,
                "--stream",
                "telemetry",
                "--batch",
                "100",
                "--json",
            ],
            Some(&lines),
        )
        .ok();
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(summary["accepted"], 300, "{summary}");
    // 300 events at 100/s with a second's burst: the last 100 wait.
    assert!(started.elapsed() >= Duration::from_millis(900));
    let rows =
        server.sql_json("SELECT count(DISTINCT temp) AS n, count(*) AS total FROM telemetry");
    assert_eq!(
        (rows[0]["n"].as_i64(), rows[0]["total"].as_i64()),
        (Some(300), Some(300))
    );
}

/// An idempotent session (protocol.md section 7) must not store a later
/// frame ahead of one refused for the rate: the refused one, sent again,
/// would pass for a resend and be dropped.
#[test]
fn idempotent_frames_wait_for_the_one_refused_for_the_rate() {
    let (server, t1, _) = setup(&["--device-events-per-s", "20"]);
    runtime().block_on(async {
        let mut opts = options(&server, "d1", &t1);
        opts.idempotent = true;
        let d1 = Client::connect(opts).await.unwrap();
        let numbered = |seq: u64, n: usize| d1.send_numbered("telemetry", seq, events(n, 0));
        assert_eq!(acked(numbered(1, 20).await.unwrap()), 20);
        assert_eq!(acked(numbered(2, 60).await.unwrap()), 60);
        let r = rejected(numbered(3, 1).await.unwrap());
        assert_eq!(r.code, RejectCode::RateLimited, "{r:?}");
        tokio::time::sleep(Duration::from_millis(r.retry_after_ms.unwrap() + 200)).await;
        // The device's rate would take frame 4 now, but frame 3 comes first.
        let held = rejected(numbered(4, 1).await.unwrap());
        assert_eq!(held.code, RejectCode::RateLimited, "{held:?}");
        assert!(held.message.contains("frame 3"), "{held:?}");
        assert_eq!(acked(numbered(3, 1).await.unwrap()), 1);
        assert_eq!(acked(numbered(4, 1).await.unwrap()), 1);
    });
    assert_eq!(stored(&server, "d1"), 82);
}

/// The server never sends a frame over the maximum it advertised: a
/// command too large for it fails with a reason, and the next one still
/// goes out.
#[test]
fn a_command_too_large_for_the_frame_limit_fails_and_says_why() {
    let (server, t1, _) = setup(&["--max-frame-bytes", "2KiB"]);
    let big = server.api_expect(
        "POST",
        "/api/v1/devices/d1/commands",
        Some(&json!({"name": "load", "payload": "x".repeat(3000)})),
        201,
    );
    let small = server.api_expect(
        "POST",
        "/api/v1/devices/d1/commands",
        Some(&json!({"name": "reboot"})),
        201,
    );
    runtime().block_on(async {
        let mut opts = options(&server, "d1", &t1);
        opts.commands = true;
        let d1 = Client::connect(opts).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), d1.next_command())
            .await
            .expect("no COMMAND within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(got.id, small["id"].as_str().unwrap());
    });
    let id = big["id"].as_str().unwrap();
    let status = eventually(Duration::from_secs(10), || {
        let c = server.api_expect("GET", &format!("/api/v1/commands/{id}"), None, 200);
        (c["status"] == "failed").then_some(c)
    });
    assert!(
        status["reason"].as_str().unwrap().contains("2048 bytes"),
        "{status}"
    );
}

/// A device that sends but reads none of its answers is disconnected once
/// they back up, so the runs queued behind them cannot keep their share of
/// the in-flight budget; another device goes on meanwhile.
#[test]
fn a_device_that_reads_no_answers_is_disconnected_and_others_go_on() {
    let (server, t1, t2) = setup(&["--device-events-per-s", "0", "--device-bytes-per-s", "0"]);
    runtime().block_on(async {
        // A 16 KiB window for the server's answers: they back up after
        // about a thousand ACKs the device does not read.
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap()))
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .stream_receive_window(16_384u32.into());
        let raw = Raw::handshake_with(&server, transport).await.unwrap();
        let (mut out, _recv, _decoder) = raw.session("d1", &t1).await;
        // Send until the server closes the connection; never read. A write
        // waits while the server reads nothing, so the whole loop has a
        // deadline.
        let sending = async {
            let mut seq = 0u64;
            loop {
                seq += 1;
                let frame = Frame::Events(protocol::Events {
                    seq,
                    stream: "telemetry".into(),
                    encoding: protocol::Encoding::Json,
                    payload: br#"{"temp": 21.5}"#.to_vec().into(),
                });
                if out.write_all(&frame.encode_to_vec()).await.is_err() {
                    return seq - 1;
                }
            }
        };
        let sent = tokio::time::timeout(Duration::from_secs(60), sending)
            .await
            .expect("the server kept a device that reads no answers for 60 s");
        assert!(sent > 1_024, "closed after only {sent} frames");
        assert_eq!(
            raw.close_code(Duration::from_secs(5)).await,
            Some(ErrorCode::ProtocolError.close_code()),
        );

        let other = connect(&server, "d2", &t2).await;
        assert_eq!(acked(send(&other, events(3, 0)).await), 3);
    });
}
