//! What the gateway counts, for `GET /metrics` in the Prometheus text
//! exposition format (version 0.0.4).
//!
//! [`GatewayMetrics`] is a handful of atomics the gateway bumps as
//! connections come and go and frames are answered; it costs an atomic add
//! per event, nothing per scrape but the scrape itself. [`GatewayMetrics::render`]
//! writes them out; [`render_connected_devices`], [`render_commands`],
//! [`render_in_flight`] and [`render_consumer_lag`] add the gauges that are
//! read from elsewhere (the gateway's live list, the command queue, the
//! in-flight budget, the event stream's offsets) at scrape time. Every metric is described in
//! `docs/operations.md`, "Metrics".
//!
//! ```
//! use tributary_ingest::metrics::GatewayMetrics;
//!
//! let metrics = GatewayMetrics::default();
//! let open = metrics.connection_opened();
//! metrics.frame_rejected("rate_limited");
//! drop(open);
//! let mut text = String::new();
//! metrics.render(&mut text);
//! assert!(text.contains("tributary_connections_accepted_total 1\n"));
//! assert!(text.contains("tributary_event_frames_rejected_total{code=\"rate_limited\"} 1\n"));
//! ```

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tributary_engine::commands::CommandStatus;
use tributary_engine::log::ConsumerLag;

use crate::limits::{InFlightBudget, Refusal};

/// Why a new connection was refused, as the `reason` label says it.
const REFUSALS: [Refusal; 3] = [
    Refusal::MaxConnections,
    Refusal::MaxPending,
    Refusal::ConnectionRate,
];

fn refusal_index(refusal: Refusal) -> usize {
    match refusal {
        Refusal::MaxConnections => 0,
        Refusal::MaxPending => 1,
        Refusal::ConnectionRate => 2,
    }
}

/// How an authenticated session ended: the `reason` label of
/// `tributary_sessions_ended_total`, a class of the reason the connection
/// state records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The device closed the connection or finished its stream.
    Closed,
    /// Nothing heard from the device for the idle timeout.
    IdleTimeout,
    /// Its credentials stopped holding (disabled, removed, key rotated,
    /// certificate revoked).
    Revoked,
    /// Its token or certificate expired.
    Expired,
    /// It broke the protocol and got an ERROR.
    ProtocolError,
    /// The server stopped.
    ServerStopped,
    /// Anything else: the connection went away under the session.
    Lost,
}

