//! The settle/lease thread: the only writer of a job's events, status and
//! outcome. It drains the settle queue in batches into one pipeline per
//! batch, renews the lease of every entry held and this process's claim on
//! its consumer name, and checks running jobs' cancel keys.
//!
//! An outcome is written by one script that checks, then writes, then
//! acknowledges (see `scripts`); [`Settler::settle`] reads the reply of every
//! command and forgets an entry only once its script said it is done. An
//! outcome Redis does not take (unreachable, demoted to a replica, out of
//! memory) stays in the backlog, in memory, and is sent again with backoff;
//! meanwhile the reader takes nothing new (`settle_blocked`) and chunk
//! events are dropped, not queued (the result carries the whole output).
//! Events other than the terminal one are sent at most once: a batch whose
//! reply was lost is sent again without them, so nobody sees an event twice.

use super::entry::Entry;
use super::scripts::{events_key, events_maxlen, running_events_ttl, Batch, Scripts, RENEW_LEASE};
use super::StreamsState;
use crate::backoff::Outage;
use crate::events::{self, NodeFacts};
use crate::observe::{alive, metrics::METRICS};
use crate::redis_conn::Conn;
use crate::redis_conn::{self, Fault};
use crate::worker::cancel::CancelReason;
use crate::worker::exec::Outcome;
use redis::{Cmd, RedisError, RedisResult, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What job threads and the reader tell the settle thread, in order.
pub enum Msg {
    /// The `claimed` event, formatted by the reader when it took the entry,
    /// queued together with `start` (by the reader or the job's thread).
    Claimed(Arc<Entry>, String),
    /// The `start` event, formatted by the reader as it handed the job to a
    /// free handler thread. Events are formatted where they happen, so their
    /// timestamps follow their order.
    Started(Arc<Entry>, String),
    /// A chunk event, already formatted by the job's thread.
    Chunk(Arc<Entry>, String),
    /// A chunk's text (`coalesce-chunks`): texts of one job that wait
    /// together become one chunk event, numbered here.
    Text(Arc<Entry>, String),
    Finish(Arc<Entry>, Outcome),
    /// A pending entry that was deleted from its stream: acknowledge only.
    Gone(Arc<Entry>),
}

/// One command of a settle pipeline.
pub(super) enum Step {
    /// A plain event (`claimed`, `chunk`, or the `start` of a job ending in
    /// the same batch): sent once, dropped if Redis refuses it. The flag
    /// says it is a chunk (for the chunk metrics).
    Publish(Arc<Entry>, String, bool),
    /// `processing` status and the `start` event, through a script.
    Start(Arc<Entry>, String),
    /// The outcome at this index of the backlog.
    Settle(usize),
    /// Chunk texts to be merged, then sent as one chunk event.
    Text(Arc<Entry>, String),
}

pub struct Settler {
    state: Arc<StreamsState>,
    conn: Option<(Conn, Scripts)>,
    outage: Outage,
    /// Outcomes Redis has not taken yet, oldest first; `None` = ack only.
    backlog: Vec<(Arc<Entry>, Option<Outcome>)>,
    retry_at: Instant,
    /// Events dropped during the current episode of a Redis that cannot
    /// take them.
    dropped: u64,
    /// Whether this thread had a connection before (a new one is a reconnect).
    connected_before: bool,
    /// On a cluster, outcomes of the backlog whose terminal event went out.
    announced: super::settle_cluster::Announced,
    /// When the leases held were last renewed (or nothing was held).
    renewed_at: Instant,
    /// Renew at once: the connection is new (after an outage, Redis counts
    /// the time it was away as idle time of every entry).
    renew_now: bool,
}

impl Settler {
    pub fn new(state: Arc<StreamsState>) -> Self {
        Settler {
            state,
            conn: None,
            outage: Outage::new("settle", "Redis", Duration::from_secs(30)),
            backlog: Vec::new(),
            retry_at: Instant::now(),
            dropped: 0,
            connected_before: false,
            announced: Default::default(),
            renewed_at: Instant::now(),
            renew_now: false,
        }
    }

    pub fn run(self) {
        self.turn_until_stopped();
        alive::clear_ready("redis-settle");
    }

    fn turn_until_stopped(mut self) {
        let s = &self.state.settings;
        let renew_every = (s.claim_idle / 3).max(Duration::from_millis(10));
        let name_every = self.state.lock.renew_every();
        let cancel_every = s.cancel_poll;
        let now = Instant::now();
        let (mut next_renew, mut next_name, mut next_cancel) =
            (now + renew_every, now + name_every, now + cancel_every);
        // Its longest legitimate turn: the longest wait between its periodic
        // tasks, then a few Redis calls, each within redis-timeout.
        let beat = alive::Beat::new(
            "settle",
            renew_every.max(name_every).max(cancel_every)
                + s.redis_timeout * 8
                + Duration::from_secs(30),
        );
        alive::set_ready("redis-settle", None);
        loop {
            beat.tick();
            let stopping = self.state.stop_settling.load(Ordering::SeqCst);
            let mut until = next_renew.min(next_name).min(next_cancel);
            if !self.backlog.is_empty() {
                until = until.min(self.retry_at);
            }
            let mut wait = until.saturating_duration_since(Instant::now());
            if stopping {
                wait = wait.min(Duration::from_millis(10));
            }
            let mut batch = self.state.queue.pop_batch(4096, wait);
            let hold = self.state.settings.chunk_hold;
            if self.state.settings.coalesce_chunks
                && !hold.is_zero()
                && !stopping
                && !batch.is_empty()
                && batch.len() < 4096
                && batch.iter().all(|m| matches!(m, Msg::Text(..)))
            {
                // Only tokens: let more of their streams' tokens join them.
                std::thread::sleep(hold);
                let room = 4096 - batch.len();
                batch.extend(self.state.queue.pop_batch(room, Duration::ZERO));
            }
            let idle = batch.is_empty();
            if !idle || (!self.backlog.is_empty() && Instant::now() >= self.retry_at) {
                self.settle(batch);
            }
            if stopping {
                if idle && self.backlog.is_empty() {
                    let keys = self.state.lock_keys();
                    if let Some((c, _)) = self.conn.as_mut() {
                        self.state.lock.release(c, &keys);
                    }
                    return;
                }
                if self.state.past_hard_stop() {
                    log::error!(
                        "stopping with {} outcomes Redis did not take; their entries stay pending \
                         and will be delivered again",
                        self.backlog.len()
                    );
                    return;
                }
            }
            let now = Instant::now();
            if now >= next_cancel {
                next_cancel = now + cancel_every;
                self.check_cancel_keys();
            }
            if now >= next_name {
                next_name = now + name_every;
                self.renew_name();
            }
            let reconnected = std::mem::take(&mut self.renew_now);
            if now >= next_renew || reconnected {
                next_renew = now + renew_every;
                self.renew_leases();
            }
        }
    }

    /// Apply `batch` (and what the backlog still holds) in one pipeline,
    /// read every reply, then forget what is done.
    fn settle(&mut self, batch: Vec<Msg>) {
        let st = self.state.clone();
        let ending: HashSet<*const Entry> = batch
            .iter()
            .filter_map(|m| match m {
                Msg::Finish(e, _) => Some(Arc::as_ptr(e)),
                _ => None,
            })
            .collect();
        let mut steps: Vec<Step> = (0..self.backlog.len()).map(Step::Settle).collect();
        for msg in batch {
            match msg {
                Msg::Claimed(e, json) if !e.is_lost() => steps.push(Step::Publish(e, json, false)),
                Msg::Chunk(e, json) if !e.is_lost() => steps.push(Step::Publish(e, json, true)),
                Msg::Text(e, text) if !e.is_lost() => steps.push(Step::Text(e, text)),
                Msg::Started(e, json) if !e.is_lost() => {
                    // A status about to be overwritten in this same batch is skipped.
                    if ending.contains(&Arc::as_ptr(&e)) {
                        steps.push(Step::Publish(e, json, false));
                    } else {
                        steps.push(Step::Start(e, json));
                    }
                }
                Msg::Claimed(..) | Msg::Chunk(..) | Msg::Text(..) | Msg::Started(..) => {}
                // No outcome of this run: the entry stays pending.
                Msg::Finish(e, Outcome::Abandoned) => st.inflight.remove(&e.stream, &e.id),
                Msg::Finish(e, _) if e.is_lost() => st.inflight.remove(&e.stream, &e.id),
                Msg::Finish(e, outcome) => {
                    self.backlog.push((e, Some(outcome)));
                    steps.push(Step::Settle(self.backlog.len() - 1));
                }
                Msg::Gone(e) => {
                    self.backlog.push((e, None));
                    steps.push(Step::Settle(self.backlog.len() - 1));
                }
            }
        }
        if steps.is_empty() {
            return;
        }
        let steps = coalesce(steps, &self.backlog, &st);
        let events = steps
            .iter()
            .filter(|s| !matches!(s, Step::Settle(_)))
            .count() as u64;
        let chunks = steps
            .iter()
            .filter(|s| matches!(s, Step::Publish(_, _, true)))
            .count() as u64;
        if st.settle_blocked.load(Ordering::SeqCst) && Instant::now() < self.retry_at {
            // Not yet time to try again: keep the outcomes, drop the events.
            self.dropped += events;
            METRICS.chunks_dropped(chunks);
            return;
        }
        if let Err(e) = self.connection() {
            self.dropped += events;
            METRICS.chunks_dropped(chunks);
            return self.blocked(redis_conn::fault(&e), &e);
        }
        let (mut conn, scripts) = self.conn.take().expect("connection just opened");
        // Plain events as plain commands; statuses and outcomes as
        // operations of batch-script calls, many per call (see `plan`).
        let plan = plan(&steps, &self.backlog);
        if conn.is_cluster() {
            let sent = super::settle_cluster::send(
                &mut conn,
                &scripts,
                &st,
                &plan,
                &steps,
                &self.backlog,
                &mut self.announced,
            );
            self.conn = Some((conn, scripts));
            return self.read_replies(sent, steps, events, chunks);
        }
        let mut pipe = redis::pipe();
        for part in &plan {
            match part {
                Part::Plain(i, expire) => {
                    let Step::Publish(e, json, _) = &steps[*i] else {
                        unreachable!("only plain events are sent plain")
                    };
                    for cmd in plain_cmds(&st, e, json, *expire) {
                        pipe.add_command(cmd);
                    }
                }
                Part::Call(ops) => {
                    let mut batch = scripts.batch(&st);
                    for i in ops {
                        match &steps[*i] {
                            Step::Start(e, json) => batch.start(e, json),
                            Step::Settle(k) => {
                                let (e, outcome) = &self.backlog[*k];
                                add_outcome(&mut batch, &st, e, outcome.as_ref());
                            }
                            Step::Publish(..) | Step::Text(..) => {
                                unreachable!("plain events are sent plain")
                            }
                        }
                    }
                    pipe.add_command(batch.into_cmd());
                }
            }
        }
        let replies = pipe
            .ignore_errors()
            .query::<Vec<Value>>(&mut conn)
            .map(|r| per_step(r, &plan, &steps, events_maxlen(&st) > 0));
        self.conn = Some((conn, scripts));
        self.read_replies(replies, steps, events, chunks)
    }

    /// What the replies to a batch's steps mean: forget what is done, keep
    /// what Redis did not take.
    fn read_replies(
        &mut self,
        replies: RedisResult<Vec<Value>>,
        steps: Vec<Step>,
        events: u64,
        chunks: u64,
    ) {
        let st = self.state.clone();
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                // No reply (or a lost one): the outcomes are sent again
                // later (their scripts make that harmless); the events are
                // not, so that no subscriber sees one twice.
                self.dropped += events;
                METRICS.chunks_dropped(chunks);
                return self.blocked(redis_conn::fault(&e), &e);
            }
        };
        let mut keep = vec![false; self.backlog.len()];
        let mut trouble: Option<(Fault, RedisError)> = None;
        let mut name_missing = false;
        for (step, reply) in steps.iter().zip(replies) {
            let refused = match &reply {
                Value::ServerError(e) => Some(RedisError::from(e.clone())),
                _ => None,
            };
            match (step, refused) {
                (Step::Text(..), _) => unreachable!("texts are made chunk events first"),
                (Step::Publish(_, _, chunk), None) => {
                    if *chunk {
                        METRICS.chunk_published();
                    }
                }
                (Step::Start(..), None) => name_missing |= reply == Value::Int(-1),
                (Step::Publish(_, _, chunk), Some(_)) => {
                    self.dropped += 1;
                    if *chunk {
                        METRICS.chunks_dropped(1);
                    }
                }
                (Step::Start(..), Some(_)) => self.dropped += 1,
                (Step::Settle(i), None) => match reply {
                    Value::Int(1) => {
                        if let (e, Some(Outcome::Failed { .. })) = &self.backlog[*i] {
                            st.counters.dead_lettered();
                            METRICS.dead_lettered(e.kind.as_deref().unwrap_or("unknown"));
                        }
                    }
                    Value::Int(0) => {}
                    Value::Int(-1) => {
                        keep[*i] = true;
                        name_missing = true;
                    }
                    other => {
                        log::warn!("unexpected reply to a settle script: {other:?}");
                        keep[*i] = true;
                    }
                },
                (Step::Settle(i), Some(e)) => {
                    let fault = redis_conn::fault(&e);
                    let entry = &self.backlog[*i].0;
                    match fault {
                        Fault::NoGroup => log::error!(
                            "the consumer group of {} is gone; the outcome of entry {} (job {}) \
                             cannot be recorded",
                            entry.stream,
                            entry.id,
                            entry.job_id.as_deref().unwrap_or("?")
                        ),
                        Fault::Refused => log::error!(
                            "Redis refused the outcome of entry {} of {} (job {}): {e}; it stays \
                             pending and will be delivered again after claim-idle",
                            entry.id,
                            entry.stream,
                            entry.job_id.as_deref().unwrap_or("?")
                        ),
                        _ => {
                            keep[*i] = true;
                            trouble = Some((fault, e));
                        }
                    }
                }
            }
        }
        let backlog = std::mem::take(&mut self.backlog);
        let mut done = Vec::with_capacity(backlog.len());
        for ((e, outcome), keep) in backlog.into_iter().zip(keep) {
            if keep {
                self.backlog.push((e, outcome));
            } else {
                done.push(e);
            }
        }
        st.inflight.remove_all(done.iter().map(|e| &**e));
        if name_missing {
            self.renew_name();
        }
        match trouble {
            Some((fault, e)) => self.blocked(fault, &e),
            None if self.backlog.is_empty() => self.unblocked(),
            // Kept only until the consumer name is ours again.
            None => self.retry_at = Instant::now() + Duration::from_millis(50),
        }
    }

    /// Redis did not take the backlog: retry it later, take nothing new.
    fn blocked(&mut self, fault: Fault, e: &RedisError) {
        if matches!(fault, Fault::Reconnect | Fault::NoScript) {
            self.conn = None;
        }
        let wait = self.outage.failed_as(redis_conn::describe(e), e);
        self.retry_at = Instant::now() + wait.min(Duration::from_secs(2));
        let blocked = !self.backlog.is_empty();
        self.state.settle_blocked.store(blocked, Ordering::SeqCst);
        if blocked {
            alive::set_ready(
                "redis-settle",
                Some(format!(
                    "{} outcomes wait for Redis ({}); no job is taken",
                    self.backlog.len(),
                    redis_conn::describe(e)
                )),
            );
        }
    }

    fn unblocked(&mut self) {
        self.retry_at = Instant::now();
        alive::set_ready("redis-settle", None);
        if !self.state.settle_blocked.swap(false, Ordering::SeqCst) && !self.outage.is_on() {
            return;
        }
        self.outage.recovered();
        let dropped = self.dropped + self.state.dropped_chunks.swap(0, Ordering::Relaxed);
        self.dropped = 0;
        if dropped > 0 {
            log::warn!(
                "{dropped} events (chunks, claimed, start) were dropped while Redis could not take \
                 them; the jobs' results carry their whole output"
            );
        }
    }

    fn connection(&mut self) -> RedisResult<(&mut Conn, &Scripts)> {
        if self.conn.is_none() {
            let s = &self.state.settings;
            let mut conn = redis_conn::connect(&s.redis_url, s.redis_timeout, s.redis_timeout)?;
            let scripts = Scripts::load(&mut conn)?;
            self.conn = Some((conn, scripts));
            if std::mem::replace(&mut self.connected_before, true) {
                METRICS.redis_reconnected();
                self.renew_now = true;
            }
        }
        let (conn, scripts) = self.conn.as_mut().expect("connection just set");
        Ok((conn, scripts))
    }

    fn check_cancel_keys(&mut self) {
        let running: Vec<_> = self
            .state
            .inflight
            .snapshot()
            .into_iter()
            .filter(|e| e.job_id.is_some() && !e.token.is_cancelled())
            .collect();
        if running.is_empty() {
            return;
        }
        let keys: Vec<String> = running
            .iter()
            .map(|e| cancel_key(e.job_id.as_deref().unwrap_or_default()))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = self
            .connection()
            .and_then(|(c, _)| super::intake::exists_each(c, &keys));
        match found {
            Ok(found) => {
                for (e, yes) in running.iter().zip(found) {
                    if yes {
                        log::info!(
                            "job {} cancelled by its producer",
                            e.job_id.as_deref().unwrap_or("?")
                        );
                        e.token.cancel(CancelReason::Requested);
                    }
                }
            }
            Err(e) => self.failed_aside(e),
        }
    }

    /// Keep this process's claim on its consumer name.
    fn renew_name(&mut self) {
        let st = self.state.clone();
        let keys = st.lock_keys();
        match self.connection().and_then(|(c, _)| st.lock.hold(c, &keys)) {
            Ok(Ok(())) => {}
            Ok(Err(holder)) => {
                let known = st.lock_lost.swap(true, Ordering::SeqCst);
                let running = st.inflight.snapshot();
                if known && running.is_empty() && self.backlog.is_empty() {
                    return;
                }
                log::error!(
                    "consumer name '{}' was taken by {} (this worker was cut off from Redis \
                     longer than its claim on the name); its {} jobs here are stopped unsettled, \
                     since that worker owns them now, and reading stops",
                    st.consumer,
                    holder.name,
                    running.len()
                );
                for e in running {
                    e.mark_lost();
                    st.inflight.remove(&e.stream, &e.id);
                }
                self.backlog.clear();
                self.unblocked();
            }
            Err(e) => self.failed_aside(e),
        }
    }

    fn renew_leases(&mut self) {
        let mut by_stream: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
        for e in self.state.inflight.snapshot() {
            if !e.is_lost() {
                by_stream
                    .entry(e.stream.clone())
                    .or_default()
                    .push(e.id.clone());
            }
        }
        let claim_idle = self.state.settings.claim_idle;
        let gap = self.renewed_at.elapsed();
        if by_stream.is_empty() {
            self.renewed_at = Instant::now();
            return;
        }
        for (stream, ids) in by_stream {
            let st = self.state.clone();
            let mut eval = redis::cmd("EVAL");
            eval.arg(RENEW_LEASE)
                .arg(1)
                .arg(&*stream)
                .arg(&st.settings.group)
                .arg(&st.consumer)
                .arg(&ids);
            match self
                .connection()
                .and_then(|(c, _)| eval.query::<Vec<String>>(c))
            {
                Ok(lost) => {
                    for id in lost {
                        let Some(e) = st.inflight.get(&stream, &id) else {
                            continue; // settled meanwhile
                        };
                        log::warn!(
                            "lost the lease of entry {id} on {stream} (job {}): another worker \
                             reclaimed it (this worker was unreachable longer than claim-idle); \
                             its run here is stopped and nothing of it is published or settled",
                            e.job_id.as_deref().unwrap_or("?")
                        );
                        e.mark_lost();
                    }
                }
                Err(e) => return self.failed_aside(e),
            }
        }
        self.renewed_at = Instant::now();
        if gap > claim_idle * 2 / 3 {
            // Renewals are due every claim-idle/3: this one came late enough
            // that other workers may have taken these entries as a dead
            // worker's (the reply said which, above).
            log::warn!(
                "the leases of the running jobs were renewed {:.1}s after the last renewal \
                 (claim-idle {:?}): this process or Redis was stalled (CPU, swap, disk) or \
                 Redis was unreachable",
                gap.as_secs_f64(),
                claim_idle
            );
        }
    }

    /// A periodic task failed: drop a broken connection; the next batch or
    /// tick retries.
    fn failed_aside(&mut self, e: RedisError) {
        let fault = redis_conn::fault(&e);
        match fault {
            Fault::Reconnect | Fault::NoScript => {
                self.conn = None;
                self.outage.failed_as(redis_conn::describe(&e), &e);
            }
            Fault::Full | Fault::Denied => {
                self.outage.failed_as(redis_conn::describe(&e), &e);
            }
            Fault::NoGroup | Fault::Refused => log::warn!("lease/cancel check failed: {e}"),
        }
    }
}

