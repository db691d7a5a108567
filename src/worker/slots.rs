//! Handler capacity, shared by every transport, and its one owner: a
//! transport takes [`Slot`]s before it takes jobs (never more than there are
//! idle handler threads, the exact backpressure of ARCHITECTURE.md), hands
//! each to the pool with its job, and the pool gives it back when the handler
//! returns. A slot is a value that frees itself on drop, so no code path can
//! forget to release one or release one twice.
//!
//! A transport that also owes its far end a bound (the Redis consumer holds
//! no more pending entries than it has handlers) passes that bound as the
//! `limit` of [`Slots::take`]; whoever lowers the bound calls [`Slots::wake`].

use crate::sync::lock;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct Slots {
    capacity: usize,
    free: Mutex<usize>,
    changed: Condvar,
}

/// One handler thread's worth of capacity; given back when dropped.
#[must_use]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let s = &self.0;
        let mut free = lock(&s.free);
        *free = (*free + 1).min(s.capacity);
        drop(free);
        s.changed.notify_all();
    }
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Slots {
            capacity,
            free: Mutex::new(capacity),
            changed: Condvar::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_use(&self) -> usize {
        self.capacity - *lock(&self.free)
    }

    /// Take every free slot, but no more than `limit()` (asked again on every
    /// wake-up), waiting up to `timeout` for at least one. Empty when none
    /// came free in time.
    pub fn take(self: &Arc<Self>, timeout: Duration, limit: impl Fn() -> usize) -> Vec<Slot> {
        let free = lock(&self.free);
        let (mut free, _) = self
            .changed
            .wait_timeout_while(free, timeout, |f| (*f).min(limit()) == 0)
            .unwrap_or_else(|e| e.into_inner());
        let n = (*free).min(limit());
        *free -= n;
        drop(free);
        (0..n).map(|_| Slot(self.clone())).collect()
    }

    /// Wait until every slot is free (every handler idle); false if
    /// `deadline` came first.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut free = lock(&self.free);
        while *free < self.capacity {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            free = self
                .changed
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Wake every waiter: a stop condition or a `limit` changed.
    pub fn wake(&self) {
        // Taking the lock orders this after a waiter's check of its
        // condition, so the notification cannot fall between check and wait.
        drop(lock(&self.free));
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ANY: fn() -> usize = || usize::MAX;

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
    fn take_respects_the_limit() {
        let s = Slots::new(4);
        assert_eq!(s.take(Duration::ZERO, || 1).len(), 1);
        assert!(s.take(Duration::from_millis(1), || 0).is_empty());
        assert_eq!(s.in_use(), 0, "slots of a dropped take came back");
    }

    /// The waiter must be waiting before the wake-up, or this would pass
    /// without testing the wake: the waiter announces each check of its
    /// limit, and the releasing thread acts only after the first one.
    #[test]
    fn a_waiter_wakes_when_a_slot_comes_back_or_its_limit_rises() {
        let s = Slots::new(1);
        let held = s.take(Duration::ZERO, ANY);
        let checks = Arc::new(AtomicUsize::new(0));
        let limit = Arc::new(AtomicUsize::new(0));
        let (s2, c2, l2) = (s.clone(), checks.clone(), limit.clone());
        let t = std::thread::spawn(move || {
            s2.take(Duration::from_secs(60), || {
                c2.fetch_add(1, Ordering::SeqCst);
                l2.load(Ordering::SeqCst)
            })
            .len()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while checks.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "waiter never checked");
            std::thread::yield_now();
        }
        drop(held); // a slot is free, but the limit is still 0
        limit.store(1, Ordering::SeqCst);
        s.wake();
        assert_eq!(t.join().unwrap(), 1);
    }

    #[test]
    fn wait_idle_waits_for_every_slot() {
        let s = Slots::new(2);
        let held = s.take(Duration::ZERO, ANY);
        assert!(!s.wait_idle(Instant::now() + Duration::from_millis(5)));
        drop(held);
        assert!(s.wait_idle(Instant::now()));
    }
}
