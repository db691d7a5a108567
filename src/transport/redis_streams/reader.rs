//! The reader thread: the only code that takes entries from Redis. It asks
//! for no more entries than there are free slots (see `inflight`), first takes
//! back this consumer's own pending entries (id `0`), then reads new ones
//! (id `>`), and every claim-idle/3 reclaims entries that dead consumers left
//! idle. Each entry read is classified (run it, dead-letter it, or just ack a
//! deleted one) and handed on; nothing here waits for a job to finish.

use super::entry::{self, Entry, RawEntry};
use super::settler::{cancel_key, event_json, Msg};
use super::StreamsState;
use crate::backoff::Outage;
use crate::events;
use crate::redis_conn;
use crate::worker::exec::{Executor, Outcome};
use crate::worker::pool::{Report, Task};
use crate::worker::slots::Slot;
use crossbeam_channel::Sender;
use redis::{Connection, RedisResult, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Reader {
    shared: Arc<StreamsState>,
    exec: Arc<Executor>,
    tasks: Sender<Task>,
    conn: Option<Connection>,
    outage: Outage,
    /// Per stream, how far this consumer's own pending entries were taken
    /// back; `None` once they all were.
    history: Option<Vec<String>>,
    next_reclaim: Instant,
    rotate: usize,
    lock_warned: bool,
    /// Slots taken for the current step; each entry run takes one.
    free: Vec<Slot>,
    /// Entries handed on during the current step.
    taken: usize,
}

enum Verdict {
    Run(crate::job::Job),
    Reject(&'static str, String),
    Gone,
}

impl Reader {
    pub fn new(shared: Arc<StreamsState>, exec: Arc<Executor>, tasks: Sender<Task>) -> Self {
        Reader {
            shared,
            exec,
            tasks,
            conn: None,
            outage: Outage::new("reader", "Redis", Duration::from_secs(30)),
            history: None,
            next_reclaim: Instant::now(),
            rotate: 0,
            lock_warned: false,
            free: Vec::new(),
            taken: 0,
        }
    }

    pub fn run(mut self) {
        let slots = self.shared.slots.clone();
        let capacity = slots.capacity();
        while !self.shared.stopping() {
            let inflight = &self.shared.inflight;
            let mut free = slots.take(Duration::from_millis(250), || {
                capacity.saturating_sub(inflight.len())
            });
            if free.is_empty() {
                continue;
            }
            if self.shared.stopping() {
                break;
            }
            let n = free.len();
            self.free = std::mem::take(&mut free);
            let result = self.step(n);
            self.free.clear();
            if let Err(e) = result {
                self.conn = None;
                let wait = if redis_conn::is_connection_error(&e) {
                    self.outage.failed(&e)
                } else {
                    log::warn!("reading jobs failed: {e}");
                    Duration::from_millis(200)
                };
                self.shared.sleep(wait);
            }
        }
        log::debug!("reader stopped");
    }

    fn step(&mut self, free: usize) -> RedisResult<()> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
            self.outage.recovered();
            // A read cut off by the outage may have delivered entries to this
            // consumer that nobody runs: take back own pending entries first.
            self.history = Some(vec!["0-0".to_string(); self.shared.streams.len()]);
            self.shared.lock_lost.store(true, Ordering::SeqCst);
        }
        let mut conn = self.conn.take().expect("connection just opened");
        if self.shared.lock_lost.load(Ordering::SeqCst) {
            let held = self.shared.lock.hold(&mut conn);
            self.conn = Some(conn);
            match held? {
                Ok(()) => {
                    if self.lock_warned {
                        log::info!(
                            "consumer name '{}' is ours again; reading",
                            self.shared.consumer
                        );
                    }
                    self.lock_warned = false;
                    self.shared.lock_lost.store(false, Ordering::SeqCst);
                }
                Err(holder) => {
                    if !self.lock_warned {
                        log::error!(
                            "consumer name '{}' is in use by another live worker ({holder}); not reading \
                             until it stops. Give each worker its own --consumer/--node-name.",
                            self.shared.consumer
                        );
                    }
                    self.lock_warned = true;
                    self.shared.sleep(Duration::from_millis(500));
                }
            }
            return Ok(());
        }
        let result = if self.history.is_some() {
            self.take_back_own(&mut conn, free)
        } else if Instant::now() >= self.next_reclaim {
            let every = (self.shared.settings.claim_idle / 3).max(Duration::from_millis(10));
            self.next_reclaim = Instant::now() + every;
            self.reclaim(&mut conn, free)
        } else {
            self.read_new(&mut conn, free)
        };
        self.conn = Some(conn);
        result
    }

    fn open(&self) -> RedisResult<Connection> {
        let s = &self.shared.settings;
        let mut conn =
            redis_conn::connect(&s.redis_url, s.redis_timeout, s.block + s.redis_timeout)?;
        for stream in &self.shared.streams {
            let created: RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&**stream)
                .arg(&s.group)
                .arg("0")
                .arg("MKSTREAM")
                .query(&mut conn);
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
                _ => {}
            }
        }
        let id: u64 = redis::cmd("CLIENT").arg("ID").query(&mut conn)?;
        self.shared.reader_client.store(id, Ordering::SeqCst);
        Ok(conn)
    }

    /// XREADGROUP with explicit ids returns this consumer's pending entries
    /// (counting a delivery each): what a previous run of it left unfinished.
    fn take_back_own(&mut self, conn: &mut Connection, free: usize) -> RedisResult<()> {
        let cursors = self.history.clone().unwrap_or_default();
        let mut left = free;
        let mut any = false;
        for (i, stream) in self.shared.streams.clone().iter().enumerate() {
            if left == 0 {
                return Ok(());
            }
            let reply = self.xreadgroup(conn, left, None, &[stream], &cursors[i])?;
            for (_, entries) in reply {
                if let (Some(last), Some(h)) = (entries.last(), self.history.as_mut()) {
                    h[i] = last.id.clone();
                }
                any |= !entries.is_empty();
                left = left.saturating_sub(entries.len());
                let n = self.dispatch(conn, stream, entries, true)?;
                if n > 0 {
                    log::info!("resuming {n} of this consumer's own pending entries on {stream}");
                }
            }
        }
        if !any {
            self.history = None;
        }
        Ok(())
    }

    /// XAUTOCLAIM entries idle longer than claim-idle, up to the free slots.
    fn reclaim(&mut self, conn: &mut Connection, free: usize) -> RedisResult<()> {
        let s = self.shared.clone();
        let mut left = free;
        for stream in &s.streams {
            let mut cursor = "0-0".to_string();
            for _ in 0..16 {
                if left == 0 {
                    return Ok(());
                }
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&**stream)
                    .arg(&s.settings.group)
                    .arg(&s.consumer)
                    .arg(s.settings.claim_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(left)
                    .query(conn)?;
                let Value::Array(mut parts) = reply else {
                    break;
                };
                if parts.len() < 2 {
                    break;
                }
                let entries = entry::parse_entries(parts.swap_remove(1)).map_err(parse_error)?;
                cursor = entry::text(parts.swap_remove(0)).map_err(parse_error)?;

                let n = self.dispatch(conn, stream, entries, true)?;
                if n > 0 {
                    log::info!("reclaimed {n} entries idle over claim-idle on {stream}");
                    left = left.saturating_sub(n);
                }
                if cursor == "0-0" {
                    break;
                }
            }
        }
        Ok(())
    }

    /// New entries. First a sweep without BLOCK, each stream asked for the
    /// slots still free; when that finds nothing, one BLOCK on all streams with
    /// COUNT 1 (COUNT is per stream, so this stays within the free slots).
    fn read_new(&mut self, conn: &mut Connection, free: usize) -> RedisResult<()> {
        let s = self.shared.clone();
        let mut left = free;
        for stream in &s.streams {
            if left == 0 {
                return Ok(());
            }
            for (_, entries) in self.xreadgroup(conn, left, None, &[stream], ">")? {
                left -= self.dispatch(conn, stream, entries, false)?.min(left);
            }
        }
        if left < free || self.shared.stopping() {
            return Ok(());
        }
        let until_reclaim = self.next_reclaim.saturating_duration_since(Instant::now());
        let mut block = s
            .settings
            .block
            .min(until_reclaim)
            .max(Duration::from_millis(1));
        let streams: Vec<&Arc<str>> = if free >= s.streams.len() {
            s.streams.iter().collect()
        } else {
            // Fewer free slots than streams (COUNT is per stream). Block on
            // the queues, where most jobs come from, and wake at least every
            // 100 ms so that the sweep above also looks at the node's own
            // stream; with fewer slots than queues, the queues take turns.
            block = block.min(Duration::from_millis(100));
            let node = s.settings.node_stream();
            let mut queues: Vec<&Arc<str>> = s.streams.iter().filter(|st| ***st != *node).collect();
            if queues.is_empty() {
                queues = s.streams.iter().collect();
            }
            if free < queues.len() {
                self.rotate = (self.rotate + 1) % queues.len();
                queues.rotate_left(self.rotate);
                queues.truncate(free);
            }
            queues
        };
        for (name, entries) in self.xreadgroup(conn, 1, Some(block), &streams, ">")? {
            if let Some(stream) = s.streams.iter().find(|st| ***st == *name) {
                self.dispatch(conn, stream, entries, false)?;
            }
        }
        Ok(())
    }

    fn xreadgroup(
        &self,
        conn: &mut Connection,
        count: usize,
        block: Option<Duration>,
        streams: &[&Arc<str>],
        id: &str,
    ) -> RedisResult<Vec<(String, Vec<RawEntry>)>> {
        let s = &self.shared;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&s.settings.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for st in streams {
            cmd.arg(&***st);
        }
        for _ in streams {
            cmd.arg(id);
        }
        entry::parse_read_reply(cmd.query(conn)?).map_err(parse_error)
    }

    /// Classify entries and hand each on; returns how many were taken
    /// (entries this worker already runs are skipped). `redelivered` entries have their
    /// delivery count looked up, since Redis's count decides about poison.
    fn dispatch(
        &mut self,
        conn: &mut Connection,
        stream: &Arc<str>,
        raws: Vec<RawEntry>,
        redelivered: bool,
    ) -> RedisResult<usize> {
        if raws.is_empty() {
            return Ok(0);
        }
        let before = self.taken;
        let s = self.shared.clone();
        let counts = if redelivered {
            Some(delivery_counts(conn, &s, stream, &raws)?)
        } else {
            None
        };
        let mut batch: Vec<(Entry, Verdict)> = Vec::with_capacity(raws.len());
        for raw in raws {
            if s.inflight.contains(stream, &raw.id) {
                continue; // already running here (a re-read of own pending entries)
            }
            let deliveries = match &counts {
                None => 1,
                Some(c) => match c.get(&raw.id) {
                    Some(n) => *n,
                    None => continue, // acknowledged meanwhile: nothing to do
                },
            };
            let gone = raw.fields.is_none();
            let mut e = Entry::new(stream.clone(), raw, deliveries);
            let verdict = if gone {
                Verdict::Gone
            } else if deliveries > s.settings.max_deliveries {
                Verdict::Reject(
                    "exceeded max deliveries",
                    format!(
                        "delivered {deliveries} times, more than max-deliveries ({}); last runs crashed or timed out",
                        s.settings.max_deliveries
                    ),
                )
            } else {
                match e.parse(&self.exec.registry, s.settings.max_job_size) {
                    Ok(job) => Verdict::Run(job),
                    Err(why) => Verdict::Reject("malformed job", why),
                }
            };
            batch.push((e, verdict));
        }
        let cancelled = self.cancelled_before_start(conn, &batch);
        for ((e, verdict), cancelled) in batch.into_iter().zip(cancelled) {
            let e = Arc::new(e);
            s.inflight.insert(e.clone());
            self.taken += 1;
            match verdict {
                Verdict::Gone => s.queue.push(Msg::Gone(e)),
                Verdict::Reject(reason, error) => {
                    log::warn!(
                        "dead-lettering entry {} of {} ({reason}): {error}",
                        e.id,
                        e.stream
                    );
                    s.queue
                        .push(Msg::Finish(e, Outcome::Failed { reason, error }));
                }
                Verdict::Run(_) if cancelled => {
                    log::info!(
                        "job {} was cancelled before it started",
                        e.job_id.as_deref().unwrap_or("?")
                    );
                    s.queue.push(Msg::Finish(
                        e,
                        Outcome::Cancelled("cancelled before start".into()),
                    ));
                }
                Verdict::Run(job) => {
                    let claimed = event_json(&e, "claimed", events::claimed(), &s.node);
                    s.queue.push(Msg::Claimed(e.clone(), claimed));
                    let report = Box::new(RedisReport {
                        shared: s.clone(),
                        entry: e.clone(),
                        index: 0,
                    });
                    let Some(slot) = self.free.pop() else {
                        log::error!("no free slot for entry {}; it stays pending", e.id);
                        continue;
                    };
                    let task = Task {
                        job,
                        token: e.token.clone(),
                        report,
                        slot,
                    };
                    if self.tasks.send(task).is_err() {
                        log::error!("handler pool is gone; entry {} stays pending", e.id);
                    }
                }
            }
        }
        Ok(self.taken - before)
    }

    /// One EXISTS per runnable job, pipelined. If Redis cannot answer, the
    /// jobs start and the settle thread's cancel check catches them.
    fn cancelled_before_start(
        &self,
        conn: &mut Connection,
        batch: &[(Entry, Verdict)],
    ) -> Vec<bool> {
        let mut pipe = redis::pipe();
        let mut asked = Vec::new();
        for (i, (e, v)) in batch.iter().enumerate() {
            if let (Verdict::Run(job), Some(_)) = (v, &e.job_id) {
                pipe.cmd("EXISTS").arg(cancel_key(&job.id));
                asked.push(i);
            }
        }
        let mut out = vec![false; batch.len()];
        if asked.is_empty() {
            return out;
        }
        match pipe.query::<Vec<bool>>(conn) {
            Ok(found) => {
                for (i, yes) in asked.into_iter().zip(found) {
                    out[i] = yes;
                }
            }
            Err(e) => log::debug!("cancel check before start failed: {e}"),
        }
        out
    }
}

