//! `citadel work` against a Redis that refuses writes, stalls, fails over,
//! restarts, deletes the group, or hands a job to another consumer: no
//! outcome is lost, none is written twice, no job runs in a loop. Each test
//! runs the real binary against real redis-server processes.

mod support;

use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use support::fake_nexus::FakeNexus;
use support::observe::{
    command_calls, events_of, info_field, is_terminal, kinds_of, pending_rows, reset_command_calls,
    status, sync_subscriber, wait_blocked_reader, wait_drained, wait_status,
};
use support::stall_proxy::StallProxy;
use support::{
    free_port, wait_until, worker, xadd_job, xlen, xrange_all, Citadel, RedisServer, Subscriber,
};

const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
const GROUP: &str = "workers";
const EVENTS: &str = "stream:v1:*";

fn config_set(conn: &mut redis::Connection, key: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("CONFIG SET {key} {value}: {e}"));
}

/// `n` jobs that fail for good (`bad-*`) and `n` that succeed (`good-*`),
/// each sleeping `sleep_ms` first.
fn enqueue_mixed(
    conn: &mut redis::Connection,
    prefix: &str,
    n: usize,
    sleep_ms: u64,
) -> Vec<String> {
    let mut jobs = Vec::new();
    for i in 0..n {
        let bad = format!("{prefix}-bad-{i}");
        let payload = json!({"fail": "permanent", "sleep_ms": sleep_ms}).to_string();
        xadd_job(conn, QUEUE, &bad, "echo", &payload);
        let good = format!("{prefix}-good-{i}");
        let payload = json!({"n": i, "sleep_ms": sleep_ms}).to_string();
        xadd_job(conn, QUEUE, &good, "echo", &payload);
        jobs.extend([bad, good]);
    }
    jobs
}

/// Waits until the worker logged the end of `n` runs (whether or not Redis
/// took their outcomes).
fn wait_ended_on_worker(w: &Citadel, n: usize) {
    wait_until(
        "the jobs to end on the worker",
        Duration::from_secs(30),
        || {
            let log = w.log();
            (log.matches(") failed in ").count() + log.matches(") completed in ").count() >= n)
                .then_some(())
        },
    );
}

/// Every job ended exactly once: one terminal event (and nothing after it),
/// one run, the right status, and each failed one exactly one dead letter.
fn assert_each_ended_once(redis: &RedisServer, sub: &Subscriber, jobs: &[String]) {
    let mut c = redis.conn();
    for job in jobs {
        let want = if job.contains("-bad-") {
            "failed"
        } else {
            "completed"
        };
        wait_status(&mut c, job, want, Duration::from_secs(30));
    }
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(30));
    sync_subscriber(redis, sub);
    for job in jobs {
        let kinds = kinds_of(sub, job);
        let ends: Vec<usize> = (0..kinds.len())
            .filter(|&i| is_terminal(&kinds[i]))
            .collect();
        assert_eq!(ends.len(), 1, "{job}: one terminal event, got {kinds:?}");
        assert_eq!(
            ends[0],
            kinds.len() - 1,
            "{job}: events after the end: {kinds:?}"
        );
        assert!(
            events_of(sub, job, "start").len() <= 1,
            "{job} ran twice: {kinds:?}"
        );
    }
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for (_, dl) in xrange_all(&mut c, DLQ) {
        *per_job.entry(dl["jobId"].clone()).or_default() += 1;
    }
    let bad: Vec<&String> = jobs.iter().filter(|j| j.contains("-bad-")).collect();
    assert_eq!(per_job.len(), bad.len(), "dead letters: {per_job:?}");
    for job in bad {
        assert_eq!(
            per_job.get(job),
            Some(&1),
            "dead letters of {job}: {per_job:?}"
        );
    }
}

