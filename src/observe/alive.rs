//! Liveness and readiness, as `/healthz` and `/readyz` tell them.
//!
//! Liveness: each long-running loop (reader, settle, heartbeat, Nexus
//! poller and reporter, the metrics sampler) holds a [`Beat`] and ticks it
//! once per turn. A loop whose last tick is older than its bound (set by
//! the loop from its own longest legitimate wait) is wedged. Dropping the
//! beat (the loop ended: a transport switch, a stop) forgets it.
//!
//! Readiness: each transport part says whether it can take jobs now
//! ([`set_ready`]); `None` is ready, `Some(reason)` is not. Ready means at
//! least one part is registered and none says why not.
//!
//! Both are a lock and a map lookup per call, at most once per loop turn.

use crate::sync::lock;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Loop {
    last: Instant,
    bound: Duration,
}

static LOOPS: Mutex<BTreeMap<u64, (&'static str, Loop)>> = Mutex::new(BTreeMap::new());
static NEXT: Mutex<u64> = Mutex::new(0);
static READY: Mutex<BTreeMap<&'static str, Option<String>>> = Mutex::new(BTreeMap::new());

/// One loop's liveness; ticks say it is turning.
pub struct Beat(u64);

impl Beat {
    /// A loop named `name` that never legitimately goes longer than `bound`
    /// between two ticks.
    pub fn new(name: &'static str, bound: Duration) -> Beat {
        let id = {
            let mut n = lock(&NEXT);
            *n += 1;
            *n
        };
        let l = Loop {
            last: Instant::now(),
            bound,
        };
        lock(&LOOPS).insert(id, (name, l));
        Beat(id)
    }

    pub fn tick(&self) {
        if let Some((_, l)) = lock(&LOOPS).get_mut(&self.0) {
            l.last = Instant::now();
        }
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        lock(&LOOPS).remove(&self.0);
    }
}

/// The loops stuck past their bound, as `name (no tick for 93s, bound
/// 70s)`; empty when every loop turns.
pub fn wedged() -> Vec<String> {
    let now = Instant::now();
    lock(&LOOPS)
        .values()
        .filter_map(|(name, l)| {
            let quiet = now.saturating_duration_since(l.last);
            (quiet > l.bound).then(|| {
                format!(
                    "{name} (no tick for {}s, bound {}s)",
                    quiet.as_secs(),
                    l.bound.as_secs()
                )
            })
        })
        .collect()
}

/// Whether the transport part `part` can take jobs: `None` yes, else why
/// not. Cheap to call with an unchanged state.
pub fn set_ready(part: &'static str, why_not: Option<String>) {
    let mut r = lock(&READY);
    if r.get(part) != Some(&why_not) {
        r.insert(part, why_not);
    }
}

/// `part` stopped (a transport switch): it no longer counts.
pub fn clear_ready(part: &'static str) {
    lock(&READY).remove(part);
}

/// `Ok` when ready, else the reason, one line.
pub fn readiness() -> Result<(), String> {
    let r = lock(&READY);
    if r.is_empty() {
        return Err("no transport is running yet".into());
    }
    let not: Vec<String> = r
        .iter()
        .filter_map(|(part, why)| why.as_ref().map(|w| format!("{part}: {w}")))
        .collect();
    if not.is_empty() {
        Ok(())
    } else {
        Err(not.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_past_its_bound_is_wedged_until_it_ticks_or_ends() {
        let b = Beat::new("test-loop-a", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            wedged().iter().any(|w| w.starts_with("test-loop-a (")),
            "{:?}",
            wedged()
        );
        b.tick();
        let fresh = Beat::new("test-loop-b", Duration::from_secs(3600));
        assert!(!wedged().iter().any(|w| w.starts_with("test-loop-b")));
        drop(b);
        drop(fresh);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!wedged().iter().any(|w| w.starts_with("test-loop-")));
    }
}
