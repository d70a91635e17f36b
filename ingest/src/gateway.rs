//! The cloud gateway: the QUIC endpoint devices connect to.
//!
//! Per connection: the device opens the session stream and says HELLO; the
//! gateway checks its credentials against the registry (a token, a token
//! signed with a key derived from an enrollment group's, or the client
//! certificate of the TLS handshake), answers WELCOME, and from then on
//! - decodes each EVENTS frame against its stream's schema and submits the
//!   batch to the event stream in arrival order, answering ACK once the
//!   batch is durable, or REJECT (nothing stored) when a frame is bad;
//! - sends the device its queued commands, at once and whenever new ones
//!   are queued, and records the device's COMMAND_ACKs;
//! - sends the device its desired properties (DESIRED), at once and
//!   whenever they change, and stores the properties it reports (REPORT);
//! - takes a new token on the live session (RENEW).
//!
//! A session lives only as long as its credentials: the gateway keeps each
//! session's token or certificate thumbprint and checks it again whenever
//! the registry announces that the device's right to connect may have
//! changed (disabled, removed, a key rotated, a certificate revoked), and
//! closes the session when its token (or certificate) expires. Either way
//! the device gets an ERROR `unauthorized` that says why.
//!
//! The gateway records each device's connection state in the registry as
//! it changes: connected when its first session is authenticated,
//! disconnected (with the reason) when its last one ends. While connected,
//! the last frame and the last event time live in memory only
//! ([`GatewayHandle::live_state`]) and are stored at the disconnect.
//!
//! The frames of a connection are read by one task, so a device's events
//! reach the log in the order it sent them; many frames may be in flight,
//! and their answers go back in the same order. A connection has at most
//! [`GatewayConfig::max_in_flight`] frames waiting for the disk; past that,
//! the gateway stops reading and QUIC flow control slows the sender. All
//! connections together hold at most [`GatewayConfig::max_in_flight_bytes`]
//! ([`InFlightBudget`]): half as their QUIC receive windows, half for
//! decoded events waiting for the disk; a session whose frame does not fit
//! waits for room the same way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tributary_engine::catalog::Catalog;
use tributary_engine::commands::{Answer, CommandQueue, CommandStatus};
use tributary_engine::event::now_millis;
use tributary_engine::log::{AppendFuture, SharedEventStream};
use tributary_registry::{
    Change, ConnectionState, DeviceLimits, PropertiesUpdate, SharedRegistry, Side,
};

use crate::decode::{ArrowDecoder, decode_json};
use crate::limits::{
    ConnectionGate, ConnectionLimits, DeviceRate, InFlightBudget, RateLimits, Reserved, Slot,
};
use crate::metrics::GatewayMetrics;
use crate::protocol::{
    self, Ack, AckStatus, Command, CommandAck, Desired, Encoding, ErrorBody, ErrorCode, Events,
    Frame, FrameDecoder, Hello, ProtocolError, RefusedCode, RefusedRequest, Reject, RejectCode,
    Renew, Renewed, Report, Reported, Welcome,
};
use crate::receive::ReceiveThread;
use crate::tls::{TlsFiles, TransportLimits, server_config_with};
use crate::{Error, Result};

/// How the gateway listens and what it allows.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// The server's certificate, and the CAs whose client certificates it
    /// accepts ([`TlsFiles::client_ca`]).
    pub tls: TlsFiles,
    pub max_frame_bytes: u32,
    pub max_events_per_frame: u32,
    /// Time a new connection has, from its first packet, to finish the TLS
    /// handshake, open its session stream and say HELLO.
    pub hello_timeout: Duration,
    /// EVENTS frames of one connection waiting for the disk at once.
    pub max_in_flight: usize,
    /// Memory that the frames of all connections together may hold, from
    /// their arrival to their answer ([`InFlightBudget`]); 0 is no limit.
    pub max_in_flight_bytes: u64,
    /// Events and bytes per second each device may send, unless its
    /// registry entry says otherwise (metadata key `limits`).
    pub device_rate: RateLimits,
    /// Connections at once, connections still unauthenticated, new
    /// connections per second.
    pub connections: ConnectionLimits,
    /// A connection that hears nothing from its peer for this long is
    /// dropped.
    pub idle_timeout: Duration,
    /// How often the server sends QUIC keep-alives to an otherwise quiet
    /// device (keeping NAT bindings open from its side); `None`: never.
    pub keep_alive: Option<Duration>,
}

impl GatewayConfig {
    /// The defaults, listening on `listen` with certificates from `tls`.
    pub fn new(listen: SocketAddr, tls: TlsFiles) -> Self {
        GatewayConfig {
            listen,
            tls,
            max_frame_bytes: protocol::DEFAULT_MAX_FRAME_BYTES,
            max_events_per_frame: protocol::DEFAULT_MAX_EVENTS_PER_FRAME,
            hello_timeout: protocol::HELLO_TIMEOUT,
            max_in_flight: 64,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            device_rate: DEFAULT_DEVICE_RATE,
            connections: DEFAULT_CONNECTION_LIMITS,
            idle_timeout: crate::tls::IDLE_TIMEOUT,
            keep_alive: Some(crate::tls::SERVER_KEEP_ALIVE),
        }
    }
}

/// 1 GiB for devices' frames in flight, server-wide ([`InFlightBudget`]).
/// With 1,000 devices each pipelining 8 Arrow frames of 1,000 events, the
/// server otherwise held 1.1 to 1.4 GiB; with this budget 0.7 to 0.8, at
/// the same rate. Smaller budgets held JSON frames back more than they
/// saved (docs/benchmarks.md).
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 1 << 30;

/// Each device's default rate: 100,000 events and 64 MiB per second. A
/// field gateway standing for many devices gets more through its registry
/// entry.
pub const DEFAULT_DEVICE_RATE: RateLimits = RateLimits {
    events_per_s: 100_000,
    bytes_per_s: 64 * 1024 * 1024,
};

/// 100,000 connections at once, 10,000 of them unauthenticated, 10,000 new
/// ones per second.
pub const DEFAULT_CONNECTION_LIMITS: ConnectionLimits = ConnectionLimits {
    max_connections: 100_000,
    max_pending: 10_000,
    per_second: 10_000,
};

/// What the gateway works with.
#[derive(Clone)]
pub struct GatewayDeps {
    pub registry: SharedRegistry,
    pub catalog: Arc<Catalog>,
    pub log: SharedEventStream,
    pub commands: Arc<CommandQueue>,
}

/// The disconnect reason stored when the server stops (and, at start, for
/// devices a crash left marked connected).
pub const SERVER_STOPPED: &str = "server stopped";

/// What a session proved itself with; checked again when the registry
/// announces a change. (No `Debug`: it holds a token.)
#[derive(Clone, PartialEq, Eq, Hash)]
enum Credential {
    Token(String),
    /// A token signed with a key derived from this group's, while HELLO is
    /// checked; once the device is enrolled, its own keys sign the token
    /// and the session holds a plain [`Credential::Token`].
    Group {
        group: String,
        token: String,
    },
    /// The thumbprint of the client certificate of the TLS handshake.
    Certificate(String),
}

/// What a session has seen lately, kept without the live-sessions lock:
/// every frame touches it.
#[derive(Debug)]
struct Activity {
    /// The last frame, milliseconds since the Unix epoch.
    last_seen: AtomicI64,
    /// The latest event time of the events stored; [`NEVER`] if none.
    last_event_at: AtomicI64,
}

/// "Not yet" in [`Activity`].
const NEVER: i64 = i64::MIN;

impl Activity {
    fn new(now: i64) -> Self {
        Activity {
            last_seen: AtomicI64::new(now),
            last_event_at: AtomicI64::new(NEVER),
        }
    }

    fn seen(&self, now: i64) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    fn stored_events_until(&self, event_time: i64) {
        self.last_event_at.fetch_max(event_time, Ordering::Relaxed);
    }

    fn last_seen(&self) -> Option<i64> {
        Some(self.last_seen.load(Ordering::Relaxed)).filter(|t| *t != NEVER)
    }

    fn last_event_at(&self) -> Option<i64> {
        Some(self.last_event_at.load(Ordering::Relaxed)).filter(|t| *t != NEVER)
    }
}

/// One session of a device, as the gateway tracks it.
struct Live {
    id: u64,
    connection: quinn::Connection,
    /// What the session authenticated with: checked again when the
    /// registry says the device's right to connect may have changed.
    credential: Credential,
    /// A token a RENEW is having checked, and, if a registry change
    /// refused it meanwhile, why: a renewal never installs a token that was
    /// revoked while it was being checked.
    renewal: Option<(String, Option<ProtocolError>)>,
    /// False while HELLO is being checked. A session is listed before its
    /// check starts, so that a change announced during the check still
    /// reaches it.
    authenticated: bool,
    /// Whether the session was ever authenticated: it counts towards the
    /// device being connected until it is gone (even once revoked).
    counted: bool,
    activity: Arc<Activity>,
    /// The newest desired-properties version announced for the device.
    desired: watch::Sender<i64>,
    /// Ends the session with an ERROR frame carrying the reason.
    revoke: mpsc::UnboundedSender<ProtocolError>,
}

impl Live {
    /// Ends the session: the session task sends ERROR and closes. If it
    /// cannot get to it soon (say, it waits for the disk), the connection is
    /// closed anyway, with the same code and reason.
    fn revoke(&mut self, err: ProtocolError) {
        // No longer counted as connected, though it takes a moment to go.
        self.authenticated = false;
        let connection = self.connection.clone();
        let _ = self.revoke.send(err.clone());
        tokio::spawn(async move {
            tokio::time::sleep(REVOKE_GRACE).await;
            close(&connection, err.code, &err.message);
        });
    }
}

/// A device's live sessions and its connection state while connected.
#[derive(Default)]
struct DeviceLive {
    sessions: Vec<Live>,
    /// When the device connected: its first session of this stretch was
    /// authenticated then. `None` while no session counts.
    since: Option<i64>,
    /// The latest of the sessions that ended during this stretch (and, for
    /// the event time, of the state stored before it).
    last_seen: Option<i64>,
    last_event_at: Option<i64>,
    /// The device's rate limiter, shared by its sessions; set when its
    /// first session is authenticated.
    rate: Option<Arc<DeviceRate>>,
}

impl DeviceLive {
    /// Whether one of its sessions is authenticated.
    fn is_connected(&self) -> bool {
        self.sessions.iter().any(|l| l.authenticated)
    }