/// While Redis is at `maxmemory` (noeviction) every job's outcome waits:
/// nothing is acknowledged without it. Once Redis has room again, every
/// job completes or is dead-lettered, each exactly once.
#[test]
fn outcomes_wait_while_redis_is_full_then_land_exactly_once() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let jobs = enqueue_mixed(&mut c, "oom", 20, 1500);
    let w = worker(&redis, "node-oom", &["--concurrency", "40"]);
    for job in &jobs {
        sub.wait_for(job, "start", Duration::from_secs(30));
    }
    // Every job runs; now Redis is full: no write that grows memory passes.
    config_set(&mut c, "maxmemory-policy", "noeviction");
    config_set(&mut c, "maxmemory", "1");
    // The jobs ended here; Redis took none of their outcomes, and none was
    // acknowledged without one.
    wait_ended_on_worker(&w, jobs.len());
    let pending: HashSet<String> = pending_rows(&mut c, QUEUE, GROUP)
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(pending.len(), jobs.len(), "acked without an outcome");
    assert_eq!(xlen(&mut c, DLQ), 0);
    for job in &jobs {
        assert_eq!(status(&mut c, job)["status"], "processing", "{job}");
    }
    let log = w.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("settle: Redis is out of memory"))
            .count(),
        1,
        "logged once per episode: {log}"
    );

    config_set(&mut c, "maxmemory", "0");
    assert_each_ended_once(&redis, &sub, &jobs);
    w.wait_for_log("settle: Redis works again", Duration::from_secs(10));
}

/// A Redis at `maxmemory` for several times the consumer name's lifetime:
/// the worker keeps its name (renewed with PEXPIRE, which a full Redis
/// still runs) and the lease of its running job, so another worker with a
/// short claim-idle reclaims nothing and the job runs once.
#[test]
fn a_worker_keeps_its_name_and_its_job_through_a_long_full_redis() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let runs = redis.dir().join("echo-runs.log");
    let runs_env = runs.to_string_lossy().into_owned();
    let env = [("CITADEL_TEST_ECHO_RUNS", runs_env.as_str())];
    let fast = ["--claim-idle", "1s"];
    let _a = support::worker_with_env(&redis, "node-full", &fast, &env);
    xadd_job(&mut c, QUEUE, "j-full", "echo", r#"{"sleep_ms":6000}"#);
    sub.wait_for("j-full", "start", Duration::from_secs(30));
    let b = support::worker_with_env(&redis, "node-other", &fast, &env);
    b.wait_working();

    let key = "citadel:v1:consumer:workers:node-full";
    config_set(&mut c, "maxmemory-policy", "noeviction");
    config_set(&mut c, "maxmemory", "1");
    // Four times the name's lifetime (1 s), sampled throughout.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
        assert!(
            pttl > 0,
            "the consumer name lapsed while Redis was full (PTTL {pttl})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    config_set(&mut c, "maxmemory", "0");
    assert_each_ended_once(&redis, &sub, &["j-full".to_string()]);
    let ran = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(ran.lines().count(), 1, "runs: {ran}");
    assert_eq!(status(&mut c, "j-full")["worker_id"], "node-full");
}

/// A worker whose Redis answers nothing for longer than claim-idle looks
/// dead: another worker reclaims its running job. When the answers come
/// back, the stalled worker says its renewal was late and that it lost the
/// lease, stops its run, and writes nothing of the job; the job ends once,
/// by the worker that reclaimed it.
#[test]
fn a_worker_stalled_past_claim_idle_says_so_and_yields_the_job() {
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port());
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let url = proxy.url();
    let a = Citadel::spawn(
        &[
            "work",
            "--redis-url",
            &url,
            "--node-name",
            "node-stalled",
            "--claim-idle",
            "1s",
            "--redis-timeout",
            "20s",
            "--block",
            "1s",
        ],
        &[],
    );
    a.wait_working();
    xadd_job(&mut c, QUEUE, "j-stall", "echo", r#"{"sleep_ms":4000}"#);
    sub.wait_for("j-stall", "start", Duration::from_secs(30));
    let b = worker(&redis, "node-live", &["--claim-idle", "1s"]);
    proxy.hold_replies(true);
    wait_until(
        "the live worker to reclaim the job",
        Duration::from_secs(20),
        || {
            pending_rows(&mut c, QUEUE, GROUP)
                .iter()
                .any(|p| p.consumer == "node-live")
                .then_some(())
        },
    );
    proxy.hold_replies(false);
    a.wait_for_log("after the last renewal", Duration::from_secs(20));
    a.wait_for_log("lost the lease of entry", Duration::from_secs(20));
    wait_status(&mut c, "j-stall", "completed", Duration::from_secs(30));
    assert_eq!(status(&mut c, "j-stall")["worker_id"], "node-live");
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(20));
    // Published by the settle that drained it; read here once the
    // subscriber got everything published before now.
    sync_subscriber(&redis, &sub);
    assert_eq!(events_of(&sub, "j-stall", "end").len(), 1);
    assert!(
        b.log().contains("job j-stall (echo) completed"),
        "{}",
        b.log()
    );
}

