//! Nexus HTTP polling (`citadel work --mode nexus`, PROTOCOL.md §3).
//!
//! Threads: one poller, which asks `GET /api/v1/jobs/next` only while a
//! handler slot is free (every `--poll-interval` with jitter, and at once
//! after a job finishes), and one reporter, which delivers each job's
//! `SUCCESS`/`FAILURE` report from a spool file until Nexus accepts it.
//! Nexus has no leases: a job abandoned at shutdown is reported as failed.

pub mod client;
mod reporter;
pub mod spool;

use crate::backoff::{random_unit, Outage};
use crate::config::Settings;
use crate::job::Job;
use crate::sync::lock;
use crate::worker::cancel::{CancelReason, CancelToken};
use crate::worker::exec::{Executor, Outcome};
use crate::worker::lifecycle::Transport;
use crate::worker::pool::{Report as PoolReport, Task};
use crate::worker::slots::{Slot, Slots};
use crate::worker::stop::{Doorbell, StopFlag};
use client::{parse_job, NexusClient, NexusError};
use crossbeam_channel::Sender;
use reporter::Reporter;
use spool::{Report, Spool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output kept per job; past it the rest is dropped and the cut marked.
const MAX_OUTPUT: usize = 1 << 20;

struct NexusState {
    settings: Settings,
    client: Arc<NexusClient>,
    exec: Arc<Executor>,
    slots: Arc<Slots>,
    reporter: Arc<Reporter>,
    stop: StopFlag,
    /// Rung when a job finishes (poll again now) and on stop.
    bell: Doorbell,
    running: Mutex<HashMap<String, Arc<CancelToken>>>,
}

pub struct NexusPolling {
    shared: Arc<NexusState>,
    tasks: Sender<Task>,
    poller: Option<JoinHandle<()>>,
    reporter: Option<JoinHandle<()>>,
}

impl NexusPolling {
    pub fn start(
        settings: Settings,
        url: &str,
        exec: Arc<Executor>,
        tasks: Sender<Task>,
        slots: Arc<Slots>,
    ) -> Result<Self, String> {
        let client = Arc::new(NexusClient::new(&settings, url));
        let spool = Spool::open(&settings.state_dir)?;
        let (reporter, reporter_thread) =
            Reporter::start(client.clone(), spool, settings.nexus_retry_cap);
        let shared = Arc::new(NexusState {
            settings,
            client,
            exec,
            slots,
            reporter,
            stop: StopFlag::default(),
            bell: Doorbell::default(),
            running: Mutex::new(HashMap::new()),
        });
        let mut me = NexusPolling {
            shared,
            tasks,
            poller: None,
            reporter: Some(reporter_thread),
        };
        me.resume_reading();
        Ok(me)
    }

    /// Start (again) taking jobs from Nexus.
    pub fn resume_reading(&mut self) {
        if self.poller.is_some() {
            return;
        }
        self.shared.stop.clear();
        let (shared, tasks) = (self.shared.clone(), self.tasks.clone());
        self.poller = Some(
            std::thread::Builder::new()
                .name("nexus-poll".into())
                .spawn(move || poll(&shared, &tasks))
                .expect("spawn poller thread"),
        );
    }
}

impl Transport for NexusPolling {
    fn stop_reading(&mut self) {
        self.shared.stop.set();
        self.shared.bell.ring();
        self.shared.slots.wake();
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }

    fn abandon(&self) {
        for token in lock(&self.shared.running).values() {
            token.cancel(CancelReason::Shutdown);
        }
    }

    fn finish(mut self: Box<Self>, hard_deadline: Instant) {
        self.stop_reading();
        self.shared.reporter.finish(hard_deadline);
        if let Some(r) = self.reporter.take() {
            let _ = r.join();
        }
    }
}

fn poll(s: &Arc<NexusState>, tasks: &Sender<Task>) {
    log::info!(
        "polling Nexus at {} every {:?}",
        s.settings.nexus_url.as_deref().unwrap_or("?"),
        s.settings.poll_interval
    );
    let mut outage = Outage::new("poller", "Nexus", s.settings.nexus_retry_cap);
    while !s.stop.is_set() {
        let mut free = s.slots.take(Duration::from_millis(250), || usize::MAX);
        if free.is_empty() {
            continue;
        }
        if s.stop.is_set() {
            break;
        }
        // How long to wait before the next poll, and whether a finished job
        // may cut the wait short (not when Nexus said when to come back).
        let mut wait: Option<(Duration, bool)> = None;
        while !free.is_empty() && !s.stop.is_set() {
            let failure = match s.client.next_job() {
                Ok(Some(body)) => match parse_job(&body) {
                    Ok(job) => {
                        outage.recovered();
                        if s.exec.registry.find(&job.kind).is_none() {
                            let why = s.exec.registry.unknown_type(&job.kind);
                            reject(s, &job.id, &why);
                        } else {
                            let slot = free.pop().expect("a free slot");
                            dispatch(s, tasks, job, slot);
                        }
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
        match wait {
            Some((d, true)) => {
                s.bell.wait(d);
            }
            Some((d, false)) => {
                s.stop.sleep(d);
            }
            None => {}
        }
    }
    log::debug!("Nexus poller stopped");
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

fn dispatch(s: &Arc<NexusState>, tasks: &Sender<Task>, job: Job, slot: Slot) {
    let token = Arc::new(CancelToken::new());
    lock(&s.running).insert(job.id.clone(), token.clone());
    let report = Box::new(NexusReport {
        shared: s.clone(),
        id: job.id.clone(),
        output: String::new(),
        dropped: 0,
    });
    if tasks
        .send(Task {
            job,
            token,
            report,
            slot,
        })
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
        } else {
            self.dropped += text.len();
        }
    }

    fn finished(mut self: Box<Self>, outcome: Outcome) {
        let (status, tail) = match outcome {
            Outcome::Success(v) => ("SUCCESS", v.to_string()),
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
        lock(&s.running).remove(&self.id);
        s.reporter.submit(Report {
            id: std::mem::take(&mut self.id),
            status: status.into(),
            output: std::mem::take(&mut self.output),
        });
        s.bell.ring();
    }
}
