//! `tributary simulate`: a fleet of simulated devices, each on its own QUIC
//! connection, sending telemetry at a set rate, with a live progress line
//! and a summary of what the server acknowledged and how fast.
//!
//! Every device runs an idempotent session (docs/protocol.md, section 7):
//! its frames are numbered from the simulator's start time in microseconds,
//! and a frame that was not acknowledged (the connection broke, the server
//! restarted, it answered `unavailable` or `rate_limited`) is sent again
//! with its number, so each event is stored exactly once. That makes the
//! simulator a driver for crash tests: `acked` is what the server holds.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::ipc::writer::{
    DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions, write_message,
};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tributary_ingest::Error as IngestError;
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::{Encoding, ErrorCode, RejectCode};

use crate::ApiArgs;
use crate::client::{Api, quic_server};
use crate::datadir::DataDir;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// How many devices, each on its own connection.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Events per second from all devices together; 0 sends as fast as the
    /// server acknowledges.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to send, like `10s`, `500ms` or `2m`; then the simulator
    /// waits for the answers to what it sent.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Events per frame.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// The stream to send to; created with the simulator's columns if it
    /// does not exist.
    #[arg(long, default_value = "sim")]
    pub stream: String,
    /// Seeds the telemetry: the same seed gives the same values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The payload encoding: JSON lines, or one Arrow IPC stream per frame.
    #[arg(long, value_enum, default_value_t = PayloadEncoding::Json)]
    pub encoding: PayloadEncoding,
    /// Frames each device keeps in flight before it waits for an answer.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Device ids are this prefix and a number from 0.
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// How long to keep resending unanswered frames after --duration
    /// before counting them as lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain: Duration,
    /// The QUIC address (default: from <data-dir>/server.json, else 127.0.0.1:7700).
    #[arg(long, env = "TRIBUTARY_SERVER")]
    pub quic: Option<String>,
    /// The CA certificate to trust (default: <data-dir>/tls/ca.pem).
    #[arg(long, env = "TRIBUTARY_CA")]
    pub ca: Option<PathBuf>,
    /// The name on the server's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print this many events of each device as JSON lines, device after
    /// device, the way the simulator sends them (event times 1 ms apart,
    /// from now), and exit without a server: the same telemetry for
    /// another system.
    #[arg(long, value_name = "EVENTS")]
    pub emit: Option<u64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    Json,
    Arrow,
}

