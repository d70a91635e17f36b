//! The ingest crate's error type.

use std::path::PathBuf;

use crate::protocol::{ErrorCode, ProtocolError, RefusedCode};

/// The ingest crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the gateway or the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be made, read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The gateway could not listen on its address.
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The client could not reach the server or finish the handshake.
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    /// The server refused the client certificate in the TLS handshake: it
    /// does not chain to a CA the server trusts, or is expired or malformed.
    #[error("cannot connect to {server}: the server refused the client certificate ({reason})")]
    CertificateRefused { server: String, reason: String },
    /// The server refused a RENEW or REPORT; the session goes on as before.
    #[error("the server refused the request ({code}): {message}")]
    Refused { code: RefusedCode, message: String },
    /// The server ended the session with a fatal error.
    #[error("server closed the session ({code}): {message}")]
    Server { code: ErrorCode, message: String },
    /// The connection ended.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A record batch could not be encoded as an Arrow IPC stream
    /// ([`Client::send_arrow`](crate::client::Client::send_arrow)).
    #[error("cannot encode the batch as Arrow IPC: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The engine failed (the log, the command queue).
    #[error(transparent)]
    Engine(#[from] tributary_engine::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
