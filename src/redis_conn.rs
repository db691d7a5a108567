//! The one Redis connection helper: timeouts on every socket, the current
//! master of a `redis+sentinel://` URL found at every (re)connect (see
//! `redis_sentinel`), a cluster connection for `redis+cluster://` (see
//! `redis_cluster`), commands sent together in the way each allows, and the
//! one reading of what a Redis error means for the thread that got it.

use crate::{redis_cluster, redis_sentinel};
use redis::{Client, Cmd, Connection, ConnectionLike, ErrorKind, RedisError, RedisResult, Value};
use std::time::Duration;

/// A connection to one Redis server (also a Sentinel URL's master), or to
/// a cluster (each command goes to the node that serves its key).
pub enum Conn {
    Single(Connection),
    Cluster(Box<redis_cluster::ClusterConn>),
}

/// Open a connection with a connect timeout and read/write timeouts.
/// `read_timeout` must exceed any BLOCK this connection will be used for.
/// A Sentinel URL is resolved to the current master here, at every call.
pub fn connect(url: &str, timeout: Duration, read_timeout: Duration) -> RedisResult<Conn> {
    if redis_cluster::is_cluster_url(url) {
        return Ok(Conn::Cluster(Box::new(redis_cluster::connect(
            url,
            timeout,
            read_timeout,
        )?)));
    }
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
    Ok(Conn::Single(conn))
}

impl Conn {
    /// How long a reply may take (it must exceed any BLOCK sent).
    pub fn set_read_timeout(&self, d: Option<Duration>) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.set_read_timeout(d),
            Conn::Cluster(c) => c.conn.set_read_timeout(d),
        }
    }

    /// `cmd` on the master serving `slot` (on one server: on it).
    pub fn query_at_slot<T: redis::FromRedisValue>(
        &mut self,
        cmd: &Cmd,
        slot: Option<u16>,
    ) -> RedisResult<T> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match (self, slot) {
            (Conn::Cluster(c), Some(slot)) => {
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                let v = c
                    .conn
                    .route_command(cmd, RoutingInfo::SingleNode(route))?
                    .extract_error()?;
                Ok(redis::from_redis_value(v)?)
            }
            (conn, _) => cmd.query(conn),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Send `cmds` together and read every reply, in order; a command Redis
    /// refused has its error in its place. On one server that is one
    /// pipeline. On a cluster, one pipeline per node, node after node (see
    /// `ClusterConn::send_all`): a connection error then ends the sending,
    /// and the commands before it were applied.
    pub fn send_all(&mut self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                pipe.ignore_errors().query(c)
            }
            Conn::Cluster(c) => c.send_all(cmds),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(c) => c.req_command(cmd),
            Conn::Cluster(c) => c.conn.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.conn.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Conn::Single(c) => c.supports_pipelining(),
            Conn::Cluster(c) => c.conn.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Single(c) => c.check_connection(),
            Conn::Cluster(c) => c.conn.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Single(c) => c.is_open(),
            Conn::Cluster(c) => c.conn.is_open(),
        }
    }
}

/// What a Redis error means for the thread that got it. Every thread that
/// talks to Redis decides through [`fault`], so the reader and the settle
/// thread never disagree about a server that was demoted or is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is gone, or this server cannot serve us now (a
    /// replica after a failover: READONLY, or UNBLOCKED for a blocked read;
    /// MASTERDOWN, LOADING, BUSY, TRYAGAIN, CLUSTERDOWN; MOVED or ASK that
    /// the cluster client did not follow): drop the connection, reconnect
    /// later (through the sentinels, for a Sentinel URL; with a fresh slot
    /// map, for a cluster).
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
            | "CLUSTERDOWN" | "MOVED" | "ASK",
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
        Some("MOVED" | "ASK") => "moved a slot to another node (resharding or failover)",
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
            ("MOVED", Fault::Reconnect),
            ("ASK", Fault::Reconnect),
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
