//! The entries this worker holds, from the moment they are read until Redis
//! has acknowledged their outcome (or they are given up). Each holds one of
//! the engine's [`Slots`], released when the entry leaves: a slot frees only
//! after the ack, so the consumer never has more pending entries than it has
//! handler threads.

use super::entry::Entry;
use crate::sync::lock;
use crate::worker::slots::Slots;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Key = (Arc<str>, String);

pub struct InFlight {
    slots: Arc<Slots>,
    map: Mutex<HashMap<Key, Arc<Entry>>>,
}

impl InFlight {
    pub fn new(slots: Arc<Slots>) -> Self {
        InFlight {
            slots,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Track an entry; its slot was reserved by the reader.
    pub fn insert(&self, e: Arc<Entry>) {
        lock(&self.map).insert((e.stream.clone(), e.id.clone()), e);
    }

    /// Forget an entry and release its slot.
    pub fn remove(&self, stream: &Arc<str>, id: &str) {
        if lock(&self.map)
            .remove(&(stream.clone(), id.to_owned()))
            .is_some()
        {
            // The reader may take another entry now.
            self.slots.wake();
        }
    }

    pub fn contains(&self, stream: &Arc<str>, id: &str) -> bool {
        lock(&self.map).contains_key(&(stream.clone(), id.to_owned()))
    }

    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        lock(&self.map).values().cloned().collect()
    }
}
