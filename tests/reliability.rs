//! At-least-once guarantees of `citadel work` under crashes, restarts and
//! shutdown: backpressure, reclaim of a dead worker's job, lease renewal of a
//! live one, a restarted consumer taking back its own entries, poison and
//! failing jobs dead-lettered, graceful and forced shutdown, and Redis going
//! away (mid-run, or absent at start).
//!
//! Each test runs its own redis-server (fsync-always AOF) and the real binary.

mod support;

use serde_json::Value as Json;
use std::thread;
use std::time::{Duration, Instant};
use support::dead_letters::{self, Expected};
use support::observe::{
    assert_logged_once, events_of, has_ended, kinds_of, log_lines_with, pending_rows, status,
    sync_subscriber, wait_drained, wait_status,
};
use support::{
    pending_count, pending_for_consumer, wait_until, worker, xadd_fields, xadd_job, xlen,
    xrange_all, Citadel, RedisServer, Subscriber,
};

const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
const GROUP: &str = "workers";
const EVENTS: &str = "stream:v1:*";

/// `data.meta.node_name` of an event.
fn node_of(ev: &Json) -> &str {
    ev.pointer("/data/meta/node_name")
        .and_then(Json::as_str)
        .unwrap_or_default()
}

/// The `thread` ("reader", "settle") of a worker logged one outage of Redis:
/// once when it began, once when it ended, not once per failed retry.
#[track_caller]
fn assert_outage_logged_once(log: &str, thread: &str) {
    assert_logged_once(log, &format!("{thread}: Redis unreachable"));
    assert_logged_once(log, &format!("{thread}: Redis connection restored"));
}

/// `XREADGROUP GROUP workers <consumer> COUNT 100 STREAMS <queue> >`: the ids
/// of entries the group never delivered before.
fn undelivered_ids(conn: &mut redis::Connection, consumer: &str) -> Vec<String> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(QUEUE)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP by the test");
    let redis::Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for s in streams {
        let redis::Value::Array(mut pair) = s else {
            panic!("unexpected XREADGROUP stream {s:?}")
        };
        let Some(redis::Value::Array(entries)) = pair.pop() else {
            continue;
        };
        for e in entries {
            let redis::Value::Array(parts) = e else {
                panic!("unexpected XREADGROUP entry {e:?}")
            };
            ids.push(support::value_to_string(&parts[0]));
        }
    }
    ids
}

/// A job entry with every optional field, so dead letters can be checked whole.
fn xadd_full_job(
    conn: &mut redis::Connection,
    job: &str,
    payload: &str,
    enqueued_at: &str,
    ray: &str,
) -> String {
    xadd_fields(
        conn,
        QUEUE,
        &[
            ("jobId", job),
            ("type", "echo"),
            ("payload", payload),
            ("enqueuedAt", enqueued_at),
            ("rayId", ray),
        ],
    )
}

