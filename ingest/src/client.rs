//! The device side of the protocol: connect, send events, receive commands
//! and desired properties, report properties, renew the session's token.
//!
//! ```no_run
//! # async fn demo() -> tributary_ingest::Result<()> {
//! use tributary_ingest::client::{Client, ClientOptions, Outcome};
//! let client = Client::connect(ClientOptions::new(
//!     "127.0.0.1:7700".parse().unwrap(),
//!     "tributary-data/tls/ca.pem".into(),
//!     "sensor-1",
//!     "trb1...",
//! ))
//! .await?;
//! match client.send("telemetry", br#"{"temp": 21.5}"#.to_vec()).await? {
//!     Outcome::Acked(ack) => println!("{} events stored", ack.count),
//!     Outcome::Rejected(r) => eprintln!("rejected: {}", r.message),
//! }
//! let mut reported = serde_json::Map::new();
//! reported.insert("firmware".into(), "1.4.2".into());
//! client.report(reported).await?;
//! while let Some(command) = client.next_command().await? {
//!     client.ack_command(&command.id).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! A device with a client certificate connects with
//! [`ClientOptions::with_certificate`] and an empty token; a device of an
//! enrollment group names it with [`ClientOptions::with_group`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::decode::encode_arrow;
use crate::protocol::{
    self, Ack, AckStatus, Command, CommandAck, Desired, Encoding, ErrorCode, Events, Frame,
    FrameDecoder, Hello, RefusedCode, RefusedRequest, Reject, Renew, Report, Welcome,
};
pub use crate::tls::ClientIdentity;
use crate::tls::client_config_with_identity;
use crate::{Error, Result};

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub server: SocketAddr,
    /// The name the server's certificate must carry (`localhost` for the
    /// development certificate).
    pub server_name: String,
    /// The CA certificate that signed the server's certificate.
    pub ca: PathBuf,
    pub device_id: String,
    /// The device's token; empty when the device authenticates with its
    /// client certificate (`identity`).
    pub token: String,
    /// Whether to receive commands on this session (false for send-only clients).
    pub commands: bool,
    /// Whether the caller numbers its frames itself, across connections
    /// ([`Client::submit_numbered`]), so that resent frames are stored once.
    pub idempotent: bool,
    /// A client certificate and key to present in the TLS handshake.
    pub identity: Option<ClientIdentity>,
    /// The enrollment group the device belongs to: a device the server does
    /// not know yet is enrolled, its token signed with the key derived from
    /// the group's.
    pub group: Option<String>,
}

impl ClientOptions {
    /// Options for `device_id` with `token`, verifying the server against
    /// `ca` as `localhost`; receives commands, numbers frames per
    /// connection, no client certificate, no group.
    pub fn new(
        server: SocketAddr,
        ca: PathBuf,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        ClientOptions {
            server,
            server_name: "localhost".into(),
            ca,
            device_id: device_id.into(),
            token: token.into(),
            commands: true,
            idempotent: false,
            identity: None,
            group: None,
        }
    }

    /// Presents `identity` in the TLS handshake. With an empty token, the
    /// certificate is the device's credential.
    pub fn with_certificate(mut self, identity: ClientIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Names the device's enrollment group in HELLO.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// The server's answer to one EVENTS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Acked(Ack),
    Rejected(Reject),
}

/// What a refused RENEW or REPORT gets back.
type Refusal = (RefusedCode, String);

/// Everyone waiting for an answer from the server, under one lock, so that
/// the read loop can fail them all at once when the session ends.
#[derive(Default)]
struct Waiting {
    /// EVENTS frames, by `seq`.
    events: HashMap<u64, oneshot::Sender<Outcome>>,
    /// RENEW frames, in the order they were sent (the server answers them
    /// in that order).
    renewals: VecDeque<oneshot::Sender<Result<Option<u64>, Refusal>>>,
    /// REPORT frames, by `id`.
    reports: HashMap<u64, oneshot::Sender<Result<u64, Refusal>>>,
}

type Waiters = Arc<Mutex<Waiting>>;

/// A connected device session.
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    waiters: Waiters,
    next_seq: AtomicU64,
    next_report: AtomicU64,
    commands: tokio::sync::Mutex<mpsc::Receiver<Command>>,
    /// The newest desired properties received, for [`Client::next_desired`].
    desired: tokio::sync::Mutex<watch::Receiver<Option<Desired>>>,
    /// The same, for [`Client::desired`].
    latest_desired: watch::Receiver<Option<Desired>>,
    ended: Arc<Mutex<Option<String>>>,
    fatal: Arc<Mutex<Option<(ErrorCode, String)>>>,
    /// Turns true once the read loop has recorded why the session ended.
    done: watch::Receiver<bool>,
    welcome: Welcome,
}