/// Chunk texts of one job that follow each other in `steps` (nothing else
/// of that job between them) become one chunk event: content joined, the
/// job's next index. Other jobs' steps in between do not matter: only each
/// job's own order counts.
fn coalesce(
    steps: Vec<Step>,
    backlog: &[(Arc<Entry>, Option<Outcome>)],
    st: &StreamsState,
) -> Vec<Step> {
    if !steps.iter().any(|s| matches!(s, Step::Text(..))) {
        return steps;
    }
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    let mut last: HashMap<*const Entry, usize> = HashMap::new();
    for step in steps {
        let entry = match &step {
            Step::Publish(e, ..) | Step::Start(e, _) | Step::Text(e, _) => Arc::as_ptr(e),
            Step::Settle(k) => Arc::as_ptr(&backlog[*k].0),
        };
        if let (Step::Text(_, more), Some(&at)) = (&step, last.get(&entry)) {
            if let Step::Text(_, text) = &mut out[at] {
                text.push_str(more);
                continue;
            }
        }
        last.insert(entry, out.len());
        out.push(step);
    }
    let node = st.profile.facts();
    out.into_iter()
        .map(|step| match step {
            Step::Text(e, text) => {
                let index = e.next_chunk.fetch_add(1, Ordering::Relaxed);
                let json = chunk_json(&e, &text, index, &node);
                Step::Publish(e, json, true)
            }
            other => other,
        })
        .collect()
}

