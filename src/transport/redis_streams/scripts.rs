//! The Lua scripts through which this worker writes a job's state, and the
//! commands that call them. Each checks first, without writing, that this
//! process still holds its consumer name and that the entry is still
//! pending for this consumer; only then does it write, so that
//! - a batch sent again after a lost reply writes nothing twice (the entry
//!   was acknowledged by the first one),
//! - a worker whose lease was taken over writes nothing of the job,
//! - a Redis at `maxmemory` refuses the whole script: its first write is one
//!   that may grow memory (XADD, HSET), and Redis refuses such a first write
//!   of a script when it is out of memory. Nothing is acknowledged without
//!   its outcome.
//!
//! Replies: 1 done, 0 not pending for this consumer (already settled, or
//! another consumer owns it: nothing to do), -1 this process does not hold
//! its consumer name (take it again, then retry).

use super::dead_letter;
use super::entry::Entry;
use super::StreamsState;
use crate::events;
use redis::{Cmd, Connection, RedisResult};

const GUARD: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
";

/// KEYS: stream, lock, status key, dead-letter stream, events stream.
/// ARGV: group, consumer, token, entry id, status ('' = no job id: no
/// status), updated_at, status ttl, error ('' = none), channel, terminal
/// event ('' = none), dead-letter MAXLEN ('0' = none), events MAXLEN ('0' =
/// no events stream), events ttl, then the dead letter's fields (none = not
/// dead-lettered).
const SETTLE: &str = r"
if #ARGV > 13 then
  local xadd = {'XADD', KEYS[4]}
  if ARGV[11] ~= '0' then
    xadd[#xadd + 1] = 'MAXLEN'; xadd[#xadd + 1] = '~'; xadd[#xadd + 1] = ARGV[11]
  end
  xadd[#xadd + 1] = '*'
  for i = 14, #ARGV do xadd[#xadd + 1] = ARGV[i] end
  redis.call(unpack(xadd))
end
if ARGV[5] ~= '' then
  if ARGV[8] ~= '' then
    redis.call('HSET', KEYS[3], 'status', ARGV[5], 'worker_id', ARGV[2], 'updated_at', ARGV[6], 'error', ARGV[8])
  else
    redis.call('HSET', KEYS[3], 'status', ARGV[5], 'worker_id', ARGV[2], 'updated_at', ARGV[6])
    redis.call('HDEL', KEYS[3], 'error')
  end
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[4])
if ARGV[10] ~= '' then
  if ARGV[12] ~= '0' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[12], '*', 'event', ARGV[10])
    redis.call('EXPIRE', KEYS[5], ARGV[13])
  end
  redis.call('PUBLISH', ARGV[9], ARGV[10])
end
return 1
";

/// KEYS: stream, lock, status key, events stream. ARGV: group, consumer,
/// token, entry id, updated_at, status ttl, channel, start event, events
/// MAXLEN ('0' = no events stream), events ttl while the job runs.
const START: &str = r"
redis.call('HSET', KEYS[3], 'status', 'processing', 'worker_id', ARGV[2], 'updated_at', ARGV[5])
redis.call('HDEL', KEYS[3], 'error')
redis.call('EXPIRE', KEYS[3], ARGV[6])
if ARGV[9] ~= '0' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'event', ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[10])
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
";

/// The scripts' SHA1s on the connected server (loaded at connect, loaded
/// again after NOSCRIPT).
pub struct Scripts {
    settle: String,
    start: String,
}

impl Scripts {
    pub fn load(conn: &mut Connection) -> RedisResult<Scripts> {
        let load = |conn: &mut Connection, body: &str| {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{GUARD}{body}"))
                .query::<String>(conn)
        };
        Ok(Scripts {
            settle: load(conn, SETTLE)?,
            start: load(conn, START)?,
        })
    }

