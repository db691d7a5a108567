//! The entries this consumer holds, from the moment they are read until
//! Redis has taken their outcome (or they are given up). Their number is the
//! consumer's pending list as this process knows it: the reader takes no
//! more entries while it equals the handler count, and [`InFlight::remove`]
//! wakes it. Handler slots are not kept here: a finished job's handler is
//! free while its outcome still waits for Redis.

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

    pub fn insert(&self, e: Arc<Entry>) {
        lock(&self.map).insert((e.stream.clone(), e.id.clone()), e);
    }

    /// Forget an entry: its outcome landed, or it is not ours to settle.
    pub fn remove(&self, stream: &Arc<str>, id: &str) {
        if lock(&self.map)
            .remove(&(stream.clone(), id.to_owned()))
            .is_some()
        {
            // The reader may take another entry now.
            self.slots.wake();
        }
    }

    /// Forget the entries of a settled batch at once, waking the reader
    /// once: it then reads for all the slots they free in one call, not
    /// one entry per wake-up.
    pub fn remove_all<'a>(&self, done: impl IntoIterator<Item = &'a Entry>) {
        let mut map = lock(&self.map);
        let mut any = false;
        for e in done {
            any |= map.remove(&(e.stream.clone(), e.id.clone())).is_some();
        }
        drop(map);
        if any {
            self.slots.wake();
        }
    }

    pub fn contains(&self, stream: &Arc<str>, id: &str) -> bool {
        lock(&self.map).contains_key(&(stream.clone(), id.to_owned()))
    }

    pub fn get(&self, stream: &Arc<str>, id: &str) -> Option<Arc<Entry>> {
        lock(&self.map)
            .get(&(stream.clone(), id.to_owned()))
            .cloned()
    }

    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        lock(&self.map).values().cloned().collect()
    }
}