/// Exact backpressure: never more jobs running than handlers, and never
/// more pending entries than two per handler (one running, one finished
/// whose outcome is on its way to Redis).
#[test]
fn never_runs_more_jobs_than_handlers_nor_holds_more_than_two_entries_each() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let jobs: Vec<String> = (0..20).map(|i| format!("bp-{i}")).collect();
    for j in &jobs {
        xadd_job(&mut c, QUEUE, j, "echo", r#"{"sleep_ms":150}"#);
    }
    let t0 = Instant::now();
    let _w = worker(&redis, "bp-node", &["--concurrency", "2"]);

    let deadline = t0 + Duration::from_secs(30);
    let (mut most, mut samples) = (0, 0u64);
    loop {
        let held = pending_for_consumer(&mut c, QUEUE, GROUP, "bp-node");
        assert!(
            held <= 4,
            "the consumer holds {held} pending entries with --concurrency 2"
        );
        most = most.max(held);
        samples += 1;
        // Check for the end only now and then, to keep the sampling dense.
        if samples % 25 == 0 {
            let done = jobs
                .iter()
                .filter(|j| {
                    status(&mut c, j).get("status").map(String::as_str) == Some("completed")
                })
                .count();
            if done == jobs.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {done} of 20 jobs completed within 30s"
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
    let took = t0.elapsed();
    assert!(
        samples > 100,
        "too few samples ({samples}) to mean anything"
    );
    assert!(most >= 2, "the two handler slots were never both used");
    // 20 jobs of ≥150 ms, at most 2 at a time: ≥ 10 rounds.
    assert!(
        took >= Duration::from_millis(1500),
        "20 × 150 ms jobs on 2 slots finished in {took:?}: more than 2 ran at once"
    );
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
}

#[test]
fn killed_worker_job_is_reclaimed() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "reclaim-1";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":1500}"#);

    // claim-idle 1 s: the lease is renewed every 333 ms, so only a stall of
    // over 667 ms could make node-b reclaim its own running entry.
    let mut a = worker(&redis, "node-a", &["--claim-idle", "1s"]);
    let start = sub.wait_for(job, "start", Duration::from_secs(10));
    assert_eq!(node_of(&start), "node-a");
    // Status and ack come only after the 1.5 s run: killing now is a crash mid-job.
    a.kill9();
    assert_eq!(pending_for_consumer(&mut c, QUEUE, GROUP, "node-a"), 1);

    let b = worker(&redis, "node-b", &["--claim-idle", "1s"]);
    let end = sub.wait_for(job, "end", Duration::from_secs(15));
    assert_eq!(node_of(&end), "node-b", "end event: {end}");
    let st = wait_status(&mut c, job, "completed", Duration::from_secs(5));
    assert_eq!(st["worker_id"], "node-b", "{st:?}");
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
    assert_eq!(xlen(&mut c, DLQ), 0, "nothing may be dead-lettered");
    let starts: Vec<String> = events_of(&sub, job, "start")
        .iter()
        .map(|e| node_of(e).to_owned())
        .collect();
    assert_eq!(starts, ["node-a", "node-b"]);
    assert_logged_once(&b.log(), "reclaimed 1 entries");
}

#[test]
fn long_job_with_second_worker_runs_exactly_once() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // claim-idle 1 s, renewed every 333 ms: a loaded machine would have to
    // stall a worker for over 667 ms to lose the lease (at 300 ms, 200 ms would do).
    let a = worker(&redis, "once-a", &["--claim-idle", "1s"]);
    let b = worker(&redis, "once-b", &["--claim-idle", "1s"]);
    a.wait_working();
    b.wait_working();

    let job = "long-1";
    let id = xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":4000}"#);
    sub.wait_for(job, "start", Duration::from_secs(10));
    // 4 s = 4 × claim-idle: without lease renewal the other worker (or the
    // same one) would reclaim it within ~1.3 s, which counts a delivery.
    let mut samples = 0;
    while !has_ended(&sub.events_for(job)) {
        for row in pending_rows(&mut c, QUEUE, GROUP) {
            assert_eq!(row.id, id);
            assert_eq!(
                row.deliveries, 1,
                "the running job was delivered again: {row:?}"
            );
        }
        samples += 1;
        assert!(samples < 1000, "the job did not end within ~20 s");
        thread::sleep(Duration::from_millis(20));
    }
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
    assert!(samples > 50, "too few samples ({samples})");
    sync_subscriber(&redis, &sub);
    let kinds = kinds_of(&sub, job);
    assert_eq!(kinds, ["claimed", "start", "end"]);
    for w in [&a, &b] {
        assert!(!w.log().contains("reclaimed"), "{}", w.log());
    }
}

#[test]
fn restarted_worker_resumes_its_own_pending_job_once_the_dead_ones_name_expires() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "resume-1";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":1500}"#);

    // claim-idle 60 s: a reclaim cannot explain a rerun within the test. The
    // consumer name's claim lasts 10 s (claim-idle, at most 10 s): the
    // restarted worker waits that long at most, never claim-idle.
    let mut first = worker(&redis, "node-r", &["--claim-idle", "60s"]);
    sub.wait_for(job, "start", Duration::from_secs(10));
    first.kill9();

    let second = worker(&redis, "node-r", &["--claim-idle", "60s"]);
    wait_until("a second start event", Duration::from_secs(30), || {
        (events_of(&sub, job, "start").len() == 2).then_some(())
    });
    sub.wait_for(job, "end", Duration::from_secs(10));
    let st = wait_status(&mut c, job, "completed", Duration::from_secs(5));
    assert_eq!(st["worker_id"], "node-r");
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
    assert_eq!(xlen(&mut c, DLQ), 0);
    assert_logged_once(
        &second.log(),
        "resuming 1 of this consumer's own pending entries",
    );
}

