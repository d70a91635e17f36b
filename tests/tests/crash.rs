//! Devices keep sending, with retries, while the server is killed with
//! SIGKILL again and again, and some acknowledgements are "lost" (the device
//! sends the frame again): every acknowledged event ends up in Parquet
//! exactly once, the rules' commands are queued once each, and the rows the
//! rules write into derived streams (restored from their checkpoints) equal
//! those of a run without kills.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::RejectCode;
use tributary_tests::{Server, eventually, parquet_files};

const DEVICES: usize = 4;
const FRAMES: u64 = 150;
const EVENTS_PER_FRAME: u64 = 10;
/// Frames a device has on the wire at once.
const WINDOW: usize = 8;
/// Event time of a device's event 0 (ms since the epoch); events are 10 ms apart.
const START_MS: i64 = 1_764_000_000_000;
/// Events in one window of the windowed rule (one second).
const WINDOW_EVENTS: u64 = 100;
/// Per device and second: how many events and the sum of their numbers.
const WINDOW_RULE: &str = "CREATE RULE win AS INSERT INTO commands SELECT device_id, 'win', CAST(count(*) AS VARCHAR) || '/' || CAST(sum(seq) AS VARCHAR) FROM t GROUP BY device_id, tumble(ts, INTERVAL '1' SECOND)";
/// The first acknowledgement of every this many frames is "lost".
const LOSE_EVERY: u64 = 13;
/// How long a device waits for the server before it tries again.
const PATIENCE: Duration = Duration::from_secs(2);
/// Every event whose number ends in 7 is hot and makes a command.
const RULE: &str = "CREATE RULE hot AS INSERT INTO commands SELECT device_id, 'hot', CAST(seq AS VARCHAR) FROM t WHERE seq % 10 = 7";
/// The same windows as [`WINDOW_RULE`], as rows of a derived stream.
const WINDOW_STREAM: &str = "CREATE STREAM per_second AS SELECT device_id, window_start, count(*) AS n, sum(seq) AS total FROM t GROUP BY device_id, tumble(ts, INTERVAL '1' SECOND)";
/// The hot events, as rows of a derived stream.
const HOT_STREAM: &str =
    "CREATE STREAM hot_events AS SELECT device_id, ts, seq FROM t WHERE seq % 10 = 7";

/// The events of one frame: `seq` numbers events across the device's frames.
fn payload(frame: u64) -> String {
    (0..EVENTS_PER_FRAME)
        .map(|i| {
            let seq = frame * EVENTS_PER_FRAME + i;
            // Event time from the event's number, so both runs agree.
            let ts = START_MS + seq as i64 * 10;
            format!("{{\"seq\": {seq}, \"ts\": {ts}, \"temp\": {}}}\n", seq % 50)
        })
        .collect()
}

/// What one device's sender saw.
#[derive(Debug, Default)]
struct Sent {
    /// Frames acknowledged (each once, whatever the number of tries).
    acked: u64,
    /// Frames sent more than once.
    resent: u64,
    /// Acknowledgements that said the frame was already stored.
    duplicates: u64,
}

/// The server's QUIC address, from the file it writes on start.
fn quic_addr(data_dir: &Path) -> Option<std::net::SocketAddr> {
    let bytes = std::fs::read(data_dir.join("server.json")).ok()?;
    let info: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    info.get("quic")?.as_str()?.parse().ok()
}