    /// The device's state now, if it has an authenticated session.
    fn state(&self) -> Option<ConnectionState> {
        let since = self.since?;
        if !self.is_connected() {
            return None;
        }
        let (last_seen, last_event_at) = self.latest();
        Some(ConnectionState {
            connected: true,
            since,
            reason: None,
            last_seen,
            last_event_at,
        })
    }

    /// The last frame and the last event time over every session of this
    /// stretch.
    fn latest(&self) -> (Option<i64>, Option<i64>) {
        let counted = self.sessions.iter().filter(|l| l.counted);
        let last_seen = counted
            .clone()
            .filter_map(|l| l.activity.last_seen())
            .chain(self.last_seen)
            .max();
        let last_event_at = counted
            .filter_map(|l| l.activity.last_event_at())
            .chain(self.last_event_at)
            .max();
        (last_seen, last_event_at)
    }
}

/// How long a revoked session has to send its ERROR frame before the
/// connection is closed under it.
const REVOKE_GRACE: Duration = Duration::from_millis(500);

/// COMMAND_ACK frames of one session waiting for the command queue; past
/// that the session stops reading.
const ANSWERS_IN_FLIGHT: usize = 16;

/// Most frames of one stream an idempotent session keeps refusing while it
/// waits for the lowest one refused for the rate (protocol.md section 12);
/// past that, later frames are refused without being remembered.
const MAX_RATE_REFUSED: usize = 4096;

/// How long a session ending on a fatal error waits for the answers to the
/// frames it already read, before it sends its ERROR; within the grace a
/// revoked session has before its connection is closed.
const FATAL_PATIENCE: Duration = Duration::from_millis(300);

/// REPORT frames of one session waiting for the registry; past that the
/// session stops reading.
const REPORTS_IN_FLIGHT: usize = 16;

/// How long the answers of a session whose outbox is full may wait for
/// the device to read (see [`answer_in_order`]).
const ANSWER_PATIENCE: Duration = Duration::from_secs(10);

/// A connection-state change for the registry, written in the order the
/// changes happened by one task ([`record_presence`]).
enum PresenceWrite {
    Connected {
        device: String,
        since: i64,
    },
    Disconnected {
        device: String,
        state: ConnectionState,
    },
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

struct Shared {
    config: GatewayConfig,
    deps: GatewayDeps,
    /// The live sessions of each connected device (a device may hold several).
    live: Mutex<HashMap<String, DeviceLive>>,
    next_id: AtomicU64,
    presence: mpsc::UnboundedSender<PresenceWrite>,
    /// Set, under the `live` lock, when the gateway stops: sessions ending
    /// then are recorded by [`Gateway::run`] as "server stopped".
    stopping: AtomicBool,
    /// Admits new connections within the connection limits.
    gate: Arc<ConnectionGate>,
    /// The memory that frames waiting for the disk may hold, all
    /// connections together.
    in_flight: Arc<InFlightBudget>,
    /// The rate limiters of devices that disconnected while over their
    /// rate, taken up again when they reconnect.
    indebted: Mutex<HashMap<String, Arc<DeviceRate>>>,
    /// What `GET /metrics` shows.
    metrics: Arc<GatewayMetrics>,
}

impl Shared {
    fn record(&self, write: PresenceWrite) {
        // The receiver lives as long as the gateway runs; after that there
        // is nobody left to tell.
        let _ = self.presence.send(write);
    }
}

/// A handle for the rest of the server: who is connected, and disconnecting.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    /// The live connection state of a connected device (last seen and last
    /// event time as of now); `None` when it is not connected.
    pub fn live_state(&self, id: &str) -> Option<ConnectionState> {
        lock(&self.shared.live).get(id)?.state()
    }

    /// The live connection state of every connected device.
    pub fn live_states(&self) -> BTreeMap<String, ConnectionState> {
        lock(&self.shared.live)
            .iter()
            .filter_map(|(id, device)| Some((id.clone(), device.state()?)))
            .collect()
    }

    /// Whether `device` is connected (has an authenticated session) now.
    pub fn is_connected(&self, device: &str) -> bool {
        lock(&self.shared.live)
            .get(device)
            .is_some_and(DeviceLive::is_connected)
    }

    /// How many devices are connected now.
    pub fn connected_count(&self) -> usize {
        lock(&self.shared.live)
            .values()
            .filter(|d| d.is_connected())
            .count()
    }

    /// The gateway's counters, for `GET /metrics`.
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.shared.metrics
    }

    /// The server-wide budget of memory for frames waiting for the disk.
    pub fn in_flight(&self) -> &InFlightBudget {
        &self.shared.in_flight
    }

    /// Closes every connection of a device with `unauthorized` and `reason`.
    ///
    /// The gateway does this by itself for every change the registry
    /// announces; this is for callers that want a device gone at once.
    pub fn disconnect(&self, device: &str, reason: &str) {
        if let Some(device) = lock(&self.shared.live).get_mut(device) {
            for live in &mut device.sessions {
                live.revoke(ProtocolError::new(ErrorCode::Unauthorized, reason));
            }
        }
    }
}

/// The QUIC gateway.
pub struct Gateway {
    endpoint: quinn::Endpoint,
    /// Runs `endpoint`'s driver; it stops when the gateway is dropped.
    receive: ReceiveThread,
    shared: Arc<Shared>,
    presence: mpsc::UnboundedReceiver<PresenceWrite>,
}

impl Gateway {
    /// Binds the UDP socket; call [`Gateway::run`] to serve.
    pub fn bind(config: GatewayConfig, deps: GatewayDeps) -> Result<Self> {
        // A malformed Arrow payload can panic inside arrow's IPC reader;
        // `decode_arrow` catches that and rejects the frame. Such panics
        // are expected, so they print nothing: a device cannot fill the log.
        crate::fuzzing::contain_arrow_panics();
        let in_flight = Arc::new(InFlightBudget::new(config.max_in_flight_bytes));
        let server = server_config_with(
            &config.tls,
            TransportLimits {
                idle_timeout: config.idle_timeout,
                keep_alive: config.keep_alive,
                receive_window: in_flight.initial_window(),
            },
        )?;
        let bind_err = |source| Error::Bind {
            addr: config.listen,
            source,
        };
        let socket = udp_socket(config.listen).map_err(bind_err)?;
        let receive =
            ReceiveThread::start().map_err(|e| Error::io("the gateway's receive thread", e))?;
        let endpoint = receive
            .endpoint(quinn::EndpointConfig::default(), Some(server), socket)
            .map_err(bind_err)?;
        let (presence_tx, presence) = mpsc::unbounded_channel();
        Ok(Gateway {
            endpoint,
            receive,
            shared: Arc::new(Shared {
                gate: Arc::new(ConnectionGate::new(config.connections)),
                in_flight,
                indebted: Mutex::new(HashMap::new()),
                metrics: Arc::default(),
                config,
                deps,
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                presence: presence_tx,
                stopping: AtomicBool::new(false),
            }),
            presence,
        })
    }

