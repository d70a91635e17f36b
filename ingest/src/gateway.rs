//! The cloud gateway: the QUIC endpoint devices connect to.
//!
//! Per connection: the device opens the session stream and says HELLO; the
//! gateway checks its token against the registry, answers WELCOME, and from
//! then on
//! - decodes each EVENTS frame against its stream's schema and submits the
//!   batch to the event stream in arrival order, answering ACK once the
//!   batch is durable, or REJECT (nothing stored) when a frame is bad;
//! - sends the device its queued commands, at once and whenever new ones
//!   are queued, and records the device's COMMAND_ACKs.
//!
//! A session lives only as long as its credentials: the gateway keeps each
//! session's token and checks it again whenever the registry announces that
//! the device's right to connect may have changed (disabled, removed, a key
//! rotated), and closes the session when its token expires. Either way the
//! device gets an ERROR `unauthorized` that says why.
//!
//! The frames of a connection are read by one task, so a device's events
//! reach the log in the order it sent them; many frames may be in flight,
//! and their answers go back in the same order. A connection has at most
//! [`GatewayConfig::max_in_flight`] frames waiting for the disk; past that,
//! the gateway stops reading and QUIC flow control slows the sender.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc, watch};
use tributary_engine::catalog::Catalog;
use tributary_engine::commands::CommandQueue;
use tributary_engine::event::now_millis;
use tributary_engine::log::{AppendFuture, SharedEventStream};
use tributary_registry::SharedRegistry;

use crate::decode::decode_json;
use crate::protocol::{
    self, Ack, Command, CommandAck, Encoding, ErrorBody, ErrorCode, Events, Frame, FrameDecoder,
    Hello, ProtocolError, Reject, RejectCode, Welcome,
};
use crate::tls::{TlsFiles, server_config};
use crate::{Error, Result};

/// How the gateway listens and what it allows.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub max_frame_bytes: u32,
    pub max_events_per_frame: u32,
    /// Time a new connection has to open its session stream and say HELLO.
    pub hello_timeout: Duration,
    /// EVENTS frames of one connection waiting for the disk at once.
    pub max_in_flight: usize,
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
        }
    }
}

/// What the gateway works with.
#[derive(Clone)]
pub struct GatewayDeps {
    pub registry: SharedRegistry,
    pub catalog: Arc<Catalog>,
    pub log: SharedEventStream,
    pub commands: Arc<CommandQueue>,
}

/// One session of a device, as the gateway tracks it.
struct Live {
    id: u64,
    connection: quinn::Connection,
    /// The token the session authenticated with: checked again when the
    /// registry says the device's right to connect may have changed.
    token: String,
    /// False while HELLO is being checked. A session is listed before its
    /// check starts, so that a change announced during the check still
    /// reaches it.
    authenticated: bool,
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

/// How long a revoked session has to send its ERROR frame before the
/// connection is closed under it.
const REVOKE_GRACE: Duration = Duration::from_millis(500);

struct Shared {
    config: GatewayConfig,
    deps: GatewayDeps,
    /// The live sessions of each connected device (a device may hold several).
    live: Mutex<HashMap<String, Vec<Live>>>,
    next_id: AtomicU64,
}

/// A handle for the rest of the server: who is connected, and disconnecting.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    /// The ids of the devices connected (and authenticated) now.
    pub fn connected_devices(&self) -> HashSet<String> {
        lock(&self.shared.live)
            .iter()
            .filter(|(_, sessions)| sessions.iter().any(|l| l.authenticated))
            .map(|(device, _)| device.clone())
            .collect()
    }

    /// Closes every connection of a device with `unauthorized` and `reason`.
    ///
    /// The gateway does this by itself for every change the registry
    /// announces; this is for callers that want a device gone at once.
    pub fn disconnect(&self, device: &str, reason: &str) {
        for live in lock(&self.shared.live)
            .get_mut(device)
            .into_iter()
            .flatten()
        {
            live.revoke(ProtocolError::new(ErrorCode::Unauthorized, reason));
        }
    }
}

