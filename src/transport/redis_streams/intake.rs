//! What to do with an entry once it was read: run it, dead-letter it
//! (malformed, or delivered too often), settle it at once (cancelled before
//! it started, deleted from its stream), and where a running job's progress
//! goes ([`RedisReport`]: into the settle queue). Every entry handed on is
//! in the in-flight set until the settle thread forgets it. Nothing here
//! reads from Redis except the cancel keys of the jobs about to start.

use super::entry::{Entry, RawEntry};
use super::inflight::Room;
use super::scripts::Scripts;
use super::settler::{cancel_key, chunk_json, event_json, Msg};
use super::StreamsState;
use crate::events;
use crate::job::Job;
use crate::observe::metrics::METRICS;
use crate::redis_conn::Conn;
use crate::worker::exec::{Executor, Outcome};
use crate::worker::pool::{Report, Task, TaskSender};
use crate::worker::slots::Slot;
use redis::RedisResult;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Clone)]
pub struct Intake {
    pub state: Arc<StreamsState>,
    pub exec: Arc<Executor>,
    pub tasks: TaskSender,
}

/// A job about to run: its entry, the slot it took, and its `claimed` and
/// `start` events.
struct Run(Job, Arc<Entry>, Slot, [Msg; 2]);

enum Verdict {
    Run(Job),
    Reject(&'static str, String),
    Gone,
}

/// What became of a batch of entries.
#[derive(Default)]
pub struct Taken {
    /// Entries now held (running or on their way to be settled).
    pub held: usize,
    /// Entries left pending for lack of room (a blocking read over several
    /// streams can return one per stream): this consumer's own pending
    /// entries, taken back when room frees.
    pub left_pending: usize,
    /// The job type of each entry held (`unknown` when it has none).
    pub kinds: Vec<String>,
}

impl Taken {
    /// Count `e` as held.
    fn hold(&mut self, e: &Entry) {
        self.held += 1;
        self.kinds
            .push(e.kind.clone().unwrap_or_else(|| "unknown".into()));
    }
}

impl Intake {
    /// Hand on `raws` of `stream`, each with Redis's delivery count. None
    /// of them may be in flight here already (the reader filters them out
    /// before asking for delivery counts). Each one held takes its room
    /// from `room`: its place in the pending list, and for a job that runs
    /// its handler slot.
    pub fn take(
        &self,
        conn: &mut Conn,
        stream: &Arc<str>,
        raws: Vec<(RawEntry, u64)>,
        room: &mut Vec<Room>,
    ) -> Taken {
        if self.state.stopping() {
            // A read that returned after the stop: its entries stay pending
            // for this consumer (taken back at its next start, or reclaimed).
            return Taken::default();
        }
        let batch = self.classify(stream, raws);
        let cancelled = cancelled_before_start(conn, &batch);
        self.place(batch, cancelled, room)
    }

    /// New entries of `stream` that a checked read brought (see
    /// `scripts::CHECKED_READ`), each with whether its job's cancel key
    /// existed when it was read: as [`Intake::take`], the cancel check
    /// already done in the read's round trip.
    pub fn take_checked(
        &self,
        stream: &Arc<str>,
        raws: Vec<RawEntry>,
        cancelled: Vec<bool>,
        room: &mut Vec<Room>,
    ) -> Taken {
        if self.state.stopping() {
            return Taken::default();
        }
        let batch = self.classify(stream, raws.into_iter().map(|r| (r, 1)).collect());
        // A flag counts for a job that runs only (`place`).
        self.place(batch, cancelled, room)
    }