impl SessionEnd {
    pub const ALL: [SessionEnd; 7] = [
        SessionEnd::Closed,
        SessionEnd::IdleTimeout,
        SessionEnd::Revoked,
        SessionEnd::Expired,
        SessionEnd::ProtocolError,
        SessionEnd::ServerStopped,
        SessionEnd::Lost,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Closed => "closed",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::Revoked => "revoked",
            SessionEnd::Expired => "expired",
            SessionEnd::ProtocolError => "protocol_error",
            SessionEnd::ServerStopped => "server_stopped",
            SessionEnd::Lost => "lost",
        }
    }

    /// The class of a session's end, from the reason the gateway records
    /// in the connection state; `stopping`: the server was stopping then
    /// (which is then the reason, whatever the session saw).
    pub fn classify(reason: &str, stopping: bool) -> SessionEnd {
        if stopping {
            return SessionEnd::ServerStopped;
        }
        if reason.starts_with("closed by the device") {
            SessionEnd::Closed
        } else if reason == "idle timeout" {
            SessionEnd::IdleTimeout
        } else if reason.starts_with("revoked") {
            SessionEnd::Revoked
        } else if reason.ends_with(" expired") {
            SessionEnd::Expired
        } else if reason.starts_with("protocol error") {
            SessionEnd::ProtocolError
        } else {
            SessionEnd::Lost
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The gateway's counters and gauges. Shared (`Arc`) between the gateway
/// and whoever renders them.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    connections_open: AtomicU64,
    connections_accepted: AtomicU64,
    connections_refused: [AtomicU64; REFUSALS.len()],
    handshakes_failed: AtomicU64,
    sessions_authenticated: AtomicU64,
    authentication_failures: AtomicU64,
    sessions_ended: [AtomicU64; SessionEnd::ALL.len()],
    frames_accepted: AtomicU64,
    /// REJECTs by their wire code; few distinct codes exist.
    frames_rejected: Mutex<BTreeMap<&'static str, u64>>,
    events_stored: AtomicU64,
    bytes_received: AtomicU64,
    commands_delivered: AtomicU64,
}

/// An open connection, counted in `tributary_connections_open` until
/// dropped.
#[derive(Debug)]
#[must_use = "the connection counts as open only while this lives"]
pub struct OpenConnection<'a> {
    metrics: &'a GatewayMetrics,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl GatewayMetrics {
    /// A connection was admitted (it counts as accepted and open): the
    /// guard counts it closed when dropped.
    pub fn connection_opened(&self) -> OpenConnection<'_> {
        add(&self.connections_accepted, 1);
        add(&self.connections_open, 1);
        OpenConnection { metrics: self }
    }

    /// A connection counted by [`GatewayMetrics::connection_opened`] went.
    /// (The guard calls this; call it yourself only without one.)
    pub fn connection_closed(&self) {
        // Never below zero, even if a caller miscounts.
        let _ = self
            .connections_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A new connection was refused by a connection limit.
    pub fn refused(&self, reason: Refusal) {
        add(&self.connections_refused[refusal_index(reason)], 1);
    }

    /// An admitted connection's QUIC/TLS handshake failed or timed out.
    pub fn handshake_failed(&self) {
        add(&self.handshakes_failed, 1);
    }

    /// A HELLO's credentials were accepted.
    pub fn session_authenticated(&self) {
        add(&self.sessions_authenticated, 1);
    }

    /// A HELLO's credentials were refused (or could not be checked).
    pub fn authentication_failed(&self) {
        add(&self.authentication_failures, 1);
    }

    /// An authenticated session ended; `reason` as the connection state
    /// records it (see [`SessionEnd::classify`]).
    pub fn session_ended(&self, reason: &str, stopping: bool) {
        self.session_ended_as(SessionEnd::classify(reason, stopping));
    }

    pub fn session_ended_as(&self, end: SessionEnd) {
        add(&self.sessions_ended[end.index()], 1);
    }

    /// An EVENTS frame was answered with ACK; `stored` events of it were
    /// stored (0 for a frame the log already held).
    pub fn frame_accepted(&self, stored: u64) {
        add(&self.frames_accepted, 1);
        add(&self.events_stored, stored);
    }

    /// An EVENTS frame was answered with REJECT `code` (its wire name).
    pub fn frame_rejected(&self, code: &'static str) {
        let mut rejected = self
            .frames_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *rejected.entry(code).or_default() += 1;
    }

    /// Bytes read from devices' session streams.
    pub fn bytes_received(&self, n: usize) {
        add(&self.bytes_received, n as u64);
    }

    /// A COMMAND frame was handed to a session's writer.
    pub fn command_delivered(&self) {
        add(&self.commands_delivered, 1);
    }

    /// Connections open now.
    pub fn connections_open(&self) -> u64 {
        get(&self.connections_open)
    }

    /// Writes every metric, with its `# HELP` and `# TYPE` lines.
    pub fn render(&self, out: &mut String) {
        gauge(
            out,
            "tributary_connections_open",
            "QUIC connections open now (in their handshake or in session).",
            get(&self.connections_open),
        );
        counter(
            out,
            "tributary_connections_accepted_total",
            "QUIC connections admitted by the connection limits.",
            get(&self.connections_accepted),
        );
        family(
            out,
            "tributary_connections_refused_total",
            "counter",
            "New QUIC connections refused by a connection limit, by the limit.",
        );
        for (refusal, n) in REFUSALS.iter().zip(&self.connections_refused) {
            sample(
                out,
                "tributary_connections_refused_total",
                &[("reason", refusal.as_str())],
                get(n),
            );
        }
        counter(
            out,
            "tributary_handshakes_failed_total",
            "Admitted connections whose QUIC/TLS handshake failed or timed out.",
            get(&self.handshakes_failed),
        );
        counter(
            out,
            "tributary_sessions_authenticated_total",
            "Sessions whose HELLO credentials were accepted.",
            get(&self.sessions_authenticated),
        );
        counter(
            out,
            "tributary_authentication_failures_total",
            "HELLOs whose credentials were refused or could not be checked.",
            get(&self.authentication_failures),
        );
        family(
            out,
            "tributary_sessions_ended_total",
            "counter",
            "Authenticated sessions that ended, by the class of their reason.",
        );
        for (end, n) in SessionEnd::ALL.iter().zip(&self.sessions_ended) {
            sample(
                out,
                "tributary_sessions_ended_total",
                &[("reason", end.as_str())],
                get(n),
            );
        }
        counter(
            out,
            "tributary_event_frames_accepted_total",
            "EVENTS frames answered with ACK.",
            get(&self.frames_accepted),
        );
        family(
            out,
            "tributary_event_frames_rejected_total",
            "counter",
            "EVENTS frames answered with REJECT, by the REJECT code.",
        );
        let rejected = self
            .frames_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (code, n) in rejected {
            sample(
                out,
                "tributary_event_frames_rejected_total",
                &[("code", code)],
                n,
            );
        }
        counter(
            out,
            "tributary_events_stored_total",
            "Events stored from acknowledged EVENTS frames.",
            get(&self.events_stored),
        );
        counter(
            out,
            "tributary_received_bytes_total",
            "Bytes read from devices' session streams (frames, HELLO included).",
            get(&self.bytes_received),
        );
        counter(
            out,
            "tributary_commands_delivered_total",
            "COMMAND frames sent to devices.",
            get(&self.commands_delivered),
        );
    }
}

