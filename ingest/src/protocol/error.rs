//! Error codes: fatal ones that end the connection, and per-frame rejections.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::SUPPORTED_VERSIONS;

/// QUIC application close code for a normal close (no error).
pub const CLOSE_NORMAL: u32 = 0x00;

/// A fatal error: sent in an ERROR frame, after which the server closes the
/// QUIC connection with [`ErrorCode::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The HELLO credentials were not accepted.
    Unauthorized,
    /// The peer broke the framing or the rules of the session.
    ProtocolError,
    /// HELLO asked for a protocol version the server does not speak.
    UnsupportedVersion,
    /// A frame's length exceeds the receiver's maximum.
    FrameTooLarge,
    /// No HELLO arrived within [`HELLO_TIMEOUT`](super::HELLO_TIMEOUT).
    HelloTimeout,
    /// The server is shutting down; reconnect later.
    ServerShutdown,
    /// The server cannot serve the session now (say, its registry failed);
    /// reconnect later.
    Unavailable,
    /// A code this build does not know, from a newer peer. Kept so that an
    /// ERROR frame from a newer server still decodes; it is never sent.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code a v1 peer may send, in close-code order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::Unauthorized,
        ErrorCode::ProtocolError,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::HelloTimeout,
        ErrorCode::ServerShutdown,
        ErrorCode::Unavailable,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ProtocolError => "protocol_error",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::ServerShutdown => "server_shutdown",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The QUIC application error code the connection is closed with.
    pub fn close_code(self) -> u32 {
        match self {
            ErrorCode::Unauthorized => 0x01,
            ErrorCode::ProtocolError => 0x02,
            ErrorCode::UnsupportedVersion => 0x03,
            ErrorCode::FrameTooLarge => 0x04,
            ErrorCode::HelloTimeout => 0x05,
            ErrorCode::ServerShutdown => 0x06,
            ErrorCode::Unavailable => 0x07,
            // Never sent; if it were, a protocol error is the honest description.
            ErrorCode::Unknown => 0x02,
        }
    }

    /// The code a QUIC application close code stands for; `None` for
    /// [`CLOSE_NORMAL`] and for codes this build does not know.
    pub fn from_close_code(code: u64) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| u64::from(c.close_code()) == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fatal protocol error: what went wrong and where. The connection cannot
/// continue after it; the server reports it in an ERROR frame (see
/// [`ErrorBody`](super::ErrorBody)'s `From` impl) and closes with
/// `code.close_code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// A `protocol_error`: the peer broke the framing or the session rules.
    pub fn protocol(message: impl Into<String>) -> Self {
        ProtocolError::new(ErrorCode::ProtocolError, message)
    }

    /// An `unsupported_version` error for a HELLO that asked for `requested`.
    pub fn unsupported_version(requested: u64) -> Self {
        ProtocolError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {requested} is not supported; supported versions: {}",
                supported_versions_text()
            ),
        )
    }
}

fn supported_versions_text() -> String {
    SUPPORTED_VERSIONS
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why one EVENTS frame was refused (the REJECT frame's `code`). The
/// connection stays open; nothing of the frame was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The frame names a stream that does not exist.
    UnknownStream,
    /// The payload is not well-formed JSON.
    InvalidJson,
    /// An event is not a JSON object, or repeats a key.
    InvalidEvent,
    /// An event has a key that is not a column of the stream.
    UnknownField,
    /// A value has the wrong type or is out of range for its column.
    InvalidField,
    /// An event's `device_id` differs from the authenticated device.
    InvalidDeviceId,
    /// The frame holds more events than the server's maximum.
    TooManyEvents,
    /// The frame holds no events.
    EmptyFrame,
    /// The device sent more events or bytes per second than it may; the
    /// REJECT says when to send again (`retry_after_ms`).
    RateLimited,
    /// The payload encoding byte is not one the server accepts.
    UnsupportedEncoding,
    /// An Arrow payload (encoding 0x02) is not a readable Arrow IPC stream.
    InvalidArrow,
    /// The server could not store the frame; send it again later.
    Unavailable,
    /// A code this build does not know, from a newer server. Treat it as a
    /// permanent rejection. Never sent.
    #[serde(other)]
    Unknown,
}

impl RejectCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::UnknownStream => "unknown_stream",
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::InvalidEvent => "invalid_event",
            RejectCode::UnknownField => "unknown_field",
            RejectCode::InvalidField => "invalid_field",
            RejectCode::InvalidDeviceId => "invalid_device_id",
            RejectCode::TooManyEvents => "too_many_events",
            RejectCode::EmptyFrame => "empty_frame",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::UnsupportedEncoding => "unsupported_encoding",
            RejectCode::InvalidArrow => "invalid_arrow",
            RejectCode::Unavailable => "unavailable",
            RejectCode::Unknown => "unknown",
        }
    }

    /// Whether sending the same frame again later may succeed: after
    /// `unavailable`, and after `rate_limited` once `retry_after_ms` has
    /// passed. Every other rejection is about the frame itself.
    pub fn is_retryable(self) -> bool {
        matches!(self, RejectCode::Unavailable | RejectCode::RateLimited)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a RENEW or REPORT was refused (the REFUSED frame's `code`). The
/// session goes on as it was before the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusedCode {
    /// RENEW: the new token was not accepted (the session keeps its old
    /// one); REPORT: the device's credentials no longer hold.
    Unauthorized,
    /// The request does not apply to this session (say, RENEW on a session
    /// authenticated by its client certificate).
    InvalidRequest,
    /// REPORT: the reported properties would be too large or nested too
    /// deeply.
    InvalidProperties,
    /// The server could not carry out the request now; send it again later.
    Unavailable,
    /// A code this build does not know, from a newer server. Never sent.
    #[serde(other)]
    Unknown,
}

impl RefusedCode {
    /// Every code a server may send.
    pub const ALL: [RefusedCode; 4] = [
        RefusedCode::Unauthorized,
        RefusedCode::InvalidRequest,
        RefusedCode::InvalidProperties,
        RefusedCode::Unavailable,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedCode::Unauthorized => "unauthorized",
            RefusedCode::InvalidRequest => "invalid_request",
            RefusedCode::InvalidProperties => "invalid_properties",
            RefusedCode::Unavailable => "unavailable",
            RefusedCode::Unknown => "unknown",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn is_retryable(self) -> bool {
        self == RefusedCode::Unavailable
    }
}

impl fmt::Display for RefusedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
