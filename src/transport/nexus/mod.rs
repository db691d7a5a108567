//! Nexus HTTP polling (`citadel work --mode nexus`, PROTOCOL.md §3).
//!
//! Threads: one poller, which asks `GET /api/v1/jobs/next` only while a
//! handler slot is free and the report spool has room (every
//! `--poll-interval` with jitter, and at once after a job finishes), and one
//! reporter (`reporter.rs`), which delivers each job's `SUCCESS`/`FAILURE`
//! report from the spool (`spool.rs`) until Nexus accepts it.
//!
//! Nexus has no leases: a job abandoned at shutdown is reported as failed,
//! and so is a job that arrives from a poll still in flight when the agent
//! is told to stop (`not run: the agent was stopping`), so that the control
//! plane can give it to another node. Shutdown never waits longer than the
//! deadline it is given: a poll in flight is not waited for at the signal,
//! and is cut off when the grace is over.

pub mod client;
mod reporter;
pub mod spool;

use crate::backoff::{random_unit, Outage};
use crate::config::Settings;
use crate::job::Job;
use crate::observe::{alive, metrics::METRICS};
use crate::sync::lock;
use crate::worker::cancel::{CancelReason, CancelToken};
use crate::worker::exec::{Executor, Outcome};
use crate::worker::lifecycle::Transport;
use crate::worker::pool::{Report as PoolReport, Task, TaskSender};
use crate::worker::slots::{Slot, Slots};
use crate::worker::stop::Doorbell;
use client::{parse_job, NexusClient, NexusError};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use reporter::Reporter;
use spool::{Report, Spool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output kept per job; past it the rest is dropped and the cut marked.
const MAX_OUTPUT: usize = 1 << 20;

/// Whether the poller takes jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Polling,
    /// Adaptive mode is on Redis: no polls; a job from a poll in flight runs.
    Paused,
    /// Shutdown: no polls; a job from a poll in flight is reported, not run.
    Stopping,
}

struct NexusState {
    settings: Settings,
    /// The poller's own client, so that a poll can be cut off alone.
    client: NexusClient,
    exec: Arc<Executor>,
    slots: Arc<Slots>,
    reporter: Arc<Reporter>,
    reading: Mutex<Reading>,
    /// Rung when a job finishes (poll again now), when a report leaves the
    /// spool (room), and when `reading` changes.
    bell: Arc<Doorbell>,
    running: Mutex<HashMap<String, Arc<CancelToken>>>,
}

pub struct NexusPolling {
    shared: Arc<NexusState>,
    poller: Option<Thread>,
    reporter: Option<Thread>,
}

impl NexusPolling {
    pub fn start(
        settings: Settings,
        url: &str,
        exec: Arc<Executor>,
        tasks: TaskSender,
        slots: Arc<Slots>,
    ) -> Result<Self, String> {
        let (spool, left_over) = Spool::open(&settings.state_dir)?;
        let bell = Arc::new(Doorbell::default());
        let reporter = Arc::new(Reporter::new(
            NexusClient::new(&settings, url),
            spool,
            left_over,
            &settings,
            bell.clone(),
        ));
        let reporter_thread = Thread::spawn("nexus-report", {
            let r = reporter.clone();
            move || r.run()
        });
        let shared = Arc::new(NexusState {
            client: NexusClient::new(&settings, url),
            settings,
            exec,
            slots,
            reporter,
            reading: Mutex::new(Reading::Polling),
            bell,
            running: Mutex::new(HashMap::new()),
        });
        let poller = Thread::spawn("nexus-poll", {
            let s = shared.clone();
            move || poll(&s, &tasks)
        });
        Ok(NexusPolling {
            shared,
            poller: Some(poller),
            reporter: Some(reporter_thread),
        })
    }

    /// Stop taking jobs for a while (adaptive mode switched to Redis). A
    /// job from a poll in flight still runs: it holds a handler slot.
    pub fn pause_reading(&mut self) {
        self.set_reading(Reading::Paused);
    }

    /// Take jobs from Nexus again.
    pub fn resume_reading(&mut self) {
        self.set_reading(Reading::Polling);
    }

    /// Stopping is for good.
    fn set_reading(&self, to: Reading) {
        let mut r = lock(&self.shared.reading);
        if *r != Reading::Stopping {
            *r = to;
        }
        drop(r);
        self.shared.bell.ring();
        self.shared.slots.wake();
    }
}

impl Transport for NexusPolling {
    /// Returns at once: a poll in flight may take `--nexus-timeout`, and
    /// the job it brings is reported `not run` instead of started.
    fn stop_reading(&mut self) {
        self.set_reading(Reading::Stopping);
    }

    fn abandon(&self) {
        for token in lock(&self.shared.running).values() {
            token.cancel(CancelReason::Shutdown);
        }
        // The grace is over: a poll still in flight is cut off (its slot
        // is what the lifecycle waits for).
        self.shared.client.interrupt();
    }

