//! Deadlines: one thread that cancels a job's token when its `timeout_ms`
//! passes, so handlers need no timer of their own. It holds tokens weakly:
//! a job that ended drops its token, and the heap sheds such dead entries
//! whenever it has doubled since it last did, so memory follows the jobs
//! that run, not those that ran.

use super::cancel::{CancelReason, CancelToken};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Watchdog {
    tx: Sender<(Instant, Weak<CancelToken>)>,
}

impl Watchdog {
    pub fn start() -> Watchdog {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || run(rx))
            .expect("spawn deadline thread");
        Watchdog { tx }
    }

    /// Cancel `token` with [`CancelReason::Deadline`] at `at`, unless it is
    /// dropped first.
    pub fn arm(&self, at: Instant, token: &Arc<CancelToken>) {
        let _ = self.tx.send((at, Arc::downgrade(token)));
    }
}

struct Due(Instant, Weak<CancelToken>);
impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.cmp(&o.0)
    }
}

fn run(rx: Receiver<(Instant, Weak<CancelToken>)>) {
    let mut heap: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    let mut shed_at = 64;
    loop {
        if heap.len() >= shed_at {
            heap = shed(heap);
            shed_at = (heap.len() * 2).max(64);
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(d)| d.0 <= now) {
            if let Some(Reverse(Due(_, token))) = heap.pop() {
                if let Some(t) = token.upgrade() {
                    t.cancel(CancelReason::Deadline);
                }
            }
        }
        let wait = heap
            .peek()
            .map(|Reverse(d)| d.0.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok((at, token)) => heap.push(Reverse(Due(at, token))),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The heap without the deadlines of jobs that already ended.
fn shed(heap: BinaryHeap<Reverse<Due>>) -> BinaryHeap<Reverse<Due>> {
    heap.into_iter()
        .filter(|Reverse(d)| d.1.strong_count() > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_deadline_with_the_deadline_reason() {
        let w = Watchdog::start();
        let late = Arc::new(CancelToken::new());
        let soon = Arc::new(CancelToken::new());
        w.arm(Instant::now() + Duration::from_secs(3600), &late);
        w.arm(Instant::now() + Duration::from_millis(20), &soon);
        assert!(soon.wait(Duration::from_secs(10)));
        assert_eq!(soon.reason(), Some(CancelReason::Deadline));
        assert!(!late.is_cancelled());
    }

    #[test]
    fn deadlines_of_ended_jobs_are_shed() {
        let far = Instant::now() + Duration::from_secs(3600);
        let live = Arc::new(CancelToken::new());
        let mut heap = BinaryHeap::new();
        heap.push(Reverse(Due(far, Arc::downgrade(&live))));
        for _ in 0..1000 {
            let ended = Arc::new(CancelToken::new());
            heap.push(Reverse(Due(far, Arc::downgrade(&ended))));
        }
        let heap = shed(heap);
        assert_eq!(heap.len(), 1);
        assert!(heap.peek().unwrap().0 .1.upgrade().is_some());
    }
}
