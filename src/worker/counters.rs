//! What this worker has done since it started, for the node heartbeat: one
//! small struct of atomic counters, shared through the [`Executor`]
//! (`exec.counters`). Written where jobs end: the handler pool (in flight,
//! processed, failed), the Redis reader (reclaimed) and settle thread (dead
//! letters, counted once Redis took them, malformed entries included); the
//! mode by `main` at start and by each switch of transport. Only read by the
//! heartbeat. Nothing here blocks.
//!
//! [`Executor`]: super::exec::Executor

use super::exec::Outcome;
use crate::sync::lock;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Counters {
    in_flight: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    reclaimed: AtomicU64,
    /// Where jobs come from now: `redis` or `nexus` ("" before a transport started).
    mode: Mutex<&'static str>,
}

impl Counters {
    /// A handler starts running a job.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler's job ended with `outcome`. Every outcome but `Abandoned`
    /// (left to run again elsewhere) counts as processed.
    pub fn finished(&self, outcome: &Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Outcome::Abandoned => {}
            Outcome::Failed { .. } => {
                self.processed.fetch_add(1, Ordering::Relaxed);
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Success(_) | Outcome::Cancelled(_) => {
                self.processed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Redis took an entry's dead letter.
    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` entries of dead consumers were taken over (XAUTOCLAIM).
    pub fn reclaimed(&self, n: u64) {
        self.reclaimed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_mode(&self, mode: &'static str) {
        *lock(&self.mode) = mode;
    }

    /// The heartbeat's `worker` object.
    pub fn snapshot(&self) -> Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "in_flight": n(&self.in_flight),
            "processed": n(&self.processed),
            "failed": n(&self.failed),
            "dead_lettered": n(&self.dead_lettered),
            "reclaimed": n(&self.reclaimed),
            "mode": *lock(&self.mode),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_as_processed_and_failed_but_abandoned_does_not() {
        let c = Counters::default();
        for outcome in [
            Outcome::Success(Value::Null),
            Outcome::Failed {
                reason: "r".into(),
                error: "e".into(),
            },
            Outcome::Cancelled("c".into()),
            Outcome::Abandoned,
        ] {
            c.started();
            c.finished(&outcome);
        }
        c.started();
        c.reclaimed(2);
        c.dead_lettered();
        c.set_mode("redis");
        assert_eq!(
            c.snapshot(),
            json!({"in_flight": 1, "processed": 3, "failed": 1, "dead_lettered": 1,
                   "reclaimed": 2, "mode": "redis"})
        );
    }
}