    /// The address the gateway listens on (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("the gateway socket", e))
    }

    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts connections until `shutdown` turns true, then records every
    /// connected device as disconnected ("server stopped"), closes every
    /// connection with `server_shutdown` and waits briefly for them to go.
    ///
    /// Before the first connection it marks the devices still stored as
    /// connected (a crash left them so) disconnected. Meanwhile it follows
    /// the registry's changes: it closes the sessions whose credentials no
    /// longer hold and sends changed desired properties.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Gateway {
            endpoint,
            receive,
            shared,
            presence,
        } = self;
        // Before the first session can record itself connected.
        match shared
            .deps
            .registry
            .disconnect_all(SERVER_STOPPED, now_millis())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(devices = n, "marked devices left connected disconnected"),
            Err(e) => {
                tracing::error!(error = %e, "could not mark devices left connected disconnected")
            }
        }
        let recorder = tokio::spawn(record_presence(shared.clone(), presence));
        // Subscribed before the first connection is accepted, so that no
        // change after a session's check can be missed.
        let changes = shared.deps.registry.changes();
        let watcher = tokio::spawn(watch_registry(shared.clone(), changes));
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Under a flood of handshakes, a client must first
                    // prove its address with a QUIC Retry (which costs the
                    // server no state), so spoofed packets cannot take the
                    // places of devices that are still waiting to connect.
                    let busy = shared.config.connections.max_pending / 2;
                    if busy > 0 && shared.gate.pending() >= busy && incoming.may_retry() {
                        if let Err(e) = incoming.retry() {
                            tracing::debug!(error = %e, "could not send a Retry");
                        }
                        continue;
                    }
                    match shared.gate.admit() {
                        Ok(slot) => {
                            let shared = shared.clone();
                            tokio::spawn(async move { serve(shared, incoming, slot).await });
                        }
                        Err(refusal) => {
                            shared.metrics.refused(refusal);
                            // Before any handshake work: the client sees the
                            // QUIC transport error CONNECTION_REFUSED.
                            tracing::debug!(
                                remote = %incoming.remote_address(),
                                limit = refusal.as_str(),
                                "connection refused"
                            );
                            incoming.refuse();
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        watcher.abort();
        record_stop(&shared);
        let (flushed_tx, flushed) = oneshot::channel();
        shared.record(PresenceWrite::Flush(flushed_tx));
        endpoint.close(
            ErrorCode::ServerShutdown.close_code().into(),
            b"the server is shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
        recorder.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        // The endpoint before the thread that drives it.
        drop(endpoint);
        drop(receive);
    }
}

/// The UDP buffers the gateway asks for: every device's packets arrive on
/// one socket, and with the kernel's default (about 200 KiB) a burst of
/// handshakes overflows it; lost packets then cost each of those
/// handshakes a retransmission timeout. The kernel caps the request at its
/// `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The gateway's UDP socket, bound to `addr`, with large buffers.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As quinn does: IPv4 too, on an unspecified IPv6 address.
        let _ = socket.set_only_v6(false);
    }
    for (what, set) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
        ),
        ("send", Socket::set_send_buffer_size),
    ] {
        if let Err(e) = set(&socket, UDP_BUFFER_BYTES) {
            tracing::warn!(error = %e, "could not enlarge the gateway's UDP {what} buffer");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Queues a "server stopped" disconnect for every connected device; from
/// now on ending sessions record nothing.
fn record_stop(shared: &Shared) {
    let now = now_millis();
    let mut live = lock(&shared.live);
    shared.stopping.store(true, Ordering::Relaxed);
    for (device, entry) in live.iter_mut() {
        let (last_seen, last_event_at) = entry.latest();
        if entry.since.take().is_some() {
            shared.record(PresenceWrite::Disconnected {
                device: device.clone(),
                state: ConnectionState {
                    connected: false,
                    since: now,
                    reason: Some(SERVER_STOPPED.into()),
                    last_seen,
                    last_event_at,
                },
            });
        }
    }
}

/// Most connection-state changes written in one registry call.
const PRESENCE_BATCH: usize = 1024;

/// Writes connection states to the registry in the order they happened, so
/// that a quick reconnect cannot be overtaken by the disconnect before it.
/// Whatever piled up while the last write ran goes in the next one, in
/// order: a thousand devices connecting at once cost a few commits (and
/// fsyncs), not a thousand.
async fn record_presence(shared: Arc<Shared>, mut writes: mpsc::UnboundedReceiver<PresenceWrite>) {
    let registry = shared.deps.registry.clone();
    let mut received = Vec::new();
    while writes.recv_many(&mut received, PRESENCE_BATCH).await > 0 {
        let mut batch: Vec<(String, ConnectionState)> = Vec::with_capacity(received.len());
        let mut flushes = Vec::new();
        // The event time of devices already in this batch: the stored one
        // is older than the batch.
        let mut batched: HashMap<String, Option<i64>> = HashMap::new();
        for write in received.drain(..) {
            let (device, mut state) = match write {
                PresenceWrite::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
                PresenceWrite::Connected { device, since } => {
                    (device, ConnectionState::connected_at(since))
                }
                PresenceWrite::Disconnected { device, state } => (device, state),
            };
            // The event time survives reconnects: it is the last event ever
            // stored, which may be from an earlier connection.
            let stored = match batched.get(&device) {
                Some(at) => *at,
                None => match registry.connection_state(&device).await {
                    Ok(stored) => stored.and_then(|s| s.last_event_at),
                    Err(e) => {
                        tracing::warn!(device = %device, error = %e, "could not read a device's connection state");
                        None
                    }
                },
            };
            state.last_event_at = state.last_event_at.max(stored);
            batched.insert(device.clone(), state.last_event_at);
            if state.connected {
                // The live state shows it too, while this stretch lasts.
                if let Some(entry) = lock(&shared.live).get_mut(&device)
                    && entry.since == Some(state.since)
                {
                    entry.last_event_at = entry.last_event_at.max(stored);
                }
            }
            batch.push((device, state));
        }
        if batch.is_empty() {
            // Only flushes: nothing to write.
        } else if let Err(e) = registry.record_connections(&batch).await {
            // One at a time, so one that cannot be written does not take
            // the others with it.
            tracing::warn!(changes = batch.len(), error = %e, "could not record connection states together; recording them one by one");
            for (device, state) in &batch {
                if let Err(e) = registry.record_connection(device, state).await {
                    tracing::error!(device = %device, error = %e, "could not record a device's connection state");
                }
            }
        }
        // Everything queued before each flush is written now.
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn close(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    connection.close(code.close_code().into(), reason.as_bytes());
}

/// Why the connection under a session stream went, in the words the
/// connection state records.
fn lost(e: &quinn::ReadError) -> String {
    use quinn::ConnectionError as C;
    match e {
        quinn::ReadError::ConnectionLost(C::TimedOut) => "idle timeout".into(),
        quinn::ReadError::ConnectionLost(C::ApplicationClosed(_)) => "closed by the device".into(),
        quinn::ReadError::ConnectionLost(C::LocallyClosed) => "closed by the server".into(),
        quinn::ReadError::Reset(_) => "closed by the device (stream reset)".into(),
        e => format!("connection lost: {e}"),
    }
}

/// Most bytes taken from a stream in one read.
const READ_CHUNK: usize = 64 * 1024;

/// Reads the next whole frame; `Ok(None)` when the peer finished the stream.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    metrics: &GatewayMetrics,
) -> Result<Option<Frame>> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        let read = recv.read_chunk(READ_CHUNK, true).await;
        if let Some(end) = took(read, decoder, metrics) {
            return end;
        }
    }
}

/// The next frame if it can be had without waiting: one the decoder holds
/// already, or one in what quinn has received for the stream and the
/// session has not read yet. `None` when it would have to wait.
///
/// quinn keeps what arrives as one chunk per packet, so the frames in the
/// decoder after a read are about one packet's: one or two 760-byte Arrow
/// frames. Reading on while data is there lets a session join all the
/// frames its device has pipelined into one run. It reads only until a
/// frame is whole, and no further once the decoder holds 64 KiB: the rest
/// stays in quinn, under the connection's receive window.
fn ready_frame(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    metrics: &GatewayMetrics,
) -> Option<Result<Option<Frame>>> {
    loop {
        if let Some(frame) = buffered_frame(decoder) {
            return Some(frame);
        }
        if decoder.buffered() >= READ_CHUNK {
            // Part of a large frame: the rest can wait for the next read.
            return None;
        }
        let read = recv.read_chunk(READ_CHUNK, true).now_or_never()?;
        if let Some(end) = took(read, decoder, metrics) {
            return Some(end);
        }
    }
}

/// The next frame the decoder already holds whole, if any.
fn buffered_frame(decoder: &mut FrameDecoder) -> Option<Result<Option<Frame>>> {
    decoder
        .next_frame()
        .map_err(Error::from)
        .transpose()
        .map(|frame| frame.map(Some))
}

/// Hands a read's chunk to the decoder. `Some` when the read ended the
/// stream: `Ok(None)` if it finished cleanly, else why not.
fn took(
    read: std::result::Result<Option<quinn::Chunk>, quinn::ReadError>,
    decoder: &mut FrameDecoder,
    metrics: &GatewayMetrics,
) -> Option<Result<Option<Frame>>> {
    match read {
        Ok(Some(chunk)) => {
            metrics.bytes_received(chunk.bytes.len());
            decoder.push(&chunk.bytes);
            None
        }
        Ok(None) => Some(decoder.finish().map(|()| None).map_err(Error::from)),
        Err(e) => Some(Err(Error::ConnectionLost(lost(&e)))),
    }
}

/// Sends a fatal ERROR frame and closes the connection with its code.
async fn fail(connection: &quinn::Connection, send: &mut quinn::SendStream, err: &ProtocolError) {
    tracing::debug!(remote = %connection.remote_address(), error = %err, "closing connection");
    let frame = Frame::Error(ErrorBody::from(err)).encode_to_vec();
    if send.write_all(&frame).await.is_ok() && send.finish().is_ok() {
        // Give the frame a moment to reach the peer; the close carries the
        // same reason in case it does not.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    close(connection, err.code, &err.message);
}

/// The thumbprint of the client certificate the connection presented (TLS
/// has checked it chains to a trusted CA), if it presented one.
fn peer_thumbprint(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain
        .first()
        .map(|leaf| tributary_registry::thumbprint(leaf))
}

async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming, mut slot: Slot) {
    let _open = shared.metrics.connection_opened();
    // The handshake, the session stream and HELLO all count against the
    // same deadline, so a half-open connection holds its slot for no longer.
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let timed_out = || {
        ProtocolError::new(
            ErrorCode::HelloTimeout,
            "no HELLO frame within the time allowed",
        )
    };
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Among others: a client certificate from an untrusted CA (the
            // client got a TLS alert saying so).
            tracing::debug!(error = %e, "handshake failed");
            shared.metrics.handshake_failed();
            return;
        }
        // Dropping the handshake under way closes it.
        Err(_) => {
            tracing::debug!("handshake not finished within the HELLO timeout");
            shared.metrics.handshake_failed();
            return;
        }
    };
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            close(&connection, ErrorCode::HelloTimeout, &timed_out().message);
            return;
        }
    };
    let mut decoder = FrameDecoder::new(shared.config.max_frame_bytes);
    let read = read_frame(&mut recv, &mut decoder, &shared.metrics);
    let hello = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(Some(Frame::Hello(hello)))) => Ok(hello),
        Ok(Ok(Some(other))) => Err(ProtocolError::protocol(format!(
            "the first frame must be HELLO, got {}",
            other.frame_type().name()
        ))),
        Ok(Ok(None)) | Ok(Err(Error::ConnectionLost(_))) => return,
        Ok(Err(Error::Protocol(e))) => Err(e),
        Ok(Err(e)) => Err(ProtocolError::protocol(e.to_string())),
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => return fail(&connection, &mut send, &e).await,
    };
    let device = hello.device_id.clone();
    let credential = match (&hello.group, hello.token.is_empty()) {
        (None, true) => match peer_thumbprint(&connection) {
            Some(thumbprint) => Credential::Certificate(thumbprint),
            None => {
                let e = ProtocolError::new(
                    ErrorCode::Unauthorized,
                    format!(
                        "device '{device}': HELLO has an empty token and the connection \
                         presented no client certificate; send a token or connect with a \
                         client certificate"
                    ),
                );
                shared.metrics.authentication_failed();
                return fail(&connection, &mut send, &e).await;
            }
        },
        (Some(group), _) => Credential::Group {
            group: group.clone(),
            token: hello.token.clone(),
        },
        (None, false) => Credential::Token(hello.token.clone()),
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (revoke_tx, revoked) = mpsc::unbounded_channel();
    let (desired_tx, desired) = watch::channel(0);
    let activity = Arc::new(Activity::new(now_millis()));
    lock(&shared.live)
        .entry(device.clone())
        .or_default()
        .sessions
        .push(Live {
            id,
            connection: connection.clone(),
            credential: credential.clone(),
            renewal: None,
            authenticated: false,
            counted: false,
            activity: activity.clone(),
            desired: desired_tx,
            revoke: revoke_tx,
        });
    let (credential, expires, own_limits) = match authenticate(&shared, &hello, credential).await {
        Ok(checked) => checked,
        Err(e) => {
            shared.metrics.authentication_failed();
            forget(&shared, &device, id, "");
            return fail(&connection, &mut send, &e).await;
        }
    };
    slot.authenticated();
    shared.metrics.session_authenticated();
    let now = now_millis();
    let limits = shared.config.device_rate.for_device(own_limits);
    let rate = {
        let mut live = lock(&shared.live);
        let entry = live.entry(device.clone()).or_default();
        // The bucket carries over from the device's other sessions, or
        // from its last connection if it left owing.
        let rate = entry
            .rate
            .get_or_insert_with(|| {
                lock(&shared.indebted)
                    .remove(&device)
                    .unwrap_or_else(|| Arc::new(DeviceRate::new(limits)))
            })
            .clone();
        if rate.limits() != limits {
            rate.set_limits(limits);
        }
        if let Some(l) = entry.sessions.iter_mut().find(|l| l.id == id) {
            l.authenticated = true;
            l.counted = true;
            l.credential = credential;
            l.activity.seen(now);
            if entry.since.is_none() && !shared.stopping.load(Ordering::Relaxed) {
                entry.since = Some(now);
                shared.record(PresenceWrite::Connected {
                    device: device.clone(),
                    since: now,
                });
            }
        }
        rate
    };
    tracing::info!(device = %device, remote = %connection.remote_address(), "device connected");
    let session = Session {
        shared: shared.clone(),
        device: device.clone(),
        id,
        connection: connection.clone(),
        wants_commands: hello.commands,
        wants_desired: hello.twin,
        idempotent: hello.idempotent,
        expires,
        revoked,
        desired,
        activity,
        rate,
        rate_refused: HashMap::new(),
        arrow: ArrowDecoder::default(),
        window: shared.in_flight.initial_window(),
    };
    let reason = session.run(send, recv, decoder).await;
    let stopping = shared.stopping.load(Ordering::Relaxed);
    shared.metrics.session_ended(&reason, stopping);
    drop(slot);
    forget(&shared, &device, id, &reason);
    tracing::info!(device = %device, reason = %reason, "device disconnected");
}

