//! The reporter thread: delivers each job's status report to Nexus until it
//! is accepted, every report on its own schedule, so that one report Nexus
//! keeps refusing never holds back the others. A report is in the spool from the
//! moment the job ends until Nexus accepts it (then it is removed, so it is
//! not sent again), or until Nexus says the job is unknown to it (then it
//! moves to the rejected store). What an answer means:
//!
//! | answer | what happens |
//! |---|---|
//! | 2xx | delivered |
//! | no answer, 408, 429, 5xx | Nexus-wide trouble: every delivery waits (backoff, or `Retry-After`); logged once per outage |
//! | 401, 403 | the token: every delivery waits (backoff); "Nexus rejected the token" logged once per episode |
//! | 410 | the job is gone: the report is moved to the rejected store |
//! | 404 | retried; given up (rejected store) only after `--nexus-gone-after-attempts` 404s in a row over at least `--nexus-gone-after` (one 404 may be a proxy during a deploy) |
//! | 413 | the output is cut to `--nexus-report-max-output` (marked) and sent again |
//! | other 4xx | retried with backoff, logged once per report: dropping it would lose the outcome |
//!
//! It decides nothing about files (that is `spool.rs`) and never takes
//! jobs; it tells the poller when a report has left the spool (room).

use super::client::{NexusClient, NexusError};
use super::spool::{Report, Spool, Stored};
use crate::backoff::{Backoff, Outage};
use crate::config::Settings;
use crate::sync::lock;
use crate::worker::stop::Doorbell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A report waiting for delivery, and its own retry schedule.
struct Pending {
    stored: Stored,
    due: Instant,
    backoff: Backoff,
    /// Refused attempts so far.
    attempts: u32,
    /// 404s in a row: how many, since when.
    not_found: Option<(u32, Instant)>,
    /// Its last answer was 401/403.
    token_refused: bool,
    /// Its first refusal was logged (later ones are debug).
    complained: bool,
}

struct Policy {
    timeout: Duration,
    retry_cap: Duration,
    gone_after_attempts: u32,
    gone_after: Duration,
    max_output: usize,
}

pub struct Reporter {
    client: NexusClient,
    spool: Spool,
    /// By sequence number: the order of arrival.
    pending: Mutex<BTreeMap<u64, Pending>>,
    bell: Doorbell,
    /// Rung whenever a report leaves the spool.
    room: Arc<Doorbell>,
    give_up_at: Mutex<Option<Instant>>,
    policy: Policy,
}

impl Reporter {
    pub fn new(
        client: NexusClient,
        spool: Spool,
        left_over: Vec<Stored>,
        settings: &Settings,
        room: Arc<Doorbell>,
    ) -> Reporter {
        let policy = Policy {
            timeout: settings.nexus_timeout,
            retry_cap: settings.nexus_retry_cap,
            gone_after_attempts: settings.nexus_gone_after_attempts,
            gone_after: settings.nexus_gone_after,
            max_output: settings.nexus_report_max_output,
        };
        let now = Instant::now();
        let pending = left_over
            .into_iter()
            .map(|s| (s.seq, Pending::new(s, now, policy.retry_cap)))
            .collect();
        Reporter {
            client,
            spool,
            pending: Mutex::new(pending),
            bell: Doorbell::default(),
            room,
            give_up_at: Mutex::new(None),
            policy,
        }
    }

    /// Spool a report (its own file, written by the caller's thread) for
    /// delivery. A newer report of the same job replaces an older one.
    pub fn submit(&self, report: Report) {
        let stored = self.spool.save(&report);
        let older: Vec<Stored> = {
            let mut p = lock(&self.pending);
            let seqs: Vec<u64> = p
                .values()
                .filter(|e| e.stored.id == report.id)
                .map(|e| e.stored.seq)
                .collect();
            let older = seqs
                .iter()
                .filter_map(|s| p.remove(s))
                .map(|e| e.stored)
                .collect();
            p.insert(
                stored.seq,
                Pending::new(stored, Instant::now(), self.policy.retry_cap),
            );
            older
        };
        for s in &older {
            self.spool.remove(s);
        }
        self.bell.ring();
    }

