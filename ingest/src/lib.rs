//! tributary-ingest: the Tributary wire protocol and the cloud gateway.
//!
//! - [`protocol`]: the sans-IO codec for protocol version 1 (frames in and
//!   out of bytes, error and close codes); the specification is
//!   `docs/protocol.md`, also rendered as [`protocol::spec`].
//! - [`decode`]: EVENTS payloads (JSON or Arrow IPC) into Arrow record
//!   batches with a stream's schema.
//! - [`gateway`]: the QUIC endpoint on quinn: authentication against the
//!   registry (tokens, client certificates, enrollment groups; renewed on
//!   the live session), events into the event stream, commands and desired
//!   properties out to devices, reported properties and connection state
//!   into the registry.
//! - [`client`]: the device side, used by `tributary send` / `listen` and
//!   by anyone embedding a device in Rust.
//! - [`metrics`]: the gateway's counters, as Prometheus text for
//!   `GET /metrics`.
//! - [`tls`]: the development CA, device certificates it issues, and the
//!   rustls configurations (mutual TLS optional).

pub mod client;
pub mod decode;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod protocol;
mod receive;
pub mod tls;

pub use error::{Error, Result};
