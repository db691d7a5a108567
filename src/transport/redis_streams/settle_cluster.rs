//! Sending a settle plan to a Redis Cluster. A job's keys are in several
//! slots (its stream and dead letters in the queue's, its status record,
//! events stream and channel each in their own), so no one script can
//! write an outcome. Each operation is instead, in this order:
//! 1. [`GUARD`] on the stream's node: is the consumer name ours, is the
//!    entry still pending for this consumer? Writes nothing.
//! 2. If so, the status record (and, for `start`, the event).
//! 3. For an outcome, the terminal event (events-stream append, PUBLISH),
//!    once per outcome however often the rest is sent again.
//! 4. [`ACK`] on the stream's node: checked again, dead letter, XACK.
//!
//! Sent again after a lost reply, an outcome writes its status again (the
//! same values) and nothing else twice. What one server's script gives and
//! this does not: between steps 1 and 4 another worker can take the entry
//! (only if this one stalled past claim-idle just then); its terminal event
//! may then have been published by this worker too. The replies are those
//! of the one-server batch script, one per step, so the settler reads them
//! the same way.

use super::scripts::{status_key, Scripts};
use super::settler::{ending, event_cmds, plain_cmds, Part, Step};
use super::{dead_letter, entry::Entry, StreamsState};
use crate::redis_conn::Conn;
use crate::worker::exec::Outcome;
use redis::{Cmd, RedisResult, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Outcomes whose terminal event went out: (stream, entry id).
pub type Announced = HashSet<(Arc<str>, String)>;

/// One reply per step, like the one-server pipeline's (see `per_step`).
pub fn send(
    conn: &mut Conn,
    scripts: &Scripts,
    st: &StreamsState,
    plan: &[Part],
    steps: &[Step],
    backlog: &[(Arc<Entry>, Option<Outcome>)],
    announced: &mut Announced,
) -> RedisResult<Vec<Value>> {
    let mut out = vec![Value::Nil; steps.len()];
    for part in plan {
        match part {
            Part::Plain(i, expire) => {
                let Step::Publish(e, json, _) = &steps[*i] else {
                    unreachable!("only plain events are sent plain")
                };
                out[*i] = first_error(&conn.send_all(&plain_cmds(st, e, json, *expire))?);
            }
            Part::Call(ops) => {
                let items: Vec<(usize, &Arc<Entry>, Option<&Outcome>, bool)> = ops
                    .iter()
                    .map(|&i| match &steps[i] {
                        Step::Start(e, _) => (i, e, None, false),
                        Step::Settle(k) => (i, &backlog[*k].0, backlog[*k].1.as_ref(), true),
                        Step::Publish(..) | Step::Text(..) => {
                            unreachable!("plain events are sent plain")
                        }
                    })
                    .collect();
                call(conn, scripts, st, steps, &items, announced, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// The operations of one planned script call: each step for all of them
/// at once (one round trip per node), in the order of the module doc.
fn call(
    conn: &mut Conn,
    scripts: &Scripts,
    st: &StreamsState,
    steps: &[Step],
    items: &[(usize, &Arc<Entry>, Option<&Outcome>, bool)],
    announced: &mut Announced,
    out: &mut [Value],
) -> RedisResult<()> {
    // Each item's claim key: the key of its stream's slot.
    let keys: Vec<String> = items
        .iter()
        .map(|(_, e, ..)| st.lock.key_for(&e.stream))
        .collect();
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (n, key) in keys.iter().enumerate() {
        by_key.entry(key).or_default().push(n);
    }
    let groups: Vec<(&str, Vec<usize>)> = by_key.into_iter().collect();
    // 1. Still ours?
    let guards: Vec<Cmd> = groups
        .iter()
        .map(|(lock_key, group)| {
            let mut guard = redis::cmd("EVALSHA");
            guard
                .arg(scripts.guard())
                .arg(1 + group.len())
                .arg(lock_key);
            for &n in group {
                guard.arg(&*items[n].1.stream);
            }
            guard
                .arg(&st.settings.group)
                .arg(&st.consumer)
                .arg(&st.lock.token);
            for &n in group {
                guard.arg(&items[n].1.id);
            }
            guard
        })
        .collect();
    let mut verdicts = vec![Value::Nil; items.len()];
    for ((_, group), reply) in groups.iter().zip(conn.send_all(&guards)?) {
        for (&n, v) in group.iter().zip(per_item(vec![reply], group.len())) {
            verdicts[n] = v;
        }
    }
    // 2. The status records (and the `start` events).
    let mut writes = Vec::new();
    let mut ranges = Vec::new();
    let mut ends = Vec::with_capacity(items.len());
    for (n, &(i, e, outcome, finish)) in items.iter().enumerate() {
        let end = ending(st, e, outcome);
        let from = writes.len();
        if verdicts[n] == Value::Int(1) {
            if !finish {
                let Step::Start(_, json) = &steps[i] else {
                    unreachable!("a start")
                };
                writes.extend(status_cmds(st, e, "processing", None));
                writes.extend(plain_cmds(st, e, json, true));
            } else if e.job_id.is_some() && !end.status.is_empty() {
                writes.extend(status_cmds(st, e, end.status, end.error));
            }
        }
        ranges.push(from..writes.len());
        ends.push(end);
    }
    let written = conn.send_all(&writes)?;
    let mut events = Vec::new();
    let mut sent = Vec::new();
    let mut acks: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (n, &(i, e, _, finish)) in items.iter().enumerate() {
        if verdicts[n] != Value::Int(1) {
            out[i] = std::mem::replace(&mut verdicts[n], Value::Nil);
            continue;
        }
        if let Value::ServerError(err) = first_error(&written[ranges[n].clone()]) {
            out[i] = Value::ServerError(err);
            continue;
        }
        if !finish {
            out[i] = Value::Int(1);
            continue;
        }
        // 3. The terminal event, once.
        let key = (e.stream.clone(), e.id.clone());
        if let (Some(json), Some(_)) = (&ends[n].event, &e.job_id) {
            if announced.insert(key.clone()) {
                // The events stream's final lifetime, then PUBLISH.
                let ttl = st.settings.events_ttl.as_secs();
                events.extend(event_cmds(st, e, json, Some(ttl)));
                sent.push(key);
            }
        }
        acks.entry(&keys[n]).or_default().push(n);
    }
    if let Err(e) = conn.send_all(&events) {
        // Maybe not sent: sent again with the rest (at least once).
        for key in sent {
            announced.remove(&key);
        }
        return Err(e);
    }
    // 4. Dead letter and XACK, checked again.
    let calls: Vec<Cmd> = acks
        .iter()
        .map(|(lock_key, group)| {
            let mut ack = redis::cmd("EVALSHA");
            ack.arg(scripts.ack())
                .arg(1 + 2 * group.len())
                .arg(*lock_key);
            for &n in group {
                let stream = &items[n].1.stream;
                ack.arg(&**stream).arg(dead_letter::stream_for(stream));
            }
            ack.arg(&st.settings.group)
                .arg(&st.consumer)
                .arg(&st.lock.token)
                .arg(st.settings.dlq_maxlen);
            for &n in group {
                let e = items[n].1;
                let fields = ends[n]
                    .dead_letter
                    .map(|(reason, error)| dead_letter::fields(e, reason, error, &st.consumer))
                    .unwrap_or_default();
                ack.arg(&e.id).arg(fields.len() * 2);
                for (k, v) in fields {
                    ack.arg(k).arg(v);
                }
            }
            ack
        })
        .collect();
    if !calls.is_empty() {
        for ((_, group), reply) in acks.iter().zip(conn.send_all(&calls)?) {
            for (&n, v) in group.iter().zip(per_item(vec![reply], group.len())) {
                out[items[n].0] = v;
            }
        }
    }
    // An outcome settled here or before (1, 0) owes no event any more.
    for &(i, e, _, finish) in items {
        if finish && matches!(out[i], Value::Int(0 | 1)) {
            announced.remove(&(e.stream.clone(), e.id.clone()));
        }
    }
    Ok(())
}

/// A script's reply, one element per item; a refusal of the whole call is
/// that error for each.
fn per_item(mut replies: Vec<Value>, n: usize) -> Vec<Value> {
    match replies.pop() {
        Some(Value::Array(items)) if items.len() == n => items,
        Some(Value::ServerError(e)) => vec![Value::ServerError(e); n],
        other => {
            log::warn!("unexpected reply to a cluster settle script: {other:?}");
            vec![Value::Nil; n]
        }
    }
}

/// The first refusal among replies, else the last reply.
fn first_error(replies: &[Value]) -> Value {
    replies
        .iter()
        .find(|r| matches!(r, Value::ServerError(_)))
        .or(replies.last())
        .cloned()
        .unwrap_or(Value::Nil)
}

/// The status record of `e`'s job, as the batch script writes it.
fn status_cmds(st: &StreamsState, e: &Entry, status: &str, error: Option<&str>) -> Vec<Cmd> {
    let key = status_key(e.job_id.as_deref().unwrap_or_default());
    let now = crate::clock::now_rfc3339();
    let mut hset = redis::cmd("HSET");
    hset.arg(&key)
        .arg("status")
        .arg(status)
        .arg("worker_id")
        .arg(&st.consumer)
        .arg("updated_at")
        .arg(&now);
    let mut cmds = Vec::with_capacity(3);
    match error {
        Some(err) => {
            hset.arg("error").arg(err);
            cmds.push(hset);
        }
        None => {
            cmds.push(hset);
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(&key).arg("error");
            cmds.push(hdel);
        }
    }
    let mut expire = redis::cmd("EXPIRE");
    expire.arg(&key).arg(st.settings.status_ttl.as_secs());
    cmds.push(expire);
    cmds
}