/// Takes a session off the live list. When it was the device's last
/// session, the device is recorded disconnected for `reason`.
fn forget(shared: &Shared, device: &str, id: u64, reason: &str) {
    let mut live = lock(&shared.live);
    let Some(entry) = live.get_mut(device) else {
        return;
    };
    let Some(at) = entry.sessions.iter().position(|l| l.id == id) else {
        return;
    };
    let session = entry.sessions.remove(at);
    if session.counted {
        entry.last_seen = entry.last_seen.max(session.activity.last_seen());
        entry.last_event_at = entry.last_event_at.max(session.activity.last_event_at());
        if !entry.sessions.iter().any(|l| l.counted)
            && entry.since.take().is_some()
            && !shared.stopping.load(Ordering::Relaxed)
        {
            shared.record(PresenceWrite::Disconnected {
                device: device.to_string(),
                state: ConnectionState {
                    connected: false,
                    since: now_millis(),
                    reason: Some(reason.to_string()),
                    last_seen: entry.last_seen.take(),
                    last_event_at: entry.last_event_at.take(),
                },
            });
        }
    }
    if entry.sessions.is_empty()
        && let Some(gone) = live.remove(device)
        && let Some(rate) = gone.rate
        && rate.in_debt()
    {
        // Reconnecting must not forgive a device its debt.
        let mut indebted = lock(&shared.indebted);
        if indebted.len() >= 1024 {
            indebted.retain(|_, r| r.in_debt());
        }
        indebted.insert(device.to_string(), rate);
    }
}

/// Checks HELLO's version and credentials; returns the credential the
/// session holds from now on, when it expires, if it does, and the device's
/// own rate limits.
async fn authenticate(
    shared: &Shared,
    hello: &Hello,
    credential: Credential,
) -> Result<(Credential, Option<Expiry>, DeviceLimits), ProtocolError> {
    let own = |device: &tributary_registry::Device| {
        // Checked when stored; a bad entry from elsewhere means no override.
        DeviceLimits::from_metadata(&device.metadata).unwrap_or_default()
    };
    if hello.version != protocol::VERSION {
        return Err(ProtocolError::unsupported_version(u64::from(hello.version)));
    }
    let registry = &shared.deps.registry;
    let device = hello.device_id.as_str();
    let now = now_millis();
    match credential {
        Credential::Token(token) => match registry.authenticate(device, &token, now).await {
            // Legacy `trb_` tokens (from before device keys) do not expire.
            Ok(found) => {
                let expires = Expiry::of_token(&token);
                Ok((Credential::Token(token), expires, own(&found)))
            }
            Err(e) => Err(refusal(device, e)),
        },
        Credential::Group { group, token } => {
            match registry.enroll(&group, device, &token, now).await {
                Ok((found, created)) => {
                    if created {
                        tracing::info!(device = %device, group = %group, "device enrolled");
                    }
                    // From now on the device's own (derived) keys sign it.
                    let expires = Expiry::of_token(&token);
                    Ok((Credential::Token(token), expires, own(&found)))
                }
                Err(e) => Err(refusal(device, e)),
            }
        }
        Credential::Certificate(thumbprint) => {
            match registry
                .authenticate_certificate(device, &thumbprint, now)
                .await
            {
                Ok(found) => {
                    let expires = certificate_expiry(shared, device, &thumbprint).await;
                    Ok((Credential::Certificate(thumbprint), expires, own(&found)))
                }
                Err(e) => Err(refusal(device, e)),
            }
        }
    }
}

/// When a device's registered certificate stops being valid; `None` if the
/// registry cannot say (the certificate is then checked on changes only).
async fn certificate_expiry(shared: &Shared, device: &str, thumbprint: &str) -> Option<Expiry> {
    match shared.deps.registry.list_certificates(device).await {
        Ok(certificates) => certificates
            .into_iter()
            .find(|c| c.thumbprint == thumbprint)
            .map(|c| Expiry {
                at_ms: c.not_after,
                of: Expiring::Certificate,
            }),
        Err(e) => {
            tracing::warn!(device = %device, error = %e, "could not read a device's certificates");
            None
        }
    }
}

/// The ERROR a device gets when the registry does not accept its token.
fn refusal(device: &str, e: tributary_registry::Error) -> ProtocolError {
    match e {
        // The registry's reason is written for the device: generic when the
        // signature is wrong, specific (disabled, expired) when it is not.
        e @ tributary_registry::Error::Unauthorized(_) => {
            ProtocolError::new(ErrorCode::Unauthorized, e.to_string())
        }
        e if e.is_user_error() => {
            ProtocolError::new(ErrorCode::Unauthorized, format!("device '{device}': {e}"))
        }
        e => {
            tracing::error!(device = %device, error = %e, "registry failed while checking credentials");
            ProtocolError::new(
                ErrorCode::Unavailable,
                "the server cannot check credentials right now; retry later",
            )
        }
    }
}

/// What expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiring {
    Token,
    Certificate,
}

/// When a session's credential stops being valid.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    /// Milliseconds since the Unix epoch.
    at_ms: i64,
    of: Expiring,
}

impl Expiry {
    fn of_token(token: &str) -> Option<Expiry> {
        let (at_secs, _) = tributary_registry::token::parse(token).ok()?;
        Some(Expiry {
            at_ms: at_secs.saturating_mul(1000),
            of: Expiring::Token,
        })
    }

    /// The tokio instant of the expiry, from the wall clock now; `None` if
    /// it is too far away to be one.
    fn deadline(self) -> Option<tokio::time::Instant> {
        let left_ms = self.at_ms.saturating_sub(now_millis());
        tokio::time::Instant::now()
            .checked_add(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)))
    }

    fn has_passed(self) -> bool {
        self.at_ms <= now_millis()
    }

    fn error(self, device: &str) -> ProtocolError {
        let at = DateTime::from_timestamp_millis(self.at_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.at_ms.to_string());
        let message = match self.of {
            Expiring::Token => {
                format!("device '{device}': token expired at {at}; reconnect with a new token")
            }
            Expiring::Certificate => format!(
                "device '{device}': its client certificate expired at {at}; reconnect with a \
                 current certificate"
            ),
        };
        ProtocolError::new(ErrorCode::Unauthorized, message)
    }

    /// The connection-state reason of a session that ended at its expiry.
    fn reason(self) -> &'static str {
        match self.of {
            Expiring::Token => "token expired",
            Expiring::Certificate => "certificate expired",
        }
    }
}

