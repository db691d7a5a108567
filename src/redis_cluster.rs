//! Redis Cluster: the `redis+cluster://` / `rediss+cluster://` URL form,
//! opening a cluster connection (the redis crate's `cluster` feature: it
//! follows MOVED and ASK and refreshes its slot map after a failover), the
//! hash slot of a key, and the naming rule a worker's streams must follow
//! on a cluster: a job stream, its dead-letter stream and this worker's
//! claim on its consumer name must share one slot, so that the scripts
//! that guard an outcome touch one node only.

use redis::cluster::{ClusterClientBuilder, ClusterConnection};
use redis::{ErrorKind, RedisError, RedisResult};
use std::time::Duration;

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
pub fn connect(
    url: &str,
    timeout: Duration,
    read_timeout: Duration,
) -> RedisResult<ClusterConnection> {
    let seeds = seed_urls(url)
        .map_err(|e| RedisError::from((ErrorKind::InvalidClientConfig, "bad Cluster URL", e)))?;
    let conn = ClusterClientBuilder::new(seeds)
        .connection_timeout(timeout)
        .response_timeout(read_timeout)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .build()?
        .get_connection()?;
    conn.set_read_timeout(Some(read_timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// The part of `key` Redis hashes: the first non-empty `{…}`, else all.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, mod 16384).
pub fn slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in hash_tag(key).as_bytes() {
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