/// The QUIC gateway.
pub struct Gateway {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the UDP socket; call [`Gateway::run`] to serve.
    pub fn bind(config: GatewayConfig, deps: GatewayDeps) -> Result<Self> {
        let server = server_config(&config.tls)?;
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Gateway {
            endpoint,
            shared: Arc::new(Shared {
                config,
                deps,
                live: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
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

    /// Accepts connections until `shutdown` turns true, then closes every
    /// connection with `server_shutdown` and waits briefly for them to go.
    ///
    /// Meanwhile it follows the registry's changes and closes the sessions
    /// whose credentials no longer hold.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Subscribed before the first connection is accepted, so that no
        // change after a session's check can be missed.
        let changes = self.shared.deps.registry.changes();
        let watcher = tokio::spawn(watch_registry(self.shared.clone(), changes));
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    tokio::spawn(async move { serve(shared, incoming).await });
                }
                _ = shutdown.changed() => break,
            }
        }
        watcher.abort();
        self.endpoint.close(
            ErrorCode::ServerShutdown.close_code().into(),
            b"the server is shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn close(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    connection.close(code.close_code().into(), reason.as_bytes());
}

/// Reads the next whole frame; `Ok(None)` when the peer finished the stream.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<Frame>> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => {
                decoder.finish()?;
                return Ok(None);
            }
            Err(e) => return Err(Error::ConnectionLost(e.to_string())),
        }
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

async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let timed_out = || {
        ProtocolError::new(
            ErrorCode::HelloTimeout,
            "no HELLO frame within the time allowed",
        )
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
    let hello = match tokio::time::timeout_at(deadline, read_frame(&mut recv, &mut decoder)).await {
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
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (revoke_tx, revoked) = mpsc::unbounded_channel();
    lock(&shared.live)
        .entry(device.clone())
        .or_default()
        .push(Live {
            id,
            connection: connection.clone(),
            token: hello.token.clone(),
            authenticated: false,
            revoke: revoke_tx,
        });
    let checked = authenticate(&shared, &hello).await;
    let reason = match checked {
        Err(e) => {
            forget(&shared, &device, id);
            return fail(&connection, &mut send, &e).await;
        }
        Ok(expires) => {
            if let Some(live) = lock(&shared.live)
                .get_mut(&device)
                .and_then(|sessions| sessions.iter_mut().find(|l| l.id == id))
            {
                live.authenticated = true;
            }
            tracing::info!(device = %device, remote = %connection.remote_address(), "device connected");
            let session = Session {
                shared: shared.clone(),
                device: device.clone(),
                connection: connection.clone(),
                wants_commands: hello.commands,
                idempotent: hello.idempotent,
                expires,
                revoked,
            };
            session.run(send, recv, decoder).await
        }
    };
    forget(&shared, &device, id);
    tracing::info!(device = %device, reason = %reason, "device disconnected");
}

/// Takes a session off the live list.
fn forget(shared: &Shared, device: &str, id: u64) {
    let mut live = lock(&shared.live);
    if let Some(sessions) = live.get_mut(device) {
        sessions.retain(|l| l.id != id);
        if sessions.is_empty() {
            live.remove(device);
        }
    }
}

/// Checks HELLO's version and credentials; returns when the token expires,
/// if it does.
async fn authenticate(shared: &Shared, hello: &Hello) -> Result<Option<Expiry>, ProtocolError> {
    if hello.version != protocol::VERSION {
        return Err(ProtocolError::unsupported_version(u64::from(hello.version)));
    }
    match shared
        .deps
        .registry
        .authenticate(&hello.device_id, &hello.token, now_millis())
        .await
    {
        // Legacy `trb_` tokens (from before device keys) do not expire.
        Ok(_) => Ok(Expiry::of(&hello.token)),
        Err(e) => Err(refusal(&hello.device_id, e)),
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
            tracing::error!(device = %device, error = %e, "registry failed while checking a token");
            ProtocolError::new(
                ErrorCode::Unavailable,
                "the server cannot check credentials right now; retry later",
            )
        }
    }
}

/// When a session's token stops being valid.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    /// Seconds since the Unix epoch, as the token says.
    at_secs: i64,
}

impl Expiry {
    fn of(token: &str) -> Option<Expiry> {
        let (at_secs, _) = tributary_registry::token::parse(token).ok()?;
        Some(Expiry { at_secs })
    }

