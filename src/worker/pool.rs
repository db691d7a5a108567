//! The fixed pool of handler threads. Each takes a [`Task`] from one
//! hand-off queue (`handoff`), runs it through the [`Executor`] and tells
//! the task's [`Report`] what happened, then gives back the task's
//! [`Slot`]. A panicking handler is caught in the executor, so a thread
//! outlives every job.

use super::cancel::CancelToken;
use super::exec::{Executor, Outcome};
use super::handoff;
use super::slots::Slot;
use crate::job::Job;
use crate::observe::metrics::METRICS;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a running job's progress goes; the transport implements it.
pub trait Report: Send {
    fn started(&mut self);
    fn chunk(&mut self, text: &str);
    fn finished(self: Box<Self>, outcome: Outcome);
}

pub struct Task {
    job: Job,
    token: Arc<CancelToken>,
    report: Box<dyn Report>,
    /// The handler thread this job was given; free again once the job's
    /// outcome is handed to its report. It counts as a running job from
    /// the moment the task is made (`Task::new`), queued or running.
    slot: Slot,
    /// When the job was enqueued (Unix ms: a stream entry id's time), for
    /// the pickup latency metric; `None` when the transport cannot tell.
    enqueued_ms: Option<u64>,
}

impl Task {
    pub fn new(
        job: Job,
        token: Arc<CancelToken>,
        report: Box<dyn Report>,
        slot: Slot,
        enqueued_ms: Option<u64>,
    ) -> Task {
        Task {
            job,
            token,
            report,
            slot: slot.into_job(),
            enqueued_ms,
        }
    }
}

/// What a transport hands tasks to; cloned for each thread that does.
pub type TaskSender = handoff::Sender<Task>;

pub fn start(n: usize, tasks: handoff::Receiver<Task>, exec: Arc<Executor>) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let tasks = tasks.clone();
            let exec = exec.clone();
            std::thread::Builder::new()
                .name(format!("handler-{i}"))
                .spawn(move || {
                    while let Some(task) = tasks.recv() {
                        run_task(&exec, task);
                    }
                })
                .expect("spawn handler thread")
        })
        .collect()
}

fn run_task(exec: &Executor, task: Task) {
    let Task {
        job,
        token,
        mut report,
        slot,
        enqueued_ms,
    } = task;
    let t0 = Instant::now();
    log::info!("job {} ({}) started", job.id, job.kind);
    report.started();
    exec.counters.started();
    let pickup =
        enqueued_ms.map(|at| Duration::from_millis(crate::clock::now_millis().saturating_sub(at)));
    METRICS.job_started(&job.kind, pickup);
    let mut first_chunk = None;
    let outcome = exec.execute(&job, &token, &mut |text| {
        if first_chunk.is_none() {
            first_chunk = Some(t0.elapsed());
        }
        report.chunk(text)
    });
    exec.counters.finished(&outcome);
    METRICS.job_finished(&job.kind, &outcome, t0.elapsed(), first_chunk);
    let ms = t0.elapsed().as_millis();
    match &outcome {
        Outcome::Failed { error, .. } => {
            log::warn!(
                "job {} ({}) {} in {ms}ms: {error}",
                job.id,
                job.kind,
                outcome.label()
            )
        }
        _ => log::info!(
            "job {} ({}) {} in {ms}ms",
            job.id,
            job.kind,
            outcome.label()
        ),
    }
    report.finished(outcome);
    drop(slot);
}