/// A piece of a settle pipeline: a plain event (its XADD, then its
/// stream's EXPIRE when the flag says so, then PUBLISH), or one
/// batch-script call of these steps.
pub(super) enum Part {
    Plain(usize, bool),
    Call(Vec<usize>),
}

/// The order in which a batch's steps are sent. Steps are put in layers:
/// even layers hold plain events, odd ones script operations; a job's next
/// step stays in its layer when it is of the same kind, else goes to the
/// next one. Sent layer by layer (steps in their order within a layer),
/// each job's steps keep their order, while the outcomes of a whole batch
/// share a few script calls (an operation inside a script costs Redis
/// less than a call of its own, a plain command less than one inside).
fn plan(steps: &[Step], backlog: &[(Arc<Entry>, Option<Outcome>)]) -> Vec<Part> {
    let mut last: HashMap<*const Entry, usize> = HashMap::new();
    let mut layer = Vec::with_capacity(steps.len());
    for step in steps {
        let (entry, plain) = match step {
            Step::Publish(e, _, _) => (Arc::as_ptr(e), true),
            Step::Start(e, _) => (Arc::as_ptr(e), false),
            Step::Settle(k) => (Arc::as_ptr(&backlog[*k].0), false),
            Step::Text(..) => unreachable!("texts are made chunk events first"),
        };
        let l = match last.get(&entry) {
            Some(&l) if (l % 2 == 0) == plain => l,
            Some(&l) => l + 1,
            None if plain => 0,
            None => 1,
        };
        last.insert(entry, l);
        layer.push(l);
    }
    let top = layer.iter().copied().max().unwrap_or(0);
    let mut parts = Vec::new();
    for l in 0..=top {
        let here: Vec<usize> = (0..steps.len()).filter(|&i| layer[i] == l).collect();
        if l % 2 == 0 {
            // `claimed` and `start` set the stream's running ttl; of a job's
            // such events in one layer only the last sends the EXPIRE (it
            // follows every XADD of them, whichever of those Redis took).
            let mut later: HashSet<*const Entry> = HashSet::new();
            let mut expire = vec![false; here.len()];
            for (k, &i) in here.iter().enumerate().rev() {
                if let Step::Publish(e, _, false) = &steps[i] {
                    expire[k] = later.insert(Arc::as_ptr(e));
                }
            }
            parts.extend(here.into_iter().zip(expire).map(|(i, x)| Part::Plain(i, x)));
        } else {
            parts.extend(here.chunks(Batch::MAX_OPS).map(|c| Part::Call(c.to_vec())));
        }
    }
    parts
}

