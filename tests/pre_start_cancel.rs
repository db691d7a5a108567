//! The pre-start cancel check of a batch of entries read together: one
//! `EXISTS` of all their cancel keys, and only when some exist one per key
//! (on a single Redis inside the sweep's read script, the same round trip).
//! Among jobs read in one batch exactly the cancelled ones never start.
//! A job that a blocked read brings alone is checked by the batch script
//! that writes its `claimed` and `start`: the same rule, one round trip.
//! Against a real redis-server and the real `citadel work`.

mod support;

use std::time::Duration;
use support::observe::{has_ended, kinds, status, wait_blocked_reader};
use support::{wait_until, worker, xadd_job, xrange_all, RedisServer, Subscriber};

const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn of_jobs_read_together_only_the_cancelled_ones_never_start() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let jobs: Vec<String> = (0..24).map(|i| format!("pc-{i}")).collect();
    let cancelled = ["pc-2", "pc-9", "pc-10", "pc-23"];
    for job in cancelled {
        redis::cmd("SET")
            .arg(format!("job:cancelled:{job}"))
            .arg("1")
            .exec(&mut c)
            .unwrap();
    }
    for job in &jobs {
        xadd_job(&mut c, QUEUE, job, "echo", "{}");
    }
    // Pre-enqueued: the first read takes eight at once.
    let _w = worker(&redis, "pc-node", &["--concurrency", "8"]);
    for job in &jobs {
        let events = wait_until(&format!("job {job} to end"), WAIT, || {
            let events = sub.events_for(job);
            has_ended(&events).then_some(events)
        });
        if cancelled.contains(&job.as_str()) {
            assert_eq!(kinds(&events), ["cancelled"], "{job} must not start");
            assert_eq!(status(&mut c, job)["status"], "cancelled", "{job}");
        } else {
            assert_eq!(kinds(&events), ["claimed", "start", "end"], "{job}");
            assert_eq!(status(&mut c, job)["status"], "completed", "{job}");
        }
    }
}

/// The kinds of the events in `job`'s replayable events stream.
fn stream_kinds(conn: &mut redis::Connection, job: &str) -> Vec<String> {
    xrange_all(conn, &format!("events:v1:{job}"))
        .into_iter()
        .map(|(_, fields)| {
            let ev: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
            ev["type"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn a_job_read_alone_starts_only_if_not_cancelled() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "pl-node", &[]);
    let ended = |job: &str| {
        wait_until(&format!("job {job} to end"), WAIT, || {
            let events = sub.events_for(job);
            has_ended(&events).then_some(events)
        })
    };
    // Cancelled before it is enqueued, read alone: it never starts.
    wait_blocked_reader(&mut c, WAIT);
    redis::cmd("SET")
        .arg("job:cancelled:pl-cancelled")
        .arg("1")
        .exec(&mut c)
        .unwrap();
    xadd_job(&mut c, QUEUE, "pl-cancelled", "echo", r#"{"chunks":2}"#);
    let events = ended("pl-cancelled");
    assert_eq!(kinds(&events), ["cancelled"], "it must not start");
    assert_eq!(status(&mut c, "pl-cancelled")["status"], "cancelled");
    // Not cancelled, read alone: the whole contract, on the channel and in
    // the events stream, the running stream with its ttl.
    wait_blocked_reader(&mut c, WAIT);
    xadd_job(&mut c, QUEUE, "pl-runs", "echo", r#"{"chunks":2}"#);
    let events = ended("pl-runs");
    assert_eq!(
        kinds(&events),
        ["claimed", "start", "chunk", "chunk", "end"],
        "{events:?}"
    );
    let st = status(&mut c, "pl-runs");
    assert_eq!(st["status"], "completed", "{st:?}");
    assert_eq!(st["worker_id"], "pl-node", "{st:?}");
    assert_eq!(
        stream_kinds(&mut c, "pl-runs"),
        ["claimed", "start", "chunk", "chunk", "end"]
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg("events:v1:pl-runs")
        .query(&mut c)
        .unwrap();
    assert!(ttl > 0, "the events stream expires (ttl {ttl})");
}
