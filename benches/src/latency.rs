//! Event → command latency through a filter rule, at a fixed event rate.
//!
//! [`event_to_command`] declares a stream `lat (sent_us BIGINT, hot
//! BOOLEAN)` and a rule that answers every hot event with a command to its
//! device, carrying the event's `sent_us` back as the payload:
//!
//! ```sql
//! CREATE RULE lat_hot AS INSERT INTO commands
//!   SELECT device_id, 'hot', sent_us FROM lat WHERE hot
//! ```
//!
//! It then connects `devices` devices (enrolled through an enrollment group
//! made for the run, `lat-<unix seconds>`, so nothing is registered one by
//! one; the devices are `lat<unix seconds>-NNNN`) and has them send JSON frames
//! at `rate` events/s in total for `duration`: about [`FRAMES_PER_SECOND`]
//! frames a second in all (each device one every `devices /
//! FRAMES_PER_SECOND` s, at least 1 ms apart, the timer's resolution), each
//! of `rate / FRAMES_PER_SECOND` events (5 at 10k/s, 25 at 50k/s), on a
//! fixed schedule: a frame that is late goes out at once, so the rate holds
//! on average even when a tick is missed. About [`HOT_PER_SECOND`] frames a
//! second (every tenth at that frame rate, spread over the devices) carry
//! one hot event, their first, stamped with the wall clock at send
//! (`SystemTime`, µs); the other events are `hot: false`. That keeps the
//! command volume the same at 10k and 50k events/s: 1,000 samples (the
//! least for a p99.9) in 5 s, 3,000 in 15 s.
//!
//! Why so few commands: 200/s measures the event path, not the command
//! queue's limit. The queue is one SQLite connection; at 2,000 commands/s
//! its p50 was 78–116 ms while every device's answer held the connection
//! through its fsync, and 11–40 ms once the queue fsynced outside it
//! (2026-11-29, docs/benchmarks.md). Above that, commands pile up and the
//! latency measured is the queue's backlog.
//!
//! The devices wait [`SETTLE`] after connecting (their enrollment writes to
//! the registry), then send for [`WARM_UP`] plus `duration`; only hot events
//! sent after the warm-up count.
//!
//! Each device reads its commands, records `now − sent_us` for each, and
//! acknowledges it. The latency is therefore wall clock from just before the
//! frame is written to the QUIC stream until the command has been decoded
//! by the device: gateway, log append, rule, command queue and delivery.
//! Client and server share the machine, so they share its clock.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tributary_ingest::client::{Client, ClientOptions, Outcome};

use crate::queries::{api_json, sql};

/// Hot events (so commands) per second across all devices, about: well
/// under what the command queue sustains (see above).
pub const HOT_PER_SECOND: u64 = 200;

/// After the devices connected (and enrolled), before the first frame.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Sending before measuring: the hot events of this first second are not
/// counted (nor their commands).
pub const WARM_UP: Duration = Duration::from_secs(1);

/// Frames per second across all devices, at most.
pub const FRAMES_PER_SECOND: u64 = 2_000;

/// The stream and rule this bench declares.
const STREAM: &str = "lat";
const RULE: &str = "lat_hot";
/// The enrollment groups the devices enroll through are named this and the
/// run's start (Unix seconds), and so are the devices: the API does not show
/// an existing group's key again, so each run makes its own.
const GROUP: &str = "lat";

/// What to measure against which server.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// The server's QUIC address.
    pub quic: SocketAddr,
    /// The CA certificate the server's certificate is signed by.
    pub ca: PathBuf,
    /// The HTTP API, `host:port`.
    pub api: String,
    pub admin_token: String,
    /// Events per second, all devices together.
    pub rate: u64,
    /// How long to send for.
    pub duration: Duration,
    pub devices: usize,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct LatencyResult {
    /// The requested rate (events/s).
    pub rate: u64,
    /// Events written to the connections (warm-up included).
    pub sent_events: u64,
    /// Events the server acknowledged.
    pub acked_events: u64,
    /// Events in frames the server rejected.
    pub rejected_events: u64,
    /// Frames whose send or acknowledgement failed (connection errors).
    pub errors: u64,
    /// The first rejection or error, if any.
    pub first_error: Option<String>,
    /// The rate achieved: acknowledged events over the sending time
    /// (warm-up included).
    pub achieved_rate: f64,
    /// Hot events after the warm-up the server acknowledged, so commands the
    /// rule owes.
    pub commands_expected: u64,
    /// Commands of this run received (each counted once, by id).
    pub commands_received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Where the time went, from the command queue's own timestamps (see
    /// [`stages`]); empty when the queue could not be read.
    pub stages: Vec<Stage>,
}

