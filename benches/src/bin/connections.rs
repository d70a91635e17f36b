//! Load check: many concurrent device connections to one server.
//!
//! Starts `tributary serve` (the release binary next to this one, or
//! `TRIBUTARY_BIN`) on a temporary data directory, creates one enrollment
//! group through the API, and opens `--devices` QUIC connections from this
//! process, spread over several client endpoints (`--per-endpoint`
//! connections share one UDP socket). Each device derives its key from the
//! group's (docs/security.md, section 6), says HELLO naming the group (its
//! first connection enrolls it), waits for WELCOME, then holds the
//! connection and sends a PING now and then. It reports the server's
//! resident memory (VmRSS) before the first connection and with all of them
//! up, the memory per connection, the time to connect them all, and how
//! many connections failed or dropped while held.
//!
//! Not a timed test: run it by hand, `benches/connections.sh` builds and
//! runs it, and record the result in docs/benchmarks.md ("Connections").
//!
//! ```text
//! connections [--devices N] [--per-endpoint N] [--parallel N] [--hold-s S]
//!             [--ping-s S] [--settle-s S] [-- <extra `tributary serve` flags>]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tributary_ingest::protocol::{self, Frame, FrameDecoder, Hello};
use tributary_tests::{derive_device_key, health, http_json, sign_token, unix_now};

/// The enrollment group every device names.
const GROUP: &str = "bench";