/// One reply per step, in the steps' order, from the pipeline's replies
/// in `plan`'s order. A plain event is refused when any of its commands
/// was; a call refused as a whole (out of memory, NOSCRIPT) is that error
/// for each of its operations.
fn per_step(replies: Vec<Value>, plan: &[Part], steps: &[Step], stream_on: bool) -> Vec<Value> {
    let mut out = vec![Value::Nil; steps.len()];
    let mut replies = replies.into_iter();
    for part in plan {
        match part {
            Part::Plain(i, expire) => {
                let n = match (stream_on, expire) {
                    (false, _) => 1,
                    (true, false) => 2,
                    (true, true) => 3,
                };
                for _ in 0..n {
                    let reply = replies.next().unwrap_or(Value::Nil);
                    if !matches!(out[*i], Value::ServerError(_)) {
                        out[*i] = reply;
                    }
                }
            }
            Part::Call(ops) => match replies.next() {
                Some(Value::Array(items)) if items.len() == ops.len() => {
                    for (i, item) in ops.iter().zip(items) {
                        out[*i] = item;
                    }
                }
                Some(Value::ServerError(e)) => {
                    for i in ops {
                        out[*i] = Value::ServerError(e.clone());
                    }
                }
                other => log::warn!("unexpected reply to a settle batch: {other:?}"),
            },
        }
    }
    out
}

