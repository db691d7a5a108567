//! Transports: how jobs arrive and how their outcomes leave. Each feeds the
//! shared handler pool, holding one of its slots per job it has taken.

pub mod redis_streams;

use std::time::Instant;

/// What the lifecycle (signals, shutdown) needs from a running transport.
pub trait Transport: Send {
    /// Take no new jobs; returns once no read is in progress.
    fn stop_reading(&mut self);
    /// The grace period is over: cancel what still runs. Those jobs are not
    /// settled, so their transport can deliver them again.
    fn abandon(&self);
    /// Settle what has finished (giving up at `hard_deadline` if the far end
    /// is unreachable) and stop the transport's threads.
    fn finish(self: Box<Self>, hard_deadline: Instant);
}
