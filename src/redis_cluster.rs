//! Redis Cluster: the `redis+cluster://` / `rediss+cluster://` URL form,
//! opening a cluster connection (the redis crate's `cluster` feature: it
//! follows MOVED and ASK and refreshes its slot map after a failover),
//! sending many commands with one round trip per node, the hash slot of a
//! key, and the naming rule a worker's streams must follow on a cluster: a
//! job stream, its dead-letter stream and this worker's claim on its
//! consumer name must share one slot, so that the scripts that guard an
//! outcome touch one node only.

use redis::cluster::{ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Arg, Cmd, ConnectionLike, ErrorKind, RedisError, RedisResult, ServerError, Value};
use std::time::Duration;

/// A cluster connection and the slot map it was opened with (which
/// master serves which slots), for grouping commands by node. A stale map
/// shows as MOVED replies, which make the caller reconnect.
pub struct ClusterConn {
    pub conn: ClusterConnection,
    /// (first slot, last slot, node address), from `CLUSTER SLOTS`.
    slots: Vec<(u16, u16, String)>,
}

/// The URL form, for error messages.
pub const FORM: &str = "redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,…";

/// Whether `url` uses a Cluster scheme.
pub fn is_cluster_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        matches!(
            scheme.to_ascii_lowercase().as_str(),
            "redis+cluster" | "rediss+cluster"
        )
    })
}

/// The seed nodes of a cluster URL as plain node URLs (`redis://` or
/// `rediss://`, each with the URL's credentials and fragment).
pub fn seed_urls(url: &str) -> Result<Vec<String>, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("it does not start with redis+cluster://")?;
    let node_scheme = match scheme.to_ascii_lowercase().as_str() {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        other => return Err(format!("{other}:// is not a Cluster scheme")),
    };
    if url.contains(char::is_whitespace) {
        return Err("it contains white space".into());
    }
    let (rest, fragment) = match rest.find('#') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !matches!(fragment, "" | "#insecure") {
        return Err(format!(
            "'{fragment}' is not a known option (only #insecure: TLS without checking the certificate)"
        ));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(path, "" | "0") {
        return Err(format!(
            "a cluster has only database 0; '/{path}' after the nodes is not part of the form"
        ));
    }
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let mut nodes = Vec::new();
    for item in hosts.split(',') {
        let (host, port) = item
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("'{item}' is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{port}' in '{item}' is not a port number"))?;
        nodes.push(format!("{node_scheme}://{user}{host}:{port}{fragment}"));
    }
    for node in &nodes {
        if redis::Client::open(node.as_str()).is_err() {
            return Err("the Redis client cannot read its credentials or nodes".into());
        }
    }
    Ok(nodes)
}

/// A connection to the cluster of `url`: every socket with `timeout` to
/// connect and `read_timeout` to answer (it must exceed any BLOCK sent on
/// it). Redirections and a few retries after a failover are the client's;
/// what is still an error after them is the caller's to handle.
pub fn connect(url: &str, timeout: Duration, read_timeout: Duration) -> RedisResult<ClusterConn> {
    let seeds = seed_urls(url)
        .map_err(|e| RedisError::from((ErrorKind::InvalidClientConfig, "bad Cluster URL", e)))?;
    let mut conn = ClusterClientBuilder::new(seeds)
        .connection_timeout(timeout)
        .response_timeout(read_timeout)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .build()?
        .get_connection()?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let reply = conn.route_command(
        redis::cmd("CLUSTER").arg("SLOTS"),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
    )?;
    Ok(ClusterConn {
        slots: slot_ranges(reply.extract_error()?),
        conn,
    })
}

/// (first, last, "host:port" of the master) of a `CLUSTER SLOTS` reply.
fn slot_ranges(reply: Value) -> Vec<(u16, u16, String)> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    ranges
        .iter()
        .filter_map(|r| {
            let Value::Array(r) = r else { return None };
            let Some(Value::Array(master)) = r.get(2) else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = match master.get(1)? {
                Value::Int(p) => *p,
                _ => return None,
            };
            Some((int(r.first()?)?, int(r.get(1)?)?, format!("{host}:{port}")))
        })
        .collect()
}

impl ClusterConn {
    /// Send `cmds` and read every reply, in order, a refused command's
    /// error in its place: the commands of each node as one pipeline
    /// (routed by its first command's key), node after node, in the order
    /// each node first appears. A command without a key (PUBLISH, which
    /// reaches every node) joins the last group so far, so it is sent after
    /// every command before it. Commands to one node keep their order;
    /// commands with keys on different nodes are not ordered among
    /// themselves.
    pub fn send_all(&mut self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        let mut groups: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for (i, cmd) in cmds.iter().enumerate() {
            let node = key_of(cmd).map(|k| self.node_of(slot_of_bytes(k)));
            match (node, groups.last_mut()) {
                (None, Some((_, g))) => g.push(i),
                (Some(n), _) => match groups.iter_mut().find(|(m, _)| *m == Some(n)) {
                    Some((_, g)) => g.push(i),
                    None => groups.push((Some(n), vec![i])),
                },
                (None, None) => groups.push((None, vec![i])),
            }
        }
        let mut out = vec![Value::Nil; cmds.len()];
        for (_, group) in groups {
            let replies = if group.len() == 1 {
                vec![one(&mut self.conn, &cmds[group[0]])?]
            } else {
                let mut packed = Vec::new();
                for &i in &group {
                    cmds[i].write_packed_command(&mut packed);
                }
                self.conn.req_packed_commands(&packed, 0, group.len())?
            };
            for (i, v) in group.into_iter().zip(replies) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Which node (index of its first range) serves `slot`.
    fn node_of(&self, slot: u16) -> usize {
        let addr = self
            .slots
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, addr)| addr);
        self.slots
            .iter()
            .position(|(_, _, n)| Some(n) == addr)
            .unwrap_or(usize::MAX)
    }
}