    /// What a blocking read brought: as [`Intake::take`], except that a job
    /// that came alone (a quiet queue, where what counts is how soon a
    /// backend sees `start`) is started by one call of the batch script
    /// that checks its cancel key and writes `claimed` and `start` (on a
    /// single Redis; a cluster keeps the cancel key and the status in other
    /// slots than the entry). One round trip instead of two, and no hop
    /// through the settle thread. If that call fails, the entry is left
    /// pending for the take-back and the error is returned; should Redis
    /// have run it anyway (a lost reply), the job's `claimed` and `start`
    /// are written again when it is taken back.
    pub fn take_quiet(
        &self,
        conn: &mut Conn,
        scripts: Option<&Scripts>,
        stream: &Arc<str>,
        raws: Vec<(RawEntry, u64)>,
        room: &mut Vec<Room>,
    ) -> RedisResult<Taken> {
        let st = &self.state;
        if st.stopping() {
            return Ok(Taken::default());
        }
        let mut batch = self.classify(stream, raws);
        let scripts = match (scripts, &batch[..]) {
            (Some(scripts), [(_, Verdict::Run(_))]) if !room.is_empty() => scripts,
            _ => {
                let cancelled = cancelled_before_start(conn, &batch);
                return Ok(self.place(batch, cancelled, room));
            }
        };
        let (e, Verdict::Run(job)) = batch.pop().expect("one entry") else {
            unreachable!("matched above")
        };
        let Room { place, handler } = room.pop().expect("room checked above");
        let e = Arc::new(e);
        st.inflight.insert(e.clone(), place);
        let [claimed, start] = first_events(st, &e);
        let mut call = scripts.batch(st);
        call.checked_start(&e, &cancel_key(&job.id), &claimed, &start);
        let reply = match call.into_cmd().query::<Vec<redis::Value>>(conn) {
            Ok(reply) => reply,
            Err(why) => {
                st.inflight.remove(&e.stream, &e.id);
                return Err(why);
            }
        };
        let mut taken = Taken::default();
        match reply.as_slice() {
            [redis::Value::Int(1)] => {
                taken.hold(&e);
                self.send(job, e, handler, None);
            }
            [redis::Value::Int(2)] => {
                taken.hold(&e);
                self.settle_cancelled(e);
            }
            [redis::Value::Int(0)] => {
                // Acknowledged or reclaimed by another worker since the read.
                log::info!(
                    "entry {} of {} is no longer this consumer's; not starting it",
                    e.id,
                    e.stream
                );
                st.inflight.remove(&e.stream, &e.id);
            }
            [redis::Value::Int(-1)] => {
                // The consumer name is not ours: take it again, then this
                // entry back.
                st.inflight.remove(&e.stream, &e.id);
                st.lock_lost.store(true, Ordering::SeqCst);
                taken.left_pending = 1;
            }
            other => {
                st.inflight.remove(&e.stream, &e.id);
                return Err(match other {
                    [redis::Value::ServerError(e)] => redis::RedisError::from(e.clone()),
                    other => redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected reply to a checked start",
                        format!("{other:?}"),
                    )),
                });
            }
        }
        Ok(taken)
    }

    /// Each raw entry with what to do with it.
    fn classify(&self, stream: &Arc<str>, raws: Vec<(RawEntry, u64)>) -> Vec<(Entry, Verdict)> {
        let st = &self.state;
        let mut batch: Vec<(Entry, Verdict)> = Vec::with_capacity(raws.len());
        for (raw, deliveries) in raws {
            let gone = raw.fields.is_none();
            let mut e = Entry::new(stream.clone(), raw, deliveries);
            let verdict = if gone {
                Verdict::Gone
            } else if deliveries > st.settings.max_deliveries {
                Verdict::Reject(
                    "exceeded max deliveries",
                    format!(
                        "delivered {deliveries} times, more than max-deliveries ({}); last runs crashed or timed out",
                        st.settings.max_deliveries
                    ),
                )
            } else {
                match e.parse(&self.exec.registry, st.settings.max_job_size) {
                    Ok(job) => Verdict::Run(job),
                    Err(why) => Verdict::Reject("malformed job", why),
                }
            };
            batch.push((e, verdict));
        }
        batch
    }

    /// Hold each classified entry in a room (those without one stay
    /// pending) and hand it on: runnable jobs to the handlers, the rest to
    /// the settle thread.
    fn place(
        &self,
        batch: Vec<(Entry, Verdict)>,
        cancelled: Vec<bool>,
        room: &mut Vec<Room>,
    ) -> Taken {
        let st = &self.state;
        let mut taken = Taken::default();
        // The jobs about to run, each with its `claimed` and `start` events.
        let mut runs: Vec<Run> = Vec::new();
        for ((e, verdict), cancelled) in batch.into_iter().zip(cancelled) {
            let e = Arc::new(e);
            let Some(Room { place, handler }) = room.pop() else {
                taken.left_pending += 1;
                continue;
            };
            st.inflight.insert(e.clone(), place);
            taken.hold(&e);
            match verdict {
                Verdict::Gone => st.queue.push(Msg::Gone(e)),
                Verdict::Reject(reason, error) => {
                    log::warn!(
                        "dead-lettering entry {} of {} ({reason}): {error}",
                        e.id,
                        e.stream
                    );
                    let outcome = Outcome::Failed {
                        reason: reason.to_owned(),
                        error,
                    };
                    st.queue.push(Msg::Finish(e, outcome));
                }
                Verdict::Run(_) if cancelled => self.settle_cancelled(e),
                Verdict::Run(job) => {
                    // A slot is free: a handler thread takes the job as
                    // soon as it is sent, so it starts now.
                    let [claimed, start] = first_events(st, &e);
                    let first = [
                        Msg::Claimed(e.clone(), claimed),
                        Msg::Started(e.clone(), start),
                    ];
                    runs.push(Run(job, e, handler, first));
                }
            }
        }
        self.hand_on(runs);
        taken
    }

    /// Send each job to the handler threads, its first events queued before
    /// it runs (so before any of its chunks). A job that a read brought
    /// alone (a quiet queue: what counts is how soon a backend sees `start`)
    /// has them queued here, so they go to Redis without a hop through the
    /// job's thread. Jobs that came several to a read (a busy queue: what
    /// counts is throughput) each have theirs queued by the job's thread as
    /// it starts, so that a quick job's `start` and outcome reach the settle
    /// thread together and go to Redis in one operation.
    fn hand_on(&self, runs: Vec<Run>) {
        let alone = runs.len() == 1;
        for Run(job, e, slot, first) in runs {
            let first = if alone {
                self.state.queue.push_all(first);
                None
            } else {
                Some(first)
            };
            self.send(job, e, slot, first);
        }
    }

    /// Send a job to the handler threads; `first`: its `claimed` and
    /// `start`, when they are its thread's to queue.
    fn send(&self, job: Job, e: Arc<Entry>, slot: Slot, first: Option<[Msg; 2]>) {
        let id = job.id.clone();
        let token = e.token.clone();
        let enqueued_ms = e.id.split('-').next().and_then(|ms| ms.parse().ok());
        let report = Box::new(RedisReport {
            state: self.state.clone(),
            entry: e,
            index: 0,
            first,
        });
        let task = Task::new(job, token, report, slot, enqueued_ms);
        if self.tasks.send(task).is_err() {
            log::error!("handler pool is gone; job {id} stays pending");
        }
    }

    /// A held job whose cancel key was set before it started: it ends
    /// `cancelled` without running.
    fn settle_cancelled(&self, e: Arc<Entry>) {
        log::info!(
            "job {} was cancelled before it started",
            e.job_id.as_deref().unwrap_or("?")
        );
        METRICS.cancelled_before_start(e.kind.as_deref().unwrap_or("unknown"));
        let outcome = Outcome::Cancelled("cancelled before start".into());
        self.state.queue.push(Msg::Finish(e, outcome));
    }
}