/// Redis is down for longer than claim-idle (a restart that takes a while):
/// when it is back every running entry looks idle past claim-idle, since
/// Redis counts the downtime. The workers that run them renew their leases
/// first thing after reconnecting, and the others reclaim only after one
/// renewal period, so no live worker's job is taken: each runs once.
#[test]
fn a_redis_down_past_claim_idle_takes_no_job_from_a_live_worker() {
    let mut redis = RedisServer::start_with(&["--appendfsync", "always"]);
    let mut c = redis.conn();
    let runs = redis.dir().join("echo-runs.log");
    let runs_env = runs.to_string_lossy().into_owned();
    let env = [("CITADEL_TEST_ECHO_RUNS", runs_env.as_str())];
    let args = ["--claim-idle", "2s", "--concurrency", "4"];
    let sub = Subscriber::new(&redis, EVENTS);
    let _a = support::worker_with_env(&redis, "node-a", &args, &env);
    let jobs: Vec<String> = (0..4).map(|i| format!("j-down-{i}")).collect();
    for job in &jobs {
        xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":7000}"#);
    }
    for job in &jobs {
        sub.wait_for(job, "start", Duration::from_secs(30));
    }
    let b = support::worker_with_env(&redis, "node-b", &args, &env);
    b.wait_working();
    redis.stop();
    // The outage itself: longer than claim-idle.
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    let mut c = redis.conn();
    for job in &jobs {
        wait_status(&mut c, job, "completed", Duration::from_secs(30));
        assert_eq!(status(&mut c, job)["worker_id"], "node-a", "{job}");
    }
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(20));
    let ran = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(ran.lines().count(), jobs.len(), "runs: {ran}");
}

