//! The gateway's limits on devices and connections.
//!
//! - [`DeviceRate`]: how many events and bytes a device may send per
//!   second, shared by all its sessions. A frame over the rate is rejected
//!   (`rate_limited`) with the time after which the device may send again.
//! - [`ConnectionGate`]: how many connections may be open at once, how many
//!   of them may still be in their handshake (not yet authenticated), and
//!   how many may start per second. A connection over a limit is refused
//!   before its TLS handshake, so a flood of handshakes costs the server
//!   little and never the sessions already running.
//!
//! - [`InFlightBudget`]: how much memory the devices' frames may hold,
//!   all connections together: half for bytes received and not yet read
//!   (QUIC flow-control windows, shared among the sessions), half for
//!   decoded events waiting for the disk. A session past its share stops
//!   reading, and QUIC flow control holds its device back.
//!
//! The first two use token buckets that hold one second's worth. A
//! device's bucket may go into debt by one frame: any frame passes when the
//! bucket is not in debt, so a frame larger than a second's worth is never
//! refused outright; the device then waits until the debt is paid.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tributary_registry::DeviceLimits;

/// Events and bytes per second a device may send; 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub events_per_s: u64,
    pub bytes_per_s: u64,
}

impl RateLimits {
    /// No limit at all.
    pub const UNLIMITED: RateLimits = RateLimits {
        events_per_s: 0,
        bytes_per_s: 0,
    };

    /// These defaults, with a device's own limits (from the registry) in
    /// place of those it sets.
    pub fn for_device(self, own: DeviceLimits) -> RateLimits {
        RateLimits {
            events_per_s: own.events_per_s.unwrap_or(self.events_per_s),
            bytes_per_s: own.bytes_per_s.unwrap_or(self.bytes_per_s),
        }
    }
}

/// A token bucket holding up to one second of `rate`; `tokens` may go
/// negative (debt).
#[derive(Debug)]
struct Bucket {
    rate: u64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: rate as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        let cap = self.rate as f64;
        self.tokens = (self.tokens + elapsed * cap).min(cap);
    }

    /// How long until the bucket is out of debt; zero if it is not in debt
    /// (or has no limit).
    fn wait(&self) -> Duration {
        if self.rate == 0 || self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    fn take(&mut self, n: u64) {
        if self.rate > 0 {
            self.tokens -= n as f64;
        }
    }

    fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        // A lower rate caps what is saved up; debt stays owed.
        self.tokens = self.tokens.min(rate as f64);
    }
}

/// A frame over a device's rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// When the device may send again.
    pub retry_after: Duration,
    /// What the device sent too much of: `events` or `bytes`.
    pub what: &'static str,
    /// Its limit, per second.
    pub per_second: u64,
}

impl Limited {
    /// The REJECT message.
    pub fn message(&self, device: &str) -> String {
        format!(
            "device '{device}' may send {} {}/s; it sent more, so nothing of this frame was \
             stored: send it again in {} ms",
            self.per_second,
            self.what,
            self.retry_after_ms()
        )
    }

