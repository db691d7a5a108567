//! Redis Cluster (`redis+cluster://`), against real clusters started by
//! tests/support/cluster.rs on loopback: `citadel work` processes reading
//! queues whose slots are served by different masters, a master SIGKILLed
//! and replaced by its replica, a slot migrated (whole, and half with ASK
//! redirects) while jobs run. A ledger outside the agent (the echo run log,
//! status records, dead letters, events streams, pending lists) proves that
//! no job was lost or, where no node died, run twice, and that the workers
//! never needed a restart.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use redis::{ConnectionLike, Value};
use support::cluster::{ClusterOptions, RedisCluster};
use support::jobs::{
    env_usize, run_to_end, runs_of, submit_follows_after_failover, FAILOVER_WORKER_FLAGS,
};
use support::{citadel_cmd, fresh_temp_dir, value_to_string, wait_until, Citadel};

const GROUP: &str = "workers";

/// `citadel work` as `node` on the cluster `url`, reading `queues`, every
/// echo run appended to `runs`.
fn cluster_worker(url: &str, node: &str, queues: &[String], runs: &Path) -> Citadel {
    cluster_worker_with(url, node, queues, runs, &[])
}

/// [`cluster_worker`] with `extra` flags last (they win over the shared ones).
fn cluster_worker_with(
    url: &str,
    node: &str,
    queues: &[String],
    runs: &Path,
    extra: &[&str],
) -> Citadel {
    let runs = runs.display().to_string();
    let mut args = vec!["work", "--node-name", node];
    args.extend_from_slice(FAILOVER_WORKER_FLAGS);
    for q in queues {
        args.push("--queue");
        args.push(q);
    }
    args.extend_from_slice(extra);
    Citadel::spawn(
        &args,
        &[
            ("CITADEL_REDIS_URL", url),
            ("RUST_LOG", "debug"),
            ("CITADEL_TEST_ECHO_RUNS", &runs),
        ],
    )
}

/// One queue per master: `jobs:v1:{tag}` with a tag each master serves.
fn queue_per_master(cluster: &RedisCluster) -> Vec<String> {
    cluster
        .master_ports()
        .into_iter()
        .map(|p| format!("jobs:v1:{{{}}}", cluster.hash_tag_served_by(p)))
        .collect()
}

/// The port of the master serving each queue now.
fn owners_of(cluster: &RedisCluster, queues: &[String]) -> Vec<u16> {
    queues
        .iter()
        .map(|q| cluster.owner_of_slot(RedisCluster::slot_of(q)))
        .collect()
}

fn dlq_of(queue: &str) -> String {
    format!("dlq:v1:{}", queue.strip_prefix("jobs:v1:").unwrap())
}

fn query(conn: &mut impl ConnectionLike, args: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(conn)
}

fn xadd_echo(conn: &mut impl ConnectionLike, queue: &str, job: &str, payload: &str) {
    query(
        conn,
        &[
            "XADD", queue, "*", "jobId", job, "type", "echo", "payload", payload,
        ],
    )
    .unwrap_or_else(|e| panic!("XADD {queue}: {e}"));
}