impl PayloadEncoding {
    fn name(self) -> &'static str {
        match self {
            PayloadEncoding::Json => "json",
            PayloadEncoding::Arrow => "arrow",
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let ms = tributary_engine::duration::parse_duration(text)?;
    Ok(Duration::from_millis(ms.max(0) as u64))
}

/// The columns the simulator sends, beside `device_id`, `ts` and `received_at`.
const COLUMNS: [(&str, &str); 4] = [
    ("seq", "BIGINT"),
    ("temperature", "DOUBLE"),
    ("humidity", "DOUBLE"),
    ("status", "VARCHAR"),
];

pub async fn run(args: SimulateArgs) -> Result<ExitCode> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.window == 0 {
        bail!("--window must be at least 1");
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        bail!("--rate must be a number of events per second, 0 for as fast as acknowledged");
    }
    if let Some(events) = args.emit {
        emit(&args, events)?;
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::new(!args.json && std::io::stderr().is_terminal());
    let api = Api::resolve(&args.api)?;
    ensure_stream(&api, &args.stream).await?;
    let ids: Vec<String> = (0..args.devices)
        .map(|i| format!("{}{i}", args.prefix))
        .collect();
    let tokens = provision(&api, &ids, &progress).await?;
    let (connect, follow) = connect_options(&args)?;

    let counters = Arc::new(Counters::default());
    let plan = Arc::new(Plan::new(&args));
    let start = Arc::new(StartLine::new(args.devices));
    let mut tasks = Vec::with_capacity(ids.len());
    for (index, (id, token)) in ids.into_iter().zip(tokens).enumerate() {
        let mut options = connect.clone();
        options.device_id = id;
        options.token = token;
        let device = SimDevice::new(
            index,
            options,
            follow.clone(),
            plan.clone(),
            counters.clone(),
        );
        tasks.push(tokio::spawn(device.run(start.clone())));
    }
    // Every device connects first; the clock of --duration starts once all
    // are connected (or have given up), so connecting a large fleet does
    // not eat into it.
    let connecting = progress.enabled.then(|| {
        let counters = counters.clone();
        let devices = args.devices;
        tokio::spawn(async move { show_connecting(counters, devices).await })
    });
    start.all_ready().await;
    if let Some(t) = connecting {
        t.abort();
    }
    let started = start.go();
    let ticker = progress.enabled.then(|| {
        let counters = counters.clone();
        let devices = args.devices;
        tokio::spawn(async move { show_progress(counters, started, devices).await })
    });
    let mut totals = DeviceStats::default();
    let mut first_error: Option<String> = None;
    for task in tasks {
        let stats = task
            .await
            .context("a simulated device stopped unexpectedly")?;
        if first_error.is_none() {
            first_error = stats.error.clone();
        }
        totals.merge(stats);
    }
    let elapsed = started.elapsed();
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    let summary = Summary::new(&args, &totals, elapsed);
    if args.json {
        println!("{}", summary.to_json());
    } else {
        summary.print();
    }
    if let Some(e) = &first_error {
        eprintln!("error: {e}");
    }
    Ok(if summary.all_acked() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `--emit`: each device's telemetry as JSON lines on stdout.
fn emit(args: &SimulateArgs, events: u64) -> Result<()> {
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for device in 0..args.devices as u64 {
        let mut telemetry = Telemetry::new(args.seed, device);
        for seq in 0..events as i64 {
            let ts = start + seq;
            let line = json_lines(ts, &[telemetry.reading(ts, seq)]);
            out.write_all(&line)
                .context("writing the events to stdout")?;
        }
    }
    out.flush().context("writing the events to stdout")?;
    Ok(())
}

/// Creates the stream if it is missing, and checks that it has the
/// simulator's columns with their types.
async fn ensure_stream(api: &Api, stream: &str) -> Result<()> {
    let columns = COLUMNS
        .iter()
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect::<Vec<_>>()
        .join(", ");
    if !is_identifier(stream) {
        bail!("--stream '{stream}' must be a plain name (letters, digits and _)");
    }
    api.sql(&format!("CREATE STREAM IF NOT EXISTS {stream} ({columns})"))
        .await
        .with_context(|| format!("creating the stream '{stream}'"))?;
    let (_, batches) = api
        .sql(&format!("DESCRIBE {stream}"))
        .await
        .with_context(|| format!("describing the stream '{stream}'"))?;
    let mut found = BTreeMap::new();
    for batch in &batches {
        let names = string_column(batch, 0)?;
        let types = string_column(batch, 1)?;
        for (name, ty) in names.iter().zip(types.iter()) {
            if let (Some(name), Some(ty)) = (name, ty) {
                found.insert(name.to_string(), ty.to_ascii_uppercase());
            }
        }
    }
    for (name, ty) in COLUMNS {
        match found.get(name) {
            Some(t) if t == ty => {}
            Some(t) => bail!(
                "the stream '{stream}' has column '{name}' as {t}, but the simulator sends {ty}; \
                 pick another --stream"
            ),
            None => bail!(
                "the stream '{stream}' has no column '{name}' ({ty}), which the simulator sends; \
                 pick another --stream"
            ),
        }
    }
    Ok(())
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn string_column(batch: &RecordBatch, index: usize) -> Result<&StringArray> {
    batch
        .columns()
        .get(index)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| anyhow!("the server's DESCRIBE answer has an unexpected shape"))
}

/// How many HTTP requests provisioning keeps in flight.
const PROVISION_PARALLEL: usize = 16;
/// Devices per import request.
const IMPORT_CHUNK: usize = 10_000;

/// Makes sure every device exists and returns a token for each: missing
/// devices are imported in bulk (their tokens come back with them); for
/// those that exist a fresh token is issued.
async fn provision(api: &Api, ids: &[String], progress: &Progress) -> Result<Vec<String>> {
    let mut tokens: Vec<Option<String>> = vec![None; ids.len()];
    let mut existing = Vec::new();
    for (chunk_index, chunk) in ids.chunks(IMPORT_CHUNK).enumerate() {
        let base = chunk_index * IMPORT_CHUNK;
        let mut body = String::new();
        for (i, id) in chunk.iter().enumerate() {
            let site = format!("site-{}", (base + i) % 10);
            body.push_str(
                &json!({"id": id, "tags": {"simulated": "true", "site": site}}).to_string(),
            );
            body.push('\n');
        }
        let answer = api
            .post_bytes("/devices/import", "application/x-ndjson", body.into_bytes())
            .await
            .context("provisioning the simulated devices")?;
        let results = answer
            .get("results")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("the server's import answer has no results"))?;
        for (i, row) in results.iter().enumerate() {
            let Some(slot) = tokens.get_mut(base + i) else {
                break;
            };
            if let Some(token) = row.get("token").and_then(Value::as_str) {
                *slot = Some(token.to_string());
                continue;
            }
            let code = row
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("");
            if code == "already_exists" {
                existing.push(base + i);
            } else {
                let message = row
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                bail!("cannot create the device '{}': {message}", ids[base + i]);
            }
        }
        progress.note(&format!(
            "provisioned {} of {} devices",
            base + chunk.len(),
            ids.len()
        ));
    }
    let issued: Vec<(usize, Result<String>)> = futures::stream::iter(existing)
        .map(|index| async move {
            let id = &ids[index];
            let token = api
                .post(&format!("/devices/{id}/token"), &json!({}))
                .await
                .with_context(|| format!("issuing a token for the device '{id}'"))
                .and_then(|v| {
                    v.get("token")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("the server issued no token for '{id}'"))
                });
            (index, token)
        })
        .buffer_unordered(PROVISION_PARALLEL)
        .collect()
        .await;
    for (index, token) in issued {
        tokens[index] = Some(token?);
    }
    tokens
        .into_iter()
        .zip(ids)
        .map(|(t, id)| t.ok_or_else(|| anyhow!("no token for the device '{id}'")))
        .collect()
}

/// The connection settings every device shares (its id and token are
/// filled in per device), and, when the QUIC address comes from the data
/// directory, that directory: devices read it again before they reconnect,
/// so they follow a server that restarted on other ports.
fn connect_options(args: &SimulateArgs) -> Result<(ClientOptions, Option<Arc<DataDir>>)> {
    let (server, ca) = quic_server(&args.api.data_dir, args.quic.as_deref(), args.ca.as_deref())?;
    let follow = args
        .quic
        .is_none()
        .then(|| Arc::new(DataDir::new(&args.api.data_dir)));
    let mut options = ClientOptions::new(server, ca, "", "");
    options.server_name = args.server_name.clone();
    options.commands = false;
    options.idempotent = true;
    Ok((options, follow))
}

/// What every device needs to know about the run.
struct Plan {
    stream: String,
    batch: usize,
    window: usize,
    encoding: PayloadEncoding,
    seed: u64,
    devices: usize,
    /// Time between two frames of one device; `None` for as fast as acknowledged.
    interval: Option<Duration>,
    /// How long devices make new frames, from the start.
    duration: Duration,
    /// How long after that they keep resending unanswered frames.
    drain: Duration,
    /// Frame numbers start above this (the start time in microseconds), so
    /// that a later run never reuses a number an earlier one stored.
    seq_base: u64,
    arrow: ArrowFrames,
}

impl Plan {
    fn new(args: &SimulateArgs) -> Plan {
        let per_device = args.rate / args.devices as f64;
        let interval = (args.rate > 0.0)
            .then(|| Duration::from_secs_f64((args.batch as f64 / per_device).min(3600.0)));
        let seq_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Plan {
            stream: args.stream.clone(),
            batch: args.batch,
            window: args.window,
            encoding: args.encoding,
            seed: args.seed,
            devices: args.devices,
            interval,
            duration: args.duration,
            drain: args.drain,
            seq_base,
            arrow: ArrowFrames::new(payload_schema()),
        }
    }
}

/// The Arrow schema of the simulator's payloads: `ts` and its columns.
fn payload_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("seq", DataType::Int64, false),
        Field::new("temperature", DataType::Float64, false),
        Field::new("humidity", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
    ]))
}