struct Options {
    devices: usize,
    per_endpoint: usize,
    parallel: usize,
    hold: Duration,
    ping: Duration,
    settle: Duration,
    serve_args: Vec<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        devices: 10_000,
        per_endpoint: 1_000,
        parallel: 200,
        hold: Duration::from_secs(60),
        ping: Duration::from_secs(20),
        settle: Duration::from_secs(10),
        serve_args: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--devices" => o.devices = value("--devices")? as usize,
            "--per-endpoint" => o.per_endpoint = (value("--per-endpoint")? as usize).max(1),
            "--parallel" => o.parallel = (value("--parallel")? as usize).max(1),
            "--hold-s" => o.hold = Duration::from_secs(value("--hold-s")?),
            "--ping-s" => o.ping = Duration::from_secs(value("--ping-s")?.max(1)),
            "--settle-s" => o.settle = Duration::from_secs(value("--settle-s")?),
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            "--" => {
                o.serve_args = args.by_ref().collect();
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// The `tributary` binary: `TRIBUTARY_BIN`, or the one beside this one.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRIBUTARY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .map(|dir| dir.join("tributary"))
        .unwrap_or_else(|| PathBuf::from("tributary"))
}

/// The server under test; killed when dropped.
struct Server {
    child: Child,
    data_dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[String]) -> Server {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let data_dir = temp.path().join("data");
        let bin = binary();
        let child = Command::new(&bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--quic-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let server = Server {
            child,
            data_dir,
            _temp: temp,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.http().is_some_and(|a| health(&a)) {
            assert!(Instant::now() < deadline, "the server did not start in 60s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn info(&self, key: &str) -> Option<String> {
        let bytes = std::fs::read(self.data_dir.join("server.json")).ok()?;
        let info: Value = serde_json::from_slice(&bytes).ok()?;
        info.get(key)?.as_str().map(str::to_string)
    }

    fn http(&self) -> Option<String> {
        self.info("http")
    }

    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("the server wrote its admin token");
        let addr = self.http().expect("the HTTP address");
        http_json(&addr, method, path, Some(token.trim()), body)
    }

    /// The server's resident memory, bytes (VmRSS of /proc/<pid>/status).
    fn rss(&self) -> u64 {
        rss_of(&format!("/proc/{}/status", self.child.id()))
    }

    /// The server's threads (Threads of /proc/<pid>/status).
    fn threads(&self) -> u64 {
        status_field(&format!("/proc/{}/status", self.child.id()), "Threads:")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_field(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_of(status: &str) -> u64 {
    status_field(status, "VmRSS:") * 1024
}

/// GET /metrics as text (plain HTTP/1.1 over std).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of one unlabelled sample in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What the held connections report.
#[derive(Default)]
struct Tally {
    connected: AtomicUsize,
    connect_errors: AtomicUsize,
    /// Connections that ended while they should have been held.
    dropped: AtomicUsize,
    pongs: AtomicU64,
}

/// An authenticated session: the connection, its session stream, and what
/// was read of it.
struct Session {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// Connects one device and says HELLO; returns the session once WELCOME
/// arrived.
async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    device: &str,
    token: String,
) -> Result<Session, String> {
    let connection = endpoint
        .connect(server, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Frame::Hello(Hello {
        version: protocol::VERSION,
        device_id: device.to_string(),
        token,
        commands: false,
        idempotent: false,
        group: Some(GROUP.to_string()),
        twin: false,
    });
    send.write_all(&hello.encode_to_vec())
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new(protocol::DEFAULT_MAX_FRAME_BYTES);
    loop {
        match decoder.next_frame().map_err(|e| e.to_string())? {
            Some(Frame::Welcome(_)) => {
                return Ok(Session {
                    connection,
                    send,
                    recv,
                    decoder,
                });
            }
            Some(Frame::Error(e)) => return Err(format!("ERROR {}: {}", e.code, e.message)),
            Some(other) => return Err(format!("got {} before WELCOME", other.frame_type().name())),
            None => {}
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Err("the server finished the stream".into()),
            Err(quinn::ReadError::ConnectionLost(e)) => {
                return Err(format!("connection lost before WELCOME: {e}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Holds a session: a PING every `ping` (first one after a random part of
/// it, so they spread), PONGs counted, until `stop` turns true.
async fn hold(
    session: Session,
    ping: Duration,
    offset: Duration,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let Session {
        connection,
        mut send,
        mut recv,
        mut decoder,
    } = session;
    let mut next = tokio::time::Instant::now() + offset;
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(next) => {
                nonce += 1;
                if send.write_all(&Frame::Ping(nonce).encode_to_vec()).await.is_err() {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                next += ping;
            }
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk.bytes);
                    while let Ok(Some(frame)) = decoder.next_frame() {
                        if let Frame::Pong(_) = frame {
                            tally.pongs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ => {
                    if !*stop.borrow() {
                        tally.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            },
        }
    }
    let _ = send.finish();
    connection.close(0u32.into(), b"done");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("connections: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let ok = runtime.block_on(run(options));
    if !ok {
        std::process::exit(1);
    }
}

async fn run(o: Options) -> bool {
    let n = o.devices;
    let fd_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into());
    let endpoints_n = n.div_ceil(o.per_endpoint).max(1);
    println!(
        "devices {n}, {endpoints_n} client endpoints (UDP sockets), {} connecting at once; \
         open-files limit {fd_limit}",
        o.parallel
    );
    let server = tokio::task::block_in_place(|| Server::start(&o.serve_args));
    let quic: SocketAddr = server
        .info("quic")
        .and_then(|a| a.parse().ok())
        .expect("the server wrote its QUIC address");
    let http = server.http().unwrap_or_default();
    let (status, group) = tokio::task::block_in_place(|| {
        server.api(
            "POST",
            "/api/v1/enrollment-groups",
            Some(&json!({ "name": GROUP })),
        )
    });
    assert_eq!(status, 201, "creating the enrollment group: {group}");
    let group_key = group["primary_key"]
        .as_str()
        .expect("the group's primary key")
        .to_string();

    // Every token made before the clock starts: signing is the device's
    // work, not the server's.
    let expires = unix_now() + 86_400;
    let credentials: Vec<(String, String)> = (0..n)
        .map(|i| {
            let id = format!("bench-{i:06}");
            let key = derive_device_key(&group_key, &id);
            let token = sign_token(&id, &key, expires);
            (id, token)
        })
        .collect();
    let client_config = tributary_ingest::tls::client_config(&server.data_dir.join("tls/ca.pem"))
        .expect("the client TLS configuration");
    let endpoints: Vec<quinn::Endpoint> = (0..endpoints_n)
        .map(|_| {
            let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address"))
                .expect("a client endpoint");
            e.set_default_client_config(client_config.clone());
            e
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = server.rss();
    let threads_before = server.threads();
    println!(
        "server RSS before: {:.1} MiB ({} threads)",
        mib(rss_before),
        threads_before
    );

    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(o.parallel));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let mut connecting = Vec::with_capacity(n);
    for (i, (id, token)) in credentials.into_iter().enumerate() {
        let endpoint = endpoints[i / o.per_endpoint].clone();
        let permit = gate.clone().acquire_owned().await.expect("the semaphore");
        let counts = tally.clone();
        let stop = stop.clone();
        let first_error = first_error.clone();
        let ping = o.ping;
        let offset = ping.mul_f64((i % 997) as f64 / 997.0);
        connecting.push(tokio::spawn(async move {
            let connected = tokio::time::timeout(
                Duration::from_secs(60),
                connect(&endpoint, quic, &id, token),
            )
            .await
            .unwrap_or_else(|_| Err("no WELCOME within 60 s".into()));
            drop(permit);
            match connected {
                Ok(session) => {
                    counts.connected.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(hold(session, ping, offset, counts, stop));
                }
                Err(e) => {
                    counts.connect_errors.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("{id}: {e}"));
                }
            }
        }));
        if (i + 1) % 1000 == 0 {
            println!(
                "  {} started, {} connected, {:.1} s",
                i + 1,
                tally.connected.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }
    for task in connecting {
        let _ = task.await;
    }
    let connect_time = started.elapsed();
    let connected = tally.connected.load(Ordering::Relaxed);
    let connect_errors = tally.connect_errors.load(Ordering::Relaxed);
    println!(
        "connected {connected}/{n} in {:.1} s ({:.0} connections/s), {connect_errors} errors",
        connect_time.as_secs_f64(),
        connected as f64 / connect_time.as_secs_f64()
    );
    if let Some(e) = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        println!("  first error: {e}");
    }

    tokio::time::sleep(o.settle).await;
    let rss_after = server.rss();
    let threads_after = server.threads();
    let metrics = tokio::task::block_in_place(|| scrape(&http));
    let open = metric(&metrics, "tributary_connections_open");
    let devices = metric(&metrics, "tributary_devices_connected");
    let per_connection = rss_after.saturating_sub(rss_before) as f64 / connected.max(1) as f64;
    println!(
        "server RSS with {connected} connected: {:.1} MiB ({threads_after} threads); \
         delta {:.1} MiB, {:.1} KiB per connection",
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before)),
        per_connection / 1024.0
    );
    println!(
        "server /metrics: tributary_connections_open {}, tributary_devices_connected {}",
        open.map_or("?".into(), |v| v.to_string()),
        devices.map_or("?".into(), |v| v.to_string())
    );
    println!(
        "this process (the clients) RSS: {:.1} MiB",
        mib(rss_of("/proc/self/status"))
    );

    println!("holding for {} s ...", o.hold.as_secs());
    tokio::time::sleep(o.hold).await;
    let rss_held = server.rss();
    let dropped = tally.dropped.load(Ordering::Relaxed);
    let metrics = tokio::task::block_in_place(|| scrape(&http));
    println!(
        "after holding: server RSS {:.1} MiB; {dropped} connections dropped; {} PONGs; \
         tributary_connections_open {}",
        mib(rss_held),
        tally.pongs.load(Ordering::Relaxed),
        metric(&metrics, "tributary_connections_open").map_or("?".into(), |v| v.to_string()),
    );
    let _ = stop_tx.send(true);
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_idle()).await;
    }
    println!(
        "RESULT devices={n} connected={connected} connect_errors={connect_errors} \
         dropped={dropped} connect_s={:.1} rss_before_mib={:.1} rss_after_mib={:.1} \
         bytes_per_connection={:.0}",
        connect_time.as_secs_f64(),
        mib(rss_before),
        mib(rss_after),
        per_connection
    );
    drop(server);
    connected == n && dropped == 0
}
