//! Reading one job's replayable events (`events:v1:{jobId}`, PROTOCOL.md §7)
//! with `XREAD BLOCK`, from `0` or from a given entry id: the one reader
//! behind `citadel submit --follow` and `citadel gateway`.
//!
//! A [`Follower`] remembers the id of the last entry it returned and reads
//! only after it, so a follower that loses Redis reconnects and goes on
//! where it was: every event once, in order. It owns no thread; the caller
//! decides how long to wait and what a Redis error costs it.

use crate::events::events_key;
use crate::redis_conn;
use redis::Value as Redis;
use serde_json::Value;
use std::time::Duration;

/// One event read from the stream: its entry id and the event's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub id: String,
    pub event: Value,
}

impl Read {
    /// The event's `type` (`claimed`, `start`, `chunk`, `end`, `error`, `cancelled`).
    pub fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap_or_default()
    }

    /// Whether nothing follows this event.
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind(), "end" | "error" | "cancelled")
    }
}

/// Which chunks to pass on. A redelivered job (its worker died) appends its
/// events again from `claimed`, its chunks from index 0 (PROTOCOL.md §2.1):
/// after such a second `claimed`, the chunks up to those already passed on
/// are skipped. Before one, every chunk is passed on.
/// Only a `claimed` newer than every entry seen is a rerun: the same
/// entries read twice (a follower bug) are passed on, to be seen.
#[derive(Debug, Default)]
pub struct Seam {
    passed: u64,
    rerun: bool,
    newest: (u64, u64),
}

/// A stream entry id `ms-seq` as a pair that orders like Redis does.
fn entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Seam {
    /// Whether `read` is passed on.
    pub fn keep(&mut self, read: &Read) -> bool {
        let id = entry_id(&read.id);
        let newer = id > self.newest;
        self.newest = self.newest.max(id);
        match read.kind() {
            "claimed" => {
                self.rerun |= newer && self.passed > 0;
                true
            }
            "chunk" => {
                let index = read.event["data"]["index"].as_u64();
                match index {
                    Some(i) if self.rerun && i < self.passed => false,
                    Some(i) if self.rerun => {
                        self.passed = i + 1;
                        true
                    }
                    _ => {
                        self.passed += 1;
                        true
                    }
                }
            }
            _ => true,
        }
    }
}

pub struct Follower {
    url: String,
    timeout: Duration,
    key: String,
    last_id: String,
    conn: Option<crate::redis_conn::Conn>,
    /// The BLOCK the connection's read timeout was last set for.
    read_timeout: Option<Duration>,
}

/// Entries read per XREAD: a long stream is read in pieces.
const COUNT: usize = 512;

impl Follower {
    /// Follow `job_id`'s events after entry `from` (`0`: from the first).
    /// `timeout` is the connect and command timeout.
    pub fn new(url: &str, timeout: Duration, job_id: &str, from: &str) -> Follower {
        Follower {
            url: url.to_owned(),
            timeout,
            key: events_key(job_id),
            last_id: from.to_owned(),
            conn: None,
            read_timeout: None,
        }
    }

    /// The id of the last entry returned (`from` before the first one).
    pub fn last_id(&self) -> &str {
        &self.last_id
    }

    /// The events after the last one returned, waiting up to `block` for
    /// one; empty when none came. On a Redis error the connection is
    /// dropped (the next call opens a new one) and the error returned;
    /// nothing is skipped. An entry whose `event` is not JSON is skipped
    /// with a warning (nobody but the agent writes this stream).
    pub fn next(&mut self, block: Duration) -> Result<Vec<Read>, redis::RedisError> {
        let result = self.read(block);
        if result.is_err() {
            self.conn = None;
            self.read_timeout = None;
        }
        result
    }

