//! A job's cancel token: set once, by whoever decides the job must stop
//! (a producer's cancel key, the job's deadline, a forced shutdown), and
//! watched by the handler, which may also register hooks (close a socket,
//! kill a child) that run at the moment of cancellation.

use crate::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A producer set `job:cancelled:{jobId}`.
    Requested,
    /// The payload's `timeout_ms` passed.
    Deadline,
    /// The worker is stopping and its grace period is over.
    Shutdown,
    /// Another worker owns the job now (its lease was lost): this run must
    /// end without an outcome.
    LeaseLost,
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct CancelToken {
    flag: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    reason: Option<CancelReason>,
    hooks: Vec<Hook>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel with `reason`; the first reason wins. Runs the hooks.
    pub fn cancel(&self, reason: CancelReason) {
        let hooks = {
            let mut st = lock(&self.state);
            if st.reason.is_some() {
                return;
            }
            st.reason = Some(reason);
            self.flag.store(true, Ordering::SeqCst);
            std::mem::take(&mut st.hooks)
        };
        self.changed.notify_all();
        for hook in hooks {
            hook();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<CancelReason> {
        lock(&self.state).reason
    }

    #[allow(dead_code)] // for handlers that block on I/O (engines, child processes)
    /// Run `hook` on cancellation (at once if already cancelled).
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        let mut st = lock(&self.state);
        if st.reason.is_some() {
            drop(st);
            hook();
        } else {
            st.hooks.push(Box::new(hook));
        }
    }

    /// Sleep up to `d`, waking early on cancellation; true if cancelled.
    pub fn wait(&self, d: Duration) -> bool {
        let st = lock(&self.state);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, d, |s| s.reason.is_none())
            .unwrap_or_else(|e| e.into_inner());
        st.reason.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thread_probe::{address_of, ThreadProbe};
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn first_reason_wins_and_hooks_run_once() {
        let t = CancelToken::new();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        t.on_cancel(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        t.cancel(CancelReason::Deadline);
        t.cancel(CancelReason::Requested);
        assert_eq!(t.reason(), Some(CancelReason::Deadline));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let h = hits.clone();
        t.on_cancel(move || {
            h.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hits.load(Ordering::SeqCst), 2, "late hook runs at once");
    }

    /// The waiter must be asleep in the wait before the cancel, or this would
    /// pass without testing the wake-up (a cancel that came first is seen by
    /// the wait's first check): the test cancels only once the waiter is seen
    /// sleeping on the token's condition variable.
    #[test]
    fn wait_wakes_on_cancel() {
        let t = Arc::new(CancelToken::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        let waiter = std::thread::spawn(move || {
            tx.send(ThreadProbe::current()).unwrap();
            let woke = t2.wait(Duration::from_secs(60));
            tx.send(ThreadProbe::current()).unwrap();
            woke
        });
        let probe = rx.recv().unwrap();
        let condvar = address_of(&t.changed);
        probe.wait_blocked("on the token's condvar", Duration::from_secs(30), |a| {
            a == condvar
        });
        let cancelled_at = Instant::now();
        t.cancel(CancelReason::Requested);
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the waiter did not wake up within 20 s of the cancel (its wait is 60 s)");
        assert!(cancelled_at.elapsed() < Duration::from_secs(20));
        assert!(waiter.join().unwrap(), "the wait must say it was cancelled");
        assert!(!CancelToken::new().wait(Duration::from_millis(1)));
    }
}
