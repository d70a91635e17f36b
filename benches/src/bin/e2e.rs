//! The end-to-end benchmark (issue 7): one run that starts a server on a
//! temporary data directory and measures, with peers beside it on the same
//! machine:
//!
//! 1. ingest: `tributary simulate --rate 0` for JSON and Arrow IPC payloads,
//!    1 / 100 / 1,000 devices and 1 / 10 / 100 / 1,000 events per frame, all
//!    into one stream (`sim`); acknowledged events/s, acknowledgement
//!    latency, and the server's peak resident memory during each run;
//! 2. the peer: mosquitto (Debian's) taking the same JSON events as QoS 1
//!    publishes from parallel `mosquitto_pub -l` clients;
//! 3. event → command latency through a filter rule at fixed rates
//!    ([`tributary_benches::latency`]);
//! 4. storage: the server is stopped (SIGTERM flushes the Parquet sink), and
//!    the stream's Parquet bytes are divided by the rows the files hold (read
//!    from their footers), against the raw JSON of the same events;
//! 5. queries over those Parquet files, Tributary against DuckDB, after a
//!    restart on the same data directory ([`tributary_benches::queries`]);
//! 6. window throughput: the `window_tumble_avg` criterion bench and its
//!    DuckDB reference.
//!
//! It writes a Markdown section into `--out` (between `<!-- e2e:begin -->`
//! and `<!-- e2e:end -->`), the raw results as JSON into `--results`, and a
//! summary on stdout; progress goes to stderr. Run it through
//! `benches/e2e.sh`, which installs mosquitto and DuckDB and builds the
//! release binaries first.
//!
//! ```text
//! e2e --bin target/release/tributary --python target/bench-venv/bin/python
//!     [--out docs/benchmarks.md] [--results target/e2e-results.json]
//!     [--quick] [--duration-s S] [--no-window] [--no-mosquitto]
//!     [--no-latency] [--no-queries] [--keep] [-- <extra `serve` flags>]
//! ```
//!
//! A failed measurement does not stop the others: it is reported in the
//! section and the JSON, and the run ends with an `error:` line and a
//! non-zero status. A failure of the harness itself (the server does not
//! start, or dies) stops the run at once. Every child process is stopped on
//! the way out.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tributary_benches::{latency, queries};
use tributary_tests::health;

/// The stream every ingest run writes to, and the queries read.
const STREAM: &str = "sim";
/// mosquitto_pub numbers QoS 1 messages with a 16-bit id; with `-l` it stops
/// once the id of its last line is acknowledged, which happens early when
/// the ids wrapped (more than 65,535 lines): the rest is dropped unsent. So
/// no client is given more lines than this.
const MQTT_MAX_LINES_PER_CLIENT: usize = 60_000;
/// Messages in flight per mosquitto_pub client (`-M`; its default is 20).
const MQTT_INFLIGHT: usize = 100;
/// Frames a simulated device keeps in flight at least (`simulate --window`,
/// its default).
const SIM_MIN_WINDOW: u64 = 8;

/// Frames each simulated device keeps in flight (`--window`): at least
/// [`SIM_MIN_WINDOW`], and as many as it takes to have as many events
/// unacknowledged as a mosquitto_pub client has messages (`-M`). Every
/// acknowledgement waits for the disk, so with one event per frame a
/// device with 8 frames in flight is held to 8 events per fsync, where
/// the peer's client may have 100 messages unanswered (1 device, JSON:
/// 7,549 events/s with 8, 33,523 with 64).
fn sim_window(batch: u64) -> u64 {
    (MQTT_INFLIGHT as u64)
        .div_ceil(batch.max(1))
        .max(SIM_MIN_WINDOW)
}

const MIB: f64 = 1024.0 * 1024.0;

struct Options {
    bin: PathBuf,
    python: PathBuf,
    /// The criterion bench executable, already built; without it the window
    /// bench goes through `cargo bench`.
    window_bench: Option<PathBuf>,
    out: PathBuf,
    results: PathBuf,
    quick: bool,
    duration_s: f64,
    window: bool,
    mosquitto: bool,
    latency: bool,
    queries: bool,
    keep: bool,
    serve_args: Vec<String>,
    command_line: String,
}

fn usage() -> &'static str {
    "usage: e2e --bin PATH --python PATH [--window-bench PATH] [--out FILE] [--results FILE] [--quick] \
     [--duration-s S] [--no-window] [--no-mosquitto] [--no-latency] [--no-queries] [--keep] \
     [-- <extra serve flags>]"
}

fn parse_args() -> Result<Options, String> {
    let argv: Vec<String> = std::env::args().collect();
    let mut o = Options {
        bin: PathBuf::from("target/release/tributary"),
        python: PathBuf::from("python3"),
        window_bench: None,
        out: PathBuf::from("docs/benchmarks.md"),
        results: PathBuf::from("target/e2e-results.json"),
        quick: false,
        duration_s: 0.0,
        window: true,
        mosquitto: true,
        latency: true,
        queries: true,
        keep: false,
        serve_args: Vec::new(),
        command_line: std::env::var("E2E_COMMAND").unwrap_or_else(|_| argv.join(" ")),
    };
    let mut args = argv.into_iter().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} takes a value"));
        match arg.as_str() {
            "--bin" => o.bin = value("--bin")?.into(),
            "--python" => o.python = value("--python")?.into(),
            "--window-bench" => o.window_bench = Some(value("--window-bench")?.into()),
            "--out" => o.out = value("--out")?.into(),
            "--results" => o.results = value("--results")?.into(),
            "--duration-s" => {
                o.duration_s = value("--duration-s")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or("--duration-s takes a positive number of seconds")?
            }
            "--quick" => o.quick = true,
            "--no-window" => o.window = false,
            "--no-mosquitto" => o.mosquitto = false,
            "--no-latency" => o.latency = false,
            "--no-queries" => o.queries = false,
            "--keep" => o.keep = true,
            // `cargo bench` passes this to every target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            "--" => o.serve_args = args.by_ref().collect(),
            other => return Err(format!("unknown argument {other}\n{}", usage())),
        }
    }
    if o.duration_s == 0.0 {
        o.duration_s = if o.quick { 1.0 } else { 4.0 };
    }
    Ok(o)
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    match run(&options) {
        Ok(failures) if failures.is_empty() => {}
        Ok(failures) => {
            eprintln!(
                "error: {} measurement(s) failed: {}",
                failures.len(),
                failures.join("; ")
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn progress(text: &str) {
    eprintln!("[e2e {}] {text}", clock());
}

fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

// ---------------------------------------------------------------------------
// Processes and their memory

/// A process's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ")".
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until a process uses under 5% of a core over a second (or
/// `limit` passes); how long it waited. A restarted server may still be
/// busy for seconds (recovering its log, resuming consumers): timing
/// queries then would charge that work to the first of them, while DuckDB,
/// timed afterwards, runs on a quiet machine.
fn wait_quiet(pid: u32, limit: Duration) -> Duration {
    // Linux reports CPU time in USER_HZ, 100 ticks a second.
    const QUIET_TICKS_PER_S: u64 = 5;
    let start = Instant::now();
    let mut before = cpu_ticks(pid);
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_ticks(pid);
        match (before, now) {
            (Some(b), Some(n)) if n.saturating_sub(b) < QUIET_TICKS_PER_S => break,
            (_, None) => break,
            _ => before = now,
        }
    }
    start.elapsed()
}

/// A field of /proc/<pid>/status in bytes (VmRSS, VmHWM are in kB).
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's VmRSS every 100 ms until dropped; keeps the peak.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(status_kb(pid, "VmRSS:")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kb(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak, bytes.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Guard {
    child: Option<Child>,
}

impl Guard {
    fn new(child: Child) -> Guard {
        Guard { child: Some(child) }
    }

    fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the child is there until dropped")
    }

    /// SIGTERM, then up to `grace` for it to exit (SIGKILL after that);
    /// whether it exited successfully on its own.
    fn terminate(&mut self, grace: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it had already exited ({status})"));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("it exited with {status} after SIGTERM")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("it did not stop within {grace:?} of SIGTERM"));
                }
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.terminate(Duration::from_secs(10));
    }
}

