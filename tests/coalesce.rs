//! `--coalesce-chunks`: chunk events of one job that wait to be sent
//! together become one chunk event (content joined, one index), optionally
//! held `--chunk-hold` for more. Every token still arrives, in order, with
//! gap-free indices, on Pub/Sub and in the events stream alike; off by
//! default. Each test against its own real redis-server and `citadel work`.

mod support;

use serde_json::Value as Json;
use std::time::Duration;
use support::observe::{has_ended, kinds};
use support::{wait_until, worker, xadd_job, xrange_all, RedisServer, Subscriber};

const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(30);

/// The echo handler's text for `n` chunks, joined.
fn echo_text(n: usize) -> String {
    (0..n).map(|i| format!("chunk {i}\n")).collect()
}

fn wait_ended(sub: &Subscriber, job: &str) -> Vec<Json> {
    wait_until(&format!("job {job} to end"), WAIT, || {
        let events = sub.events_for(job);
        has_ended(&events).then_some(events)
    })
}

/// The chunk events' contents, after checking their indices run 0, 1, 2 …
fn chunk_contents(events: &[Json]) -> Vec<String> {
    let chunks: Vec<&Json> = events.iter().filter(|e| e["type"] == "chunk").collect();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["data"]["index"], i as u64, "chunk {i}: {c}");
    }
    chunks
        .iter()
        .map(|c| c["data"]["content"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn coalesced_chunks_carry_every_token_in_order_with_gap_free_indices() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        "coalesce-node",
        &["--coalesce-chunks", "--chunk-hold", "20ms"],
    );
    xadd_job(&mut c, QUEUE, "many", "echo", r#"{"chunks":300}"#);
    let events = wait_ended(&sub, "many");
    let contents = chunk_contents(&events);
    assert_eq!(contents.concat(), echo_text(300), "every token, in order");
    assert!(
        contents.len() < 300,
        "300 tokens written at once were sent as {} chunk events",
        contents.len()
    );
    let mut expected = vec!["claimed", "start"];
    expected.extend(std::iter::repeat_n("chunk", contents.len()));
    expected.push("end");
    assert_eq!(kinds(&events), expected);
    // The events stream holds the very same events.
    let stored: Vec<Json> = xrange_all(&mut c, "events:v1:many")
        .into_iter()
        .map(|(_, f)| serde_json::from_str(&f["event"]).unwrap())
        .collect();
    assert_eq!(stored, events);
}

#[test]
fn chunks_are_one_event_per_token_by_default() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "plain-node", &[]);
    xadd_job(&mut c, QUEUE, "each", "echo", r#"{"chunks":300}"#);
    let contents = chunk_contents(&wait_ended(&sub, "each"));
    assert_eq!(contents.len(), 300);
    assert_eq!(contents.concat(), echo_text(300));
}

#[test]
fn bad_coalescing_settings_are_refused_with_the_reason() {
    let out = support::citadel_cmd(&["work", "--coalesce-chunks=maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("coalesce-chunks"), "{err}");
    let out = support::citadel_cmd(&["work", "--chunk-hold", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk-hold"), "{err}");
}
