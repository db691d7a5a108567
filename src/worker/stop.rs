//! Waking sleeping threads: a stop flag they can wait on (a stop wakes them
//! at once instead of after their backoff), and a doorbell (e.g. "a job
//! finished: poll again now").

use crate::sync::lock;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct StopFlag {
    set: Mutex<bool>,
    changed: Condvar,
}

impl StopFlag {
    pub fn set(&self) {
        *lock(&self.set) = true;
        self.changed.notify_all();
    }

    pub fn clear(&self) {
        *lock(&self.set) = false;
    }

    pub fn is_set(&self) -> bool {
        *lock(&self.set)
    }

    /// Sleep up to `d`; returns early (true) when the flag is set.
    pub fn sleep(&self, d: Duration) -> bool {
        let set = lock(&self.set);
        let (set, _) = self
            .changed
            .wait_timeout_while(set, d, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        *set
    }
}

/// A wake-up call that is remembered until taken: `ring` from any thread,
/// `wait` returns early (true) if it rang meanwhile.
#[derive(Default)]
pub struct Doorbell {
    rung: Mutex<bool>,
    changed: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        *lock(&self.rung) = true;
        self.changed.notify_all();
    }

    pub fn wait(&self, d: Duration) -> bool {
        let rung = lock(&self.rung);
        let (mut rung, _) = self
            .changed
            .wait_timeout_while(rung, d, |r| !*r)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *rung)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_remembered_once() {
        let bell = Doorbell::default();
        bell.ring();
        assert!(bell.wait(Duration::from_secs(5)));
        assert!(!bell.wait(Duration::from_millis(1)));
        let flag = StopFlag::default();
        assert!(!flag.sleep(Duration::from_millis(1)));
        flag.set();
        assert!(flag.sleep(Duration::from_secs(5)) && flag.is_set());
    }
}