    fn finish(mut self: Box<Self>, hard_deadline: Instant) {
        self.stop_reading();
        if let Some(p) = self.poller.take() {
            if !p.join_by(hard_deadline) {
                log::warn!("a poll of Nexus was still in flight at the shutdown deadline; cut off");
                self.shared.client.interrupt();
            }
        }
        // The poller is done: nothing more comes into the spool.
        self.shared.reporter.finish(hard_deadline);
        if let Some(r) = self.reporter.take() {
            if !r.join_by(hard_deadline) {
                log::warn!(
                    "a status report was still being sent at the shutdown deadline; \
                     it stays in the spool for the next run"
                );
            }
        }
    }
}

/// A named thread that can be waited for until a deadline.
struct Thread {
    handle: JoinHandle<()>,
    /// Disconnected when the thread ends (its sender is dropped).
    done: Receiver<()>,
}

impl Thread {
    fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Thread {
        let (tx, done) = crossbeam_channel::bounded::<()>(0);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _done = tx;
                f()
            })
            .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"));
        Thread { handle, done }
    }

    /// Join it if it ends by `deadline`; false (left running) if not.
    fn join_by(self, deadline: Instant) -> bool {
        match self.done.recv_deadline(deadline) {
            Err(RecvTimeoutError::Timeout) => false,
            _ => {
                let _ = self.handle.join();
                true
            }
        }
    }
}

fn reading(s: &NexusState) -> Reading {
    *lock(&s.reading)
}

/// Another job may be taken: its report will fit in the spool's bound
/// (every running job will add one).
fn has_room(s: &NexusState) -> bool {
    s.reporter.len() + lock(&s.running).len() < s.settings.nexus_spool_max
}

fn poll(s: &Arc<NexusState>, tasks: &TaskSender) {
    log::info!(
        "polling Nexus at {} every {:?}",
        s.settings.nexus_url.as_deref().unwrap_or("?"),
        s.settings.poll_interval
    );
    let mut outage = Outage::new("poller", "Nexus", s.settings.nexus_retry_cap);
    let mut next_poll = Instant::now();
    // Whether a finished job may cut the wait for `next_poll` short (not
    // when Nexus said when to come back).
    let mut cut_short = true;
    let mut full_since: Option<Instant> = None;
    alive::set_ready("nexus", Some("no poll of Nexus answered yet".into()));
    {
        let weak = Arc::downgrade(s);
        METRICS.set_spool(Box::new(move || weak.upgrade().map(|s| s.reporter.len())));
    }
    // Its longest legitimate waits: a poll (nexus-timeout), a backoff.
    let new_beat = || {
        alive::Beat::new(
            "nexus-poller",
            s.settings.nexus_timeout * 2 + s.settings.nexus_retry_cap + Duration::from_secs(30),
        )
    };
    let mut beat = Some(new_beat());
    loop {
        if let Some(b) = &beat {
            b.tick();
        }
        match reading(s) {
            Reading::Stopping => break,
            Reading::Paused => {
                // Not this transport's turn: neither live nor ready counts.
                alive::clear_ready("nexus");
                beat = None;
                s.bell.wait(Duration::from_secs(3600));
                continue;
            }
            Reading::Polling if beat.is_none() => {
                beat = Some(new_beat());
                alive::set_ready("nexus", Some("no poll of Nexus answered yet".into()));
            }
            Reading::Polling => {}
        }
        let now = Instant::now();
        if now < next_poll {
            // In steps, so the loop's liveness ticks through a long Retry-After.
            if s.bell.wait((next_poll - now).min(Duration::from_secs(5))) && cut_short {
                next_poll = Instant::now();
            }
            continue;
        }
        if !has_room(s) {
            if full_since.is_none() {
                full_since = Some(now);
                log::warn!(
                    "the report spool is full ({} undelivered reports, --nexus-spool-max {}): \
                     no new Nexus jobs are taken until Nexus accepts some",
                    s.reporter.len(),
                    s.settings.nexus_spool_max
                );
            }
            alive::set_ready("nexus", Some("the report spool is full".into()));
            s.bell
                .wait(s.settings.poll_interval.min(Duration::from_secs(5)));
            continue;
        }
        if let Some(since) = full_since.take() {
            log::info!(
                "the report spool has room again after {:.1}s: taking Nexus jobs",
                since.elapsed().as_secs_f64()
            );
        }
        let mut free = s.slots.take(Duration::from_millis(250), usize::MAX);
        let mut wait: Option<(Duration, bool)> = None;
        while !free.is_empty() && reading(s) == Reading::Polling && has_room(s) {
            let answer = s.client.next_job();
            if answer.is_ok() {
                alive::set_ready("nexus", None);
            }
            let failure = match answer {
                Ok(Some(body)) => match parse_job(&body) {
                    Ok(job) => {
                        outage.recovered();
                        take(s, tasks, job, &mut free);
                        continue;
                    }
                    Err((Some(id), why)) => {
                        outage.recovered();
                        reject(s, &id, &why);
                        continue;
                    }
                    Err((None, why)) => NexusError::Bad(why),
                },
                Ok(None) => {
                    outage.recovered();
                    let every = s.settings.poll_interval.mul_f64(0.8 + 0.4 * random_unit());
                    wait = Some((every, true));
                    break;
                }
                Err(e) => e,
            };
            METRICS.nexus_poll_failed();
            alive::set_ready("nexus", Some(format!("Nexus polls fail: {failure}")));
            let backoff = outage.failed(&failure);
            wait = Some(match failure {
                NexusError::Busy {
                    retry_after: Some(d),
                    ..
                } => (d, false),
                _ => (backoff, false),
            });
            break;
        }
        drop(free);
        if let Some((d, c)) = wait {
            next_poll = Instant::now() + d;
            cut_short = c;
        }
    }
    alive::clear_ready("nexus");
    log::debug!("Nexus poller stopped");
}

