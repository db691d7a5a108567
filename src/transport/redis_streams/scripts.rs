//! The Lua scripts through which this worker writes a job's state, and the
//! commands that call them. The `processing` statuses and outcomes of a
//! settle batch go in few calls of [`BATCH`] ([`Batch::MAX_OPS`]
//! operations each; plain events are plain commands, see the settler's
//! `plan`). Each operation that writes a
//! job's state checks first, without writing, that this process still holds
//! its consumer name and that the entry is still pending for this consumer;
//! only then does it write, so that
//! - a batch sent again after a lost reply writes nothing twice (the entry
//!   was acknowledged by the first one),
//! - a worker whose lease was taken over writes nothing of the job,
//! - a Redis at `maxmemory` refuses the whole call: the script declares
//!   itself (`#!lua`, no `allow-oom`), so Redis refuses it before it runs
//!   when it is out of memory. Nothing is acknowledged without its outcome.
//!
//! Within a call, an outcome's writes come in the contract's order (dead
//! letter, status, XACK, events-stream append, PUBLISH); an operation that
//! Redis refuses (`WRONGTYPE` on a status key, say) stops there, answers
//! its error, and the next operation runs.
//!
//! Replies, one per operation: 1 done, 0 not pending for this consumer
//! (already settled, or another consumer owns it: nothing to do), -1 this
//! process does not hold its consumer name (take it again, then retry), or
//! the error Redis raised.

use super::dead_letter;
use super::entry::Entry;
use super::StreamsState;
use crate::events;
use crate::redis_conn::Conn;
use redis::{Cmd, RedisResult};

/// KEYS: the consumer-name lock. ARGV: group, consumer, token, updated_at,
/// status ttl, events MAXLEN ('0' = no events stream), events ttl after
/// the end, events ttl while running, dead-letter MAXLEN ('0' = none), then
/// the operations:
/// - `S` stream, entry id, status key, events key, channel, event: the
///   `processing` status and the `start` event (the events stream gets its
///   running ttl once, at the end of the call, unless an outcome of the
///   job in the same call set the final one);
/// - `C` stream, entry id, status key, events key, channel, cancel key,
///   `claimed` event, `start` event: a job read alone, started only if its
///   cancel key does not exist (reply 2 when it does, nothing written):
///   the `claimed` event, then what `S` writes, in one round trip with the
///   pre-start cancel check;
/// - `F` stream, entry id, status key, status ('' = none), error ('' =
///   none), dead-letter stream, events key, channel, terminal event ('' =
///   none), n, then n dead-letter field/value texts (n = 0: not
///   dead-lettered): the outcome, then XACK.
pub const BATCH: &str = r"#!lua
local group, consumer, now, status_ttl = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local ev_maxlen, ev_ttl, run_ttl, dlq_maxlen = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local held = redis.call('GET', KEYS[1]) == ARGV[3]
local ttl_due = {}
local function fail(e)
  if type(e) == 'table' and e.err then return e end
  return {err = tostring(e)}
end
local function pending(stream, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] == consumer
end
local function append(key, json)
  if ev_maxlen ~= '0' then
    redis.call('XADD', key, 'MAXLEN', '~', ev_maxlen, '*', 'event', json)
  end
end
local function status(key, value, err)
  if err ~= '' then
    redis.call('HSET', key, 'status', value, 'worker_id', consumer, 'updated_at', now, 'error', err)
  else
    redis.call('HSET', key, 'status', value, 'worker_id', consumer, 'updated_at', now)
    redis.call('HDEL', key, 'error')
  end
  redis.call('EXPIRE', key, status_ttl)
end
-- The processing status and the start event (args from i: status key,
-- events key, channel, event).
local function started(i, event)
  status(ARGV[i], 'processing', '')
  append(ARGV[i + 1], event)
  if ev_maxlen ~= '0' then ttl_due[ARGV[i + 1]] = run_ttl end
  redis.call('PUBLISH', ARGV[i + 2], event)
  return 1
end
local function start(i)
  if not pending(ARGV[i], ARGV[i + 1]) then return 0 end
  return started(i + 2, ARGV[i + 5])
