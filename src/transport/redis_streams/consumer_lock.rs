//! One live process per consumer name. Two processes reading as the same
//! consumer would share one pending list: each would take back the other's
//! running entries at start and renew leases it does not hold. So a worker
//! holds the key `citadel:v1:consumer:{group}:{consumer}` (its host, pid and a
//! nonce, expiring after claim-idle, renewed with the leases) while it reads.
//!
//! A holder on this same host whose pid is gone (a `kill -9`, a crash) is
//! taken over at once, so a restarted worker resumes its own pending entries
//! without waiting; a holder elsewhere is waited for until its key expires.

use redis::{Connection, RedisResult};
use std::time::Duration;

/// Take the key if it is free, ours, or held by `ARGV[3]` (a dead holder);
/// returns nil when held by us afterwards, else the current holder.
const HOLD: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur or cur == ARGV[1] or cur == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return cur
";

pub struct ConsumerLock {
    key: String,
    token: String,
    host: String,
    ttl: Duration,
}

impl ConsumerLock {
    pub fn new(group: &str, consumer: &str, host: &str, ttl: Duration) -> Self {
        let nonce = crate::backoff::random_u64() as u32;
        ConsumerLock {
            key: format!("citadel:v1:consumer:{group}:{consumer}"),
            token: format!("{host}|{}|{nonce:08x}", std::process::id()),
            host: host.to_owned(),
            ttl: ttl.max(Duration::from_secs(1)),
        }
    }

    /// Take or renew the lock. `Ok(Err(holder))` when another live process
    /// holds it.
    pub fn hold(&self, conn: &mut Connection) -> RedisResult<Result<(), String>> {
        let holder = self.run(conn, "")?;
        let Some(holder) = holder else {
            return Ok(Ok(()));
        };
        if self.is_dead_local(&holder) && self.run(conn, &holder)?.is_none() {
            log::info!("took over consumer name from a process that is gone ({holder})");
            return Ok(Ok(()));
        }
        Ok(Err(describe(&holder)))
    }

    /// Give the name up (at a clean exit), if it is still ours.
    pub fn release(&self, conn: &mut Connection) {
        let released: RedisResult<i64> = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .query(conn);
        if let Err(e) = released {
            log::debug!("could not release the consumer name: {e}");
        }
    }

    fn run(&self, conn: &mut Connection, dead: &str) -> RedisResult<Option<String>> {
        redis::cmd("EVAL")
            .arg(HOLD)
            .arg(1)
            .arg(&self.key)
            .arg(&self.token)
            .arg(self.ttl.as_millis() as u64)
            .arg(dead)
            .query(conn)
    }

    /// Held by a process of this host that no longer exists (or by an
    /// earlier process with our own pid, as after a container restart).
    fn is_dead_local(&self, holder: &str) -> bool {
        let mut parts = holder.split('|');
        let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
            return false;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            return false;
        };
        host == self.host
            && (pid == std::process::id()
                || !std::path::Path::new(&format!("/proc/{pid}")).exists())
    }
}

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
    fn a_gone_local_pid_is_dead_and_a_remote_one_is_not() {
        let lock = ConsumerLock::new("g", "c", "h1", Duration::from_secs(1));
        // pid 1 always exists; u32::MAX - 7 never does.
        assert!(!lock.is_dead_local("h1|1|x"));
        assert!(lock.is_dead_local(&format!("h1|{}|x", u32::MAX - 7)));
        assert!(lock.is_dead_local(&format!("h1|{}|old", std::process::id())));
        assert!(!lock.is_dead_local(&format!("h2|{}|x", u32::MAX - 7)));
        assert!(!lock.is_dead_local("garbage"));
        assert_eq!(describe("h2|42|n"), "pid 42 on host h2");
    }
}