impl Client {
    /// Connects, says HELLO and waits for WELCOME.
    pub async fn connect(options: ClientOptions) -> Result<Client> {
        let connect_err = |reason: String| Error::Connect {
            server: options.server.to_string(),
            reason,
        };
        let bind: SocketAddr = if options.server.is_ipv6() {
            "[::]:0".parse().map_err(|e| connect_err(format!("{e}")))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|e| connect_err(format!("{e}")))?
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| Error::io("the client socket", e))?;
        endpoint.set_default_client_config(client_config_with_identity(
            &options.ca,
            options.identity.as_ref(),
        )?);
        let server = options.server.to_string();
        let failed = |e: &quinn::ConnectionError| connection_failed(&server, e);
        let connection = endpoint
            .connect(options.server, &options.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| failed(&e))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| failed(&e))?;
        let hello = Frame::Hello(Hello {
            version: protocol::VERSION,
            device_id: options.device_id.clone(),
            token: options.token.clone(),
            commands: options.commands,
            idempotent: options.idempotent,
            group: options.group.clone(),
            // This client takes DESIRED frames (see `next_desired`).
            twin: true,
        });
        if let Err(e) = send.write_all(&hello.encode_to_vec()).await {
            return Err(match e {
                quinn::WriteError::ConnectionLost(e) => failed(&e),
                e => connect_err(e.to_string()),
            });
        }
        let mut decoder = FrameDecoder::new(protocol::DEFAULT_MAX_FRAME_BYTES);
        let welcome = loop {
            if let Some(frame) = decoder.next_frame()? {
                match frame {
                    Frame::Welcome(w) => break w,
                    Frame::Error(e) => {
                        return Err(Error::Server {
                            code: e.code,
                            message: e.message,
                        });
                    }
                    other => {
                        return Err(connect_err(format!(
                            "expected WELCOME, got {}",
                            other.frame_type().name()
                        )));
                    }
                }
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => decoder.push(&chunk.bytes),
                Ok(None) => return Err(closed_error(&connection)),
                Err(_) => return Err(closed_error(&connection)),
            }
        };
        let waiters: Waiters = Arc::default();
        let (commands_tx, commands_rx) = mpsc::channel(1024);
        let (desired_tx, desired_rx) = watch::channel(None);
        let ended = Arc::new(Mutex::new(None));
        let fatal = Arc::new(Mutex::new(None));
        let send = Arc::new(tokio::sync::Mutex::new(send));
        let (done_tx, done) = watch::channel(false);
        let client = Client {
            endpoint,
            connection: connection.clone(),
            send: send.clone(),
            waiters: waiters.clone(),
            next_seq: AtomicU64::new(1),
            next_report: AtomicU64::new(1),
            commands: tokio::sync::Mutex::new(commands_rx),
            latest_desired: desired_rx.clone(),
            desired: tokio::sync::Mutex::new(desired_rx),
            ended: ended.clone(),
            fatal: fatal.clone(),
            done,
            welcome,
        };
        tokio::spawn(read_loop(
            recv,
            decoder,
            connection,
            waiters,
            Inbox {
                commands: commands_tx,
                desired: desired_tx,
            },
            send,
            ended,
            fatal,
            done_tx,
        ));
        Ok(client)
    }

    /// What the server allows on this connection.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends one EVENTS frame and returns a future for its answer, without
    /// waiting for it: call again to pipeline frames.
    pub async fn submit(
        &self,
        stream: &str,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<Outcome>> + use<>> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.submit_numbered(stream, seq, payload).await
    }

    /// [`submit`](Client::submit) with the frame's number chosen by the
    /// caller. In an idempotent session that is the device's own sequence
    /// number: send a frame that was never acknowledged again with the same
    /// number (on any connection) and the server stores it once; its ACK
    /// then has `count` 0 if the first one was stored. Numbers must grow on
    /// a connection; later [`submit`](Client::submit)s go on from this one.
    pub async fn submit_numbered(
        &self,
        stream: &str,
        seq: u64,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<Outcome>> + use<>> {
        self.submit_encoded(stream, seq, Encoding::Json, payload)
            .await
    }

    /// Sends one EVENTS frame holding `batch` as an Arrow IPC stream
    /// (encoding 0x02) and returns a future for its answer, like
    /// [`submit`](Client::submit). The batch's columns are matched to the
    /// stream's by name (`docs/protocol.md`, section 6).
    pub async fn submit_arrow(
        &self,
        stream: &str,
        batch: &RecordBatch,
    ) -> Result<impl Future<Output = Result<Outcome>> + use<>> {
        let payload = encode_arrow(&batch.schema(), std::slice::from_ref(batch))?;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.submit_encoded(stream, seq, Encoding::Arrow, payload.into())
            .await
    }

    /// Sends `batch` as one Arrow EVENTS frame and waits for the server's
    /// answer (see [`submit_arrow`](Client::submit_arrow)).
    pub async fn send_arrow(&self, stream: &str, batch: &RecordBatch) -> Result<Outcome> {
        self.submit_arrow(stream, batch).await?.await
    }

    /// Sends an already encoded Arrow IPC stream (say, one written by
    /// another Arrow library) as one EVENTS frame with encoding 0x02, as is,
    /// and waits for the server's answer.
    pub async fn send_arrow_ipc(&self, stream: &str, payload: impl Into<Bytes>) -> Result<Outcome> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.submit_encoded(stream, seq, Encoding::Arrow, payload.into())
            .await?
            .await
    }

    /// Sends one EVENTS frame, numbered `seq`, with `payload` already in
    /// `encoding` (JSON, or an Arrow IPC stream), and returns a future for
    /// its answer without waiting for it. Numbering is as for
    /// [`submit_numbered`](Client::submit_numbered).
    pub async fn submit_encoded(
        &self,
        stream: &str,
        seq: u64,
        encoding: Encoding,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<Outcome>> + use<>> {
        self.next_seq
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
        let frame = Frame::Events(Events {
            seq,
            stream: stream.to_string(),
            encoding,
            payload,
        });
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            // Once the read loop is over nobody would answer: fail now
            // rather than wait forever. (It sets `done` under this lock.)
            if *self.done.borrow() {
                drop(waiters);
                return Err(self.why_ended());
            }
            waiters.events.insert(seq, tx);
        }
        let bytes = frame.encode_to_vec();
        {
            let mut send = self.send.lock().await;
            if send.write_all(&bytes).await.is_err() {
                self.waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .events
                    .remove(&seq);
                return Err(self.why_ended());
            }
        }
        let ended = self.ended.clone();
        let fatal = self.fatal.clone();
        let connection = self.connection.clone();
        Ok(async move {
            rx.await
                .map_err(|_| ended_error(&fatal, &ended, &connection))
        })
    }

    /// Sends one EVENTS frame and waits for the server's answer.
    pub async fn send(&self, stream: &str, payload: impl Into<Bytes>) -> Result<Outcome> {
        self.submit(stream, payload.into()).await?.await
    }

    /// [`send`](Client::send) with the frame's number chosen by the caller
    /// (see [`submit_numbered`](Client::submit_numbered)).
    pub async fn send_numbered(
        &self,
        stream: &str,
        seq: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Outcome> {
        self.submit_numbered(stream, seq, payload.into())
            .await?
            .await
    }

    /// Waits for the next command; `None` once the connection has ended.
    pub async fn next_command(&self) -> Result<Option<Command>> {
        let mut rx = self.commands.lock().await;
        match rx.recv().await {
            Some(c) => Ok(Some(c)),
            None => Err(self.why_ended()),
        }
    }

    /// Waits for desired properties newer than the last ones this method
    /// returned (the first call returns those the server sent after
    /// WELCOME, if the device has any). Versions in between may be skipped:
    /// desired properties are state, and only the newest matters. An error
    /// once the session has ended.
    pub async fn next_desired(&self) -> Result<Desired> {
        let mut rx = self.desired.lock().await;
        loop {
            if rx.changed().await.is_err() {
                return Err(self.why_ended());
            }
            if let Some(desired) = rx.borrow_and_update().clone() {
                return Ok(desired);
            }
        }
    }

    /// The newest desired properties received on this session, if any.
    pub fn desired(&self) -> Option<Desired> {
        self.latest_desired.borrow().clone()
    }

    /// Merges `patch` (a JSON merge patch, RFC 7386: `null` removes a key)
    /// into the device's reported properties and returns their new
    /// version. [`Error::Refused`] if the server refused it (say, the
    /// properties would be over 1 MiB); the session goes on either way.
    pub async fn report(&self, patch: serde_json::Map<String, serde_json::Value>) -> Result<u64> {
        self.send_report(patch, false).await
    }

    /// [`report`](Client::report), replacing the reported properties whole
    /// with `properties`.
    pub async fn report_replacing(
        &self,
        properties: serde_json::Map<String, serde_json::Value>,
    ) -> Result<u64> {
        self.send_report(properties, true).await
    }

    async fn send_report(
        &self,
        patch: serde_json::Map<String, serde_json::Value>,
        replace: bool,
    ) -> Result<u64> {
        let id = self.next_report.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::Report(Report { id, patch, replace }).encode_to_vec();
        let len = frame.len() - protocol::LENGTH_PREFIX_BYTES;
        if len > self.welcome.max_frame_bytes as usize {
            // Sent, it would end the session with `frame_too_large`.
            return Err(Error::Refused {
                code: RefusedCode::InvalidProperties,
                message: format!(
                    "not sent: the REPORT frame would be {len} bytes; the server takes frames \
                     of up to {}",
                    self.welcome.max_frame_bytes
                ),
            });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if *self.done.borrow() {
                drop(waiters);
                return Err(self.why_ended());
            }
            waiters.reports.insert(id, tx);
        }
        if self.send.lock().await.write_all(&frame).await.is_err() {
            return Err(self.why_ended());
        }
        match rx.await {
            Ok(Ok(version)) => Ok(version),
            Ok(Err((code, message))) => Err(Error::Refused { code, message }),
            Err(_) => Err(self.why_ended()),
        }
    }

    /// Gives the session a new token, before its current one expires, so
    /// that it goes on past that expiry. Returns the new token's expiry
    /// (seconds since the Unix epoch; `None` for a legacy token). If the
    /// server refuses the token ([`Error::Refused`]), the session goes on
    /// with its current one, until that expires.
    pub async fn renew(&self, token: &str) -> Result<Option<u64>> {
        let frame = Frame::Renew(Renew {
            token: token.to_string(),
        })
        .encode_to_vec();
        let (tx, rx) = oneshot::channel();
        {
            // The send lock is held while the waiter is queued, so that the
            // queue is in the order the frames go out.
            let mut send = self.send.lock().await;
            {
                let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
                if *self.done.borrow() {
                    drop(waiters);
                    return Err(self.why_ended());
                }
                waiters.renewals.push_back(tx);
            }
            if send.write_all(&frame).await.is_err() {
                return Err(self.why_ended());
            }
        }
        match rx.await {
            Ok(Ok(expires_at)) => Ok(expires_at),
            Ok(Err((code, message))) => Err(Error::Refused { code, message }),
            Err(_) => Err(self.why_ended()),
        }
    }

    /// Acknowledges a command, so the server stops delivering it.
    pub async fn ack_command(&self, id: &str) -> Result<()> {
        self.answer_command(CommandAck::acknowledged(id)).await
    }

    /// Refuses a command (unknown, bad arguments, not now): it ends
    /// `rejected` with `reason`, and is not delivered again.
    pub async fn reject_command(&self, id: &str, reason: &str) -> Result<()> {
        self.answer_command(CommandAck {
            status: Some(AckStatus::Rejected),
            reason: Some(reason.to_string()),
            ..CommandAck::acknowledged(id)
        })
        .await
    }

    /// Reports that the device tried a command and failed: it ends
    /// `failed` with `reason`, and is not delivered again.
    pub async fn fail_command(&self, id: &str, reason: &str) -> Result<()> {
        self.answer_command(CommandAck {
            status: Some(AckStatus::Failed),
            reason: Some(reason.to_string()),
            ..CommandAck::acknowledged(id)
        })
        .await
    }

    /// Answers a call ([`Command::call`]) with `response`, any JSON: the
    /// command ends `acknowledged` and the caller receives the response.
    pub async fn respond(&self, id: &str, response: serde_json::Value) -> Result<()> {
        self.answer_command(CommandAck {
            response: Some(response),
            ..CommandAck::acknowledged(id)
        })
        .await
    }

    /// Sends a COMMAND_ACK. Only the first answer to a command counts; the
    /// server ignores answers to commands that are settled, expired or not
    /// this device's.
    pub async fn answer_command(&self, answer: CommandAck) -> Result<()> {
        let frame = Frame::CommandAck(answer).encode_to_vec();
        let mut send = self.send.lock().await;
        send.write_all(&frame).await.map_err(|_| self.why_ended())
    }

    /// Ends the session cleanly: everything written so far (acknowledgements
    /// included) reaches the server before the connection closes.
    pub async fn close(self) {
        {
            let mut send = self.send.lock().await;
            if send.finish().is_ok() {
                // Resolves once the server has read the stream to its end.
                let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            }
        }
        self.connection.close(protocol::CLOSE_NORMAL.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Waits until the session ends and returns why: for a session the
    /// server ended, [`Error::Server`] with its code and reason (say,
    /// `unauthorized` when the device was disabled or its token expired).
    pub async fn closed(&self) -> Error {
        let mut done = self.done.clone();
        // The sender lives as long as the read loop; either way it is over.
        let _ = done.wait_for(|d| *d).await;
        self.why_ended()
    }

    fn why_ended(&self) -> Error {
        ended_error(&self.fatal, &self.ended, &self.connection)
    }
}

fn ended_error(
    fatal: &Mutex<Option<(ErrorCode, String)>>,
    ended: &Mutex<Option<String>>,
    connection: &quinn::Connection,
) -> Error {
    if let Some((code, message)) = fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Error::Server { code, message };
    }
    if let Some(reason) = ended.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Error::ConnectionLost(reason);
    }
    closed_error(connection)
}