#[test]
fn a_second_live_worker_with_the_same_name_exits_2() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // claim-idle 3 s: the name's claim lasts 3 s and is renewed every 1 s.
    let first = worker(&redis, "node-twin", &["--claim-idle", "3s"]);
    first.wait_working();
    let job = "twin-1";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":6000}"#);
    sub.wait_for(job, "start", Duration::from_secs(10));

    // A second live process with the same name must not read (it would take
    // back the first one's running entry as its "own pending" one): it
    // watches the name's claim, sees it renewed, and refuses to start.
    let mut second = worker(&redis, "node-twin", &["--claim-idle", "3s"]);
    let status = second
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the twin kept running: {}", second.log()));
    assert_eq!(status.code(), Some(2), "{}", second.log());
    let log = second.log();
    let refusal: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("citadel: consumer name 'node-twin' is in use"))
        .collect();
    assert_eq!(refusal.len(), 1, "{log}");
    assert!(refusal[0].contains("--consumer"), "{log}");
    assert!(!log.contains("resuming"), "the twin took entries: {log}");

    // The first one never noticed and finishes its job, once.
    sub.wait_for(job, "end", Duration::from_secs(20));
    sync_subscriber(&redis, &sub);
    assert_eq!(
        events_of(&sub, job, "start").len(),
        1,
        "the twin ran the job too"
    );
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
}

