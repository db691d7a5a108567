//! `GET /v1/models`: what the fabric serves. With routes configured, the
//! routed models (any other model is a 404). Without, the models the nodes
//! report in their heartbeats (`engines[].models` of `node:status:stream`,
//! PROTOCOL.md §5): the newest beat of each node, if it is younger than
//! three heartbeat intervals, and of its engines those that answered. A
//! model is listed under the id that routes to it: bare for the default
//! backend, `{backend}/{model}` for another engine kind.

use crate::config::Settings;
use crate::node::heartbeat::STREAM;
use crate::observe::sampler::text;
use redis::Value as Redis;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How many of the newest heartbeats are read (all nodes beat into one stream).
const BEATS_READ: usize = 2000;

/// The OpenAI list for `settings`; `read` runs a Redis command (on the
/// gateway's connection).
pub fn list(
    settings: &Settings,
    mut read: impl FnMut(redis::Cmd) -> redis::RedisResult<Redis>,
) -> redis::RedisResult<Value> {
    if !settings.gateway_routes.is_empty() {
        let data: Vec<Value> = settings
            .gateway_routes
            .iter()
            .map(|r| json!({"id": r.model, "object": "model", "created": 0, "owned_by": "citadel"}))
            .collect();
        return Ok(json!({"object": "list", "data": data}));
    }
    // Redis's clock, not ours: the beats' ids are its time.
    let time: Vec<u64> = redis::from_redis_value(read(redis::cmd("TIME"))?)?;
    let now_ms =
        time.first().copied().unwrap_or(0) * 1000 + time.get(1).copied().unwrap_or(0) / 1000;
    let fresh = settings.heartbeat_interval.max(Duration::from_secs(30)) * 3;
    // Only the fresh beats are read (a beat is a node's whole report).
    let oldest = now_ms.saturating_sub(fresh.as_millis() as u64);
    let beats = read(
        redis::cmd("XREVRANGE")
            .arg(STREAM)
            .arg("+")
            .arg(oldest)
            .arg("COUNT")
            .arg(BEATS_READ)
            .clone(),
    )?;
    let data = from_beats(&beats, now_ms, fresh, &settings.default_backend);
    Ok(json!({"object": "list", "data": data}))
}

/// The models of the nodes' newest fresh beats in an XREVRANGE reply
/// (newest first), sorted by id, each with the nodes that serve it.
fn from_beats(beats: &Redis, now_ms: u64, fresh: Duration, default_backend: &str) -> Vec<Value> {
    let mut seen_nodes = BTreeSet::new();
    let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Redis::Array(entries) = beats else {
        return Vec::new();
    };
    for entry in entries {
        let Redis::Array(parts) = entry else { continue };
        let (Some(id), Some(Redis::Array(fields))) = (parts.first().and_then(text), parts.get(1))
        else {
            continue;
        };
        let at_ms: u64 = id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        if now_ms.saturating_sub(at_ms) > fresh.as_millis() as u64 {
            break; // newest first: the rest are older still
        }
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| text(&kv[0]).as_deref() == Some(name))
                .and_then(|kv| kv.get(1).and_then(text))
        };
        let (Some(node), Some(payload)) = (field("nodeId"), field("payload")) else {
            continue;
        };
        if !seen_nodes.insert(node.clone()) {
            continue; // an older beat of a node already read
        }
        let Ok(payload) = serde_json::from_str::<Value>(&payload) else {
            continue;
        };
        for engine in payload["engines"].as_array().into_iter().flatten() {
            let (Some(backend), Some("ready")) =
                (engine["name"].as_str(), engine["state"].as_str())
            else {
                continue;
            };
            for model in engine["models"].as_array().into_iter().flatten() {
                let Some(model) = model.as_str().filter(|m| !m.is_empty()) else {
                    continue;
                };
                let id = if backend == default_backend {
                    model.to_owned()
                } else {
                    format!("{backend}/{model}")
                };
                models.entry(id).or_default().insert(node.clone());
            }
        }
    }
    models
        .into_iter()
        .map(|(id, nodes)| {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "citadel",
                   "citadel_nodes": nodes})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, node: &str, payload: &str) -> Redis {
        let bulk = |s: &str| Redis::BulkString(s.as_bytes().to_vec());
        Redis::Array(vec![
            bulk(id),
            Redis::Array(vec![
                bulk("nodeId"),
                bulk(node),
                bulk("timestamp"),
                bulk("t"),
                bulk("payload"),
                bulk(payload),
            ]),
        ])
    }

    #[test]
    fn the_newest_fresh_beat_of_each_node_lists_its_ready_engines_models() {
        let a_new = r#"{"engines":[{"name":"vllm","state":"ready","models":["llama-8b"]},
            {"name":"ollama","state":"ready","models":["qwen:7b"]},
            {"name":"llamacpp","state":"down","models":["ignored"]}]}"#;
        let a_old = r#"{"engines":[{"name":"vllm","state":"ready","models":["old-model"]}]}"#;
        let b = r#"{"engines":[{"name":"vllm","state":"ready","models":["llama-8b",""]}]}"#;
        let stale = r#"{"engines":[{"name":"vllm","state":"ready","models":["gone"]}]}"#;
        let beats = Redis::Array(vec![
            beat("100000-0", "a", a_new),
            beat("99000-0", "b", b),
            beat("98000-0", "a", a_old),
            beat("97000-0", "c", "not json"),
            beat("1000-0", "d", stale),
        ]);
        let got = from_beats(&beats, 100_500, Duration::from_secs(90), "vllm");
        let ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["llama-8b", "ollama/qwen:7b"]);
        assert_eq!(got[0]["citadel_nodes"], json!(["a", "b"]));
        assert_eq!(got[1]["citadel_nodes"], json!(["a"]));
    }

    #[test]
    fn garbage_replies_list_nothing() {
        for beats in [
            Redis::Nil,
            Redis::Int(3),
            Redis::Array(vec![Redis::Int(1), Redis::Array(vec![])]),
            Redis::Array(vec![Redis::Array(vec![Redis::BulkString(b"5-0".to_vec())])]),
        ] {
            assert!(from_beats(&beats, 10_000, Duration::from_secs(90), "vllm").is_empty());
        }
    }
}
