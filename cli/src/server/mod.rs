//! `tributary serve`: every part of Tributary in one process.

pub mod http;
pub mod sql;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use tokio::sync::{broadcast, watch};
use tributary_engine::catalog::Catalog;
use tributary_engine::commands::CommandQueue;
use tributary_engine::event::now_millis;
use tributary_engine::log::{EmbeddedLog, LogOptions, SharedEventStream};
use tributary_engine::rule::RuleRuntime;
use tributary_ingest::gateway::{
    DEFAULT_CONNECTION_LIMITS, DEFAULT_DEVICE_RATE, Gateway, GatewayConfig, GatewayDeps,
};
use tributary_ingest::limits::{ConnectionLimits, RateLimits};
use tributary_ingest::tls::TlsFiles;
use tributary_registry::{PostgresRegistry, SharedRegistry, SqliteRegistry};
use tributary_sinks::parquet::{ParquetSinks, SinkOptions, Storage};
use tributary_sql::query::{QueryEngine, StreamData, StreamSource};

use crate::datadir::{DataDir, ServerInfo};

/// Options of `tributary serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where everything is kept.
    #[arg(long, env = "TRIBUTARY_DATA_DIR", default_value = crate::datadir::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// UDP address of the QUIC gateway.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub quic_listen: SocketAddr,
    /// TCP address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub http_listen: SocketAddr,
    /// Write a Parquet file once events have waited this long (e.g. 500ms, 5s, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// Write a Parquet file once this many events are buffered.
    #[arg(long, default_value_t = 100_000)]
    pub flush_rows: usize,
    /// fsync the event log before acknowledging: `always` (safe against power
    /// loss) or `never` (safe against a crash of the process only).
    #[arg(long, value_enum, default_value_t = Fsync::Always)]
    pub fsync: Fsync,
    /// Most disk the event log may use, all streams together (e.g. 512MiB,
    /// 20GiB). Past it, consumed events are deleted early; if consumers are
    /// too far behind, devices are told to retry later. Default: no limit.
    #[arg(long, value_parser = parse_bytes)]
    pub log_max_bytes: Option<u64>,
    /// Where the device registry lives: `sqlite` (registry.db in the data
    /// directory) or a PostgreSQL URL,
    /// postgres://user:password@host:port/database. Either way the master
    /// key that seals device keys stays in the data directory (registry.key).
    #[arg(
        long,
        env = "TRIBUTARY_REGISTRY",
        default_value = "sqlite",
        value_parser = parse_registry,
        hide_env_values = true
    )]
    pub registry: RegistryLocation,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The gateway's limits (docs/protocol.md section 12). For the rates and
/// connection counts, 0 means no limit; frame sizes and timeouts always
/// have one.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Largest frame a device may send (e.g. 4MiB); advertised in WELCOME.
    #[arg(long, default_value = "4MiB", value_parser = parse_frame_bytes)]
    pub max_frame_bytes: u32,
    /// Most events in one EVENTS frame (at least 1); advertised in WELCOME.
    #[arg(
        long,
        default_value_t = tributary_ingest::protocol::DEFAULT_MAX_EVENTS_PER_FRAME,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_events_per_frame: u32,
    /// Events per second each device may send, unless its metadata says
    /// otherwise ({"limits": {"events_per_s": N}}). 0: no limit.
    #[arg(long, default_value_t = DEFAULT_DEVICE_RATE.events_per_s)]
    pub device_events_per_s: u64,
    /// Bytes of payload per second each device may send (e.g. 64MiB),
    /// unless its metadata says otherwise ({"limits": {"bytes_per_s": N}}).
    /// 0: no limit.
    #[arg(long, default_value = "64MiB", value_parser = parse_limit_bytes)]
    pub device_bytes_per_s: u64,
    /// Memory the devices' frames in flight may hold, all devices together
    /// (e.g. 1GiB): half as QUIC receive windows shared among the
    /// connections (64KiB to 1.25MB each), half for decoded events waiting
    /// for the disk. A device past it waits, held back by QUIC flow
    /// control. 0: no limit (each connection then gets 1.25MB).
    #[arg(long, default_value = "1GiB", value_parser = parse_limit_bytes)]
    pub max_in_flight_bytes: u64,
    /// Connections open at once; more are refused before their handshake.
    #[arg(long, default_value_t = DEFAULT_CONNECTION_LIMITS.max_connections)]
    pub max_connections: usize,
    /// Connections open at once that have not authenticated yet.
    #[arg(long, default_value_t = DEFAULT_CONNECTION_LIMITS.max_pending)]
    pub max_pending_connections: usize,
    /// New connections per second (bursts of a second's worth).
    #[arg(long, default_value_t = DEFAULT_CONNECTION_LIMITS.per_second)]
    pub connection_rate: u64,
    /// Time a new connection has to finish its handshake and send HELLO.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub hello_timeout: Duration,
    /// A connection silent for this long is dropped.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub idle_timeout: Duration,
    /// How often the server sends keep-alives to a quiet device; 0s: never.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub keep_alive: Duration,
}