/// The two containers case: same host name (host networking), and the
/// other container's pid is not visible here, yet that process is alive.
/// Only its renewals tell that it is; host + pid tell nothing.
#[test]
fn a_live_holder_on_the_same_host_whose_pid_is_not_visible_is_not_taken_for_dead() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let key = "citadel:v1:consumer:workers:node-pid1";
    // A live holder on this host with a pid that does not exist here (as
    // seen from another container): it renews its claim every 300 ms, for
    // 3 s each time, so a stalled renewal thread cannot let it expire
    // within the worker's 2 s watch (its claim-idle is 1 s).
    let holder = format!("{}|{}|otherprocess", hostname(), u32::MAX - 7);
    let renew = {
        let url = redis.url();
        let holder = holder.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(&holder)
                    .arg("PX")
                    .arg(3000)
                    .query(&mut c)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        (stop, t)
    };
    let mut w = worker(&redis, "node-pid1", &["--claim-idle", "1s"]);
    let status = w
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("took over a live holder's name: {}", w.log()));
    assert_eq!(status.code(), Some(2), "{}", w.log());
    assert!(
        w.log().contains(&format!("pid {} on host", u32::MAX - 7)),
        "{}",
        w.log()
    );
    renew.0.store(true, std::sync::atomic::Ordering::SeqCst);
    renew.1.join().unwrap();
    let _: () = redis::cmd("DEL").arg(key).query(&mut c).unwrap();
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn panicking_job_is_retried_then_dead_lettered_at_once_with_the_panic_message() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // claim-idle 60 s: a redelivery cannot explain anything seen here.
    let w = worker(
        &redis,
        "node-p",
        &[
            "--max-retries",
            "2",
            "--retry-base",
            "5ms",
            "--claim-idle",
            "60s",
        ],
    );
    let (job, payload) = ("poison-1", r#"{"fail":"panic"}"#);
    let (at, ray) = ("2026-01-20T10:00:00.000Z", "ray-poison");
    let id = xadd_full_job(&mut c, job, payload, at, ray);

    let err = sub.wait_for(job, "error", Duration::from_secs(20));
    assert_eq!(err.pointer("/data/recoverable"), Some(&Json::Bool(false)));
    let text = err.pointer("/data/error").and_then(Json::as_str).unwrap();
    assert!(text.contains("echo: asked to panic"), "{text}");
    assert!(text.contains("gave up after 3 attempts"), "{text}");
    let dls = xrange_all(&mut c, DLQ);
    assert_eq!(dls.len(), 1, "{dls:?}");
    dead_letters::assert_whole(
        &dls[0].1,
        &Expected {
            entry_id: &id,
            queue: QUEUE,
            reason: "handler panicked: echo: asked to panic",
            error_has: "asked to panic",
            deliveries: "1",
            worker: "node-p",
            job,
            job_type: "echo",
            payload,
            enqueued_at: at,
            ray,
        },
    );
    sync_subscriber(&redis, &sub);
    let kinds = kinds_of(&sub, job);
    assert_eq!(
        kinds,
        ["claimed", "start", "error"],
        "one delivery, one run"
    );
    let st = wait_status(&mut c, job, "failed", Duration::from_secs(5));
    assert!(st["error"].contains("asked to panic"), "{st:?}");
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
    assert_eq!(w.log().matches("; retrying in ").count(), 2, "{}", w.log());

    // The process outlived three handler panics and still works.
    xadd_job(&mut c, QUEUE, "after-poison", "echo", r#"{"x":1}"#);
    let end = sub.wait_for("after-poison", "end", Duration::from_secs(10));
    assert_eq!(end.pointer("/data/result/x"), Some(&Json::from(1)));
    wait_status(&mut c, "after-poison", "completed", Duration::from_secs(5));
}

#[test]
fn always_failing_job_is_dead_lettered_with_all_fields() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let _w = worker(
        &redis,
        "node-f",
        &["--max-retries", "1", "--retry-base", "5ms"],
    );
    let (job, payload) = ("failing-1", r#"{"fail":"retryable","n":7}"#);
    let (at, ray) = ("2026-01-20T11:00:00.000Z", "ray-failing");
    let id = xadd_full_job(&mut c, job, payload, at, ray);

    let err = sub.wait_for(job, "error", Duration::from_secs(10));
    assert_eq!(err.pointer("/data/recoverable"), Some(&Json::Bool(false)));
    assert_eq!(err.get("rayId").and_then(Json::as_str), Some(ray));
    let dls = xrange_all(&mut c, DLQ);
    assert_eq!(dls.len(), 1, "{dls:?}");
    let dl = &dls[0].1;
    dead_letters::assert_whole(
        dl,
        &Expected {
            entry_id: &id,
            queue: QUEUE,
            reason: "retries exhausted",
            error_has: "gave up after 2 attempts",
            deliveries: "1",
            worker: "node-f",
            job,
            job_type: "echo",
            payload,
            enqueued_at: at,
            ray,
        },
    );
    // Retries happen in-process: one delivery, one start.
    assert_eq!(events_of(&sub, job, "start").len(), 1);
    let st = wait_status(&mut c, job, "failed", Duration::from_secs(5));
    assert_eq!(st["error"], dl["error"]);
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
}

#[test]
fn sigterm_drains_in_flight_jobs_and_reads_nothing_new() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let running: Vec<String> = (0..3).map(|i| format!("drain-{i}")).collect();
    for j in &running {
        xadd_job(&mut c, QUEUE, j, "echo", r#"{"sleep_ms":800}"#);
    }
    let mut w = worker(
        &redis,
        "node-d",
        &["--concurrency", "3", "--shutdown-grace", "10s"],
    );
    for j in &running {
        sub.wait_for(j, "start", Duration::from_secs(10));
    }

    let t0 = Instant::now();
    w.sigterm();
    let late: Vec<String> = (0..5).map(|i| format!("late-{i}")).collect();
    let mut late_ids: Vec<String> = late
        .iter()
        .map(|j| xadd_job(&mut c, QUEUE, j, "echo", "{}"))
        .collect();

    let code = w
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", w.log()));
    assert_eq!(code.code(), Some(0), "{}", w.log());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    for j in &running {
        sub.wait_for(j, "end", Duration::from_secs(5));
        assert_eq!(status(&mut c, j)["status"], "completed");
    }
    assert_eq!(
        pending_count(&mut c, QUEUE, GROUP),
        0,
        "in-flight jobs not acked"
    );
    sync_subscriber(&redis, &sub);
    for j in &late {
        assert!(sub.events_for(j).is_empty(), "{j}: {:?}", sub.events_for(j));
        assert!(status(&mut c, j).is_empty(), "{j} got a status");
    }
    // The group never handed the late entries to anyone: a new reader gets all.
    let mut got = undelivered_ids(&mut c, "test-reader");
    got.sort();
    late_ids.sort();
    assert_eq!(got, late_ids);
}

#[test]
fn sigint_drains_in_flight_job_without_waiting_out_a_blocked_read() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // One of three slots busy: the two free slots cover both streams (queue
    // and node stream), so the reader sits in a long XREADGROUP BLOCK (20 s,
    // cut to claim-idle/3 = 10 s by the reclaim schedule). With fewer free
    // slots than streams it would only block 100 ms at a time.
    let mut w = worker(
        &redis,
        "node-i",
        &[
            "--concurrency",
            "3",
            "--block",
            "20s",
            "--shutdown-grace",
            "10s",
        ],
    );
    xadd_job(&mut c, QUEUE, "int-1", "echo", r#"{"sleep_ms":800}"#);
    sub.wait_for("int-1", "start", Duration::from_secs(10));

    let t0 = Instant::now();
    w.sigint();
    let code = w
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGINT:\n{}", w.log()));
    assert_eq!(code.code(), Some(0), "{}", w.log());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}: the blocked read was waited out"
    );
    sub.wait_for("int-1", "end", Duration::from_secs(5));
    assert_eq!(status(&mut c, "int-1")["status"], "completed");
    assert_eq!(pending_count(&mut c, QUEUE, GROUP), 0);
    assert_logged_once(&w.log(), "reader stopped");
}