/// One leg of the way from event to command, over the measured commands.
/// The queue keeps milliseconds, so each leg is good to about 1 ms.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Counters shared by every device task.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    hot_acked: AtomicU64,
    received: AtomicU64,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Declares the stream and the rule if they are missing, and a new
/// enrollment group `group_name`; returns the group's primary key.
fn prepare(o: &LatencyOptions, group_name: &str) -> Result<String, String> {
    sql(
        &o.api,
        &o.admin_token,
        &format!("CREATE STREAM IF NOT EXISTS {STREAM} (sent_us BIGINT, hot BOOLEAN)"),
    )?;
    // CREATE OR REPLACE: the rule's text is ours, and replacing it keeps a
    // rerun from failing on "already exists".
    sql(
        &o.api,
        &o.admin_token,
        &format!(
            "CREATE OR REPLACE RULE {RULE} AS INSERT INTO commands \
             SELECT device_id, 'hot', sent_us FROM {STREAM} WHERE hot"
        ),
    )?;
    let (status, group) = api_json(
        &o.api,
        &o.admin_token,
        "POST",
        "/api/v1/enrollment-groups",
        Some(&json!({ "name": group_name })),
    )?;
    if status != 201 {
        return Err(format!(
            "creating enrollment group {group_name}: {status} {group}"
        ));
    }
    group["primary_key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("enrollment group {group_name} has no primary_key: {group}"))
}

/// One run: `o.rate` events/s from `o.devices` devices for [`WARM_UP`] +
/// `o.duration` (after connecting and [`SETTLE`]), then up to 3 s for the
/// last commands; about [`HOT_PER_SECOND`] × `duration` samples. Call it
/// inside a tokio runtime (it uses `spawn_blocking` for the HTTP calls).
pub async fn event_to_command(o: &LatencyOptions) -> Result<LatencyResult, String> {
    if o.devices == 0 || o.rate == 0 {
        return Err("devices and rate must be above zero".into());
    }
    let run = tributary_tests::unix_now();
    let group_name = format!("{GROUP}-{run}");
    let setup = o.clone();
    let name = group_name.clone();
    let group_key = tokio::task::spawn_blocking(move || prepare(&setup, &name))
        .await
        .map_err(|e| e.to_string())??;

    // Per device: a frame of k events every `interval`. At most
    // FRAMES_PER_SECOND frames in all (and a frame per device per ms, the
    // timer's resolution), so the rate is reached with frames of several
    // events (5 at 10k/s, 25 at 50k/s) rather than a frame per event.
    let frames_total = (o.rate as f64).min(FRAMES_PER_SECOND as f64);
    let per_device_frames = (frames_total / o.devices as f64).min(1000.0);
    let k = (o.rate as f64 / (o.devices as f64 * per_device_frames))
        .ceil()
        .max(1.0) as usize;
    let interval = Duration::from_secs_f64(k as f64 * o.devices as f64 / o.rate as f64);
    let frames_per_s = o.rate as f64 / k as f64;
    // Every `hot_every`-th frame of a device carries a hot event.
    let hot_every = ((frames_per_s / HOT_PER_SECOND as f64).round() as u64).max(1);

    let expires = tributary_tests::unix_now() + 86_400;
    let mut clients = Vec::with_capacity(o.devices);
    for i in 0..o.devices {
        let id = format!("{GROUP}{run}-{i:04}");
        let key = tributary_tests::derive_device_key(&group_key, &id);
        let token = tributary_tests::sign_token(&id, &key, expires);
        let options =
            ClientOptions::new(o.quic, o.ca.clone(), id.clone(), token).with_group(&group_name);
        let client = Client::connect(options)
            .await
            .map_err(|e| format!("connecting {id}: {e}"))?;
        clients.push(Arc::new(client));
    }

    let tally = Arc::new(Tally::default());
    // (command id, sent µs, received µs) of each measured command.
    let latencies = Arc::new(Mutex::new(Vec::<(String, i64, i64)>::new()));
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    // Freshly enrolled devices: let the registry's writes settle, then send
    // for WARM_UP without measuring, then for `duration`.
    tokio::time::sleep(SETTLE).await;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + WARM_UP + o.duration;
    // Hot events stamped before this are the warm-up's.
    let measure_from_us = now_us() + (WARM_UP + Duration::from_millis(50)).as_micros() as i64;

    // Command readers: one per device, until told to stop.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for client in &clients {
        let client = client.clone();
        let tally = tally.clone();
        let latencies = latencies.clone();
        let seen = seen.clone();
        let mut stop = stop_rx.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let command = tokio::select! {
                    _ = stop.changed() => break,
                    c = client.next_command() => c,
                };
                let Ok(Some(command)) = command else { break };
                let received = now_us();
                let _ = client.ack_command(&command.id).await;
                let Some(sent) = command.payload.as_i64() else {
                    continue;
                };
                if sent < measure_from_us || !seen.lock().await.insert(command.id.clone()) {
                    continue;
                }
                tally.received.fetch_add(1, Ordering::Relaxed);
                latencies.lock().await.push((command.id, sent, received));
            }
        }));
    }

    // Senders: frames on a fixed schedule; acknowledgements awaited in
    // order by a second task per device, at most 4096 frames in flight.
    let mut senders = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        let tally = tally.clone();
        let first_error = first_error.clone();
        // Spread the devices' frames over the interval.
        let offset = interval.mul_f64(i as f64 / o.devices as f64);
        // Stagger hot frames across devices too.
        let hot_phase = i as u64 % hot_every;
        senders.push(tokio::spawn(async move {
            type Pending = (
                usize,
                bool,
                std::pin::Pin<Box<dyn Future<Output = tributary_ingest::Result<Outcome>> + Send>>,
            );
            let (tx, mut rx) = mpsc::channel::<Pending>(4096);
            let acks = {
                let tally = tally.clone();
                let first_error = first_error.clone();
                tokio::spawn(async move {
                    while let Some((n, counted, pending)) = rx.recv().await {
                        match pending.await {
                            Ok(Outcome::Acked(_)) => {
                                tally.acked.fetch_add(n as u64, Ordering::Relaxed);
                                if counted {
                                    tally.hot_acked.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(Outcome::Rejected(r)) => {
                                tally.rejected.fetch_add(n as u64, Ordering::Relaxed);
                                note(&first_error, format!("rejected: {}", r.message));
                            }
                            Err(e) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                                note(&first_error, e.to_string());
                            }
                        }
                    }
                })
            };
            let cold = "{\"sent_us\":0,\"hot\":false}";
            let mut next = start + offset;
            let mut frame_no = 0u64;
            let mut body = String::with_capacity(k * 32);
            while next < end {
                tokio::time::sleep_until(next).await;
                let hot = frame_no % hot_every == hot_phase;
                // A hot event after the warm-up: its command is owed.
                let mut counted = false;
                body.clear();
                body.push('[');
                for j in 0..k {
                    if j > 0 {
                        body.push(',');
                    }
                    if hot && j == 0 {
                        let sent = now_us();
                        counted = sent >= measure_from_us;
                        body.push_str(&format!("{{\"sent_us\":{sent},\"hot\":true}}"));
                    } else {
                        body.push_str(cold);
                    }
                }
                body.push(']');
                match client
                    .submit(STREAM, Bytes::copy_from_slice(body.as_bytes()))
                    .await
                {
                    Ok(pending) => {
                        tally.sent.fetch_add(k as u64, Ordering::Relaxed);
                        if tx.send((k, counted, Box::pin(pending))).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        note(&first_error, e.to_string());
                        break;
                    }
                }
                frame_no += 1;
                next += interval;
            }
            drop(tx);
            let _ = acks.await;
        }));
    }
    for s in senders {
        let _ = s.await;
    }
    let sending = start.elapsed().max(WARM_UP + o.duration);

    // The last commands: until every hot event's command came, at most 3 s.
    let expected = tally.hot_acked.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tally.received.load(Ordering::Relaxed) < expected
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }

    let samples = std::mem::take(&mut *latencies.lock().await);
    let mut v: Vec<f64> = samples
        .iter()
        .map(|(_, sent, received)| (received - sent) as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    let query = o.clone();
    let prefix = format!("{GROUP}{run}-");
    let stages = tokio::task::spawn_blocking(move || stages(&query, &prefix, &samples))
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|e| {
            eprintln!("latency: no breakdown by stage: {e}");
            Vec::new()
        });
    let acked = tally.acked.load(Ordering::Relaxed);
    let first_error = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(LatencyResult {
        rate: o.rate,
        sent_events: tally.sent.load(Ordering::Relaxed),
        acked_events: acked,
        rejected_events: tally.rejected.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        first_error,
        achieved_rate: acked as f64 / sending.as_secs_f64(),
        commands_expected: expected,
        commands_received: tally.received.load(Ordering::Relaxed),
        p50_ms: quantile(&v, 0.5),
        p99_ms: quantile(&v, 0.99),
        p999_ms: quantile(&v, 0.999),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
        stages,
    })
}