/// Live totals for the progress line.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    connected: AtomicU64,
}

/// What one device did.
#[derive(Default)]
struct DeviceStats {
    /// Events sent at least once.
    sent: u64,
    acked: u64,
    rejected: u64,
    /// Events sent again (after a refusal or a lost connection).
    retried: u64,
    frames: u64,
    reconnects: u64,
    /// Connection attempts that failed.
    connect_failures: u64,
    rejections: BTreeMap<String, u64>,
    latency: Histogram,
    /// Devices that gave up (the server refused their connection for good).
    gave_up: u64,
    /// The first problem worth a line: why a device gave up, or a rejection.
    error: Option<String>,
}

impl DeviceStats {
    fn merge(&mut self, other: DeviceStats) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.rejected += other.rejected;
        self.retried += other.retried;
        self.frames += other.frames;
        self.reconnects += other.reconnects;
        self.connect_failures += other.connect_failures;
        self.gave_up += other.gave_up;
        for (code, n) in other.rejections {
            *self.rejections.entry(code).or_default() += n;
        }
        self.latency.merge(&other.latency);
        if other.error.is_some() {
            self.error = self.error.take().or(other.error);
        }
    }
}

/// One frame of events, kept until the server answers it.
struct SimFrame {
    seq: u64,
    payload: Bytes,
    events: u64,
    first_sent: Instant,
}

type Answer = Pin<Box<dyn Future<Output = tributary_ingest::Result<Outcome>> + Send>>;

/// One simulated device.
struct SimDevice {
    options: ClientOptions,
    /// Where to read the server's current QUIC address before reconnecting.
    follow: Option<Arc<DataDir>>,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    telemetry: Telemetry,
    next_event: i64,
    next_frame: u64,
    stats: DeviceStats,
    /// When the device stops making new frames.
    stop_at: Instant,
    /// When it gives up on frames still unanswered.
    give_up_at: Instant,
}

/// How long a device keeps trying to connect before the run starts.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// Holds the devices until every one has connected (or given up), then
/// starts them together.
struct StartLine {
    waiting: std::sync::atomic::AtomicUsize,
    everyone: tokio::sync::Notify,
    at: tokio::sync::watch::Sender<Option<Instant>>,
}

impl StartLine {
    fn new(devices: usize) -> StartLine {
        StartLine {
            waiting: devices.into(),
            everyone: tokio::sync::Notify::new(),
            at: tokio::sync::watch::Sender::new(None),
        }
    }

    /// A device is ready; returns when the run starts, with its start.
    async fn ready(&self) -> Instant {
        let mut at = self.at.subscribe();
        if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.everyone.notify_one();
        }
        match at.wait_for(Option::is_some).await {
            Ok(start) => start.unwrap_or_else(Instant::now),
            // The sender lives as long as the run.
            Err(_) => Instant::now(),
        }
    }

    async fn all_ready(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.everyone.notified().await;
        }
    }

    /// Starts the run now.
    fn go(&self) -> Instant {
        let now = Instant::now();
        self.at.send_replace(Some(now));
        now
    }
}

/// What ended a connection, for the device's loop.
enum Broken {
    /// Try again on a new connection.
    Retry(String),
    /// The server will not take this device (its token, say).
    Fatal(String),
}

impl SimDevice {
    fn new(
        index: usize,
        options: ClientOptions,
        follow: Option<Arc<DataDir>>,
        plan: Arc<Plan>,
        counters: Arc<Counters>,
    ) -> Self {
        let telemetry = Telemetry::new(plan.seed, index as u64);
        SimDevice {
            options,
            follow,
            plan,
            counters,
            telemetry,
            next_event: 0,
            next_frame: 0,
            stats: DeviceStats::default(),
            stop_at: Instant::now(),
            give_up_at: Instant::now(),
        }
    }