/// The connected Redis is demoted to a replica of another (a failover seen
/// from a node that kept its address), then promoted back. Jobs finishing
/// meanwhile keep their outcomes; none runs in a loop; each dead letter is
/// written once.
#[test]
fn a_demoted_primary_loses_no_outcome_and_reruns_no_job() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let (mut ca, mut cb) = (a.conn(), b.conn());
    let replicaof = |c: &mut redis::Connection, port: Option<u16>| {
        let mut cmd = redis::cmd("REPLICAOF");
        match port {
            Some(p) => cmd.arg("127.0.0.1").arg(p),
            None => cmd.arg("NO").arg("ONE"),
        };
        cmd.query::<()>(c).expect("REPLICAOF");
    };
    let synced = |c: &mut redis::Connection| {
        wait_until("replication link up", Duration::from_secs(20), || {
            (info_field(c, "replication", "master_link_status").as_deref() == Some("up"))
                .then_some(())
        })
    };
    let caught_up = |from: &mut redis::Connection, to: &mut redis::Connection| {
        wait_until("the replica to catch up", Duration::from_secs(20), || {
            let p = info_field(from, "replication", "master_repl_offset");
            let r = info_field(to, "replication", "master_repl_offset");
            (p.is_some() && p == r).then_some(())
        })
    };
    replicaof(&mut cb, Some(a.port()));
    synced(&mut cb);

    let sub = Subscriber::new(&a, EVENTS);
    let w = worker(
        &a,
        "node-fo",
        &["--concurrency", "10", "--redis-timeout", "1s"],
    );
    let jobs = enqueue_mixed(&mut ca, "fo", 5, 2500);
    for job in &jobs {
        sub.wait_for(job, "start", Duration::from_secs(30));
    }
    // Failover: B takes over, A becomes its replica (read-only).
    caught_up(&mut ca, &mut cb);
    replicaof(&mut cb, None);
    replicaof(&mut ca, Some(b.port()));
    synced(&mut ca);
    wait_ended_on_worker(&w, jobs.len());
    // And back: A is the primary again (with B's data, which is its own).
    caught_up(&mut cb, &mut ca);
    replicaof(&mut ca, None);
    assert_each_ended_once(&a, &sub, &jobs);
    let log = w.log();
    for job in &jobs {
        let runs = log.matches(&format!("job {job} (echo) started")).count();
        assert_eq!(runs, 1, "{job} ran {runs} times: {log}");
    }
    assert!(log.contains("Redis is a read-only replica now"), "{log}");
}

/// A settle batch that Redis runs but whose reply comes too late (held back
/// by a proxy past the worker's read timeout): the worker sends it again,
/// and the second time it writes nothing.
#[test]
fn a_settle_reply_lost_after_redis_ran_it_writes_each_outcome_once() {
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port());
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let url = proxy.url();
    let w = Citadel::spawn(
        &[
            "work",
            "--redis-url",
            &url,
            "--node-name",
            "node-stall",
            "--concurrency",
            "20",
            "--redis-timeout",
            "300ms",
        ],
        &[],
    );
    w.wait_working();
    // The first batch with a failed job's outcome reaches Redis; its reply
    // is kept back for 2 s, well past the worker's 300 ms read timeout.
    // Set before the jobs exist, so that no lag of this test can let that
    // batch pass before it (the pattern is in outcomes only).
    proxy.hold_replies_after("\"type\":\"error\"", Duration::from_secs(2));
    let jobs = enqueue_mixed(&mut c, "stall", 10, 1000);
    // Redis ran the held batch, so its statuses and events are there before
    // the worker gives up on the reply: wait until it has, and has sent the
    // batch again, before counting what each job got.
    w.wait_for_log("settle: Redis unreachable", Duration::from_secs(30));
    w.wait_for_log("settle: Redis connection restored", Duration::from_secs(30));
    assert!(proxy.was_triggered());
    assert_each_ended_once(&redis, &sub, &jobs);
}

/// A job that runs through five Redis restarts is delivered once: taking
/// back own pending entries after a reconnect skips those running here.
#[test]
fn a_job_running_through_five_redis_restarts_keeps_one_delivery() {
    let mut redis = RedisServer::start();
    let mut c = redis.conn();
    let w = worker(
        &redis,
        "node-rs",
        &["--redis-timeout", "500ms", "--block", "500ms"],
    );
    let job = "restarts-1";
    let id = xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":60000}"#);
    wait_status(&mut c, job, "processing", Duration::from_secs(10));
    for round in 1..=5 {
        redis.kill();
        redis.restart();
        let restored = "reader: Redis connection restored";
        wait_until(
            &format!("reconnect {round}"),
            Duration::from_secs(20),
            || (w.log().matches(restored).count() >= round).then_some(()),
        );
        // The take-back after the reconnect has run once the reader reads again.
        let mut c = redis.conn();
        wait_until(
            "the reader to take no more",
            Duration::from_secs(10),
            || (command_calls(&mut c).get("xpending").copied().unwrap_or(0) >= 1).then_some(()),
        );
        let rows = pending_rows(&mut c, QUEUE, GROUP);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].id, id);
        assert_eq!(rows[0].deliveries, 1, "after restart {round}: {rows:?}");
    }
    let log = w.log();
    assert_eq!(
        log.matches(&format!("job {job} (echo) started")).count(),
        1,
        "{log}"
    );
    assert!(!log.contains("resuming"), "{log}");
}