    /// The tokio instant of the expiry, from the wall clock now; `None` if
    /// it is too far away to be one.
    fn deadline(self) -> Option<tokio::time::Instant> {
        let left_ms = self
            .at_secs
            .saturating_mul(1000)
            .saturating_sub(now_millis());
        tokio::time::Instant::now()
            .checked_add(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)))
    }

    fn error(self, device: &str) -> ProtocolError {
        let at = DateTime::from_timestamp(self.at_secs, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.at_secs.to_string());
        ProtocolError::new(
            ErrorCode::Unauthorized,
            format!("device '{device}': token expired at {at}; reconnect with a new token"),
        )
    }
}

/// Follows the registry's announcements and checks the live sessions of
/// every device named again; when announcements were lost, checks them all.
async fn watch_registry(shared: Arc<Shared>, mut changes: broadcast::Receiver<String>) {
    loop {
        let devices: Vec<String> = match changes.recv().await {
            Ok(device) => vec![device],
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "registry changes came faster than they were checked; checking every session"
                );
                lock(&shared.live).keys().cloned().collect()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for device in devices {
            recheck(&shared, &device).await;
        }
    }
}

/// Checks every live session of `device` with its own token and revokes the
/// ones the registry refuses now.
async fn recheck(shared: &Shared, device: &str) {
    let sessions: Vec<(u64, String, bool)> = lock(&shared.live)
        .get(device)
        .into_iter()
        .flatten()
        .map(|l| (l.id, l.token.clone(), l.authenticated))
        .collect();
    // Sessions of one device often share a token: one check each.
    let mut verdicts: HashMap<(&str, bool), Option<ProtocolError>> = HashMap::new();
    for (_, token, authenticated) in &sessions {
        let key = (token.as_str(), *authenticated);
        if verdicts.contains_key(&key) {
            continue;
        }
        let verdict = match shared
            .deps
            .registry
            .authenticate(device, token, now_millis())
            .await
        {
            Ok(_) => None,
            // A session whose HELLO is still being checked has proved
            // nothing yet: it gets the registry's reason as it stands.
            Err(e) if !authenticated => Some(refusal(device, e)),
            Err(e) => Some(revocation(shared, device, token, e).await),
        };
        verdicts.insert(key, verdict);
    }
    let mut live = lock(&shared.live);
    for l in live.get_mut(device).into_iter().flatten() {
        let Some((_, token, authenticated)) = sessions.iter().find(|(id, ..)| *id == l.id) else {
            continue; // Listed after the check began: its own check is newer.
        };
        if let Some(Some(err)) = verdicts.get(&(token.as_str(), *authenticated)) {
            tracing::info!(device = %device, reason = %err.message, "closing a session whose credentials no longer hold");
            l.revoke(err.clone());
        }
    }
}

/// Why a session that was authenticated is not any more. Its holder proved
/// it had a key of the device, so it may learn what changed: the registry's
/// generic reason (unknown device or wrong signature) is made specific.
async fn revocation(
    shared: &Shared,
    device: &str,
    token: &str,
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
        Ok(Some(_)) => match Expiry::of(token) {
            Some(expiry) if expiry.at_secs.saturating_mul(1000) <= now_millis() => {
                expiry.error(device)
            }
            // A token from before device keys: rotating the primary key
            // replaced it.
            _ if token.starts_with(tributary_registry::TOKEN_PREFIX) => ProtocolError::new(
                ErrorCode::Unauthorized,
                format!(
                    "device '{device}': its legacy token was replaced when its primary key was \
                     rotated; reconnect with a token signed by a current key"
                ),
            ),
            // The device is there, enabled, and the token has not expired:
            // only its signature can have stopped holding.
            _ => ProtocolError::new(
                ErrorCode::Unauthorized,
                format!(
                    "device '{device}': the key that signed this session's token was rotated; \
                     reconnect with a token signed by a current key"
                ),
            ),
        },
        Err(lookup) => refusal(device, lookup),
    }
}

/// The answer to one EVENTS frame, in the order frames arrived.
enum Pending {
    Ready(Frame),
    Appending { seq: u64, future: AppendFuture },
}

