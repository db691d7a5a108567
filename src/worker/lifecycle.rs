//! The life of a worker process, whatever the transport: start the handler
//! pool and the transport, wait for SIGTERM/SIGINT, then shut down in order:
//! stop taking jobs at once, give running jobs `--shutdown-grace` to finish
//! and be settled, and when the grace runs out (or a second signal comes)
//! abandon the rest to be delivered again elsewhere.

use super::exec::Executor;
use super::pool::{self, Task};
use super::slots::Slots;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(
    concurrency: usize,
    grace: Duration,
    exec: Arc<Executor>,
    signals: Receiver<()>,
    start: impl FnOnce(Sender<Task>, Arc<Slots>) -> Result<Box<dyn Transport>, String>,
) -> Result<(), String> {
    log::info!(
        "citadel {} starting {concurrency} handler threads",
        crate::events::AGENT_VERSION
    );
    let slots = Slots::new(concurrency);
    let (task_tx, task_rx) = crossbeam_channel::bounded(concurrency);
    let handlers = pool::start(concurrency, task_rx, exec);
    let mut transport = start(task_tx, slots.clone())?;

    let _ = signals.recv();
    transport.stop_reading();
    log::info!(
        "signal received: no new jobs are taken; waiting up to {grace:?} for {} running jobs",
        slots.in_use()
    );

    let deadline = Instant::now() + grace;
    let mut forced = false;
    while !slots.wait_idle(deadline.min(Instant::now() + Duration::from_millis(50))) {
        if signals.try_recv().is_ok() || Instant::now() >= deadline {
            forced = true;
            break;
        }
    }
    if forced {
        log::warn!(
            "stopping now: cancelling {} unfinished jobs; they are left to be delivered again",
            slots.in_use()
        );
        transport.abandon();
        if !slots.wait_idle(Instant::now() + Duration::from_secs(3)) {
            log::warn!("some handlers did not stop in time; exiting anyway");
        }
    }
    transport.finish(Instant::now() + Duration::from_secs(5));
    if !forced {
        for h in handlers {
            let _ = h.join();
        }
    }
    log::info!("stopped");
    Ok(())
}

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
