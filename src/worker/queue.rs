//! The queue between job threads and the settle thread (after cargo's
//! `util/queue.rs`): control messages (`push`: acks, terminal events) never
//! block, so nothing deadlocks and an ack never waits for room; streamed chunks
//! (`push_bounded`) block while too many are queued, so a fast engine cannot
//! grow memory without bound. One FIFO keeps each job's events in order.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub struct SettleQueue<T> {
    state: Mutex<State<T>>,
    popper: Condvar,
    bounded_room: Condvar,
    bound: usize,
}

struct State<T> {
    items: VecDeque<(T, bool)>,
    bounded: usize,
}

impl<T> SettleQueue<T> {
    pub fn new(bound: usize) -> Self {
        SettleQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bounded: 0,
            }),
            popper: Condvar::new(),
            bounded_room: Condvar::new(),
            bound: bound.max(1),
        }
    }

    /// Never blocks.
    pub fn push(&self, item: T) {
        lock(&self.state).items.push_back((item, false));
        self.popper.notify_one();
    }

    /// Never blocks; the items go in together, so a consumer woken by the
    /// first finds them all.
    pub fn push_all(&self, items: impl IntoIterator<Item = T>) {
        lock(&self.state)
            .items
            .extend(items.into_iter().map(|item| (item, false)));
        self.popper.notify_one();
    }

    /// Blocks while `bound` bounded items are already queued.
    #[cfg(test)]
    pub fn push_bounded(&self, item: T) {
        self.push_bounded_unless(item, || false);
    }

    /// Blocks while `bound` bounded items are already queued, unless (or
    /// until) `give_up()` says the consumer cannot take them now: then the
    /// item is dropped and false returned. `give_up` is asked before
    /// waiting and every 50 ms while waiting.
    pub fn push_bounded_unless(&self, item: T, give_up: impl Fn() -> bool) -> bool {
        if give_up() {
            return false;
        }
        let mut st = lock(&self.state);
        while st.bounded >= self.bound {
            st = self
                .bounded_room
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.bounded >= self.bound && give_up() {
                return false;
            }
        }
        st.bounded += 1;
        st.items.push_back((item, true));
        drop(st);
        self.popper.notify_one();
        true
    }

    /// Up to `max` items in order, waiting up to `timeout` for the first.
    pub fn pop_batch(&self, max: usize, timeout: Duration) -> Vec<T> {
        let st = lock(&self.state);
        let (mut st, _) = self
            .popper
            .wait_timeout_while(st, timeout, |s| s.items.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        let n = st.items.len().min(max);
        let mut out = Vec::with_capacity(n);
        let mut freed = 0;
        for (item, bounded) in st.items.drain(..n) {
            freed += usize::from(bounded);
            out.push(item);
        }
        st.bounded -= freed;
        drop(st);
        if freed > 0 {
            self.bounded_room.notify_all();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keeps_order_across_bounded_and_unbounded_pushes() {
        let q = SettleQueue::new(10);
        q.push(1);
        q.push_bounded(2);
        q.push(3);
        assert_eq!(q.pop_batch(2, Duration::ZERO), vec![1, 2]);
        assert_eq!(q.pop_batch(10, Duration::ZERO), vec![3]);
        assert!(q.pop_batch(10, Duration::from_millis(1)).is_empty());
    }

    #[test]
    fn bounded_push_waits_for_room_but_push_never_does() {
        let q = Arc::new(SettleQueue::new(1));
        q.push_bounded(1);
        q.push(2); // control traffic passes a full queue
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.push_bounded(3));
        assert_eq!(q.pop_batch(10, Duration::from_secs(5)), vec![1, 2]);
        t.join().unwrap();
        assert_eq!(q.pop_batch(10, Duration::from_secs(5)), vec![3]);
    }

    #[test]
    fn a_bounded_push_gives_up_when_told_even_while_waiting() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let q = Arc::new(SettleQueue::new(1));
        assert!(q.push_bounded_unless(1, || false));
        assert!(!q.push_bounded_unless(2, || true), "dropped at once");
        let (stop, asked) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (q2, s2, a2) = (q.clone(), stop.clone(), asked.clone());
        let t = std::thread::spawn(move || {
            q2.push_bounded_unless(3, || {
                a2.fetch_add(1, Ordering::SeqCst);
                s2.load(Ordering::SeqCst)
            })
        });
        // Asked twice: once before waiting, once from inside the wait.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while asked.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the push never waited"
            );
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        assert!(!t.join().unwrap(), "a waiting push gives up");
        assert_eq!(q.pop_batch(10, Duration::ZERO), vec![1]);
    }
}