/// A plain event's commands: the events-stream append (then, when
/// `expire`, the stream's running ttl), then PUBLISH.
pub(super) fn plain_cmds(st: &StreamsState, e: &Entry, json: &str, expire: bool) -> Vec<Cmd> {
    event_cmds(st, e, json, expire.then(|| running_events_ttl(st)))
}

/// An event's commands: the events-stream append (then the stream's
/// lifetime `ttl` seconds, when given), then PUBLISH.
pub(super) fn event_cmds(st: &StreamsState, e: &Entry, json: &str, ttl: Option<u64>) -> Vec<Cmd> {
    let mut cmds = Vec::with_capacity(3);
    let maxlen = events_maxlen(st);
    if maxlen > 0 {
        let key = events_key(e);
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&key)
            .arg("MAXLEN")
            .arg("~")
            .arg(maxlen)
            .arg("*")
            .arg("event")
            .arg(json);
        cmds.push(xadd);
        if let Some(ttl) = ttl {
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(key).arg(ttl);
            cmds.push(expire);
        }
    }
    let mut publish = redis::cmd("PUBLISH");
    publish
        .arg(events::channel(e.job_id.as_deref().unwrap_or_default()))
        .arg(json);
    cmds.push(publish);
    cmds
}

/// What an outcome writes: the status ('' = none), its error, the
/// terminal event and, for a failure, the dead letter (reason, error).
pub(super) struct Ending<'a> {
    pub status: &'static str,
    pub error: Option<&'a str>,
    pub event: Option<String>,
    pub dead_letter: Option<(&'a str, &'a str)>,
}

