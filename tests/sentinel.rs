//! Redis Sentinel (`redis+sentinel://`), against real servers: a master, a
//! replica and three sentinels on loopback (tests/support/sentinel.rs),
//! `citadel work` processes running echo jobs, the master SIGKILLed, the
//! replica promoted by the sentinels. A ledger outside the agent (the echo
//! run log, the status hashes and dead letters on the new master) proves
//! that no job was lost and that the workers never needed a restart.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::jobs::{env_usize, runs_of, submit_follows_after_failover, FAILOVER_WORKER_FLAGS};
use support::sentinel::{data_conn, sentinel_url, Sentinel, SentinelOptions, SentinelSet};
use support::{
    citadel_cmd, free_port, fresh_temp_dir, hgetall, pending_count, wait_until, xadd_job,
    xrange_all, Citadel, RedisServer, Subscriber,
};

const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
const GROUP: &str = "workers";

/// `citadel work` as `node` against the Sentinel `url`, every echo run
/// appended to `runs`.
fn sentinel_worker(url: &str, node: &str, runs: &Path, env: &[(&str, &str)]) -> Citadel {
    let runs = runs.display().to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("CITADEL_REDIS_URL", url),
        ("RUST_LOG", "debug"),
        ("CITADEL_TEST_ECHO_RUNS", &runs),
    ];
    all.extend_from_slice(env);
    let mut args = vec!["work", "--node-name", node];
    args.extend_from_slice(FAILOVER_WORKER_FLAGS);
    Citadel::spawn(&args, &all)
}

/// Each job's outcome on this server: `completed` (status hash) or
/// `dead-lettered`; jobs with neither are missing from the map.
fn outcomes(conn: &mut redis::Connection, jobs: &[String]) -> HashMap<String, String> {
    let letters: HashSet<String> = xrange_all(conn, DLQ)
        .into_iter()
        .filter_map(|(_, f)| f.get("jobId").cloned())
        .collect();
    let mut done = HashMap::new();
    for job in jobs {
        let status = hgetall(conn, &format!("job:{job}:status"));
        if letters.contains(job) {
            done.insert(job.clone(), "dead-lettered".to_string());
        } else if status.get("status").map(String::as_str) == Some("completed") {
            done.insert(job.clone(), "completed".to_string());
        }
    }
    done
}

fn enqueue(conn: &mut redis::Connection, prefix: &str, n: usize, sleep_ms: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let job = format!("{prefix}-{i}");
            let payload = format!(r#"{{"sleep_ms":{}}}"#, sleep_ms + (i as u64 % 5) * 20);
            xadd_job(conn, QUEUE, &job, "echo", &payload);
            job
        })
        .collect()
}

/// `WAIT 1 5000`: the replica has everything written so far.
fn replicated(conn: &mut redis::Connection) {
    let n: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(conn)
        .expect("WAIT");
    assert_eq!(n, 1, "the replica did not acknowledge the writes");
}

fn create_group(conn: &mut redis::Connection) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(QUEUE)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn)
        .expect("XGROUP CREATE");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Until every job has an outcome on the server at `port`.
fn wait_all_settled(port: u16, jobs: &[String], timeout: Duration) -> HashMap<String, String> {
    wait_until("every job to complete or be dead-lettered", timeout, || {
        let mut c = data_conn(port, None)?;
        let done = outcomes(&mut c, jobs);
        (done.len() == jobs.len()).then_some(done)
    })
}