/// Writes the in-flight budget's gauges and its counter of waits.
pub fn render_in_flight(out: &mut String, budget: &InFlightBudget) {
    gauge(
        out,
        "tributary_in_flight_bytes",
        "Memory held now by decoded events waiting for the disk, all devices together (the decoded half of the in-flight budget).",
        budget.held(),
    );
    gauge(
        out,
        "tributary_in_flight_limit_bytes",
        "The in-flight budget (--max-in-flight-bytes): half for QUIC receive windows, half for decoded events; 0: no limit.",
        budget.limit(),
    );
    counter(
        out,
        "tributary_in_flight_waits_total",
        "Reservations (one decoded frame each) that could not be granted at once by the decoded half of the in-flight budget; their session read nothing meanwhile.",
        budget.waits(),
    );
}

/// Writes `tributary_devices_connected`: devices with an authenticated
/// session now.
pub fn render_connected_devices(out: &mut String, devices: usize) {
    gauge(
        out,
        "tributary_devices_connected",
        "Devices with at least one authenticated session now.",
        devices,
    );
}

/// Writes `tributary_commands{status}`: the commands in the queue by their
/// status, every status present (0 when none).
pub fn render_commands(out: &mut String, counts: &[(CommandStatus, u64)]) {
    family(
        out,
        "tributary_commands",
        "gauge",
        "Commands in the command queue, by status.",
    );
    for status in CommandStatus::ALL {
        let n: u64 = counts
            .iter()
            .filter(|(s, _)| *s == status)
            .map(|(_, n)| n)
            .sum();
        sample(out, "tributary_commands", &[("status", status.as_str())], n);
    }
}