    /// Connects before the run starts, trying for [`CONNECT_PATIENCE`].
    async fn connect_first(&mut self, last_problem: &mut String) -> Option<Client> {
        let patience = Instant::now() + CONNECT_PATIENCE;
        let (mut attempts, mut backoff) = (0, Duration::from_millis(50));
        while Instant::now() < patience {
            match self
                .reconnect(&mut attempts, &mut backoff, last_problem)
                .await
            {
                Ok(Some(client)) => return Some(client),
                Ok(None) => {}
                Err(()) => return None,
            }
        }
        None
    }

    async fn run(mut self, start: Arc<StartLine>) -> DeviceStats {
        let mut last_problem = String::new();
        let mut first = self.connect_first(&mut last_problem).await;
        if first.is_some() {
            self.counters.connected.fetch_add(1, Ordering::Relaxed);
        }
        let started = start.ready().await;
        if first.is_some() {
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if self.stats.gave_up > 0 {
            return self.stats;
        }
        self.stop_at = started + self.plan.duration;
        self.give_up_at = self.stop_at + self.plan.drain;
        // Frames sent but not answered, in the order of their numbers.
        let mut unanswered: VecDeque<SimFrame> = VecDeque::new();
        let mut backoff = Duration::from_millis(50);
        // Spread the devices' first frames over one interval.
        let mut next_at = started
            + self
                .plan
                .interval
                .map(|i| i.mul_f64(self.index_fraction()))
                .unwrap_or_default();
        let mut connected_once = false;
        let mut attempts = 1u64;
        loop {
            let now = Instant::now();
            let done_sending = now >= self.stop_at;
            if (done_sending && unanswered.is_empty()) || now >= self.give_up_at {
                break;
            }
            let client = match first.take() {
                Some(client) => client,
                None => match self
                    .reconnect(&mut attempts, &mut backoff, &mut last_problem)
                    .await
                {
                    Ok(Some(client)) => client,
                    Ok(None) => continue,
                    Err(()) => break,
                },
            };
            backoff = Duration::from_millis(50);
            if connected_once {
                self.stats.reconnects += 1;
            }
            connected_once = true;
            self.counters.connected.fetch_add(1, Ordering::Relaxed);
            let result = self.session(&client, &mut unanswered, &mut next_at).await;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    client.close().await;
                    break;
                }
                Err(Broken::Retry(reason)) => {
                    last_problem = reason;
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                }
                Err(Broken::Fatal(reason)) => {
                    self.give_up(reason);
                    break;
                }
            }
        }
        let lost: u64 = unanswered.iter().map(|f| f.events).sum();
        if lost > 0 && self.stats.error.is_none() {
            self.stats.error = Some(format!(
                "device '{}': {lost} events were never acknowledged (last problem: {})",
                self.options.device_id,
                if last_problem.is_empty() {
                    "none seen"
                } else {
                    &last_problem
                }
            ));
        }
        self.stats
    }

    /// One attempt to connect again: `Ok(None)` after a failure worth
    /// retrying (having waited), `Err` when the device must stop.
    async fn reconnect(
        &mut self,
        attempts: &mut u64,
        backoff: &mut Duration,
        last_problem: &mut String,
    ) -> Result<Option<Client>, ()> {
        // A restarted server may listen elsewhere now.
        if *attempts > 0
            && let Some(quic) = self
                .follow
                .as_ref()
                .and_then(|dir| dir.read_server_info())
                .map(|info| info.quic)
        {
            self.options.server = quic;
        }
        *attempts += 1;
        match Client::connect(self.options.clone()).await {
            Ok(client) => Ok(Some(client)),
            Err(e) => {
                self.stats.connect_failures += 1;
                if let Some(reason) = fatal_reason(&e) {
                    self.give_up(reason);
                    return Err(());
                }
                *last_problem = e.to_string();
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(Duration::from_secs(2));
                Ok(None)
            }
        }
    }

    fn index_fraction(&self) -> f64 {
        let index = self.telemetry.index as f64;
        index / self.plan.devices as f64
    }

    fn give_up(&mut self, reason: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.gave_up += 1;
        self.stats.error = Some(format!("device '{}': {reason}", self.options.device_id));
    }

    /// Sends on one connection until the run is over (Ok) or the
    /// connection breaks. Frames still unanswered stay in `unanswered` for
    /// the next connection.
    async fn session(
        &mut self,
        client: &Client,
        unanswered: &mut VecDeque<SimFrame>,
        next_at: &mut Instant,
    ) -> Result<(), Broken> {
        let mut in_flight: VecDeque<(u64, Answer)> = VecDeque::new();
        // Whatever the last connection left unanswered goes first, in order.
        for frame in unanswered.iter() {
            self.stats.retried += frame.events;
            in_flight.push_back((frame.seq, self.submit(client, frame).await?));
        }
        loop {
            let now = Instant::now();
            if now >= self.give_up_at {
                return Ok(());
            }
            let sending = now < self.stop_at;
            if !sending && in_flight.is_empty() {
                return Ok(());
            }
            let room = in_flight.len() < self.plan.window;
            let due = match self.plan.interval {
                None => true,
                Some(_) => now >= *next_at,
            };
            if sending && room && due {
                let frame = self.make_frame();
                self.stats.sent += frame.events;
                self.stats.frames += 1;
                self.counters
                    .sent
                    .fetch_add(frame.events, Ordering::Relaxed);
                let answer = self.submit(client, &frame).await?;
                in_flight.push_back((frame.seq, answer));
                unanswered.push_back(frame);
                if let Some(interval) = self.plan.interval {
                    *next_at += interval;
                    // Far behind (the server is slower than the rate):
                    // send as fast as it answers, without a burst to catch up.
                    if *next_at + Duration::from_secs(1) < now {
                        *next_at = now;
                    }
                }
                continue;
            }
            let wake = if sending && room {
                Some(*next_at)
            } else {
                None
            };
            let Some((seq, answer)) = in_flight.front_mut() else {
                // Nothing in flight and not yet time for the next frame.
                sleep_until(wake.unwrap_or(self.stop_at).min(self.stop_at)).await;
                continue;
            };
            let seq = *seq;
            let outcome = tokio::select! {
                outcome = answer => outcome,
                _ = sleep_until(wake.unwrap_or(self.give_up_at)) => continue,
                _ = sleep_until(self.give_up_at) => return Ok(()),
            };
            in_flight.pop_front();
            let outcome = outcome.map_err(|e| broken(&e))?;
            let Some(position) = unanswered.iter().position(|f| f.seq == seq) else {
                continue;
            };
            match outcome {
                Outcome::Acked(_) => {
                    // A count of 0 is a resend of a frame stored before:
                    // its events are stored all the same.
                    let Some(frame) = unanswered.remove(position) else {
                        continue;
                    };
                    self.stats.acked += frame.events;
                    self.counters
                        .acked
                        .fetch_add(frame.events, Ordering::Relaxed);
                    self.stats.latency.record(frame.first_sent.elapsed());
                }
                Outcome::Rejected(r)
                    if matches!(r.code, RejectCode::Unavailable | RejectCode::RateLimited) =>
                {
                    let wait = r
                        .retry_after_ms
                        .map(Duration::from_millis)
                        .unwrap_or(Duration::from_millis(20))
                        .min(Duration::from_secs(10));
                    sleep_until((Instant::now() + wait).min(self.give_up_at)).await;
                    let Some(frame) = unanswered.get(position) else {
                        continue;
                    };
                    self.stats.retried += frame.events;
                    let answer = self.submit(client, frame).await?;
                    in_flight.push_back((seq, answer));
                }
                Outcome::Rejected(r) => {
                    let Some(frame) = unanswered.remove(position) else {
                        continue;
                    };
                    self.stats.rejected += frame.events;
                    self.counters
                        .rejected
                        .fetch_add(frame.events, Ordering::Relaxed);
                    *self
                        .stats
                        .rejections
                        .entry(r.code.as_str().to_string())
                        .or_default() += frame.events;
                    if self.stats.error.is_none() {
                        self.stats.error = Some(format!(
                            "device '{}': the server rejected a frame ({}): {}",
                            self.options.device_id,
                            r.code.as_str(),
                            r.message
                        ));
                    }
                }
            }
        }
    }

    async fn submit(&self, client: &Client, frame: &SimFrame) -> Result<Answer, Broken> {
        let encoding = match self.plan.encoding {
            PayloadEncoding::Json => Encoding::Json,
            PayloadEncoding::Arrow => Encoding::Arrow,
        };
        client
            .submit_encoded(
                &self.plan.stream,
                frame.seq,
                encoding,
                frame.payload.clone(),
            )
            .await
            .map(|answer| Box::pin(answer) as Answer)
            .map_err(|e| broken(&e))
    }

    /// The device's next frame of readings, all stamped now.
    fn make_frame(&mut self) -> SimFrame {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let n = self.plan.batch;
        let readings: Vec<Reading> = (0..n)
            .map(|_| {
                let seq = self.next_event;
                self.next_event += 1;
                self.telemetry.reading(ts, seq)
            })
            .collect();
        let payload = match self.plan.encoding {
            PayloadEncoding::Json => json_lines(ts, &readings),
            PayloadEncoding::Arrow => self.plan.arrow.payload(ts, &readings),
        };
        self.next_frame += 1;
        SimFrame {
            seq: self.plan.seq_base + self.next_frame,
            payload,
            events: n as u64,
            first_sent: Instant::now(),
        }
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// Whether an error means the device should stop trying (and why).
fn fatal_reason(e: &IngestError) -> Option<String> {
    match e {
        IngestError::Connect { .. }
        | IngestError::ConnectionLost(_)
        | IngestError::Server {
            code: ErrorCode::ServerShutdown | ErrorCode::Unavailable | ErrorCode::HelloTimeout,
            ..
        } => None,
        other => Some(other.to_string()),
    }
}

fn broken(e: &IngestError) -> Broken {
    match fatal_reason(e) {
        Some(reason) => Broken::Fatal(reason),
        None => Broken::Retry(e.to_string()),
    }
}

/// One reading of a simulated sensor.
struct Reading {
    seq: i64,
    /// Hundredths of a degree Celsius: the sensor's resolution.
    centi_celsius: i64,
    /// Tenths of a percent of relative humidity: the sensor's resolution.
    deci_percent: i64,
    status: &'static str,
}

impl Reading {
    fn temperature(&self) -> f64 {
        self.centi_celsius as f64 / 100.0
    }

    fn humidity(&self) -> f64 {
        self.deci_percent as f64 / 10.0
    }
}

/// A device's sensors: temperature a slow sine around the device's own
/// base plus noise, humidity a slower one, and a status that turns `warn`
/// near the top of the temperature swing and, rarely, `error`.
struct Telemetry {
    index: u64,
    rng: SplitMix64,
    base_temperature: f64,
    base_humidity: f64,
    phase: f64,
}

impl Telemetry {
    fn new(seed: u64, index: u64) -> Telemetry {
        let mut rng = SplitMix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let base_temperature = 18.0 + 8.0 * rng.unit();
        let base_humidity = 35.0 + 20.0 * rng.unit();
        let phase = std::f64::consts::TAU * rng.unit();
        Telemetry {
            index,
            rng,
            base_temperature,
            base_humidity,
            phase,
        }
    }

    fn reading(&mut self, ts_ms: i64, seq: i64) -> Reading {
        let t = ts_ms as f64 / 1000.0;
        let swing = (std::f64::consts::TAU * t / 600.0 + self.phase).sin();
        let temperature = self.base_temperature + 3.0 * swing + 0.2 * (self.rng.unit() - 0.5);
        let humidity = self.base_humidity
            + 8.0 * (std::f64::consts::TAU * t / 3600.0 + self.phase).cos()
            + (self.rng.unit() - 0.5);
        let status = if self.rng.unit() < 0.0001 {
            "error"
        } else if swing > 0.9 {
            "warn"
        } else {
            "ok"
        };
        Reading {
            seq,
            centi_celsius: (temperature * 100.0).round() as i64,
            deci_percent: (humidity * 10.0).round() as i64,
            status,
        }
    }
}

/// A small, fast, seedable generator (SplitMix64); the telemetry only
/// needs to look like noise and repeat for a seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn json_lines(ts: i64, readings: &[Reading]) -> Bytes {
    // Written by hand rather than with `write!`: at full rate the
    // formatting machinery (and `f64`'s shortest-decimal search) was a
    // third of the simulator's CPU, which the server shares.
    let mut out = Vec::with_capacity(readings.len() * 88);
    let mut digits = itoa::Buffer::new();
    for r in readings {
        out.extend_from_slice(b"{\"ts\":");
        out.extend_from_slice(digits.format(ts).as_bytes());
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(digits.format(r.seq).as_bytes());
        out.extend_from_slice(b",\"temperature\":");
        push_decimal(&mut out, &mut digits, r.centi_celsius, 2);
        out.extend_from_slice(b",\"humidity\":");
        push_decimal(&mut out, &mut digits, r.deci_percent, 1);
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(r.status.as_bytes());
        out.extend_from_slice(b"\"}\n");
    }
    Bytes::from(out)
}

