//! The hand-off of tasks from transports to the handler threads: one FIFO
//! under a mutex, whose idle receivers sleep on a condition variable and are
//! woken one per item. Not a crossbeam channel: its receivers spin and then
//! `sched_yield` before they sleep, and with dozens of idle handler threads
//! on a few cores that spinning was a third of the agent's CPU in a
//! burn-down (they yield to one another). Here a receiver that finds
//! nothing sleeps at once; one that finishes a job while more are queued
//! takes the next without sleeping.
//!
//! Unbounded: what is queued is bounded by the handler slots a transport
//! must take before it makes a task (`worker::slots`). It closes when the
//! last sender is dropped: receivers then take what is still queued and
//! then get `None`. A send once every receiver is gone gives the item back.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
}

pub struct Sender<T>(Arc<Shared<T>>);

pub struct Receiver<T>(Arc<Shared<T>>);

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receivers: 1,
        }),
        ready: Condvar::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Never blocks. `Err(item)` when no receiver is left.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut st = lock(&self.0.state);
        if st.receivers == 0 {
            return Err(item);
        }
        st.items.push_back(item);
        drop(st);
        self.0.ready.notify_one();
        Ok(())
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once every sender is gone and
    /// nothing is queued.
    pub fn recv(&self) -> Option<T> {
        let mut st = lock(&self.0.state);
        loop {
            if let Some(item) = st.items.pop_front() {
                return Some(item);
            }
            if st.senders == 0 {
                return None;
            }
            st = self.0.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        lock(&self.0.state).senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        lock(&self.0.state).receivers += 1;
        Receiver(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.senders -= 1;
        let last = st.senders == 0;
        drop(st);
        if last {
            self.0.ready.notify_all();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        lock(&self.0.state).receivers -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn items_come_out_once_each_in_order_then_none_after_the_last_sender() {
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        for i in 0..3 {
            tx.send(i).unwrap();
        }
        drop(tx);
        tx2.send(3).unwrap();
        drop(tx2);
        let got: Vec<i32> = std::iter::from_fn(|| rx.recv()).collect();
        assert_eq!(got, [0, 1, 2, 3], "what was queued is taken after close");
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn a_send_with_no_receiver_left_gives_the_item_back() {
        let (tx, rx) = channel();
        let rx2 = rx.clone();
        drop(rx);
        assert_eq!(tx.send(1), Ok(()), "one receiver is still there");
        drop(rx2);
        assert_eq!(tx.send(2), Err(2));
    }

    /// Receivers asleep on an empty queue wake for each item, and all of
    /// them wake and end when the last sender goes: without the wake-ups
    /// they would sleep on and the deadlines below run out.
    #[test]
    fn sleeping_receivers_wake_for_items_and_for_the_close() {
        let (tx, rx) = channel::<usize>();
        let taken = Arc::new(AtomicUsize::new(0));
        let waiting = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rx = rx.clone();
                let (taken, waiting, ended) = (taken.clone(), waiting.clone(), ended.clone());
                std::thread::spawn(move || {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let mut sum = 0;
                    while let Some(n) = rx.recv() {
                        sum += n;
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                    sum
                })
            })
            .collect();
        drop(rx);
        let deadline = Instant::now() + Duration::from_secs(30);
        while waiting.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "receivers never started");
            std::thread::yield_now();
        }
        for n in 1..=100 {
            tx.send(n).unwrap();
        }
        while taken.load(Ordering::SeqCst) < 100 {
            assert!(Instant::now() < deadline, "not every item was taken");
            std::thread::yield_now();
        }
        drop(tx);
        while ended.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "receivers did not end on close");
            std::thread::yield_now();
        }
        let sum: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sum, 5050, "each item taken exactly once");
    }
}