#[test]
fn shutdown_grace_expiry_leaves_jobs_pending() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "grace-1";
    let id = xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":30000}"#);
    let mut w = worker(&redis, "node-g", &["--shutdown-grace", "300ms"]);
    sub.wait_for(job, "start", Duration::from_secs(10));
    wait_status(&mut c, job, "processing", Duration::from_secs(5));

    let t0 = Instant::now();
    w.sigterm();
    let code = w
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", w.log()));
    assert_eq!(code.code(), Some(0), "{}", w.log());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    assert_logged_once(&w.log(), "cancelling 1 unfinished jobs");

    sync_subscriber(&redis, &sub);
    let events = sub.events_for(job);
    assert!(!has_ended(&events), "{events:?}");
    assert_eq!(status(&mut c, job)["status"], "processing");
    let rows = pending_rows(&mut c, QUEUE, GROUP);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].id.as_str(), rows[0].consumer.as_str()),
        (id.as_str(), "node-g")
    );
    // Reclaimable: another consumer can take it over.
    let claimed: Vec<String> = redis::cmd("XCLAIM")
        .arg(QUEUE)
        .arg(GROUP)
        .arg("rescuer")
        .arg(0)
        .arg(&id)
        .arg("JUSTID")
        .query(&mut c)
        .expect("XCLAIM");
    assert_eq!(claimed, [id]);
}

#[test]
fn second_signal_stops_at_once() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "twice-1";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":30000}"#);
    let mut w = worker(&redis, "node-s", &["--shutdown-grace", "60s"]);
    sub.wait_for(job, "start", Duration::from_secs(10));

    let t0 = Instant::now();
    w.sigint();
    w.wait_for_log("signal received", Duration::from_secs(5));
    w.sigint();
    let code = w
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after two SIGINTs:\n{}", w.log()));
    assert_eq!(code.code(), Some(0), "{}", w.log());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(4), "exit took {took:?}");

    sync_subscriber(&redis, &sub);
    assert!(!has_ended(&sub.events_for(job)));
    assert_eq!(pending_for_consumer(&mut c, QUEUE, GROUP, "node-s"), 1);
}