end
local function checked_start(i)
  if not pending(ARGV[i], ARGV[i + 1]) then return 0 end
  if redis.call('EXISTS', ARGV[i + 5]) == 1 then return 2 end
  append(ARGV[i + 3], ARGV[i + 6])
  redis.call('PUBLISH', ARGV[i + 4], ARGV[i + 6])
  return started(i + 2, ARGV[i + 7])
end
local function finish(i, n)
  if not pending(ARGV[i], ARGV[i + 1]) then return 0 end
  if n > 0 then
    local xadd = {'XADD', ARGV[i + 5]}
    if dlq_maxlen ~= '0' then
      xadd[#xadd + 1] = 'MAXLEN'; xadd[#xadd + 1] = '~'; xadd[#xadd + 1] = dlq_maxlen
    end
    xadd[#xadd + 1] = '*'
    for j = i + 10, i + 9 + n do xadd[#xadd + 1] = ARGV[j] end
    redis.call(unpack(xadd))
  end
  if ARGV[i + 3] ~= '' then status(ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]) end
  redis.call('XACK', ARGV[i], group, ARGV[i + 1])
  if ARGV[i + 8] ~= '' then
    if ev_maxlen ~= '0' then
      append(ARGV[i + 6], ARGV[i + 8])
      redis.call('EXPIRE', ARGV[i + 6], ev_ttl)
      ttl_due[ARGV[i + 6]] = nil
    end
    redis.call('PUBLISH', ARGV[i + 7], ARGV[i + 8])
  end
  return 1
end
local function guarded(f, ...)
  if not held then return -1 end
  local ok, e = pcall(f, ...)
  if ok then return e end
  return fail(e)
end
local out = {}
local i = 10
while i <= #ARGV do
  local op, r = ARGV[i], nil
  if op == 'S' then
    r = guarded(start, i + 1)
    i = i + 7
  elseif op == 'C' then
    r = guarded(checked_start, i + 1)
    i = i + 9
  elseif op == 'F' then
    local n = tonumber(ARGV[i + 10])
    r = guarded(finish, i + 1, n)
    i = i + 11 + n
  else
    return redis.error_reply('citadel batch: unknown operation ' .. tostring(op))
  end
  out[#out + 1] = r
end
for key, ttl in pairs(ttl_due) do pcall(redis.call, 'EXPIRE', key, ttl) end
return out
";

/// A sweep read (no BLOCK) with the pre-start cancel check in the same
/// round trip, on a single Redis: `XREADGROUP … COUNT n STREAMS stream >`,
/// then, as `intake::cancelled_before_start` does in two round trips, one
/// `EXISTS` of the cancel keys of every entry read (almost always 0), and
/// only when some exist one per key. An entry's job id is its first
/// `jobId` field (as `Entry::new` reads it); an entry without one is not
/// cancelled. Declared `allow-oom` like the plain read it replaces: reading
/// adds only pending entries, and whether to read while outcomes wait is
/// the reader's call. Not on a cluster: a job's cancel key lives in
/// another slot than its stream.
/// KEYS: stream. ARGV: group, consumer, count, the cancel keys' prefix.
/// Reply: the entries (as in XRANGE), then one 0/1 per entry.
pub const CHECKED_READ: &str = r"#!lua flags=allow-oom
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not r then return {{}, {}} end
local entries, keys, cancelled = r[1][2], {}, {}
for i, e in ipairs(entries) do
  local f = e[2]
  cancelled[i] = 0
  for j = 1, #f - 1, 2 do
    if f[j] == 'jobId' then
      if f[j + 1] ~= '' then keys[i] = ARGV[4] .. f[j + 1] end
      break
    end
  end
end
local some, batch = false, {}
for i = 1, #entries do
  if keys[i] then batch[#batch + 1] = keys[i] end
  if #batch == 256 or (i == #entries and #batch > 0) then
    some = some or redis.call('EXISTS', unpack(batch)) > 0
    batch = {}
  end
end
if some then
  for i = 1, #entries do
    if keys[i] then cancelled[i] = redis.call('EXISTS', keys[i]) end
  end
end
return {entries, cancelled}
";

/// On a cluster: whether this process holds its consumer name (the claim's
/// key of these streams' slot) and each entry is still pending for this
/// consumer. Writes nothing, so it also runs on a Redis at `maxmemory`.
/// KEYS: the claim's key, then one stream per entry (all in one slot).
/// ARGV: group, consumer, token, then the entry ids. Reply per entry: 1,
/// 0 (not pending for this consumer) or -1 (the name is not ours).
pub const GUARD: &str = r"#!lua flags=no-writes
local out = {}
local held = redis.call('GET', KEYS[1]) == ARGV[3]
for k = 2, #KEYS do
  if not held then
    out[#out + 1] = -1
  else
    local id = ARGV[k + 2]
    local p = redis.call('XPENDING', KEYS[k], ARGV[1], id, id, 1)
    if p[1] ~= nil and p[1][2] == ARGV[2] then out[#out + 1] = 1 else out[#out + 1] = 0 end
  end
end
return out
";

/// On a cluster: the part of outcomes that lives in their streams' slot,
/// each checked first like [`BATCH`]'s: the dead letter (when given), then
/// XACK. Declared `#!lua` without `allow-oom`, so a Redis at `maxmemory`
/// refuses it whole: nothing is acknowledged without its dead letter.
/// KEYS: the claim's key, then per entry its stream and its dead-letter
/// stream. ARGV: group, consumer, token, dead-letter MAXLEN ('0' = none),
/// then per entry: id, n, then n dead-letter field/value texts. Reply per
/// entry as [`GUARD`]'s, or the error Redis raised.
pub const ACK: &str = r"#!lua
local group, consumer, maxlen = ARGV[1], ARGV[2], ARGV[4]
local held = redis.call('GET', KEYS[1]) == ARGV[3]
local out = {}
local k, a = 2, 5
while k <= #KEYS do
  local n = tonumber(ARGV[a + 1])
  if not held then
    out[#out + 1] = -1
  else
    local ok, r = pcall(function()
      local id = ARGV[a]
      local p = redis.call('XPENDING', KEYS[k], group, id, id, 1)
      if p[1] == nil or p[1][2] ~= consumer then return 0 end
      if n > 0 then
        local xadd = {'XADD', KEYS[k + 1]}
        if maxlen ~= '0' then
          xadd[#xadd + 1] = 'MAXLEN'; xadd[#xadd + 1] = '~'; xadd[#xadd + 1] = maxlen
        end
        xadd[#xadd + 1] = '*'
        for j = a + 2, a + 1 + n do xadd[#xadd + 1] = ARGV[j] end
        redis.call(unpack(xadd))
      end
      redis.call('XACK', KEYS[k], group, id)
      return 1
    end)
    if ok then out[#out + 1] = r
    elseif type(r) == 'table' and r.err then out[#out + 1] = r
    else out[#out + 1] = {err = tostring(r)} end
  end
  k = k + 2
  a = a + 2 + n
end
return out
";

/// The scripts' SHA1s on the connected server (loaded at connect, loaded
/// again after NOSCRIPT); on a cluster, on every node. [`GUARD`] and
/// [`ACK`] only on a cluster, the only place they are used;
/// [`CHECKED_READ`] only for the reader of a single Redis.
pub struct Scripts {
    batch: String,
    cluster: Option<[String; 2]>,
    read: Option<String>,
}

impl Scripts {
    /// The settle thread's: the batch script, and on a cluster its parts.
    pub fn load(conn: &mut Conn) -> RedisResult<Scripts> {
        Ok(Scripts {
            batch: load(conn, BATCH)?,
            cluster: match conn.is_cluster() {
                true => Some([load(conn, GUARD)?, load(conn, ACK)?]),
                false => None,
            },
            read: None,
        })
    }

    /// The reader's, on a single Redis: the batch script (for the checked
    /// start of a job read alone) and [`CHECKED_READ`].
    pub fn load_for_reader(conn: &mut Conn) -> RedisResult<Scripts> {
        Ok(Scripts {
            batch: load(conn, BATCH)?,
            cluster: None,
            read: Some(load(conn, CHECKED_READ)?),
        })
    }

    /// A call of [`CHECKED_READ`] (loaded for the reader only).
    pub fn checked_read(&self, st: &StreamsState, stream: &str, count: usize) -> Cmd {
        let sha = self
            .read
            .as_ref()
            .expect("CHECKED_READ is loaded for the reader");
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha)
            .arg(1)
            .arg(stream)
            .arg(&st.settings.group)
            .arg(&st.consumer)
            .arg(count)
            .arg(super::settler::CANCEL_PREFIX);
        cmd
    }

    /// [`GUARD`]'s SHA1 (loaded on a cluster only).
    pub fn guard(&self) -> &str {
        &self.cluster.as_ref().expect("GUARD is loaded on a cluster")[0]
    }

    /// [`ACK`]'s SHA1 (loaded on a cluster only).
    pub fn ack(&self) -> &str {
        &self.cluster.as_ref().expect("ACK is loaded on a cluster")[1]
    }

    /// An empty call of the batch script.
    pub fn batch<'a>(&self, st: &'a StreamsState) -> Batch<'a> {
        let s = &st.settings;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.batch)
            .arg(1)
            .arg(&st.lock.key)
            .arg(&s.group)
            .arg(&st.consumer)
            .arg(&st.lock.token)
            .arg(crate::clock::now_rfc3339())
            .arg(s.status_ttl.as_secs())
            .arg(events_maxlen(st))
            .arg(s.events_ttl.as_secs())
            .arg(running_events_ttl(st))
            .arg(s.dlq_maxlen);
        Batch { st, cmd }
    }
}

/// One call of [`BATCH`] being built; its reply has one element per
/// operation, in order.
pub struct Batch<'a> {
    st: &'a StreamsState,
    cmd: Cmd,
}

impl Batch<'_> {
    /// Operations per call: one call blocks Redis while it runs (about
    /// 10 µs an operation), so a batch of thousands is split.
    pub const MAX_OPS: usize = 128;

    /// `processing` status and the `start` event of `e`.
    pub fn start(&mut self, e: &Entry, json: &str) {
        self.starting("S", e).arg(json);
    }

    /// `claimed`, `processing` status and `start` of `e`, unless its job's
    /// cancel key exists (see `C` in [`BATCH`]).
    pub fn checked_start(&mut self, e: &Entry, cancel_key: &str, claimed: &str, start: &str) {
        self.starting("C", e)
            .arg(cancel_key)
            .arg(claimed)
            .arg(start);
    }

    /// The first arguments of `S` and `C`: stream, entry id, status key,
    /// events key, channel.
    fn starting(&mut self, op: &str, e: &Entry) -> &mut Cmd {
        self.cmd
            .arg(op)
            .arg(&*e.stream)
            .arg(&e.id)
            .arg(status_key(e.job_id.as_deref().unwrap_or_default()))
            .arg(events_key(e))
            .arg(channel(e))
    }

    /// The terminal write of `e`: status, dead letter (when `dead_letter`
    /// is given as (reason, error)), XACK, terminal event.
    pub fn finish(
        &mut self,
        e: &Entry,
        status: &str,
        error: Option<&str>,
        event: Option<String>,
        dead_letter: Option<(&str, &str)>,
    ) {
        let fields = dead_letter
            .map(|(reason, error)| dead_letter::fields(e, reason, error, &self.st.consumer))
            .unwrap_or_default();
        self.cmd
            .arg("F")
            .arg(&*e.stream)
            .arg(&e.id)
            .arg(status_key(e.job_id.as_deref().unwrap_or_default()))
            .arg(if e.job_id.is_some() { status } else { "" })
            .arg(error.unwrap_or_default())
            .arg(dead_letter::stream_for(&e.stream))
            .arg(events_key(e))
            .arg(channel(e))
            .arg(event.filter(|_| e.job_id.is_some()).unwrap_or_default())
            .arg(fields.len() * 2);
        for (k, v) in fields {
            self.cmd.arg(k).arg(v);
        }
    }

    pub fn into_cmd(self) -> Cmd {
        self.cmd
    }
}

fn load(conn: &mut Conn, text: &str) -> RedisResult<String> {
    redis::cmd("SCRIPT").arg("LOAD").arg(text).query(conn)
}

fn channel(e: &Entry) -> String {
    events::channel(e.job_id.as_deref().unwrap_or_default())
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