/// Sends every frame of `device` in an idempotent session, reconnecting and
/// sending unacknowledged frames again (same numbers) whenever anything
/// fails, until all are acknowledged.
async fn send_all(
    data_dir: PathBuf,
    ca: PathBuf,
    device: String,
    token: String,
    lose_acks: bool,
) -> Sent {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sent = Sent::default();
    let mut tries: HashMap<u64, u32> = HashMap::new();
    // The first frame not yet acknowledged.
    let mut next = 1;
    while next <= FRAMES {
        assert!(
            Instant::now() < deadline,
            "{device}: frames from {next} not acknowledged within 120s"
        );
        let Some(server) = quic_addr(&data_dir) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let options = ClientOptions {
            server,
            server_name: "localhost".into(),
            ca: ca.clone(),
            device_id: device.clone(),
            token: token.clone(),
            commands: false,
            idempotent: true,
            identity: None,
            group: None,
        };
        // A killed server does not answer: give up on it quickly, as a
        // device would, instead of waiting for QUIC's idle timeout.
        let Ok(Ok(client)) = tokio::time::timeout(PATIENCE, Client::connect(options)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut in_flight = VecDeque::new();
        let mut frame = next;
        loop {
            while in_flight.len() < WINDOW && frame <= FRAMES {
                let n = tries.entry(frame).or_default();
                *n += 1;
                if *n == 2 {
                    sent.resent += 1;
                }
                match client
                    .submit_numbered("t", frame, payload(frame).into())
                    .await
                {
                    Ok(answer) => in_flight.push_back((frame, answer)),
                    Err(_) => break,
                }
                frame += 1;
                // Spread the sending over the kills.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            let Some((n, answer)) = in_flight.pop_front() else {
                break;
            };
            match tokio::time::timeout(PATIENCE, answer).await {
                Ok(Ok(Outcome::Acked(ack)))
                    if lose_acks && n % LOSE_EVERY == 0 && tries[&n] == 1 =>
                {
                    // As if this acknowledgement were lost on the way: the
                    // device sends the frame again on a new connection.
                    assert_eq!(ack.seq, n);
                    break;
                }
                Ok(Ok(Outcome::Acked(ack))) => {
                    assert_eq!(ack.seq, n);
                    assert!(
                        ack.count == 0 || ack.count == EVENTS_PER_FRAME as u32,
                        "{ack:?}"
                    );
                    if ack.count == 0 {
                        sent.duplicates += 1;
                    }
                    sent.acked += 1;
                    next = n + 1;
                }
                Ok(Ok(Outcome::Rejected(r))) => {
                    assert!(r.code.is_retryable(), "{device}: frame {n} refused: {r:?}");
                    break;
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        drop(in_flight);
        drop(client);
        if next <= FRAMES {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    sent
}

/// Every (device_id, seq) in the stream's Parquet files.
fn stored(storage: &Path) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for f in parquet_files(storage) {
        let Ok(file) = std::fs::File::open(&f) else {
            continue;
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .unwrap_or_else(|e| panic!("{} does not read back: {e}", f.display()));
        for batch in reader {
            let batch = batch.unwrap();
            let devices = batch
                .column_by_name("device_id")
                .unwrap()
                .as_string::<i32>();
            let seqs = batch
                .column_by_name("seq")
                .unwrap()
                .as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                out.push((devices.value(i).to_string(), seqs.value(i)));
            }
            assert_eq!(seqs.null_count(), 0);
        }
    }
    out
}

/// A server with the test's stream, rules and devices; returns the devices'
/// (id, token).
fn prepared() -> (Server, Vec<(String, String)>) {
    let server = Server::start();
    server
        .cli(&[
            "sql",
            "CREATE STREAM t (seq BIGINT, temp DOUBLE) WITH (partitions = 2, watermark_delay = '0s')",
        ])
        .ok();
    server.cli(&["sql", RULE]).ok();
    server.cli(&["sql", WINDOW_RULE]).ok();
    server.cli(&["sql", WINDOW_STREAM]).ok();
    server.cli(&["sql", HOT_STREAM]).ok();
    let devices = (0..DEVICES)
        .map(|d| {
            let id = format!("crash-{d}");
            let token = server.add_device(&id);
            (id, token)
        })
        .collect();
    (server, devices)
}

/// Sends every device's frames from another thread, each device on its own
/// connections.
fn start_senders(
    server: &Server,
    devices: Vec<(String, String)>,
    lose_acks: bool,
) -> std::thread::JoinHandle<Vec<Sent>> {
    let (data_dir, ca) = (server.data_dir.clone(), server.ca());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = devices
                .into_iter()
                .map(|(id, token)| {
                    tokio::spawn(send_all(data_dir.clone(), ca.clone(), id, token, lose_acks))
                })
                .collect();
            let mut sent = Vec::new();
            for t in tasks {
                sent.push(t.await.unwrap());
            }
            sent
        })
    })
}

/// The commands rule `name` queued: (device, payload), sorted, read from
/// the queue's own SQLite file as another process would.
fn queued(server: &Server, name: &str) -> Vec<(String, String)> {
    let db = rusqlite::Connection::open_with_flags(
        server.data_dir.join("commands.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut query = db
        .prepare(
            "SELECT device_id, payload FROM commands WHERE name = ?1 ORDER BY device_id, payload",
        )
        .unwrap();
    query
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Waits until rule `name` has queued at least `at_least` commands (and a
/// moment more, for any extra ones to show).
fn settled(server: &Server, name: &str, at_least: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = queued(server, name);
        if rows.len() >= at_least || Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(500));
            return queued(server, name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn acknowledged_events_survive_sigkill_exactly_once() {
    let (mut server, devices) = prepared();
    let senders = start_senders(&server, devices, true);
    // Kill the server at pseudo-random moments while the devices send.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    while kills < 4 && !senders.is_finished() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(150 + (state >> 33) % 500));
        server.kill();
        kills += 1;
        server.restart();
    }
    let sent = senders.join().expect("the senders finished");
    assert!(
        kills >= 2,
        "the senders finished before the server was killed twice"
    );
    for s in &sent {
        assert_eq!(s.acked, FRAMES, "{sent:?}");
    }
    assert!(
        sent.iter().all(|s| s.duplicates > 0),
        "every device resent frames the server had stored ({sent:?})"
    );

    // Every event in Parquet, once.
    let expected = DEVICES as u64 * FRAMES * EVENTS_PER_FRAME;
    let storage = server.data_dir.join("storage/t");
    let rows = eventually(Duration::from_secs(60), || {
        let rows = stored(&storage);
        (rows.len() as u64 >= expected).then_some(rows)
    });
    let distinct: HashSet<_> = rows.iter().collect();
    assert_eq!(
        (rows.len() as u64, distinct.len() as u64),
        (expected, expected),
        "(rows, distinct (device_id, seq)) in Parquet; senders: {sent:?}"
    );
    for d in 0..DEVICES {
        let device = format!("crash-{d}");
        for seq in EVENTS_PER_FRAME as i64..((FRAMES + 1) * EVENTS_PER_FRAME) as i64 {
            assert!(
                distinct.contains(&(device.clone(), seq)),
                "{device} event {seq} is missing"
            );
        }
    }
    // SQL agrees (files plus whatever the sink has not flushed).
    let counted = server.sql_json(
        "SELECT count(*) AS n, count(DISTINCT device_id || '/' || CAST(seq AS VARCHAR)) AS d FROM t",
    );
    assert_eq!(counted[0]["n"], expected);
    assert_eq!(counted[0]["d"], expected);

    // The rules replayed what they had not committed. Their commands are
    // keyed by rule and event (or window), so each was queued once.
    let hot = (DEVICES as u64 * FRAMES * EVENTS_PER_FRAME / 10) as usize;
    let hot_rows = settled(&server, "hot", hot);
    let distinct: HashSet<_> = hot_rows.iter().collect();
    assert_eq!(
        (hot_rows.len(), distinct.len()),
        (hot, hot),
        "(commands, distinct) for {hot} hot events"
    );

    // The windowed rule's output equals that of a run without kills or lost
    // acknowledgements over the same events.
    let (calm, devices) = prepared();
    let sent = start_senders(&calm, devices, false).join().unwrap();
    assert!(sent.iter().all(|s| s.acked == FRAMES && s.duplicates == 0));
    // Every device's last window stays open: its watermark has not passed.
    let window = |seq: u64| seq / WINDOW_EVENTS;
    let (first, last) = (
        window(EVENTS_PER_FRAME),
        window((FRAMES + 1) * EVENTS_PER_FRAME - 1),
    );
    let closed = DEVICES * (last - first) as usize;
    let uninterrupted = settled(&calm, "win", closed);
    assert_eq!(uninterrupted.len(), closed, "{uninterrupted:?}");
    let interrupted = settled(&server, "win", closed);
    assert_eq!(interrupted, uninterrupted);

    // The rules' rows in derived streams: restored from checkpoints and
    // appended under sequence numbers, none twice, none missing.
    let windows = |s: &Server| {
        eventually(Duration::from_secs(30), || {
            let rows = s.sql_json(
                "SELECT device_id, CAST(window_start AS BIGINT) AS w, n, total FROM per_second ORDER BY device_id, w, n, total",
            );
            (rows.len() >= closed).then_some(rows)
        })
    };
    let calm_windows = windows(&calm);
    assert_eq!(calm_windows.len(), closed);
    assert_eq!(windows(&server), calm_windows);
    let hot_events = |s: &Server| {
        eventually(Duration::from_secs(30), || {
            let rows = s.sql_json(
                "SELECT count(*) AS n, count(DISTINCT device_id || '/' || CAST(seq AS VARCHAR)) AS d FROM hot_events",
            );
            (rows[0]["n"].as_u64() >= Some(hot as u64)).then_some(rows)
        })
    };
    assert_eq!(hot_events(&server)[0]["n"], hot);
    assert_eq!(hot_events(&server)[0]["d"], hot);
}

/// The log reaches its byte limit because a consumer (a paused rule) holds
/// its oldest events: the device is told to retry later, the server stays
/// up, and once the rule catches up the same frames go through. Every
/// acknowledged event is stored, once.
#[test]
fn a_full_log_asks_devices_to_retry_and_loses_nothing() {
    const EVENTS: u64 = 50;
    let server = Server::start_with(&["--log-max-bytes", "1MiB"]);
    server
        .cli(&[
            "sql",
            "CREATE STREAM t (seq BIGINT, temp DOUBLE) WITH (partitions = 1)",
        ])
        .ok();
    server
        .cli(&[
            "sql",
            "CREATE RULE slow AS INSERT INTO commands SELECT device_id, 'n', CAST(seq AS VARCHAR) FROM t WHERE seq < 0",
        ])
        .ok();
    server.cli(&["sql", "PAUSE RULE slow"]).ok();
    let token = server.add_device("filler");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(Client::connect(ClientOptions {
            server: quic_addr(&server.data_dir).unwrap(),
            server_name: "localhost".into(),
            ca: server.ca(),
            device_id: "filler".into(),
            token,
            commands: false,
            idempotent: true,
            identity: None,
            group: None,
        }))
        .unwrap();
    let frame = |n: u64| -> String {
        (0..EVENTS)
            .map(|i| format!("{{\"seq\": {}, \"temp\": 1}}\n", n * EVENTS + i))
            .collect()
    };
    let send =
        |n: u64| rt.block_on(async { client.send_numbered("t", n, frame(n)).await.unwrap() });

    // Fill the log.
    let mut n = 1;
    let refused = loop {
        match send(n) {
            Outcome::Acked(ack) => {
                assert_eq!(ack.count, EVENTS as u32);
                n += 1;
            }
            Outcome::Rejected(r) => break r,
        }
        assert!(n < 10_000, "the log never filled");
    };
    assert_eq!(refused.code, RejectCode::Unavailable, "{refused:?}");
    assert!(refused.message.contains("full"), "{refused:?}");
    assert!(refused.message.contains("retry later"), "{refused:?}");
    let acked = n - 1;
    assert!(acked > 100, "only {acked} frames fit in 1 MiB");
    // Still full, still up, everything acknowledged is there.
    assert!(matches!(send(n), Outcome::Rejected(_)));
    let count =
        |server: &Server| server.sql_json("SELECT count(*) AS n, count(DISTINCT seq) AS d FROM t");
    let counted = count(&server);
    assert_eq!(counted[0]["n"], acked * EVENTS);
    assert_eq!(counted[0]["d"], acked * EVENTS);

    // The rule catches up; the log deletes what everyone has read; the
    // refused frame goes through with its number, then ten more.
    server.cli(&["sql", "RESUME RULE slow"]).ok();
    let total = n + 10;
    let deadline = Instant::now() + Duration::from_secs(60);
    while n <= total {
        match send(n) {
            Outcome::Acked(ack) => {
                assert_eq!(ack.count, EVENTS as u32, "frame {n} was stored once");
                n += 1;
            }
            Outcome::Rejected(r) => {
                assert_eq!(r.code, RejectCode::Unavailable, "{r:?}");
                assert!(Instant::now() < deadline, "still full after 60s: {r:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    rt.block_on(client.close());
    let counted = count(&server);
    assert_eq!(counted[0]["n"], total * EVENTS);
    assert_eq!(counted[0]["d"], total * EVENTS);
    let rows = eventually(Duration::from_secs(30), || {
        let rows = stored(&server.data_dir.join("storage/t"));
        (rows.len() as u64 >= total * EVENTS).then_some(rows)
    });
    let distinct: HashSet<_> = rows.iter().collect();
    assert_eq!(
        (rows.len() as u64, distinct.len() as u64),
        (total * EVENTS, total * EVENTS)
    );
}
