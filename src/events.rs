//! The one place that formats job events (PROTOCOL.md §2) and names their
//! channels. Pure: building a message never touches the network.

use crate::clock;
use serde_json::{json, Map, Value};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Who is speaking: copied into `data.meta` of every event. `node_id` is
/// the node-name setting (stable identity); `node_name` the device name an
/// APPLY_DEVICE_CONFIG set, else the node name; `tags` its custom tags. The
/// meta object is serialized once, here, not per event.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_id: String,
    pub node_name: String,
    pub tags: Vec<String>,
    /// `{"node_id":…,"node_name":…,"tags":[…]}` as JSON text.
    meta: String,
}

impl NodeFacts {
    pub fn new(node_id: &str, node_name: &str, tags: &[String]) -> NodeFacts {
        let meta = json!({"node_id": node_id, "node_name": node_name, "tags": tags}).to_string();
        NodeFacts {
            node_id: node_id.to_owned(),
            node_name: node_name.to_owned(),
            tags: tags.to_vec(),
            meta,
        }
    }

    /// Facts of a node known by its name only (no device config).
    #[cfg(test)]
    pub fn named(name: &str) -> NodeFacts {
        NodeFacts::new(name, name, &[])
    }
}

/// The Pub/Sub channel of a job's events.
pub fn channel(job_id: &str) -> String {
    format!("stream:v1:{job_id}")
}

/// The replayable copy of a job's events (PROTOCOL.md §7): a stream with
/// one field `event` holding the same JSON as the channel's message.
pub fn events_key(job_id: &str) -> String {
    format!("events:v1:{job_id}")
}

/// One event as its JSON text. Written piece by piece (the node's meta is
/// spliced in as ready text), in the contract's key order.
pub fn event(
    kind: &str,
    job_id: &str,
    ray_id: Option<&str>,
    data: Value,
    node: &NodeFacts,
) -> String {
    let data = match data {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    written(kind, job_id, ray_id, node, |out| {
        for (k, v) in data.iter().filter(|(k, _)| *k != "meta") {
            text(out, k);
            out.push(b':');
            let _ = serde_json::to_writer(&mut *out, v);
            out.push(b',');
        }
    })
}

/// A `chunk` event: the same text as `event("chunk", …, chunk(content,
/// index), …)`, written without building its data as a `Value` (this is
/// the event of every token).
pub fn chunk_event(
    job_id: &str,
    ray_id: Option<&str>,
    content: &str,
    index: u64,
    node: &NodeFacts,
) -> String {
    written("chunk", job_id, ray_id, node, |out| {
        out.extend_from_slice(br#""content":"#);
        text(out, content);
        out.extend_from_slice(br#","index":"#);
        out.extend_from_slice(index.to_string().as_bytes());
        out.push(b',');
    })
}

/// `s` as a JSON string.
fn text(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The event around its data's fields, which `fields` writes, each
/// followed by a comma (`meta` comes last).
fn written(
    kind: &str,
    job_id: &str,
    ray_id: Option<&str>,
    node: &NodeFacts,
    fields: impl FnOnce(&mut Vec<u8>),
) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(160 + node.meta.len());
    out.extend_from_slice(br#"{"version":"1.0","type":"#);
    text(&mut out, kind);
    out.extend_from_slice(br#","jobId":"#);
    text(&mut out, job_id);
    if let Some(r) = ray_id.filter(|r| !r.is_empty()) {
        out.extend_from_slice(br#","rayId":"#);
        text(&mut out, r);
    }
    out.extend_from_slice(br#","timestamp":"#);
    text(&mut out, &clock::now_rfc3339());
    out.extend_from_slice(br#","data":{"#);
    fields(&mut out);
    out.extend_from_slice(br#""meta":"#);
    out.extend_from_slice(node.meta.as_bytes());
    out.extend_from_slice(b"}}");
    // Every piece is JSON text serde_json wrote, or ASCII.
    String::from_utf8(out).unwrap_or_default()
}

pub fn claimed() -> Value {
    json!({ "agent_version": AGENT_VERSION })
}

pub fn start(message: &str) -> Value {
    json!({ "message": message })
}

/// A chunk's data as a `Value` (the events write it with [`chunk_event`]).
#[cfg(test)]
pub fn chunk(content: &str, index: u64) -> Value {
    json!({ "content": content, "index": index })
}

pub fn end(result: &Value) -> Value {
    json!({ "result": result })
}

pub fn error(error: &str, recoverable: bool) -> Value {
    json!({ "error": error, "recoverable": recoverable })
}

pub fn cancelled(reason: &str) -> Value {
    json!({ "reason": reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_has_the_contract_shape() {
        let node = NodeFacts::new("gpu-01", "rack-3.gpu", &["a100".into(), "eu-west".into()]);
        let text = event("chunk", "j-42", Some("r-1"), chunk("Hel\"\n", 0), &node);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], "1.0");
        assert_eq!(v["type"], "chunk");
        assert_eq!(v["jobId"], "j-42");
        assert_eq!(v["rayId"], "r-1");
        assert_eq!(v["data"]["content"], "Hel\"\n");
        assert_eq!(v["data"]["index"], 0);
        assert_eq!(
            v["data"]["meta"],
            json!({"node_id": "gpu-01", "node_name": "rack-3.gpu", "tags": ["a100", "eu-west"]})
        );
        let ts = v["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    }

    #[test]
    fn a_chunk_event_is_the_chunk_data_event() {
        let node = NodeFacts::new("gpu-01", "g", &["a".into()]);
        // Byte for byte, but for the time.
        let no_time = |mut s: String| {
            let at = s.find(r#""timestamp":""#).unwrap() + 13;
            s.replace_range(at..at + 24, "T");
            s
        };
        for (content, index, ray) in [("Hel\"\n\u{1}é", 0, Some("r")), ("", 1 << 40, None)] {
            assert_eq!(
                no_time(chunk_event("j", ray, content, index, &node)),
                no_time(event("chunk", "j", ray, chunk(content, index), &node))
            );
        }
    }

    #[test]
    fn empty_ray_id_is_omitted() {
        let node = NodeFacts::named("n");
        for ray in [None, Some("")] {
            let v: Value =
                serde_json::from_str(&event("end", "j", ray, end(&json!({})), &node)).unwrap();
            assert!(v.get("rayId").is_none());
            assert_eq!(
                v["data"]["meta"],
                json!({"node_id": "n", "node_name": "n", "tags": []})
            );
        }
    }

    #[test]
    fn data_that_is_not_an_object_still_gets_meta_and_a_stray_meta_is_replaced() {
        let node = NodeFacts::named("n");
        let v: Value = serde_json::from_str(&event("end", "j", None, json!(3), &node)).unwrap();
        assert_eq!(
            v["data"],
            json!({"meta": {"node_id": "n", "node_name": "n", "tags": []}})
        );
        let data = json!({"meta": "mine", "result": {"a": [1, 2]}});
        let v: Value = serde_json::from_str(&event("end", "j", None, data, &node)).unwrap();
        assert_eq!(v["data"]["result"], json!({"a": [1, 2]}));
        assert_eq!(v["data"]["meta"]["node_id"], "n");
    }
}