/// Writes `scaled / 10^places` as its shortest decimal: `21.37`, `21.3`,
/// `21`, `-0.05`. That is what `f64`'s `Display` prints for the same value.
fn push_decimal(out: &mut Vec<u8>, digits: &mut itoa::Buffer, scaled: i64, places: u32) {
    let scale = 10u64.pow(places);
    if scaled < 0 {
        out.push(b'-');
    }
    let magnitude = scaled.unsigned_abs();
    out.extend_from_slice(digits.format(magnitude / scale).as_bytes());
    let (mut fraction, mut width) = (magnitude % scale, places as usize);
    if fraction == 0 {
        return;
    }
    while fraction % 10 == 0 {
        fraction /= 10;
        width -= 1;
    }
    out.push(b'.');
    let text = digits.format(fraction);
    out.resize(out.len() + width - text.len(), b'0');
    out.extend_from_slice(text.as_bytes());
}

/// Arrow IPC payloads of the simulator's schema. Each frame is a whole IPC
/// stream, whose schema message is the same every time: it is encoded
/// once, as a device would keep it, and only the batch is encoded per
/// frame.
struct ArrowFrames {
    schema: SchemaRef,
    /// The stream's schema message, framed.
    head: Vec<u8>,
}

impl ArrowFrames {
    fn new(schema: SchemaRef) -> ArrowFrames {
        let options = IpcWriteOptions::default();
        let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
            &schema,
            &mut DictionaryTracker::new(false),
            &options,
        );
        let mut head = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = write_message(&mut head, encoded, &options);
        ArrowFrames { schema, head }
    }

    /// One frame's payload: the schema message, one record batch of these
    /// readings, and the end-of-stream marker.
    fn payload(&self, ts: i64, readings: &[Reading]) -> Bytes {
        let batch = match arrow_batch(&self.schema, ts, readings) {
            Ok(batch) => batch,
            Err(_) => return Bytes::new(),
        };
        let options = IpcWriteOptions::default();
        let mut out = Vec::with_capacity(self.head.len() + 256 + 40 * readings.len());
        out.extend_from_slice(&self.head);
        let written = IpcDataGenerator::default()
            .encode(
                &batch,
                &mut DictionaryTracker::new(false),
                &options,
                &mut IpcWriteContext::default(),
            )
            .and_then(|(_, encoded)| write_message(&mut out, encoded, &options));
        if written.is_err() {
            return Bytes::new();
        }
        out.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        Bytes::from(out)
    }
}

