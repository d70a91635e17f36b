//! The device side of the protocol: connect, send events, receive commands.
//!
//! ```no_run
//! # async fn demo() -> tributary_ingest::Result<()> {
//! use tributary_ingest::client::{Client, ClientOptions, Outcome};
//! let client = Client::connect(ClientOptions {
//!     server: "127.0.0.1:7700".parse().unwrap(),
//!     server_name: "localhost".into(),
//!     ca: "tributary-data/tls/ca.pem".into(),
//!     device_id: "sensor-1".into(),
//!     token: "trb_...".into(),
//!     commands: true,
//!     idempotent: false,
//! })
//! .await?;
//! match client.send("telemetry", br#"{"temp": 21.5}"#.to_vec()).await? {
//!     Outcome::Acked(ack) => println!("{} events stored", ack.count),
//!     Outcome::Rejected(r) => eprintln!("rejected: {}", r.message),
//! }
//! while let Some(command) = client.next_command().await? {
//!     client.ack_command(&command.id).await?;
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::protocol::{
    self, Ack, Command, CommandAck, Encoding, ErrorCode, Events, Frame, FrameDecoder, Hello,
    Reject, Welcome,
};
use crate::tls::client_config;
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
    pub token: String,
    /// Whether to receive commands on this session (false for send-only clients).
    pub commands: bool,
    /// Whether the caller numbers its frames itself, across connections
    /// ([`Client::submit_numbered`]), so that resent frames are stored once.
    pub idempotent: bool,
}

/// The server's answer to one EVENTS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Acked(Ack),
    Rejected(Reject),
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// A connected device session.
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    waiters: Waiters,
    next_seq: AtomicU64,
    commands: tokio::sync::Mutex<mpsc::Receiver<Command>>,
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
        endpoint.set_default_client_config(client_config(&options.ca)?);
        let connection = endpoint
            .connect(options.server, &options.server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let hello = Frame::Hello(Hello {
            version: protocol::VERSION,
            device_id: options.device_id.clone(),
            token: options.token.clone(),
            commands: options.commands,
            idempotent: options.idempotent,
        });
        send.write_all(&hello.encode_to_vec())
            .await
            .map_err(|e| connect_err(e.to_string()))?;
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
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let (commands_tx, commands_rx) = mpsc::channel(1024);
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
            commands: tokio::sync::Mutex::new(commands_rx),
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
            commands_tx,
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
        self.next_seq
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
        let frame = Frame::Events(Events {
            seq,
            stream: stream.to_string(),
            encoding: Encoding::Json,
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
            waiters.insert(seq, tx);
        }
        let bytes = frame.encode_to_vec();
        {
            let mut send = self.send.lock().await;
            if send.write_all(&bytes).await.is_err() {
                self.waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
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

    /// Acknowledges a command, so the server stops delivering it.
    pub async fn ack_command(&self, id: &str) -> Result<()> {
        let frame = Frame::CommandAck(CommandAck { id: id.to_string() }).encode_to_vec();
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
        Some(other) => Error::ConnectionLost(other.to_string()),
        None => Error::ConnectionLost("the session stream ended".into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    connection: quinn::Connection,
    waiters: Waiters,
    commands: mpsc::Sender<Command>,
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
                    let _ = commands.send(c).await;
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
    // Dropping the waiters fails every frame still waiting for an answer;
    // `done` is set under the same lock, so no frame sent later waits.
    let mut waiting = waiters.lock().unwrap_or_else(|p| p.into_inner());
    waiting.clear();
    done.send_replace(true);
    drop(waiting);
}

fn answer(waiters: &Waiters, seq: u64, outcome: Outcome) {
    if let Some(tx) = waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&seq)
    {
        let _ = tx.send(outcome);
    }
}