/// Another consumer took the entry over (as after this worker was cut off
/// longer than claim-idle): the local run stops at the next renewal and
/// nothing more of it is published or written.
#[test]
fn a_lost_lease_stops_the_local_run_and_settles_nothing() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // claim-idle 3 s: leases renewed every second.
    let w = worker(&redis, "node-lease", &["--claim-idle", "3s"]);
    let job = "lease-1";
    let id = xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":60000}"#);
    sub.wait_for(job, "start", Duration::from_secs(10));
    redis::cmd("XCLAIM")
        .arg(QUEUE)
        .arg(GROUP)
        .arg("thief")
        .arg(0)
        .arg(&id)
        .query::<redis::Value>(&mut c)
        .expect("XCLAIM");
    w.wait_for_log("lost the lease of entry", Duration::from_secs(10));
    w.wait_for_log(
        &format!("job {job} (echo) abandoned"),
        Duration::from_secs(10),
    );
    sync_subscriber(&redis, &sub);
    assert_eq!(kinds_of(&sub, job), ["claimed", "start"]);
    assert_eq!(status(&mut c, job)["status"], "processing");
    let rows = pending_rows(&mut c, QUEUE, GROUP);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].consumer, "thief");
    assert_eq!(xlen(&mut c, DLQ), 0);
}