impl LimitArgs {
    /// The gateway configuration with these limits.
    pub fn gateway_config(&self, listen: SocketAddr, tls: TlsFiles) -> Result<GatewayConfig> {
        if !self.keep_alive.is_zero() && self.keep_alive >= self.idle_timeout {
            anyhow::bail!(
                "--keep-alive {:?} must be shorter than --idle-timeout {:?}, or the keep-alives \
                 come too late to hold a quiet connection",
                self.keep_alive,
                self.idle_timeout
            );
        }
        let mut config = GatewayConfig::new(listen, tls);
        config.max_frame_bytes = self.max_frame_bytes;
        config.max_events_per_frame = self.max_events_per_frame;
        config.max_in_flight_bytes = self.max_in_flight_bytes;
        config.device_rate = RateLimits {
            events_per_s: self.device_events_per_s,
            bytes_per_s: self.device_bytes_per_s,
        };
        config.connections = ConnectionLimits {
            max_connections: self.max_connections,
            max_pending: self.max_pending_connections,
            per_second: self.connection_rate,
        };
        config.hello_timeout = self.hello_timeout;
        config.idle_timeout = self.idle_timeout;
        config.keep_alive = (!self.keep_alive.is_zero()).then_some(self.keep_alive);
        Ok(config)
    }
}

/// Parses a timeout: a duration above zero (QUIC takes an idle timeout of
/// zero for none at all).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("a timeout must be longer than 0s".to_string());
    }
    Ok(duration)
}

/// Parses a byte-rate limit: a size, or 0 for none.
fn parse_limit_bytes(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(text)
}

/// Parses `--max-frame-bytes`: a size from 16 bytes to 1 GiB.
fn parse_frame_bytes(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    match u32::try_from(bytes) {
        Ok(n) if (16..=1 << 30).contains(&n) => Ok(n),
        _ => Err(format!(
            "a frame may be 16 bytes to 1GiB, got {bytes} bytes"
        )),
    }
}

/// Where the device registry lives.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryLocation {
    /// `registry.db` in the data directory.
    Sqlite,
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

impl std::fmt::Debug for RegistryLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryLocation::Sqlite => f.write_str("Sqlite"),
            // The URL may hold a password.
            RegistryLocation::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// Parses `--registry`: `sqlite`, or a `postgres://` / `postgresql://` URL.
pub fn parse_registry(text: &str) -> Result<RegistryLocation, String> {
    let text = text.trim();
    if text.is_empty() || text == "sqlite" {
        return Ok(RegistryLocation::Sqlite);
    }
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(RegistryLocation::Postgres(text.to_string()));
    }
    Err("the registry is `sqlite` or a PostgreSQL URL \
         (postgres://user:password@host:port/database)"
        .to_string())
}

/// Parses `1048576`, `512KiB`, `64MiB`, `2GiB` (also `K`, `M`, `G`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size; write it like 512MiB or 2GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit; use KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(scale)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("'{text}' must be more than 0 and fit in 64 bits"))
}

