//! The Tributary wire protocol, version 1: a sans-IO codec.
//!
//! Nothing in here does I/O or reads a clock. The QUIC layer moves bytes from
//! the session stream into a [`FrameDecoder`] and takes [`Frame`]s out; it
//! turns frames into bytes with [`Frame::encode`]. Timers such as
//! [`HELLO_TIMEOUT`] are constants the caller arms itself.
//!
//! ```
//! use tributary_ingest::protocol::{Ack, Frame, FrameDecoder};
//!
//! let bytes = Frame::Ack(Ack { seq: 7, count: 3 }).encode_to_vec();
//! let mut decoder = FrameDecoder::default();
//! // Bytes may arrive in any pieces; frames come out once complete.
//! decoder.push(&bytes[..5]);
//! assert_eq!(decoder.next_frame(), Ok(None));
//! decoder.push(&bytes[5..]);
//! assert_eq!(decoder.next_frame(), Ok(Some(Frame::Ack(Ack { seq: 7, count: 3 }))));
//! ```
//!
//! Errors come in two kinds, mirroring the specification:
//! [`ProtocolError`] (with an [`ErrorCode`]) is fatal and ends the connection
//! with an ERROR frame and a QUIC close code; [`RejectCode`] names why one
//! EVENTS frame was refused, and [`RefusedCode`] why a RENEW or REPORT was,
//! while the connection stays open.
//!
//! The full specification, test vectors included, is in [`spec`].

mod decoder;
mod error;
mod frame;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use decoder::FrameDecoder;
pub use error::{CLOSE_NORMAL, ErrorCode, ProtocolError, RefusedCode, RejectCode};
pub use frame::{
    Ack, AckStatus, Command, CommandAck, Desired, Encoding, ErrorBody, Events, Frame, FrameType,
    Hello, Refused, RefusedRequest, Reject, Renew, Renewed, Report, Reported, Welcome,
};

/// ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"tributary/1";
/// The protocol version this build speaks, carried in HELLO and WELCOME.
pub const VERSION: u32 = 1;
/// Every version this build can speak, listed in `unsupported_version` errors.
pub const SUPPORTED_VERSIONS: &[u32] = &[VERSION];
/// Largest frame (the length field's value: type byte plus body) accepted by
/// default, in both directions.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;
/// Most events one EVENTS frame may carry by default.
pub const DEFAULT_MAX_EVENTS_PER_FRAME: u32 = 10_000;
/// Time the server waits for HELLO after the connection is established.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of the frame header that precedes the type byte: the `u32` length.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Longest stream name in an EVENTS frame, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 64;

/// The protocol specification (`docs/protocol.md`), rendered into rustdoc.
#[doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))]
pub mod spec {}
