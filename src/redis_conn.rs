//! The one Redis connection helper: timeouts on every socket, the current
//! master of a `redis+sentinel://` URL found at every (re)connect (see
//! `redis_sentinel`), and the one reading of what a Redis error means for
//! the thread that got it.

use crate::redis_sentinel;
use redis::{Client, Connection, ErrorKind, RedisError, RedisResult};
use std::time::Duration;

/// Open a connection with a connect timeout and read/write timeouts.
/// `read_timeout` must exceed any BLOCK this connection will be used for.
/// A Sentinel URL is resolved to the current master here, at every call.
pub fn connect(url: &str, timeout: Duration, read_timeout: Duration) -> RedisResult<Connection> {
    let conn = if redis_sentinel::is_sentinel_url(url) {
        let parsed = redis_sentinel::SentinelUrl::parse(url).map_err(|e| {
            RedisError::from((ErrorKind::InvalidClientConfig, "bad Sentinel URL", e))
        })?;
        redis_sentinel::connect_master(&parsed, timeout)?
    } else {
        Client::open(url)?.get_connection_with_timeout(timeout)?
    };
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// What a Redis error means for the thread that got it. Every thread that
/// talks to Redis decides through [`fault`], so the reader and the settle
/// thread never disagree about a server that was demoted or is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is gone, or this server cannot serve us now (a
    /// replica after a failover: READONLY, or UNBLOCKED for a blocked read;
    /// MASTERDOWN, LOADING, BUSY, TRYAGAIN, CLUSTERDOWN): drop the
    /// connection, reconnect later (through the sentinels, for a Sentinel
    /// URL).
    Reconnect,
    /// Redis is at `maxmemory` and refuses writes (OOM): keep what must be
    /// written, take nothing new, retry with backoff.
    Full,
    /// The stream's consumer group is gone (deleted under us): create it
    /// again.
    NoGroup,
    /// The server's script cache lost our scripts: load them again.
    NoScript,
    /// The ACL forbids a command (NOPERM): retry with backoff until an
    /// operator fixes it.
    Denied,
    /// The command is wrong for the data (e.g. WRONGTYPE): retrying the
    /// same command gives the same answer.
    Refused,
}

pub fn fault(e: &RedisError) -> Fault {
    match e.code() {
        Some(
            "READONLY" | "UNBLOCKED" | "MASTERDOWN" | "LOADING" | "BUSY" | "TRYAGAIN"
            | "CLUSTERDOWN",
        ) => Fault::Reconnect,
        Some("OOM") => Fault::Full,
        Some("NOGROUP") => Fault::NoGroup,
        Some("NOSCRIPT") => Fault::NoScript,
        Some("NOPERM") => Fault::Denied,
        _ if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error() =>
        {
            Fault::Reconnect
        }
        _ => Fault::Refused,
    }
}

/// How an episode of `e` is logged: "Redis {this} ({e})".
pub fn describe(e: &RedisError) -> &'static str {
    match e.code() {
        Some("READONLY" | "UNBLOCKED") => "is a read-only replica now (failover?)",
        Some("MASTERDOWN" | "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN") => {
            "is up but not serving"
        }
        _ => fault(e).describe(),
    }
}

impl Fault {
    /// How an episode of this fault is logged: "Redis {this} (…)".
    pub fn describe(self) -> &'static str {
        match self {
            Fault::Reconnect => "unreachable",
            Fault::Full => "is out of memory (maxmemory reached) and refuses writes",
            Fault::NoGroup => "lost the consumer group",
            Fault::NoScript => "lost its script cache",
            Fault::Denied => "denies a command this agent needs (ACL)",
            Fault::Refused => "refused a command",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_error_of_the_contract_has_its_meaning() {
        let cases = [
            ("READONLY", Fault::Reconnect),
            ("UNBLOCKED", Fault::Reconnect),
            ("MASTERDOWN", Fault::Reconnect),
            ("LOADING", Fault::Reconnect),
            ("BUSY", Fault::Reconnect),
            ("OOM", Fault::Full),
            ("NOGROUP", Fault::NoGroup),
            ("NOSCRIPT", Fault::NoScript),
            ("NOPERM", Fault::Denied),
            ("WRONGTYPE", Fault::Refused),
            ("ERR", Fault::Refused),
        ];
        for (code, want) in cases {
            let e = redis::make_extension_error(code.into(), Some("detail".into()));
            assert_eq!(fault(&e), want, "{code}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(fault(&io), Fault::Reconnect);
    }
}
