//! The life of a worker process, whatever the transport: start the handler
//! pool and the transport, wait for SIGTERM/SIGINT (or a transport's fatal
//! error, [`stop_with_error`]), then shut down in order: stop taking jobs at
//! once, give running jobs `--shutdown-grace` to finish and be settled, and
//! when the grace runs out (or a second signal comes) abandon the rest to be
//! delivered again elsewhere. The process exits at most [`SETTLE_AFTER_GRACE`]
//! after the grace, whatever its transport's far end does.

use super::exec::Executor;
use super::pool::{self, TaskSender};
use super::slots::Slots;
use crate::admin::Exit;
use crate::sync::lock;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after the grace period the transport may still spend settling
/// (and handlers stopping) before the process exits anyway.
pub const SETTLE_AFTER_GRACE: Duration = Duration::from_millis(1500);

static FATAL: Mutex<Option<Sender<String>>> = Mutex::new(None);

/// A transport found that this process must not go on (e.g. its consumer
/// name is in use by a live worker): shut down as on SIGTERM, then exit 2
/// with `msg`.
pub fn stop_with_error(msg: String) {
    if let Some(tx) = lock(&FATAL).as_ref() {
        let _ = tx.send(msg);
    }
}

pub fn run(
    concurrency: usize,
    grace: Duration,
    exec: Arc<Executor>,
    signals: Receiver<()>,
    start: impl FnOnce(TaskSender, Arc<Slots>) -> Result<Box<dyn Transport>, String>,
) -> Result<(), Exit> {
    log::info!(
        "citadel {} starting {concurrency} handler threads",
        crate::events::AGENT_VERSION
    );
    let (fatal_tx, fatal) = crossbeam_channel::unbounded();
    *lock(&FATAL) = Some(fatal_tx);
    let slots = Slots::new(concurrency);
    crate::observe::metrics::METRICS.set_capacity(concurrency);
    let (task_tx, task_rx) = super::handoff::channel();
    let handlers = pool::start(concurrency, task_rx, exec);
    let mut transport = start(task_tx, slots.clone()).map_err(|e| Exit(1, e))?;

    let failure = crossbeam_channel::select! {
        recv(signals) -> _ => None,
        recv(fatal) -> msg => msg.ok(),
    };
    // The grace counts from the signal, whatever stopping the reads takes.
    let deadline = Instant::now() + grace;
    transport.stop_reading();
    match &failure {
        Some(msg) => log::error!("{msg}; stopping"),
        None => log::info!(
            "signal received: no new jobs are taken; waiting up to {grace:?} for {} running jobs",
            slots.jobs()
        ),
    }

    let hard = deadline + SETTLE_AFTER_GRACE;
    let mut forced = false;
    while !slots.wait_no_jobs(deadline.min(Instant::now() + Duration::from_millis(50))) {
        if signals.try_recv().is_ok() || Instant::now() >= deadline {
            forced = true;
            break;
        }
    }
    if forced {
        log::warn!(
            "stopping now: cancelling {} unfinished jobs; they are left to be delivered again",
            slots.jobs()
        );
        transport.abandon();
        let handlers_by = Instant::now() + SETTLE_AFTER_GRACE / 2;
        if !slots.wait_no_jobs(handlers_by.min(hard)) {
            log::warn!("some handlers did not stop in time; exiting anyway");
        }
    }
    transport.finish(hard.max(Instant::now() + Duration::from_millis(200)));
    // The handler threads are not joined: with no job left they only wait
    // for a task channel that a reader still stuck in Redis keeps open (it
    // takes nothing after the stop), and with jobs abandoned they are
    // cancelled and left.
    drop(handlers);
    log::info!("stopped");
    match failure {
        Some(msg) => Err(Exit(2, msg)),
        None => Ok(()),
    }
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