/// Why the server closed the connection, from its close frame.
fn closed_error(connection: &quinn::Connection) -> Error {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            let message = String::from_utf8_lossy(&close.reason).to_string();
            match ErrorCode::from_close_code(close.error_code.into_inner()) {
                Some(code) => Error::Server { code, message },
                None => Error::ConnectionLost(format!("closed by the server: {message}")),
            }
        }
        Some(other) => match certificate_refusal(&other) {
            Some(reason) => Error::CertificateRefused {
                server: connection.remote_address().to_string(),
                reason,
            },
            None => Error::ConnectionLost(other.to_string()),
        },
        None => Error::ConnectionLost("the session stream ended".into()),
    }
}

/// The error for a connection that failed while it was being set up.
fn connection_failed(server: &str, e: &quinn::ConnectionError) -> Error {
    if let quinn::ConnectionError::ConnectionClosed(close) = e
        && close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    {
        // docs/protocol.md section 12: a connection limit refused it before
        // its handshake.
        return Error::Connect {
            server: server.to_string(),
            reason: CONNECTION_REFUSED.to_string(),
        };
    }
    match certificate_refusal(e) {
        Some(reason) => Error::CertificateRefused {
            server: server.to_string(),
            reason,
        },
        None => Error::Connect {
            server: server.to_string(),
            reason: e.to_string(),
        },
    }
}