/// An idle worker at concurrency 1 reading two streams (its queue and its
/// node's own stream) costs Redis about one command a second or less, and
/// still starts a job on either stream at once.
#[test]
fn an_idle_worker_is_cheap_and_still_starts_node_jobs_at_once() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // BLOCK 20 s: a job that starts within 10 s was not waiting out a block.
    let w = worker(
        &redis,
        "node-idle",
        &["--concurrency", "1", "--block", "20s"],
    );
    w.wait_working();
    wait_until("the first blocking read", Duration::from_secs(10), || {
        (command_calls(&mut c)
            .get("xreadgroup")
            .copied()
            .unwrap_or(0)
            >= 1)
            .then_some(())
    });
    reset_command_calls(&mut c);
    // A measurement window, not a synchronisation: count what 10 s cost.
    std::thread::sleep(Duration::from_secs(10));
    let calls = command_calls(&mut c);
    let worker_calls: u64 = calls
        .iter()
        .filter(|(cmd, _)| !matches!(cmd.as_str(), "info" | "config" | "config|resetstat"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        worker_calls <= 20,
        "an idle worker sent {worker_calls} commands in 10 s: {calls:?}"
    );

    let node_stream = "jobs:v1:node:node-idle";
    xadd_job(&mut c, node_stream, "node-job", "echo", r#"{"x":1}"#);
    sub.wait_for("node-job", "end", Duration::from_secs(10));
    xadd_job(&mut c, QUEUE, "queue-job", "echo", r#"{"x":2}"#);
    sub.wait_for("queue-job", "end", Duration::from_secs(10));
}

/// Jobs that come one at a time (a quiet queue) cost the reader one read
/// each: the blocking read that brings a job, not also a sweep of every
/// stream after it (a stream that gave less than asked was drained).
#[test]
fn jobs_that_come_one_at_a_time_cost_one_read_each() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let w = worker(
        &redis,
        "node-quiet",
        &["--concurrency", "4", "--block", "20s"],
    );
    w.wait_working();
    wait_blocked_reader(&mut c, Duration::from_secs(10));
    reset_command_calls(&mut c);
    let n = 10;
    for i in 0..n {
        wait_blocked_reader(&mut c, Duration::from_secs(10));
        let job = format!("quiet-{i}");
        xadd_job(&mut c, QUEUE, &job, "echo", r#"{"x":1}"#);
        sub.wait_for(&job, "end", Duration::from_secs(10));
    }
    wait_blocked_reader(&mut c, Duration::from_secs(10));
    let calls = command_calls(&mut c);
    let reads = calls.get("xreadgroup").copied().unwrap_or(0);
    // One per job, and one more should the reclaim timer end a BLOCK.
    assert!(
        (n..=n + 1).contains(&reads),
        "{n} jobs one at a time took {reads} XREADGROUPs: {calls:?}"
    );
    // The settle thread connected in this window: on a single Redis it
    // loads the batch script only (the others are a cluster's).
    let loads = calls.get("script|load").copied().unwrap_or(0);
    assert!(loads <= 1, "{loads} SCRIPT LOADs: {calls:?}");
}

/// The consumer group is deleted under a running worker: it creates it
/// again, says so once, and runs the next job.
#[test]
fn a_deleted_group_is_created_again() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let w = worker(&redis, "node-ng", &[]);
    w.wait_working();
    wait_until("the group to exist", Duration::from_secs(10), || {
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(QUEUE)
            .query::<redis::Value>(&mut c)
            .ok()
    });
    redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(QUEUE)
        .arg(GROUP)
        .query::<i64>(&mut c)
        .expect("XGROUP DESTROY");
    w.wait_for_log("is gone", Duration::from_secs(10));
    xadd_job(&mut c, QUEUE, "after-ng", "echo", r#"{"x":1}"#);
    sub.wait_for("after-ng", "end", Duration::from_secs(10));
    assert_eq!(
        w.log().lines().filter(|l| l.contains("is gone")).count(),
        1,
        "{}",
        w.log()
    );
}

/// `citadel agent` at concurrency 1: Redis dies while its one job runs.
/// The job's outcome waits for Redis without holding the handler, so after
/// the fallback delay the agent takes and runs Nexus jobs; when Redis is
/// back, the Redis job's outcome lands, once.
#[test]
fn auto_mode_falls_back_to_nexus_while_a_redis_outcome_waits() {
    let nexus = FakeNexus::start();
    let state = support::fresh_temp_dir("auto-state");
    let port = free_port();
    let mut redis = RedisServer::start_on(port);
    let redis_url = redis.url();
    let (nexus_url, state_arg) = (nexus.url(), state.display().to_string());
    let a = Citadel::spawn(
        &[
            "agent",
            "--nexus-url",
            &nexus_url,
            "--state-dir",
            &state_arg,
            "--redis-url",
            &redis_url,
            "--redis-fallback",
            "1s",
            "--redis-probe",
            "200ms",
            "--redis-timeout",
            "500ms",
            "--block",
            "200ms",
            "--concurrency",
            "1",
            "--poll-interval",
            "50ms",
            "--nexus-retry-cap",
            "200ms",
            "--node-name",
            "auto-node",
        ],
        &[],
    );
    a.wait_for_log("mode: redis", Duration::from_secs(20));
    let mut c = redis.conn();
    xadd_job(&mut c, QUEUE, "r-1", "echo", r#"{"sleep_ms":1500}"#);
    wait_status(&mut c, "r-1", "processing", Duration::from_secs(10));
    redis.kill();
    a.wait_for_log("job r-1 (echo) completed", Duration::from_secs(20));
    a.wait_for_log("mode: nexus", Duration::from_secs(20));
    nexus.push_job("n-1", "echo", json!({"x": 1}));
    let report = nexus.wait_for_report("n-1", Duration::from_secs(20));
    assert_eq!(report.status, "SUCCESS");

    redis.restart();
    let mut c = redis.conn();
    wait_status(&mut c, "r-1", "completed", Duration::from_secs(30));
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(30));
    assert_eq!(a.log().matches("job r-1 (echo) started").count(), 1);
}

/// SIGTERM while Redis hangs (takes commands, answers nothing): the worker
/// still exits within the shutdown grace plus 2 s. Redis starts hanging
/// with the job's settle batch (its `end` event), not at a moment this
/// test picks: held from any earlier point, the reply of the job's `start`
/// could be the one held, and the batch would never be sent.
#[test]
fn sigterm_while_redis_hangs_exits_within_the_grace() {
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port());
    let mut c = redis.conn();
    let url = proxy.url();
    let mut w = worker_via(&url, "node-hang", "1s", "10s");
    proxy.hold_replies_after("\"type\":\"end\"", Duration::from_secs(60));
    xadd_job(&mut c, QUEUE, "hang-1", "echo", r#"{"sleep_ms":300}"#);
    w.wait_for_log("job hang-1 (echo) completed", Duration::from_secs(10));
    wait_until("the settle batch to hang", Duration::from_secs(10), || {
        proxy.was_triggered().then_some(())
    });
    let took = sigterm_exit_time(&mut w, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM: {}",
        w.log()
    );
    // Redis ran the settle batch it was sent (only its reply was held): the
    // job is settled once, by the script, not lost.
    assert_eq!(status(&mut c, "hang-1")["status"], "completed");
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(5));
}

/// A worker on the Redis behind the stall proxy at `url`, with
/// `--shutdown-grace grace` and `--redis-timeout timeout`.
fn worker_via(url: &str, node: &str, grace: &str, timeout: &str) -> Citadel {
    Citadel::spawn(
        &[
            "work",
            "--redis-url",
            url,
            "--node-name",
            node,
            "--shutdown-grace",
            grace,
            "--redis-timeout",
            timeout,
            "--block",
            "1s",
        ],
        &[],
    )
}

/// SIGTERM `w`; how long it took to exit (it must within `limit`).
fn sigterm_exit_time(w: &mut Citadel, limit: Duration) -> Duration {
    let t0 = std::time::Instant::now();
    w.sigterm();
    let exited = w.wait_exit(limit);
    let took = t0.elapsed();
    assert!(
        exited.is_some(),
        "still running {limit:?} after SIGTERM: {}",
        w.log()
    );
    took
}

/// A reader stuck in a read whose reply never comes holds handler slots
/// while it waits for work; they are no jobs, so SIGTERM with no job
/// running does not wait out the grace for them (it did: until the read
/// timed out, then "cancelling 4 unfinished jobs").
#[test]
fn sigterm_while_the_reader_hangs_with_no_job_running_exits_at_once() {
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port());
    let url = proxy.url();
    let mut w = worker_via(&url, "node-idle-hang", "30s", "20s");
    w.wait_working();
    proxy.hold_replies_after("XREADGROUP", Duration::from_secs(120));
    wait_until("the reader's read to hang", Duration::from_secs(10), || {
        proxy.was_triggered().then_some(())
    });
    let took = sigterm_exit_time(&mut w, Duration::from_secs(40));
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM, with no job running: {}",
        w.log()
    );
    let log = w.log();
    assert!(log.contains("for 0 running jobs"), "{log}");
    assert!(!log.contains("unfinished jobs"), "{log}");
}