/// Waits for a child with a deadline, reading its stdout and stderr as it
/// runs (so a full pipe cannot stall it); kills it at the deadline.
fn wait_output(mut child: Child, timeout: Duration) -> Result<(bool, String, String), String> {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {timeout:?}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((status.success(), stdout, stderr))
}

/// The last `n` lines of a text, for error messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A program on the PATH (or in the sbin folders, where Debian puts
/// mosquitto).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// The server

struct Server {
    bin: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    proc: Option<Guard>,
}

impl Server {
    fn new(bin: &Path, work: &Path, extra: &[String]) -> Server {
        let mut args: Vec<String> = [
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            // Per-device limits off (0 = no limit): the bench measures the
            // server, not its throttles.
            "--device-events-per-s",
            "0",
            "--device-bytes-per-s",
            "0",
            "--max-events-per-frame",
            "10000",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().cloned());
        Server {
            bin: bin.to_path_buf(),
            data_dir: work.join("data"),
            log: work.join("server.log"),
            args,
            proc: None,
        }
    }

    fn start(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.data_dir.join("server.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} serve: {e}", self.bin.display()))?;
        self.proc = Some(Guard::new(child));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_alive()?;
            if let Some(addr) = self.info("http")
                && health(&addr)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the server did not become ready within 60 s; its log: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        let Some(p) = self.proc.as_mut() else {
            return Err("the server is not running".into());
        };
        if let Ok(Some(status)) = p.child().try_wait() {
            p.child = None;
            return Err(format!(
                "the server exited ({status}); its log: {}",
                self.log_tail()
            ));
        }
        Ok(())
    }

    /// SIGTERM (the sink flushes), and wait for a clean exit.
    fn stop(&mut self) -> Result<(), String> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(120))
                .map_err(|e| format!("stopping the server: {e}; its log: {}", self.log_tail()))?;
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Guard::id)
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 10)
    }

    fn info(&self, key: &str) -> Option<String> {
        let bytes = std::fs::read(self.data_dir.join("server.json")).ok()?;
        let info: Value = serde_json::from_slice(&bytes).ok()?;
        info.get(key)?.as_str().map(str::to_string)
    }

    fn http(&self) -> Result<String, String> {
        self.info("http")
            .ok_or_else(|| "server.json has no HTTP address".to_string())
    }

    fn quic(&self) -> Result<SocketAddr, String> {
        self.info("quic")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "server.json has no QUIC address".to_string())
    }

    fn admin_token(&self) -> Result<String, String> {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("reading the admin token: {e}"))
    }
}

// ---------------------------------------------------------------------------
// Ingest

