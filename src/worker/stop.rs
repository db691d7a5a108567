//! A stop flag that sleeping threads can wait on, so a stop wakes them at
//! once instead of after their backoff.

use super::cancel::lock;
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
