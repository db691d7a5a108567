//! One live process per consumer name. Two processes reading as the same
//! consumer would share one pending list: each would take back the other's
//! running entries and renew leases it does not hold. So a worker holds the
//! key `citadel:v1:consumer:{group}:{consumer}` while it reads.
//!
//! The key's value is a random id drawn per process (plus host and pid, only
//! to name the holder in messages): two containers on host networking both
//! run citadel as pid 1 under the host's hostname, so host + pid names no
//! process. The key expires after a few seconds ([`ConsumerLock::ttl`]) and
//! is renewed every third of that, so a holder killed with `kill -9` is
//! taken over within seconds. A process that finds the name held at start
//! watches the key: if the holder renews it, the name is in use by a live
//! worker and the process refuses to start; if it expires, it is taken.
//! Every outcome this process settles checks, in the same script, that the
//! key still holds its id (see `settle`).
//!
//! On a Redis Cluster that script runs on the node of the job's stream, so
//! the claim is one key per hash tag of the streams read,
//! `citadel:v1:consumer:{TAG}:{group}:{consumer}` (in the streams' slot),
//! all taken, renewed and released together.

use crate::redis_conn::Conn;
use redis::{RedisResult, Value};
use std::time::{Duration, Instant};

/// Take the key if it is free, renew it if ours; returns nil when held by
/// us afterwards, else `{holder, pttl}`. Our own key is renewed with
/// PEXPIRE, which a Redis at `maxmemory` still runs (SET it refuses): a
/// worker keeps its name through a Redis that is full, however long.
const HOLD: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return false
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return {cur, redis.call('PTTL', KEYS[1])}
";

const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

pub struct ConsumerLock {
    /// The key on one server; on a cluster, the key for streams without
    /// a hash tag (none are read there: see `redis_cluster`).
    pub key: String,
    group: String,
    consumer: String,
    cluster: bool,
    /// This process's id, the key's value while it holds the name.
    pub token: String,
    ttl: Duration,
}

/// Who holds the name, as found in the key.
pub struct Holder {
    pub name: String,
    pttl: i64,
}

impl ConsumerLock {
    pub fn new(
        group: &str,
        consumer: &str,
        host: &str,
        claim_idle: Duration,
        cluster: bool,
    ) -> Self {
        let nonce = format!(
            "{:016x}{:016x}",
            crate::backoff::random_u64(),
            crate::backoff::random_u64()
        );
        ConsumerLock {
            key: format!("citadel:v1:consumer:{group}:{consumer}"),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            cluster,
            token: format!("{host}|{}|{nonce}", std::process::id()),
            ttl: Self::ttl(claim_idle),
        }
    }