/// One command, routed and redirected by the client; a refusal as a value.
fn one(conn: &mut ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    match conn.req_command(cmd) {
        Ok(v) => Ok(v),
        Err(e) if e.code().is_some() => match ServerError::try_from(e) {
            Ok(se) => Ok(Value::ServerError(se)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// The key a command is routed by: the first key of EVAL/EVALSHA, none
/// for PUBLISH, else the first argument.
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|a| match a {
        Arg::Simple(b) => b,
        _ => &b""[..],
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"PUBLISH" => None,
        b"EVAL" | b"EVALSHA" => {
            let _script = args.next()?;
            let n = std::str::from_utf8(args.next()?)
                .ok()?
                .parse::<u32>()
                .ok()?;
            if n == 0 {
                None
            } else {
                args.next()
            }
        }
        _ => args.next(),
    }
}

/// The part of `key` Redis hashes: the first non-empty `{…}`, else all.
pub fn hash_tag(key: &str) -> &str {
    let tag = tag_bytes(key.as_bytes());
    // A tag of a str cut at ASCII braces is a str.
    std::str::from_utf8(tag).unwrap_or(key)
}

fn tag_bytes(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, mod 16384).
pub fn slot(key: &str) -> u16 {
    slot_of_bytes(key.as_bytes())
}

fn slot_of_bytes(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag_bytes(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Why `stream` cannot be read from a cluster, or `None`: its dead-letter
/// stream must hash to its slot, which a hash tag does.
pub fn stream_problem(stream: &str, dead_letters: &str) -> Option<String> {
    if hash_tag(stream) == stream || slot(stream) != slot(dead_letters) {
        let name = stream.strip_prefix("jobs:v1:").unwrap_or(stream);
        let bare = name.replace(['{', '}'], "");
        return Some(format!(
            "queue '{stream}' cannot be used on a Redis Cluster: its dead-letter stream \
             '{dead_letters}' and its consumer group's keys would be in other slots. Put the \
             queue's name in a hash tag, e.g. --queue 'jobs:v1:{{{bare}}}' (dead letters then \
             go to 'dlq:v1:{{{bare}}}', in the same slot)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag_rules() {
        // Values from CLUSTER KEYSLOT on Redis 7.0.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{foo}bar"), 12182);
        assert_eq!(slot("jobs:v1:{a}"), slot("dlq:v1:{a}"));
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("x{y}z{w}"), "y");
        assert_eq!(hash_tag("{}{x}"), "{}{x}");
        assert_eq!(hash_tag("a{b"), "a{b");
    }

    #[test]
    fn a_stream_without_a_hash_tag_is_refused_with_the_name_to_use() {
        let why = stream_problem("jobs:v1:gpu-general", "dlq:v1:gpu-general").unwrap();
        assert!(why.contains("'jobs:v1:{gpu-general}'"), "{why}");
        assert!(stream_problem("jobs:v1:{gpu-general}", "dlq:v1:{gpu-general}").is_none());
        assert!(stream_problem("jobs:v1:{a}x", "dlq:v1:{a}x").is_none());
        // The tag names a different slot than the dead letters' name.
        assert!(stream_problem("{jobs}:v1:x", "dlq:v1:{jobs}:v1:x").is_none());
        assert!(stream_problem("jobs:v1:a{}b", "dlq:v1:a{}b").is_some());
    }

    #[test]
    fn cluster_urls_become_seed_node_urls() {
        assert!(is_cluster_url("redis+cluster://a:1"));
        assert!(is_cluster_url("REDISS+CLUSTER://a:1"));
        assert!(!is_cluster_url("redis://a:1"));
        assert_eq!(
            seed_urls("redis+cluster://u:p%40@127.0.0.1:7000,127.0.0.1:7001").unwrap(),
            [
                "redis://u:p%40@127.0.0.1:7000",
                "redis://u:p%40@127.0.0.1:7001"
            ]
        );
        assert_eq!(
            seed_urls("rediss+cluster://h:7000/#insecure").unwrap(),
            ["rediss://h:7000#insecure"]
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://h",
            "redis+cluster://h:x",
            "redis+cluster://h:1/3",
            "redis+cluster://h:1#what",
            "redis+cluster://h :1",
            "redis://h:1",
        ] {
            assert!(seed_urls(bad).is_err(), "{bad}");
        }
    }
}
