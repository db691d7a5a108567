//! The replayable events stream (PROTOCOL.md §7): every event published on
//! `stream:v1:{jobId}` is also in `events:v1:{jobId}`, in the same order,
//! with the same JSON; the stream is capped, kept a while after the
//! terminal event, and off with `--events-stream=false`. Each test against
//! its own real redis-server and the real `citadel work`.

mod support;

use serde_json::Value as Json;
use std::time::Duration;
use support::observe::{has_ended, kinds};
use support::{wait_until, xadd_job, xlen, xrange_all, RedisServer, Subscriber};

const WAIT: Duration = Duration::from_secs(15);
const QUEUE: &str = "jobs:v1:gpu-general";

/// The job's events as the events stream holds them, parsed, in order; each
/// entry must have exactly the one field `event`.
fn stream_events(conn: &mut redis::Connection, job: &str) -> Vec<Json> {
    xrange_all(conn, &format!("events:v1:{job}"))
        .into_iter()
        .map(|(id, fields)| {
            assert_eq!(fields.len(), 1, "entry {id} of events:v1:{job}: {fields:?}");
            let text = fields
                .get("event")
                .unwrap_or_else(|| panic!("entry {id} has no field 'event': {fields:?}"));
            serde_json::from_str(text).unwrap_or_else(|e| panic!("entry {id}: {e}: {text}"))
        })
        .collect()
}

/// Waits until the subscriber saw the job's terminal event; returns its events.
fn wait_ended(sub: &Subscriber, job: &str) -> Vec<Json> {
    wait_until(&format!("job {job} to end"), WAIT, || {
        let events = sub.events_for(job);
        has_ended(&events).then_some(events)
    })
}

fn ttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query(conn).expect("TTL")
}

#[test]
fn every_published_event_is_in_the_events_stream_in_the_same_order() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = support::worker(&redis, "ev-1", &["--events-ttl", "2m"]);
    let mut conn = redis.conn();
    let jobs = [
        ("j-ok", r#"{"chunks":5}"#),
        ("j-fail", r#"{"chunks":1,"fail":"permanent"}"#),
    ];
    for (job, payload) in jobs {
        xadd_job(&mut conn, QUEUE, job, "echo", payload);
    }
    for (job, _) in jobs {
        let published = wait_ended(&sub, job);
        let stored = stream_events(&mut conn, job);
        assert_eq!(stored, published, "job {job}: stream vs Pub/Sub");
        let t = ttl(&mut conn, &format!("events:v1:{job}"));
        assert!((1..=120).contains(&t), "job {job}: TTL {t} after its end");
    }
    let ok = stream_events(&mut conn, "j-ok");
    assert_eq!(
        kinds(&ok),
        ["claimed", "start", "chunk", "chunk", "chunk", "chunk", "chunk", "end"]
    );
    let fail = stream_events(&mut conn, "j-fail");
    assert_eq!(kinds(&fail), ["claimed", "start", "chunk", "error"]);
}

#[test]
fn a_running_job_keeps_its_stream_at_least_as_long_as_its_status() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = support::worker(
        &redis,
        "ev-2",
        &["--events-ttl", "1m", "--status-ttl", "2h"],
    );
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "j-long", "echo", r#"{"sleep_ms":60000}"#);
    sub.wait_for("j-long", "start", WAIT);
    let t = ttl(&mut conn, "events:v1:j-long");
    assert!(
        t > 3600,
        "TTL {t} while the job runs: want about status-ttl (2h)"
    );
    // A producer's cancel ends it; the terminal event sets the short ttl.
    redis::cmd("SET")
        .arg("job:cancelled:j-long")
        .arg(1)
        .query::<()>(&mut conn)
        .unwrap();
    let published = wait_ended(&sub, "j-long");
    assert_eq!(stream_events(&mut conn, "j-long"), published);
    assert_eq!(kinds(&published), ["claimed", "start", "cancelled"]);
    let t = ttl(&mut conn, "events:v1:j-long");
    assert!((1..=60).contains(&t), "TTL {t} after the end");
}

#[test]
fn the_stream_is_capped_and_keeps_the_newest_events() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = support::worker(&redis, "ev-3", &["--events-maxlen", "10"]);
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "j-many", "echo", r#"{"chunks":1000}"#);
    let published = wait_ended(&sub, "j-many");
    assert_eq!(published.len(), 1003, "claimed, start, 1000 chunks, end");
    let stored = stream_events(&mut conn, "j-many");
    // MAXLEN ~ trims whole radix-tree nodes (100 entries by default).
    assert!(
        (10..=200).contains(&stored.len()),
        "{} events kept with --events-maxlen 10",
        stored.len()
    );
    assert_eq!(stored[..], published[published.len() - stored.len()..]);
}

#[test]
fn events_stream_false_publishes_only() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = support::worker(&redis, "ev-4", &["--events-stream=false"]);
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "j-quiet", "echo", r#"{"chunks":2}"#);
    let published = wait_ended(&sub, "j-quiet");
    assert_eq!(
        kinds(&published),
        ["claimed", "start", "chunk", "chunk", "end"]
    );
    assert_eq!(xlen(&mut conn, "events:v1:j-quiet"), 0);
    let keys: Vec<String> = redis::cmd("KEYS").arg("events:*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[test]
fn bad_events_settings_stop_the_start_with_the_reason() {
    for (flag, value, want) in [
        ("--events-maxlen", "0", "events-stream=false"),
        ("--events-maxlen", "lots", "whole number"),
        ("--events-ttl", "0s", "events-ttl"),
        ("--events-stream=sometimes", "", "not a boolean"),
    ] {
        let mut args = vec!["work", "--redis-url", "redis://127.0.0.1:1", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let out = support::citadel_cmd(&args).output().expect("run citadel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(want), "{flag} {value}: {stderr}");
    }
}
