//! The `--metrics-addr` listener of the real binary against a real
//! redis-server: `/metrics` parsed back and checked against the jobs run
//! (per outcome and type, histogram counts, sampled gauges), `/readyz`
//! through a Redis stop and restart, `/healthz`, bad requests (huge
//! headers, unknown paths, POST, a client that stalls mid-request) while
//! jobs keep running, the listener off, and a port in use.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::observe::wait_status;
use support::{free_port, wait_until, worker, xadd_job, RedisServer};

const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(30);

/// A worker listening for metrics on a free port; returns it and the address.
fn agent(redis: &RedisServer, node: &str, extra: &[&str]) -> (support::Citadel, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics-addr", addr.as_str()];
    args.extend_from_slice(extra);
    let w = worker(redis, node, &args);
    w.wait_for_log("metrics: http://", WAIT);
    (w, addr)
}

/// One request written as is; (status, body) of the answer, the
/// connection closed by us after the answer (`Connection: close`).
fn send(addr: &str, request: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(request).unwrap();
    let mut text = Vec::new();
    let _ = c.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    send(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `/metrics` as `name{labels}` → value (comments skipped).
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v: f64 = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (k.to_owned(), v)
        })
        .collect()
}

/// Polls `/metrics` until every `(series, value)` of `want` holds.
fn wait_metrics(addr: &str, want: &[(&str, f64)]) -> HashMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(addr);
        if want.iter().all(|(k, v)| m.get(*k) == Some(v)) {
            return m;
        }
        if Instant::now() >= deadline {
            let got: Vec<_> = want
                .iter()
                .map(|(k, v)| format!("{k}: want {v}, got {:?}", m.get(*k)))
                .collect();
            panic!("metrics never matched:\n{}", got.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_every_outcome_per_job_type() {
    let redis = RedisServer::start();
    let (_w, addr) = agent(
        &redis,
        "m-outcomes",
        &[
            "--max-retries",
            "1",
            "--retry-base",
            "1ms",
            "--retry-cap",
            "1ms",
        ],
    );
    let mut conn = redis.conn();
    for i in 0..3 {
        xadd_job(
            &mut conn,
            QUEUE,
            &format!("ok-{i}"),
            "echo",
            r#"{"chunks": 2}"#,
        );
    }
    xadd_job(&mut conn, QUEUE, "perm", "echo", r#"{"fail": "permanent"}"#);
    xadd_job(
        &mut conn,
        QUEUE,
        "retry",
        "echo",
        r#"{"fail": "retryable"}"#,
    );
    xadd_job(&mut conn, QUEUE, "bogus-1", "no_such_type", "{}");
    xadd_job(&mut conn, QUEUE, "long", "echo", r#"{"sleep_ms": 60000}"#);
    for i in 0..3 {
        wait_status(&mut conn, &format!("ok-{i}"), "completed", WAIT);
    }
    wait_status(&mut conn, "perm", "failed", WAIT);
    wait_status(&mut conn, "retry", "failed", WAIT);
    wait_status(&mut conn, "long", "processing", WAIT);
    let _: () = redis::cmd("SET")
        .arg("job:cancelled:long")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    wait_status(&mut conn, "long", "cancelled", WAIT);

    let m = wait_metrics(
        &addr,
        &[
            ("citadel_jobs_started_total{type=\"echo\"}", 6.0),
            ("citadel_jobs_completed_total{type=\"echo\"}", 3.0),
            ("citadel_jobs_failed_total{type=\"echo\"}", 2.0),
            ("citadel_jobs_retried_total{type=\"echo\"}", 1.0),
            ("citadel_jobs_dead_lettered_total{type=\"echo\"}", 2.0),
            ("citadel_jobs_cancelled_total{type=\"echo\"}", 1.0),
            ("citadel_jobs_reclaimed_total{type=\"echo\"}", 0.0),
            // Malformed (an unknown type): dead-lettered without running.
            (
                "citadel_jobs_dead_lettered_total{type=\"no_such_type\"}",
                1.0,
            ),
            ("citadel_jobs_started_total{type=\"no_such_type\"}", 0.0),
            ("citadel_job_duration_seconds_count{type=\"echo\"}", 6.0),
            (
                "citadel_job_duration_seconds_bucket{type=\"echo\",le=\"+Inf\"}",
                6.0,
            ),
            (
                "citadel_job_pickup_latency_seconds_count{type=\"echo\"}",
                6.0,
            ),
            ("citadel_chunks_published_total", 6.0),
            ("citadel_chunks_dropped_total", 0.0),
            ("citadel_jobs_in_flight", 0.0),
            ("citadel_free_slots", 4.0),
            // Sampled every few seconds from Redis.
            (
                "citadel_dead_letter_entries{stream=\"dlq:v1:gpu-general\"}",
                3.0,
            ),
            (
                "citadel_pending_entries{stream=\"jobs:v1:gpu-general\"}",
                0.0,
            ),
            ("citadel_redis_reconnects_total", 0.0),
        ],
    );
    // The cancelled job ran about as long as it took to cancel it: the
    // duration sum is well below its 60 s sleep, and above zero.
    let sum = m["citadel_job_duration_seconds_sum{type=\"echo\"}"];
    assert!(sum > 0.0 && sum < 50.0, "duration sum {sum}");
    // Buckets are cumulative.
    let le_1 = m["citadel_job_duration_seconds_bucket{type=\"echo\",le=\"1\"}"];
    let le_inf = m["citadel_job_duration_seconds_bucket{type=\"echo\",le=\"+Inf\"}"];
    assert!(le_1 <= le_inf, "{le_1} > {le_inf}");
    assert!(
        !m.contains_key("citadel_time_to_first_token_seconds_count{type=\"echo\"}"),
        "first-token time is for llm_inference only"
    );
}

#[test]
fn metrics_show_the_pending_entries_of_a_running_job() {
    let redis = RedisServer::start();
    let (_w, addr) = agent(&redis, "m-pending", &[]);
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "slow", "echo", r#"{"sleep_ms": 60000}"#);
    wait_status(&mut conn, "slow", "processing", WAIT);
    let m = wait_metrics(
        &addr,
        &[
            ("citadel_jobs_in_flight", 1.0),
            ("citadel_free_slots", 3.0),
            (
                "citadel_pending_entries{stream=\"jobs:v1:gpu-general\"}",
                1.0,
            ),
        ],
    );
    let age = m["citadel_oldest_pending_age_seconds{stream=\"jobs:v1:gpu-general\"}"];
    assert!((0.0..60.0).contains(&age), "oldest pending age {age}");
}

#[test]
fn readyz_is_503_while_redis_is_down_and_200_again_after_it_restarts() {
    let mut redis = RedisServer::start();
    let (w, addr) = agent(&redis, "m-ready", &["--redis-timeout", "1s"]);
    wait_until("/readyz 200", WAIT, || {
        (get(&addr, "/readyz").0 == 200).then_some(())
    });
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".into()));

    redis.kill();
    let body = wait_until("/readyz 503", WAIT, || {
        let (status, body) = get(&addr, "/readyz");
        (status == 503).then_some(body)
    });
    assert!(
        body.starts_with("not ready: redis: ") && body.ends_with('\n'),
        "{body:?}"
    );
    assert_eq!(body.lines().count(), 1, "one line: {body:?}");
    assert_eq!(get(&addr, "/healthz").0, 200, "alive while Redis is down");

    redis.restart();
    wait_until("/readyz 200 after the restart", WAIT, || {
        (get(&addr, "/readyz") == (200, "ready\n".into())).then_some(())
    });
    // Jobs run again, and the reconnect was counted.
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "after", "echo", "{}");
    wait_status(&mut conn, "after", "completed", WAIT);
    let m = scrape(&addr);
    assert!(
        m["citadel_redis_reconnects_total"] >= 1.0,
        "{:?}",
        m.get("citadel_redis_reconnects_total")
    );
    drop(w);
}

#[test]
fn bad_requests_get_clean_answers_and_jobs_keep_running() {
    let redis = RedisServer::start();
    let (_w, addr) = agent(&redis, "m-bad", &[]);
    let mut conn = redis.conn();

    // A client that sends half a request and stalls.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Half: ")
        .unwrap();
    let stalled_at = Instant::now();

    // Meanwhile jobs run and other requests are answered.
    for i in 0..5 {
        xadd_job(&mut conn, QUEUE, &format!("during-{i}"), "echo", "{}");
    }
    for i in 0..5 {
        wait_status(&mut conn, &format!("during-{i}"), "completed", WAIT);
    }
    let big = "a".repeat(100 * 1024);
    let (status, body) = send(
        &addr,
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(status, 431, "{body}");
    assert_eq!(get(&addr, "/nope").0, 404);
    assert_eq!(get(&addr, "/").0, 404);
    let (status, _) = send(
        &addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    let (status, _) = send(&addr, b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(status, 400);
    wait_metrics(
        &addr,
        &[("citadel_jobs_completed_total{type=\"echo\"}", 5.0)],
    );

    // The stalled client is cut off, not served forever.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    let waited = stalled_at.elapsed();
    assert!(
        waited < Duration::from_secs(25),
        "a stalled client held its connection {waited:?}"
    );
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 4"),
        "{rest:?}"
    );
    // And the listener still answers.
    assert_eq!(get(&addr, "/healthz").0, 200);
}

#[test]
fn an_empty_metrics_addr_opens_no_listener() {
    let redis = RedisServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // The flag (empty) wins over the environment.
    let w = support::worker_with_env(
        &redis,
        "m-off",
        &["--metrics-addr", ""],
        &[("CITADEL_METRICS_ADDR", &addr)],
    );
    w.wait_working();
    w.wait_for_log("metrics: off (--metrics-addr is empty)", WAIT);
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "off-1", "echo", "{}");
    wait_status(&mut conn, "off-1", "completed", WAIT);
    let refused = TcpStream::connect(&addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn a_metrics_port_in_use_stops_the_start_with_exit_2_naming_the_setting() {
    let redis = RedisServer::start();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut w = worker(&redis, "m-busy", &["--metrics-addr", &addr]);
    let status = w.wait_exit(WAIT).expect("citadel did not exit");
    assert_eq!(status.code(), Some(2), "{}", w.log());
    let log = w.log();
    assert!(
        log.contains(&format!(
            "citadel: cannot listen on --metrics-addr {addr}: "
        )),
        "{log}"
    );
    assert!(log.contains("in use"), "{log}");
    assert!(
        !log.contains("starting 4 handler threads"),
        "no job was taken: {log}"
    );
}

#[test]
fn the_default_port_taken_costs_a_second_worker_its_listener_not_its_jobs() {
    // Hold the default port (or find it held already: the same case).
    let _taken = TcpListener::bind("127.0.0.1:9464");
    let redis = RedisServer::start();
    let dir = support::fresh_temp_dir("metrics-default");
    let log_path = dir.join("citadel.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let url = redis.url();
    let mut cmd = support::citadel_cmd(&["work", "--redis-url", &url, "--node-name", "m-second"]);
    // No metrics-addr anywhere: the default, which is taken.
    cmd.env_remove("CITADEL_METRICS_ADDR")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = cmd.spawn().unwrap();
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let seen = support::wait_until("the worker working", WAIT, || {
        let text = read();
        (text.contains("working: streams") || text.contains("citadel: ")).then_some(text)
    });
    let mut conn = redis.conn();
    support::xadd_job(&mut conn, "jobs:v1:gpu-general", "m-second-1", "echo", "{}");
    let status = support::wait_until("the echo job's status", WAIT, || {
        let s: Option<String> = redis::cmd("HGET")
            .arg("job:m-second-1:status")
            .arg("status")
            .query(&mut conn)
            .unwrap();
        s.filter(|s| s == "completed")
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, "completed", "{}", read());
    assert!(
        seen.contains("cannot listen on --metrics-addr 127.0.0.1:9464")
            && seen.contains("this worker serves no /metrics"),
        "{seen}"
    );
}

#[test]
fn nexus_readiness_follows_its_polls_and_its_jobs_are_counted() {
    use support::fake_nexus::{FakeNexus, Next};
    let nexus = FakeNexus::start();
    let state = support::fresh_temp_dir("metrics-nexus");
    let addr = format!("127.0.0.1:{}", free_port());
    let w = support::Citadel::spawn(
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            &nexus.url(),
            "--state-dir",
            state.to_str().unwrap(),
            "--poll-interval",
            "100ms",
            "--nexus-retry-cap",
            "200ms",
            "--metrics-addr",
            &addr,
        ],
        &[("RUST_LOG", "debug")],
    );
    w.wait_for_log("metrics: http://", WAIT);
    wait_until("/readyz 200 on Nexus", WAIT, || {
        (get(&addr, "/readyz") == (200, "ready\n".into())).then_some(())
    });
    nexus.push_job("nx-1", "echo", serde_json::json!({"chunks": 1}));
    nexus.wait_for_report("nx-1", WAIT);
    let m = wait_metrics(
        &addr,
        &[
            ("citadel_jobs_completed_total{type=\"echo\"}", 1.0),
            ("citadel_chunks_published_total", 1.0),
            (
                "citadel_job_pickup_latency_seconds_count{type=\"echo\"}",
                0.0,
            ),
            ("citadel_nexus_spool_reports", 0.0),
        ],
    );
    assert_eq!(m["citadel_nexus_poll_errors_total"], 0.0);

    nexus.set_default_next(vec![Next::Status(503, vec![], "maintenance".into())]);
    let body = wait_until("/readyz 503 while Nexus fails", WAIT, || {
        let (status, body) = get(&addr, "/readyz");
        (status == 503).then_some(body)
    });
    assert!(
        body.starts_with("not ready: nexus: Nexus polls fail: "),
        "{body:?}"
    );
    assert!(scrape(&addr)["citadel_nexus_poll_errors_total"] >= 1.0);
    assert_eq!(get(&addr, "/healthz").0, 200);

    nexus.set_default_next(vec![Next::NoJob]);
    wait_until("/readyz 200 once Nexus answers again", WAIT, || {
        (get(&addr, "/readyz").0 == 200).then_some(())
    });
}
