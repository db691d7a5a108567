//! The one backoff helper: full-jitter exponential backoff, and the small
//! random source it needs (no `rand` crate: jitter needs spread, not secrecy).

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `attempt` 0 waits up to `base`; each attempt doubles the ceiling up to `cap`;
/// the wait is uniform in `[0, ceiling]` ("full jitter").
pub fn full_jitter(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(random_unit())
}

/// A backoff sequence for one outage: call `next()` after each failure,
/// `reset()` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = full_jitter(self.attempt, self.base, self.cap);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// One peer's outage (Redis, Nexus) as seen by one thread: logged once when
/// it starts, once when what is wrong changes (unreachable → out of memory),
/// and once when it ends, with the backoff to wait between tries.
pub struct Outage {
    what: &'static str,
    peer: &'static str,
    since: Option<Instant>,
    /// What was wrong when the outage began, and what is wrong now.
    began: &'static str,
    state: &'static str,
    backoff: Backoff,
}

impl Outage {
    pub fn new(what: &'static str, peer: &'static str, cap: Duration) -> Self {
        Outage {
            what,
            peer,
            since: None,
            began: "",
            state: "",
            backoff: Backoff::new(Duration::from_millis(50), cap),
        }
    }

    /// Record a failure to reach the peer; returns how long to wait before
    /// trying again.
    pub fn failed(&mut self, err: &dyn std::fmt::Display) -> Duration {
        self.failed_as("unreachable", err)
    }

    /// Record a failure of kind `state` ("unreachable", "is out of memory
    /// …"); returns how long to wait before trying again.
    pub fn failed_as(&mut self, state: &'static str, err: &dyn std::fmt::Display) -> Duration {
        if self.since.is_none() || self.state != state {
            if self.since.is_none() {
                self.since = Some(Instant::now());
                self.began = state;
            }
            self.state = state;
            log::warn!(
                "{}: {} {state} ({err}); retrying with backoff",
                self.what,
                self.peer
            );
        } else {
            log::debug!("{}: {} still {state} ({err})", self.what, self.peer);
        }
        self.backoff.next_delay()
    }

    pub fn is_on(&self) -> bool {
        self.since.is_some()
    }

    pub fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            log::info!("{}", self.recovery_line(since.elapsed()));
        }
        self.backoff.reset();
    }

    /// What the end of the outage is logged as, `lasted` after it began. An
    /// outage that began with the peer unreachable ends with its connection
    /// restored, whatever it said on the way back (a restarted Redis is
    /// `LOADING` for a while): the line an operator looks for.
    fn recovery_line(&self, lasted: Duration) -> String {
        let (what, peer, secs) = (self.what, self.peer, lasted.as_secs_f64());
        match (self.began, self.state) {
            ("unreachable", "unreachable") => {
                format!("{what}: {peer} connection restored after {secs:.1}s")
            }
            ("unreachable", last) => {
                format!(
                    "{what}: {peer} connection restored after {secs:.1}s (it {last} at the end)"
                )
            }
            (began, _) => {
                format!("{what}: {peer} works again after {secs:.1}s (it {began} before)")
            }
        }
    }
}

/// A uniform number in [0, 1) from a per-thread xorshift64* generator.
pub fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let local = 0u8;
    let addr = &local as *const u8 as u64;
    (nanos ^ (u64::from(std::process::id()) << 32) ^ addr.rotate_left(17)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_that_began_unreachable_ends_with_the_connection_restored() {
        let mut o = Outage::new("reader", "Redis", Duration::from_secs(1));
        o.failed(&"refused");
        o.failed_as("is up but not serving", &"LOADING");
        assert_eq!(
            o.recovery_line(Duration::from_millis(2100)),
            "reader: Redis connection restored after 2.1s (it is up but not serving at the end)"
        );
        let mut o = Outage::new("settle", "Redis", Duration::from_secs(1));
        o.failed(&"refused");
        assert_eq!(
            o.recovery_line(Duration::from_secs(1)),
            "settle: Redis connection restored after 1.0s"
        );
        let mut o = Outage::new("settle", "Redis", Duration::from_secs(1));
        o.failed_as("is out of memory", &"OOM");
        o.failed(&"refused");
        assert_eq!(
            o.recovery_line(Duration::from_secs(3)),
            "settle: Redis works again after 3.0s (it is out of memory before)"
        );
    }

    #[test]
    fn jitter_stays_under_the_growing_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for attempt in 0..10 {
            let ceiling = (base * 2u32.pow(attempt)).min(cap);
            for _ in 0..100 {
                assert!(full_jitter(attempt, base, cap) <= ceiling);
            }
        }
    }

    #[test]
    fn random_unit_is_in_range_and_spread() {
        let xs: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|&x| x < 0.1) && xs.iter().any(|&x| x > 0.9));
    }
}