fn arrow_batch(
    schema: &SchemaRef,
    ts: i64,
    readings: &[Reading],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = readings.len();
    let columns: Vec<arrow::array::ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from(vec![ts; n]).with_timezone("UTC")),
        Arc::new(Int64Array::from_iter_values(readings.iter().map(|r| r.seq))),
        Arc::new(Float64Array::from_iter_values(
            readings.iter().map(Reading::temperature),
        )),
        Arc::new(Float64Array::from_iter_values(
            readings.iter().map(Reading::humidity),
        )),
        Arc::new(StringArray::from_iter_values(
            readings.iter().map(|r| r.status),
        )),
    ];
    // The columns match the schema by construction.
    RecordBatch::try_new(schema.clone(), columns)
}

/// Acknowledgement latencies, to within 1%, from 1 µs to hours: 128
/// buckets per power of two.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

const SUB_BUCKET_BITS: u32 = 7;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; SUB_BUCKETS * 58],
            total: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < SUB_BUCKETS as u64 {
            return us as usize;
        }
        let top_bit = 63 - us.leading_zeros();
        let octave = top_bit - SUB_BUCKET_BITS + 1;
        let sub = (us >> (octave - 1)) as usize;
        octave as usize * SUB_BUCKETS + (sub - SUB_BUCKETS)
    }

    /// The middle of a bucket's range, in microseconds.
    fn value(index: usize) -> f64 {
        if index < SUB_BUCKETS {
            return index as f64;
        }
        let octave = (index / SUB_BUCKETS) as u32;
        let sub = (index % SUB_BUCKETS + SUB_BUCKETS) as f64;
        let width = (1u64 << (octave - 1)) as f64;
        sub * width + width / 2.0
    }

    fn record(&mut self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let i = Self::index(us).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The latency below which `q` of the samples fall, in milliseconds.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some((Self::value(i) / 1000.0).min(self.max_us as f64 / 1000.0));
            }
        }
        Some(self.max_us as f64 / 1000.0)
    }
}

