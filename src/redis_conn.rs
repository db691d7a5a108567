//! The one Redis connection helper: timeouts on every socket, a test for
//! "this error means the connection is gone", and outage bookkeeping that logs
//! once when Redis goes away and once when it is back.

use crate::backoff::Backoff;
use redis::{Client, Connection, RedisError, RedisResult};
use std::time::{Duration, Instant};

/// Open a connection with a connect timeout and read/write timeouts.
/// `read_timeout` must exceed any BLOCK this connection will be used for.
pub fn connect(url: &str, timeout: Duration, read_timeout: Duration) -> RedisResult<Connection> {
    let client = Client::open(url)?;
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// True when the connection cannot be used any more (or the server is not
/// ready): drop it and reconnect. False for a command's own error.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN"))
}

/// Tracks one connection's outage so that it is logged once, with the
/// backoff to wait before the next try.
pub struct Outage {
    what: &'static str,
    since: Option<Instant>,
    backoff: Backoff,
}

impl Outage {
    pub fn new(what: &'static str) -> Self {
        Outage {
            what,
            since: None,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(30)),
        }
    }

    /// Record a failure; returns how long to wait before trying again.
    pub fn failed(&mut self, err: &dyn std::fmt::Display) -> Duration {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            log::warn!(
                "{}: Redis unreachable ({err}); retrying with backoff",
                self.what
            );
        } else {
            log::debug!("{}: Redis still unreachable ({err})", self.what);
        }
        self.backoff.next_delay()
    }

    pub fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            log::info!(
                "{}: Redis connection restored after {:.1}s",
                self.what,
                since.elapsed().as_secs_f64()
            );
        }
        self.backoff.reset();
    }
}
