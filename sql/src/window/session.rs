//! Session windows: per group key, events closer than `gap` to each other
//! form one session, from its first event to `gap` after its last. An event
//! that arrives out of order may bridge two sessions; they merge.

use arrow::row::Rows;

use super::state::{Batch, Group, WindowState};

type DfResult<T> = datafusion::error::Result<T>;

impl WindowState {
    pub(super) fn update_sessions(
        &mut self,
        batch: &Batch<'_>,
        keys: Option<&Rows>,
        gap: i64,
    ) -> DfResult<()> {
        let rows = batch.times.len();
        let key_of = |i: usize| keys.map_or(&[][..], |k| k.row(i).data());
        let mut run_start = 0;
        let mut current = u32::MAX;
        for i in 0..rows {
            let ts = batch.times[i];
            // Inside the current session's span (same key): nothing can
            // merge, the run goes on.
            if current != u32::MAX
                && key_of(i) == key_of(i - 1)
                && self.groups[current as usize]
                    .as_ref()
                    .is_some_and(|s| s.start <= ts && ts <= s.last)
            {
                continue;
            }
            // Fold what the run holds before anything merges.
            if current != u32::MAX {
                self.fold(current, batch, run_start, i - run_start)?;
            }
            current = self.session_for(key_of(i), ts, gap, batch.devices.get(i).copied())?;
            run_start = i;
            self.touch(current, batch.partition, batch.offset);
        }
        if current != u32::MAX {
            self.fold(current, batch, run_start, rows - run_start)?;
        }
        Ok(())
    }

    /// The session an event at `ts` belongs to: an existing one it is within
    /// `gap` of (merging any it bridges), or a new one.
    fn session_for(&mut self, key: &[u8], ts: i64, gap: i64, device: Option<u32>) -> DfResult<u32> {
        let matching: Vec<u32> = self
            .sessions
            .get(key)
            .map(|list| {
                list.iter()
                    .copied()
                    .filter(|g| {
                        self.groups[*g as usize]
                            .as_ref()
                            .is_some_and(|s| ts > s.start - gap && ts < s.last + gap)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let Some((&keep, others)) = matching.split_first() else {
            let device = device.unwrap_or(super::state::NO_DEVICE);
            let g = self.create(ts, ts + gap, ts, key, device)?;
            self.sessions.entry(key.into()).or_default().push(g);
            return Ok(g);
        };
        for &other in others {
            if let Some(merged) = self.remove(other) {
                self.absorb(keep, merged)?;
            }
        }
        self.extend(keep, ts, ts, gap);
        Ok(keep)
    }

    /// Moves a session's start, last event and end to cover `first..=last`.
    fn extend(&mut self, g: u32, first: i64, last: i64, gap: i64) {
        let Some(s) = self.groups[g as usize].as_mut() else {
            return;
        };
        let old_end = s.end;
        s.start = s.start.min(first);
        s.last = s.last.max(last);
        s.end = s.last + gap;
        let new_end = s.end;
        if !self.per_device && old_end != new_end {
            self.by_end.remove(&(old_end, g));
            self.by_end.insert((new_end, g));
        }
    }

    /// Merges the state of `other` (already removed) into session `g`.
    fn absorb(&mut self, g: u32, other: Group) -> DfResult<()> {
        let gap = match self.spec {
            super::WindowSpec::Session { gap } => gap,
            _ => 0,
        };
        let Some(target) = self.groups[g as usize].as_mut() else {
            return Ok(());
        };
        let mut other = other;
        for (into, from) in target
            .accumulators
            .iter_mut()
            .zip(other.accumulators.iter_mut())
        {
            let state = from
                .state()?
                .into_iter()
                .map(|v| v.to_array())
                .collect::<DfResult<Vec<_>>>()?;
            into.merge_batch(&state)?;
        }
        for (p, o) in other.from {
            // The removed session's offsets were released; hold the oldest
            // again through the session that absorbed it.
            self.touch_at_most(g, p, o);
        }
        self.extend(g, other.start, other.last, gap);
        Ok(())
    }
}