/// The end-of-run report.
struct Summary {
    devices: usize,
    stream: String,
    encoding: &'static str,
    batch: usize,
    rate: f64,
    duration_s: f64,
    totals_sent: u64,
    acked: u64,
    rejected: u64,
    retried: u64,
    frames: u64,
    reconnects: u64,
    connect_failures: u64,
    rejections: BTreeMap<String, u64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
    gave_up: u64,
}

impl Summary {
    fn new(args: &SimulateArgs, totals: &DeviceStats, elapsed: Duration) -> Summary {
        let latency = &totals.latency;
        Summary {
            devices: args.devices,
            stream: args.stream.clone(),
            encoding: args.encoding.name(),
            batch: args.batch,
            rate: args.rate,
            duration_s: elapsed.as_secs_f64(),
            totals_sent: totals.sent,
            acked: totals.acked,
            rejected: totals.rejected,
            retried: totals.retried,
            frames: totals.frames,
            reconnects: totals.reconnects,
            connect_failures: totals.connect_failures,
            rejections: totals.rejections.clone(),
            p50: latency.quantile_ms(0.5),
            p99: latency.quantile_ms(0.99),
            p999: latency.quantile_ms(0.999),
            max: (latency.total > 0).then(|| latency.max_us as f64 / 1000.0),
            gave_up: totals.gave_up,
        }
    }

    /// Events sent but neither acknowledged nor rejected.
    fn lost(&self) -> u64 {
        self.totals_sent
            .saturating_sub(self.acked)
            .saturating_sub(self.rejected)
    }

