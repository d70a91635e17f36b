//! Per-device watermarks.
//!
//! A device's watermark is the newest event time it has sent minus the
//! stream's watermark delay: an event older than that is late. Windows keyed
//! by device close on their own device's watermark, so a device catching up on
//! a backlog is never late because of another device's clock. Windows across
//! devices close on the global watermark: the lowest among devices heard from
//! within the idle timeout (it never goes back).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use datafusion::common::HashMap;

use tributary_engine::snapshot::Snapshot;

use super::TimeOptions;

/// A device as the watermarks know it.
#[derive(Debug, Clone)]
struct Clock {
    /// Newest event time seen, if any.
    max_ts: i64,
    /// Newest arrival time seen.
    last_seen: i64,
    /// The watermark never goes below this (raised when a silent device's
    /// windows are closed).
    floor: i64,
    /// Whether the device counts for the global watermark now.
    active: bool,
    /// Whether the device has an entry in `by_watermark`.
    ranked: bool,
}

impl Clock {
    fn watermark(&self, delay: i64) -> i64 {
        self.max_ts.saturating_sub(delay).max(self.floor)
    }
}

/// A device id as a hash-map key: short ids live in the entry itself, so
/// finding a device (once per run of its events) compares bytes already
/// in cache instead of following a pointer to each candidate's text.
#[derive(Debug, Clone)]
enum DeviceName {
    Short { len: u8, bytes: [u8; SHORT] },
    Long(Box<[u8]>),
}

/// The longest id kept in place.
const SHORT: usize = 23;

impl DeviceName {
    fn new(id: &str) -> Self {
        let id = id.as_bytes();
        if id.len() <= SHORT {
            let mut bytes = [0; SHORT];
            bytes[..id.len()].copy_from_slice(id);
            DeviceName::Short {
                len: id.len() as u8,
                bytes,
            }
        } else {
            DeviceName::Long(id.into())
        }
    }
}

impl std::borrow::Borrow<[u8]> for DeviceName {
    fn borrow(&self) -> &[u8] {
        match self {
            DeviceName::Short { len, bytes } => &bytes[..*len as usize],
            DeviceName::Long(bytes) => bytes,
        }
    }
}

impl std::hash::Hash for DeviceName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so lookups by `&[u8]` find it.
        std::borrow::Borrow::<[u8]>::borrow(self).hash(state)
    }
}

impl PartialEq for DeviceName {
    fn eq(&self, other: &Self) -> bool {
        std::borrow::Borrow::<[u8]>::borrow(self) == std::borrow::Borrow::<[u8]>::borrow(other)
    }
}

impl Eq for DeviceName {}

/// A min-heap of (time, device).
type Queue = BinaryHeap<Reverse<(i64, u32)>>;

/// The watermarks of every device a rule has seen.
///
/// Events only move a device's clock forward, so the two queues are kept
/// lazily: an entry records a time the device had when it was queued, which
/// may since have grown. Nothing is queued per event; an entry is corrected
/// when it comes to the front.
#[derive(Debug, Clone)]
pub struct Watermarks {
    options: TimeOptions,
    index: HashMap<DeviceName, u32>,
    names: Vec<String>,
    clocks: Vec<Clock>,
    /// Devices by watermark, for the global minimum: one entry per active
    /// device (and maybe one left by a device since gone silent).
    by_watermark: Queue,
    /// Active devices by arrival, to find the ones that went silent: one
    /// entry each.
    by_arrival: Queue,
    /// Whether the global watermark is kept up to date (rules across devices).
    global_wanted: bool,
    global: i64,
    /// The newest arrival time seen, or the `now` given to `advance`.
    now: i64,
    /// Devices found silent while observing, not yet reported.
    pending_silent: Vec<u32>,
}

impl Watermarks {
    /// Watermarks with these options; `global_wanted` keeps the global
    /// watermark current for rules whose windows span devices.
    pub fn new(options: TimeOptions, global_wanted: bool) -> Self {
        Watermarks {
            options,
            index: HashMap::default(),
            names: Vec::new(),
            clocks: Vec::new(),
            by_watermark: BinaryHeap::new(),
            by_arrival: BinaryHeap::new(),
            global_wanted,
            global: i64::MIN,
            now: i64::MIN,
            pending_silent: Vec::new(),
        }
    }

