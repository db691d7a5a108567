//! The settle/lease thread: the only writer of a job's events, status and
//! outcome. It drains the settle queue in batches into one pipeline per batch
//! (events of many jobs, status writes, dead letters, then the XACKs), renews
//! the lease of every entry held, and checks running jobs' cancel keys.
//!
//! An entry leaves the in-flight set only after Redis accepted its outcome, so
//! a slot frees only when the ack is done. If Redis is away, the batch is
//! retried, unchanged, until it lands: an outcome is never dropped.

use super::dead_letter;
use super::entry::Entry;
use super::StreamsState;
use crate::backoff::Outage;
use crate::events::{self, NodeFacts};
use crate::redis_conn;
use crate::worker::cancel::CancelReason;
use crate::worker::exec::Outcome;
use redis::{Cmd, Connection, RedisResult, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What job threads and the reader tell the settle thread, in order.
pub enum Msg {
    /// The `claimed` event, formatted by the reader when it took the entry.
    Claimed(Arc<Entry>, String),
    /// The `start` event, formatted by the job's thread as it started. Events
    /// are formatted where they happen, so their timestamps follow their order.
    Started(Arc<Entry>, String),
    /// A chunk event, already formatted by the job's thread.
    Chunk(Arc<Entry>, String),
    Finish(Arc<Entry>, Outcome),
    /// A pending entry that was deleted from its stream: acknowledge only.
    Gone(Arc<Entry>),
}

/// Renews the lease of the entries this consumer still owns (resetting their
/// idle time without counting a delivery) and returns the ids it no longer
/// owns. Atomic, so a lease is never taken back from a worker that reclaimed it.
const RENEW_LEASE: &str = r"
local owned = {}
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    table.insert(owned, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
if #owned > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(owned), 'JUSTID')
end
return lost
";

pub struct Settler {
    shared: Arc<StreamsState>,
    conn: Option<Connection>,
    outage: Outage,
    lost: HashSet<(Arc<str>, String)>,
}

impl Settler {
    pub fn new(shared: Arc<StreamsState>) -> Self {
        Settler {
            shared,
            conn: None,
            outage: Outage::new("settle", "Redis", Duration::from_secs(30)),
            lost: HashSet::new(),
        }
    }

    pub fn run(mut self) {
        let s = &self.shared.settings;
        let renew_every = (s.claim_idle / 3).max(Duration::from_millis(10));
        let cancel_every = s.cancel_poll;
        let (mut next_renew, mut next_cancel) =
            (Instant::now() + renew_every, Instant::now() + cancel_every);
        loop {
            let stopping = self.shared.stop_settling.load(Ordering::SeqCst);
            let now = Instant::now();
            let wait = if stopping {
                Duration::from_millis(10)
            } else {
                next_renew.min(next_cancel).saturating_duration_since(now)
            };
            let batch = self.shared.queue.pop_batch(4096, wait);
            if !batch.is_empty() {
                self.settle(batch);
            } else if stopping {
                if let Some(c) = self.conn.as_mut() {
                    self.shared.lock.release(c);
                }
                return;
            }
            let now = Instant::now();
            if now >= next_cancel {
                next_cancel = now + cancel_every;
                self.check_cancel_keys();
            }
            if now >= next_renew {
                next_renew = now + renew_every;
                self.renew_leases();
            }
        }
    }

    fn settle(&mut self, batch: Vec<Msg>) {
        let sh = self.shared.clone();
        let worker = sh.consumer.as_str();
        let ended: HashSet<&str> = batch
            .iter()
            .filter_map(|m| match m {
                Msg::Finish(e, _) => e.job_id.as_deref(),
                _ => None,
            })
            .collect();
        let mut cmds: Vec<Cmd> = Vec::with_capacity(batch.len() * 3);
        let mut acks: BTreeMap<Arc<str>, Vec<&str>> = BTreeMap::new();
        let mut done: Vec<&Arc<Entry>> = Vec::new();
        for msg in &batch {
            match msg {
                Msg::Claimed(e, json) => {
                    cmds.push(publish_cmd(e.job_id.as_deref().unwrap_or_default(), json))
                }
                Msg::Started(e, json) => {
                    cmds.push(publish_cmd(e.job_id.as_deref().unwrap_or_default(), json));
                    // A status about to be overwritten in this same batch is skipped.
                    if !e.job_id.as_deref().is_some_and(|j| ended.contains(j)) {
                        self.status(&mut cmds, e, "processing", None);
                    }
                }
                Msg::Chunk(e, json) => {
                    cmds.push(publish_cmd(e.job_id.as_deref().unwrap_or_default(), json))
                }
                Msg::Finish(e, outcome) => {
                    done.push(e);
                    let (event, data, status, error) = match outcome {
                        Outcome::Success(v) => ("end", events::end(v), "completed", None),
                        Outcome::Failed { reason, error } => {
                            let mut xadd = Cmd::new();
                            xadd.arg("XADD").arg(dead_letter::stream_for(&e.stream));
                            if sh.settings.dlq_maxlen > 0 {
                                xadd.arg("MAXLEN").arg("~").arg(sh.settings.dlq_maxlen);
                            }
                            xadd.arg("*");
                            for (k, v) in dead_letter::fields(e, reason, error, worker) {
                                xadd.arg(k).arg(v);
                            }
                            cmds.push(xadd);
                            (
                                "error",
                                events::error(error, false),
                                "failed",
                                Some(error.as_str()),
                            )
                        }
                        Outcome::Cancelled(r) => {
                            ("cancelled", events::cancelled(r), "cancelled", None)
                        }
                        // Left pending on purpose: it will be delivered again.
                        Outcome::Abandoned | Outcome::Crashed(_) => continue,
                    };
                    if e.job_id.is_some() {
                        cmds.push(self.publish(e, event, data));
                        self.status(&mut cmds, e, status, error);
                    }
                    acks.entry(e.stream.clone()).or_default().push(&e.id);
                }
                Msg::Gone(e) => {
                    done.push(e);
                    acks.entry(e.stream.clone()).or_default().push(&e.id);
                }
            }
        }
        for (stream, ids) in acks {
            let mut ack = Cmd::new();
            ack.arg("XACK")
                .arg(&*stream)
                .arg(&sh.settings.group)
                .arg(ids);
            cmds.push(ack);
        }
        self.execute(&cmds);
        for e in done {
            sh.inflight.remove(&e.stream, &e.id);
            self.lost.remove(&(e.stream.clone(), e.id.clone()));
        }
    }

    fn publish(&self, e: &Entry, kind: &str, data: serde_json::Value) -> Cmd {
        let job_id = e.job_id.as_deref().unwrap_or_default();
        publish_cmd(job_id, &event_json(e, kind, data, &self.shared.node))
    }

    /// `job:{id}:status` is replaced whole, so no field of an earlier run
    /// (an old `error`) outlives it.
    fn status(&self, cmds: &mut Vec<Cmd>, e: &Entry, status: &str, error: Option<&str>) {
        let Some(job_id) = &e.job_id else { return };
        let key = format!("job:{job_id}:status");
        cmds.push(redis::cmd("DEL").arg(&key).clone());
        let mut hset = Cmd::new();
        hset.arg("HSET")
            .arg(&key)
            .arg("status")
            .arg(status)
            .arg("worker_id")
            .arg(&self.shared.consumer)
            .arg("updated_at")
            .arg(crate::clock::now_rfc3339());
        if let Some(err) = error {
            hset.arg("error").arg(err);
        }
        cmds.push(hset);
        cmds.push(
            redis::cmd("EXPIRE")
                .arg(&key)
                .arg(self.shared.settings.status_ttl.as_secs())
                .clone(),
        );
    }

    /// Run `cmds` as one pipeline, retrying through Redis outages until it
    /// lands (or the hard-stop deadline of a shutdown passes).
    fn execute(&mut self, cmds: &[Cmd]) {
        if cmds.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c.clone()).ignore();
        }
        loop {
            let result = self.connection().and_then(|c| pipe.query::<()>(c));
            match result {
                Ok(()) => {
                    self.outage.recovered();
                    return;
                }
                Err(e) if redis_conn::is_connection_error(&e) => {
                    self.conn = None;
                    if self.shared.past_hard_stop() {
                        log::error!(
                            "giving up on {} Redis commands at shutdown: {e}",
                            cmds.len()
                        );
                        return;
                    }
                    let wait = self.outage.failed(&e);
                    std::thread::sleep(wait.min(Duration::from_secs(2)));
                }
                Err(e) => {
                    // A command's own error (e.g. a key of the wrong type):
                    // run them one by one so the others still land.
                    log::warn!("a settle batch failed ({e}); applying its commands one by one");
                    for c in cmds {
                        if let Some(conn) = self.conn.as_mut() {
                            if let Err(e) = c.query::<Value>(conn) {
                                log::error!("Redis refused a settle command: {e}");
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    fn connection(&mut self) -> RedisResult<&mut Connection> {
        if self.conn.is_none() {
            let s = &self.shared.settings;
            self.conn = Some(redis_conn::connect(
                &s.redis_url,
                s.redis_timeout,
                s.redis_timeout,
            )?);
        }
        Ok(self.conn.as_mut().expect("connection just set"))
    }

    fn check_cancel_keys(&mut self) {
        let running: Vec<_> = self
            .shared
            .inflight
            .snapshot()
            .into_iter()
            .filter(|e| e.job_id.is_some() && !e.token.is_cancelled())
            .collect();
        if running.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for e in &running {
            pipe.cmd("EXISTS")
                .arg(cancel_key(e.job_id.as_deref().unwrap_or_default()));
        }
        let found = self.connection().and_then(|c| pipe.query::<Vec<bool>>(c));
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

    fn renew_leases(&mut self) {
        let shared = self.shared.clone();
        let held = self.connection().and_then(|c| shared.lock.hold(c));
        match held {
            Ok(Ok(())) => {}
            Ok(Err(holder)) => {
                if !self.shared.lock_lost.swap(true, Ordering::SeqCst) {
                    log::error!(
                        "consumer name '{}' was taken by {holder}; reading stops",
                        self.shared.consumer
                    );
                }
            }
            Err(e) => return self.failed_aside(e),
        }
        let mut by_stream: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
        for e in self.shared.inflight.snapshot() {
            by_stream
                .entry(e.stream.clone())
                .or_default()
                .push(e.id.clone());
        }
        for (stream, ids) in by_stream {
            let s = &self.shared.settings;
            let mut eval = redis::cmd("EVAL");
            eval.arg(RENEW_LEASE)
                .arg(1)
                .arg(&*stream)
                .arg(&s.group)
                .arg(&self.shared.consumer)
                .arg(&ids);
            match self.connection().and_then(|c| eval.query::<Vec<String>>(c)) {
                Ok(lost) => {
                    for id in lost {
                        if self.lost.insert((stream.clone(), id.clone())) {
                            log::warn!(
                                "lost the lease of entry {id} on {stream}: another worker reclaimed it \
                                 (this worker was unreachable longer than claim-idle)"
                            );
                        }
                    }
                }
                Err(e) => {
                    self.failed_aside(e);
                    return;
                }
            }
        }
    }

    /// A periodic task failed: drop a broken connection; the next batch or
    /// tick retries.
    fn failed_aside(&mut self, e: redis::RedisError) {
        if redis_conn::is_connection_error(&e) {
            self.conn = None;
            self.outage.failed(&e);
        } else {
            log::warn!("lease/cancel check failed: {e}");
        }
    }
}

pub fn cancel_key(job_id: &str) -> String {
    format!("job:cancelled:{job_id}")
}

/// An event of `e`'s job as its JSON text, timestamped now.
pub fn event_json(e: &Entry, kind: &str, data: serde_json::Value, node: &NodeFacts) -> String {
    let job_id = e.job_id.as_deref().unwrap_or_default();
    events::event(kind, job_id, e.ray_id.as_deref(), data, node)
}

fn publish_cmd(job_id: &str, json: &str) -> Cmd {
    redis::cmd("PUBLISH")
        .arg(events::channel(job_id))
        .arg(json)
        .clone()
}