    fn read(&mut self, block: Duration) -> Result<Vec<Read>, redis::RedisError> {
        let block = block.max(Duration::from_millis(1));
        if self.conn.is_none() {
            // The read timeout outlasts the BLOCK (PITFALLS: else the reply is lost).
            self.conn = Some(redis_conn::connect(
                &self.url,
                self.timeout,
                block + self.timeout,
            )?);
            self.read_timeout = Some(block);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        // One setsockopt per change, not per read (a read per token).
        if self.read_timeout != Some(block) {
            conn.set_read_timeout(Some(block + self.timeout))?;
            self.read_timeout = Some(block);
        }
        let reply: Redis = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id)
            .query(conn)?;
        let entries = parse_reply(&reply);
        let mut out = Vec::with_capacity(entries.len());
        for (id, text) in entries {
            self.last_id = id.clone();
            match text.as_deref().and_then(event_of) {
                Some(event) => out.push(Read { id, event }),
                None => log::warn!("{}: entry {id} holds no event JSON; skipped", self.key),
            }
        }
        Ok(out)
    }
}

/// An event's JSON as a follower needs it: `type` and `data` without
/// `data.meta` (the rest is never looked at, and this is read for every
/// token). `None` when it is not an event object.
fn event_of(text: &str) -> Option<Value> {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(rename = "type", default)]
        kind: Value,
        #[serde(default)]
        data: Option<DataSansMeta>,
    }
    // A struct would also be read from an array: objects only.
    let typed = text.trim_start().starts_with('{');
    let typed = typed
        .then(|| serde_json::from_str::<Wire>(text).ok())
        .flatten();
    let (kind, data) = match typed {
        Some(Wire { kind, data }) => (kind, data.map_or(Value::Null, |d| d.0)),
        // Any other shape (data that is not an object, say): through a Value.
        _ => {
            let mut event: Value = serde_json::from_str(text).ok()?;
            if !event.is_object() {
                return None;
            }
            let mut data = event["data"].take();
            if let Some(d) = data.as_object_mut() {
                d.remove("meta");
            }
            (event["type"].take(), data)
        }
    };
    let mut event = serde_json::Map::new();
    event.insert("type".into(), kind);
    event.insert("data".into(), data);
    Some(Value::Object(event))
}

/// An event's `data` object, its `meta` skipped unread.
struct DataSansMeta(Value);

impl<'de> serde::Deserialize<'de> for DataSansMeta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event's data object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = m.next_key::<String>()? {
                    if key == "meta" {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    } else {
                        out.insert(key, m.next_value()?);
                    }
                }
                Ok(Value::Object(out))
            }
        }
        d.deserialize_map(Visit).map(DataSansMeta)
    }
}

/// `(id, field event)` of each entry of an XREAD reply for one stream (nil
/// when the BLOCK timed out). Pure, so that it is tested without Redis.
fn parse_reply(reply: &Redis) -> Vec<(String, Option<String>)> {
    let streams = match reply {
        Redis::Array(s) => s.as_slice(),
        // RESP3 answers a map of stream → entries.
        Redis::Map(m) => return m.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => return Vec::new(),
    };
    streams
        .iter()
        .filter_map(|s| match s {
            Redis::Array(pair) if pair.len() == 2 => Some(entries(&pair[1])),
            _ => None,
        })
        .flatten()
        .collect()
}

fn entries(v: &Redis) -> Vec<(String, Option<String>)> {
    let Redis::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Redis::Array(e) = e else { return None };
            let id = text(e.first()?)?;
            let fields = match e.get(1) {
                Some(Redis::Array(f)) => f.as_slice(),
                _ => &[],
            };
            let event = fields
                .chunks(2)
                .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some("event"))
                .and_then(|kv| text(&kv[1]));
            Some((id, event))
        })
        .collect()
}