/// Found by the chaos harness (tests/chaos.rs: a duplicate run whose holder
/// was alive): a restarted worker took back "its own" pending entries with
/// XPENDING, then XCLAIM min-idle 0; an entry another worker reclaimed in
/// between (the dead holder's claim ran out just as the restarted process
/// took the name over) was taken away from that live worker, and the job
/// ran twice. The take-back is now one script that claims only what is
/// still this consumer's. Here the window is held open: the reply to the
/// take-back's XPENDING is kept back while another consumer claims the entry.
#[test]
fn taking_back_own_entries_leaves_one_another_worker_reclaimed_meanwhile() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    // An entry delivered to node-a, whose process then died.
    let raced = "raced-1";
    let id = xadd_job(&mut c, QUEUE, raced, "echo", "{}");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(QUEUE)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut c)
        .expect("XGROUP CREATE");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("node-a")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(QUEUE)
        .arg(">")
        .query(&mut c)
        .expect("XREADGROUP as node-a");

    // node-a restarts; its take-back XPENDING (7 arguments, with the
    // consumer) runs, and its reply is held for 1.5 s.
    let proxy = StallProxy::start(redis.port());
    proxy.hold_replies_after("*7\r\n$8\r\nXPENDING", Duration::from_millis(1500));
    let url = proxy.url();
    let w = Citadel::spawn(
        &[
            "work",
            "--redis-url",
            &url,
            "--node-name",
            "node-a",
            "--block",
            "1s",
            "--redis-timeout",
            "10s",
        ],
        &[],
    );
    wait_until("the take-back's XPENDING", Duration::from_secs(10), || {
        proxy.was_triggered().then_some(())
    });
    // Meanwhile node-b reclaims the entry (as XAUTOCLAIM would).
    let claimed: Vec<String> = redis::cmd("XCLAIM")
        .arg(QUEUE)
        .arg(GROUP)
        .arg("node-b")
        .arg(0)
        .arg(&id)
        .arg("JUSTID")
        .query(&mut c)
        .expect("XCLAIM as node-b");
    assert_eq!(claimed, std::slice::from_ref(&id));

    // A barrier: node-a takes back its own entries before it reads new
    // ones, so once this job ended the take-back is over.
    xadd_job(&mut c, QUEUE, "after-1", "echo", "{}");
    sub.wait_for("after-1", "end", Duration::from_secs(15));
    sync_subscriber(&redis, &sub);
    assert!(
        events_of(&sub, raced, "start").is_empty(),
        "node-a ran the entry node-b holds: {:?}\n{}",
        sub.events_for(raced),
        w.log()
    );
    let rows = pending_rows(&mut c, QUEUE, GROUP);
    let row = rows
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("{id} not pending: {rows:?}"));
    assert_eq!(row.consumer, "node-b", "{rows:?}");
}