    /// The terminal write of `e`: status, dead letter (when `dead_letter`
    /// is given as (reason, error)), terminal event, XACK.
    pub fn settle(
        &self,
        st: &StreamsState,
        e: &Entry,
        status: &str,
        error: Option<&str>,
        event: Option<String>,
        dead_letter: Option<(&str, &str)>,
    ) -> Cmd {
        let s = &st.settings;
        let mut cmd = call(&self.settle, 5, st, e);
        cmd.arg(dead_letter::stream_for(&e.stream))
            .arg(events_key(e));
        cmd.arg(&s.group)
            .arg(&st.consumer)
            .arg(&st.lock.token)
            .arg(&e.id)
            .arg(if e.job_id.is_some() { status } else { "" })
            .arg(crate::clock::now_rfc3339())
            .arg(s.status_ttl.as_secs())
            .arg(error.unwrap_or_default())
            .arg(events::channel(e.job_id.as_deref().unwrap_or_default()))
            .arg(event.filter(|_| e.job_id.is_some()).unwrap_or_default())
            .arg(s.dlq_maxlen)
            .arg(events_maxlen(st))
            .arg(s.events_ttl.as_secs());
        if let Some((reason, error)) = dead_letter {
            for (k, v) in dead_letter::fields(e, reason, error, &st.consumer) {
                cmd.arg(k).arg(v);
            }
        }
        cmd
    }

    /// `processing` status and the `start` event of `e`.
    pub fn start(&self, st: &StreamsState, e: &Entry, event: &str) -> Cmd {
        let mut cmd = call(&self.start, 4, st, e);
        cmd.arg(events_key(e))
            .arg(&st.settings.group)
            .arg(&st.consumer)
            .arg(&st.lock.token)
            .arg(&e.id)
            .arg(crate::clock::now_rfc3339())
            .arg(st.settings.status_ttl.as_secs())
            .arg(events::channel(e.job_id.as_deref().unwrap_or_default()))
            .arg(event)
            .arg(events_maxlen(st))
            .arg(running_events_ttl(st));
        cmd
    }
}

/// The `events:v1:{jobId}` stream of `e`'s job.
pub fn events_key(e: &Entry) -> String {
    events::events_key(e.job_id.as_deref().unwrap_or_default())
}

/// The events stream's MAXLEN, `0` when the stream is turned off.
pub fn events_maxlen(st: &StreamsState) -> u64 {
    let s = &st.settings;
    if s.events_stream {
        s.events_maxlen
    } else {
        0
    }
}

/// The events stream's lifetime while its job runs (set at `claimed` and
/// `start`): as long as the status record's, so a job that never ends
/// (its entry deleted, say) does not leave its stream forever, and at least
/// the ttl after the end.
pub fn running_events_ttl(st: &StreamsState) -> u64 {
    let s = &st.settings;
    s.status_ttl.max(s.events_ttl).as_secs()
}

/// EVALSHA of `sha` with `keys` keys, the first three of which every
/// script has: stream, lock, status key.
fn call(sha: &str, keys: usize, st: &StreamsState, e: &Entry) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha)
        .arg(keys)
        .arg(&*e.stream)
        .arg(&st.lock.key)
        .arg(status_key(e.job_id.as_deref().unwrap_or_default()));
    cmd
}

pub fn status_key(job_id: &str) -> String {
    format!("job:{job_id}:status")
}

/// Taking back this consumer's own pending entries (after a restart or a
/// reconnect): XCLAIM, counting a delivery and returning the entries, of
/// those of the given ids that are still pending for this consumer. In one
/// script: between a separate XPENDING and XCLAIM another worker may have
/// reclaimed an entry (its holder's claim ran out just as this process took
/// the name over), and XCLAIM with min-idle 0 would take it away from that
/// live worker, which then loses its lease and the job runs twice.
/// KEYS: stream. ARGV: group, consumer, ids.
pub const TAKE_BACK_OWN: &str = r"
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    table.insert(owned, ARGV[i])
  end
end
local taken = {}
for _, id in ipairs(owned) do
  local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  if e[1] then table.insert(taken, e[1]) end
end
return taken
";

/// The lease renewal: renews the entries this consumer still owns
/// (resetting their idle time without counting a delivery) and returns the
/// ids it no longer owns. Atomic, so a lease is never taken back from a
/// worker that reclaimed it.
///
/// One XCLAIM per id, here and in [`TAKE_BACK_OWN`]: Redis 7.0 propagates
/// an XCLAIM of several ids called from a script to the AOF and to
/// replicas for its first id only, so after a restart (AOF replay) or a
/// failover every other entry kept the idle time of its last delivery and
/// was reclaimed from its live worker at once (seen in the chaos test).
pub const RENEW_LEASE: &str = r"
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
for _, id in ipairs(owned) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
end
return lost
";