struct Session {
    shared: Arc<Shared>,
    device: String,
    connection: quinn::Connection,
    wants_commands: bool,
    /// EVENTS `seq` numbers are the device's own (HELLO `idempotent`).
    idempotent: bool,
    /// When the session's token expires; the session ends then.
    expires: Option<Expiry>,
    /// Why the session must end now (see [`Live::revoke`]).
    revoked: mpsc::UnboundedReceiver<ProtocolError>,
}

impl Session {
    /// Serves an authenticated session; returns why it ended.
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
        let (out_tx, out_rx) = mpsc::channel::<Frame>(1024);
        let writer = tokio::spawn(write_frames(send, out_rx));
        let (pending_tx, pending_rx) = mpsc::channel::<Pending>(self.shared.config.max_in_flight);
        // Idempotent sessions: the numbers of frames not yet answered (a
        // frame may be sent again with its number once it has its answer).
        let unanswered: Unanswered = Arc::default();
        let acker = tokio::spawn(answer_in_order(
            pending_rx,
            out_tx.clone(),
            self.idempotent.then(|| unanswered.clone()),
        ));
        let commands = self.wants_commands.then(|| {
            tokio::spawn(deliver_commands(
                self.shared.deps.commands.clone(),
                self.device.clone(),
                out_tx.clone(),
            ))
        });

        let mut last_seq: Option<u64> = None;
        let expires = self.expires;
        let expiry = async move {
            match expires.and_then(|at| Some((at, at.deadline()?))) {
                Some((at, deadline)) => {
                    tokio::time::sleep_until(deadline).await;
                    at
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let reason = loop {
            // read_frame is cancel-safe: what was read stays in `decoder`.
            let read = tokio::select! {
                biased;
                Some(e) = self.revoked.recv() => {
                    self.fatal(&out_tx, &e).await;
                    break e.to_string();
                }
                at = &mut expiry => {
                    let e = at.error(&self.device);
                    self.fatal(&out_tx, &e).await;
                    break e.to_string();
                }
                read = read_frame(&mut recv, &mut decoder) => read,
            };
            let frame = match read {
                Ok(Some(frame)) => frame,
                Ok(None) => break "the device closed the session".to_string(),
                Err(Error::Protocol(e)) => {
                    self.fatal(&out_tx, &e).await;
                    break e.to_string();
                }
                Err(e) => break e.to_string(),
            };
            match frame {
                Frame::Events(events) => {
                    if self.idempotent && events.seq == 0 {
                        let e = ProtocolError::protocol(
                            "EVENTS seq 0 in an idempotent session; the device's numbers start at 1",
                        );
                        self.fatal(&out_tx, &e).await;
                        break e.to_string();
                    }
                    if self.idempotent {
                        if !lock(&unanswered).insert(events.seq) {
                            let e = ProtocolError::protocol(format!(
                                "EVENTS seq {} is sent again before its first copy was answered",
                                events.seq
                            ));
                            self.fatal(&out_tx, &e).await;
                            break e.to_string();
                        }
                    } else if last_seq.is_some_and(|last| events.seq <= last) {
                        let e = ProtocolError::protocol(format!(
                            "EVENTS seq {} is not greater than the previous seq {}",
                            events.seq,
                            last_seq.unwrap_or_default()
                        ));
                        self.fatal(&out_tx, &e).await;
                        break e.to_string();
                    }
                    last_seq = Some(events.seq);
                    let answer = self.accept_events(events);
                    if pending_tx.send(answer).await.is_err() {
                        break "connection lost".into();
                    }
                }
                Frame::CommandAck(CommandAck { id }) => {
                    // SQLite with fsync: off the async threads, and no need to wait.
                    let queue = self.shared.deps.commands.clone();
                    let device = self.device.clone();
                    tokio::task::spawn_blocking(move || {
                        match queue.acknowledge(&device, &id, now_millis()) {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::debug!(device = %device, command = %id, "acknowledgement for no open command")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "could not record a command acknowledgement")
                            }
                        }
                    });
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
                    self.fatal(&out_tx, &e).await;
                    break e.to_string();
                }
            }
        };
        // Answer what is in flight before letting the writer go.
        drop(pending_tx);
        let _ = acker.await;
        if let Some(commands) = commands {
            commands.abort();
            let _ = commands.await;
            self.shared.deps.commands.release_notifier(&self.device);
        }
        drop(out_tx);
        let _ = writer.await;
        reason
    }