/// Splits each measured command's time in three by the queue's timestamps
/// (`created_at`, taken as the rule queues it; `delivered_at`, taken as
/// the device's session reads the queue, before it marks the command
/// delivered and sends it):
/// - `event → queued`: the frame's way through the gateway, the log (its
///   fsync), and the rule;
/// - `queued → delivering`: the queue's insert (its fsync) and the wake-up
///   of the device's session;
/// - `delivering → device`: reading the queue, marking the command
///   delivered, the frame's way to the device.
fn stages(
    o: &LatencyOptions,
    device_prefix: &str,
    samples: &[(String, i64, i64)],
) -> Result<Vec<Stage>, String> {
    let answer = sql(
        &o.api,
        &o.admin_token,
        &format!(
            "SELECT id, CAST(created_at AS BIGINT) AS created, \
             CAST(delivered_at AS BIGINT) AS delivered FROM commands \
             WHERE name = 'hot' AND starts_with(device_id, '{device_prefix}')"
        ),
    )?;
    let mut times = std::collections::HashMap::new();
    for row in answer["rows"].as_array().into_iter().flatten() {
        if let (Some(id), Some(created), Some(delivered)) = (
            row["id"].as_str(),
            row["created"].as_i64(),
            row["delivered"].as_i64(),
        ) {
            // Milliseconds, cut: the middle of each is the best guess.
            times.insert(
                id.to_string(),
                (created * 1000 + 500, delivered * 1000 + 500),
            );
        }
    }
    let mut legs: [Vec<f64>; 3] = Default::default();
    for (id, sent, received) in samples {
        let Some(&(created, delivered)) = times.get(id) else {
            continue;
        };
        for (leg, (from, to)) in legs.iter_mut().zip([
            (*sent, created),
            (created, delivered),
            (delivered, *received),
        ]) {
            leg.push((to - from) as f64 / 1000.0);
        }
    }
    if legs[0].is_empty() {
        return Err(format!(
            "none of the {} commands is in the commands table",
            samples.len()
        ));
    }
    let names = [
        "event → queued",
        "queued → delivering",
        "delivering → device",
    ];
    Ok(names
        .into_iter()
        .zip(legs)
        .map(|(name, mut leg)| {
            leg.sort_by(f64::total_cmp);
            Stage {
                name,
                p50_ms: quantile(&leg, 0.5),
                p99_ms: quantile(&leg, 0.99),
                max_ms: leg.last().copied().unwrap_or(f64::NAN),
            }
        })
        .collect())
}