/// When the log fsyncs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Never,
}

/// Longest duration a flag takes: a week.
const MAX_DURATION_SECS: u64 = 7 * 24 * 3600;

/// Parses `250ms`, `5s`, `2m`, `1h` (the units SQL takes; a bare number is
/// seconds), at most a week.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let ms = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        tributary_engine::duration::parse_duration(&format!("{text}s"))?
    } else {
        tributary_engine::duration::parse_duration(text)?
    };
    if ms as u64 > MAX_DURATION_SECS * 1000 {
        return Err(format!("'{text}' is too long; the most is 7 days"));
    }
    Ok(Duration::from_millis(ms as u64))
}

/// Reads a stream's stored events for queries: its Parquet files plus the
/// log's tail past what the sink has written.
pub struct StoredStreams {
    pub storage: Storage,
    pub log: SharedEventStream,
}

#[async_trait]
impl StreamSource for StoredStreams {
    async fn stream_data(&self, stream: &str) -> tributary_sql::Result<StreamData> {
        let snapshot = self
            .storage
            .snapshot(self.log.as_ref(), stream)
            .await
            .map_err(|e| tributary_sql::Error::Storage(e.to_string()))?;
        Ok(StreamData {
            files: snapshot.files,
            tail: snapshot.tail,
        })
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<std::process::ExitCode> {
    init_tracing();
    let dir = DataDir::new(&args.data_dir);
    std::fs::create_dir_all(&dir.root)
        .with_context(|| format!("creating the data directory {}", dir.root.display()))?;
    // Before anything in the directory is opened; held until the server stops.
    let Some(_one_server) = dir.lock()? else {
        anyhow::bail!(
            "another tributary server{} is using the data directory {}; stop it, or give this \
             one its own --data-dir",
            dir.holder(),
            dir.root.display()
        );
    };
    let admin_token = dir.ensure_admin_token()?;
    let tls = TlsFiles::in_dir(&dir.tls());
    if tls.ensure()? {
        tracing::info!(ca = %tls.ca_cert.display(), "created a development CA and server certificate");
    }

    let log: SharedEventStream = Arc::new(EmbeddedLog::open(
        dir.log(),
        LogOptions {
            fsync: args.fsync == Fsync::Always,
            max_bytes: args.log_max_bytes,
            ..LogOptions::default()
        },
    )?);
    let catalog = Arc::new(Catalog::open(&dir.catalog())?);
    let registry: SharedRegistry = match &args.registry {
        RegistryLocation::Sqlite => Arc::new(SqliteRegistry::open(&dir.registry())?),
        RegistryLocation::Postgres(url) => {
            let key_path = SqliteRegistry::key_path(&dir.registry());
            Arc::new(PostgresRegistry::connect(url, &key_path).await?)
        }
    };
    let commands = Arc::new(CommandQueue::open(&dir.commands())?);
    let storage = Storage::local(dir.storage())?;
    let sinks = Arc::new(ParquetSinks::new(
        storage.clone(),
        log.clone(),
        SinkOptions {
            flush_interval: args.flush_interval,
            flush_rows: args.flush_rows,
            ..SinkOptions::default()
        },
    ));
    let rules = Arc::new(RuleRuntime::new(
        log.clone(),
        commands.clone(),
        dir.checkpoints(),
    ));
    let devices = Arc::new(tributary_engine::devices::DeviceTable::default());
    let queries = QueryEngine::new(
        catalog.clone(),
        Arc::new(StoredStreams {
            storage,
            log: log.clone(),
        }),
    )
    .with_devices(devices.clone())
    .with_commands(commands.clone());
    let sql = Arc::new(sql::SqlService {
        catalog: catalog.clone(),
        log: log.clone(),
        rules: rules.clone(),
        sinks: sinks.clone(),
        queries,
        ddl: tokio::sync::Mutex::new(()),
        failed: Default::default(),
        devices_reload: Default::default(),
        devices,
        registry: registry.clone(),
        gateway: Default::default(),
    });
    sql.refresh_devices().await?;
    sql.resume().await?;

    let gateway = Gateway::bind(
        args.limits.gateway_config(args.quic_listen, tls.clone())?,
        GatewayDeps {
            registry: registry.clone(),
            catalog: catalog.clone(),
            log: log.clone(),
            commands: commands.clone(),
        },
    )?;
    let quic_addr = gateway.local_addr()?;
    let _ = sql.gateway.set(gateway.handle());
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen on TCP {}", args.http_listen))?;
    let http_addr = listener.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let router = http::router(http::ApiState {
        sql: sql.clone(),
        registry,
        commands: commands.clone(),
        gateway: gateway.handle(),
        admin_token: Arc::new(http::AdminToken::new(dir.clone(), admin_token)),
        tls: tls.clone(),
    });
    let gateway_task = tokio::spawn(gateway.run(shutdown_rx.clone()));
    let mut http_shutdown = shutdown_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.changed().await;
            })
            .await
    });
    let expiry = tokio::spawn(expire_commands(commands.clone(), shutdown_rx.clone()));
    let devices_task = tokio::spawn(follow_registry(sql.clone(), shutdown_rx.clone()));

    dir.write_server_info(&ServerInfo {
        quic: quic_addr,
        http: http_addr,
        pid: std::process::id(),
    })?;
    tracing::info!(
        quic = %quic_addr,
        http = %http_addr,
        data_dir = %dir.root.display(),
        "Tributary is ready"
    );

    wait_for_signal().await;
    tracing::info!("shutting down: closing connections, flushing Parquet");
    let _ = shutdown_tx.send(true);
    let _ = gateway_task.await;
    let _ = http_task.await;
    let _ = expiry.await;
    let _ = devices_task.await;
    rules.shutdown().await;
    sinks.shutdown().await;
    dir.clear_server_info();
    tracing::info!("stopped");
    Ok(std::process::ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Keeps the SQL `devices` table current for rules: reloads it after the
/// registry announces a change (connections, properties, enrollments,
/// access), gathering what comes in quick succession into one reload.
/// (Queries reload it themselves, so they also see last-seen times move.)
async fn follow_registry(sql: Arc<sql::SqlService>, mut shutdown: watch::Receiver<bool>) {
    /// How long to gather changes before reloading.
    const GATHER: Duration = Duration::from_millis(100);
    let mut changes = sql.registry.changes();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            change = changes.recv() => match change {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
        tokio::time::sleep(GATHER).await;
        // What came in while waiting is covered by this reload.
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = changes.try_recv() {}
        if let Err(e) = sql.refresh_devices().await {
            tracing::error!(error = %e, "could not reload the devices table");
        }
    }
}

/// Marks commands whose time-to-live passed as expired, even for devices
/// that never connect.
async fn expire_commands(commands: Arc<CommandQueue>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = commands.blocking(|q| q.expire(now_millis())).await {
            tracing::error!(error = %e, "expiring commands failed");
        }
        // Every second: a command's status is what callers and SQL see, so
        // `expired` should show within about a second of its expiry.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
        assert!(parse_duration("8d").is_err());
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").unwrap_err().contains("unit"));
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn registry_locations_parse() {
        assert_eq!(parse_registry("sqlite"), Ok(RegistryLocation::Sqlite));
        let url = "postgres://trb:pw@db.internal:5432/registry";
        assert_eq!(
            parse_registry(url),
            Ok(RegistryLocation::Postgres(url.into()))
        );
        assert!(matches!(
            parse_registry("postgresql://localhost/trb"),
            Ok(RegistryLocation::Postgres(_))
        ));
        let err = parse_registry("mysql://localhost/trb").unwrap_err();
        assert!(err.contains("PostgreSQL URL"), "{err}");
        // The password stays out of debug output.
        let shown = format!("{:?}", parse_registry(url).unwrap());
        assert!(!shown.contains("pw"), "{shown}");
    }
}
