//! Handler capacity, shared by every transport, and its one owner: a
//! transport takes [`Slot`]s before it takes jobs (never more than there are
//! idle handler threads, the exact backpressure of ARCHITECTURE.md), hands
//! each to the pool with its job, and the pool gives it back when the handler
//! returns. A slot is a value that frees itself on drop, so no code path can
//! forget to release one or release one twice.
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
    free: Mutex<usize>,
    changed: Condvar,
}

/// One handler thread's worth of capacity; given back when dropped. `None`
/// only once [`Slots::give_back`] gave it back.
#[must_use]
pub struct Slot(Option<Arc<Slots>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.put(1);
        }
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

    /// Take every free slot, but no more than `most`, waiting up to
    /// `timeout` for at least one. Empty when none came free in time.
    pub fn take(self: &Arc<Self>, timeout: Duration, most: usize) -> Vec<Slot> {
        if most == 0 {
            return Vec::new();
        }
        let free = lock(&self.free);
        let (mut free, _) = self
            .changed
            .wait_timeout_while(free, timeout, |f| *f == 0)
            .unwrap_or_else(|e| e.into_inner());
        let n = (*free).min(most);
        *free -= n;
        drop(free);
        (0..n).map(|_| Slot(Some(self.clone()))).collect()
    }

    /// Give back several slots of this set with one wake-up, so that a
    /// waiter takes them all at once rather than the first one alone.
    pub fn give_back(&self, slots: impl IntoIterator<Item = Slot>) {
        let n = slots
            .into_iter()
            .filter_map(|mut s| s.0.take())
            .inspect(|owner| debug_assert!(std::ptr::eq(&**owner, self)))
            .count();
        if n > 0 {
            self.put(n);
        }
    }

    fn put(&self, n: usize) {
        let mut free = lock(&self.free);
        *free = (*free + n).min(self.capacity);
        drop(free);
        self.changed.notify_all();
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

    /// Wake every waiter: a stop condition changed.
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
        let all = s.take(Duration::ZERO, ANY);
        s.give_back(all);
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.take(Duration::ZERO, ANY).len(), 3, "none counted twice");
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
    fn wait_idle_waits_for_every_slot() {
        let s = Slots::new(2);
        let held = s.take(Duration::ZERO, ANY);
        assert!(!s.wait_idle(Instant::now() + Duration::from_millis(5)));
        drop(held);
        assert!(s.wait_idle(Instant::now()));
    }
}
