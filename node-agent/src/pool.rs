//! Warm sandboxes, per runtime and memory limit (a container's cgroup is fixed when it is
//! created, so a pool serves exactly one memory limit). `fresh` sandboxes never ran a job;
//! `recycled` ones were reset after one. Sizing is a pure function of recent demand.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sandbox::Sandbox;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The runtime's language name (for labels and logs).
    pub language: String,
    /// The runtime's id ([`crate::catalog::Language::runtime`]): what the pool is of.
    pub runtime: String,
    pub memory_bytes: u64,
}

/// How a job got its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Warm,
    Fresh,
    Cold,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Warm => "warm",
            Source::Fresh => "fresh",
            Source::Cold => "cold",
        }
    }
}

/// The pool's sizing inputs for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    pub min: u32,
    pub max: u32,
}

impl Sizing {
    /// The most sandboxes the pool holds: `max`, or `min` when that is larger.
    pub fn cap(self) -> u32 {
        self.max.max(self.min)
    }
}

/// How many warm sandboxes to keep: one more than the highest concurrency seen lately, within
/// `[min, max]`; just `min` when nothing was used lately.
pub fn target_warm(sizing: Sizing, recent_peak_in_use: u32) -> u32 {
    let max = sizing.cap();
    if recent_peak_in_use == 0 {
        return sizing.min;
    }
    (recent_peak_in_use + 1).clamp(sizing.min, max)
}

/// How many fresh sandboxes to start now, given what is ready or on its way (`recycled`
/// counts the recycled ones ready, being reset, and in use) and the pool's `max`.
pub fn to_start(target: u32, max: u32, fresh: u32, recycled: u32, starting: u32) -> u32 {
    let have = fresh + recycled + starting;
    let want_total = target.saturating_sub(have);
    // Keep one never-used sandbox ready while the pool is meant to be warm at all, so `fresh`
    // requests are served warm too; but never beyond `max`: a pool that is full of sandboxes in
    // use or coming back would have to discard one of them for it, and would then start a
    // container for every job.
    let want_fresh = u32::from(target > 0 && fresh + starting == 0 && have < max);
    want_total.max(want_fresh)
}

/// How long the peak of in-use sandboxes is remembered.
const PEAK_WINDOW: Duration = Duration::from_secs(60);
/// A recycled sandbox idle this long above target is removed.
const IDLE: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Entry {
    fresh: VecDeque<(Sandbox, Instant)>,
    recycled: VecDeque<(Sandbox, Instant)>,
    starting: u32,
    resetting: u32,
    in_use: u32,
    peak: u32,
    peak_at: Option<Instant>,
}

impl Entry {
    fn recent_peak(&self, now: Instant) -> u32 {
        match self.peak_at {
            Some(at) if now.duration_since(at) < PEAK_WINDOW => self.peak.max(self.in_use),
            _ => self.in_use,
        }
    }
}

#[derive(Default)]
pub struct Pools {
    entries: Mutex<HashMap<PoolKey, Entry>>,
}

/// One job's use of a pool key; see `Pools::begin`.
pub struct InUse<'a> {
    pools: &'a Pools,
    key: PoolKey,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        let mut entries = self.pools.entries.lock().expect("pool lock");
        if let Some(e) = entries.get_mut(&self.key) {
            e.in_use = e.in_use.saturating_sub(1);
        }
    }
}

/// What the refiller should do for one key.
pub struct Refill {
    pub key: PoolKey,
    pub start: u32,
}