    /// Claim-idle, but between 1 s and 10 s: short enough that a restarted
    /// agent waits seconds, not claim-idle, for a killed one's name; long
    /// enough that renewals every third of it are not missed.
    pub fn ttl(claim_idle: Duration) -> Duration {
        claim_idle.clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The key that guards the outcomes of `stream`'s entries.
    pub fn key_for(&self, stream: &str) -> String {
        let tag = crate::redis_cluster::hash_tag(stream);
        if !self.cluster || tag == stream {
            return self.key.clone();
        }
        format!(
            "citadel:v1:consumer:{{{tag}}}:{}:{}",
            self.group, self.consumer
        )
    }

    /// The keys of the claim for reading `streams`: one, or one per hash
    /// tag on a cluster.
    pub fn keys(&self, streams: &[std::sync::Arc<str>]) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for s in streams {
            let k = self.key_for(s);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        if keys.is_empty() {
            keys.push(self.key.clone());
        }
        keys
    }

    /// Take or renew the claim (every key of it). `Ok(Err(holder))` when
    /// another process holds it.
    pub fn hold(&self, conn: &mut Conn, keys: &[String]) -> RedisResult<Result<(), Holder>> {
        for key in keys {
            if let Err(holder) = self.hold_key(conn, key)? {
                return Ok(Err(holder));
            }
        }
        Ok(Ok(()))
    }

    fn hold_key(&self, conn: &mut Conn, key: &str) -> RedisResult<Result<(), Holder>> {
        let reply: Value = redis::cmd("EVAL")
            .arg(HOLD)
            .arg(1)
            .arg(key)
            .arg(&self.token)
            .arg(self.ttl.as_millis() as u64)
            .query(conn)?;
        Ok(match reply {
            Value::Array(v) if v.len() == 2 => {
                let name = match &v[0] {
                    Value::BulkString(b) => describe(&String::from_utf8_lossy(b)),
                    other => format!("{other:?}"),
                };
                let pttl = match v[1] {
                    Value::Int(n) => n,
                    _ => -1,
                };
                Err(Holder { name, pttl })
            }
            _ => Ok(()),
        })
    }

    /// At start: take the name, or find out whether its holder is alive.
    /// Waits up to one TTL (and a little) for the holder's key to expire;
    /// `Ok(Err(holder))` as soon as the holder is seen renewing it.
    pub fn take_at_start(
        &self,
        conn: &mut Conn,
        keys: &[String],
        stopping: &dyn Fn(Duration) -> bool,
    ) -> RedisResult<Result<(), String>> {
        let until = Instant::now() + self.ttl + Duration::from_secs(1);
        let mut last: Option<i64> = None;
        loop {
            let holder = match self.hold(conn, keys)? {
                Ok(()) => return Ok(Ok(())),
                Err(h) => h,
            };
            // A renewal pushes the key's remaining time back up.
            if last.is_some_and(|before| holder.pttl > before + 50) || Instant::now() >= until {
                return Ok(Err(holder.name));
            }
            last = Some(holder.pttl);
            if stopping(Duration::from_millis(100)) {
                return Ok(Err(holder.name));
            }
        }
    }

    /// Give the name up (at a clean exit), if it is still ours.
    pub fn release(&self, conn: &mut Conn, keys: &[String]) {
        for key in keys {
            let released: RedisResult<i64> = redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(key)
                .arg(&self.token)
                .query(conn);
            if let Err(e) = released {
                log::debug!("could not release the consumer name: {e}");
            }
        }
    }
}

/// `host|pid|nonce` → "pid 42 on host gpu-01".
fn describe(holder: &str) -> String {
    let mut parts = holder.split('|');
    match (parts.next(), parts.next()) {
        (Some(host), Some(pid)) => format!("pid {pid} on host {host}"),
        _ => holder.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_a_cluster_the_claim_has_one_key_in_each_streams_slot() {
        let l = ConsumerLock::new("g", "c", "h", Duration::from_secs(30), true);
        let streams: Vec<std::sync::Arc<str>> = vec![
            "jobs:v1:{a}".into(),
            "jobs:v1:{b}x".into(),
            "other:{a}".into(),
        ];
        let keys = l.keys(&streams);
        assert_eq!(
            keys,
            ["citadel:v1:consumer:{a}:g:c", "citadel:v1:consumer:{b}:g:c"]
        );
        for (s, k) in streams.iter().zip([&keys[0], &keys[1], &keys[0]]) {
            assert_eq!(
                crate::redis_cluster::slot(s),
                crate::redis_cluster::slot(k),
                "{s}"
            );
        }
    }

    #[test]
    fn every_process_draws_its_own_id_and_the_ttl_is_seconds() {
        let a = ConsumerLock::new("g", "c", "h", Duration::from_secs(30), false);
        let b = ConsumerLock::new("g", "c", "h", Duration::from_secs(30), false);
        assert_eq!(a.key, "citadel:v1:consumer:g:c");
        assert_eq!(a.key_for("jobs:v1:{x}"), a.key, "one key on one server");
        assert_ne!(a.token, b.token, "same host and pid, different ids");
        assert_eq!(
            ConsumerLock::ttl(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            ConsumerLock::ttl(Duration::from_millis(300)),
            Duration::from_secs(1)
        );
        assert_eq!(
            describe(&a.token),
            format!("pid {} on host h", std::process::id())
        );
        assert_eq!(describe("garbage"), "garbage");
    }
}