fn text(v: &Redis) -> Option<String> {
    match v {
        Redis::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Redis::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Redis {
        Redis::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn an_event_is_read_as_its_type_and_data_without_meta() {
        use serde_json::json;
        let node = crate::events::NodeFacts::new("n", "n", &["t".into()]);
        let text = crate::events::chunk_event("j", Some("r"), "Hé\"", 3, &node);
        assert_eq!(
            event_of(&text),
            Some(json!({"type": "chunk", "data": {"content": "Hé\"", "index": 3}}))
        );
        let end = r#"{"type":"end","data":{"result":{"meta":1,"x":[1]},"meta":{"a":1}}}"#;
        assert_eq!(
            event_of(end),
            Some(json!({"type": "end", "data": {"result": {"meta": 1, "x": [1]}}}))
        );
        // Odd but JSON objects pass; anything else is no event.
        assert_eq!(
            event_of(r#"{"data":[1,"a",null,true,-2,1.5]}"#),
            Some(json!({"type": null, "data": [1, "a", null, true, -2, 1.5]}))
        );
        assert_eq!(event_of("{}"), Some(json!({"type": null, "data": null})));
        // A repeated key (the typed view refuses it) goes through a Value,
        // to the same shape: the last one wins, meta is dropped.
        let twice = r#"{"type":"a","type":"chunk","data":{"content":"c","meta":{}}}"#;
        assert_eq!(
            event_of(twice),
            Some(json!({"type": "chunk", "data": {"content": "c"}}))
        );
        for bad in ["", "[1]", "\"x\"", "{\"type\":", "{\"data\":{\"meta\":}}"] {
            assert_eq!(event_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_xread_reply_gives_each_entry_id_and_event_in_order() {
        let entry = |id: &str, fields: &[&str]| {
            Redis::Array(vec![
                bulk(id),
                Redis::Array(fields.iter().map(|f| bulk(f)).collect()),
            ])
        };
        let reply = Redis::Array(vec![Redis::Array(vec![
            bulk("events:v1:j"),
            Redis::Array(vec![
                entry("1-0", &["event", r#"{"type":"claimed"}"#]),
                entry("1-1", &["other", "x", "event", r#"{"type":"chunk"}"#]),
                entry("1-2", &["noevent", "x"]),
            ]),
        ])]);
        assert_eq!(
            parse_reply(&reply),
            vec![
                ("1-0".into(), Some(r#"{"type":"claimed"}"#.into())),
                ("1-1".into(), Some(r#"{"type":"chunk"}"#.into())),
                ("1-2".into(), None),
            ]
        );
        assert!(parse_reply(&Redis::Nil).is_empty());
    }

    #[test]
    fn a_rerun_after_a_second_claimed_skips_the_chunks_already_passed_on() {
        let n = std::cell::Cell::new(0);
        let ev = |t: &str, index: u64| {
            n.set(n.get() + 1);
            Read {
                id: format!("1700000000000-{}", n.get()),
                event: serde_json::json!({"type": t, "data": {"index": index}}),
            }
        };
        let mut seam = Seam::default();
        let kept: Vec<bool> = [
            ev("claimed", 0),
            ev("start", 0),
            ev("chunk", 0),
            ev("chunk", 1),
            ev("claimed", 0),
            ev("start", 0),
            ev("chunk", 0),
            ev("chunk", 1),
            ev("chunk", 2),
            ev("end", 0),
        ]
        .iter()
        .map(|r| seam.keep(r))
        .collect();
        assert_eq!(
            kept,
            [true, true, true, true, true, true, false, false, true, true]
        );
        // Without a second claimed, a repeated index is passed on (a bug to see).
        let mut seam = Seam::default();
        assert!(seam.keep(&ev("chunk", 0)) && seam.keep(&ev("chunk", 0)));
        // Entries read again (not newer): not a rerun, passed on.
        let again = |t: &str, id: &str| Read {
            id: id.into(),
            event: serde_json::json!({"type": t, "data": {"index": 0}}),
        };
        let mut seam = Seam::default();
        assert!(seam.keep(&again("claimed", "5-0")) && seam.keep(&again("chunk", "5-1")));
        assert!(seam.keep(&again("claimed", "5-0")) && seam.keep(&again("chunk", "5-1")));
        assert_eq!(entry_id("12-3"), (12, 3));
        assert!(entry_id("9-9") < entry_id("10-0"));
    }

    #[test]
    fn terminal_events_are_end_error_and_cancelled() {
        let read = |t: &str| Read {
            id: "1-0".into(),
            event: serde_json::json!({ "type": t }),
        };
        for t in ["end", "error", "cancelled"] {
            assert!(read(t).is_terminal(), "{t}");
        }
        for t in ["claimed", "start", "chunk", ""] {
            assert!(!read(t).is_terminal(), "{t}");
        }
    }
}
