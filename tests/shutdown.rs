//! The shutdown matrix, asserted from outside as an operator sees it (exit
//! code and time, Redis state, what Nexus received), in Redis, Nexus and
//! auto mode. Cells that other files already cover are not repeated here;
//! README "Guarantees and how we test them" lists which test covers which
//! cell. SIGHUP is caught like SIGTERM (ctrlc's `termination` feature): a
//! graceful stop, tested here in every mode.

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::fake_nexus::FakeNexus;
use support::observe::{events_of, has_ended, status, sync_subscriber, wait_drained, wait_status};
use support::{
    fresh_temp_dir, pending_count, pending_for_consumer, wait_until, worker, xadd_job, Citadel,
    RedisServer, Subscriber,
};

const QUEUE: &str = "jobs:v1:gpu-general";
const GROUP: &str = "workers";
const EVENTS: &str = "stream:v1:*";

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `citadel work` (Redis Streams).
    Redis,
    /// `citadel agent` (auto: Redis while it answers, else Nexus).
    Auto,
}

/// A Redis-reading agent in `mode` as `node`, with `extra` flags last.
fn redis_agent(
    mode: Mode,
    redis: &RedisServer,
    nexus: &FakeNexus,
    node: &str,
    extra: &[&str],
) -> Citadel {
    match mode {
        Mode::Redis => worker(redis, node, extra),
        Mode::Auto => {
            let redis_url = redis.url();
            let nexus_url = nexus.url();
            let mut args = vec![
                "agent",
                "--redis-url",
                &redis_url,
                "--nexus-url",
                &nexus_url,
                "--node-name",
                node,
                "--block",
                "1s",
                "--cancel-poll",
                "100ms",
                "--poll-interval",
                "50ms",
                "--nexus-retry-cap",
                "200ms",
            ];
            args.extend_from_slice(extra);
            Citadel::spawn(&args, &[("RUST_LOG", "debug")])
        }
    }
}