/// A job Nexus handed out: run it on one of `free`, or report why not.
fn take(s: &Arc<NexusState>, tasks: &TaskSender, job: Job, free: &mut Vec<Slot>) {
    if s.exec.registry.find(&job.kind).is_none() {
        let why = s.exec.registry.unknown_type(&job.kind);
        return reject(s, &job.id, &why);
    }
    // Under the lock, so that a stop is either before (not run) or after
    // (it runs, and was taken before the stop).
    let r = lock(&s.reading);
    if *r == Reading::Stopping {
        drop(r);
        log::warn!(
            "job {} arrived from a poll in flight when the agent was told to stop; \
             reporting FAILURE instead of running it",
            job.id
        );
        return s.reporter.submit(Report {
            id: job.id,
            status: "FAILURE".into(),
            output: "not run: the agent was stopping".into(),
        });
    }
    let slot = free.pop().expect("a free slot");
    dispatch(s, tasks, job, slot);
    drop(r);
}

/// A job Nexus sent that cannot run: report it failed at once.
fn reject(s: &NexusState, id: &str, why: &str) {
    log::warn!("Nexus job {id} is malformed: {why}; reporting FAILURE");
    s.reporter.submit(Report {
        id: id.to_owned(),
        status: "FAILURE".into(),
        output: format!("malformed job: {why}"),
    });
}

fn dispatch(s: &Arc<NexusState>, tasks: &TaskSender, job: Job, slot: Slot) {
    let token = Arc::new(CancelToken::new());
    lock(&s.running).insert(job.id.clone(), token.clone());
    let report = Box::new(NexusReport {
        shared: s.clone(),
        id: job.id.clone(),
        output: String::new(),
        dropped: 0,
    });
    if tasks
        // Nexus hands out no enqueue time.
        .send(Task::new(job, token, report, slot, None))
        .is_err()
    {
        log::error!("handler pool is gone; a Nexus job was not run");
    }
}

/// A running Nexus job: chunks are collected into the report's output.
struct NexusReport {
    shared: Arc<NexusState>,
    id: String,
    output: String,
    dropped: usize,
}

impl PoolReport for NexusReport {
    fn started(&mut self) {}

    fn chunk(&mut self, text: &str) {
        if self.output.len() + text.len() <= MAX_OUTPUT {
            self.output.push_str(text);
            METRICS.chunk_published();
        } else {
            METRICS.chunks_dropped(1);
            self.dropped += text.len();
        }
    }

    fn finished(mut self: Box<Self>, outcome: Outcome) {
        let (status, tail) = match outcome {
            Outcome::Success(v) => ("SUCCESS", v.to_string()),
            // A panic's error already starts with its reason.
            Outcome::Failed { reason, error } if error.starts_with(&reason) => ("FAILURE", error),
            Outcome::Failed { reason, error } => ("FAILURE", format!("{reason}: {error}")),
            Outcome::Cancelled(r) => ("FAILURE", format!("cancelled: {r}")),
            Outcome::Abandoned => (
                "FAILURE",
                "the agent stopped before the job finished".to_owned(),
            ),
        };
        if self.dropped > 0 {
            self.output.push_str(&format!(
                "\n[output truncated: {} bytes dropped]",
                self.dropped
            ));
        }
        if !self.output.is_empty() && !self.output.ends_with('\n') {
            self.output.push('\n');
        }
        self.output.push_str(&tail);
        let s = self.shared.clone();
        s.reporter.submit(Report {
            id: self.id.clone(),
            status: status.into(),
            output: std::mem::take(&mut self.output),
        });
        // After the submit: the spool's bound counts it all along.
        lock(&s.running).remove(&self.id);
        s.bell.ring();
    }
}
