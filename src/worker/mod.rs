//! The transport-independent engine: cancel tokens, deadlines, the handler
//! pool, running a job to its outcome, and the settle queue.

pub mod cancel;
pub mod exec;
pub mod lifecycle;
pub mod pool;
pub mod queue;
pub mod slots;
pub mod stop;
pub mod watchdog;