/// Why a connect failed when the server refused the connection outright.
pub const CONNECTION_REFUSED: &str = "the server refused the connection (QUIC CONNECTION_REFUSED): \
     it is at its limit of connections, of connections not yet authenticated, or of new \
     connections per second; retry later";

/// If the server ended the handshake with a TLS alert about the client's
/// certificate, what the alert says. (A TLS alert travels as the QUIC
/// transport error CRYPTO_ERROR, 0x0100 plus the alert, RFC 9001 4.8.)
fn certificate_refusal(e: &quinn::ConnectionError) -> Option<String> {
    let (code, reason) = match e {
        quinn::ConnectionError::ConnectionClosed(close) => (
            u64::from(close.error_code),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        quinn::ConnectionError::TransportError(t) => (u64::from(t.code), t.reason.clone()),
        _ => return None,
    };
    let alert = code.checked_sub(0x100).filter(|a| *a < 0x100)?;
    let what = match alert {
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired: it is outside its validity",
        46 => "certificate_unknown",
        48 => "unknown_ca: it is not issued by a CA the server trusts",
        49 => "access_denied",
        51 => "decrypt_error: a signature did not verify",
        116 => "certificate_required",
        _ => return None,
    };
    Some(if reason.is_empty() {
        format!("TLS alert {what}")
    } else {
        format!("TLS alert {what}; {reason}")
    })
}

/// Where the read loop puts what the server sends unasked.
struct Inbox {
    commands: mpsc::Sender<Command>,
    desired: watch::Sender<Option<Desired>>,
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    connection: quinn::Connection,
    waiters: Waiters,
    inbox: Inbox,
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    ended: Arc<Mutex<Option<String>>>,
    fatal: Arc<Mutex<Option<(ErrorCode, String)>>>,
    done: watch::Sender<bool>,
) {
    let reason = 'outer: loop {
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => break 'outer format!("server broke the protocol: {e}"),
            };
            match frame {
                Frame::Ack(ack) => answer(&waiters, ack.seq, Outcome::Acked(ack)),
                Frame::Reject(r) => answer(&waiters, r.seq, Outcome::Rejected(r)),
                Frame::Command(c) => {
                    // If nobody reads commands they stay unacknowledged,
                    // and the server delivers them again later.
                    let _ = inbox.commands.send(c).await;
                }
                Frame::Desired(d) => {
                    // Only the newest matters; nobody reading is fine.
                    inbox.desired.send_if_modified(|newest| {
                        let newer = newest.as_ref().is_none_or(|n| d.version > n.version);
                        if newer {
                            *newest = Some(d);
                        }
                        newer
                    });
                }
                Frame::Renewed(r) => {
                    let waiter = lock(&waiters).renewals.pop_front();
                    if let Some(tx) = waiter {
                        let _ = tx.send(Ok(r.expires_at));
                    }
                }
                Frame::Reported(r) => {
                    let waiter = lock(&waiters).reports.remove(&r.id);
                    if let Some(tx) = waiter {
                        let _ = tx.send(Ok(r.version));
                    }
                }
                Frame::Refused(r) => {
                    let refusal: Refusal = (r.code, r.message);
                    let mut waiting = lock(&waiters);
                    match (r.request, r.id) {
                        (RefusedRequest::Renew, _) => {
                            if let Some(tx) = waiting.renewals.pop_front() {
                                let _ = tx.send(Err(refusal));
                            }
                        }
                        (RefusedRequest::Report, Some(id)) => {
                            if let Some(tx) = waiting.reports.remove(&id) {
                                let _ = tx.send(Err(refusal));
                            }
                        }
                        _ => {}
                    }
                }
                Frame::Ping(nonce) => {
                    let pong = Frame::Pong(nonce).encode_to_vec();
                    let _ = send.lock().await.write_all(&pong).await;
                }
                Frame::Error(e) => {
                    *fatal.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((e.code, e.message.clone()));
                    break 'outer format!("{}: {}", e.code, e.message);
                }
                _ => {}
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => break "the server ended the session".into(),
            Err(e) => break e.to_string(),
        }
    };
    if fatal.lock().unwrap_or_else(|p| p.into_inner()).is_none()
        && let Error::Server { code, message } = closed_error(&connection)
    {
        *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, message));
    }
    *ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    // Dropping the waiters fails every request still waiting for an
    // answer; `done` is set under the same lock, so no request sent later
    // waits.
    let mut waiting = lock(&waiters);
    *waiting = Waiting::default();
    done.send_replace(true);
    drop(waiting);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn answer(waiters: &Waiters, seq: u64, outcome: Outcome) {
    let waiter = lock(waiters).events.remove(&seq);
    if let Some(tx) = waiter {
        let _ = tx.send(outcome);
    }
}
