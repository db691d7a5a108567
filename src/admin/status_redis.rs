//! What `citadel status` asks Redis: per stream the worker reads (queues,
//! the node's own stream, the device config's tag streams) its length, the
//! group's lag and pending count, the age of the oldest pending entry and
//! each consumer with its pending count and idle time; per dead-letter
//! stream its length. Read only (XLEN, XINFO, XPENDING); every call within
//! the connection's timeouts. The reply parsing is pure.

use crate::observe::metrics::entry_age;
use crate::observe::sampler::{first_pending_id, text};
use crate::redis_conn::Conn;
use redis::{RedisResult, Value};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Consumer {
    pub name: String,
    pub pending: u64,
    pub idle_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamState {
    pub stream: String,
    /// `queue`, `node` (this node's own stream) or `tag`.
    pub role: &'static str,
    pub length: u64,
    /// Whether the worker group exists on it (it is made at a worker's start).
    pub group_exists: bool,
    /// Entries not yet delivered to the group (Redis ≥ 7.0; null when Redis
    /// cannot tell, e.g. after XDEL/XTRIM).
    pub lag: Option<u64>,
    pub pending: u64,
    /// Age of the group's oldest pending entry, from its id.
    pub oldest_pending_age_seconds: Option<f64>,
    pub consumers: Vec<Consumer>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetters {
    pub stream: String,
    /// The stream whose dead letters these are.
    pub queue: String,
    pub length: u64,
}

/// Every stream of `streams` (name, role) and its dead-letter stream.
pub fn streams(
    conn: &mut Conn,
    group: &str,
    streams: &[(String, &'static str)],
    now_ms: u64,
) -> RedisResult<(Vec<StreamState>, Vec<DeadLetters>)> {
    let mut out = Vec::new();
    let mut dlq = Vec::new();
    for (stream, role) in streams {
        out.push(stream_state(conn, group, stream, role, now_ms)?);
        let name = crate::transport::redis_streams::dead_letter::stream_for(stream);
        let length: u64 = redis::cmd("XLEN").arg(&name).query(conn)?;
        dlq.push(DeadLetters {
            stream: name,
            queue: stream.clone(),
            length,
        });
    }
    Ok((out, dlq))
}

fn stream_state(
    conn: &mut Conn,
    group: &str,
    stream: &str,
    role: &'static str,
    now_ms: u64,
) -> RedisResult<StreamState> {
    let length: u64 = redis::cmd("XLEN").arg(stream).query(conn)?;
    let mut st = StreamState {
        stream: stream.to_owned(),
        role,
        length,
        group_exists: false,
        lag: None,
        pending: 0,
        oldest_pending_age_seconds: None,
        consumers: Vec::new(),
    };
    if length == 0 {
        // XINFO GROUPS of a missing key is an error; an empty stream made
        // by XGROUP CREATE MKSTREAM still has its groups.
        let exists: bool = redis::cmd("EXISTS").arg(stream).query(conn)?;
        if !exists {
            return Ok(st);
        }
    }
    let groups: Value = redis::cmd("XINFO").arg("GROUPS").arg(stream).query(conn)?;
    let Some(g) = find_group(&groups, group) else {
        return Ok(st);
    };
    st.group_exists = true;
    st.pending = number(&g, "pending").unwrap_or(0);
    st.lag = number(&g, "lag");
    if st.pending > 0 {
        let rows: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(1)
            .query(conn)?;
        st.oldest_pending_age_seconds = first_pending_id(&rows)
            .and_then(|id| entry_age(&id, now_ms))
            .map(|d| d.as_secs_f64());
    }
    let consumers: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query(conn)?;
    st.consumers = parse_consumers(&consumers);
    Ok(st)
}

/// A reply map (RESP2: a flat key/value array; RESP3: a map) as pairs.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => text(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(items) => items
            .iter()
            .filter_map(|(k, v)| text(k).map(|k| (k, v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(map: &'a [(String, &'a Value)], key: &str) -> Option<&'a Value> {
    map.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

fn number(map: &[(String, &Value)], key: &str) -> Option<u64> {
    field(map, key).and_then(text).and_then(|t| t.parse().ok())
}

/// The group named `group` of an `XINFO GROUPS` reply, as pairs.
pub fn find_group<'a>(reply: &'a Value, group: &str) -> Option<Vec<(String, &'a Value)>> {
    let Value::Array(groups) = reply else {
        return None;
    };
    groups
        .iter()
        .map(pairs)
        .find(|g| field(g, "name").and_then(text).is_some_and(|n| n == group))
}

/// An `XINFO CONSUMERS` reply: name, pending, idle (ms).
pub fn parse_consumers(reply: &Value) -> Vec<Consumer> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .map(pairs)
        .filter_map(|c| {
            Some(Consumer {
                name: field(&c, "name").and_then(text)?,
                pending: number(&c, "pending").unwrap_or(0),
                idle_seconds: number(&c, "idle").unwrap_or(0) as f64 / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xinfo_replies_are_read_by_field_name() {
        let groups = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("other"),
                bulk("pending"),
                Value::Int(9),
            ]),
            Value::Array(vec![
                bulk("name"),
                bulk("workers"),
                bulk("consumers"),
                Value::Int(2),
                bulk("pending"),
                Value::Int(3),
                bulk("lag"),
                Value::Int(5),
            ]),
        ]);
        let g = find_group(&groups, "workers").unwrap();
        assert_eq!(number(&g, "pending"), Some(3));
        assert_eq!(number(&g, "lag"), Some(5));
        assert!(find_group(&groups, "none").is_none());
        let lag_unknown = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("workers"),
            bulk("lag"),
            Value::Nil,
        ])]);
        assert_eq!(
            number(&find_group(&lag_unknown, "workers").unwrap(), "lag"),
            None
        );

        let consumers = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("node-a"),
            bulk("pending"),
            Value::Int(2),
            bulk("idle"),
            Value::Int(1500),
        ])]);
        assert_eq!(
            parse_consumers(&consumers),
            [Consumer {
                name: "node-a".into(),
                pending: 2,
                idle_seconds: 1.5
            }]
        );
        let rows = Value::Array(vec![Value::Array(vec![
            bulk("1000-0"),
            bulk("node-a"),
            Value::Int(5),
            Value::Int(1),
        ])]);
        assert_eq!(first_pending_id(&rows).as_deref(), Some("1000-0"));
    }
}