#[test]
fn redis_restart_mid_run_loses_no_job() {
    let mut redis = RedisServer::start();
    let mut c = redis.conn();
    let jobs: Vec<String> = (0..30).map(|i| format!("outage-{i}")).collect();
    for j in &jobs {
        xadd_job(&mut c, QUEUE, j, "echo", r#"{"sleep_ms":100}"#);
    }
    // claim-idle 2s bounds the one case a restart can leave to reclaim: an
    // XREADGROUP that Redis persisted but whose reply the kill cut off.
    let mut w = worker(
        &redis,
        "node-o",
        &["--concurrency", "4", "--claim-idle", "2s"],
    );
    let pid = w.pid();
    let completed = |c: &mut redis::Connection| {
        jobs.iter()
            .filter(|j| status(c, j).get("status").map(String::as_str) == Some("completed"))
            .count()
    };
    wait_until("5 completed jobs", Duration::from_secs(15), || {
        (completed(&mut c) >= 5).then_some(())
    });
    let before = completed(&mut c);
    redis.kill();
    assert!(before < jobs.len(), "all jobs ended before the outage");
    // The outage itself is the point here: a fixed, short one.
    thread::sleep(Duration::from_secs(1));
    redis.restart();

    let mut c = redis.conn();
    wait_until("all 30 jobs completed", Duration::from_secs(30), || {
        (completed(&mut c) == jobs.len()).then_some(())
    });
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(10));
    assert_eq!(xlen(&mut c, DLQ), 0);
    assert!(w.is_running(), "the worker exited: {}", w.log());
    assert_eq!(w.pid(), pid);
    let log = w.log();
    // Both threads used their connections after the kill: each saw the
    // outage, and logged it once.
    assert_outage_logged_once(&log, "reader");
    assert_outage_logged_once(&log, "settle");
    // Outcomes settled during the outage were retried until they landed, not
    // dropped and left to a reclaim: every job ran exactly once. (The one
    // redelivery an outage may cause, a read whose reply the kill cut off,
    // is still the job's only run.)
    for j in &jobs {
        let runs = log.matches(&format!("job {j} (echo) started")).count();
        assert_eq!(runs, 1, "job {j} ran {runs} times:\n{log}");
    }
}

#[test]
fn reconnected_worker_does_not_rerun_its_running_job() {
    let mut redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // Free slots while the job runs, so the re-read of own pending entries
    // after the reconnect sees the running entry.
    let w = worker(
        &redis,
        "node-rr",
        &[
            "--concurrency",
            "2",
            "--block",
            "200ms",
            "--redis-timeout",
            "500ms",
        ],
    );
    let job = "rerun-1";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":1500}"#);
    sub.wait_for(job, "start", Duration::from_secs(10));
    redis.kill();
    w.wait_for_log("Redis unreachable", Duration::from_secs(5));
    redis.restart();
    w.wait_for_log("Redis connection restored", Duration::from_secs(10));
    let mut c = redis.conn();
    wait_status(&mut c, job, "completed", Duration::from_secs(10));
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
    let log = w.log();
    let runs = log.matches(&format!("job {job} (echo) started")).count();
    assert_eq!(runs, 1, "the running job was started again:\n{log}");
    // The reader's connection broke under it, and the settle thread polled
    // the cancel key while the job ran: each saw the outage, once.
    assert_outage_logged_once(&log, "reader");
    assert_outage_logged_once(&log, "settle");
}

#[test]
fn worker_survives_redis_absent_at_start() {
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut w = Citadel::spawn(
        &["work", "--node-name", "node-late", "--block", "1s"],
        &[("CITADEL_REDIS_URL", &url), ("RUST_LOG", "debug")],
    );
    w.wait_for_log("Redis unreachable", Duration::from_secs(10));
    assert!(w.is_running(), "the worker gave up: {}", w.log());

    let redis = RedisServer::start_on(port);
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    xadd_job(&mut c, QUEUE, "late-1", "echo", r#"{"ok":true}"#);
    sub.wait_for("late-1", "end", Duration::from_secs(15));
    wait_status(&mut c, "late-1", "completed", Duration::from_secs(5));
    let log = w.log();
    assert_outage_logged_once(&log, "reader");
    // The settle thread had nothing to write while Redis was away: it may
    // not have seen the outage at all, but not more than once.
    let settle = log_lines_with(&log, "settle: Redis unreachable");
    assert!(settle.len() <= 1, "{settle:#?}\n{log}");
}
