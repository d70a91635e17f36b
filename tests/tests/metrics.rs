//! `GET /metrics` (docs/operations.md, "Metrics"): the counters move by
//! what a real device did over QUIC (a refused HELLO, a session, frames
//! stored and one rejected, a command delivered, the session closed), and
//! every line is Prometheus text.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_tests::{Server, eventually, random_key, sign_token, unix_now};

use crate::e2e::{RULE, STREAM};

/// Samples by `name{labels}` (labels as written, `name` alone without).
type Samples = BTreeMap<String, f64>;

/// GET /metrics without a token: the content type and the body.
fn scrape_raw(server: &Server) -> (String, String) {
    use std::io::{Read, Write};
    let addr = server.http_addr().unwrap();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// Parses Prometheus text, checking every line: `# HELP name text`,
/// `# TYPE name counter|gauge` (once per name, before its samples), or
/// `name{label="value",...} number`.
fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    let mut typed = std::collections::HashSet::new();
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            let name = name.unwrap_or_else(|| panic!("no metric name: {line}"));
            assert!(is_name(name), "{line}");
            match kind {
                Some("HELP") => assert!(rest.is_some_and(|h| !h.is_empty()), "{line}"),
                Some("TYPE") => {
                    assert!(matches!(rest, Some("counter" | "gauge")), "{line}");
                    assert!(typed.insert(name.to_string()), "TYPE twice: {line}");
                }
                _ => panic!("not HELP or TYPE: {line}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `name value`: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("labels not closed: {line}"));
                for pair in labels.split(',') {
                    let (label, quoted) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("not label=\"value\": {line}"));
                    assert!(is_name(label), "{line}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(is_name(name) && name.starts_with("tributary_"), "{line}");
        assert!(typed.contains(name), "a sample before its TYPE: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

fn scrape(server: &Server) -> Samples {
    let (content_type, body) = scrape_raw(server);
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "{content_type}"
    );
    parse(&body)
}

fn get(samples: &Samples, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// `series` now minus before (a series missing before counts as 0).
fn moved(before: &Samples, after: &Samples, series: &str) -> f64 {
    get(after, series) - before.get(series).copied().unwrap_or(0.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn metrics_count_what_devices_did() {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let token = server
        .add_device_with_keys("d1")
        .primary_token(unix_now() + 3600);
    let before = scrape(&server);
    assert_eq!(get(&before, "tributary_connections_open"), 0.0);
    assert_eq!(get(&before, "tributary_devices_connected"), 0.0);
    let options = |token: &str| {
        ClientOptions::new(
            server.quic_addr().parse().unwrap(),
            server.ca(),
            "d1",
            token,
        )
    };

    runtime().block_on(async {
        // A token signed with a key d1 does not have.
        let forged = sign_token("d1", &random_key(), unix_now() + 3600);
        let refused = Client::connect(options(&forged)).await;
        assert!(refused.is_err(), "a forged token was accepted");

        let client = Client::connect(options(&token)).await.unwrap();
        let mut sent_bytes = 0;
        for payload in [
            r#"[{"temp": 1}, {"temp": 2}, {"temp": 3}]"#,
            r#"{"temp": 4}"#,
            // The one bad frame: a string for a DOUBLE column.
            r#"{"temp": "hot"}"#,
        ] {
            sent_bytes += payload.len();
            client
                .send("telemetry", payload.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let outcome = client
            .send("telemetry", br#"{"temp": 5}"#.to_vec())
            .await
            .unwrap();
        assert!(
            matches!(outcome, Outcome::Acked(ref a) if a.count == 1),
            "{outcome:?}"
        );
        tokio::task::block_in_place(|| {
            server.api_expect(
                "POST",
                "/api/v1/devices/d1/commands",
                Some(&json!({"name": "reboot"})),
                201,
            )
        });
        let command = tokio::time::timeout(Duration::from_secs(10), client.next_command())
            .await
            .expect("no COMMAND within 10 s")
            .unwrap();
        assert!(command.is_some());

        let live = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(10), || {
                let s = scrape(&server);
                // The refused connection is gone once its ERROR went out.
                (get(&s, "tributary_commands{status=\"delivered\"}") == 1.0
                    && get(&s, "tributary_connections_open") == 1.0)
                    .then_some(s)
            })
        });
        assert_eq!(get(&live, "tributary_connections_open"), 1.0);
        assert_eq!(get(&live, "tributary_devices_connected"), 1.0);
        assert_eq!(
            moved(&before, &live, "tributary_connections_accepted_total"),
            2.0
        );
        assert_eq!(
            moved(&before, &live, "tributary_sessions_authenticated_total"),
            1.0
        );
        assert_eq!(
            moved(&before, &live, "tributary_authentication_failures_total"),
            1.0
        );
        assert_eq!(
            moved(&before, &live, "tributary_handshakes_failed_total"),
            0.0
        );
        assert_eq!(
            moved(&before, &live, "tributary_event_frames_accepted_total"),
            3.0
        );
        assert_eq!(moved(&before, &live, "tributary_events_stored_total"), 5.0);
        assert_eq!(
            moved(
                &before,
                &live,
                "tributary_event_frames_rejected_total{code=\"invalid_field\"}"
            ),
            1.0
        );
        assert_eq!(
            moved(&before, &live, "tributary_commands_delivered_total"),
            1.0
        );
        assert_eq!(get(&live, "tributary_commands{status=\"queued\"}"), 0.0);
        // Every EVENTS payload, plus the frames around them (HELLOs).
        let received = moved(&before, &live, "tributary_received_bytes_total");
        assert!(received > sent_bytes as f64, "{received} <= {sent_bytes}");
        for reason in ["max_connections", "connection_rate"] {
            let series = format!("tributary_connections_refused_total{{reason=\"{reason}\"}}");
            assert_eq!(moved(&before, &live, &series), 0.0, "{series}");
        }

        client.close().await;
    });

    let after = eventually(Duration::from_secs(10), || {
        let s = scrape(&server);
        (get(&s, "tributary_connections_open") == 0.0).then_some(s)
    });
    assert_eq!(get(&after, "tributary_devices_connected"), 0.0);
    assert_eq!(
        moved(
            &before,
            &after,
            "tributary_sessions_ended_total{reason=\"closed\"}"
        ),
        1.0
    );
    let ended: f64 = after
        .iter()
        .filter(|(series, _)| series.starts_with("tributary_sessions_ended_total{"))
        .map(|(series, v)| v - before.get(series).copied().unwrap_or(0.0))
        .sum();
    assert_eq!(ended, 1.0, "one session ended, once");
}

/// `tributary_consumer_lag_events`: the Parquet sink holds events until it
/// has `--flush-rows` of them, so its lag is exactly what it has not
/// written yet, and 0 once the last event fills its flush; a rule catches
/// up on its own.
#[test]
fn consumer_lag_is_what_the_sink_and_a_rule_have_not_committed() {
    let server = Server::start_with(&["--flush-interval", "1h", "--flush-rows", "5"]);
    server.cli(&["sql", STREAM]).ok();
    server.cli(&["sql", RULE]).ok();
    let token = server
        .add_device_with_keys("d1")
        .primary_token(unix_now() + 3600);
    let sink = "tributary_consumer_lag_events{stream=\"telemetry\",consumer=\"parquet\"}";
    let rule = "tributary_consumer_lag_events{stream=\"telemetry\",consumer=\"rule:hot\"}";
    // The sink says it is there before it has anything to write.
    eventually(Duration::from_secs(10), || {
        let s = scrape(&server);
        (s.get(sink) == Some(&0.0)).then_some(())
    });

    runtime().block_on(async {
        let client = Client::connect(ClientOptions::new(
            server.quic_addr().parse().unwrap(),
            server.ca(),
            "d1",
            &token,
        ))
        .await
        .unwrap();
        let send = |payload: &'static str| {
            let client = &client;
            async move {
                let outcome = client
                    .send("telemetry", payload.as_bytes().to_vec())
                    .await
                    .unwrap();
                assert!(matches!(outcome, Outcome::Acked(_)), "{outcome:?}");
            }
        };
        send(r#"[{"temp": 1}, {"temp": 2}, {"temp": 3}]"#).await;
        let waiting = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(10), || {
                let s = scrape(&server);
                (s.get(rule) == Some(&0.0)).then_some(s)
            })
        });
        assert_eq!(get(&waiting, sink), 3.0, "{waiting:#?}");
        send(r#"[{"temp": 4}, {"temp": 5}]"#).await;
        tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(10), || {
                let s = scrape(&server);
                (get(&s, sink) == 0.0 && get(&s, rule) == 0.0).then_some(())
            })
        });
        client.close().await;
    });
    // The five events are in Parquet (one file, or two if the flush
    // straddled an hour), read back by parquet's own reader.
    let rows: i64 = walk(&server.data_dir.join("storage").join("telemetry"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .map(|p| {
            let file = std::fs::File::open(&p).unwrap();
            use parquet::file::reader::FileReader;
            parquet::file::reader::SerializedFileReader::new(file)
                .unwrap()
                .metadata()
                .file_metadata()
                .num_rows()
        })
        .sum();
    assert_eq!(rows, 5);
}

/// Every file under `dir`, at any depth.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A server whose in-flight budget is smaller than one frame's decoded
/// events: sessions take turns, each frame passing alone, and every event
/// is still acknowledged and stored, once. The budget shows in `/metrics`:
/// its limit, the waits, and nothing held once the devices are done.
#[test]
fn a_tight_in_flight_budget_holds_devices_back_and_loses_nothing() {
    let server = Server::start_with(&["--max-in-flight-bytes", "256KiB"]);
    let before = scrape(&server);
    assert_eq!(get(&before, "tributary_in_flight_limit_bytes"), 262_144.0);
    assert_eq!(get(&before, "tributary_in_flight_bytes"), 0.0);
    let args: Vec<&str> = "simulate --json --devices 4 --rate 0 --duration 1500ms --batch 1000"
        .split(' ')
        .collect();
    let run = server.cli(&args).ok();
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent >= 4_000, "{summary}");
    assert_eq!(summary["acked"].as_u64(), Some(sent), "{summary}");
    assert_eq!(summary["rejected"].as_u64(), Some(0), "{summary}");
    assert_eq!(summary["lost"].as_u64(), Some(0), "{summary}");

    let after = scrape(&server);
    assert!(
        moved(&before, &after, "tributary_in_flight_waits_total") > 0.0,
        "four devices pipelining 1,000-event frames never waited for a 128 KiB half: {after:#?}"
    );
    assert_eq!(get(&after, "tributary_in_flight_bytes"), 0.0);
    let stored = server.sql_json("SELECT count(*) AS n, count(DISTINCT device_id || '/' || CAST(seq AS VARCHAR)) AS once FROM sim");
    assert_eq!(stored[0]["n"].as_u64(), Some(sent), "{stored:?}");
    assert_eq!(stored[0]["once"].as_u64(), Some(sent), "{stored:?}");
}
