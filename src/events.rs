//! The one place that formats job events (PROTOCOL.md §2) and names their
//! channels. Pure: building a message never touches the network.

use crate::clock;
use serde_json::{json, Map, Value};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Who is speaking: copied into `data.meta` of every event.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_id: String,
    pub node_name: String,
}

/// The Pub/Sub channel of a job's events.
pub fn channel(job_id: &str) -> String {
    format!("stream:v1:{job_id}")
}

/// One event as its JSON text.
pub fn event(
    kind: &str,
    job_id: &str,
    ray_id: Option<&str>,
    data: Value,
    node: &NodeFacts,
) -> String {
    let mut data = match data {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    data.insert(
        "meta".into(),
        json!({"node_id": node.node_id, "node_name": node.node_name}),
    );
    let mut ev = Map::new();
    ev.insert("version".into(), "1.0".into());
    ev.insert("type".into(), kind.into());
    ev.insert("jobId".into(), job_id.into());
    if let Some(r) = ray_id.filter(|r| !r.is_empty()) {
        ev.insert("rayId".into(), r.into());
    }
    ev.insert("timestamp".into(), clock::now_rfc3339().into());
    ev.insert("data".into(), Value::Object(data));
    Value::Object(ev).to_string()
}

pub fn claimed() -> Value {
    json!({ "agent_version": AGENT_VERSION })
}

pub fn start(message: &str) -> Value {
    json!({ "message": message })
}

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
        let node = NodeFacts {
            node_id: "gpu-01".into(),
            node_name: "gpu-01".into(),
        };
        let text = event("chunk", "j-42", Some("r-1"), chunk("Hel", 0), &node);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], "1.0");
        assert_eq!(v["type"], "chunk");
        assert_eq!(v["jobId"], "j-42");
        assert_eq!(v["rayId"], "r-1");
        assert_eq!(v["data"]["content"], "Hel");
        assert_eq!(v["data"]["index"], 0);
        assert_eq!(
            v["data"]["meta"],
            json!({"node_id": "gpu-01", "node_name": "gpu-01"})
        );
        let ts = v["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    }

    #[test]
    fn empty_ray_id_is_omitted() {
        let node = NodeFacts {
            node_id: "n".into(),
            node_name: "n".into(),
        };
        for ray in [None, Some("")] {
            let v: Value =
                serde_json::from_str(&event("end", "j", ray, end(&json!({})), &node)).unwrap();
            assert!(v.get("rayId").is_none());
            assert!(v["data"]["meta"].is_object());
        }
    }
}