/// Follows the registry's announcements: checks the live sessions of every
/// device whose access changed, and wakes the desired-properties delivery of
/// every device whose desired properties did. When announcements were lost,
/// does both for every device.
async fn watch_registry(shared: Arc<Shared>, mut changes: broadcast::Receiver<Change>) {
    loop {
        let devices: Vec<String> = match changes.recv().await {
            Ok(Change::Access(device)) => {
                // An update of the device (its metadata may carry new
                // rate limits) is announced this way.
                follow_rate(&shared, &device);
                vec![device]
            }
            Ok(Change::Desired(device, version)) => {
                if let Some(entry) = lock(&shared.live).get(&device) {
                    for l in &entry.sessions {
                        l.desired.send_if_modified(|newest| {
                            let newer = version > *newest;
                            *newest = (*newest).max(version);
                            newer
                        });
                    }
                }
                continue;
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "registry changes came faster than they were checked; checking every session"
                );
                let devices: Vec<String> = {
                    let live = lock(&shared.live);
                    for l in live.values().flat_map(|d| &d.sessions) {
                        // Wakes the delivery, which reads the twin again.
                        l.desired.send_modify(|_| {});
                    }
                    live.keys().cloned().collect()
                };
                for device in &devices {
                    follow_rate(&shared, device);
                }
                devices
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for device in devices {
            recheck(&shared, &device).await;
        }
    }
}

/// Has a connected device's rate limits read again from the registry.
fn follow_rate(shared: &Arc<Shared>, device: &str) {
    let rate = lock(&shared.live).get(device).and_then(|d| d.rate.clone());
    if let Some(rate) = rate {
        let shared = shared.clone();
        let device = device.to_string();
        tokio::spawn(async move { reload_rate(&shared, &device, &rate).await });
    }
}

/// Applies a connected device's rate limits as its registry entry has them
/// now.
async fn reload_rate(shared: &Shared, device: &str, rate: &DeviceRate) {
    match shared.deps.registry.get_device(device).await {
        Ok(Some(found)) => {
            let own = DeviceLimits::from_metadata(&found.metadata).unwrap_or_default();
            let limits = shared.config.device_rate.for_device(own);
            if rate.limits() != limits {
                tracing::info!(
                    device = %device,
                    events_per_s = limits.events_per_s,
                    bytes_per_s = limits.bytes_per_s,
                    "device rate limits changed"
                );
                rate.set_limits(limits);
            }
        }
        // Removed: its sessions are being closed.
        Ok(None) => {}
        Err(e) => tracing::warn!(device = %device, error = %e, "could not read a device's limits"),
    }
}

/// One session as [`recheck`] found it.
struct Check {
    id: u64,
    credential: Credential,
    authenticated: bool,
    renewal: Option<String>,
}

/// Checks every live session of `device` with its own credential (and the
/// token of a renewal under way) and revokes the ones the registry refuses
/// now. A session that renewed its token meanwhile is checked again with
/// the new one.
async fn recheck(shared: &Shared, device: &str) {
    // Each round needs a renewal to finish during the one before; a device
    // renewing non-stop gets checked on its next change anyway.
    for _ in 0..8 {
        if !recheck_once(shared, device).await {
            return;
        }
    }
}

/// One round of [`recheck`]; true if a session's credential changed since
/// it was looked at.
async fn recheck_once(shared: &Shared, device: &str) -> bool {
    let sessions: Vec<Check> = lock(&shared.live)
        .get(device)
        .into_iter()
        .flat_map(|d| &d.sessions)
        .map(|l| Check {
            id: l.id,
            credential: l.credential.clone(),
            authenticated: l.authenticated,
            renewal: l.renewal.as_ref().map(|(token, _)| token.clone()),
        })
        .collect();
    // Sessions of one device often share a credential: one check each.
    let mut verdicts: HashMap<(&Credential, bool), Option<ProtocolError>> = HashMap::new();
    let renewals: Vec<Credential> = sessions
        .iter()
        .filter_map(|c| c.renewal.clone().map(Credential::Token))
        .collect();
    let wanted = sessions
        .iter()
        .map(|c| (&c.credential, c.authenticated))
        // A renewal has proved nothing yet: it gets the registry's reason
        // as it stands, like a HELLO being checked.
        .chain(renewals.iter().map(|token| (token, false)));
    for key in wanted {
        if verdicts.contains_key(&key) {
            continue;
        }
        let verdict = check(shared, device, key.0, key.1).await;
        verdicts.insert(key, verdict);
    }
    let mut changed = false;
    let mut live = lock(&shared.live);
    for l in live
        .get_mut(device)
        .into_iter()
        .flat_map(|d| &mut d.sessions)
    {
        let Some(seen) = sessions.iter().find(|c| c.id == l.id) else {
            continue; // Listed after the check began: its own check is newer.
        };
        if let Some((token, refused)) = &mut l.renewal
            && seen.renewal.as_deref() == Some(token.as_str())
            && let Some(Some(err)) = verdicts.get(&(&Credential::Token(token.clone()), false))
        {
            *refused = Some(err.clone());
        }
        if l.credential != seen.credential {
            changed = true;
            continue;
        }
        if let Some(Some(err)) = verdicts.get(&(&seen.credential, seen.authenticated)) {
            tracing::info!(device = %device, reason = %err.message, "closing a session whose credentials no longer hold");
            l.revoke(err.clone());
        }
    }
    changed
}

/// The registry's verdict on one credential now: `None` if it still holds.
async fn check(
    shared: &Shared,
    device: &str,
    credential: &Credential,
    authenticated: bool,
) -> Option<ProtocolError> {
    let registry = &shared.deps.registry;
    let now = now_millis();
    let result = match credential {
        Credential::Token(token) => registry.authenticate(device, token, now).await.map(|_| ()),
        Credential::Certificate(thumbprint) => registry
            .authenticate_certificate(device, thumbprint, now)
            .await
            .map(|_| ()),
        // Its HELLO is being checked (and may be enrolling the device right
        // now): that check answers for it.
        Credential::Group { .. } => Ok(()),
    };
    match result {
        Ok(()) => None,
        // A session whose HELLO is still being checked has proved nothing
        // yet: it gets the registry's reason as it stands.
        Err(e) if !authenticated => Some(refusal(device, e)),
        Err(e) => Some(revocation(shared, device, credential, e).await),
    }
}

/// Why a session that was authenticated is not any more. Its holder proved
/// it had a key (or the certificate) of the device, so it may learn what
/// changed: the registry's generic reason (unknown device or wrong
/// signature) is made specific.
async fn revocation(
    shared: &Shared,
    device: &str,
    credential: &Credential,
    e: tributary_registry::Error,
) -> ProtocolError {
    let tributary_registry::Error::Unauthorized(_) = &e else {
        return refusal(device, e);
    };
    match shared.deps.registry.get_device(device).await {
        Ok(None) => ProtocolError::new(
            ErrorCode::Unauthorized,
            format!("device '{device}' was removed from the registry"),
        ),
        Ok(Some(d)) if d.status == tributary_registry::DeviceStatus::Disabled => {
            ProtocolError::new(
                ErrorCode::Unauthorized,
                format!(
                    "device '{device}' is disabled; an operator must enable it before it can connect"
                ),
            )
        }
        Ok(Some(_)) => match credential {
            // The registry says what became of the certificate: revoked or
            // expired.
            Credential::Certificate(_) => ProtocolError::new(
                ErrorCode::Unauthorized,
                format!("{e}; reconnect with an active certificate"),
            ),
            Credential::Token(token) | Credential::Group { token, .. } => {
                match Expiry::of_token(token) {
                    Some(expiry) if expiry.has_passed() => expiry.error(device),
                    // A token from before device keys: rotating the primary
                    // key replaced it.
                    _ if token.starts_with(tributary_registry::TOKEN_PREFIX) => ProtocolError::new(
                        ErrorCode::Unauthorized,
                        format!(
                            "device '{device}': its legacy token was replaced when its \
                                 primary key was rotated; reconnect with a token signed by a \
                                 current key"
                        ),
                    ),
                    // The device is there, enabled, and the token has not
                    // expired: only its signature can have stopped holding.
                    _ => ProtocolError::new(
                        ErrorCode::Unauthorized,
                        format!(
                            "device '{device}': the key that signed this session's token was \
                             rotated; reconnect with a token signed by a current key"
                        ),
                    ),
                }
            }
        },
        Err(lookup) => refusal(device, lookup),
    }
}

/// The answer to one EVENTS frame (or a run of them), in the order frames
/// arrived.
enum Pending {
    Ready(Frame),
    /// A frame, or a run of frames stored with one append
    /// ([`EventStream::submit_run`](tributary_engine::log::EventStream::submit_run)),
    /// each answered on its own.
    Appending {
        /// Each frame's number and events, in order.
        frames: Vec<(u64, u32)>,
        future: AppendFuture,
        /// The latest event time, for the connection state.
        latest_event: Option<i64>,
        /// The run's share of the in-flight budget, given back once the
        /// log has it.
        reserved: Option<Reserved>,
    },
}

/// An EVENTS frame that passed every check, decoded.
struct Accepted {
    seq: u64,
    stream: String,
    batch: RecordBatch,
    /// The frame's payload size.
    bytes: usize,
    latest_event: Option<i64>,
}

/// Frames of one stream that a device pipelined and that arrived together:
/// stored with one append, at about the cost of one frame. Small frames
/// (one event each, say) otherwise cost an encoding, a log record and a
/// reader's visit each.
struct Run {
    stream: String,
    frames: Vec<(u64, u32)>,
    batches: Vec<RecordBatch>,
    events: usize,
    bytes: usize,
    latest_event: Option<i64>,
    /// The run's share of the in-flight budget.
    reserved: Reserved,
}

/// Most frames in one run.
const RUN_FRAMES: usize = 256;
/// A frame joins a run if the run then holds at most this many events,
/// and fewer payload bytes than [`RUN_BYTES`] before it. Small frames gain
/// the most from joining; large ones gain nothing, and joining copies
/// them.
const RUN_EVENTS: usize = 1024;
const RUN_BYTES: usize = 1 << 20;

impl Run {
    fn new(a: Accepted, reserved: Reserved) -> Run {
        Run {
            stream: a.stream,
            frames: vec![(a.seq, a.batch.num_rows() as u32)],
            events: a.batch.num_rows(),
            bytes: a.bytes,
            batches: vec![a.batch],
            latest_event: a.latest_event,
            reserved,
        }
    }

    /// Whether the run can take another frame.
    fn has_room(&self) -> bool {
        self.frames.len() < RUN_FRAMES && self.events < RUN_EVENTS && self.bytes < RUN_BYTES
    }

    /// Whether another frame like the last would join the run: only then is
    /// it worth reading on from what quinn holds. A large frame read ahead
    /// would not join, and would wait decoded, outside the receive window
    /// it was in.
    fn wants_more(&self) -> bool {
        self.has_room()
            && self
                .frames
                .last()
                .is_some_and(|(_, rows)| self.events + *rows as usize <= RUN_EVENTS)
    }

    /// Whether the run can take this frame: room, the same stream, and a
    /// higher frame number (a run's numbers increase, as the log wants; a
    /// device that goes back starts a new run, and the log judges that
    /// frame on its own).
    fn takes(&self, a: &Accepted) -> bool {
        self.has_room()
            && self.events + a.batch.num_rows() <= RUN_EVENTS
            && self.stream == a.stream
            && self.frames.last().is_some_and(|(last, _)| a.seq > *last)
    }

    fn push(&mut self, a: Accepted, reserved: Reserved) {
        self.reserved.merge(reserved);
        self.frames.push((a.seq, a.batch.num_rows() as u32));
        self.events += a.batch.num_rows();
        self.bytes += a.bytes;
        self.batches.push(a.batch);
        self.latest_event = self.latest_event.max(a.latest_event);
    }
}

struct Session {
    shared: Arc<Shared>,
    device: String,
    /// The session's id in the live list.
    id: u64,
    connection: quinn::Connection,
    wants_commands: bool,
    /// HELLO `twin`: the client takes DESIRED frames.
    wants_desired: bool,
    /// EVENTS `seq` numbers are the device's own (HELLO `idempotent`).
    idempotent: bool,
    /// When the session's credential expires; the session ends then.
    expires: Option<Expiry>,
    /// Why the session must end now (see [`Live::revoke`]).
    revoked: mpsc::UnboundedReceiver<ProtocolError>,
    /// The newest desired-properties version announced for the device.
    desired: watch::Receiver<i64>,
    activity: Arc<Activity>,
    /// The device's rate limiter (shared with its other sessions).
    rate: Arc<DeviceRate>,
    /// Idempotent sessions: per stream, the numbers of the frames refused
    /// for the rate and not sent again yet.
    rate_refused: HashMap<String, std::collections::BTreeSet<u64>>,
    /// Decodes the session's Arrow frames, remembering their schemas.
    arrow: ArrowDecoder,
    /// The connection's receive window, its share of the in-flight budget.
    window: u64,
}

impl Session {
    /// Serves an authenticated session; returns why it ended, in the words
    /// the connection state records.
    async fn run(
        mut self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut decoder: FrameDecoder,
    ) -> String {
        let welcome = Frame::Welcome(Welcome {
            version: protocol::VERSION,
            device_id: self.device.clone(),
            max_frame_bytes: self.shared.config.max_frame_bytes,
            max_events_per_frame: self.shared.config.max_events_per_frame,
        });
        if send.write_all(&welcome.encode_to_vec()).await.is_err() {
            return "connection lost before WELCOME".into();
        }
        self.fit_window();
        let (out_tx, out_rx) = mpsc::channel::<Frame>(1024);
        let writer = tokio::spawn(write_frames(send, out_rx));
        let (pending_tx, pending_rx) = mpsc::channel::<Pending>(self.shared.config.max_in_flight);
        // Idempotent sessions: the numbers of frames not yet answered (a
        // frame may be sent again with its number once it has its answer).
        let unanswered: Unanswered = Arc::default();
        let acker = tokio::spawn(answer_in_order(
            pending_rx,
            out_tx.clone(),
            self.connection.clone(),
            self.idempotent.then(|| unanswered.clone()),
            self.activity.clone(),
            self.shared.metrics.clone(),
        ));
        let commands = self.wants_commands.then(|| {
            tokio::spawn(deliver_commands(
                self.shared.deps.commands.clone(),
                self.device.clone(),
                out_tx.clone(),
                self.shared.metrics.clone(),
                self.shared.config.max_frame_bytes,
            ))
        });
        let desired = self.wants_desired.then(|| {
            tokio::spawn(deliver_desired(
                self.shared.deps.registry.clone(),
                self.device.clone(),
                self.desired.clone(),
                self.shared.config.max_frame_bytes,
                out_tx.clone(),
            ))
        });
        let (reports_tx, reports_rx) = mpsc::channel::<Report>(REPORTS_IN_FLIGHT);
        let reporter = tokio::spawn(store_reports(
            self.shared.deps.registry.clone(),
            self.device.clone(),
            reports_rx,
            out_tx.clone(),
        ));
        let (answers_tx, answers_rx) = mpsc::channel::<CommandAck>(ANSWERS_IN_FLIGHT);
        let answerer = tokio::spawn(store_answers(
            self.shared.deps.commands.clone(),
            self.device.clone(),
            answers_rx,
        ));

        let mut last_seq: Option<u64> = None;
        let far = || tokio::time::Instant::now() + Duration::from_secs(365 * 86_400);
        let mut expires = self.expires;
        let expiry =
            tokio::time::sleep_until(expires.and_then(Expiry::deadline).unwrap_or_else(far));
        tokio::pin!(expiry);
        // A frame read while gathering a run, to be handled next.
        let mut stash: Option<Result<Option<Frame>>> = None;
        let (reason, fatal): (String, Option<ProtocolError>) = 'session: loop {
            // read_frame is cancel-safe: what was read stays in `decoder`.
            let read = if let Some(read) = stash.take() {
                read
            } else {
                tokio::select! {
                biased;
                Some(e) = self.revoked.recv() => {
                    break (format!("revoked: {}", e.message), Some(e));
                }
                () = &mut expiry, if expires.is_some_and(|e| e.deadline().is_some()) => {
                    let Some(at) = expires else { continue };
                    let e = at.error(&self.device);
                    break (at.reason().to_string(), Some(e));
                }
                read = read_frame(&mut recv, &mut decoder, &self.shared.metrics) => read,
                }
            };
            let frame = match read {
                Ok(Some(frame)) => frame,
                Ok(None) => break ("closed by the device".to_string(), None),
                Err(Error::Protocol(e)) => {
                    break (format!("protocol error: {}", e.code), Some(e));
                }
                Err(Error::ConnectionLost(reason)) => break (reason, None),
                Err(e) => break (e.to_string(), None),
            };
            self.activity.seen(now_millis());
            match frame {
                Frame::Events(events) => {
                    self.fit_window();
                    // This frame, and the EVENTS frames already read behind
                    // it, go to the log as runs.
                    let mut run: Option<Run> = None;
                    let mut next = Some(events);
                    let mut broken = None;
                    // Whether an answer (a run or a refusal) has gone: then
                    // only frames already read follow it, so a device that
                    // never stops sending cannot keep the session from
                    // checking its revocation and expiry.
                    let mut answered = false;
                    while let Some(events) = next.take() {
                        if let Err(e) = self.check_seq(events.seq, &mut last_seq, &unanswered) {
                            broken = Some(e);
                            break;
                        }
                        let accepted = self.accept_events(events);
                        // The frame's share of the in-flight budget: its
                        // batch, and about as much again for its encoding
                        // in the log's write queue.
                        let share = accepted
                            .as_ref()
                            .map_or(0, |a| 2 * a.batch.get_array_memory_size());
                        let reserved = accepted
                            .is_ok()
                            .then(|| self.shared.in_flight.try_reserve(share))
                            .flatten();
                        let joins = matches!((&accepted, &run), (Ok(a), Some(r)) if r.takes(a));
                        // The run goes to the log before a frame it cannot
                        // take, and before the session waits for room: what
                        // a run holds is given back only once the log has it.
                        if (!joins || (accepted.is_ok() && reserved.is_none()))
                            && let Some(r) = run.take()
                        {
                            if !self.may_store() {
                                break;
                            }
                            answered = true;
                            if pending_tx.send(self.submit(r)).await.is_err() {
                                break 'session ("connection lost".into(), None);
                            }
                        }
                        match accepted {
                            Ok(accepted) => {
                                let reserved = match reserved {
                                    Some(reserved) => reserved,
                                    None => {
                                        // The session reads nothing while
                                        // it waits, so flow control holds
                                        // its device back.
                                        let reserved = self.shared.in_flight.reserve(share).await;
                                        if !self.may_store() {
                                            break;
                                        }
                                        reserved
                                    }
                                };
                                match run.as_mut() {
                                    Some(r) => r.push(accepted, reserved),
                                    None => run = Some(Run::new(accepted, reserved)),
                                }
                            }
                            Err(refused) => {
                                answered = true;
                                if pending_tx.send(refused).await.is_err() {
                                    break 'session ("connection lost".into(), None);
                                }
                            }
                        }
                        if run.as_ref().is_some_and(|r| !r.has_room()) {
                            break;
                        }
                        let ready = if !answered && run.as_ref().is_some_and(Run::wants_more) {
                            ready_frame(&mut recv, &mut decoder, &self.shared.metrics)
                        } else {
                            buffered_frame(&mut decoder)
                        };
                        match ready {
                            Some(Ok(Some(Frame::Events(events)))) => next = Some(events),
                            Some(other) => stash = Some(other),
                            None => {}
                        }
                    }
                    if let Some(r) = run.take()
                        && self.may_store()
                        && pending_tx.send(self.submit(r)).await.is_err()
                    {
                        break ("connection lost".into(), None);
                    }
                    if let Some(e) = broken {
                        break (format!("protocol error: {}", e.code), Some(e));
                    }
                }
                Frame::CommandAck(ack) => {
                    if answers_tx.send(ack).await.is_err() {
                        break ("connection lost".into(), None);
                    }
                }
                Frame::Renew(Renew { token }) => {
                    let (answer, renewed) = self.renew(token).await;
                    if let Some(renewed) = renewed {
                        expires = renewed;
                        let deadline = expires.and_then(Expiry::deadline).unwrap_or_else(far);
                        expiry.as_mut().reset(deadline);
                    }
                    let _ = out_tx.send(answer).await;
                }
                Frame::Report(report) => {
                    if reports_tx.send(report).await.is_err() {
                        break ("connection lost".into(), None);
                    }
                }
                Frame::Ping(nonce) => {
                    let _ = out_tx.send(Frame::Pong(nonce)).await;
                }
                Frame::Pong(_) => {}
                other => {
                    let e = ProtocolError::protocol(format!(
                        "{} is not allowed from a client after HELLO",
                        other.frame_type().name()
                    ));
                    break (format!("protocol error: {}", e.code), Some(e));
                }
            }
        };
        // Answer what is in flight before letting the writer go, and before
        // a fatal ERROR, which is the last frame of a session. A session
        // ending on an error waits for its answers only briefly.
        drop(pending_tx);
        drop(reports_tx);
        drop(answers_tx);
        // Nothing new goes out to a session that is ending.
        for task in [commands, desired].into_iter().flatten() {
            task.abort();
            let _ = task.await;
        }
        let deadline = fatal
            .is_some()
            .then(|| tokio::time::Instant::now() + FATAL_PATIENCE);
        for mut task in [acker, reporter, answerer] {
            let done = match deadline {
                Some(at) => tokio::time::timeout_at(at, &mut task).await.is_ok(),
                None => {
                    let _ = (&mut task).await;
                    true
                }
            };
            if !done {
                task.abort();
            }
        }
        if self.wants_commands {
            self.shared.deps.commands.release_notifier(&self.device);
        }
        if let Some(e) = &fatal {
            self.fatal(&out_tx, e).await;
        }
        drop(out_tx);
        let _ = writer.await;
        reason
    }

    /// Checks a RENEW's token for the session's device. Returns the answer,
    /// and, if the token was taken, the session's new expiry.
    async fn renew(&self, token: String) -> (Frame, Option<Option<Expiry>>) {
        let refused = |code: RefusedCode, message: String| {
            let frame = Frame::Refused(protocol::Refused {
                request: RefusedRequest::Renew,
                id: None,
                code,
                message,
            });
            (frame, None)
        };
        let certified = {
            let mut live = lock(&self.shared.live);
            let Some(l) = self.live_mut(&mut live) else {
                return refused(
                    RefusedCode::Unavailable,
                    "the session is ending".to_string(),
                );
            };
            if matches!(l.credential, Credential::Certificate(_)) {
                true
            } else {
                // Listed before the check, so that a change announced
                // during it refuses the token (see `recheck`).
                l.renewal = Some((token.clone(), None));
                false
            }
        };
        if certified {
            return refused(
                RefusedCode::InvalidRequest,
                format!(
                    "device '{}': this session authenticated with its client certificate; it has \
                     no token to renew",
                    self.device
                ),
            );
        }
        let checked = self
            .shared
            .deps
            .registry
            .authenticate(&self.device, &token, now_millis())
            .await;
        let mut live = lock(&self.shared.live);
        let Some(l) = self.live_mut(&mut live) else {
            return refused(
                RefusedCode::Unavailable,
                "the session is ending".to_string(),
            );
        };
        let revoked_meanwhile = match l.renewal.take() {
            Some((candidate, refused)) if candidate == token => refused,
            _ => None,
        };
        let refusal = match (checked, revoked_meanwhile) {
            (Ok(_), None) => {
                let expires = Expiry::of_token(&token);
                l.credential = Credential::Token(token);
                let expires_at = expires.map(|e| u64::try_from(e.at_ms / 1000).unwrap_or(0));
                tracing::debug!(device = %self.device, "session token renewed");
                return (Frame::Renewed(Renewed { expires_at }), Some(expires));
            }
            (Ok(_), Some(refused)) => refused,
            (Err(e), _) => refusal(&self.device, e),
        };
        let code = match refusal.code {
            ErrorCode::Unavailable => RefusedCode::Unavailable,
            _ => RefusedCode::Unauthorized,
        };
        refused(
            code,
            format!(
                "{}; the session goes on with its current token",
                refusal.message
            ),
        )
    }

    fn live_mut<'a>(&self, live: &'a mut HashMap<String, DeviceLive>) -> Option<&'a mut Live> {
        live.get_mut(&self.device)?
            .sessions
            .iter_mut()
            .find(|l| l.id == self.id)
    }

    /// Checks an EVENTS frame's number: above the last in a session that
    /// is not idempotent; not 0, nor a number still unanswered, in one that
    /// is.
    fn check_seq(
        &self,
        seq: u64,
        last_seq: &mut Option<u64>,
        unanswered: &Unanswered,
    ) -> std::result::Result<(), ProtocolError> {
        if self.idempotent && seq == 0 {
            return Err(ProtocolError::protocol(
                "EVENTS seq 0 in an idempotent session; the device's numbers start at 1",
            ));
        }
        if self.idempotent {
            if !lock(unanswered).insert(seq) {
                return Err(ProtocolError::protocol(format!(
                    "EVENTS seq {seq} is sent again before its first copy was answered"
                )));
            }
        } else if let Some(last) = *last_seq
            && seq <= last
        {
            return Err(ProtocolError::protocol(format!(
                "EVENTS seq {seq} is not greater than the previous seq {last}"
            )));
        }
        *last_seq = Some(seq);
        Ok(())
    }

    /// Checks and decodes one EVENTS frame, or answers it with a REJECT.
    fn accept_events(&mut self, events: Events) -> std::result::Result<Accepted, Pending> {
        let Events {
            seq,
            stream,
            encoding,
            payload,
        } = events;
        let reject = |code: RejectCode,
                      message: String,
                      event: Option<usize>,
                      field: Option<String>,
                      retry_after_ms: Option<u64>| {
            Pending::Ready(Frame::Reject(Reject {
                seq,
                code,
                message,
                event,
                field,
                retry_after_ms,
            }))
        };
        let Some(def) = self.shared.deps.catalog.stream(&stream) else {
            return Err(reject(
                RejectCode::UnknownStream,
                format!(
                    "stream '{stream}' does not exist; create it with CREATE STREAM {stream} (...)"
                ),
                None,
                None,
                None,
            ));
        };
        // Idempotent sessions: a frame above one refused for the rate waits
        // for it, or it would be stored first and the refused frame, sent
        // again, would pass for a resend (protocol.md section 12).
        let held_by = if self.idempotent
            && let Some(refused) = self.rate_refused.get_mut(&stream)
        {
            refused.remove(&seq);
            let first = refused.first().copied().filter(|first| *first < seq);
            if first.is_some() && refused.len() < MAX_RATE_REFUSED {
                refused.insert(seq);
            }
            if refused.is_empty() {
                self.rate_refused.remove(&stream);
            }
            first
        } else {
            None
        };
        // Whether the frame is over the rate depends only on the debt owed
        // already: asked before decoding, so a device over its rate costs
        // little.
        let over = match (held_by, self.rate.check()) {
            (Some(first), over) => Some((
                format!(
                    "frame {first} of stream '{stream}' was refused for the device's rate; \
                     send it again, and every later frame refused, in order, before this one"
                ),
                over.err().map_or(1, |l| l.retry_after_ms()),
            )),
            (None, Err(limited)) => Some((limited.message(&self.device), limited.retry_after_ms())),
            (None, Ok(())) => None,
        };
        if let Some((message, retry_after_ms)) = over {
            if self.idempotent {
                let refused = self.rate_refused.entry(stream).or_default();
                if refused.len() < MAX_RATE_REFUSED {
                    refused.insert(seq);
                }
            }
            return Err(reject(
                RejectCode::RateLimited,
                message,
                None,
                None,
                Some(retry_after_ms),
            ));
        }
        let max_events = self.shared.config.max_events_per_frame as usize;
        let decoded = match encoding {
            Encoding::Json => decode_json(&def, &payload, &self.device, now_millis(), max_events),
            Encoding::Arrow => {
                self.arrow
                    .decode(&def, &payload, &self.device, now_millis(), max_events)
            }
            Encoding::Unknown(byte) => {
                return Err(reject(
                    RejectCode::UnsupportedEncoding,
                    format!(
                        "encoding 0x{byte:02x} is not supported; use 0x01 (JSON) or 0x02 \
                         (Arrow IPC stream)"
                    ),
                    None,
                    None,
                    None,
                ));
            }
        };
        let batch = match decoded {
            Ok(batch) => batch,
            Err(e) => return Err(reject(e.code, e.message, e.event, e.field, None)),
        };
        // Refused only if another session of the device ran it into debt
        // since the check above.
        if let Err(limited) = self
            .rate
            .take(batch.num_rows() as u64, payload.len() as u64)
        {
            if self.idempotent {
                self.rate_refused.entry(stream).or_default().insert(seq);
            }
            return Err(reject(
                RejectCode::RateLimited,
                limited.message(&self.device),
                None,
                None,
                Some(limited.retry_after_ms()),
            ));
        }
        Ok(Accepted {
            seq,
            latest_event: latest_event_time(&batch),
            stream,
            batch,
            bytes: payload.len(),
        })
    }

    /// Gives the connection its current share of the budget's receive
    /// windows. A smaller window takes effect as the device's bytes already
    /// allowed are read.
    fn fit_window(&mut self) {
        // Sessions, not connections: a flood of handshakes must not shrink
        // the windows of the devices already sending.
        let gate = &self.shared.gate;
        let sessions = gate.open().saturating_sub(gate.pending());
        let window = self.shared.in_flight.receive_window(sessions);
        if window != self.window {
            self.window = window;
            self.connection
                .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
        }
    }

    /// Whether the session may still store events: not once its device's
    /// credentials are revoked. The session loop reads the revocation next
    /// and ends the session.
    fn may_store(&self) -> bool {
        self.revoked.is_empty()
    }

    /// Submits a run of frames, with their share of the in-flight budget,
    /// to the log. Submission happens here, in the reading task, so the
    /// device's frames reach the log in order.
    fn submit(&self, run: Run) -> Pending {
        let Run {
            stream,
            frames,
            mut batches,
            latest_event,
            reserved,
            ..
        } = run;
        // A numbered frame the log already holds is acknowledged with
        // count 0 and not stored again.
        let numbered = |seq: u64| if self.idempotent { seq } else { 0 };
        let log = &self.shared.deps.log;
        // One frame needs no joining.
        let submitted = if frames.len() == 1
            && batches.len() == 1
            && let (Some(&(seq, _)), Some(batch)) = (frames.first(), batches.pop())
        {
            log.submit_sequenced(&stream, &self.device, numbered(seq), batch)
        } else {
            let numbers: Vec<(u64, u32)> = frames
                .iter()
                .map(|(seq, rows)| (numbered(*seq), *rows))
                .collect();
            match batches.first() {
                Some(first) => arrow::compute::concat_batches(&first.schema(), &batches)
                    .map_err(|e| tributary_engine::Error::Internal(format!("joining frames: {e}")))
                    .and_then(|batch| log.submit_run(&stream, &self.device, &numbers, batch)),
                None => Err(tributary_engine::Error::Internal("an empty run".into())),
            }
        };
        let future = match submitted {
            Ok(future) => future,
            Err(e) => {
                tracing::error!(device = %self.device, stream = %stream, error = %e, "append refused");
                return Pending::Appending {
                    frames,
                    future: Box::pin(std::future::ready(Err(e))),
                    latest_event,
                    reserved: None,
                };
            }
        };
        Pending::Appending {
            frames,
            future,
            latest_event,
            reserved: Some(reserved),
        }
    }

    async fn fatal(&self, out: &mpsc::Sender<Frame>, e: &ProtocolError) {
        let _ = out.send(Frame::Error(ErrorBody::from(e))).await;
        // Let the writer flush the ERROR frame before the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        close(&self.connection, e.code, &e.message);
    }
}