/// Redis's script cache is flushed under a running worker (`SCRIPT
/// FLUSH`, as an operator may, or a restart): the reader's checked read and
/// checked start and the settle thread's batch script meet NOSCRIPT, load
/// their scripts again, and every job still ends exactly once, its dead
/// letters included.
#[test]
fn a_flushed_script_cache_loses_and_repeats_no_job() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let w = worker(&redis, "node-flush", &["--concurrency", "8"]);
    w.wait_working();
    let mut jobs = Vec::new();
    for round in 0..3 {
        wait_blocked_reader(&mut c, Duration::from_secs(10));
        redis::cmd("SCRIPT").arg("FLUSH").exec(&mut c).unwrap();
        // Twelve in one transaction: the blocked read brings its share
        // (four), and the sweep after it (a checked read) the rest.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for i in 0..12 {
            let (job, payload) = match i % 3 {
                0 => (format!("flush{round}-bad-{i}"), r#"{"fail":"permanent"}"#),
                _ => (format!("flush{round}-good-{i}"), r#"{"n":1}"#),
            };
            pipe.cmd("XADD")
                .arg(QUEUE)
                .arg("*")
                .arg("jobId")
                .arg(&job)
                .arg("type")
                .arg("echo")
                .arg("payload")
                .arg(payload)
                .ignore();
            jobs.push(job);
        }
        pipe.exec(&mut c).unwrap();
        wait_ended_on_worker(&w, jobs.len());
    }
    assert_each_ended_once(&redis, &sub, &jobs);
    assert!(
        w.log().contains("its script cache was flushed"),
        "the reader never met NOSCRIPT, so the flush tested nothing: {}",
        w.log()
    );
}