/// The `claimed` and `start` events of a job about to run, as JSON.
fn first_events(st: &StreamsState, e: &Entry) -> [String; 2] {
    let node = st.profile.facts();
    let claimed = event_json(e, "claimed", events::claimed(), &node);
    let kind = e.kind.as_deref().unwrap_or("job");
    let text = format!("{kind} job started on {}", node.node_name);
    let start = event_json(e, "start", events::start(&text), &node);
    [claimed, start]
}

/// Which runnable jobs of the batch were cancelled before they start: one
/// `EXISTS` of all their cancel keys (it counts those that exist: almost
/// always 0), and only when some exist one `EXISTS` per key, pipelined, to
/// tell which. If Redis cannot answer, the jobs start and the settle
/// thread's cancel check catches them.
fn cancelled_before_start(conn: &mut Conn, batch: &[(Entry, Verdict)]) -> Vec<bool> {
    let mut out = vec![false; batch.len()];
    let asked: Vec<(usize, String)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, (_, v))| match v {
            Verdict::Run(job) => Some((i, cancel_key(&job.id))),
            _ => None,
        })
        .collect();
    if asked.is_empty() {
        return out;
    }
    let mut any = redis::cmd("EXISTS");
    for (_, key) in &asked {
        any.arg(key);
    }
    match any.query::<u64>(conn) {
        Ok(0) => return out,
        Ok(_) => {}
        Err(e) => {
            log::debug!("cancel check before start failed: {e}");
            return out;
        }
    }
    let keys: Vec<&str> = asked.iter().map(|(_, k)| k.as_str()).collect();
    match exists_each(conn, &keys) {
        Ok(found) => {
            for ((i, _), yes) in asked.into_iter().zip(found) {
                out[i] = yes;
            }
        }
        Err(e) => log::debug!("cancel check before start failed: {e}"),
    }
    out
}