/// `citadel work --mode nexus` with its state in `state`.
fn nexus_agent(nexus: &FakeNexus, state: &Path, extra: &[&str]) -> Citadel {
    let url = nexus.url();
    let state = state.to_string_lossy().into_owned();
    let mut args = vec![
        "work",
        "--mode",
        "nexus",
        "--nexus-url",
        &url,
        "--state-dir",
        &state,
        "--node-name",
        "shutdown-nexus",
        "--poll-interval",
        "50ms",
        "--nexus-timeout",
        "2s",
        "--nexus-retry-cap",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Citadel::spawn(&args, &[("RUST_LOG", "debug")])
}

/// `kill -SIG pid` (the Citadel helper has TERM and INT only).
fn signal(c: &mut Citadel, sig: &str) {
    if !c.is_running() {
        return;
    }
    let pid = c.pid().to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, pid.as_str()])
        .status()
        .expect("running kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

/// Waits up to `within` for the exit; returns (exit code, time taken).
#[track_caller]
fn exit_of(c: &mut Citadel, t0: Instant, within: Duration) -> (Option<i32>, Duration) {
    let status = c
        .wait_exit(within)
        .unwrap_or_else(|| panic!("still running {within:?} after the signal:\n{}", c.log()));
    (status.code(), t0.elapsed())
}

fn spooled_reports(state: &Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(state.join("nexus-spool")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
        .collect()
}

// ---------------------------------------------------------------------------
// SIGTERM / SIGHUP with jobs in flight: they complete, are acked, exit 0
// ---------------------------------------------------------------------------

/// Three jobs running when `sig` arrives: each completes and is acked, the
/// process exits 0 well within the grace.
fn graceful_stop_completes_in_flight_jobs(mode: Mode, sig: &str) {
    let redis = RedisServer::start();
    let nexus = FakeNexus::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let jobs: Vec<String> = (0..3).map(|i| format!("flight-{i}")).collect();
    for j in &jobs {
        xadd_job(&mut c, QUEUE, j, "echo", r#"{"sleep_ms":800,"chunks":2}"#);
    }
    let mut w = redis_agent(
        mode,
        &redis,
        &nexus,
        "node-flight",
        &["--concurrency", "3", "--shutdown-grace", "10s"],
    );
    for j in &jobs {
        sub.wait_for(j, "start", Duration::from_secs(15));
    }
    let t0 = Instant::now();
    signal(&mut w, sig);
    let (code, took) = exit_of(&mut w, t0, Duration::from_secs(12));
    assert_eq!(code, Some(0), "{mode:?} {sig}: {}", w.log());
    assert!(
        took < Duration::from_secs(8),
        "{mode:?} {sig}: exit took {took:?}"
    );
    for j in &jobs {
        assert_eq!(
            status(&mut c, j)["status"],
            "completed",
            "{mode:?} {sig} {j}"
        );
        sub.wait_for(j, "end", Duration::from_secs(5));
    }
    assert_eq!(
        pending_count(&mut c, QUEUE, GROUP),
        0,
        "{mode:?} {sig}: not acked"
    );
}

#[test]
fn auto_sigterm_completes_and_acks_in_flight_jobs() {
    graceful_stop_completes_in_flight_jobs(Mode::Auto, "-TERM");
}

#[test]
fn redis_sighup_is_a_graceful_stop() {
    graceful_stop_completes_in_flight_jobs(Mode::Redis, "-HUP");
}

#[test]
fn auto_sighup_is_a_graceful_stop() {
    graceful_stop_completes_in_flight_jobs(Mode::Auto, "-HUP");
}

#[test]
fn nexus_sighup_is_a_graceful_stop() {
    let nexus = FakeNexus::start();
    let state = fresh_temp_dir("shutdown-state");
    nexus.push_job("hup-1", "echo", json!({"sleep_ms": 800, "chunks": 1}));
    let mut a = nexus_agent(
        &nexus,
        &state,
        &["--shutdown-grace", "10s", "--concurrency", "1"],
    );
    a.wait_for_log("job hup-1 (echo) started", Duration::from_secs(10));
    let t0 = Instant::now();
    signal(&mut a, "-HUP");
    nexus.push_job("hup-late", "echo", json!({}));
    let (code, took) = exit_of(&mut a, t0, Duration::from_secs(12));
    assert_eq!(code, Some(0), "{}", a.log());
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    let r = nexus.reports_for("hup-1");
    assert_eq!(r.len(), 1, "{}", nexus.summary());
    assert_eq!(r[0].status, "SUCCESS");
    // A poll in flight at the signal may still bring it: it is then
    // reported not run (README, Nexus reports: Shutdown), never started.
    assert!(
        !a.log().contains("job hup-late (echo) started"),
        "{}",
        a.log()
    );
    for r in nexus.reports_for("hup-late") {
        assert_eq!(r.status, "FAILURE", "{r:?}");
        assert!(r.output.contains("not run"), "{r:?}");
    }
    let _ = std::fs::remove_dir_all(&state);
}

// ---------------------------------------------------------------------------
// SIGTERM twice: stops at once, the job is left pending (Redis) or reported
// not finished (Nexus); exit code 0
// ---------------------------------------------------------------------------

fn second_sigterm_stops_at_once(mode: Mode) {
    let redis = RedisServer::start();
    let nexus = FakeNexus::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "twice-term";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":30000}"#);
    let mut w = redis_agent(
        mode,
        &redis,
        &nexus,
        "node-twice",
        &["--shutdown-grace", "60s"],
    );
    sub.wait_for(job, "start", Duration::from_secs(15));
    let t0 = Instant::now();
    w.sigterm();
    w.wait_for_log("signal received", Duration::from_secs(5));
    w.sigterm();
    let (code, took) = exit_of(&mut w, t0, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{mode:?}: {}", w.log());
    assert!(
        took < Duration::from_secs(4),
        "{mode:?}: exit took {took:?}"
    );
    sync_subscriber(&redis, &sub);
    assert!(
        !has_ended(&sub.events_for(job)),
        "{mode:?}: {:?}",
        sub.events_for(job)
    );
    assert_eq!(
        pending_for_consumer(&mut c, QUEUE, GROUP, "node-twice"),
        1,
        "{mode:?}"
    );
}

#[test]
fn redis_second_sigterm_stops_at_once_leaving_the_job_pending() {
    second_sigterm_stops_at_once(Mode::Redis);
}

#[test]
fn auto_second_sigterm_stops_at_once_leaving_the_job_pending() {
    second_sigterm_stops_at_once(Mode::Auto);
}

#[test]
fn nexus_second_sigterm_stops_at_once_and_the_job_is_reported_unfinished() {
    let nexus = FakeNexus::start();
    let state: PathBuf = fresh_temp_dir("shutdown-state");
    nexus.push_job("twice-n", "echo", json!({"sleep_ms": 30000}));
    let mut a = nexus_agent(&nexus, &state, &["--shutdown-grace", "60s"]);
    a.wait_for_log("job twice-n (echo) started", Duration::from_secs(10));
    let t0 = Instant::now();
    a.sigterm();
    a.wait_for_log("signal received", Duration::from_secs(5));
    a.sigterm();
    let (code, took) = exit_of(&mut a, t0, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", a.log());
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    // Reported FAILURE before the exit, or left in the spool for the next run.
    let reported = nexus.reports_for("twice-n");
    let spooled = spooled_reports(&state);
    let outcome = reported
        .first()
        .map(|r| r.status.clone())
        .or_else(|| {
            spooled
                .iter()
                .find(|r| r["id"] == "twice-n")
                .and_then(|r| r["status"].as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| panic!("no report of twice-n, sent or spooled: {}", nexus.summary()));
    assert_eq!(outcome, "FAILURE");
    let _ = std::fs::remove_dir_all(&state);
}

// ---------------------------------------------------------------------------
// SIGTERM during an outage: a bounded exit, nothing lost
// ---------------------------------------------------------------------------

/// Redis SIGKILLed while a job runs; SIGTERM during the outage: the process
/// exits within the grace + 2 s, and once Redis is back the job's entry is
/// still there (pending) and another worker completes it.
fn sigterm_during_a_redis_outage(mode: Mode) {
    let mut redis = RedisServer::start();
    let nexus = FakeNexus::start();
    let mut c = redis.conn();
    let job = "outage-term";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":1500}"#);
    let mut w = redis_agent(
        mode,
        &redis,
        &nexus,
        "node-outage",
        &[
            "--shutdown-grace",
            "1s",
            "--redis-timeout",
            "1s",
            "--claim-idle",
            "2s",
        ],
    );
    wait_status(&mut c, job, "processing", Duration::from_secs(15));
    redis.kill();
    let t0 = Instant::now();
    w.sigterm();
    let (code, took) = exit_of(&mut w, t0, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{mode:?}: {}", w.log());
    assert!(
        took < Duration::from_secs(1 + 2),
        "{mode:?}: exit took {took:?}: {}",
        w.log()
    );

    redis.restart();
    let mut c = redis.conn();
    let _other = worker(&redis, "node-after", &["--claim-idle", "2s"]);
    wait_status(&mut c, job, "completed", Duration::from_secs(20));
    wait_drained(&mut c, QUEUE, GROUP, Duration::from_secs(10));
}

#[test]
fn redis_sigterm_during_a_redis_outage_exits_within_the_grace() {
    sigterm_during_a_redis_outage(Mode::Redis);
}

#[test]
fn auto_sigterm_during_a_redis_outage_exits_within_the_grace() {
    sigterm_during_a_redis_outage(Mode::Auto);
}

/// Nexus gone (connection refused) when the job's report is due; SIGTERM:
/// the exit is bounded, the report waits in the spool, and the next run
/// delivers it once Nexus is back.
#[test]
fn nexus_sigterm_while_nexus_is_down_exits_within_the_grace_and_keeps_the_report() {
    let nexus = FakeNexus::start();
    let port = nexus.port();
    let state = fresh_temp_dir("shutdown-state");
    nexus.push_job("down-1", "echo", json!({"sleep_ms": 500}));
    let mut a = nexus_agent(&nexus, &state, &["--shutdown-grace", "1s"]);
    a.wait_for_log("job down-1 (echo) started", Duration::from_secs(10));
    drop(nexus);
    wait_until("the report to be spooled", Duration::from_secs(10), || {
        spooled_reports(&state)
            .iter()
            .any(|r| r["id"] == "down-1")
            .then_some(())
    });
    let t0 = Instant::now();
    a.sigterm();
    let (code, took) = exit_of(&mut a, t0, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", a.log());
    assert!(
        took < Duration::from_secs(1 + 2),
        "exit took {took:?}: {}",
        a.log()
    );
    assert!(spooled_reports(&state).iter().any(|r| r["id"] == "down-1"));

    let nexus = FakeNexus::start_on(port);
    let _b = nexus_agent(&nexus, &state, &[]);
    let r = nexus.wait_for_report("down-1", Duration::from_secs(15));
    assert_eq!(r.status, "SUCCESS");
    let _ = std::fs::remove_dir_all(&state);
}

// ---------------------------------------------------------------------------
// SIGKILL: the job is reclaimed later (Redis mode: reliability.rs covers it)
// ---------------------------------------------------------------------------

#[test]
fn auto_sigkill_leaves_the_job_to_be_reclaimed() {
    let redis = RedisServer::start();
    let nexus = FakeNexus::start();
    let mut c = redis.conn();
    let sub = Subscriber::new(&redis, EVENTS);
    let job = "auto-kill";
    xadd_job(&mut c, QUEUE, job, "echo", r#"{"sleep_ms":30000}"#);
    let mut a = redis_agent(
        Mode::Auto,
        &redis,
        &nexus,
        "node-killed",
        &["--claim-idle", "2s"],
    );
    sub.wait_for(job, "start", Duration::from_secs(15));
    a.kill9();
    assert_eq!(pending_for_consumer(&mut c, QUEUE, GROUP, "node-killed"), 1);
    // Another worker takes the entry over once it is claim-idle (2 s) old.
    let _b = worker(&redis, "node-rescuer", &["--claim-idle", "2s"]);
    wait_until("the job to be reclaimed", Duration::from_secs(20), || {
        (pending_for_consumer(&mut c, QUEUE, GROUP, "node-rescuer") == 1).then_some(())
    });
    // ... and runs it again: a second `start` on the job's channel.
    wait_until(
        "the reclaimed job to start again",
        Duration::from_secs(10),
        || (events_of(&sub, job, "start").len() == 2).then_some(()),
    );
    assert_eq!(pending_for_consumer(&mut c, QUEUE, GROUP, "node-killed"), 0);
}