    /// Undelivered reports.
    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Deliver what is left until `deadline`, then stop (the rest stays in
    /// the spool for the next run). Returns at once; `run` returns by then.
    pub fn finish(&self, deadline: Instant) {
        *lock(&self.give_up_at) = Some(deadline);
        self.bell.ring();
    }

    /// The thread's loop: until `finish` and the spool is empty (or its
    /// deadline came).
    pub fn run(&self) {
        let mut nexus = NexusWide {
            outage: Outage::new("report", "Nexus", self.policy.retry_cap),
            token: Backoff::new(Duration::from_millis(50), self.policy.retry_cap),
            token_episode: false,
            hold: Instant::now(),
        };
        while let Some((stored, timeout)) = self.next(nexus.hold) {
            let report = match self.spool.load(&stored) {
                Ok(r) => r,
                Err(e) => {
                    log::error!(
                        "cannot read the spooled report of job {}: {e}; it is not delivered",
                        stored.id
                    );
                    lock(&self.pending).remove(&stored.seq);
                    continue;
                }
            };
            let result = self
                .client
                .report(&report.id, &report.status, &report.output, timeout);
            self.settle(&mut nexus, &stored, report, result);
        }
    }

    /// Wait for the next report due (and Nexus-wide trouble to be over);
    /// it and the longest its request may take. `None`: time to stop.
    fn next(&self, hold: Instant) -> Option<(Stored, Duration)> {
        loop {
            let give_up = *lock(&self.give_up_at);
            let now = Instant::now();
            let (due, at) = {
                let p = lock(&self.pending);
                // Of the reports due, the one due longest: a report that is
                // refused again and again is due again soon, but never before
                // one that has waited since before it.
                let due = p
                    .values()
                    .filter(|e| e.due <= now)
                    .min_by_key(|e| e.due)
                    .map(|e| e.stored.clone());
                let earliest = p.values().map(|e| e.due).min();
                match (due, earliest) {
                    (_, None) if give_up.is_some() => return None,
                    (Some(s), _) if hold <= now => (Some(s), now),
                    (_, Some(t)) => (None, t.max(hold)),
                    (_, None) => (None, now + Duration::from_secs(3600)),
                }
            };
            if let Some(deadline) = give_up {
                if at >= deadline || deadline <= now + Duration::from_millis(5) {
                    log::warn!(
                        "stopping with {} status reports undelivered; they stay in {} for the next run",
                        self.len(),
                        self.spool.dir().display()
                    );
                    return None;
                }
            }
            match due {
                Some(stored) => {
                    let left = give_up.map_or(Duration::MAX, |d| d - now);
                    return Some((stored, self.policy.timeout.min(left)));
                }
                None => {
                    let until = give_up.map_or(at, |d| at.min(d));
                    self.bell.wait(until - now);
                }
            }
        }
    }

    /// Act on Nexus's answer to one report.
    fn settle(
        &self,
        nexus: &mut NexusWide,
        stored: &Stored,
        report: Report,
        result: Result<(), NexusError>,
    ) {
        let now = Instant::now();
        let (verdict, token_refused) = {
            let mut p = lock(&self.pending);
            let verdict = match (p.get_mut(&stored.seq), result) {
                (_, Ok(())) => {
                    nexus.outage.recovered();
                    nexus.token.reset();
                    let attempts = p.remove(&stored.seq).map_or(0, |e| e.attempts);
                    Verdict::Delivered(attempts)
                }
                // Replaced by a newer report of the job meanwhile.
                (None, Err(_)) => Verdict::Retry,
                (Some(entry), Err(e)) => {
                    let v = self.judge(nexus, entry, &report, &e, now);
                    if matches!(v, Verdict::Gone(_)) {
                        p.remove(&stored.seq);
                    }
                    v
                }
            };
            (verdict, p.values().any(|e| e.token_refused))
        };
        match verdict {
            Verdict::Delivered(attempts) => {
                self.spool.remove(stored);
                self.room.ring();
                if attempts == 0 {
                    log::info!("reported job {} to Nexus: {}", report.id, report.status);
                } else {
                    log::info!(
                        "reported job {} to Nexus: {} (after {attempts} refused attempts)",
                        report.id,
                        report.status
                    );
                }
            }
            Verdict::Gone(why) => self.give_up(stored, &report, &why),
            Verdict::Retry => {}
        }
        if token_refused && !nexus.token_episode {
            log::error!(
                "Nexus rejected the token (HTTP 401/403) for status reports; retrying with \
                 backoff (check --nexus-token)"
            );
        } else if !token_refused && nexus.token_episode {
            log::info!("Nexus accepts the token again");
        }
        nexus.token_episode = token_refused;
    }

    /// A refused attempt: when `entry` is tried next, and whether Nexus as
    /// a whole must wait; or that the job is gone.
    fn judge(
        &self,
        nexus: &mut NexusWide,
        entry: &mut Pending,
        report: &Report,
        e: &NexusError,
        now: Instant,
    ) -> Verdict {
        entry.attempts += 1;
        crate::observe::metrics::METRICS.nexus_report_failed();
        entry.due = now + entry.backoff.next_delay();
        entry.token_refused = matches!(e, NexusError::Token(_));
        if !matches!(e, NexusError::Refused(404, _)) {
            entry.not_found = None;
        }
        match e {
            NexusError::Unreachable(_) | NexusError::Bad(_) | NexusError::Busy { .. } => {
                let backoff = nexus.outage.failed(e);
                let wait = match e {
                    NexusError::Busy {
                        retry_after: Some(d),
                        ..
                    } => *d,
                    _ => backoff,
                };
                nexus.hold = now + wait;
                entry.due = entry.due.max(nexus.hold);
            }
            NexusError::Token(_) => nexus.hold = now + nexus.token.next_delay(),
            NexusError::Refused(410, _) => return Verdict::Gone(format!("Nexus answered {e}")),
            NexusError::Refused(404, _) => {
                let (n, since) = entry.not_found.unwrap_or((0, now));
                let (n, span) = (n + 1, now.duration_since(since));
                entry.not_found = Some((n, since));
                if n >= self.policy.gone_after_attempts && span >= self.policy.gone_after {
                    return Verdict::Gone(format!(
                        "Nexus answered {e} {n} times over {:.0}s",
                        span.as_secs_f64()
                    ));
                }
                complain(
                    entry,
                    format_args!(
                        "Nexus does not know job {} ({e}); retrying its report (given up \
                         after {} such answers over at least {:?})",
                        report.id, self.policy.gone_after_attempts, self.policy.gone_after
                    ),
                );
            }
            NexusError::Refused(413, _) if report.output.len() > self.policy.max_output => {
                let cut = Report {
                    output: cut_output(&report.output, self.policy.max_output),
                    ..report.clone()
                };
                log::warn!(
                    "Nexus refused the report of job {} as too large ({e}); sending it again \
                     with its output cut to {} bytes",
                    report.id,
                    cut.output.len()
                );
                entry.stored = self.spool.rewrite(&entry.stored, cut);
                entry.due = now;
            }
            NexusError::Refused(..) => complain(
                entry,
                format_args!(
                    "Nexus refused the report of job {} ({e}); retrying with backoff (it is \
                     kept until Nexus accepts it)",
                    report.id
                ),
            ),
        }
        Verdict::Retry
    }

    /// Nexus says the job is unknown: keep the report in the rejected store.
    fn give_up(&self, stored: &Stored, report: &Report, why: &str) {
        match self.spool.reject(stored, report, why) {
            Ok(path) => {
                self.room.ring();
                log::error!(
                    "Nexus does not know job {} ({why}); its {} report is not sent again \
                     and is kept in {}",
                    report.id,
                    report.status,
                    path.display()
                );
            }
            Err(e) => {
                log::error!(
                    "{e}; the report of job {} stays in the spool and is retried",
                    report.id
                );
                let mut entry = Pending::new(stored.clone(), Instant::now(), self.policy.retry_cap);
                entry.due += self.policy.retry_cap;
                lock(&self.pending).insert(stored.seq, entry);
            }
        }
    }
}

/// What the thread knows of Nexus as a whole.
struct NexusWide {
    outage: Outage,
    /// Backoff while tokens are refused.
    token: Backoff,
    /// Some report's last answer was 401/403 (logged when it starts and ends).
    token_episode: bool,
    /// No delivery before this (backoff or `Retry-After` after trouble).
    hold: Instant,
}

enum Verdict {
    /// Accepted, after this many refused attempts.
    Delivered(u32),
    /// Nexus does not know the job, for good.
    Gone(String),
    Retry,
}

impl Pending {
    /// Due at once.
    fn new(stored: Stored, now: Instant, cap: Duration) -> Pending {
        Pending {
            stored,
            due: now,
            backoff: Backoff::new(Duration::from_millis(50), cap),
            attempts: 0,
            not_found: None,
            token_refused: false,
            complained: false,
        }
    }
}

/// Log a report's first refusal as an error, later ones at debug.
fn complain(entry: &mut Pending, msg: std::fmt::Arguments) {
    if entry.complained {
        log::debug!("{msg}");
    } else {
        entry.complained = true;
        log::error!("{msg}");
    }
}

/// `output` cut to at most `max` bytes: its start and its end (where the
/// result or the error is), with a marker in between saying how much is
/// missing and why.
pub fn cut_output(output: &str, max: usize) -> String {
    if output.len() <= max {
        return output.to_owned();
    }
    let marker = |n: usize| {
        format!(
            "\n[citadel: {n} bytes of output cut here: Nexus refused the whole report as too large (HTTP 413)]\n"
        )
    };
    let keep = max.saturating_sub(marker(output.len()).len());
    let mut head = keep / 2;
    while !output.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = output.len() - (keep - head);
    while !output.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}{}{}",
        &output[..head],
        marker(tail - head),
        &output[tail..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_output_keeps_both_ends_and_says_so() {
        assert_eq!(cut_output("short", 100), "short");
        let long = format!("{}\n{{\"result\":\"the end\"}}", "chunk ü\n".repeat(1000));
        let cut = cut_output(&long, 1000);
        assert!(cut.len() <= 1000, "{}", cut.len());
        assert!(cut.starts_with("chunk ü\n"), "{cut}");
        assert!(cut.ends_with("{\"result\":\"the end\"}"), "{cut}");
        let marker = cut.lines().find(|l| l.starts_with("[citadel: ")).unwrap();
        let missing: usize = marker["[citadel: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let kept = cut.len() - marker.len() - 2;
        assert_eq!(kept + missing, long.len(), "{marker}");
    }
}