/// Whether each of `keys` exists: one EXISTS per key, sent together (on
/// a cluster each to its node). A key Redis refused to look at counts as
/// absent.
pub fn exists_each(conn: &mut Conn, keys: &[&str]) -> RedisResult<Vec<bool>> {
    let cmds: Vec<redis::Cmd> = keys
        .iter()
        .map(|k| {
            let mut exists = redis::cmd("EXISTS");
            exists.arg(*k);
            exists
        })
        .collect();
    Ok(conn
        .send_all(&cmds)?
        .into_iter()
        .map(|v| v == redis::Value::Int(1))
        .collect())
}

/// Where a running job's progress goes in Redis mode: into the settle
/// queue. Chunks never wait for a Redis that cannot take them: while
/// outcomes are blocked, they are dropped and counted (the job's result
/// still carries its whole output).
struct RedisReport {
    state: Arc<StreamsState>,
    entry: Arc<Entry>,
    index: u64,
    /// The `claimed` and `start` events, formatted when the entry was
    /// taken, when they are this thread's to queue (see `hand_on`).
    first: Option<[Msg; 2]>,
}

impl Report for RedisReport {
    fn started(&mut self) {
        if let Some(first) = self.first.take() {
            self.state.queue.push_all(first);
        }
    }

    fn chunk(&mut self, text: &str) {
        let e = &self.entry;
        let st = &self.state;
        let msg = if st.settings.coalesce_chunks {
            // Numbered and formatted by the settle thread, which merges the
            // texts of one job that wait together.
            Msg::Text(e.clone(), text.to_owned())
        } else {
            let json = chunk_json(e, text, self.index, &st.profile.facts());
            self.index += 1;
            Msg::Chunk(e.clone(), json)
        };
        let blocked = || st.settle_blocked.load(Ordering::SeqCst) || e.is_lost();
        if !st.queue.push_bounded_unless(msg, blocked) {
            st.dropped_chunks.fetch_add(1, Ordering::Relaxed);
            METRICS.chunks_dropped(1);
        }
    }

    fn finished(self: Box<Self>, outcome: Outcome) {
        self.state
            .queue
            .push(Msg::Finish(self.entry.clone(), outcome));
    }
}