fn ingest_matrix(
    o: &Options,
    server: &mut Server,
    failures: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    let encodings = ["json", "arrow"];
    let (devices, batches): (&[u64], &[u64]) = if o.quick {
        (&[1, 100], &[1, 100])
    } else {
        (&[1, 100, 1000], &[1, 10, 100, 1000])
    };
    let total = encodings.len() * devices.len() * batches.len();
    let mut rows = Vec::new();
    let mut i = 0;
    for encoding in encodings {
        for &n in devices {
            for &batch in batches {
                i += 1;
                let row = ingest_run(o, server, encoding, n, batch)?;
                match row.get("error").and_then(Value::as_str) {
                    Some(e) => {
                        progress(&format!(
                            "ingest {i}/{total}: {encoding}, {n} devices, batch {batch}: FAILED: {e}"
                        ));
                        failures.push(format!("ingest {encoding}/{n}/{batch}: {e}"));
                    }
                    None => progress(&format!(
                        "ingest {i}/{total}: {encoding}, {n} devices, batch {batch}: \
                         {:.0} events/s acked, p99 {} ms, server peak {:.0} MiB, rejected {}",
                        f(&row, "events_per_s"),
                        fmt_ms(row["ack_latency_ms"]["p99"].as_f64()),
                        f(&row, "server_peak_rss_bytes") / MIB,
                        row["rejected"].as_u64().unwrap_or(0),
                    )),
                }
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// One `tributary simulate` run; its summary plus the server's memory. A
/// failed simulator is recorded in the row (`error`); a dead server is an
/// error.
fn ingest_run(
    o: &Options,
    server: &mut Server,
    encoding: &str,
    devices: u64,
    batch: u64,
) -> Result<Value, String> {
    server.check_alive()?;
    let sampler = RssSampler::start(server.pid());
    let child = Command::new(&o.bin)
        .arg("simulate")
        .arg("--data-dir")
        .arg(&server.data_dir)
        .args(["--stream", STREAM, "--rate", "0", "--json"])
        .args(["--devices", &devices.to_string()])
        .args(["--batch", &batch.to_string()])
        .args(["--window", &sim_window(batch).to_string()])
        .args(["--encoding", encoding])
        .args([
            "--duration",
            &format!("{}ms", (o.duration_s * 1000.0) as u64),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {} simulate: {e}", o.bin.display()))?;
    let sim_pid = child.id();
    let sim_sampler = RssSampler::start(sim_pid);
    let started = Instant::now();
    // Provisioning, connecting and the resend grace come on top of the
    // sending time.
    let outcome = wait_output(
        child,
        Duration::from_secs_f64(o.duration_s) + Duration::from_secs(180),
    );
    let wall_s = started.elapsed().as_secs_f64();
    let behind = sink_lag(server);
    let sim_peak = sim_sampler.finish();
    // The next row starts once this one's events are all in Parquet, so it
    // does not share the machine with this row's leftover work. The
    // server's memory while it catches up counts for this row.
    let stored_after = wait_stored(server, STORED_WITHIN);
    let peak = sampler.finish();
    server.check_alive()?;
    let hwm = status_kb(server.pid(), "VmHWM:");
    let mut row = match outcome {
        Ok((true, stdout, _)) => match serde_json::from_str::<Value>(stdout.trim()) {
            Ok(v) if v.is_object() => v,
            _ => {
                json!({ "error": format!("simulate printed no JSON summary: {}", tail(&stdout, 3)) })
            }
        },
        Ok((false, stdout, stderr)) => json!({
            "error": format!("simulate failed: {}", tail(&format!("{stdout}\n{stderr}"), 4))
        }),
        Err(e) => json!({ "error": format!("simulate {e}") }),
    };
    let m = row.as_object_mut().expect("an object");
    m.insert("encoding".into(), json!(encoding));
    m.insert("devices".into(), json!(devices));
    m.insert("batch".into(), json!(batch));
    m.insert("window".into(), json!(sim_window(batch)));
    m.insert("server_peak_rss_bytes".into(), json!(peak));
    m.insert("server_hwm_bytes".into(), json!(hwm));
    m.insert("simulator_peak_rss_bytes".into(), json!(sim_peak));
    m.insert("wall_s".into(), json!(wall_s));
    m.insert("parquet_lag_at_end".into(), json!(behind));
    m.insert(
        "parquet_caught_up_s".into(),
        json!(stored_after.map(|d| d.as_secs_f64())),
    );
    Ok(row)
}

/// An ingest row's "Parquet behind, caught up" cell: `1.2 M, 3.4 s`,
/// `85 k, 4.6 s`.
fn parquet_behind(row: &Value) -> String {
    let behind = row["parquet_lag_at_end"].as_f64().map_or_else(
        || "?".to_string(),
        |n| match n {
            n if n >= 1e6 => format!("{:.1} M", n / 1e6),
            n if n >= 1e3 => format!("{:.0} k", n / 1e3),
            n => format!("{n:.0}"),
        },
    );
    let after = row["parquet_caught_up_s"].as_f64().map_or_else(
        || format!("not within {} s", STORED_WITHIN.as_secs()),
        |t| format!("{t:.1} s"),
    );
    format!("{behind}, {after}")
}

/// The longest the bench waits, after an ingest run, for the Parquet sink
/// to store that run's events before the next run starts.
const STORED_WITHIN: Duration = Duration::from_secs(120);

/// The Parquet sink's lag on the simulator's stream, from `/metrics`
/// (`tributary_consumer_lag_events`); `None` if the scrape fails or the
/// sink has not committed on the stream yet.
fn sink_lag(server: &Server) -> Option<u64> {
    let api = server.http().ok()?;
    let (status, body) = queries::http(&api, "GET", "/metrics", None, None, None).ok()?;
    if status != 200 {
        return None;
    }
    let series =
        format!("tributary_consumer_lag_events{{stream=\"{STREAM}\",consumer=\"parquet\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

/// Waits until the Parquet sink has stored every event acknowledged so far
/// (its lag is 0); how long that took, or `None` if not within `limit`.
fn wait_stored(server: &Server, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if sink_lag(server) == Some(0) {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// The simulator's telemetry (`tributary simulate --emit`), for mosquitto's
// input and the raw JSON size.

/// `lines` JSON events for each of `devices` devices, as the simulator
/// sends them: one block of lines per device.
fn emitted_lines(
    bin: &Path,
    seed: u64,
    devices: usize,
    lines: usize,
) -> Result<Vec<String>, String> {
    let output = Command::new(bin)
        .args(["simulate", "--emit", &lines.to_string()])
        .args([
            "--devices",
            &devices.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {} simulate --emit: {e}", bin.display()))?;
    if !output.status.success() {
        return Err(format!(
            "simulate --emit failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8(output.stdout).map_err(|e| e.to_string())?;
    let all: Vec<&str> = text.lines().collect();
    if all.len() != devices * lines {
        return Err(format!(
            "simulate --emit printed {} lines, not {}",
            all.len(),
            devices * lines
        ));
    }
    Ok(all
        .chunks(lines.max(1))
        .map(|block| {
            let mut out = block.join("\n");
            out.push('\n');
            out
        })
        .collect())
}

// ---------------------------------------------------------------------------
// mosquitto

fn free_tcp_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free TCP port: {e}"))
}

/// The broker's count of PUBLISH messages received
/// (`$SYS/broker/publish/messages/received`, refreshed every second).
fn mqtt_received(sub: &Path, port: u16) -> Option<u64> {
    let out = Command::new(sub)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-C",
            "1",
            "-W",
            "3",
        ])
        .args(["-t", "$SYS/broker/publish/messages/received"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Waits until the broker's counter reaches `target` (it lags by up to its
/// 1 s refresh) or stops moving; its last value.
fn mqtt_settle(sub: &Path, port: u16, target: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut last = None;
    loop {
        let now = mqtt_received(sub, port);
        if now.is_some_and(|n| n >= target) || Instant::now() > deadline {
            return now.or(last);
        }
        if now.is_some() {
            last = now;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
}

fn mosquitto(o: &Options, work: &Path) -> Result<Value, String> {
    let (Some(broker), Some(publisher)) = (which("mosquitto"), which("mosquitto_pub")) else {
        return Ok(
            json!({ "skipped": "not installed (Debian: apt-get install mosquitto mosquitto-clients)" }),
        );
    };
    let subscriber = which("mosquitto_sub");
    let version = Command::new(&publisher)
        .arg("--help")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("mosquitto_pub version "))
                .and_then(|l| l.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into());
    let dir = work.join("mosquitto");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_tcp_port()?;
    let conf = dir.join("mosquitto.conf");
    // No subscribers, so the outgoing limits do not come into play; they are
    // lifted anyway (0: no limit), as is persistence (memory only).
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 0\nmax_queued_messages 0\nsys_interval 1\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("mosquitto.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&broker)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", broker.display()))?;
    let mut guard = Guard::new(child);
    let pid = guard.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = guard.child().try_wait() {
            return Err(format!("mosquitto exited at start ({status})"));
        }
        if Instant::now() > deadline {
            return Err("mosquitto did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let plan: &[(usize, usize)] = if o.quick {
        &[(1, 10_000), (10, 2_000)]
    } else {
        &[(1, MQTT_MAX_LINES_PER_CLIENT), (10, 20_000), (100, 2_000)]
    };
    let mut runs = Vec::new();
    let mut baseline = subscriber
        .as_deref()
        .and_then(|s| mqtt_settle(s, port, 0))
        .unwrap_or(0);
    for &(clients, lines) in plan {
        let lines = lines.min(MQTT_MAX_LINES_PER_CLIENT);
        let mut files = Vec::new();
        for (c, block) in emitted_lines(&o.bin, 7, clients.min(10), lines)?
            .into_iter()
            .enumerate()
        {
            let path = dir.join(format!("events-{clients}-{c}.jsonl"));
            std::fs::write(&path, block).map_err(|e| e.to_string())?;
            files.push(path);
        }
        let sampler = RssSampler::start(pid);
        let started = Instant::now();
        let mut pubs = Vec::new();
        for c in 0..clients {
            let input = std::fs::File::open(&files[c % files.len()]).map_err(|e| e.to_string())?;
            let child = Command::new(&publisher)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-l"])
                .args(["-M", &MQTT_INFLIGHT.to_string()])
                .args(["-t", &format!("sim/mqtt-{c}")])
                .stdin(input)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start mosquitto_pub: {e}"))?;
            pubs.push(Guard::new(child));
        }
        let mut failed = 0;
        let mut first_error = None;
        for mut p in pubs {
            let Some(child) = p.child.take() else {
                continue;
            };
            match wait_output(child, Duration::from_secs(300)) {
                Ok((true, _, _)) => {}
                Ok((false, _, stderr)) => {
                    failed += 1;
                    first_error.get_or_insert(tail(&stderr, 2));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(format!("mosquitto_pub {e}"));
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let peak = sampler.finish();
        let sent = (clients * lines) as u64;
        let received = subscriber
            .as_deref()
            .and_then(|s| mqtt_settle(s, port, baseline + sent))
            .map(|n| {
                let got = n.saturating_sub(baseline);
                baseline = n;
                got
            });
        let counted = received.unwrap_or(sent);
        let rate = counted as f64 / elapsed;
        progress(&format!(
            "mosquitto: {clients} clients × {lines} lines: {rate:.0} msgs/s (QoS 1), \
             broker received {}, peak RSS {:.1} MiB",
            received.map_or("?".into(), |n| n.to_string()),
            peak as f64 / MIB
        ));
        runs.push(json!({
            "clients": clients,
            "lines_per_client": lines,
            "sent": sent,
            "broker_received": received,
            "elapsed_s": elapsed,
            "msgs_per_s": rate,
            "failed_clients": failed,
            "first_error": first_error,
            "broker_peak_rss_bytes": peak,
        }));
    }
    let hwm = status_kb(pid, "VmHWM:");
    let _ = guard.terminate(Duration::from_secs(10));
    Ok(json!({
        "version": version,
        "inflight": MQTT_INFLIGHT,
        "broker_hwm_bytes": hwm,
        "runs": runs,
    }))
}

// ---------------------------------------------------------------------------
// Storage

fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            parquet_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// The stream's Parquet files: their bytes and the rows their footers count.
fn storage(stream_dir: &Path, json_bytes_per_event: f64, acked: u64) -> Result<Value, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut files = Vec::new();
    parquet_files(stream_dir, &mut files);
    if files.is_empty() {
        return Err(format!("no Parquet files under {}", stream_dir.display()));
    }
    let mut bytes = 0u64;
    let mut rows = 0i64;
    for path in &files {
        bytes += std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| format!("{}: not a Parquet file: {e}", path.display()))?;
        rows += reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .sum::<i64>();
    }
    let per_event = bytes as f64 / rows.max(1) as f64;
    Ok(json!({
        "files": files.len(),
        "bytes": bytes,
        "rows": rows,
        "acked_by_simulator": acked,
        "parquet_bytes_per_event": per_event,
        "json_bytes_per_event": json_bytes_per_event,
        "ratio": json_bytes_per_event / per_event,
    }))
}

// ---------------------------------------------------------------------------
// Window throughput (criterion)

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn window_bench(o: &Options) -> Result<Value, String> {
    let root = repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let bench_started = SystemTime::now();
    let (warm, measure) = if o.quick { ("1", "2") } else { ("1", "3") };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = std::path::absolute(&target).unwrap_or(target);
    // The executable e2e.sh built along with the server (one cargo
    // invocation, so one feature set and one DataFusion build); otherwise
    // cargo builds it, which may build DataFusion again.
    let mut command = match &o.window_bench {
        Some(exe) => {
            let mut c = Command::new(exe);
            c.current_dir(root.join("benches")).arg("--bench");
            c
        }
        None => {
            let mut c = Command::new(&cargo);
            c.current_dir(&root).args([
                "bench",
                "-p",
                "tributary-benches",
                "--bench",
                "tributary",
                "--",
            ]);
            c
        }
    };
    let child = command
        .args(["window_tumble_avg", "--warm-up-time", warm])
        .args(["--measurement-time", measure])
        .env("CRITERION_HOME", target.join("criterion"))
        // cargo runs the bench in the package's folder: a relative path
        // would point nowhere.
        .env(
            "TRIBUTARY_PYTHON",
            std::path::absolute(&o.python).unwrap_or_else(|_| o.python.clone()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the window bench: {e}"))?;
    let (ok, stdout, stderr) =
        wait_output(child, Duration::from_secs(900)).map_err(|e| format!("window bench {e}"))?;
    if !ok {
        return Err(format!(
            "the window bench failed: {}",
            tail(&format!("{stdout}\n{stderr}"), 6)
        ));
    }
    let group = target.join("criterion").join("window_tumble_avg");
    let mut estimates = Vec::new();
    find_named(&group, "estimates.json", &mut estimates);
    let estimates: Vec<PathBuf> = estimates
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("new")))
        .collect();
    // Only what this run wrote, not an earlier run's.
    let path = estimates
        .iter()
        .find(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= bench_started)
        })
        .ok_or_else(|| format!("criterion wrote no estimates under {}", group.display()))?;
    let read = |p: &Path| -> Result<Value, String> {
        serde_json::from_slice(&std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let est = read(path)?;
    let bench = read(&path.with_file_name("benchmark.json"))?;
    let median_ns = est["median"]["point_estimate"]
        .as_f64()
        .ok_or("no median in criterion's estimates")?;
    let elements = bench["throughput"]["Elements"]
        .as_f64()
        .ok_or("no element throughput in criterion's benchmark.json")?;
    // The reference table the bench prints: "  <engine> <best> <median> ...".
    let mut reference = Vec::new();
    for line in stdout.lines() {
        let l = line.trim();
        if !(l.starts_with("tributary rule") || l.starts_with("duckdb (")) {
            continue;
        }
        let Some(close) = l.find(')') else { continue };
        let nums: Vec<f64> = l[close + 1..]
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if nums.len() >= 2 {
            reference.push(json!({
                "engine": &l[..=close],
                "best_events_per_s": nums[0],
                "median_events_per_s": nums[1],
            }));
        }
    }
    let skipped = stdout
        .lines()
        .find(|l| l.contains("duckdb reference skipped"))
        .map(|l| l.trim().to_string());
    Ok(json!({
        "bench": path.parent().and_then(Path::parent)
            .and_then(|p| p.strip_prefix(target.join("criterion")).ok())
            .map(|p| p.display().to_string()),
        "events": elements,
        "median_s": median_ns / 1e9,
        "events_per_s": elements / (median_ns / 1e9),
        "reference": reference,
        "reference_skipped": skipped,
    }))
}

fn find_named(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_named(&path, name, out);
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(path);
        }
    }
}

// ---------------------------------------------------------------------------
// The run

fn run(o: &Options) -> Result<Vec<String>, String> {
    let started = Instant::now();
    if !o.bin.is_file() {
        return Err(format!(
            "{} does not exist: build it (cargo build --release -p tributary-cli) or pass --bin",
            o.bin.display()
        ));
    }
    let help = Command::new(&o.bin)
        .args(["simulate", "--help"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", o.bin.display()))?;
    if !help.status.success() {
        return Err(format!(
            "{} has no `simulate` command: rebuild it",
            o.bin.display()
        ));
    }
    let work = tempfile::Builder::new()
        .prefix("tributary-e2e-")
        .tempdir()
        .map_err(|e| format!("no temporary directory: {e}"))?;
    progress(&format!(
        "work dir {}{}",
        work.path().display(),
        if o.keep { " (kept)" } else { "" }
    ));
    let mut failures = Vec::new();
    let mut server = Server::new(&o.bin, work.path(), &o.serve_args);
    server.start()?;
    progress(&format!(
        "server up: QUIC {}, HTTP {}",
        server.info("quic").unwrap_or_default(),
        server.info("http").unwrap_or_default()
    ));
    let idle_rss = status_kb(server.pid(), "VmRSS:");

    // 1. Event → command latency first, on a quiet server: after the
    // ingest matrix the Parquet sink is still writing tens of millions of
    // events.
    let latency = if o.latency {
        latency_runs(o, &mut server, &mut failures)?
    } else {
        vec![json!({ "skipped": "--no-latency" })]
    };

    // 2. Ingest.
    let ingest = ingest_matrix(o, &mut server, &mut failures)?;
    let acked_total: u64 = ingest.iter().filter_map(|r| r["acked"].as_u64()).sum();

    // 3. mosquitto, while our server idles.
    let mqtt = if o.mosquitto {
        match mosquitto(o, work.path()) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("mosquitto: {e}"));
                json!({ "error": e })
            }
        }
    } else {
        json!({ "skipped": "--no-mosquitto" })
    };

    // 4. Storage, with the server stopped (everything flushed).
    progress("stopping the server (SIGTERM: the Parquet sink flushes)");
    let stop_started = Instant::now();
    server.stop()?;
    progress(&format!(
        "server stopped in {:.1} s",
        stop_started.elapsed().as_secs_f64()
    ));
    let sample = emitted_lines(&o.bin, 42, 1, 10_000)?.concat();
    let json_per_event =
        sample.lines().map(str::len).sum::<usize>() as f64 / sample.lines().count().max(1) as f64;
    let stream_dir = server.data_dir.join("storage").join(STREAM);
    let storage = match storage(&stream_dir, json_per_event, acked_total) {
        Ok(v) => {
            progress(&format!(
                "storage: {} rows in {} files, {:.2} bytes/event in Parquet against {:.1} of JSON",
                v["rows"],
                v["files"],
                f(&v, "parquet_bytes_per_event"),
                json_per_event
            ));
            if v["rows"].as_u64().unwrap_or(0) < acked_total {
                failures.push(format!(
                    "storage: the Parquet files hold {} rows but {acked_total} events were acknowledged",
                    v["rows"]
                ));
            }
            v
        }
        Err(e) => {
            failures.push(format!("storage: {e}"));
            json!({ "error": e })
        }
    };

    // 5. Queries, after a restart on the same data.
    let stored_rows = storage["rows"].as_u64().unwrap_or(0);
    let queries = if o.queries {
        server.start()?;
        let waited = wait_quiet(server.pid(), Duration::from_secs(60));
        progress(&format!(
            "server restarted and quiet after {:.0} s; queries: Tributary, then DuckDB",
            waited.as_secs_f64()
        ));
        let result = (|| {
            let options = queries::QueryOptions {
                api: server.http()?,
                admin_token: server.admin_token()?,
                parquet_dir: stream_dir.clone(),
                stream: STREAM.into(),
                python: o.python.clone(),
                // Fewer runs over a big stream keep the whole run short.
                runs: if o.quick || stored_rows > 20_000_000 {
                    3
                } else {
                    5
                },
            };
            queries::compare(&options)
        })();
        let value = match result {
            Ok(results) => {
                for r in &results {
                    progress(&format!(
                        "query {}: ours {:.1} ms, DuckDB {:.1} ms ({:.2}×){}",
                        r.name,
                        r.ours_ms,
                        r.duckdb_ms,
                        r.ratio,
                        if r.rows_match { "" } else { ", ROWS DIFFER" }
                    ));
                }
                json!(results.iter().map(|r| r.to_json()).collect::<Vec<_>>())
            }
            Err(e) => {
                failures.push(format!("queries: {e}"));
                json!({ "error": e })
            }
        };
        server.stop()?;
        value
    } else {
        json!({ "skipped": "--no-queries" })
    };

    // 6. Window throughput (the server is down: the bench has the machine).
    let window = if o.window {
        progress("window throughput: cargo bench -- window_tumble_avg");
        match window_bench(o) {
            Ok(v) => {
                progress(&format!(
                    "window_tumble_avg: {:.2} M events/s (criterion median)",
                    f(&v, "events_per_s") / 1e6
                ));
                v
            }
            Err(e) => {
                failures.push(format!("window: {e}"));
                json!({ "error": e })
            }
        }
    } else {
        json!({ "skipped": "--no-window" })
    };

    let results = json!({
        "date": utc_now(),
        "command": o.command_line,
        "commit": git_commit(),
        "machine": machine(),
        "quick": o.quick,
        "duration_s": o.duration_s,
        "server_idle_rss_bytes": idle_rss,
        "ingest": ingest,
        "mosquitto": mqtt,
        "latency": latency,
        "storage": storage,
        "queries": queries,
        "window": window,
        "failures": failures,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = o.results.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &o.results,
        serde_json::to_vec_pretty(&results).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("writing {}: {e}", o.results.display()))?;
    let section = markdown(&results);
    write_section(&o.out, &section)?;
    println!("{}", summary(&results));
    progress(&format!(
        "wrote {} and {} in {:.0} s",
        o.out.display(),
        o.results.display(),
        started.elapsed().as_secs_f64()
    ));
    if o.keep {
        let kept = work.keep();
        progress(&format!("kept {}", kept.display()));
    }
    Ok(failures)
}

fn latency_runs(
    o: &Options,
    server: &mut Server,
    failures: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no tokio runtime: {e}"))?;
    let mut rows = Vec::new();
    for rate in [10_000u64, 50_000] {
        server.check_alive()?;
        let options = latency::LatencyOptions {
            quic: server.quic()?,
            ca: server.data_dir.join("tls/ca.pem"),
            api: server.http()?,
            admin_token: server.admin_token()?,
            rate,
            duration: Duration::from_secs(if o.quick { 2 } else { 6 }),
            devices: 100,
        };
        progress(&format!("latency: {rate} events/s through a filter rule"));
        let sampler = RssSampler::start(server.pid());
        let result = runtime.block_on(latency::event_to_command(&options));
        let peak = sampler.finish();
        match result {
            Ok(r) => {
                progress(&format!(
                    "latency at {rate}/s (achieved {:.0}/s): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, \
                     {} of {} commands",
                    r.achieved_rate,
                    r.p50_ms,
                    r.p99_ms,
                    r.p999_ms,
                    r.commands_received,
                    r.commands_expected
                ));
                for stage in &r.stages {
                    progress(&format!(
                        "  {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                        stage.name, stage.p50_ms, stage.p99_ms, stage.max_ms
                    ));
                }
                let mut v = r.to_json();
                v["server_peak_rss_bytes"] = json!(peak);
                rows.push(v);
            }
            Err(e) => {
                failures.push(format!("latency at {rate}/s: {e}"));
                rows.push(json!({ "rate": rate, "error": e }));
            }
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// The machine

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_commit() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .current_dir(repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "mem_gib": mem_kb as f64 / 1024.0 / 1024.0,
        "kernel": kernel,
    })
}

// ---------------------------------------------------------------------------
// Reporting

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}"))
}

/// 1234567 → "1,234,567".
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

/// The best mosquitto QoS 1 rate of the run.
fn mqtt_best(mqtt: &Value) -> Option<f64> {
    mqtt["runs"]
        .as_array()?
        .iter()
        .filter_map(|r| r["msgs_per_s"].as_f64())
        .reduce(f64::max)
}

fn ingest_target(row: &Value, mqtt: Option<f64>) -> String {
    let rate = f(row, "events_per_s");
    let batch = row["batch"].as_u64().unwrap_or(0);
    match (row["encoding"].as_str(), batch) {
        (Some("json"), 100) => format!("≥ 1,000,000: {}", verdict(rate >= 1e6)),
        (Some("arrow"), 100 | 1000) => format!("≥ 3,000,000: {}", verdict(rate >= 3e6)),
        (_, 1) => match mqtt {
            Some(m) => format!("≥ mosquitto ({}): {}", thousands(m), verdict(rate >= m)),
            None => "≥ mosquitto QoS 1 (not measured)".into(),
        },
        _ => String::new(),
    }
}

fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(s, "## End-to-end benchmark (`benches/e2e.sh`)\n");
    let _ = writeln!(
        s,
        "Written by `benches/src/bin/e2e.rs`; rerun to replace this section.\n"
    );
    let _ = writeln!(
        s,
        "- **Command:** `{}`",
        r["command"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "- **Machine:** {} × {}, {:.0} GiB RAM, Linux {}",
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        f(m, "mem_gib"),
        m["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "- **Date:** {}; commit {}",
        r["date"].as_str().unwrap_or("?"),
        r["commit"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "- **Setup:** one `tributary serve` on a fresh data directory (fsync before every \
         acknowledgement, per-device rate limits off); the simulator \
         (`tributary simulate --rate 0`, {} s per run) and the server share the machine. \
         Total {:.0} s.{}\n",
        r["duration_s"],
        f(r, "wall_s"),
        if r["quick"].as_bool() == Some(true) {
            " **Quick mode: a reduced matrix, not for comparison.**"
        } else {
            ""
        }
    );

    // Ingest.
    let mqtt = &r["mosquitto"];
    let best = mqtt_best(mqtt);
    let _ = writeln!(s, "### Ingest\n");
    let _ = writeln!(
        s,
        "Acknowledged events/s (each acknowledgement after the append is durable), \
         acknowledgement latency per frame, and the server's peak resident memory during \
         the run (sampled every 100 ms). Idle server: {:.0} MiB. Each device keeps as many \
         events unacknowledged as a mosquitto_pub client below has messages ({}), in at \
         least {} frames (*frames in flight*). *Parquet behind, caught up*: the events \
         acknowledged but not yet in Parquet when the run ended (the sink's \
         `tributary_consumer_lag_events`), and how long the sink took to store them. It \
         flushes every 100,000 events, or 5 s after an event came (`--flush-rows`, \
         `--flush-interval`), so a few seconds means it kept up. The next run starts once \
         the sink has caught up (or after {} s), and the server's peak memory includes \
         that wait.\n",
        f(r, "server_idle_rss_bytes") / MIB,
        MQTT_INFLIGHT,
        SIM_MIN_WINDOW,
        STORED_WITHIN.as_secs()
    );
    let _ = writeln!(
        s,
        "| payload | devices | events/frame | frames in flight | acked events/s | p50 ms | p99 ms | p99.9 ms | server peak MiB | Parquet behind, caught up | rejected | errors | target |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let mut peak_all = 0.0f64;
    let mut hwm_all = 0.0f64;
    for row in r["ingest"].as_array().into_iter().flatten() {
        let peak = f(row, "server_peak_rss_bytes") / MIB;
        peak_all = peak_all.max(peak);
        hwm_all = hwm_all.max(f(row, "server_hwm_bytes") / MIB);
        if let Some(e) = row["error"].as_str() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | failed: {} | | | | {:.0} | | | | |",
                row["encoding"].as_str().unwrap_or("?"),
                row["devices"],
                row["batch"],
                row["window"],
                e.replace('|', "/"),
                peak
            );
            continue;
        }
        let lat = &row["ack_latency_ms"];
        let rejected = row["rejected"].as_u64().unwrap_or(0);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            if row["encoding"] == "json" {
                "JSON"
            } else {
                "Arrow IPC"
            },
            row["devices"],
            row["batch"],
            row["window"],
            thousands(f(row, "events_per_s")),
            fmt_ms(lat["p50"].as_f64()),
            fmt_ms(lat["p99"].as_f64()),
            fmt_ms(lat["p999"].as_f64()),
            peak,
            parquet_behind(row),
            if rejected > 0 {
                format!("{rejected} {}", row["rejections"])
            } else {
                "0".into()
            },
            row["errors"].as_u64().unwrap_or(0),
            ingest_target(row, best),
        );
    }
    let _ = writeln!(
        s,
        "\nServer memory over the ingest runs: sampled peak {peak_all:.0} MiB, VmHWM \
         {hwm_all:.0} MiB (target < 1 GiB: {}).\n",
        verdict(peak_all.max(hwm_all) < 1024.0)
    );

    // mosquitto.
    let _ = writeln!(s, "### The peer: mosquitto, QoS 1, same JSON events\n");
    if let Some(skip) = mqtt["skipped"].as_str().or(mqtt["error"].as_str()) {
        let _ = writeln!(s, "mosquitto: {skip}.\n");
    } else {
        let _ = writeln!(
            s,
            "mosquitto {} (memory only, no subscribers), fed by parallel \
             `mosquitto_pub -q 1 -l -M {}` clients, one topic each, lines from the simulator's \
             telemetry. A client exits after its last acknowledgement; msgs/s counts what the \
             broker received (`$SYS/broker/publish/messages/received`) over the time until the \
             last client exited. Each client gets at most {} lines: mosquitto_pub's 16-bit \
             message ids wrap past 65,535, and with `-l` it then stops at the first \
             acknowledgement of its last id, early, dropping the rest.\n",
            mqtt["version"].as_str().unwrap_or("?"),
            mqtt["inflight"],
            thousands(MQTT_MAX_LINES_PER_CLIENT as f64)
        );
        let _ = writeln!(
            s,
            "| clients | messages sent | broker received | msgs/s | broker peak MiB |"
        );
        let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: |");
        for run in mqtt["runs"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} |",
                run["clients"],
                thousands(f(run, "sent")),
                run["broker_received"]
                    .as_f64()
                    .map_or("?".into(), thousands),
                thousands(f(run, "msgs_per_s")),
                f(run, "broker_peak_rss_bytes") / MIB
            );
        }
        let _ = writeln!(s);
        if let Some(best) = best {
            let _ = writeln!(
                s,
                "One event per frame, beside mosquitto's best QoS 1 rate ({} msgs/s):\n",
                thousands(best)
            );
            let _ = writeln!(s, "| payload | devices | acked events/s | ÷ mosquitto |");
            let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
            for row in r["ingest"].as_array().into_iter().flatten() {
                if row["batch"].as_u64() == Some(1) && row["error"].is_null() {
                    let rate = f(row, "events_per_s");
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {:.2}× |",
                        row["encoding"].as_str().unwrap_or("?"),
                        row["devices"],
                        thousands(rate),
                        rate / best
                    );
                }
            }
            let _ = writeln!(s);
        }
    }

    // Latency.
    let _ = writeln!(s, "### Event → command latency\n");
    let _ = writeln!(
        s,
        "A filter rule answers hot events with a command to the sending device; latency is \
         from just before the event's frame is written until its command is decoded on the \
         device (`benches/src/latency.rs`). Target: p99 ≤ 5 ms at 50,000 events/s.\n"
    );
    let _ = writeln!(
        s,
        "| rate events/s | achieved | commands | p50 ms | p99 ms | p99.9 ms | max ms | target |"
    );
    let _ = writeln!(
        s,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for row in r["latency"].as_array().into_iter().flatten() {
        if let Some(skip) = row["skipped"].as_str() {
            let _ = writeln!(s, "| skipped ({skip}) | | | | | | | |");
            continue;
        }
        if let Some(e) = row["error"].as_str() {
            let _ = writeln!(
                s,
                "| {} | failed: {} | | | | | | |",
                thousands(f(row, "rate")),
                e.replace('|', "/")
            );
            continue;
        }
        let rate = row["rate"].as_u64().unwrap_or(0);
        let target = if rate == 50_000 {
            format!("p99 ≤ 5 ms: {}", verdict(f(row, "p99_ms") <= 5.0))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            thousands(rate as f64),
            thousands(f(row, "achieved_rate")),
            row["commands_received"],
            row["commands_expected"],
            f(row, "p50_ms"),
            f(row, "p99_ms"),
            f(row, "p999_ms"),
            f(row, "max_ms"),
            target
        );
    }
    let _ = writeln!(s);
    let staged: Vec<&Value> = r["latency"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["stages"].as_array().is_some_and(|s| !s.is_empty()))
        .collect();
    if !staged.is_empty() {
        let _ = writeln!(
            s,
            "Where the time goes, from the command queue's timestamps (milliseconds, so each \
             leg is good to about 1 ms): *event → queued* is the gateway, the log's fsync and \
             the rule; *queued → delivering* the queue's insert (its fsync) and the device \
             session's wake-up; *delivering → device* reading the queue, marking the command \
             delivered and the frame's way to the device.\n"
        );
        let _ = writeln!(s, "| rate events/s | stage | p50 ms | p99 ms | max ms |");
        let _ = writeln!(s, "| ---: | --- | ---: | ---: | ---: |");
        for row in staged {
            for stage in row["stages"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {:.1} | {:.1} |",
                    thousands(f(row, "rate")),
                    stage["stage"].as_str().unwrap_or("?"),
                    f(stage, "p50_ms"),
                    f(stage, "p99_ms"),
                    f(stage, "max_ms"),
                );
            }
        }
        let _ = writeln!(s);
    }

    // Queries.
    let _ = writeln!(
        s,
        "### Queries over the same Parquet files: Tributary and DuckDB\n"
    );
    let _ = writeln!(
        s,
        "After a restart (so everything is in Parquet) and once the server is quiet (under 5% \
         of a core over a second), each query through `POST /api/v1/sql` \
         and through DuckDB (`benches/queries.py`) over the stream's files; medians of \
         several runs after a warm-up (`benches/src/queries.rs`). Target: each ≤ 1.0× \
         DuckDB.\n"
    );
    match r["queries"].as_array() {
        Some(qs) => {
            let _ = writeln!(
                s,
                "| query | ours ms | DuckDB ms | ours ÷ DuckDB | rows agree | target |"
            );
            let _ = writeln!(s, "| --- | ---: | ---: | ---: | --- | --- |");
            for q in qs {
                let ratio = f(q, "ratio");
                let _ = writeln!(
                    s,
                    "| `{}` | {:.1} | {:.1} | {:.2}× | {} | {} |",
                    q["name"].as_str().unwrap_or("?"),
                    f(q, "ours_ms"),
                    f(q, "duckdb_ms"),
                    ratio,
                    if q["rows_match"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "**no**"
                    },
                    verdict(ratio <= 1.0)
                );
            }
            if let Some(note) = qs.first().and_then(|q| q["note"].as_str()) {
                let _ = writeln!(s, "\n({note})");
            }
        }
        None => {
            let why = r["queries"]["skipped"]
                .as_str()
                .or(r["queries"]["error"].as_str())
                .unwrap_or("?");
            let _ = writeln!(s, "Not measured: {why}.");
        }
    }
    let _ = writeln!(s);

    // Storage.
    let st = &r["storage"];
    let _ = writeln!(s, "### Storage\n");
    if let Some(e) = st["error"].as_str() {
        let _ = writeln!(s, "Not measured: {e}.\n");
    } else {
        let per = f(st, "parquet_bytes_per_event");
        let _ = writeln!(
            s,
            "The `{STREAM}` stream after the server stopped: {} Parquet files, {} bytes, {} rows \
             (counted from the files' footers; the simulator runs had {} acknowledged). Raw \
             JSON: the simulator's event lines, averaged over 10,000 (without the newline).\n",
            st["files"],
            thousands(f(st, "bytes")),
            thousands(f(st, "rows")),
            thousands(f(st, "acked_by_simulator"))
        );
        let _ = writeln!(
            s,
            "| Parquet bytes/event | raw JSON bytes/event | JSON ÷ Parquet | target |"
        );
        let _ = writeln!(s, "| ---: | ---: | ---: | --- |");
        let _ = writeln!(
            s,
            "| {:.2} | {:.1} | {:.1}× | ≤ 10 B/event: {} |\n",
            per,
            f(st, "json_bytes_per_event"),
            f(st, "ratio"),
            verdict(per <= 10.0)
        );
    }

    // Window.
    let w = &r["window"];
    let _ = writeln!(s, "### Window throughput (`window_tumble_avg`)\n");
    if let Some(why) = w["skipped"].as_str().or(w["error"].as_str()) {
        let _ = writeln!(s, "Not measured: {why}.\n");
    } else {
        let _ = writeln!(
            s,
            "The criterion bench (`cargo bench -p tributary-cli -p tributary-benches --bench tributary -- window_tumble_avg`; see \
             the section above for what it runs): criterion median {} events/s over {} events. \
             Its reference table, same process:\n",
            thousands(f(w, "events_per_s")),
            thousands(f(w, "events"))
        );
        let _ = writeln!(s, "| engine | best events/s | median events/s |");
        let _ = writeln!(s, "| --- | ---: | ---: |");
        for e in w["reference"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                e["engine"].as_str().unwrap_or("?"),
                thousands(f(e, "best_events_per_s")),
                thousands(f(e, "median_events_per_s"))
            );
        }
        if let Some(skip) = w["reference_skipped"].as_str() {
            let _ = writeln!(s, "\n{skip}");
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "### Reference numbers (published, other machines)\n");
    let _ = writeln!(s, "| system | figure |");
    let _ = writeln!(s, "| --- | --- |");
    let _ = writeln!(s, "| EMQX | 2,000,000 msg/s QoS 0 on one 64-core node |");
    let _ = writeln!(s, "| eKuiper | 12,000–150,000 msg/s on small boxes |");
    let _ = writeln!(s, "| Azure IoT Hub | 6,000 msg/s per S3 unit |");
    let _ = writeln!(
        s,
        "| DuckDB, mosquitto | measured above, same run, same machine |"
    );

    if let Some(fs) = r["failures"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(s, "\n**Failures in this run:**\n");
        for e in fs {
            let _ = writeln!(s, "- {}", e.as_str().unwrap_or("?").replace('\n', " "));
        }
    }
    s
}

fn summary(r: &Value) -> String {
    let mut s = String::from("e2e summary\n");
    for row in r["ingest"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  ingest {:5} {:>4} devices batch {:>4}: {:>12} ev/s  p99 {:>8} ms  server peak {:>5.0} MiB{}",
            row["encoding"].as_str().unwrap_or("?"),
            row["devices"],
            row["batch"],
            thousands(f(row, "events_per_s")),
            fmt_ms(row["ack_latency_ms"]["p99"].as_f64()),
            f(row, "server_peak_rss_bytes") / MIB,
            row["error"]
                .as_str()
                .map_or(String::new(), |e| format!("  FAILED: {e}"))
        );
    }
    for run in r["mosquitto"]["runs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  mosquitto QoS 1, {:>3} clients: {:>12} msgs/s",
            run["clients"],
            thousands(f(run, "msgs_per_s"))
        );
    }
    if let Some(skip) = r["mosquitto"]["skipped"].as_str() {
        let _ = writeln!(s, "  mosquitto: {skip}");
    }
    for row in r["latency"].as_array().into_iter().flatten() {
        if row["p99_ms"].is_number() {
            let _ = writeln!(
                s,
                "  latency at {:>6}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                row["rate"],
                f(row, "p50_ms"),
                f(row, "p99_ms"),
                f(row, "p999_ms")
            );
        }
    }
    for q in r["queries"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  query {:<18} ours {:>9.1} ms  DuckDB {:>9.1} ms  {:.2}×",
            q["name"].as_str().unwrap_or("?"),
            f(q, "ours_ms"),
            f(q, "duckdb_ms"),
            f(q, "ratio")
        );
    }
    if r["storage"]["rows"].is_number() {
        let _ = writeln!(
            s,
            "  storage: {:.2} bytes/event Parquet, {:.1} raw JSON ({} rows)",
            f(&r["storage"], "parquet_bytes_per_event"),
            f(&r["storage"], "json_bytes_per_event"),
            r["storage"]["rows"]
        );
    }
    if r["window"]["events_per_s"].is_number() {
        let _ = writeln!(
            s,
            "  window_tumble_avg: {} events/s",
            thousands(f(&r["window"], "events_per_s"))
        );
    }
    for e in r["failures"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "  FAILED: {}", e.as_str().unwrap_or("?"));
    }
    s.trim_end().to_string()
}

/// Replaces what lies between the markers in `path` (appending them if
/// absent).
fn write_section(path: &Path, section: &str) -> Result<(), String> {
    const BEGIN: &str = "<!-- e2e:begin -->";
    const END: &str = "<!-- e2e:end -->";
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{}\n{END}", section.trim_end());
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => {
            let mut s = old.trim_end().to_string();
            if !s.is_empty() {
                s.push_str("\n\n");
            }
            s.push_str(&block);
            s.push('\n');
            s
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(path, new).map_err(|e| format!("writing {}: {e}", path.display()))
}
