//! The settle batch: many jobs' statuses and outcomes go to Redis in few
//! calls of one script (plain events as plain commands around them). These
//! tests guard what batching must not change: each job's events keep their
//! order on both channels, an outcome Redis refuses does not hold up the
//! others settled with it, and no events stream is left without a ttl.
//! Each test against its own real redis-server and the real `citadel work`.

mod support;

use serde_json::Value as Json;
use std::time::Duration;
use support::observe::{has_ended, kinds, pending_rows, status};
use support::{wait_until, worker, xadd_job, xrange_all, RedisServer, Subscriber};

const QUEUE: &str = "jobs:v1:gpu-general";
const GROUP: &str = "workers";
const WAIT: Duration = Duration::from_secs(60);

fn ttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query(conn).unwrap()
}

/// The types of the job's events as its events stream holds them.
fn stream_kinds(conn: &mut redis::Connection, job: &str) -> Vec<String> {
    xrange_all(conn, &format!("events:v1:{job}"))
        .into_iter()
        .map(|(_, fields)| {
            let ev: Json = serde_json::from_str(&fields["event"]).unwrap();
            ev["type"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// 400 jobs at once on `--concurrency 64`: batches of hundreds of steps,
/// split over several script calls. Every job gets claimed → start → end,
/// in that order, on Pub/Sub and in its events stream alike, and ends
/// completed with nothing left pending.
#[test]
fn a_burst_settled_in_batches_keeps_each_jobs_events_in_order() {
    let redis = RedisServer::start_with(&["--appendfsync", "no"]);
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let jobs: Vec<String> = (0..400).map(|i| format!("burst-{i}")).collect();
    for job in &jobs {
        xadd_job(&mut c, QUEUE, job, "echo", r#"{"n":1}"#);
    }
    let _w = worker(&redis, "batch-node", &["--concurrency", "64"]);
    for job in &jobs {
        let events = wait_until(&format!("job {job} to end"), WAIT, || {
            let events = sub.events_for(job);
            has_ended(&events).then_some(events)
        });
        assert_eq!(
            kinds(&events),
            ["claimed", "start", "end"],
            "{job} on Pub/Sub"
        );
    }
    for job in &jobs {
        assert_eq!(
            stream_kinds(&mut c, job),
            ["claimed", "start", "end"],
            "{job}"
        );
        assert_eq!(status(&mut c, job)["status"], "completed", "{job}");
        let left = ttl(&mut c, &format!("events:v1:{job}"));
        assert!(left > 0, "events:v1:{job} has ttl {left}");
    }
    wait_until("nothing pending", WAIT, || {
        pending_rows(&mut c, QUEUE, GROUP).is_empty().then_some(())
    });
}

/// One job's status key is not a hash: Redis refuses its outcome
/// (WRONGTYPE). The seven jobs that end with it, in the same settle batch,
/// are settled all the same; only the refused one stays pending. The
/// events stream of a job whose outcome Redis refused still expires (its
/// `claimed`/`start` set the running ttl, also when they were sent in the
/// same batch as the refused outcome: the `refused-now` job, no sleep).
#[test]
fn an_outcome_redis_refuses_does_not_hold_up_the_rest_of_its_batch() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    for key in ["job:refused:status", "job:refused-now:status"] {
        redis::cmd("SET")
            .arg(key)
            .arg("not a hash")
            .exec(&mut c)
            .unwrap();
    }
    // Eight jobs that start together and end together: one settle batch.
    let mut jobs: Vec<String> = (0..7).map(|i| format!("batch-{i}")).collect();
    jobs.insert(3, "refused".into());
    for job in &jobs {
        xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":300}"#);
    }
    xadd_job(&mut c, QUEUE, "refused-now", "echo", "{}");
    let w = worker(&redis, "refuse-node", &["--concurrency", "9"]);
    for job in jobs.iter().filter(|j| *j != "refused") {
        let events = wait_until(&format!("job {job} to end"), WAIT, || {
            let events = sub.events_for(job);
            has_ended(&events).then_some(events)
        });
        assert_eq!(kinds(&events), ["claimed", "start", "end"], "{job}");
        assert_eq!(status(&mut c, job)["status"], "completed", "{job}");
    }
    wait_until("both refusals logged", WAIT, || {
        (w.log()
            .matches("Redis refused the outcome of entry")
            .count()
            >= 2)
            .then_some(())
    });
    let pending = pending_rows(&mut c, QUEUE, GROUP);
    assert_eq!(
        pending.len(),
        2,
        "only the refused jobs are pending: {pending:?}"
    );
    for job in ["refused", "refused-now"] {
        assert!(
            !has_ended(&sub.events_for(job)),
            "no terminal event for an outcome Redis refused"
        );
        let left = ttl(&mut c, &format!("events:v1:{job}"));
        assert!(left > 0, "events:v1:{job} has ttl {left}");
    }
}

/// A job still running had its `start` written by a script call without
/// its outcome: its events stream expires all the same (never kept
/// forever if the job never ends).
#[test]
fn a_running_jobs_events_stream_has_a_ttl() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    xadd_job(&mut c, QUEUE, "long", "echo", r#"{"sleep_ms":3000}"#);
    let _w = worker(&redis, "ttl-node", &["--concurrency", "2"]);
    sub.wait_for("long", "start", WAIT);
    assert_eq!(status(&mut c, "long")["status"], "processing");
    let left = ttl(&mut c, "events:v1:long");
    assert!(left > 0, "events:v1:long has ttl {left} while its job runs");
    assert_eq!(stream_kinds(&mut c, "long"), ["claimed", "start"]);
}