    /// [`Limited::retry_after`] in whole milliseconds, at least 1.
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[derive(Debug)]
struct Buckets {
    events: Bucket,
    bytes: Bucket,
}

/// A device's rate limiter, shared by its sessions.
#[derive(Debug)]
pub struct DeviceRate {
    buckets: Mutex<Buckets>,
}

impl DeviceRate {
    pub fn new(limits: RateLimits) -> Self {
        let now = Instant::now();
        DeviceRate {
            buckets: Mutex::new(Buckets {
                events: Bucket::new(limits.events_per_s, now),
                bytes: Bucket::new(limits.bytes_per_s, now),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits in force.
    pub fn limits(&self) -> RateLimits {
        let b = self.lock();
        RateLimits {
            events_per_s: b.events.rate,
            bytes_per_s: b.bytes.rate,
        }
    }

    /// Changes the limits (the device's registry entry changed).
    pub fn set_limits(&self, limits: RateLimits) {
        let now = Instant::now();
        let mut b = self.lock();
        b.events.set_rate(limits.events_per_s, now);
        b.bytes.set_rate(limits.bytes_per_s, now);
    }

    /// Takes a frame of `events` events and `bytes` bytes out of the
    /// device's allowance, or says when to send it again if the device is
    /// over its rate (and then takes nothing).
    pub fn take(&self, events: u64, bytes: u64) -> Result<(), Limited> {
        self.take_at(events, bytes, Instant::now())
    }

    /// Whether a frame would be refused now, without taking anything: a
    /// frame's fate depends only on the debt already owed, so the gateway
    /// asks before it spends time decoding.
    pub fn check(&self) -> Result<(), Limited> {
        let mut b = self.lock();
        Self::over(&mut b, Instant::now())
    }

    /// Whether the device owes anything (a reconnect must not forgive it).
    pub fn in_debt(&self) -> bool {
        self.check().is_err()
    }

    fn over(b: &mut Buckets, now: Instant) -> Result<(), Limited> {
        b.events.refill(now);
        b.bytes.refill(now);
        let over = [(&b.events, "events"), (&b.bytes, "bytes")]
            .into_iter()
            .map(|(bucket, what)| (bucket.wait(), bucket.rate, what))
            .max_by_key(|(wait, _, _)| *wait);
        if let Some((retry_after, per_second, what)) = over
            && !retry_after.is_zero()
        {
            return Err(Limited {
                retry_after,
                what,
                per_second,
            });
        }
        Ok(())
    }

    fn take_at(&self, events: u64, bytes: u64, now: Instant) -> Result<(), Limited> {
        let mut b = self.lock();
        Self::over(&mut b, now)?;
        b.events.take(events);
        b.bytes.take(bytes);
        Ok(())
    }
}

/// The connection limits; 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, in their handshake or in session.
    pub max_connections: usize,
    /// Connections open at once that have not been authenticated yet (TLS
    /// handshake, waiting for HELLO, credentials being checked).
    pub max_pending: usize,
    /// New connections per second (a burst of one second's worth).
    pub per_second: u64,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxPending,
    ConnectionRate,
}

impl Refusal {
    /// The name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxPending => "max_pending_connections",
            Refusal::ConnectionRate => "connection_rate",
        }
    }
}

/// Counts connections and admits new ones within [`ConnectionLimits`].
#[derive(Debug)]
pub struct ConnectionGate {
    limits: ConnectionLimits,
    open: AtomicUsize,
    pending: AtomicUsize,
    rate: Mutex<Bucket>,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Self {
        ConnectionGate {
            limits,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            rate: Mutex::new(Bucket::new(limits.per_second, Instant::now())),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections open now and not yet authenticated.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Admits a new connection, or says which limit refuses it. The slot is
    /// given back when the returned [`Slot`] is dropped.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Refusal> {
        let within = |n: usize, max: usize| max == 0 || n < max;
        if !within(self.open(), self.limits.max_connections) {
            return Err(Refusal::MaxConnections);
        }
        if !within(self.pending(), self.limits.max_pending) {
            return Err(Refusal::MaxPending);
        }
        {
            let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            rate.refill(Instant::now());
            // Unlike a device's, this bucket allows no debt.
            if rate.rate > 0 && rate.tokens < 1.0 {
                return Err(Refusal::ConnectionRate);
            }
            rate.take(1);
        }
        // One task accepts connections, so the checks above cannot race
        // with another admission; slots only ever go back concurrently.
        self.open.fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            gate: self.clone(),
            pending: true,
        })
    }
}

/// An admitted connection's place; counted until dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<ConnectionGate>,
    pending: bool,
}

