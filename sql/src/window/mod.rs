//! Event-time windows: which windows an event belongs to, per-device
//! watermarks, and the incremental state of open windows.
//!
//! Nothing here reads a clock. Event time comes from each event's `ts`; the
//! time a device was last heard from comes from `received_at` (stamped by the
//! gateway) or from the `now` passed to [`WindowState::advance`]. The same
//! events in the same order always give the same rows, which is what the
//! golden tests rely on.

mod aligned;
mod session;
mod state;
mod watermark;

pub use aligned::AlignedState;
pub use state::{Aggregate, Batch, Closed, Group, WindowState, timestamps};
pub use watermark::Watermarks;

use std::collections::BTreeMap;

/// Default allowed out-of-orderness of a stream's event times.
pub const DEFAULT_WATERMARK_DELAY_MS: i64 = 5_000;
/// Default time after which a silent device stops holding windows open.
pub const DEFAULT_IDLE_TIMEOUT_MS: i64 = 60_000;

/// The windows a rule groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    /// Back-to-back windows of `size` ms, aligned to the epoch.
    Tumble { size: i64 },
    /// Windows of `size` ms starting every `slide` ms; an event is in
    /// `size / slide` of them.
    Hop { slide: i64, size: i64 },
    /// Windows per key that close after `gap` ms without an event.
    Session { gap: i64 },
}

impl WindowSpec {
    /// The starts of the aligned windows holding an event at `ts`, oldest first.
    pub fn starts(&self, ts: i64, out: &mut Vec<i64>) {
        out.clear();
        match *self {
            WindowSpec::Tumble { size } => out.push(ts - ts.rem_euclid(size)),
            WindowSpec::Hop { slide, size } => {
                let last = ts - ts.rem_euclid(slide);
                let mut start = last - size + slide;
                // The first window is the oldest one that still holds ts.
                while start <= last {
                    if start + size > ts {
                        out.push(start);
                    }
                    start += slide;
                }
            }
            WindowSpec::Session { .. } => out.push(ts),
        }
    }

    /// The length of an aligned window (sessions have none).
    pub fn size(&self) -> Option<i64> {
        match *self {
            WindowSpec::Tumble { size } | WindowSpec::Hop { size, .. } => Some(size),
            WindowSpec::Session { .. } => None,
        }
    }
}

impl std::fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowSpec::Tumble { size } => write!(f, "tumble({})", format_duration(*size)),
            WindowSpec::Hop { slide, size } => write!(
                f,
                "hop(slide {}, size {})",
                format_duration(*slide),
                format_duration(*size)
            ),
            WindowSpec::Session { gap } => write!(f, "session(gap {})", format_duration(*gap)),
        }
    }
}

/// A stream's event-time options, from `CREATE STREAM ... WITH (...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOptions {
    /// How far behind a device's newest event time an event may be and still
    /// count: the watermark is the newest event time minus this.
    pub watermark_delay: i64,
    /// A device silent (by arrival time) for this long stops holding windows
    /// open.
    pub idle_timeout: i64,
}

impl Default for TimeOptions {
    fn default() -> Self {
        TimeOptions {
            watermark_delay: DEFAULT_WATERMARK_DELAY_MS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT_MS,
        }
    }
}

/// Stream options that are durations.
pub const WATERMARK_DELAY: &str = "watermark_delay";
pub const IDLE_TIMEOUT: &str = "idle_timeout";

impl TimeOptions {
    /// Reads the options of a stream (already validated when it was created).
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut out = TimeOptions::default();
        if let Some(v) = options.get(WATERMARK_DELAY) {
            out.watermark_delay = parse_duration(v)?;
        }
        if let Some(v) = options.get(IDLE_TIMEOUT) {
            out.idle_timeout = parse_duration(v)?;
            if out.idle_timeout == 0 {
                return Err("idle_timeout must be more than 0".into());
            }
        }
        Ok(out)
    }
}

pub use tributary_engine::duration::{format_duration, parse_duration};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_windows_align_to_the_epoch() {
        let mut v = Vec::new();
        WindowSpec::Tumble { size: 10 }.starts(25, &mut v);
        assert_eq!(v, [20]);
        WindowSpec::Tumble { size: 10 }.starts(-5, &mut v);
        assert_eq!(v, [-10]);
        WindowSpec::Tumble { size: 10 }.starts(30, &mut v);
        assert_eq!(v, [30]);
    }

    #[test]
    fn an_event_is_in_size_over_slide_hopping_windows() {
        let mut v = Vec::new();
        WindowSpec::Hop { slide: 5, size: 15 }.starts(17, &mut v);
        assert_eq!(v, [5, 10, 15]);
        WindowSpec::Hop { slide: 5, size: 15 }.starts(15, &mut v);
        assert_eq!(v, [5, 10, 15]);
        WindowSpec::Hop {
            slide: 10,
            size: 20,
        }
        .starts(12, &mut v);
        assert_eq!(v, [0, 10]);
        WindowSpec::Hop {
            slide: 10,
            size: 20,
        }
        .starts(27, &mut v);
        assert_eq!(v, [10, 20]);
    }
}