/// What the outcome of `e` writes (`None`: acknowledge only).
pub(super) fn ending<'a>(st: &StreamsState, e: &Entry, outcome: Option<&'a Outcome>) -> Ending<'a> {
    let node = st.profile.facts();
    let event = |kind, data| Some(event_json(e, kind, data, &node));
    let (status, error, event, dead_letter) = match outcome {
        None | Some(Outcome::Abandoned) => ("", None, None, None),
        Some(Outcome::Success(v)) => ("completed", None, event("end", events::end(v)), None),
        Some(Outcome::Failed { reason, error }) => (
            "failed",
            Some(error.as_str()),
            event("error", events::error(error, false)),
            Some((reason.as_str(), error.as_str())),
        ),
        Some(Outcome::Cancelled(r)) => (
            "cancelled",
            None,
            event("cancelled", events::cancelled(r)),
            None,
        ),
    };
    Ending {
        status,
        error,
        event,
        dead_letter,
    }
}

/// The outcome of `e` as an operation of `batch` (`None`: acknowledge only).
fn add_outcome(batch: &mut Batch, st: &StreamsState, e: &Entry, outcome: Option<&Outcome>) {
    let end = ending(st, e, outcome);
    batch.finish(e, end.status, end.error, end.event, end.dead_letter);
}

/// What a job's cancel key starts with (the job id follows).
pub const CANCEL_PREFIX: &str = "job:cancelled:";

pub fn cancel_key(job_id: &str) -> String {
    format!("{CANCEL_PREFIX}{job_id}")
}

/// An event of `e`'s job as its JSON text, timestamped now.
pub fn event_json(e: &Entry, kind: &str, data: serde_json::Value, node: &NodeFacts) -> String {
    let job_id = e.job_id.as_deref().unwrap_or_default();
    events::event(kind, job_id, e.ray_id.as_deref(), data, node)
}

/// `e`'s chunk event number `index` (see [`events::chunk_event`]).
pub fn chunk_json(e: &Entry, content: &str, index: u64, node: &NodeFacts) -> String {
    let job_id = e.job_id.as_deref().unwrap_or_default();
    events::chunk_event(job_id, e.ray_id.as_deref(), content, index, node)
}