impl Slot {
    /// The connection was authenticated: it no longer counts as pending.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.gate.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The memory that devices' frames may hold, server-wide, from their first
/// byte arriving to their answer. Half of it is shared out as QUIC receive
/// windows: what each connection may send ahead of what the gateway has
/// read. The other half holds decoded batches, with their encoding for the
/// log, while they wait for the disk.
///
/// Each connection already has a limit on frames in flight; this one holds
/// for all of them together, so a thousand devices pipelining large frames
/// cannot take the server's memory.
///
/// - **Windows:** each session gets an equal part of its half, between
///   [`InFlightBudget::MIN_WINDOW`] and [`InFlightBudget::MAX_WINDOW`], and
///   moves its window to its current part at each EVENTS frame. A few
///   devices get the largest window; many devices get a part each. Credit
///   already granted cannot be taken back, so while many devices connect
///   at once the half may be exceeded until the first ones have used their
///   larger windows.
/// - **Decoded events:** a session reserves its frames' share before it
///   hands them to the log, and gives it back as soon as the log has them.
///   One that cannot reserve waits, reading nothing more. Waiters are
///   served in arrival order, so a large frame is not starved by small
///   ones; one larger than the whole half waits for all of it and then
///   passes alone.
#[derive(Debug)]
pub struct InFlightBudget {
    bytes: u64,
    /// The decoded half, one permit per KiB.
    permits: Arc<Semaphore>,
    kib: u32,
    held: AtomicU64,
    waits: AtomicU64,
}

/// A share of an [`InFlightBudget`], given back when dropped.
#[derive(Debug)]
#[must_use = "the share is given back when this is dropped"]
pub struct Reserved {
    budget: Arc<InFlightBudget>,
    permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
}

impl Reserved {
    /// Takes `other`'s share into this one: both go back together.
    pub fn merge(&mut self, mut other: Reserved) {
        match (&mut self.permit, other.permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        drop(self.permit.take());
    }
}

impl InFlightBudget {
    /// The smallest receive window a connection gets: its frames still
    /// flow, a few at a time, however many devices are connected.
    pub const MIN_WINDOW: u64 = 64 * 1024;
    /// The largest: quinn's default window for a stream, enough for one
    /// device's full rate on a fast link.
    pub const MAX_WINDOW: u64 = 1_250_000;

    /// A budget of `bytes` (each half in whole KiB, at least one, at most
    /// 4 TiB); 0 is no limit.
    pub fn new(bytes: u64) -> Self {
        let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let kib = if bytes == 0 {
            0
        } else {
            u32::try_from(bytes / 2 / 1024)
                .unwrap_or(u32::MAX)
                .clamp(1, most)
        };
        InFlightBudget {
            bytes,
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
            held: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// The budget in bytes; 0 for none.
    pub fn limit(&self) -> u64 {
        self.bytes
    }

    /// The receive window of each connection while `open` sessions are.
    pub fn receive_window(&self, open: usize) -> u64 {
        if self.bytes == 0 {
            return Self::MAX_WINDOW;
        }
        // In steps of the smallest, so a window moves only when the
        // number of sessions has moved by a fair amount.
        let share = self.bytes / 2 / open.max(1) as u64;
        (share / Self::MIN_WINDOW * Self::MIN_WINDOW).clamp(Self::MIN_WINDOW, Self::MAX_WINDOW)
    }

    /// The receive window a connection starts with, before its session
    /// takes its share.
    pub fn initial_window(&self) -> u64 {
        if self.bytes == 0 {
            Self::MAX_WINDOW
        } else {
            Self::MIN_WINDOW
        }
    }

    /// Bytes of decoded events reserved now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Reservations that could not be granted at once: the budget was
    /// full, or others were waiting before them.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// The permits (KiB) a reservation of `bytes` takes: at least one,
    /// and at most the whole half, so a larger one passes alone.
    fn permits_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.kib)
    }

    /// Reserves `bytes` of decoded events if that can be done without
    /// waiting: there is room, and nobody waits before it.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reserved> {
        let bytes = bytes as u64;
        let permit = if self.kib == 0 {
            None
        } else {
            let kib = self.permits_for(bytes);
            // Permits given back go to the first waiter until it has all
            // it asked for, so none are free while anyone waits.
            Some(self.permits.clone().try_acquire_many_owned(kib).ok()?)
        };
        Some(self.granted(permit, bytes))
    }

    /// Reserves `bytes` of decoded events, waiting until there is room.
    pub async fn reserve(self: &Arc<Self>, bytes: usize) -> Reserved {
        let bytes = bytes as u64;
        let permit = if self.kib == 0 {
            None
        } else {
            let kib = self.permits_for(bytes);
            // In line behind earlier reservations, even when enough is free
            // for this one: polled once, it takes its place in the queue,
            // and counts as a wait unless it was granted there and then.
            let acquire = self.permits.clone().acquire_many_owned(kib);
            tokio::pin!(acquire);
            let at_once = std::future::poll_fn(|cx| Poll::Ready(acquire.as_mut().poll(cx))).await;
            let permit = match at_once {
                Poll::Ready(permit) => permit,
                Poll::Pending => {
                    self.waits.fetch_add(1, Ordering::Relaxed);
                    acquire.await
                }
            };
            // The semaphore is never closed.
            permit.ok()
        };
        self.granted(permit, bytes)
    }

