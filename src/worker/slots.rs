//! Handler capacity, shared by every transport: a transport reserves slots
//! before it takes jobs and a slot is released when its job is settled. This
//! is the exact backpressure of ARCHITECTURE.md: no transport ever holds more
//! jobs than there are handler threads, and none takes a job while they are
//! all busy.

use crate::sync::lock;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct Slots {
    capacity: usize,
    free: Mutex<usize>,
    changed: Condvar,
}

impl Slots {
    pub fn new(capacity: usize) -> Self {
        Slots {
            capacity,
            free: Mutex::new(capacity),
            changed: Condvar::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_use(&self) -> usize {
        self.capacity - *lock(&self.free)
    }

    /// Reserve every free slot, waiting up to `timeout` for at least one;
    /// 0 when none came free.
    pub fn reserve_all(&self, timeout: Duration) -> usize {
        let free = lock(&self.free);
        let (mut free, _) = self
            .changed
            .wait_timeout_while(free, timeout, |f| *f == 0)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *free)
    }

    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut free = lock(&self.free);
        *free = (*free + n).min(self.capacity);
        drop(free);
        self.changed.notify_all();
    }

    /// Wait until every slot is free (all jobs settled); false if `deadline`
    /// came first.
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

    /// Wake every waiter (they re-check their stop conditions).
    pub fn wake(&self) {
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserve_takes_all_free_and_release_gives_back() {
        let s = Slots::new(3);
        assert_eq!(s.reserve_all(Duration::ZERO), 3);
        assert_eq!(s.reserve_all(Duration::from_millis(1)), 0);
        s.release(1);
        assert_eq!(s.in_use(), 2);
        assert_eq!(s.reserve_all(Duration::ZERO), 1);
        s.release(10);
        assert_eq!(s.in_use(), 0, "never more free than capacity");
    }

    #[test]
    fn waiters_wake_on_release() {
        let s = Arc::new(Slots::new(1));
        assert_eq!(s.reserve_all(Duration::ZERO), 1);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.reserve_all(Duration::from_secs(30)));
        s.release(1);
        assert_eq!(t.join().unwrap(), 1);
        assert!(!s.wait_idle(Instant::now() + Duration::from_millis(5)));
        s.release(1);
        assert!(s.wait_idle(Instant::now()));
    }
}