/// `n` echo jobs on `queue` named `{prefix}-{i}`, each sleeping a little.
fn enqueue(
    conn: &mut impl ConnectionLike,
    queue: &str,
    prefix: &str,
    n: usize,
    sleep_ms: u64,
) -> Vec<String> {
    (0..n)
        .map(|i| {
            let job = format!("{prefix}-{i}");
            let payload = format!(r#"{{"sleep_ms":{}}}"#, sleep_ms + (i as u64 % 4) * 20);
            xadd_echo(conn, queue, &job, &payload);
            job
        })
        .collect()
}

fn hash(conn: &mut impl ConnectionLike, key: &str) -> HashMap<String, String> {
    match query(conn, &["HGETALL", key]) {
        Ok(Value::Array(kv)) => kv
            .chunks(2)
            .map(|p| (value_to_string(&p[0]), value_to_string(&p[1])))
            .collect(),
        Ok(Value::Map(kv)) => kv
            .iter()
            .map(|(k, v)| (value_to_string(k), value_to_string(v)))
            .collect(),
        _ => HashMap::new(),
    }
}

/// The `field` of each entry of `stream`, oldest first.
fn stream_field(conn: &mut impl ConnectionLike, stream: &str, field: &str) -> Vec<String> {
    let Ok(Value::Array(entries)) = query(conn, &["XRANGE", stream, "-", "+"]) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| match e {
            Value::Array(parts) => match parts.get(1) {
                Some(Value::Array(kv)) => kv
                    .chunks(2)
                    .find(|p| value_to_string(&p[0]) == field)
                    .map(|p| value_to_string(&p[1])),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn pending(conn: &mut impl ConnectionLike, queue: &str) -> i64 {
    match query(conn, &["XPENDING", queue, GROUP]) {
        Ok(Value::Array(parts)) => match parts.first() {
            Some(Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

/// Until no entry of `queues` is pending, each within `timeout` (a Redis
/// error, as during a failover, is waited out, where support::observe::
/// wait_drained fails the test).
fn wait_queues_drained(conn: &mut impl ConnectionLike, queues: &[String], timeout: Duration) {
    for q in queues {
        wait_until("the pending lists to drain", timeout, || {
            (pending(conn, q) == 0).then_some(())
        });
    }
}

/// Until every job has a final status record; returns the statuses.
fn wait_all_final(
    cluster: &RedisCluster,
    jobs: &[String],
    timeout: Duration,
) -> HashMap<String, String> {
    wait_until("every job to reach a final status", timeout, || {
        let mut c = cluster.cluster_conn();
        let mut done = HashMap::new();
        for job in jobs {
            let status = hash(&mut c, &format!("job:{job}:status"))
                .remove("status")
                .unwrap_or_default();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                done.insert(job.clone(), status);
            }
        }
        (done.len() == jobs.len()).then_some(done)
    })
}

/// The event types of `job`'s events stream, in order.
fn event_types(conn: &mut impl ConnectionLike, job: &str) -> Vec<String> {
    stream_field(conn, &format!("events:v1:{job}"), "event")
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(e).expect("an event is JSON");
            v["type"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[test]
fn jobs_on_queues_in_three_slots_settle_on_their_nodes() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let owners = owners_of(&cluster, &queues);
    let mut distinct = owners.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one queue per master: {owners:?}");
    let dir = fresh_temp_dir("cluster-settle");
    let runs = dir.join("runs.log");
    let workers = [
        cluster_worker(&url, "cl-a", &queues, &runs),
        cluster_worker(&url, "cl-b", &queues, &runs),
    ];
    for w in &workers {
        w.wait_working();
    }
    let mut conn = cluster.cluster_conn();
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(enqueue(&mut conn, q, &format!("q{i}"), 30, 5));
        // Jobs that stream: their chunks, settled among the others' events
        // in pipelines per node, keep their order.
        for k in 0..4 {
            let job = format!("q{i}-chunks-{k}");
            xadd_echo(&mut conn, q, &job, r#"{"chunks":25}"#);
            jobs.push(job);
        }
        // One that fails for good and one malformed (payload not JSON).
        let bad = format!("q{i}-bad");
        xadd_echo(&mut conn, q, &bad, r#"{"fail":"permanent"}"#);
        jobs.push(bad);
        query(
            &mut conn,
            &[
                "XADD",
                q,
                "*",
                "jobId",
                &format!("q{i}-garbage"),
                "type",
                "echo",
                "payload",
                "{not json",
            ],
        )
        .expect("XADD");
        jobs.push(format!("q{i}-garbage"));
    }
    let done = wait_all_final(&cluster, &jobs, Duration::from_secs(120));
    let ran = runs_of(&runs);
    for job in &jobs {
        let want = if job.ends_with("-bad") || job.ends_with("-garbage") {
            "failed"
        } else {
            "completed"
        };
        assert_eq!(done[job], want, "{job}");
        if !job.ends_with("-garbage") {
            assert_eq!(ran.get(job), Some(&1), "{job} must run exactly once");
        }
        // The events stream, in the contract's order, one terminal event.
        let types = event_types(&mut conn, job);
        let last = if want == "failed" { "error" } else { "end" };
        assert_eq!(
            types.last().map(String::as_str),
            Some(last),
            "{job}: {types:?}"
        );
        assert_eq!(
            types
                .iter()
                .filter(|t| *t == "end" || *t == "error")
                .count(),
            1,
            "{job}: {types:?}"
        );
        if !job.ends_with("-garbage") {
            assert_eq!(&types[..2], ["claimed", "start"], "{job}: {types:?}");
        }
    }
    for job in jobs.iter().filter(|j| j.contains("-chunks-")) {
        let events = stream_field(&mut conn, &format!("events:v1:{job}"), "event");
        let chunks: Vec<(u64, String)> = events
            .iter()
            .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
            .filter(|v| v["type"] == "chunk")
            .map(|v| {
                let d = &v["data"];
                (
                    d["index"].as_u64().unwrap(),
                    d["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want: Vec<(u64, String)> = (0..25).map(|n| (n, format!("chunk {n}\n"))).collect();
        assert_eq!(chunks, want, "{job}");
    }
    for (i, q) in queues.iter().enumerate() {
        // The dead letters sit in the queue's slot, whole.
        let dlq = dlq_of(q);
        assert_eq!(
            RedisCluster::slot_of(&dlq),
            RedisCluster::slot_of(q),
            "{dlq}"
        );
        let mut letters = stream_field(&mut conn, &dlq, "jobId");
        letters.sort();
        assert_eq!(letters, [format!("q{i}-bad"), format!("q{i}-garbage")]);
        let reasons = stream_field(&mut conn, &dlq, "original_queue");
        assert!(reasons.iter().all(|r| r == q), "{reasons:?}");
        wait_until(
            "the queue's pending list to drain",
            Duration::from_secs(30),
            || (pending(&mut conn, q) == 0).then_some(()),
        );
        // The claim on each worker's name has a key in this queue's slot,
        // on its master.
        let tag = q.trim_start_matches("jobs:v1:");
        let key = format!("citadel:v1:consumer:{tag}:{GROUP}:cl-a");
        let mut node = cluster.node_conn(owners[i]);
        let held = query(&mut node, &["GET", &key]).expect("GET on the queue's master");
        assert_ne!(held, Value::Nil, "{key} on 127.0.0.1:{}", owners[i]);
    }
    // Both workers took jobs, from every queue.
    for w in &workers {
        let log = w.log();
        assert!(
            log.matches("(echo) completed").count() > 0,
            "a worker ran nothing:\n{log}"
        );
    }
    // A clean stop releases every key of the claim.
    for mut w in workers {
        w.sigterm();
        assert!(
            w.wait_exit(Duration::from_secs(20)).is_some(),
            "no clean exit"
        );
    }
    for (i, q) in queues.iter().enumerate() {
        let tag = q.trim_start_matches("jobs:v1:");
        let key = format!("citadel:v1:consumer:{tag}:{GROUP}:cl-a");
        let mut node = cluster.node_conn(owners[i]);
        assert_eq!(
            query(&mut node, &["GET", &key]).unwrap(),
            Value::Nil,
            "{key}"
        );
    }
}

#[test]
fn a_queue_without_a_hash_tag_is_refused_at_start_with_the_name_to_use() {
    // Bounded: without the check a worker would retry the dead seeds forever.
    let limit = Duration::from_secs(30);
    let out = run_to_end(
        &mut citadel_cmd(&[
            "work",
            "--redis-url",
            "redis+cluster://127.0.0.1:1,127.0.0.1:2",
            "--queue",
            "jobs:v1:{ok}",
            "--queue",
            "jobs:v1:gpu-large",
        ]),
        limit,
    );
    let err = &out.stderr;
    assert_eq!(out.code, Some(2), "{err}");
    assert!(
        err.contains("queue 'jobs:v1:gpu-large' cannot be used on a Redis Cluster"),
        "{err}"
    );
    assert!(err.contains("--queue 'jobs:v1:{gpu-large}'"), "{err}");
    // submit and the gateway refuse it too, rather than enqueue where no
    // worker can read or wait for a worker that never comes.
    for args in [
        &["submit", "--type", "echo", "--payload", "{}"][..],
        &[
            "submit",
            "--queue",
            "jobs:v1:plain",
            "--type",
            "echo",
            "--payload",
            "{}",
        ][..],
        &["gateway", "--listen", "127.0.0.1:0"][..],
    ] {
        let out = run_to_end(
            citadel_cmd(args).env("CITADEL_REDIS_URL", "redis+cluster://127.0.0.1:1"),
            limit,
        );
        let err = &out.stderr;
        assert_eq!(out.code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("cannot be used on a Redis Cluster"),
            "{args:?}: {err}"
        );
    }
    for (url, what) in [
        ("redis+cluster://", "is not HOST:PORT"),
        ("redis+cluster://h:70000", "is not a port number"),
        ("redis+cluster://h:7000/2", "only database 0"),
        ("redis+cluster://u:secret@h:7000#what", "not a known option"),
    ] {
        let out = run_to_end(
            &mut citadel_cmd(&["work", "--redis-url", url, "--queue", "jobs:v1:{a}"]),
            limit,
        );
        let err = &out.stderr;
        assert_eq!(out.code, Some(2), "{url}: {err}");
        assert!(err.contains("is not a Redis Cluster URL"), "{url}: {err}");
        assert!(err.contains(what), "{url}: {err}");
        assert!(!err.contains("secret"), "a password is never shown: {err}");
    }
}

#[test]
fn a_master_failover_mid_run_loses_no_job_and_needs_no_restart() {
    let mut cluster = RedisCluster::start(ClusterOptions {
        replicas_per_master: 1,
        ..ClusterOptions::default()
    });
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let victim_slot = RedisCluster::slot_of(&queues[0]);
    let dir = fresh_temp_dir("cluster-failover");
    let runs = dir.join("runs.log");
    let mut workers = [
        cluster_worker(&url, "fo-a", &queues, &runs),
        cluster_worker(&url, "fo-b", &queues, &runs),
    ];
    for w in &workers {
        w.wait_working();
    }
    let pids: Vec<u32> = workers.iter().map(Citadel::pid).collect();
    let mut conn = cluster.cluster_conn();
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(enqueue(&mut conn, q, &format!("before{i}"), 25, 80));
    }
    // Every entry reached the replicas before the kill.
    for port in cluster.master_ports() {
        let mut node = cluster.node_conn(port);
        let n = query(&mut node, &["WAIT", "1", "15000"]).expect("WAIT");
        assert_eq!(n, Value::Int(1), "127.0.0.1:{port}'s replica is behind");
    }
    wait_until("some jobs to have run", Duration::from_secs(60), || {
        (runs_of(&runs).len() >= 10).then_some(())
    });
    let old = cluster.kill_master_of(victim_slot);
    let new = cluster.wait_failover(victim_slot, old, Duration::from_secs(60));
    assert_ne!(old, new);
    let mut conn = cluster.cluster_conn();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(enqueue(&mut conn, q, &format!("after{i}"), 10, 0));
    }
    let done = wait_all_final(&cluster, &jobs, Duration::from_secs(180));
    assert!(
        done.values().all(|s| s == "completed"),
        "echo jobs that only sleep complete: {done:?}"
    );
    let ran = runs_of(&runs);
    for job in &jobs {
        assert!(ran.contains_key(job), "{job} has an outcome but never ran");
    }
    wait_queues_drained(&mut conn, &queues, Duration::from_secs(60));
    for (w, pid) in workers.iter_mut().zip(&pids) {
        assert!(w.is_running(), "a worker exited:\n{}", w.log());
        assert_eq!(w.pid(), *pid);
    }
    // An operator's command with the same URL works after the failover,
    // on the failed-over slot too.
    submit_follows_after_failover(&url, Some(&queues[0]));
}

/// Runs jobs on a queue while its slot moves to another master: every job
/// completes exactly once (no node dies, so nothing may run twice).
fn migrate_while_running(half: bool) {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    let masters = cluster.master_ports();
    let tag = cluster.hash_tag_served_by(masters[0]);
    let queue = format!("jobs:v1:{{{tag}}}");
    let slot = RedisCluster::slot_of(&queue);
    let dir = fresh_temp_dir("cluster-migrate");
    let runs = dir.join("runs.log");
    let queues = [queue.clone()];
    let mut workers = [
        cluster_worker(&url, "mg-a", &queues, &runs),
        cluster_worker(&url, "mg-b", &queues, &runs),
    ];
    for w in &workers {
        w.wait_working();
    }
    let mut conn = cluster.cluster_conn();
    let mut jobs = enqueue(&mut conn, &queue, "before", 40, 60);
    wait_until("some jobs to have run", Duration::from_secs(60), || {
        (runs_of(&runs).len() >= 6).then_some(())
    });
    if half {
        // Some of the slot's keys moved, some not: Redis refuses commands
        // naming keys on both sides (TRYAGAIN) until the move ends, so the
        // workers wait it out, say so, and lose and repeat nothing.
        let m = cluster.begin_migrate_slot(slot, masters[1]);
        assert_eq!(m.move_keys(1), 1);
        assert!(m.keys_left() > 0, "some keys stay behind");
        let mut conn = cluster.cluster_conn();
        jobs.extend(enqueue(&mut conn, &queue, "half", 10, 0));
        wait_until(
            "a worker to meet the half-moved slot",
            Duration::from_secs(60),
            || {
                workers
                    .iter()
                    .any(|w| w.log().contains("TryAgain"))
                    .then_some(())
            },
        );
        m.finish();
    } else {
        cluster.migrate_slot(slot, masters[1]);
    }
    assert_eq!(cluster.owner_of_slot(slot), masters[1]);
    let mut conn = cluster.cluster_conn();
    jobs.extend(enqueue(&mut conn, &queue, "after", 10, 0));
    let done = wait_all_final(&cluster, &jobs, Duration::from_secs(180));
    assert!(done.values().all(|s| s == "completed"), "{done:?}");
    let ran = runs_of(&runs);
    for job in &jobs {
        assert_eq!(ran.get(job), Some(&1), "{job} ran {:?} times", ran.get(job));
        let types = event_types(&mut conn, job);
        assert_eq!(
            types.last().map(String::as_str),
            Some("end"),
            "{job}: {types:?}"
        );
        assert_eq!(
            types.iter().filter(|t| *t == "end").count(),
            1,
            "{job}: {types:?}"
        );
    }
    wait_until("the pending list to drain", Duration::from_secs(60), || {
        (pending(&mut conn, &queue) == 0).then_some(())
    });
    for w in workers.iter_mut() {
        assert!(w.is_running(), "a worker exited:\n{}", w.log());
    }
}

#[test]
fn a_slot_migrated_mid_run_loses_and_repeats_no_job() {
    migrate_while_running(false);
}

#[test]
fn a_half_migrated_slot_loses_and_repeats_no_job() {
    migrate_while_running(true);
}

#[test]
fn submit_follow_status_dlq_and_cancel_work_on_a_cluster() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let dir = fresh_temp_dir("cluster-admin");
    let runs = dir.join("runs.log");
    let worker = cluster_worker(&url, "ad-a", &queues, &runs);
    worker.wait_working();
    let cmd = |args: &[&str]| {
        let out = citadel_cmd(args)
            .env("CITADEL_REDIS_URL", &url)
            .env("CITADEL_NODE_NAME", "ad-a")
            .output()
            .expect("citadel");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // PUBLISH reaches every node: a subscriber on a master that serves
    // none of the job's keys hears its events.
    let mut sub = cluster.node_conn(cluster.master_ports()[0]);
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sub = sub.as_pubsub();
    sub.psubscribe("stream:v1:*").expect("PSUBSCRIBE");
    // submit --follow prints the chunks and the result.
    let (code, out, err) = cmd(&[
        "submit",
        "--queue",
        &queues[1],
        "--type",
        "echo",
        "--payload",
        r#"{"chunks":3,"tag":"followed"}"#,
        "--follow",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("chunk 2") && out.contains("followed"), "{out}");
    let mut heard = Vec::new();
    while !heard.iter().any(|t| t == "end") {
        let msg = sub.get_message().expect("the job's events on another node");
        let payload: String = msg.get_payload().unwrap();
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        heard.push(v["type"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        heard,
        ["claimed", "start", "chunk", "chunk", "chunk", "end"]
    );
    drop(sub);
    // A job cancelled while it runs (its cancel key in another slot).
    let (code, job, err) = cmd(&[
        "submit",
        "--queue",
        &queues[2],
        "--type",
        "echo",
        "--payload",
        r#"{"sleep_ms":60000}"#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let job = job.trim().to_string();
    worker.wait_for_log(
        &format!("job {job} (echo) started"),
        Duration::from_secs(30),
    );
    let mut conn = cluster.cluster_conn();
    query(&mut conn, &["SET", &format!("job:cancelled:{job}"), "1"]).expect("SET");
    let done = wait_all_final(
        &cluster,
        std::slice::from_ref(&job),
        Duration::from_secs(30),
    );
    assert_eq!(done[&job], "cancelled");
    // Jobs cancelled before they start, read together: one EXISTS of
    // cancel keys in several slots (split by slot by the client).
    let early: Vec<String> = (0..4).map(|i| format!("ad-early-{i}")).collect();
    for job in &early {
        query(&mut conn, &["SET", &format!("job:cancelled:{job}"), "1"]).expect("SET");
    }
    for job in &early {
        xadd_echo(&mut conn, &queues[1], job, "{}");
    }
    let done = wait_all_final(&cluster, &early, Duration::from_secs(30));
    assert!(done.values().all(|s| s == "cancelled"), "{done:?}");
    let ran = runs_of(&runs);
    assert!(
        early.iter().all(|j| !ran.contains_key(j)),
        "a cancelled job started"
    );
    assert!(
        !worker.log().contains("cancel check before start failed"),
        "{}",
        worker.log()
    );
    // A dead letter, listed and replayed.
    xadd_echo(&mut conn, &queues[0], "ad-bad", r#"{"fail":"permanent"}"#);
    wait_all_final(&cluster, &["ad-bad".to_string()], Duration::from_secs(30));
    let (code, out, err) = cmd(&["dlq", "list", "--queue", &queues[0]]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("job=ad-bad"), "{out}");
    let dlq = dlq_of(&queues[0]);
    let id = stream_field(&mut conn, &dlq, "jobId");
    assert_eq!(id, ["ad-bad"]);
    let Ok(Value::Array(entries)) = query(&mut conn, &["XRANGE", &dlq, "-", "+"]) else {
        panic!("XRANGE {dlq}")
    };
    let Value::Array(first) = &entries[0] else {
        panic!("{entries:?}")
    };
    let entry_id = value_to_string(&first[0]);
    let (code, out, err) = cmd(&["dlq", "replay", "--queue", &queues[0], &entry_id]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("to {}", queues[0])), "{out}");
    wait_until(
        "the replayed job to run again",
        Duration::from_secs(30),
        || (runs_of(&runs).get("ad-bad") == Some(&2)).then_some(()),
    );
    // status --json lists every queue with its dead letters.
    let mut args = vec!["status", "--json"];
    for q in &queues {
        args.extend(["--queue", q.as_str()]);
    }
    let (code, out, err) = cmd(&args);
    assert_eq!(code, Some(0), "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let text = status.to_string();
    for q in &queues {
        assert!(text.contains(q.as_str()), "{q} missing: {text}");
    }
}

#[test]
fn a_dead_seed_node_is_skipped_and_no_reachable_node_is_retried() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let queues = queue_per_master(&cluster);
    let dead = support::free_port();
    // The first seed answers nothing; the second is a node.
    let url = format!(
        "redis+cluster://127.0.0.1:{dead},{}",
        cluster.url().trim_start_matches("redis+cluster://")
    );
    let dir = fresh_temp_dir("cluster-seeds");
    let runs = dir.join("runs.log");
    let worker = cluster_worker(&url, "sd-a", &queues, &runs);
    worker.wait_working();
    let mut conn = cluster.cluster_conn();
    let jobs = enqueue(&mut conn, &queues[0], "seed", 3, 0);
    wait_all_final(&cluster, &jobs, Duration::from_secs(60));
    // No node answers: the worker says so and keeps trying.
    let nowhere = format!("redis+cluster://127.0.0.1:{dead}");
    let mut lost = cluster_worker(&nowhere, "sd-b", &queues, &runs);
    lost.wait_for_log("Redis unreachable", Duration::from_secs(30));
    assert!(
        lost.is_running(),
        "it must retry, not exit:\n{}",
        lost.log()
    );
}

#[test]
fn readers_of_six_slots_never_hold_more_than_two_entries_per_handler() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    // Two queues per master, each in its own slot: six readers share two
    // handlers, so they often want the same room at the same moment.
    let queues: Vec<String> = cluster
        .master_ports()
        .into_iter()
        .flat_map(|p| cluster.hash_tags_served_by(p, 2))
        .map(|tag| format!("jobs:v1:{{{tag}}}"))
        .collect();
    let owners = owners_of(&cluster, &queues);
    let dir = fresh_temp_dir("cluster-backpressure");
    let runs = dir.join("runs.log");
    let mut conn = cluster.cluster_conn();
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(enqueue(&mut conn, q, &format!("bp{i}"), 12, 20));
    }
    let worker = cluster_worker_with(&url, "bp-a", &queues, &runs, &["--concurrency", "2"]);
    worker.wait_working();
    // This consumer's pending entries over all six queues, sampled until
    // every job ran: never more than two per handler (one running, one
    // finished whose outcome is on its way to Redis). The queues are
    // asked one after the other, so a sample counts only when a second one
    // right after it found the same entries: an entry acknowledged on one
    // queue while another was being asked would otherwise be counted with
    // the one read after it.
    let mut nodes: Vec<redis::Connection> = owners.iter().map(|p| cluster.node_conn(*p)).collect();
    // Each queue's pending ids (a row's first field; its idle time moves).
    let mut sample = || -> Vec<Vec<Value>> {
        queues
            .iter()
            .zip(nodes.iter_mut())
            .map(
                |(q, c)| match query(c, &["XPENDING", q, GROUP, "-", "+", "100", "bp-a"]) {
                    Ok(Value::Array(rows)) => rows
                        .into_iter()
                        .filter_map(|r| match r {
                            Value::Array(mut f) if !f.is_empty() => Some(f.swap_remove(0)),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            )
            .collect()
    };
    let mut most = 0;
    wait_until("every job to run", Duration::from_secs(120), || {
        let (a, b) = (sample(), sample());
        if a == b {
            most = most.max(a.iter().map(Vec::len).sum::<usize>());
        }
        (runs_of(&runs).len() == jobs.len()).then_some(())
    });
    assert!(most <= 4, "{most} entries held by a worker with 2 handlers");
    assert!(most >= 1, "the sampling saw nothing held");
    let done = wait_all_final(&cluster, &jobs, Duration::from_secs(60));
    assert!(done.values().all(|s| s == "completed"), "{done:?}");
}

/// Chaos on a cluster: three masters with a replica each, one queue per
/// master, three workers; `failovers` times, a SIGKILL of the master of a
/// queue's slot (a different queue each time) while jobs run, its replica
/// promoted, the killed node restarted (it rejoins as a replica). Every job
/// that reached the replicas completes or is dead-lettered, the pending
/// lists drain, and the workers are the processes started first. A job may
/// run twice (an outcome its master took but had not replicated); never
/// not at all. Prints one `CLUSTER_CHAOS` line.
fn cluster_chaos(jobs: usize, failovers: usize) {
    let started = std::time::Instant::now();
    let mut cluster = RedisCluster::start(ClusterOptions {
        replicas_per_master: 1,
        ..ClusterOptions::default()
    });
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let dir = fresh_temp_dir("cluster-chaos");
    let runs = dir.join("runs.log");
    let mut workers: Vec<Citadel> = (0..3)
        .map(|i| cluster_worker(&url, &format!("chaos-{i}"), &queues, &runs))
        .collect();
    for w in &workers {
        w.wait_working();
    }
    let pids: Vec<u32> = workers.iter().map(Citadel::pid).collect();
    let per_round = jobs / (failovers + 1);
    let mut all = Vec::new();
    for round in 0..=failovers {
        let mut conn = cluster.cluster_conn();
        for (i, q) in queues.iter().enumerate() {
            let n = per_round / queues.len();
            all.extend(enqueue(&mut conn, q, &format!("c{round}-{i}"), n, 5));
        }
        for port in cluster.master_ports() {
            let mut node = cluster.node_conn(port);
            let n = query(&mut node, &["WAIT", "1", "15000"]).expect("WAIT");
            assert_eq!(n, Value::Int(1), "127.0.0.1:{port}'s replica is behind");
        }
        if round == failovers {
            break;
        }
        let ran_before = runs_of(&runs).len();
        wait_until("jobs of this round to run", Duration::from_secs(60), || {
            (runs_of(&runs).len() >= ran_before + per_round / 4).then_some(())
        });
        let slot = RedisCluster::slot_of(&queues[round % queues.len()]);
        let old = cluster.kill_master_of(slot);
        cluster.wait_failover(slot, old, Duration::from_secs(60));
        cluster.restart_node(old);
        cluster.wait_settled(Duration::from_secs(60));
    }
    let done = wait_all_final(&cluster, &all, Duration::from_secs(240));
    let drain = std::time::Instant::now();
    let mut conn = cluster.cluster_conn();
    wait_queues_drained(&mut conn, &queues, Duration::from_secs(60));
    let ran = runs_of(&runs);
    let never_ran: Vec<&String> = all.iter().filter(|j| !ran.contains_key(*j)).collect();
    let duplicates: usize = all
        .iter()
        .map(|j| ran.get(j).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    let completed = done.values().filter(|s| *s == "completed").count();
    println!(
        "CLUSTER_CHAOS jobs={} failovers={failovers} completed={completed} other={} lost={} \
         duplicates={duplicates} drain_ms={} seconds={}",
        all.len(),
        done.len() - completed,
        all.len() - done.len(),
        drain.elapsed().as_millis(),
        started.elapsed().as_secs()
    );
    assert!(never_ran.is_empty(), "settled but never ran: {never_ran:?}");
    assert_eq!(
        completed,
        all.len(),
        "echo jobs that only sleep complete: {done:?}"
    );
    for (w, pid) in workers.iter_mut().zip(&pids) {
        assert!(w.is_running(), "a worker exited:\n{}", w.log());
        assert_eq!(w.pid(), *pid);
    }
}

#[test]
fn cluster_chaos_short() {
    cluster_chaos(360, 2);
}

/// `cargo test --test cluster -- --ignored cluster_chaos_full`
/// (`CLUSTER_CHAOS_JOBS` [4 500], `CLUSTER_CHAOS_FAILOVERS` [6]).
#[test]
#[ignore]
fn cluster_chaos_full() {
    cluster_chaos(
        env_usize("CLUSTER_CHAOS_JOBS", 4500),
        env_usize("CLUSTER_CHAOS_FAILOVERS", 6),
    );
}

/// One HTTP/1.1 request with `Connection: close`; (status, body as text,
/// de-chunked when chunked).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, rest.to_owned());
    }
    let mut out = String::new();
    let mut rest = rest;
    while let Some((size, more)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || more.len() < n {
            break;
        }
        out.push_str(&more[..n]);
        rest = more[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

#[test]
fn the_gateway_serves_chat_completions_through_a_cluster() {
    use support::fake_engine::{FakeEngine, Reply};
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let sse = |tokens: &[&str]| {
        let mut r = Reply::sse();
        for (i, t) in tokens.iter().enumerate() {
            let finish = if i + 1 == tokens.len() {
                "\"stop\""
            } else {
                "null"
            };
            r = r.send(format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":{finish}}}]}}\n\n"
            ));
        }
        r.send("data: [DONE]\n\n")
    };
    let engine = FakeEngine::start(vec![sse(&["Hel", "lo"]), sse(&["Stre", "am", "ed"])]);
    let dir = fresh_temp_dir("cluster-gateway");
    let runs = dir.join("runs.log");
    let engine_url = engine.url();
    let worker = cluster_worker_with(&url, "gw-a", &queues, &runs, &["--vllm-url", &engine_url]);
    worker.wait_working();
    let addr = format!("127.0.0.1:{}", support::free_port());
    let route = format!("m=vllm@{}", queues[2]);
    let gateway = Citadel::spawn(
        &["gateway", "--listen", &addr, "--route", &route],
        &[("CITADEL_REDIS_URL", &url), ("RUST_LOG", "debug")],
    );
    gateway.wait_for_log("gateway: listening on", Duration::from_secs(30));
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "Hello",
        "{answer}"
    );
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, "Streamed", "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // The job went through the routed queue, on its master.
    let mut node = cluster.node_conn(cluster.owner_of_slot(RedisCluster::slot_of(&queues[2])));
    let Ok(Value::Int(n)) = query(&mut node, &["XLEN", &queues[2]]) else {
        panic!("XLEN {}", queues[2])
    };
    assert_eq!(n, 2);
}

#[test]
fn a_worker_killed_mid_run_has_its_jobs_on_every_slot_reclaimed() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let url = cluster.url();
    let queues = queue_per_master(&cluster);
    let dir = fresh_temp_dir("cluster-reclaim");
    let runs = dir.join("runs.log");
    let mut doomed = cluster_worker(&url, "rc-a", &queues, &runs);
    doomed.wait_working();
    let mut conn = cluster.cluster_conn();
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        jobs.extend(enqueue(&mut conn, q, &format!("rc{i}"), 2, 1500));
    }
    // Killed while it runs jobs of every queue (4 handlers, 6 jobs).
    wait_until(
        "the doomed worker to run jobs",
        Duration::from_secs(30),
        || (runs_of(&runs).len() >= 4).then_some(()),
    );
    doomed.kill9();
    let survivor = cluster_worker(&url, "rc-b", &queues, &runs);
    let done = wait_all_final(&cluster, &jobs, Duration::from_secs(60));
    assert!(done.values().all(|s| s == "completed"), "{done:?}");
    let log = survivor.log();
    assert!(log.contains("reclaimed"), "{log}");
    wait_queues_drained(&mut conn, &queues, Duration::from_secs(30));
    // A job the killed worker had started and not finished ran again on
    // the survivor (one that finished before the kill has rc-a's status);
    // none ran more than twice, and some were taken from the killed one.
    let ran = runs_of(&runs);
    let mut taken = 0;
    for job in &jobs {
        let n = ran.get(job).copied().unwrap_or(0);
        assert!((1..=2).contains(&n), "{job} ran {n} times");
        let status = hash(&mut conn, &format!("job:{job}:status"));
        match status.get("worker_id").map(String::as_str) {
            Some("rc-b") if n == 2 => taken += 1,
            Some("rc-b") | Some("rc-a") => {}
            other => panic!("{job}: worker {other:?}"),
        }
    }
    assert!(
        taken >= 1,
        "no job of the killed worker was run again: {ran:?}"
    );
}
