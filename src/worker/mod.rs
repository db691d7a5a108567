//! The transport-independent engine: cancel tokens, deadlines, the handler
//! pool and the hand-off of tasks to it, running a job to its outcome, the
//! settle queue, and the counters of what was run.

pub mod cancel;
pub mod counters;
pub mod exec;
pub mod handoff;
pub mod lifecycle;
pub mod pool;
pub mod queue;
pub mod slots;
pub mod stop;
pub mod watchdog;