impl Pools {
    /// Counts one more job using `key` (for sizing) until the returned guard is dropped, which
    /// happens however the job ends, a cancelled request included.
    pub fn begin<'a>(&'a self, key: &PoolKey, now: Instant) -> InUse<'a> {
        let mut entries = self.entries.lock().expect("pool lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.in_use += 1;
        if entry.in_use >= entry.recent_peak(now) {
            entry.peak = entry.in_use;
            entry.peak_at = Some(now);
        }
        InUse {
            pools: self,
            key: key.clone(),
        }
    }

    /// Takes the most recently reset sandbox, if one is ready.
    pub fn take_recycled(&self, key: &PoolKey) -> Option<Sandbox> {
        let mut entries = self.entries.lock().expect("pool lock");
        entries.get_mut(key)?.recycled.pop_back().map(|(sb, _)| sb)
    }

    /// Takes a sandbox that never ran a job, if one is ready.
    pub fn take_fresh(&self, key: &PoolKey) -> Option<Sandbox> {
        let mut entries = self.entries.lock().expect("pool lock");
        entries.get_mut(key)?.fresh.pop_front().map(|(sb, _)| sb)
    }

    /// Whether a sandbox of `key` that never ran a job is ready.
    pub fn has_fresh(&self, key: &PoolKey) -> bool {
        let entries = self.entries.lock().expect("pool lock");
        entries.get(key).is_some_and(|e| !e.fresh.is_empty())
    }

    /// Takes out every pooled sandbox whose supervisor is gone (for the caller to drop), so
    /// that the refiller replaces them before a job is handed one.
    pub fn take_dead(&self, alive: impl Fn(&mut Sandbox) -> bool) -> Vec<Sandbox> {
        let mut entries = self.entries.lock().expect("pool lock");
        let mut dead = Vec::new();
        for entry in entries.values_mut() {
            for queue in [&mut entry.fresh, &mut entry.recycled] {
                let mut i = 0;
                while i < queue.len() {
                    if alive(&mut queue[i].0) {
                        i += 1;
                    } else if let Some((sb, _)) = queue.remove(i) {
                        dead.push(sb);
                    }
                }
            }
        }
        dead
    }

    /// Sandboxes of `key` being reset right now (each will be back in a few milliseconds).
    pub fn resetting(&self, key: &PoolKey) -> u32 {
        let entries = self.entries.lock().expect("pool lock");
        entries.get(key).map_or(0, |e| e.resetting)
    }

    pub fn begin_reset(&self, key: &PoolKey) {
        let mut entries = self.entries.lock().expect("pool lock");
        entries.entry(key.clone()).or_default().resetting += 1;
    }

    /// A reset finished; `sandbox` is the clean sandbox to pool, or `None` when it failed. Gives
    /// the sandbox back when the pool is full.
    pub fn end_reset(
        &self,
        key: &PoolKey,
        sandbox: Option<Sandbox>,
        sizing: Sizing,
        now: Instant,
    ) -> Option<Sandbox> {
        let mut entries = self.entries.lock().expect("pool lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.resetting = entry.resetting.saturating_sub(1);
        let sandbox = sandbox?;
        let held = (entry.fresh.len() + entry.recycled.len()) as u32;
        if held >= sizing.cap() {
            return Some(sandbox);
        }
        entry.recycled.push_back((sandbox, now));
        None
    }

    pub fn put_fresh(&self, key: &PoolKey, sandbox: Sandbox, now: Instant) {
        let mut entries = self.entries.lock().expect("pool lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.starting = entry.starting.saturating_sub(1);
        entry.fresh.push_back((sandbox, now));
    }

    pub fn start_failed(&self, key: &PoolKey) {
        let mut entries = self.entries.lock().expect("pool lock");
        if let Some(e) = entries.get_mut(key) {
            e.starting = e.starting.saturating_sub(1);
        }
    }

    /// Decides what to start for every key, marking those starts as under way, and takes out
    /// the sandboxes idle above target (for the caller to drop, which removes them).
    pub fn plan(
        &self,
        sizing_of: impl Fn(&PoolKey) -> Sizing,
        wanted: &[PoolKey],
        now: Instant,
    ) -> (Vec<Refill>, Vec<Sandbox>) {
        let mut entries = self.entries.lock().expect("pool lock");
        for key in wanted {
            entries.entry(key.clone()).or_default();
        }
        let mut refills = Vec::new();
        let mut idle = Vec::new();
        for (key, entry) in entries.iter_mut() {
            let sizing = sizing_of(key);
            let target = target_warm(sizing, entry.recent_peak(now));
            // Sandboxes in use or being reset come back to the pool: they count as supply.
            let returning = entry.recycled.len() as u32 + entry.resetting + entry.in_use;
            let start = to_start(
                target,
                sizing.cap(),
                entry.fresh.len() as u32,
                returning,
                entry.starting,
            );
            if start > 0 {
                entry.starting += start;
                refills.push(Refill {
                    key: key.clone(),
                    start,
                });
            }
            while (entry.fresh.len() + entry.recycled.len()) as u32 > target {
                match entry.recycled.front() {
                    Some((_, since)) if now.duration_since(*since) > IDLE => {
                        idle.push(entry.recycled.pop_front().expect("front exists").0);
                    }
                    _ => break,
                }
            }
        }
        (refills, idle)
    }

    /// Ready sandboxes per runtime id.
    pub fn warm_counts(&self) -> HashMap<String, u32> {
        let entries = self.entries.lock().expect("pool lock");
        let mut out = HashMap::new();
        for (key, e) in entries.iter() {
            *out.entry(key.runtime.clone()).or_insert(0) +=
                (e.fresh.len() + e.recycled.len()) as u32;
        }
        out
    }

    /// Takes every pooled sandbox out (to drop them at shutdown).
    pub fn drain(&self) -> Vec<Sandbox> {
        let mut entries = self.entries.lock().expect("pool lock");
        entries
            .values_mut()
            .flat_map(|e| {
                e.fresh
                    .drain(..)
                    .chain(e.recycled.drain(..))
                    .map(|(sb, _)| sb)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_follows_recent_peak_within_bounds() {
        let s = Sizing { min: 2, max: 8 };
        let table = [(0, 2), (1, 2), (2, 3), (5, 6), (7, 8), (50, 8)];
        for (peak, want) in table {
            assert_eq!(target_warm(s, peak), want, "peak {peak}");
        }
        assert_eq!(target_warm(Sizing { min: 0, max: 4 }, 0), 0);
        assert_eq!(target_warm(Sizing { min: 0, max: 4 }, 1), 2);
        assert_eq!(target_warm(Sizing { min: 0, max: 0 }, 3), 0);
        // A min above the max wins everywhere the pool is bounded, not only here.
        assert_eq!(target_warm(Sizing { min: 2, max: 1 }, 5), 2);
        assert_eq!(Sizing { min: 2, max: 1 }.cap(), 2);
    }

    #[test]
    fn starts_what_is_missing_and_keeps_one_fresh() {
        // (target, max, fresh, recycled, starting) -> start
        let table = [
            ((2, 8, 0, 0, 0), 2),
            ((2, 8, 1, 0, 0), 1),
            ((2, 8, 0, 2, 0), 1), // all recycled: still one fresh for `fresh` jobs
            ((2, 8, 0, 1, 1), 0),
            ((3, 8, 1, 5, 0), 0),
            ((0, 8, 0, 0, 0), 0),
            ((1, 1, 0, 1, 0), 0), // the one sandbox is in use: no second one beside it
            ((2, 2, 0, 2, 0), 0), // full of recycled (or in use): no fresh beyond max
            ((1, 1, 0, 0, 0), 1),
        ];
        for ((t, m, f, r, s), want) in table {
            assert_eq!(to_start(t, m, f, r, s), want, "{:?}", (t, m, f, r, s));
        }
    }
}