/// Writes `tributary_consumer_lag_events{stream, consumer}`: per stream,
/// the events each consumer (the Parquet sink `parquet`, a rule
/// `rule:<name>`) has not committed yet.
pub fn render_consumer_lag(out: &mut String, streams: &[(String, Vec<ConsumerLag>)]) {
    family(
        out,
        "tributary_consumer_lag_events",
        "gauge",
        "Events of a stream's log that a consumer (the Parquet sink, a rule) has not committed yet.",
    );
    for (stream, lags) in streams {
        for lag in lags {
            sample(
                out,
                "tributary_consumer_lag_events",
                &[("stream", stream), ("consumer", &lag.consumer)],
                lag.events,
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    sample(out, name, &[], value);
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl Display) {
    family(out, name, "gauge", help);
    sample(out, name, &[], value);
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// HELP text escapes backslash and newline.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and newline.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line as (name, labels, value); panics on a line that is
    /// not `name{labels} value` or a `# HELP` / `# TYPE` comment.
    fn parse(text: &str) -> Vec<(String, String, f64)> {
        let mut samples = Vec::new();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let kind = words.next().unwrap();
                let name = words.next().unwrap();
                assert!(matches!(kind, "HELP" | "TYPE"), "{line}");
                if kind == "TYPE" {
                    assert!(typed.insert(name.to_string()), "TYPE twice: {line}");
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
                None => (series, ""),
            };
            assert!(name.starts_with("tributary_"), "{line}");
            assert!(typed.contains(name), "sample before its TYPE: {line}");
            samples.push((name.to_string(), labels.to_string(), value.parse().unwrap()));
        }
        samples
    }

    fn value(samples: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .unwrap_or_else(|| panic!("no {name}{{{labels}}}"))
            .2
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = GatewayMetrics::default();
        let a = m.connection_opened();
        let _b = m.connection_opened();
        drop(a);
        m.refused(Refusal::ConnectionRate);
        m.handshake_failed();
        m.session_authenticated();
        m.authentication_failed();
        m.session_ended("closed by the device", false);
        m.session_ended("revoked: disabled", false);
        m.session_ended("idle timeout", true);
        m.frame_accepted(3);
        m.frame_accepted(0);
        m.frame_rejected("invalid_field");
        m.frame_rejected("invalid_field");
        m.bytes_received(100);
        m.command_delivered();
        let mut text = String::new();
        m.render(&mut text);
        render_connected_devices(&mut text, 1);
        render_commands(&mut text, &[(CommandStatus::Queued, 2)]);
        let lag = |consumer: &str, events| ConsumerLag {
            consumer: consumer.to_string(),
            events,
        };
        render_consumer_lag(
            &mut text,
            &[
                (
                    "sim".to_string(),
                    vec![lag("parquet", 7), lag("rule:hot", 0)],
                ),
                ("a\"b".to_string(), vec![lag("parquet", 1)]),
            ],
        );
        let s = parse(&text);
        assert_eq!(value(&s, "tributary_connections_open", ""), 1.0);
        assert_eq!(value(&s, "tributary_connections_accepted_total", ""), 2.0);
        assert_eq!(
            value(
                &s,
                "tributary_connections_refused_total",
                "reason=\"connection_rate\""
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "tributary_connections_refused_total",
                "reason=\"max_connections\""
            ),
            0.0
        );
        assert_eq!(
            value(&s, "tributary_sessions_ended_total", "reason=\"closed\""),
            1.0
        );
        assert_eq!(
            value(&s, "tributary_sessions_ended_total", "reason=\"revoked\""),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "tributary_sessions_ended_total",
                "reason=\"server_stopped\""
            ),
            1.0
        );
        assert_eq!(value(&s, "tributary_event_frames_accepted_total", ""), 2.0);
        assert_eq!(value(&s, "tributary_events_stored_total", ""), 3.0);
        assert_eq!(
            value(
                &s,
                "tributary_event_frames_rejected_total",
                "code=\"invalid_field\""
            ),
            2.0
        );
        assert_eq!(value(&s, "tributary_received_bytes_total", ""), 100.0);
        assert_eq!(value(&s, "tributary_devices_connected", ""), 1.0);
        assert_eq!(value(&s, "tributary_commands", "status=\"queued\""), 2.0);
        assert_eq!(value(&s, "tributary_commands", "status=\"expired\""), 0.0);
        assert_eq!(
            value(
                &s,
                "tributary_consumer_lag_events",
                "stream=\"sim\",consumer=\"parquet\""
            ),
            7.0
        );
        assert_eq!(
            value(
                &s,
                "tributary_consumer_lag_events",
                "stream=\"sim\",consumer=\"rule:hot\""
            ),
            0.0
        );
        assert_eq!(
            value(
                &s,
                "tributary_consumer_lag_events",
                "stream=\"a\\\"b\",consumer=\"parquet\""
            ),
            1.0
        );
    }

    #[test]
    fn session_reasons_fall_into_their_class() {
        let cases = [
            ("closed by the device", SessionEnd::Closed),
            ("closed by the device (stream reset)", SessionEnd::Closed),
            ("idle timeout", SessionEnd::IdleTimeout),
            ("revoked: device 'd1' is disabled", SessionEnd::Revoked),
            ("token expired", SessionEnd::Expired),
            ("certificate expired", SessionEnd::Expired),
            ("protocol error: protocol_error", SessionEnd::ProtocolError),
            ("connection lost: reset", SessionEnd::Lost),
            ("connection lost before WELCOME", SessionEnd::Lost),
        ];
        for (reason, end) in cases {
            assert_eq!(SessionEnd::classify(reason, false), end, "{reason}");
        }
        assert_eq!(
            SessionEnd::classify("closed by the server", true),
            SessionEnd::ServerStopped
        );
    }

    #[test]
    fn the_open_gauge_never_goes_below_zero() {
        let m = GatewayMetrics::default();
        m.connection_closed();
        assert_eq!(m.connections_open(), 0);
    }
}