    /// A reservation of `bytes` holding `permit` (none without a limit).
    fn granted(self: &Arc<Self>, permit: Option<OwnedSemaphorePermit>, bytes: u64) -> Reserved {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Reserved {
            budget: self.clone(),
            permit,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_within_its_rate_passes_and_one_over_it_waits() {
        let rate = DeviceRate::new(RateLimits {
            events_per_s: 100,
            bytes_per_s: 0,
        });
        let t0 = Instant::now();
        // A second's worth at once, then one frame into debt.
        rate.take_at(100, 10, t0).unwrap();
        rate.take_at(50, 10, t0).unwrap();
        let limited = rate.take_at(1, 10, t0).unwrap_err();
        assert_eq!(limited.what, "events");
        assert_eq!(limited.per_second, 100);
        assert_eq!(limited.retry_after_ms(), 500);
        // Refused frames take nothing: half a second later the debt is paid.
        rate.take_at(1, 10, t0 + Duration::from_millis(500))
            .unwrap();
        assert!(
            rate.take_at(1, 10, t0 + Duration::from_millis(500))
                .is_err()
        );
    }

    #[test]
    fn bytes_are_limited_too_and_the_longer_wait_wins() {
        let rate = DeviceRate::new(RateLimits {
            events_per_s: 10,
            bytes_per_s: 1000,
        });
        let t0 = Instant::now();
        rate.take_at(11, 3000, t0).unwrap();
        let limited = rate.take_at(1, 1, t0).unwrap_err();
        assert_eq!((limited.what, limited.retry_after_ms()), ("bytes", 2000));
        assert!(
            limited.message("d1").contains("1000 bytes/s"),
            "{limited:?}"
        );
    }

    #[test]
    fn no_limit_never_refuses_and_limits_change_live() {
        let rate = DeviceRate::new(RateLimits::UNLIMITED);
        let t0 = Instant::now();
        for _ in 0..1000 {
            rate.take_at(1_000_000, 1 << 30, t0).unwrap();
        }
        rate.set_limits(RateLimits {
            events_per_s: 5,
            bytes_per_s: 0,
        });
        let t1 = Instant::now();
        rate.take_at(6, 0, t1).unwrap();
        assert!(rate.take_at(1, 0, t1).is_err());
    }

    #[test]
    fn the_gate_counts_open_and_pending_connections() {
        let gate = Arc::new(ConnectionGate::new(ConnectionLimits {
            max_connections: 3,
            max_pending: 2,
            per_second: 0,
        }));
        let mut a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert_eq!(gate.admit().unwrap_err(), Refusal::MaxPending);
        a.authenticated();
        let c = gate.admit().unwrap();
        assert_eq!(gate.admit().unwrap_err(), Refusal::MaxConnections);
        drop(c);
        drop(a);
        assert_eq!((gate.open(), gate.pending()), (1, 1));
    }

    #[test]
    fn the_gate_limits_new_connections_per_second() {
        let gate = Arc::new(ConnectionGate::new(ConnectionLimits {
            max_connections: 0,
            max_pending: 0,
            per_second: 2,
        }));
        let _slots = [gate.admit().unwrap(), gate.admit().unwrap()];
        assert_eq!(gate.admit().unwrap_err(), Refusal::ConnectionRate);
    }

    #[test]
    fn receive_windows_share_half_the_budget_among_the_connections() {
        let budget = InFlightBudget::new(256 << 20);
        assert_eq!(budget.limit(), 256 << 20);
        // A few devices get the largest window, many a share each, and very
        // many the smallest.
        assert_eq!(budget.receive_window(1), InFlightBudget::MAX_WINDOW);
        assert_eq!(budget.receive_window(100), InFlightBudget::MAX_WINDOW);
        assert_eq!(budget.receive_window(1_000), 128 * 1024);
        assert_eq!(budget.receive_window(1_500), 64 * 1024);
        assert_eq!(budget.receive_window(100_000), InFlightBudget::MIN_WINDOW);
        // Windows are whole steps and never add up to more than the half,
        // once each connection has more than the smallest.
        for open in [1, 2, 7, 101, 150, 999, 1_000, 1_024] {
            let window = budget.receive_window(open);
            assert_eq!(
                window.is_multiple_of(InFlightBudget::MIN_WINDOW),
                window != InFlightBudget::MAX_WINDOW
            );
            assert!(
                window * open as u64 <= 128 << 20,
                "{open} connections of {window}"
            );
        }
        assert_eq!(budget.initial_window(), InFlightBudget::MIN_WINDOW);

        let unlimited = InFlightBudget::new(0);
        assert_eq!(unlimited.limit(), 0);
        assert_eq!(
            unlimited.receive_window(100_000),
            InFlightBudget::MAX_WINDOW
        );
        assert_eq!(unlimited.initial_window(), InFlightBudget::MAX_WINDOW);
    }

    #[tokio::test]
    async fn a_reservation_past_the_budget_waits_for_an_earlier_one() {
        // 1 MiB: 512 KiB for decoded events.
        let budget = Arc::new(InFlightBudget::new(1 << 20));
        let first = budget.reserve(400 * 1024).await;
        assert_eq!(budget.held(), 400 * 1024);
        assert_eq!(budget.waits(), 0);

        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(200 * 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "600 KiB reserved of 512");
        assert_eq!(budget.waits(), 1);
        // A small one that would fit waits in line behind it.
        let small = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !small.is_finished(),
            "a small reservation overtook a waiting one"
        );
        assert_eq!(budget.waits(), 2, "waiting in line counts as waiting");

        drop(first);
        let second = waiting.await.unwrap();
        let third = small.await.unwrap();
        assert_eq!(budget.held(), 201 * 1024);
        drop((second, third));
        assert_eq!(budget.held(), 0);

        // One frame larger than the whole half passes when nothing else is
        // held, rather than waiting forever.
        let huge = tokio::time::timeout(Duration::from_secs(5), budget.reserve(10 << 20))
            .await
            .expect("a reservation larger than the budget passes alone");
        assert_eq!(budget.held(), 10 << 20);
        drop(huge);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_reservation_without_waiting_takes_no_place_in_line_and_merged_shares_go_back_together()
     {
        let budget = Arc::new(InFlightBudget::new(1 << 20));
        let mut run = budget.try_reserve(300 * 1024).expect("room for 300 KiB");
        let frame = budget
            .try_reserve(100 * 1024)
            .expect("room for 100 KiB more");
        run.merge(frame);
        assert_eq!(budget.held(), 400 * 1024);
        assert!(
            budget.try_reserve(200 * 1024).is_none(),
            "600 KiB reserved of 512"
        );
        assert_eq!(budget.waits(), 0, "a refused try is not a wait");

        // Someone waiting goes first, even for a try that would fit.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(200 * 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        assert!(
            budget.try_reserve(1024).is_none(),
            "a try overtook a waiting reservation"
        );

        // Both merged shares go back with the run, and the waiter gets in.
        drop(run);
        let second = waiting.await.unwrap();
        assert_eq!(budget.held(), 200 * 1024);
        drop(second);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.permits.available_permits(), 512);

        let unlimited = Arc::new(InFlightBudget::new(0));
        let mut all = unlimited.try_reserve(1 << 30).expect("no limit");
        all.merge(unlimited.try_reserve(1 << 30).expect("no limit"));
        assert_eq!(unlimited.held(), 2 << 30);
        drop(all);
        assert_eq!(unlimited.held(), 0);
    }

    #[tokio::test]
    async fn without_a_budget_nothing_waits() {
        let budget = Arc::new(InFlightBudget::new(0));
        let all: Vec<Reserved> = futures_reserve(&budget, 100, 1 << 30).await;
        assert_eq!(budget.held(), 100 << 30);
        assert_eq!(budget.waits(), 0);
        drop(all);
        assert_eq!(budget.held(), 0);
    }

    async fn futures_reserve(
        budget: &Arc<InFlightBudget>,
        n: usize,
        bytes: usize,
    ) -> Vec<Reserved> {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(budget.reserve(bytes).await);
        }
        all
    }
}
