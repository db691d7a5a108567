//! The entries this consumer holds, from the moment they are read until
//! Redis has taken their outcome (or they are given up), and the bound on
//! them: the consumer's pending list as this process knows it never holds
//! more than [`PLACES_PER_HANDLER`] entries per handler. Each entry holds
//! one place; the reader takes a place with each handler slot ([`Room`])
//! before it reads, and [`InFlight::remove`] gives the place back. A
//! finished job's handler is free while its outcome still waits for Redis;
//! its place is not. So at most one entry per handler is read and not yet
//! finished (the handler slot bounds those), and the others are finished
//! jobs whose outcomes are on their way to Redis: a handler can start its
//! next job while its last one settles, instead of waiting for that round
//! trip. Counting places, not entries, keeps the bound when several readers
//! (one per cluster slot) read at once: a place a reader holds while it
//! waits for Redis counts for the others.

use super::entry::Entry;
use crate::sync::lock;
use crate::worker::slots::{Slot, Slots};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Key = (Arc<str>, String);

/// Places in the pending list per handler: one for the job it runs, one
/// for the job it finished whose outcome Redis has not taken yet. With one
/// (the bound before), a handler at low concurrency idled for every
/// settle round trip: `--concurrency 8` burned down 25 % fewer jobs/s.
pub const PLACES_PER_HANDLER: usize = 2;

pub struct InFlight {
    places: Arc<Slots>,
    map: Mutex<HashMap<Key, (Arc<Entry>, Slot)>>,
}

/// Room for one entry: a place in the pending list and a handler slot.
pub struct Room {
    pub place: Slot,
    pub handler: Slot,
}

impl InFlight {
    pub fn new(handlers: usize) -> Self {
        InFlight {
            places: Slots::new(handlers * PLACES_PER_HANDLER),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Room for as many entries as there are both free places and free
    /// handler slots, waiting up to `timeout` for each; empty if none.
    pub fn room(&self, handlers: &Arc<Slots>, timeout: Duration) -> Vec<Room> {
        let places = self.places.take(timeout, usize::MAX);
        let slots = handlers.take(timeout, places.len());
        places
            .into_iter()
            .zip(slots)
            .map(|(place, handler)| Room { place, handler })
            .collect()
    }

    /// Wake a reader waiting for room: it is told to stop.
    pub fn wake(&self) {
        self.places.wake();
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Hold `e` in the place it took.
    pub fn insert(&self, e: Arc<Entry>, place: Slot) {
        let old = lock(&self.map).insert((e.stream.clone(), e.id.clone()), (e, place));
        drop(old);
    }

    /// Forget an entry: its outcome landed, or it is not ours to settle.
    /// Its place is free again (the reader may take another entry now).
    pub fn remove(&self, stream: &Arc<str>, id: &str) {
        let gone = lock(&self.map).remove(&(stream.clone(), id.to_owned()));
        drop(gone);
    }

    /// Forget the entries of a settled batch at once, their places given
    /// back together: a waiting reader then reads for all of them in one
    /// call, not one entry per wake-up.
    pub fn remove_all<'a>(&self, done: impl IntoIterator<Item = &'a Entry>) {
        let mut map = lock(&self.map);
        let places: Vec<Slot> = done
            .into_iter()
            .filter_map(|e| map.remove(&(e.stream.clone(), e.id.clone())))
            .map(|(_, place)| place)
            .collect();
        drop(map);
        self.places.give_back(places);
    }

    pub fn contains(&self, stream: &Arc<str>, id: &str) -> bool {
        lock(&self.map).contains_key(&(stream.clone(), id.to_owned()))
    }

    pub fn get(&self, stream: &Arc<str>, id: &str) -> Option<Arc<Entry>> {
        lock(&self.map)
            .get(&(stream.clone(), id.to_owned()))
            .map(|(e, _)| e.clone())
    }

    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        lock(&self.map).values().map(|(e, _)| e.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::redis_streams::entry::RawEntry;

    fn entry(id: &str) -> Arc<Entry> {
        let raw = RawEntry {
            id: id.into(),
            fields: None,
        };
        Arc::new(Entry::new("jobs:v1:q".into(), raw, 1))
    }

    /// Two handlers, four places. Two finished jobs wait for Redis (their
    /// handlers free), and a reader holds the other two rooms while it
    /// waits for Redis. Another reader must find no room: every place is
    /// taken, though both handler slots are free once those two finish.
    #[test]
    fn room_held_by_a_reader_and_unsettled_entries_count_for_every_reader() {
        let handlers = Slots::new(2);
        let inflight = InFlight::new(2);
        let finish = |rooms: Vec<Room>, ids: [&str; 2]| {
            rooms
                .into_iter()
                .zip(ids)
                .map(|(Room { place, handler }, id)| {
                    let e = entry(id);
                    inflight.insert(e.clone(), place);
                    drop(handler); // the job returned; its outcome waits
                    e
                })
                .collect::<Vec<_>>()
        };
        let first = inflight.room(&handlers, Duration::ZERO);
        assert_eq!(first.len(), 2, "no more rooms than handlers");
        let done = finish(first, ["1-0", "2-0"]);
        let held = inflight.room(&handlers, Duration::ZERO);
        assert_eq!(held.len(), 2, "finished jobs' handlers take new ones");
        assert!(
            inflight
                .room(&handlers, Duration::from_millis(1))
                .is_empty(),
            "the reader holds both handlers"
        );
        let also = finish(held, ["3-0", "4-0"]);
        assert_eq!(handlers.in_use(), 0);
        assert!(
            inflight
                .room(&handlers, Duration::from_millis(1))
                .is_empty(),
            "a fifth entry would be pending for two handlers"
        );
        inflight.remove_all(done.iter().map(|e| &**e));
        let again = inflight.room(&handlers, Duration::ZERO);
        assert_eq!(again.len(), 2, "the settled entries' places came back");
        drop(again);
        inflight.remove_all(also.iter().map(|e| &**e));
        assert_eq!(inflight.len(), 0);
    }

    #[test]
    fn removing_an_entry_twice_gives_its_place_back_once() {
        // One handler's two places, and handler slots to spare: the places
        // bound the rooms.
        let handlers = Slots::new(4);
        let inflight = InFlight::new(1);
        let e = entry("1-0");
        let mut rooms = inflight.room(&handlers, Duration::ZERO);
        let Room { place, handler } = rooms.pop().unwrap();
        inflight.insert(e.clone(), place);
        drop(handler);
        inflight.remove(&e.stream, &e.id);
        inflight.remove(&e.stream, &e.id);
        inflight.remove_all([&*e]);
        assert_eq!(inflight.len(), 0);
        assert_eq!(
            inflight.room(&handlers, Duration::ZERO).len(),
            1,
            "the other room is still held"
        );
        drop(rooms);
    }
}