fn note(first: &std::sync::Mutex<Option<String>>, e: String) {
    first
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(e);
}

impl LatencyResult {
    /// The result as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "rate": self.rate,
            "sent_events": self.sent_events,
            "acked_events": self.acked_events,
            "rejected_events": self.rejected_events,
            "errors": self.errors,
            "first_error": self.first_error,
            "achieved_rate": self.achieved_rate,
            "commands_expected": self.commands_expected,
            "commands_received": self.commands_received,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
            "stages": self.stages.iter().map(|s| json!({
                "stage": s.name,
                "p50_ms": s.p50_ms,
                "p99_ms": s.p99_ms,
                "max_ms": s.max_ms,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a running server: `TRIBUTARY_BENCH_DATA=<data dir>
    /// [TRIBUTARY_BENCH_RATE=10000] cargo test -p tributary-benches --lib --
    /// --ignored --nocapture latency`.
    #[test]
    #[ignore = "needs a running server"]
    fn latency_against_a_running_server() {
        let data = PathBuf::from(std::env::var("TRIBUTARY_BENCH_DATA").expect("the data dir"));
        let info: Value =
            serde_json::from_slice(&std::fs::read(data.join("server.json")).expect("server.json"))
                .expect("JSON");
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let o = LatencyOptions {
            quic: info["quic"]
                .as_str()
                .expect("quic")
                .parse()
                .expect("an address"),
            ca: data.join("tls/ca.pem"),
            api: info["http"].as_str().expect("http").to_string(),
            admin_token: std::fs::read_to_string(data.join("admin.token"))
                .expect("admin.token")
                .trim()
                .to_string(),
            rate: env("TRIBUTARY_BENCH_RATE", 10_000),
            duration: Duration::from_secs(env("TRIBUTARY_BENCH_SECONDS", 5)),
            devices: env("TRIBUTARY_BENCH_DEVICES", 10) as usize,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let r = runtime
            .block_on(event_to_command(&o))
            .expect("the measurement");
        println!("{}", r.to_json());
    }
}