    /// Decodes and submits one EVENTS frame. Submission happens here, in
    /// the reading task, so the device's frames reach the log in order.
    fn accept_events(&self, events: Events) -> Pending {
        let Events {
            seq,
            stream,
            encoding,
            payload,
        } = events;
        let reject =
            |code: RejectCode, message: String, event: Option<usize>, field: Option<String>| {
                Pending::Ready(Frame::Reject(Reject {
                    seq,
                    code,
                    message,
                    event,
                    field,
                }))
            };
        let Some(def) = self.shared.deps.catalog.stream(&stream) else {
            return reject(
                RejectCode::UnknownStream,
                format!(
                    "stream '{stream}' does not exist; create it with CREATE STREAM {stream} (...)"
                ),
                None,
                None,
            );
        };
        if encoding != Encoding::Json {
            return reject(
                RejectCode::UnsupportedEncoding,
                format!(
                    "encoding 0x{:02x} is not supported; use 0x01 (JSON)",
                    encoding.as_u8()
                ),
                None,
                None,
            );
        }
        let batch = match decode_json(
            &def,
            &payload,
            &self.device,
            now_millis(),
            self.shared.config.max_events_per_frame as usize,
        ) {
            Ok(batch) => batch,
            Err(e) => return reject(e.code, e.message, e.event, e.field),
        };
        // A numbered frame the log already holds is acknowledged with
        // count 0 and not stored again.
        let numbered = if self.idempotent { seq } else { 0 };
        match self
            .shared
            .deps
            .log
            .submit_sequenced(&stream, &self.device, numbered, batch)
        {
            Ok(future) => Pending::Appending { seq, future },
            Err(e) => {
                tracing::error!(device = %self.device, stream = %stream, error = %e, "append refused");
                reject(
                    RejectCode::Unavailable,
                    format!("the server could not store the events: {e}; retry later"),
                    None,
                    None,
                )
            }
        }
    }

    async fn fatal(&self, out: &mpsc::Sender<Frame>, e: &ProtocolError) {
        let _ = out.send(Frame::Error(ErrorBody::from(e))).await;
        // Let the writer flush the ERROR frame before the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        close(&self.connection, e.code, &e.message);
    }
}

/// The numbers of an idempotent session's frames awaiting their answer.
type Unanswered = Arc<Mutex<std::collections::HashSet<u64>>>;

/// Turns finished appends into ACK / REJECT frames, in submission order.
async fn answer_in_order(
    mut pending: mpsc::Receiver<Pending>,
    out: mpsc::Sender<Frame>,
    unanswered: Option<Unanswered>,
) {
    while let Some(p) = pending.recv().await {
        let frame = match p {
            Pending::Ready(frame) => frame,
            Pending::Appending { seq, future } => match future.await {
                Ok(receipt) => Frame::Ack(Ack {
                    seq,
                    count: receipt.count,
                }),
                Err(e) => {
                    if matches!(e, tributary_engine::Error::Unavailable(_)) {
                        // Backpressure (a full log, a frame to resend first):
                        // the device is told to retry; nothing failed.
                        tracing::debug!(error = %e, "append refused for now");
                    } else {
                        tracing::error!(error = %e, "append failed");
                    }
                    let message = match &e {
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
                    })
                }
            },
        };
        if let Some(unanswered) = &unanswered
            && let Frame::Ack(Ack { seq, .. }) | Frame::Reject(Reject { seq, .. }) = &frame
        {
            lock(unanswered).remove(seq);
        }
        if out.send(frame).await.is_err() {
            return;
        }
    }
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

/// Sends the device every open command, now and whenever more are queued.
async fn deliver_commands(queue: Arc<CommandQueue>, device: String, out: mpsc::Sender<Frame>) {
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
            });
            if out.send(frame).await.is_err() {
                return;
            }
            let id = c.id.clone();
            if let Err(e) = queue.blocking(move |q| q.mark_delivered(&id, now)).await {
                tracing::error!(command = %c.id, error = %e, "could not mark a command delivered");
            }
        }
        notified.await;
    }
}

fn millis_to_utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