    fn events_per_s(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.acked as f64 / self.duration_s
        } else {
            0.0
        }
    }

    fn all_acked(&self) -> bool {
        self.acked == self.totals_sent && self.gave_up == 0
    }

    fn to_json(&self) -> Value {
        let ms = |v: Option<f64>| v.map(|x| (x * 1000.0).round() / 1000.0);
        json!({
            "devices": self.devices,
            "stream": self.stream,
            "encoding": self.encoding,
            "batch": self.batch,
            "rate": self.rate,
            "duration_s": (self.duration_s * 1000.0).round() / 1000.0,
            "sent": self.totals_sent,
            "acked": self.acked,
            "rejected": self.rejected,
            "lost": self.lost(),
            "retried": self.retried,
            "frames": self.frames,
            "reconnects": self.reconnects,
            "errors": self.connect_failures + self.reconnects,
            "gave_up": self.gave_up,
            "events_per_s": self.events_per_s().round(),
            "ack_latency_ms": {
                "p50": ms(self.p50),
                "p99": ms(self.p99),
                "p999": ms(self.p999),
                "max": ms(self.max),
            },
            "rejections": self.rejections,
        })
    }

    fn print(&self) {
        let ms = |v: Option<f64>| {
            v.map(|x| format!("{x:.2} ms"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{} device{} sent to '{}' for {:.1} s ({}, {} event{} per frame{})",
            self.devices,
            plural(self.devices as u64),
            self.stream,
            self.duration_s,
            self.encoding,
            self.batch,
            plural(self.batch as u64),
            if self.rate > 0.0 {
                format!(", {} events/s asked", grouped(self.rate.round() as u64))
            } else {
                ", as fast as acknowledged".into()
            }
        );
        println!(
            "  sent      {:>14} events in {} frames",
            grouped(self.totals_sent),
            grouped(self.frames)
        );
        println!(
            "  acked     {:>14} events ({} events/s)",
            grouped(self.acked),
            grouped(self.events_per_s().round() as u64)
        );
        let codes = self
            .rejections
            .iter()
            .map(|(code, n)| format!("{code}: {}", grouped(*n)))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "  rejected  {:>14} events{}",
            grouped(self.rejected),
            if codes.is_empty() {
                String::new()
            } else {
                format!(" ({codes})")
            }
        );
        println!(
            "  retried   {:>14} events ({} reconnects, {} failed connection attempts)",
            grouped(self.retried),
            self.reconnects,
            self.connect_failures
        );
        if self.lost() > 0 {
            println!(
                "  lost      {:>14} events (sent, never answered)",
                grouped(self.lost())
            );
        }
        println!(
            "  ack latency  p50 {}  p99 {}  p999 {}  max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        );
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// 1234567 as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The live progress line on a terminal.
struct Progress {
    enabled: bool,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress { enabled }
    }

    fn note(&self, text: &str) {
        if self.enabled {
            eprint!("\r\x1b[K{text}");
            let _ = std::io::stderr().flush();
        }
    }
}

async fn show_connecting(counters: Arc<Counters>, devices: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        eprint!(
            "\r\x1b[Kconnecting: {}/{devices} devices connected, {} failed attempts",
            counters.connected.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
        );
        let _ = std::io::stderr().flush();
    }
}

async fn show_progress(counters: Arc<Counters>, started: Instant, devices: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = (Instant::now(), 0u64);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let acked = counters.acked.load(Ordering::Relaxed);
        let rate = (acked - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, acked);
        eprint!(
            "\r\x1b[K{:>6.1} s  {} events/s  acked {}  sent {}  rejected {}  errors {}  connected {}/{devices}",
            started.elapsed().as_secs_f64(),
            grouped(rate.round() as u64),
            grouped(acked),
            grouped(counters.sent.load(Ordering::Relaxed)),
            grouped(counters.rejected.load(Ordering::Relaxed)),
            counters.errors.load(Ordering::Relaxed),
            counters.connected.load(Ordering::Relaxed),
        );
        let _ = std::io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};
    use tributary_ingest::decode::{decode_arrow, encode_arrow};

    #[test]
    fn histogram_quantiles_are_within_one_percent() {
        let mut h = Histogram::default();
        for us in 1..=100_000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, want_ms) in [(0.5, 50.0), (0.99, 99.0), (0.999, 99.9)] {
            let got = h.quantile_ms(q).unwrap();
            assert!(
                (got - want_ms).abs() / want_ms < 0.01,
                "q{q}: {got} ms, want {want_ms}"
            );
        }
        assert_eq!(h.quantile_ms(1.0), Some(100.0));
        assert_eq!(Histogram::default().quantile_ms(0.5), None);
    }

    #[test]
    fn histogram_buckets_are_contiguous() {
        let mut previous = 0;
        for us in 0..1_000_000u64 {
            let i = Histogram::index(us);
            assert!(
                i == previous || i == previous + 1,
                "{us} -> {i} after {previous}"
            );
            previous = i;
        }
        let top = Histogram::index(u64::MAX);
        assert!(top < Histogram::default().counts.len());
    }

    #[test]
    fn telemetry_repeats_for_a_seed_and_stays_in_range() {
        let mut a = Telemetry::new(7, 3);
        let mut b = Telemetry::new(7, 3);
        for seq in 0..10_000 {
            let (x, y) = (a.reading(seq * 1000, seq), b.reading(seq * 1000, seq));
            assert_eq!(x.centi_celsius, y.centi_celsius);
            assert_eq!(x.status, y.status);
            assert!(
                (14.0..=30.0).contains(&x.temperature()),
                "{}",
                x.temperature()
            );
            assert!((20.0..=70.0).contains(&x.humidity()), "{}", x.humidity());
        }
    }

    /// The payload put together from the schema message encoded once is
    /// the IPC stream arrow's own writer makes, byte for byte, and the
    /// server's decoder reads it.
    #[test]
    fn arrow_frames_are_the_stream_arrows_writer_makes() {
        let frames = ArrowFrames::new(payload_schema());
        let stream = StreamDef::new(
            "sim",
            COLUMNS
                .iter()
                .map(|(name, ty)| ColumnDef {
                    name: (*name).into(),
                    ty: match *ty {
                        "BIGINT" => ColumnType::Int64,
                        "DOUBLE" => ColumnType::Float64,
                        "VARCHAR" => ColumnType::Utf8,
                        other => panic!("a simulator column of type {other}"),
                    },
                })
                .collect(),
            4,
        )
        .unwrap();
        let mut telemetry = Telemetry::new(3, 1);
        for n in [1, 2, 100] {
            let ts = 1_764_000_000_000;
            let readings: Vec<Reading> = (0..n).map(|seq| telemetry.reading(ts, seq)).collect();
            let batch = arrow_batch(&frames.schema, ts, &readings).unwrap();
            let payload = frames.payload(ts, &readings);
            assert_eq!(
                payload.as_ref(),
                encode_arrow(&frames.schema, &[batch]).unwrap().as_slice()
            );
            let decoded = decode_arrow(&stream, &payload, "d", ts, 1000).unwrap();
            assert_eq!(decoded.num_rows(), n as usize);
        }
    }

    #[test]
    fn json_lines_print_readings_as_display_would() {
        let mut telemetry = Telemetry::new(11, 5);
        let mut readings: Vec<Reading> = (0..20_000)
            .map(|seq| telemetry.reading(1_764_000_000_000 + seq * 997, seq))
            .collect();
        // Whole numbers, one decimal, a leading zero in the fraction, and
        // below zero.
        for (seq, (centi_celsius, deci_percent)) in [
            (2100, 400),
            (2150, 401),
            (2105, 1),
            (-5, -30),
            (-1230, -1),
            (0, 999),
        ]
        .into_iter()
        .enumerate()
        {
            readings.push(Reading {
                seq: -(seq as i64),
                centi_celsius,
                deci_percent,
                status: "ok",
            });
        }
        let ts = 1_764_000_000_123;
        let got = json_lines(ts, &readings);
        let mut want = String::new();
        for r in &readings {
            want.push_str(&format!(
                r#"{{"ts":{ts},"seq":{},"temperature":{},"humidity":{},"status":"{}"}}"#,
                r.seq,
                r.temperature(),
                r.humidity(),
                r.status
            ));
            want.push('\n');
        }
        assert_eq!(std::str::from_utf8(&got).unwrap(), want);
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }
}
