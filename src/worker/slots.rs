//! Handler capacity, shared by every transport, and its one owner: a
//! transport takes [`Slot`]s before it takes jobs (never more than there are
//! idle handler threads, the exact backpressure of ARCHITECTURE.md), hands
//! each to the pool with its job, and the pool gives it back when the handler
//! returns. A slot is a value that frees itself on drop, so no code path can
//! forget to release one or release one twice. A slot handed on with a job
//! ([`Slot::into_job`], done by `Task::new`) counts as a running job until
//! it comes back: that is what a shutdown waits for, not the slots a reader
//! holds while it waits for work.
//!
//! The same type counts any other capacity that must be taken before a job
//! is: the Redis transport keeps one for the places in its consumer's
//! pending list, which an entry holds until Redis took its outcome (longer
//! than its handler).

use crate::sync::lock;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct Slots {
    capacity: usize,
    counts: Mutex<Counts>,
    changed: Condvar,
}

struct Counts {
    free: usize,
    /// Slots out with a job.
    jobs: usize,
}

/// One handler thread's worth of capacity; given back when dropped.
#[must_use]
pub struct Slot {
    /// `None` only once [`Slots::give_back`] gave it back.
    owner: Option<Arc<Slots>>,
    job: bool,
}

impl Slot {
    /// This slot now carries a job, running or about to run.
    pub fn into_job(mut self) -> Slot {
        if let Some(s) = &self.owner {
            if !self.job {
                lock(&s.counts).jobs += 1;
            }
        }
        self.job = true;
        self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.owner.take() {
            s.put(1, usize::from(self.job));
        }
    }
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Slots {
            capacity,
            counts: Mutex::new(Counts {
                free: capacity,
                jobs: 0,
            }),
            changed: Condvar::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.capacity - lock(&self.counts).free
    }

    /// Slots out with a job now.
    pub fn jobs(&self) -> usize {
        lock(&self.counts).jobs
    }

    /// Take every free slot, but no more than `most`, waiting up to
    /// `timeout` for at least one. Empty when none came free in time.
    pub fn take(self: &Arc<Self>, timeout: Duration, most: usize) -> Vec<Slot> {
        if most == 0 {
            return Vec::new();
        }
        let counts = lock(&self.counts);
        let (mut counts, _) = self
            .changed
            .wait_timeout_while(counts, timeout, |c| c.free == 0)
            .unwrap_or_else(|e| e.into_inner());
        let n = counts.free.min(most);
        counts.free -= n;
        drop(counts);
        (0..n)
            .map(|_| Slot {
                owner: Some(self.clone()),
                job: false,
            })
            .collect()
    }

    /// Give back several slots of this set with one wake-up, so that a
    /// waiter takes them all at once rather than the first one alone.
    pub fn give_back(&self, slots: impl IntoIterator<Item = Slot>) {
        let (mut n, mut jobs) = (0, 0);
        for mut slot in slots {
            if let Some(owner) = slot.owner.take() {
                debug_assert!(std::ptr::eq(&*owner, self));
                n += 1;
                jobs += usize::from(slot.job);
            }
        }
        if n > 0 {
            self.put(n, jobs);
        }
    }

    fn put(&self, n: usize, jobs: usize) {
        let mut counts = lock(&self.counts);
        counts.free = (counts.free + n).min(self.capacity);
        counts.jobs = counts.jobs.saturating_sub(jobs);
        drop(counts);
        self.changed.notify_all();
    }

    /// Wait until no slot carries a job (slots a transport holds while it
    /// waits for work do not count); false if `deadline` came first.
    pub fn wait_no_jobs(&self, deadline: Instant) -> bool {
        let mut counts = lock(&self.counts);
        while counts.jobs > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            counts = self
                .changed
                .wait_timeout(counts, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Wake every waiter: a stop condition changed.
    pub fn wake(&self) {
        // Taking the lock orders this after a waiter's check of its
        // condition, so the notification cannot fall between check and wait.
        drop(lock(&self.counts));
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ANY: usize = usize::MAX;

    #[test]
    fn take_gets_all_free_and_dropping_gives_back() {
        let s = Slots::new(3);
        let all = s.take(Duration::ZERO, ANY);
        assert_eq!(all.len(), 3);
        assert!(s.take(Duration::from_millis(1), ANY).is_empty());
        let mut all = all;
        all.pop();
        assert_eq!(s.in_use(), 2);
        let one = s.take(Duration::ZERO, ANY);
        assert_eq!(one.len(), 1);
        drop(all);
        assert_eq!(s.in_use(), 1, "the slot taken above is still out");
        drop(one);
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn take_respects_most() {
        let s = Slots::new(4);
        assert_eq!(s.take(Duration::ZERO, 1).len(), 1);
        assert!(s.take(Duration::from_millis(1), 0).is_empty());
        assert_eq!(s.in_use(), 0, "slots of a dropped take came back");
    }

    #[test]
    fn give_back_returns_each_slot_once() {
        let s = Slots::new(3);
        let mut all = s.take(Duration::ZERO, ANY);
        let kept = all.pop();
        s.give_back(all);
        assert_eq!(s.in_use(), 1, "only the two given back are free");
        assert_eq!(s.take(Duration::ZERO, ANY).len(), 2, "none counted twice");
        drop(kept);
    }

    /// A waiter gets slots given back while it waits: without the wake-up
    /// it would return empty after its minute. (Should the slots come back
    /// before it began to wait, it takes them at once: the test then checks
    /// only that both came back together.)
    #[test]
    fn a_waiter_wakes_when_slots_come_back() {
        let s = Slots::new(2);
        let held = s.take(Duration::ZERO, ANY);
        let waiting = Arc::new(AtomicUsize::new(0));
        let (s2, w2) = (s.clone(), waiting.clone());
        let t = std::thread::spawn(move || {
            w2.store(1, Ordering::SeqCst);
            s2.take(Duration::from_secs(60), ANY).len()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while waiting.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "waiter never started");
            std::thread::yield_now();
        }
        s.give_back(held);
        assert_eq!(t.join().unwrap(), 2, "both slots came back at once");
    }

    #[test]
    fn wait_no_jobs_waits_for_slots_with_jobs_only() {
        let s = Slots::new(3);
        let mut held = s.take(Duration::ZERO, ANY);
        let waiting = held.pop().unwrap(); // a reader's, waiting for work
        let job = held.pop().unwrap().into_job();
        let other = held.pop().unwrap().into_job();
        assert_eq!(s.jobs(), 2);
        assert!(!s.wait_no_jobs(Instant::now() + Duration::from_millis(5)));
        drop(job);
        s.give_back([other]);
        assert_eq!(s.jobs(), 0);
        assert!(
            s.wait_no_jobs(Instant::now()),
            "the reader's slot is no job"
        );
        drop(waiting);
        assert_eq!(s.in_use(), 0);
    }
}
