//! Test-only: what another thread of this process is blocked on, read from
//! Linux's `/proc/self/task/TID/syscall` (the system call a sleeping thread
//! is in, and its arguments). Wake-up tests use it so that the signal comes
//! only once the other thread really waits: a signal that can come before
//! the wait makes a test that passes without testing the wake-up. A thread
//! in a condition variable wait sleeps in a futex call on that condvar's
//! address; one in a socket read sleeps in a call on the socket's fd.
//!
//! Nothing here is a timing guess: a call is only shown while the thread
//! sleeps in it (the kernel answers "running" otherwise).

use std::time::{Duration, Instant};

/// A thread of this process, as /proc names it.
#[derive(Debug, Clone)]
pub struct ThreadProbe {
    /// `/proc/self/task/TID`
    task: String,
}

impl ThreadProbe {
    /// The calling thread.
    pub fn current() -> ThreadProbe {
        let link = std::fs::read_link("/proc/thread-self")
            .unwrap_or_else(|e| panic!("reading /proc/thread-self (Linux only): {e}"));
        let tid = link
            .file_name()
            .and_then(|t| t.to_str())
            .unwrap_or_else(|| panic!("unexpected /proc/thread-self: {}", link.display()));
        ThreadProbe {
            task: format!("/proc/self/task/{tid}"),
        }
    }

    /// The first argument of the system call the thread sleeps in now; None
    /// while it runs, or sleeps outside a system call.
    pub fn blocked_on(&self) -> Option<u64> {
        let line = std::fs::read_to_string(format!("{}/syscall", self.task)).ok()?;
        let mut fields = line.split_whitespace();
        let nr: i64 = fields.next()?.parse().ok()?;
        if nr < 0 {
            return None;
        }
        u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()
    }

    /// Waits until the thread sleeps in a system call whose first argument
    /// satisfies `on`; panics with `what` after `timeout`.
    pub fn wait_blocked(&self, what: &str, timeout: Duration, on: impl Fn(u64) -> bool) {
        let deadline = Instant::now() + timeout;
        while !self.blocked_on().is_some_and(&on) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for the thread to block {what} \
                 (last seen: {:?})",
                std::fs::read_to_string(format!("{}/syscall", self.task))
            );
            std::thread::yield_now();
        }
    }
}

/// The address a futex call on `x` names (a condvar's or mutex's word).
pub fn address_of<T>(x: &T) -> u64 {
    x as *const T as usize as u64
}

/// Whether `fd` is a socket of this process.
pub fn is_socket(fd: u64) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
}