/// Redis's delivery counts of `raws`, from this consumer's pending list.
fn delivery_counts(
    conn: &mut Connection,
    s: &StreamsState,
    stream: &Arc<str>,
    raws: &[RawEntry],
) -> RedisResult<HashMap<String, u64>> {
    let (first, last) = (&raws[0].id, &raws[raws.len() - 1].id);
    let reply: Value = redis::cmd("XPENDING")
        .arg(&**stream)
        .arg(&s.settings.group)
        .arg(first)
        .arg(last)
        .arg(raws.len() + s.inflight.len() + 16)
        .arg(&s.consumer)
        .query(conn)?;
    let mut counts = HashMap::new();
    if let Value::Array(rows) = reply {
        for row in rows {
            if let Value::Array(cols) = row {
                if let (Some(Value::BulkString(id)), Some(Value::Int(n))) =
                    (cols.first(), cols.get(3))
                {
                    counts.insert(String::from_utf8_lossy(id).into_owned(), *n as u64);
                }
            }
        }
    }
    Ok(counts)
}

fn parse_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply", msg))
}

/// Where a running job's progress goes in Redis mode: into the settle queue.
struct RedisReport {
    shared: Arc<StreamsState>,
    entry: Arc<Entry>,
    index: u64,
}

impl Report for RedisReport {
    fn started(&mut self) {
        let e = &self.entry;
        let kind = e.kind.as_deref().unwrap_or("job");
        let node = &self.shared.node;
        let text = format!("{kind} job started on {}", node.node_name);
        let start = event_json(e, "start", events::start(&text), node);
        self.shared.queue.push(Msg::Started(e.clone(), start));
    }

    fn chunk(&mut self, text: &str) {
        let e = &self.entry;
        let json = event_json(
            e,
            "chunk",
            events::chunk(text, self.index),
            &self.shared.node,
        );
        self.index += 1;
        self.shared.queue.push_bounded(Msg::Chunk(e.clone(), json));
    }

    fn finished(self: Box<Self>, outcome: Outcome) {
        if let Outcome::Crashed(why) = &outcome {
            log::error!(
                "entry {} of {} left pending after a handler crash ({why}); it will be redelivered after claim-idle",
                self.entry.id,
                self.entry.stream
            );
        }
        self.shared
            .queue
            .push(Msg::Finish(self.entry.clone(), outcome));
    }
}