    /// The options in force.
    pub fn options(&self) -> TimeOptions {
        self.options
    }

    /// The index of a device, adding it if new.
    pub fn device(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id.as_bytes()) {
            return i;
        }
        let i = self.clocks.len() as u32;
        self.index.insert(DeviceName::new(id), i);
        self.names.push(id.to_string());
        self.clocks.push(Clock {
            max_ts: i64::MIN,
            last_seen: i64::MIN,
            floor: i64::MIN,
            active: false,
            ranked: false,
        });
        i
    }

    /// The index of a device already seen.
    pub fn find(&self, id: &str) -> Option<u32> {
        self.index.get(id.as_bytes()).copied()
    }

    /// A device's id.
    pub fn name(&self, device: u32) -> &str {
        self.names.get(device as usize).map_or("", String::as_str)
    }

    /// Number of devices seen.
    pub fn len(&self) -> usize {
        self.clocks.len()
    }

    /// Whether no device was seen yet.
    pub fn is_empty(&self) -> bool {
        self.clocks.is_empty()
    }

    /// A device's watermark now.
    pub fn device_watermark(&self, device: u32) -> i64 {
        self.clocks
            .get(device as usize)
            .map_or(i64::MIN, |c| c.watermark(self.options.watermark_delay))
    }

    /// The watermark of windows across devices.
    pub fn global_watermark(&self) -> i64 {
        self.global
    }

    /// The newest arrival time seen.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Takes one event of `device` in arrival order. Returns whether it is
    /// late: older than its watermark (the device's own when `per_device`,
    /// else the global one) as it stood before this event.
    pub fn observe(&mut self, device: u32, ts: i64, received_at: i64, per_device: bool) -> bool {
        let delay = self.options.watermark_delay;
        let late = if per_device {
            ts < self.device_watermark(device)
        } else {
            ts < self.global
        };
        let Some(clock) = self.clocks.get_mut(device as usize) else {
            return late;
        };
        let was_active = clock.active;
        clock.max_ts = clock.max_ts.max(ts);
        clock.last_seen = clock.last_seen.max(received_at);
        clock.active = true;
        self.now = self.now.max(received_at);
        if !was_active {
            self.by_arrival.push(Reverse((clock.last_seen, device)));
            if self.global_wanted && !clock.ranked {
                clock.ranked = true;
                self.by_watermark
                    .push(Reverse((clock.watermark(delay), device)));
            }
        }
        if self.global_wanted {
            self.expire_silent_into_pending();
            self.update_global();
        }
        late
    }

    fn idle_before(&self) -> i64 {
        self.now.saturating_sub(self.options.idle_timeout)
    }

    fn expire_silent_into_pending(&mut self) {
        let silent = self.expire_silent();
        self.pending_silent.extend(silent);
    }

    /// Marks devices not heard from within the idle timeout as inactive.
    fn expire_silent(&mut self) -> Vec<u32> {
        let before = self.idle_before();
        let mut silent = Vec::new();
        while let Some(&Reverse((seen, device))) = self.by_arrival.peek() {
            if seen >= before {
                break;
            }
            self.by_arrival.pop();
            let Some(clock) = self.clocks.get_mut(device as usize) else {
                continue;
            };
            if clock.last_seen > seen {
                // Heard from since it was queued: queue it again as it is.
                self.by_arrival.push(Reverse((clock.last_seen, device)));
                continue;
            }
            // Its entry in `by_watermark` goes when it comes to the front.
            clock.active = false;
            silent.push(device);
        }
        silent
    }

    fn update_global(&mut self) {
        let delay = self.options.watermark_delay;
        // Correct the front of the queue until it is a current entry.
        let candidate = loop {
            let Some(&Reverse((wm, device))) = self.by_watermark.peek() else {
                break None;
            };
            let Some(clock) = self.clocks.get_mut(device as usize) else {
                self.by_watermark.pop();
                continue;
            };
            if !clock.active {
                self.by_watermark.pop();
                clock.ranked = false;
                continue;
            }
            let now = clock.watermark(delay);
            if now == wm {
                break Some(wm);
            }
            self.by_watermark.pop();
            self.by_watermark.push(Reverse((now, device)));
        };
        let candidate = match candidate {
            Some(wm) => wm,
            // Everyone is silent: nothing holds windows open.
            None => self
                .clocks
                .iter()
                .map(|c| c.watermark(delay))
                .max()
                .unwrap_or(i64::MIN),
        };
        self.global = self.global.max(candidate);
    }

    /// Moves time to `now` (arrival time, ms) while no events come. Returns
    /// the devices that went silent since the last call; the global
    /// watermark moves past them.
    pub fn advance(&mut self, now: i64) -> Vec<u32> {
        self.now = self.now.max(now);
        let mut silent = std::mem::take(&mut self.pending_silent);
        silent.extend(self.expire_silent());
        if self.global_wanted {
            self.update_global();
        }
        silent
    }

    /// Devices silent since the newest arrival time (see [`Self::advance`]).
    pub fn silent(&mut self) -> Vec<u32> {
        let mut silent = std::mem::take(&mut self.pending_silent);
        silent.extend(self.expire_silent());
        if self.global_wanted && !silent.is_empty() {
            self.update_global();
        }
        silent
    }

    /// Puts devices reported by [`Self::advance`] back, so the next
    /// [`Self::silent`] returns them.
    pub fn requeue_silent(&mut self, devices: Vec<u32>) {
        self.pending_silent.extend(devices);
    }

    /// Raises a device's watermark to at least `floor`: its events before
    /// that are late from now on (used when a silent device's windows close).
    pub fn raise(&mut self, device: u32, floor: i64) {
        // A watermark only grows: the queue entry is corrected lazily.
        if let Some(clock) = self.clocks.get_mut(device as usize) {
            clock.floor = clock.floor.max(floor);
        }
    }

    /// Saves the clocks of every device into `s`, under `prefix`. Device
    /// numbers are kept: window state refers to devices by number.
    pub fn snapshot(&self, s: &mut Snapshot, prefix: &str) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        s.put_json(
            &part("meta"),
            &serde_json::json!({
                "global": self.global,
                "now": self.now,
                "global_wanted": self.global_wanted,
            }),
        )?;
        s.put_strings(&part("names"), self.names.iter().map(String::as_str))?;
        let column = |f: fn(&Clock) -> i64| self.clocks.iter().map(f).collect::<Vec<_>>();
        s.put_i64s(&part("max_ts"), &column(|c| c.max_ts))?;
        s.put_i64s(&part("last_seen"), &column(|c| c.last_seen))?;
        s.put_i64s(&part("floor"), &column(|c| c.floor))?;
        s.put_i64s(
            &part("flags"),
            &column(|c| i64::from(c.active) | (i64::from(c.ranked) << 1)),
        )?;
        for (name, queue) in [
            ("by_watermark", &self.by_watermark),
            ("by_arrival", &self.by_arrival),
        ] {
            let (times, devices): (Vec<i64>, Vec<u32>) =
                queue.iter().map(|Reverse(entry)| *entry).unzip();
            s.put_i64s(&part(&format!("{name}.time")), &times)?;
            s.put_u32s(&part(&format!("{name}.device")), &devices)?;
        }
        s.put_u32s(&part("pending_silent"), &self.pending_silent)
    }

    /// Replaces these (new, empty) watermarks with the ones saved under
    /// `prefix`.
    pub fn restore(&mut self, s: &Snapshot, prefix: &str) -> Result<(), String> {
        let part = |name: &str| format!("{prefix}.{name}");
        #[derive(serde::Deserialize)]
        struct Meta {
            global: i64,
            now: i64,
            global_wanted: bool,
        }
        let meta: Meta = s.json(&part("meta"))?;
        if meta.global_wanted != self.global_wanted {
            return Err("the saved watermarks are of a rule with other windows".into());
        }
        let names = s.strings(&part("names"))?;
        let max_ts = s.i64s(&part("max_ts"))?;
        let last_seen = s.i64s(&part("last_seen"))?;
        let floor = s.i64s(&part("floor"))?;
        let flags = s.i64s(&part("flags"))?;
        let n = names.len();
        if [max_ts.len(), last_seen.len(), floor.len(), flags.len()] != [n; 4] {
            return Err(format!(
                "the saved watermarks do not match: {n} devices but clocks of other lengths"
            ));
        }
        let queue = |name: &str| -> Result<Queue, String> {
            let times = s.i64s(&part(&format!("{name}.time")))?;
            let devices = s.u32s(&part(&format!("{name}.device")))?;
            if times.len() != devices.len() || devices.iter().any(|d| *d as usize >= n) {
                return Err(format!("the saved watermark queue '{name}' is damaged"));
            }
            Ok(times.into_iter().zip(devices).map(Reverse).collect())
        };
        let by_watermark = queue("by_watermark")?;
        let by_arrival = queue("by_arrival")?;
        let pending_silent = s.u32s(&part("pending_silent"))?;
        if pending_silent.iter().any(|d| *d as usize >= n) {
            return Err("the saved silent devices are damaged".into());
        }
        let mut index = HashMap::default();
        for (i, name) in names.iter().enumerate() {
            if index.insert(DeviceName::new(name), i as u32).is_some() {
                return Err(format!("the saved watermarks hold device '{name}' twice"));
            }
        }
        self.clocks = (0..n)
            .map(|i| Clock {
                max_ts: max_ts[i],
                last_seen: last_seen[i],
                floor: floor[i],
                active: flags[i] & 1 != 0,
                ranked: flags[i] & 2 != 0,
            })
            .collect();
        self.index = index;
        self.names = names;
        self.by_watermark = by_watermark;
        self.by_arrival = by_arrival;
        self.global = meta.global;
        self.now = meta.now;
        self.pending_silent = pending_silent;
        Ok(())
    }

    /// Bytes held, roughly.
    pub fn size(&self) -> usize {
        self.names.iter().map(|n| n.len() * 2 + 64).sum::<usize>()
            + self.clocks.len() * std::mem::size_of::<Clock>()
            + (self.by_arrival.len() + self.by_watermark.len()) * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(delay: i64, idle: i64) -> TimeOptions {
        TimeOptions {
            watermark_delay: delay,
            idle_timeout: idle,
        }
    }

    #[test]
    fn a_device_is_late_only_against_its_own_clock() {
        let mut w = Watermarks::new(options(5, 1000), false);
        let a = w.device("a");
        let b = w.device("b");
        assert!(!w.observe(a, 100, 0, true));
        // Within the delay: not late.
        assert!(!w.observe(a, 96, 0, true));
        // Older than 100 - 5: late.
        assert!(w.observe(a, 94, 0, true));
        // Device b catching up on an old backlog is not late.
        assert!(!w.observe(b, 10, 0, true));
        assert!(!w.observe(b, 11, 0, true));
        assert_eq!(w.device_watermark(a), 95);
        assert_eq!(w.device_watermark(b), 6);
    }

    #[test]
    fn the_global_watermark_is_the_slowest_active_device() {
        let mut w = Watermarks::new(options(5, 100), true);
        let a = w.device("a");
        let b = w.device("b");
        w.observe(b, 20, 0, false);
        w.observe(a, 50, 0, false);
        assert_eq!(w.global_watermark(), 15);
        w.observe(b, 40, 10, false);
        assert_eq!(w.global_watermark(), 35);
        // b goes silent: after the idle timeout, a alone sets the pace.
        w.observe(a, 80, 200, false);
        assert_eq!(w.global_watermark(), 75);
        // b comes back with old events: they are late; the global watermark
        // does not go back.
        assert!(w.observe(b, 41, 201, false));
        assert_eq!(w.global_watermark(), 75);
    }

    #[test]
    fn short_and_long_ids_are_told_apart() {
        let mut w = Watermarks::new(options(5, 100), false);
        let long = "a-device-id-longer-than-twenty-three-bytes";
        let ids = ["", "a", "ab", "exactly-23-bytes-long-x", long, &long[..24]];
        let numbers: Vec<u32> = ids.iter().map(|id| w.device(id)).collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4, 5]);
        for (id, n) in ids.iter().zip(&numbers) {
            assert_eq!(w.device(id), *n);
            assert_eq!(w.find(id), Some(*n));
            assert_eq!(w.name(*n), *id);
        }
        assert_eq!(w.find("abc"), None);
    }

    #[test]
    fn advancing_time_reports_silent_devices_once() {
        let mut w = Watermarks::new(options(5, 100), false);
        let a = w.device("a");
        w.observe(a, 50, 1000, true);
        assert!(w.advance(1050).is_empty());
        assert_eq!(w.advance(1101), vec![a]);
        assert!(w.advance(2000).is_empty());
        w.raise(a, 60);
        assert_eq!(w.device_watermark(a), 60);
        assert!(w.observe(a, 59, 2001, true));
    }
}