#[test]
fn a_sentinel_failover_loses_no_job_and_needs_no_restart() {
    let mut set = SentinelSet::start(3);
    let url = set.url(None);
    let old = set.master.port();
    let new = set.replica.port();
    let dir = fresh_temp_dir("sentinel-failover");
    let runs = dir.join("echo-runs.log");
    // PUBLISH reaches a master's replicas: a subscriber on the replica hears
    // the events of both masters, before and after the promotion.
    let sub = Subscriber::new(&set.replica, "stream:v1:*");
    let mut workers = [
        sentinel_worker(&url, "sen-a", &runs, &[]),
        sentinel_worker(&url, "sen-b", &runs, &[]),
    ];
    for w in &workers {
        w.wait_working();
        w.wait_for_log(
            &format!("master 'citadel-test' is at 127.0.0.1:{old}"),
            Duration::from_secs(10),
        );
    }
    let pids: Vec<u32> = workers.iter().map(Citadel::pid).collect();

    let mut conn = set.master.conn();
    let mut jobs = enqueue(&mut conn, "before", 60, 100);
    replicated(&mut conn);
    // Kill the master with jobs running and jobs waiting.
    wait_until("some jobs to have run", Duration::from_secs(60), || {
        (runs_of(&runs).len() >= 8).then_some(())
    });
    set.master.kill();
    set.wait_master(new, Duration::from_secs(60));

    let mut conn = data_conn(new, None).expect("the new master");
    let after = enqueue(&mut conn, "after", 20, 0);
    jobs.extend(after.iter().cloned());
    let done = wait_all_settled(new, &jobs, Duration::from_secs(120));
    assert!(
        done.values().all(|o| o == "completed"),
        "echo jobs that only sleep must complete: {done:?}"
    );
    let ran = runs_of(&runs);
    for job in &jobs {
        assert!(ran.contains_key(job), "{job} has an outcome but never ran");
    }
    wait_until("the pending list to drain", Duration::from_secs(30), || {
        let mut c = data_conn(new, None)?;
        (pending_count(&mut c, QUEUE, GROUP) == 0).then_some(())
    });

    for (w, pid) in workers.iter_mut().zip(&pids) {
        assert!(w.is_running(), "a worker exited:\n{}", w.log());
        assert_eq!(w.pid(), *pid);
        let moved =
            format!("master 'citadel-test' failed over from 127.0.0.1:{old} to 127.0.0.1:{new}");
        assert_eq!(
            w.log().matches(&moved).count(),
            1,
            "the failover is logged once per process"
        );
    }
    // The events of the jobs enqueued after the failover came from the new
    // master.
    for job in &after {
        sub.wait_for(job, "end", Duration::from_secs(10));
    }
    // An operator's command with the same URL reaches the new master.
    let stderr = submit_follows_after_failover(&url, None);
    // An operator's command does not log where the master is.
    assert_eq!(stderr, "");
    // status and dlq read the new master too.
    let out = citadel_cmd(&["status", "--json"])
        .env("CITADEL_REDIS_URL", &url)
        .output()
        .expect("citadel status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["redis"]["reachable"], true, "{v}");
    let out = citadel_cmd(&["dlq", "list"])
        .env("CITADEL_REDIS_URL", &url)
        .output()
        .expect("citadel dlq list");
    assert!(
        out.status.success(),
        "dlq list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What async replication can lose is the outcome, never the job: acks that
/// reached only the old master are gone with it, and the entries run again
/// from the new master's group.
#[test]
fn an_outcome_lost_with_the_old_master_is_run_again_not_lost() {
    let mut set = SentinelSet::start(3);
    let url = set.url(None);
    let new = set.replica.port();
    let dir = fresh_temp_dir("sentinel-lost-ack");
    let runs = dir.join("echo-runs.log");
    let mut conn = set.master.conn();
    create_group(&mut conn);
    let jobs = enqueue(&mut conn, "acked", 10, 0);
    replicated(&mut conn);
    // The replica hears nothing from now on: every ack stays on the master.
    // (Stopped, it cannot reconnect; the master drops its link, so nothing
    // written later even waits in a socket buffer.)
    let replica_pid = set.replica.pid().expect("replica running");
    signal(replica_pid, "-STOP");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query(&mut conn)
        .expect("CLIENT KILL TYPE replica");
    let mut worker = sentinel_worker(&url, "sen-lost", &runs, &[]);
    worker.wait_working();
    let done = wait_all_settled(set.master.port(), &jobs, Duration::from_secs(60));
    assert_eq!(done.len(), jobs.len());
    assert_eq!(pending_count(&mut conn, QUEUE, GROUP), 0, "all acked");
    set.master.kill();
    signal(replica_pid, "-CONT");
    set.wait_master(new, Duration::from_secs(60));

    let done = wait_all_settled(new, &jobs, Duration::from_secs(60));
    assert!(done.values().all(|o| o == "completed"), "{done:?}");
    let ran = runs_of(&runs);
    for job in &jobs {
        assert_eq!(
            ran.get(job),
            Some(&2),
            "{job}: once on the old master, once more from the new master's pending entries"
        );
    }
    assert!(worker.is_running(), "{}", worker.log());
}

#[test]
fn sentinels_unreachable_at_start_are_retried_until_they_answer() {
    let ports = [free_port(), free_port(), free_port()];
    let url = sentinel_url(&ports, None);
    let dir = fresh_temp_dir("sentinel-late");
    let runs = dir.join("echo-runs.log");
    let mut worker = sentinel_worker(&url, "sen-late", &runs, &[]);
    worker.wait_for_log(
        "no sentinel named a reachable master",
        Duration::from_secs(10),
    );
    let log = worker.log();
    for p in ports {
        assert!(log.contains(&format!("sentinel 127.0.0.1:{p}: ")), "{log}");
    }
    assert!(log.contains("retrying"), "{log}");
    assert!(worker.is_running(), "{log}");
    // Only the last sentinel comes up: the dead ones are skipped.
    let redis = RedisServer::start();
    let _sentinel = Sentinel::start_on(ports[2], redis.port(), 1, &SentinelOptions::default());
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "late-1", "echo", r#"{"x":1}"#);
    let done = wait_all_settled(redis.port(), &["late-1".into()], Duration::from_secs(60));
    assert_eq!(done["late-1"], "completed");
    assert!(worker.is_running());
}

#[test]
fn a_plain_redis_named_as_a_sentinel_is_reported_as_such() {
    let redis = RedisServer::start();
    let url = sentinel_url(&[redis.port()], Some(":pw-never-shown"));
    let out = citadel_cmd(&["submit", "--type", "echo", "--payload", "{}"])
        .env("CITADEL_REDIS_URL", &url)
        .output()
        .expect("citadel submit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a Redis Sentinel"), "{err}");
    assert!(!err.contains("pw-never-shown"), "{err}");
    assert_eq!(support::xlen(&mut redis.conn(), QUEUE), 0);
}

#[test]
fn a_garbage_sentinel_url_stops_the_start_with_what_is_wrong() {
    let cases = [
        ("redis+sentinel://", "names no sentinel host"),
        ("redis+sentinel://127.0.0.1:26379", "names no master"),
        ("redis+sentinel://127.0.0.1:99999/m", "from 1 to 65535"),
        ("redis+sentinel://a,,b/m", "an empty entry"),
        ("redis+sentinel://h/m/db", "must be a number"),
        ("rediss+sentinel://h/m#nope", "not a known option"),
        ("redis+sentinel://u:s3cret@h/m/1/2", "not part of the form"),
    ];
    for (url, want) in cases {
        for cmd in [&["work"][..], &["status"], &["dlq", "list"]] {
            let out = citadel_cmd(cmd)
                .env("CITADEL_REDIS_URL", url)
                .output()
                .expect("citadel");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd:?} {url}: {err}");
            assert!(err.contains("is not a Redis Sentinel URL"), "{url}: {err}");
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
    }
}

#[test]
fn sentinel_and_data_node_passwords_are_separate_and_never_logged() {
    let opts = SentinelOptions {
        sentinel_password: Some("sen-pw-91c2".into()),
        data_password: Some("data-pw-7f3a".into()),
        ..SentinelOptions::default()
    };
    let set = SentinelSet::start_with(1, &opts);
    let url = set.url(Some(":data-pw-7f3a"));
    let dir = fresh_temp_dir("sentinel-auth");
    let runs = dir.join("echo-runs.log");
    // Without the sentinels' password: a clear error, retried.
    let no_pw = sentinel_worker(&url, "sen-nopw", &runs, &[]);
    no_pw.wait_for_log(
        "no sentinel named a reachable master",
        Duration::from_secs(10),
    );
    let worker = sentinel_worker(
        &url,
        "sen-pw",
        &runs,
        &[("CITADEL_SENTINEL_PASSWORD", "sen-pw-91c2")],
    );
    worker.wait_working();
    let port = set.master.port();
    let mut conn = data_conn(port, Some("data-pw-7f3a")).expect("master");
    xadd_job(&mut conn, QUEUE, "auth-1", "echo", r#"{"x":1}"#);
    let done = wait_until("auth-1 to complete", Duration::from_secs(60), || {
        let mut c = data_conn(port, Some("data-pw-7f3a"))?;
        let s = hgetall(&mut c, "job:auth-1:status");
        (s.get("status").map(String::as_str) == Some("completed")).then_some(s)
    });
    assert_eq!(done["status"], "completed");
    for log in [worker.log(), no_pw.log()] {
        assert!(!log.contains("sen-pw-91c2"), "{log}");
        assert!(!log.contains("data-pw-7f3a"), "{log}");
    }
    assert!(
        no_pw.log().to_ascii_lowercase().contains("auth"),
        "the refusal names authentication: {}",
        no_pw.log()
    );
}

/// The failover other job systems get stuck on: the old master stays up
/// and is turned into a replica (`SENTINEL FAILOVER`), so no connection
/// breaks; the agent must notice READONLY / UNBLOCKED and move every thread.
#[test]
fn a_manual_failover_with_the_old_master_alive_moves_the_workers() {
    let set = SentinelSet::start(3);
    let url = set.url(None);
    let old = set.master.port();
    let new = set.replica.port();
    let dir = fresh_temp_dir("sentinel-manual");
    let runs = dir.join("echo-runs.log");
    let worker = sentinel_worker(&url, "sen-manual", &runs, &[]);
    worker.wait_working();
    let mut conn = set.master.conn();
    let before = enqueue(&mut conn, "m-before", 10, 0);
    wait_all_settled(old, &before, Duration::from_secs(60));
    let mut sentinel = data_conn(set.sentinels[0].port(), None).expect("sentinel");
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(support::sentinel::MASTER_NAME)
        .query(&mut sentinel)
        .expect("SENTINEL FAILOVER");
    set.wait_master(new, Duration::from_secs(60));
    let beats = support::xlen(
        &mut data_conn(new, None).expect("new master"),
        "node:status:stream",
    );
    wait_until(
        "the old master to be a replica",
        Duration::from_secs(30),
        || {
            let mut c = data_conn(old, None)?;
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("role:slave").then_some(())
        },
    );
    let mut conn = data_conn(new, None).expect("the new master");
    let after = enqueue(&mut conn, "m-after", 10, 0);
    let done = wait_all_settled(new, &after, Duration::from_secs(60));
    assert!(done.values().all(|o| o == "completed"), "{done:?}");
    worker.wait_for_log(
        &format!("master 'citadel-test' failed over from 127.0.0.1:{old} to 127.0.0.1:{new}"),
        Duration::from_secs(10),
    );
    // The heartbeat thread moved too: new beats land on the new master.
    wait_until(
        "a heartbeat on the new master",
        Duration::from_secs(30),
        || {
            let mut c = data_conn(new, None)?;
            (support::xlen(&mut c, "node:status:stream") > beats).then_some(())
        },
    );
}

/// `rediss+sentinel://`: TLS to the master and to the sentinels, or to the
/// master only (`--sentinel-tls false`), certificates checked against
/// `SSL_CERT_FILE`.
#[test]
fn rediss_sentinel_talks_tls_to_master_and_sentinels_as_configured() {
    const TEST: &str = "rediss_sentinel_talks_tls_to_master_and_sentinels_as_configured";
    if !support::tls::have_openssl() {
        support::skip_unless_ci(
            TEST,
            "openssl is not installed (scripts/deps.sh installs it)",
        );
        return;
    }
    let dir = fresh_temp_dir("sentinel-tls");
    support::tls::make_certs(&dir);
    let master = match support::tls::start_tls_redis(&dir) {
        Ok(m) => m,
        Err(log) => {
            support::skip_unless_ci(TEST, &format!("redis-server cannot do TLS: {}", log.trim()));
            return;
        }
    };
    let tls = SentinelOptions {
        tls_dir: Some(dir.clone()),
        tls_only: true,
        ..SentinelOptions::default()
    };
    let plain = SentinelOptions {
        tls_dir: Some(dir.clone()),
        ..SentinelOptions::default()
    };
    let tls_sentinel = Sentinel::start(master.port, 1, &tls);
    let plain_sentinel = Sentinel::start(master.port, 1, &plain);
    let ca = dir.join("ca.pem").display().to_string();
    let submit = |url: &str, env: &[(&str, &str)], job: &str| {
        let mut cmd = citadel_cmd(&[
            "submit",
            "--type",
            "echo",
            "--job-id",
            job,
            "--payload",
            r#"{"over":"tls"}"#,
            "--follow",
            "--redis-timeout",
            "2s",
        ]);
        cmd.env("CITADEL_REDIS_URL", url).env("SSL_CERT_FILE", &ca);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("citadel submit")
    };
    let both = format!(
        "rediss+sentinel://127.0.0.1:{}/{}",
        tls_sentinel.port(),
        support::sentinel::MASTER_NAME
    );
    let master_only = format!(
        "rediss+sentinel://127.0.0.1:{}/{}",
        plain_sentinel.port(),
        support::sentinel::MASTER_NAME
    );
    let runs = dir.join("echo-runs.log");
    let ca_env = [("SSL_CERT_FILE", ca.as_str())];
    let _worker = sentinel_worker(&both, "sen-tls", &runs, &ca_env);
    let out = wait_until("a job over TLS", Duration::from_secs(30), || {
        let out = submit(&both, &[], "tls-both");
        out.status.success().then_some(out)
    });
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls"));
    let out = submit(
        &master_only,
        &[("CITADEL_SENTINEL_TLS", "false")],
        "tls-master",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // TLS spoken to a plain sentinel: refused with the sentinel named.
    let out = submit(&master_only, &[], "tls-wrong");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("sentinel 127.0.0.1:{}", plain_sentinel.port())),
        "{err}"
    );
}

/// Sentinel chaos: `failovers` SIGKILLs of whichever server is the master,
/// with jobs running on three workers; after each, the killed server is
/// restarted (it comes back as a stale master and the sentinels turn it
/// into a replica) before the next. Every job that reached the replica
/// (`WAIT 1`) must complete or be dead-lettered on the last master, the
/// pending list must drain, and the workers must be the processes started
/// at the beginning. Prints one `SENTINEL_CHAOS` line of figures.
fn sentinel_chaos(jobs: usize, failovers: usize) {
    let started = std::time::Instant::now();
    let mut set = SentinelSet::start(3);
    let url = set.url(None);
    let dir = fresh_temp_dir("sentinel-chaos");
    let runs = dir.join("echo-runs.log");
    let mut workers: Vec<Citadel> = (0..3)
        .map(|i| sentinel_worker(&url, &format!("chaos-{i}"), &runs, &[]))
        .collect();
    for w in &workers {
        w.wait_working();
    }
    let pids: Vec<u32> = workers.iter().map(Citadel::pid).collect();
    let per_round = jobs / (failovers + 1);
    let mut all = Vec::new();
    for round in 0..=failovers {
        let mut conn = data_conn(set.master.port(), None).expect("the master");
        for chunk in 0..per_round.div_ceil(20) {
            let n = 20.min(per_round - chunk * 20);
            let prefix = format!("c{round}-{chunk}");
            all.extend(enqueue(&mut conn, &prefix, n, 5));
            replicated(&mut conn);
        }
        if round == failovers {
            break;
        }
        // Kill the master while this round's jobs run.
        let ran_before = runs_of(&runs).len();
        wait_until("jobs of this round to run", Duration::from_secs(60), || {
            (runs_of(&runs).len() >= ran_before + per_round / 4).then_some(())
        });
        set.master.kill();
        let promoted = set.replica.port();
        set.wait_master(promoted, Duration::from_secs(60));
        std::mem::swap(&mut set.master, &mut set.replica);
        set.replica.restart();
        set.wait_known(3);
        wait_until(
            "the restarted server in sync",
            Duration::from_secs(30),
            || {
                let mut c = data_conn(set.replica.port(), None)?;
                let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
                info.contains("master_link_status:up").then_some(())
            },
        );
    }
    let last = set.master.port();
    let done = wait_all_settled(last, &all, Duration::from_secs(180));
    let drain = std::time::Instant::now();
    wait_until("the pending list to drain", Duration::from_secs(60), || {
        let mut c = data_conn(last, None)?;
        (pending_count(&mut c, QUEUE, GROUP) == 0).then_some(())
    });
    let ran = runs_of(&runs);
    let never_ran: Vec<&String> = all.iter().filter(|j| !ran.contains_key(*j)).collect();
    let duplicates: usize = all
        .iter()
        .map(|j| ran.get(j).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    let dead = done.values().filter(|o| *o == "dead-lettered").count();
    println!(
        "SENTINEL_CHAOS jobs={} failovers={failovers} completed={} dead_lettered={dead} lost={} \
         duplicates={duplicates} drain_ms={} seconds={}",
        all.len(),
        done.len() - dead,
        all.len() - done.len(),
        drain.elapsed().as_millis(),
        started.elapsed().as_secs()
    );
    assert!(never_ran.is_empty(), "settled but never ran: {never_ran:?}");
    for (w, pid) in workers.iter_mut().zip(&pids) {
        assert!(w.is_running(), "a worker exited:\n{}", w.log());
        assert_eq!(w.pid(), *pid);
        assert_eq!(
            w.log()
                .matches("Redis Sentinel: master 'citadel-test' failed over")
                .count(),
            failovers,
            "each failover logged once per process"
        );
    }
}

#[test]
fn sentinel_chaos_short() {
    sentinel_chaos(400, 2);
}

/// `SENTINEL_CHAOS_JOBS` (default 5 000) and `SENTINEL_CHAOS_FAILOVERS`
/// (default 8): `cargo test --test sentinel -- --ignored sentinel_chaos_full`.
#[test]
#[ignore]
fn sentinel_chaos_full() {
    sentinel_chaos(
        env_usize("SENTINEL_CHAOS_JOBS", 5000),
        env_usize("SENTINEL_CHAOS_FAILOVERS", 8),
    );
}

/// A master that accepts connections and never answers (a blackholed
/// host) costs one `--redis-timeout`, not one per sentinel naming it.
#[test]
fn a_silent_master_is_timed_out_once_not_once_per_sentinel() {
    // The kernel completes the handshake; nobody ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let s1 = Sentinel::start(port, 1, &SentinelOptions::default());
    let s2 = Sentinel::start(port, 1, &SentinelOptions::default());
    let url = sentinel_url(&[s1.port(), s2.port()], None);
    let out = citadel_cmd(&[
        "submit",
        "--type",
        "echo",
        "--payload",
        "{}",
        "--redis-timeout",
        "1s",
    ])
    .env("CITADEL_REDIS_URL", &url)
    .output()
    .expect("citadel submit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "master 127.0.0.1:{port} (named by sentinel 127.0.0.1:{}): no answer within 1s",
            s1.port()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "sentinel 127.0.0.1:{} names 127.0.0.1:{port} too",
            s2.port()
        )),
        "{err}"
    );
    drop(silent);
}

/// `--sentinel-username` with `--sentinel-password`: the sentinels are
/// asked as that ACL user, not as `default`.
#[test]
fn a_sentinel_acl_user_is_asked_as_that_user() {
    let opts = SentinelOptions {
        sentinel_password: Some("default-pw-3b1".into()),
        extra_conf: vec!["user watcher on >watch-pw-5e2 ~* &* +@all".into()],
        ..SentinelOptions::default()
    };
    let set = SentinelSet::start_with(1, &opts);
    let url = set.url(None);
    let submit = |env: &[(&str, &str)], job: &str| {
        let mut cmd = citadel_cmd(&[
            "submit",
            "--type",
            "echo",
            "--job-id",
            job,
            "--payload",
            "{}",
        ]);
        cmd.env("CITADEL_REDIS_URL", &url);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("citadel submit")
    };
    let out = submit(
        &[
            ("CITADEL_SENTINEL_USERNAME", "watcher"),
            ("CITADEL_SENTINEL_PASSWORD", "watch-pw-5e2"),
        ],
        "acl-1",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same password for the default user is refused.
    let out = submit(&[("CITADEL_SENTINEL_PASSWORD", "watch-pw-5e2")], "acl-2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("watch-pw-5e2"), "{err}");
    let mut conn = set.master.conn();
    let ids: Vec<String> = xrange_all(&mut conn, QUEUE)
        .into_iter()
        .filter_map(|(_, f)| f.get("jobId").cloned())
        .collect();
    assert_eq!(ids, ["acl-1"]);
}