/// The latest event time (`ts`, the second system column) of a decoded
/// batch.
fn latest_event_time(batch: &RecordBatch) -> Option<i64> {
    let ts = batch
        .columns()
        .get(1)?
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()?;
    if ts.null_count() == 0 {
        ts.values().iter().copied().max()
    } else {
        ts.iter().flatten().max()
    }
}

/// The numbers of an idempotent session's frames awaiting their answer.
type Unanswered = Arc<Mutex<std::collections::HashSet<u64>>>;

/// Turns finished appends into ACK / REJECT frames, in submission order.
///
/// A device that reads none of its answers for [`ANSWER_PATIENCE`], once
/// they have filled the session's outbox, has its connection closed: the
/// runs queued behind its answers would otherwise keep their share of the
/// in-flight budget, and a few such devices could hold back every other.
async fn answer_in_order(
    mut pending: mpsc::Receiver<Pending>,
    out: mpsc::Sender<Frame>,
    connection: quinn::Connection,
    unanswered: Option<Unanswered>,
    activity: Arc<Activity>,
    metrics: Arc<GatewayMetrics>,
) {
    while let Some(p) = pending.recv().await {
        let frames = match p {
            Pending::Ready(frame) => vec![frame],
            Pending::Appending {
                frames,
                future,
                latest_event,
                reserved,
            } => {
                let appended = future.await;
                // The log has the run now, or refused it.
                drop(reserved);
                match appended {
                    Ok(receipt) => {
                        if receipt.count > 0
                            && let Some(t) = latest_event
                        {
                            activity.stored_events_until(t);
                        }
                        run_acks(&frames, receipt.count)
                    }
                    Err(e) => frames.iter().map(|(seq, _)| not_stored(*seq, &e)).collect(),
                }
            }
        };
        for frame in frames {
            if let Some(unanswered) = &unanswered
                && let Frame::Ack(Ack { seq, .. }) | Frame::Reject(Reject { seq, .. }) = &frame
            {
                lock(unanswered).remove(seq);
            }
            match &frame {
                Frame::Ack(ack) => metrics.frame_accepted(u64::from(ack.count)),
                Frame::Reject(reject) => metrics.frame_rejected(reject.code.as_str()),
                _ => {}
            }
            match out.try_send(frame) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(frame)) => {
                    match tokio::time::timeout(ANSWER_PATIENCE, out.send(frame)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            let e = ProtocolError::protocol(format!(
                                "the device read none of its answers for {} s",
                                ANSWER_PATIENCE.as_secs()
                            ));
                            close(&connection, e.code, &e.message);
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The ACKs of a run's frames, given how many of its events the log
/// stored: those of its last frames (the first ones it held already are
/// resends, acknowledged with count 0).
fn run_acks(frames: &[(u64, u32)], stored: u32) -> Vec<Frame> {
    let mut left = stored;
    let mut counts: Vec<u32> = frames
        .iter()
        .rev()
        .map(|(_, rows)| {
            let count = if left >= *rows { *rows } else { 0 };
            left -= count;
            count
        })
        .collect();
    counts.reverse();
    frames
        .iter()
        .zip(counts)
        .map(|((seq, _), count)| Frame::Ack(Ack { seq: *seq, count }))
        .collect()
}

/// The REJECT of a frame the log did not store.
fn not_stored(seq: u64, e: &tributary_engine::Error) -> Frame {
    if matches!(e, tributary_engine::Error::Unavailable(_)) {
        // Backpressure (a full log, a frame to resend first): the device is
        // told to retry; nothing failed.
        tracing::debug!(error = %e, "append refused for now");
    } else {
        tracing::error!(error = %e, "append failed");
    }
    let message = match e {
        // Says why and that a retry will do.
        tributary_engine::Error::Unavailable(why) => why.clone(),
        e => format!("the server could not store the events: {e}; retry later"),
    };
    Frame::Reject(Reject {
        seq,
        code: RejectCode::Unavailable,
        message,
        event: None,
        field: None,
        retry_after_ms: None,
    })
}

async fn write_frames(mut send: quinn::SendStream, mut frames: mpsc::Receiver<Frame>) {
    let mut buf = Vec::with_capacity(4096);
    while let Some(frame) = frames.recv().await {
        buf.clear();
        frame.encode(&mut buf);
        // Coalesce whatever else is ready into one write.
        while buf.len() < 64 * 1024 {
            match frames.try_recv() {
                Ok(f) => f.encode(&mut buf),
                Err(_) => break,
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Records the device's COMMAND_ACKs in the order it sent them (SQLite with
/// fsync, off the async threads), those that arrived together in one
/// transaction; the session stops reading while [`ANSWERS_IN_FLIGHT`] wait.
async fn store_answers(
    queue: Arc<CommandQueue>,
    device: String,
    mut answers: mpsc::Receiver<CommandAck>,
) {
    while let Some(first) = answers.recv().await {
        // Whatever else has arrived is recorded with it, in one transaction.
        let mut batch = vec![first];
        while batch.len() < ANSWERS_IN_FLIGHT {
            match answers.try_recv() {
                Ok(ack) => batch.push(ack),
                Err(_) => break,
            }
        }
        let device = device.clone();
        let recorded = queue
            .blocking(move |q| {
                record_answers(q, &device, batch);
                Ok(())
            })
            .await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, "could not record command answers");
        }
    }
}

/// Records a device's COMMAND_ACKs. Answers to commands that are not this
/// device's, or no longer open, change nothing.
fn record_answers(queue: &CommandQueue, device: &str, acks: Vec<CommandAck>) {
    let answers: Vec<(String, Answer)> = acks
        .into_iter()
        .map(|ack| {
            let status = match ack.status.unwrap_or(AckStatus::Acknowledged) {
                AckStatus::Acknowledged => CommandStatus::Acknowledged,
                AckStatus::Rejected => CommandStatus::Rejected,
                AckStatus::Failed => CommandStatus::Failed,
            };
            let answer = Answer {
                status,
                reason: ack.reason,
                response: ack.response,
            };
            (ack.id, answer)
        })
        .collect();
    let refs: Vec<(&str, &Answer)> = answers.iter().map(|(id, a)| (id.as_str(), a)).collect();
    match queue.answer_all(device, &refs, now_millis()) {
        Ok(taken) => {
            for ((id, _), taken) in refs.iter().zip(taken) {
                if !taken {
                    tracing::debug!(device = %device, command = %id, "answer for no open command");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "could not record command answers"),
    }
}

/// Sends the device every open command, now and whenever more are queued.
async fn deliver_commands(
    queue: Arc<CommandQueue>,
    device: String,
    out: mpsc::Sender<Frame>,
    metrics: Arc<GatewayMetrics>,
    max_frame_bytes: u32,
) {
    let notifier = queue.notifier(&device);
    let mut sent: HashSet<String> = HashSet::new();
    loop {
        // Register interest before looking at the queue, so a command queued
        // between the look and the wait still wakes this session.
        let notified = notifier.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = now_millis();
        let who = device.clone();
        let pending = match queue.blocking(move |q| q.pending(&who, now)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(device = %device, error = %e, "reading the command queue failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Frames to send, marked delivered together below (one fsync for
        // all of them rather than one each).
        let mut ready = Vec::new();
        for c in pending {
            if !sent.insert(c.id.clone()) {
                continue;
            }
            let frame = Frame::Command(Command {
                id: c.id.clone(),
                name: c.name,
                payload: c.payload,
                created_at: millis_to_utc(c.created_at),
                expires_at: millis_to_utc(c.expires_at),
                call: c.call,
            });
            // The server never sends a frame over the maximum it advertised
            // (protocol.md section 3): a command too large for it fails.
            let len = frame.encode_to_vec().len() - protocol::LENGTH_PREFIX_BYTES;
            if len > max_frame_bytes as usize {
                let answer = Answer {
                    status: CommandStatus::Failed,
                    reason: Some(format!(
                        "not delivered: its COMMAND frame would be {len} bytes, and the server \
                         sends frames of up to {max_frame_bytes} bytes (--max-frame-bytes)"
                    )),
                    response: None,
                };
                let (who, id) = (device.clone(), c.id.clone());
                if let Err(e) = queue
                    .blocking(move |q| q.answer(&who, &id, &answer, now))
                    .await
                {
                    tracing::error!(command = %c.id, error = %e, "could not mark a command failed");
                }
                continue;
            }
            ready.push((c.id, frame));
        }
        if ready.is_empty() {
            notified.await;
            continue;
        }
        // Marked first: a command superseded or expired since the queue was
        // read is not sent.
        let ids: Vec<String> = ready.iter().map(|(id, _)| id.clone()).collect();
        let marked = queue
            .blocking(move |q| {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                q.mark_all_delivered(&ids, now)
            })
            .await;
        let may_go = match marked {
            Ok(may_go) => may_go,
            Err(e) => {
                tracing::error!(device = %device, error = %e, "could not mark commands delivered");
                vec![true; ready.len()]
            }
        };
        for ((_, frame), go) in ready.into_iter().zip(may_go) {
            if !go {
                continue;
            }
            if out.send(frame).await.is_err() {
                return;
            }
            metrics.command_delivered();
        }
        notified.await;
    }
}

/// Sends the device its desired properties: now, if it has any, and again
/// whenever they change, each version at most once and never an older one
/// after a newer.
async fn deliver_desired(
    registry: SharedRegistry,
    device: String,
    mut announced: watch::Receiver<i64>,
    max_frame_bytes: u32,
    out: mpsc::Sender<Frame>,
) {
    let mut sent: i64 = 0;
    loop {
        // Marked seen before the read, so that a change announced during
        // the read wakes this loop again.
        drop(announced.borrow_and_update());
        match registry.get_twin(&device).await {
            Ok(twin) if twin.desired_version > sent => {
                sent = twin.desired_version;
                let frame = Frame::Desired(Desired {
                    version: u64::try_from(twin.desired_version).unwrap_or(0),
                    properties: twin.desired,
                });
                let len = frame.encode_to_vec().len() - protocol::LENGTH_PREFIX_BYTES;
                if len > max_frame_bytes as usize {
                    tracing::error!(
                        device = %device,
                        version = sent,
                        bytes = len,
                        max_frame_bytes,
                        "desired properties too large for a frame; not sent"
                    );
                } else if out.send(frame).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            // Removed: the session is being closed.
            Err(tributary_registry::Error::NotFound(_)) => return,
            Err(e) => {
                tracing::error!(device = %device, error = %e, "reading desired properties failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        if announced.changed().await.is_err() {
            return;
        }
    }
}

/// Stores the device's REPORTs, in the order it sent them, and answers
/// each with REPORTED or REFUSED.
async fn store_reports(
    registry: SharedRegistry,
    device: String,
    mut reports: mpsc::Receiver<Report>,
    out: mpsc::Sender<Frame>,
) {
    while let Some(Report { id, patch, replace }) = reports.recv().await {
        let update = PropertiesUpdate {
            patch,
            replace,
            if_version: None,
        };
        let refused = |code: RefusedCode, message: String| {
            Frame::Refused(protocol::Refused {
                request: RefusedRequest::Report,
                id: Some(id),
                code,
                message,
            })
        };
        let frame = match registry
            .update_properties(&device, Side::Reported, update, now_millis())
            .await
        {
            Ok(twin) => Frame::Reported(Reported {
                id,
                version: u64::try_from(twin.reported_version).unwrap_or(0),
            }),
            Err(e @ tributary_registry::Error::InvalidProperties(_)) => {
                refused(RefusedCode::InvalidProperties, e.to_string())
            }
            Err(tributary_registry::Error::NotFound(_)) => refused(
                RefusedCode::Unauthorized,
                format!("device '{device}' was removed from the registry"),
            ),
            Err(e) if e.is_user_error() => refused(RefusedCode::InvalidRequest, e.to_string()),
            Err(e) => {
                tracing::error!(device = %device, error = %e, "storing reported properties failed");
                refused(
                    RefusedCode::Unavailable,
                    "the server could not store the reported properties; send them again later"
                        .into(),
                )
            }
        };
        if out.send(frame).await.is_err() {
            return;
        }
    }
}

fn millis_to_utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(frames: &[Frame]) -> Vec<(u64, u32)> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Ack(a) => (a.seq, a.count),
                other => panic!("not an ACK: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_runs_acks_count_the_stored_events_from_its_last_frame_back() {
        let run = [(4, 1), (5, 3), (6, 2)];
        // All stored.
        assert_eq!(counts(&run_acks(&run, 6)), [(4, 1), (5, 3), (6, 2)]);
        // The first frame was held already (a resend).
        assert_eq!(counts(&run_acks(&run, 5)), [(4, 0), (5, 3), (6, 2)]);
        assert_eq!(counts(&run_acks(&run, 2)), [(4, 0), (5, 0), (6, 2)]);
        // All resends.
        assert_eq!(counts(&run_acks(&run, 0)), [(4, 0), (5, 0), (6, 0)]);
    }
}
