//! Where a device's connection stands.

use serde::{Deserialize, Serialize};

/// A device's connection state.
///
/// The gateway records every change as it happens: a session authenticated
/// (connected), the last one closed (disconnected, with the reason). While
/// connected, `last_seen` and `last_event_at` move with every frame; the
/// gateway keeps those in memory and the registry stores them when the
/// device disconnects, so the stored copy is exact for disconnected devices
/// and the gateway's is exact for connected ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// Whether the device has an authenticated session now.
    pub connected: bool,
    /// When it connected or disconnected, milliseconds since the Unix epoch.
    pub since: i64,
    /// Why it disconnected (`None` while connected), e.g. "closed by the
    /// device", "idle timeout", "device disabled", "server stopped".
    pub reason: Option<String>,
    /// The last frame of any kind from the device, milliseconds since the
    /// Unix epoch.
    pub last_seen: Option<i64>,
    /// The event time of the last event it sent, milliseconds since the
    /// Unix epoch.
    pub last_event_at: Option<i64>,
}

impl ConnectionState {
    /// Connected at `since` (seen then), no event on this connection yet.
    pub fn connected_at(since: i64) -> Self {
        ConnectionState {
            connected: true,
            since,
            reason: None,
            last_seen: Some(since),
            last_event_at: None,
        }
    }
}
