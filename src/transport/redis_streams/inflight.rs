//! The entries this worker holds, from the moment they are read until Redis
//! has acknowledged their outcome (or they are given up). Its size is the
//! exact backpressure: the reader asks for no more entries than
//! `capacity - len`, so the consumer never has more pending entries than it
//! has handler threads.

use super::entry::Entry;
use crate::worker::cancel::lock;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Key = (Arc<str>, String);

pub struct InFlight {
    capacity: usize,
    map: Mutex<HashMap<Key, Arc<Entry>>>,
    changed: Condvar,
}

impl InFlight {
    pub fn new(capacity: usize) -> Self {
        InFlight {
            capacity,
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Free slots, waiting up to `timeout` for one if there are none.
    pub fn wait_free(&self, timeout: Duration) -> usize {
        let map = lock(&self.map);
        let (map, _) = self
            .changed
            .wait_timeout_while(map, timeout, |m| m.len() >= self.capacity)
            .unwrap_or_else(|e| e.into_inner());
        self.capacity.saturating_sub(map.len())
    }

    /// Wait until nothing is held; false if `deadline` came first.
    pub fn wait_empty(&self, deadline: Instant) -> bool {
        let mut map = lock(&self.map);
        while !map.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            map = self
                .changed
                .wait_timeout(map, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Wake everyone waiting (used on shutdown).
    pub fn wake(&self) {
        self.changed.notify_all();
    }

    pub fn insert(&self, e: Arc<Entry>) {
        lock(&self.map).insert((e.stream.clone(), e.id.clone()), e);
    }

    pub fn remove(&self, stream: &Arc<str>, id: &str) {
        lock(&self.map).remove(&(stream.clone(), id.to_owned()));
        self.changed.notify_all();
    }

    pub fn contains(&self, stream: &Arc<str>, id: &str) -> bool {
        lock(&self.map).contains_key(&(stream.clone(), id.to_owned()))
    }

    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        lock(&self.map).values().cloned().collect()
    }
}
