//! The wire contract (PROTOCOL.md §1–2) as a backend and an operator see it:
//! events on `stream:v1:{jobId}`, the `job:{jobId}:status` hash, dead letters
//! on `dlq:v1:*`, cancellation keys, and the `submit`, `dlq`, `run-job` and
//! usage-error behaviour of the real `citadel` binary, each test against its
//! own real redis-server.

mod support;

use serde_json::{json, Value as Json};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::dead_letters::{self, Expected};
use support::observe::{assert_rfc3339_ms, echo_barrier, kinds_of, wait_drained, wait_status};
use support::{
    citadel_cmd, wait_until, xadd_fields, xadd_job, xlen, xrange_all, Citadel, RedisServer,
    Subscriber,
};

/// Longest wait for anything a worker should do promptly.
const WAIT: Duration = Duration::from_secs(10);
const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
const GROUP: &str = "workers";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// [`support::worker`] with the contract tests' settings: claim-idle 5 s,
/// retry-base 5 ms, shutdown-grace 2 s. Later flags in `extra` override these.
fn worker(redis: &RedisServer, node: &str, extra: &[&str]) -> Citadel {
    let mut args = vec![
        "--claim-idle",
        "5s",
        "--retry-base",
        "5ms",
        "--shutdown-grace",
        "2s",
    ];
    args.extend_from_slice(extra);
    support::worker(redis, node, &args)
}

/// What a one-shot command did.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion (feeding `stdin` if given) and captures its
/// output; kills it and panics if it runs longer than `timeout`.
fn run(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("writing stdin");
    }
    let reader = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(support::POLL);
    };
    let output = Output {
        code: status.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    assert!(
        status.is_some(),
        "{cmd:?} still running after {timeout:?}; output so far: {output:?}"
    );
    output
}

/// `citadel <args>` against `redis` (through CITADEL_REDIS_URL).
fn citadel(redis: &RedisServer, args: &[&str]) -> Output {
    let mut cmd = citadel_cmd(args);
    cmd.env("CITADEL_REDIS_URL", redis.url());
    run(cmd, None, WAIT)
}

fn keys(v: &Json) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected a JSON object, got {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(items: &[&'a str]) -> BTreeSet<&'a str> {
    items.iter().copied().collect()
}

/// Waits until `stream` holds at least `n` entries; returns them all.
fn wait_entries(
    conn: &mut redis::Connection,
    stream: &str,
    n: usize,
) -> Vec<(String, HashMap<String, String>)> {
    wait_until(&format!("{n} entries on {stream}"), WAIT, || {
        let all = xrange_all(conn, stream);
        (all.len() >= n).then_some(all)
    })
}

/// `XADD stream * k v …` with raw bytes; returns the entry id.
fn xadd_bytes(conn: &mut redis::Connection, stream: &str, fields: &[(&[u8], &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query::<String>(conn)
        .unwrap_or_else(|e| panic!("XADD {stream} (raw bytes): {e}"))
}

/// The raw bytes of `field` of every entry of `stream`, by entry id.
fn raw_field(conn: &mut redis::Connection, stream: &str, field: &str) -> HashMap<String, Vec<u8>> {
    let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE {stream}: {e}"));
    entries
        .into_iter()
        .filter_map(|(id, flat)| {
            flat.chunks(2)
                .find(|kv| kv[0] == field.as_bytes())
                .map(|kv| (id, kv[1].clone()))
        })
        .collect()
}

/// `TTL key`.
fn ttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("TTL {key}: {e}"))
}

// ---------------------------------------------------------------------------
// Events and status
// ---------------------------------------------------------------------------

#[test]
fn job_emits_contract_events_in_order() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-ev", &[]);
    let mut conn = redis.conn();

    let payload = r#"{"chunks":3,"note":"héllo"}"#;
    xadd_fields(
        &mut conn,
        QUEUE,
        &[
            ("jobId", "j-events"),
            ("type", "echo"),
            ("payload", payload),
            ("rayId", "ray-1"),
        ],
    );
    xadd_job(&mut conn, QUEUE, "j-noray", "echo", r#"{"chunks":1}"#);
    sub.wait_for("j-events", "end", WAIT);
    sub.wait_for("j-noray", "end", WAIT);

    let events = sub.events_for("j-events");
    assert_eq!(
        kinds_of(&sub, "j-events"),
        ["claimed", "start", "chunk", "chunk", "chunk", "end"],
        "events: {events:?}"
    );
    let meta = json!({"node_id": "node-ev", "node_name": "node-ev", "tags": []});
    let mut last_ts = String::new();
    for ev in &events {
        assert_eq!(
            keys(ev),
            set(&["version", "type", "jobId", "rayId", "timestamp", "data"]),
            "{ev}"
        );
        assert_eq!(ev["version"], "1.0", "{ev}");
        assert_eq!(ev["jobId"], "j-events", "{ev}");
        assert_eq!(ev["rayId"], "ray-1", "{ev}");
        let ts = ev["timestamp"].as_str().expect("timestamp is a string");
        assert_rfc3339_ms("timestamp", ts);
        assert!(ts >= last_ts.as_str(), "timestamps go back: {events:?}");
        last_ts = ts.to_string();
        assert_eq!(ev["data"]["meta"], meta, "{ev}");
    }
    let data = |i: usize| &events[i]["data"];
    assert_eq!(keys(data(0)), set(&["agent_version", "meta"]));
    assert_eq!(data(0)["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(keys(data(1)), set(&["message", "meta"]));
    assert!(
        !data(1)["message"].as_str().unwrap_or_default().is_empty(),
        "start.message must be a non-empty string: {}",
        data(1)
    );
    for i in 0..3 {
        let chunk = data(2 + i);
        assert_eq!(keys(chunk), set(&["content", "index", "meta"]));
        assert_eq!(chunk["content"], format!("chunk {i}\n"));
        assert_eq!(chunk["index"], i);
    }
    assert_eq!(keys(data(5)), set(&["result", "meta"]));
    assert_eq!(
        data(5)["result"],
        serde_json::from_str::<Json>(payload).unwrap()
    );

    // Every event of a job is on that job's own channel.
    for (channel, ev) in sub.messages() {
        let job = ev["jobId"].as_str().unwrap_or_default();
        assert_eq!(channel, format!("stream:v1:{job}"), "{ev}");
    }

    // No rayId anywhere: the key is left out, not empty.
    let noray = sub.events_for("j-noray");
    assert_eq!(
        kinds_of(&sub, "j-noray"),
        ["claimed", "start", "chunk", "end"]
    );
    for ev in &noray {
        assert!(ev.get("rayId").is_none(), "rayId must be omitted: {ev}");
        assert_eq!(ev["data"]["meta"], meta, "{ev}");
    }
}

#[test]
fn type_and_ray_id_fall_back_to_the_payload() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-fallback", &[]);
    let mut conn = redis.conn();

    let payload = r#"{"type":"echo","rayId":"ray-p","x":1}"#;
    xadd_fields(
        &mut conn,
        QUEUE,
        &[("jobId", "j-fallback"), ("payload", payload)],
    );
    let end = sub.wait_for("j-fallback", "end", WAIT);
    assert_eq!(end["data"]["result"]["x"], 1, "{end}");
    for ev in sub.events_for("j-fallback") {
        assert_eq!(ev["rayId"], "ray-p", "{ev}");
    }
    // The entry's own fields win over the payload's.
    xadd_fields(
        &mut conn,
        QUEUE,
        &[
            ("jobId", "j-own"),
            ("type", "echo"),
            ("rayId", "ray-own"),
            ("payload", r#"{"type":"teleport","rayId":"ray-p"}"#),
        ],
    );
    let end = sub.wait_for("j-own", "end", WAIT);
    assert_eq!(end["rayId"], "ray-own", "{end}");
}

#[test]
fn status_hash_records_outcome_with_ttl() {
    let redis = RedisServer::start();
    let _w = worker(&redis, "node-status", &["--status-ttl", "1h"]);
    let mut conn = redis.conn();

    xadd_job(&mut conn, QUEUE, "j-ok", "echo", "{}");
    let ok = wait_status(&mut conn, "j-ok", "completed", WAIT);
    assert_eq!(
        ok.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        set(&["status", "worker_id", "updated_at"]),
        "a completed job's status has no error field: {ok:?}"
    );
    assert_eq!(ok["worker_id"], "node-status");
    assert_rfc3339_ms("updated_at", &ok["updated_at"]);
    let t = ttl(&mut conn, "job:j-ok:status");
    assert!(t > 0 && t <= 3600, "TTL of a completed status: {t}");

    xadd_job(&mut conn, QUEUE, "j-bad", "echo", r#"{"fail":"permanent"}"#);
    let bad = wait_status(&mut conn, "j-bad", "failed", WAIT);
    assert_eq!(bad["worker_id"], "node-status");
    assert_rfc3339_ms("updated_at", &bad["updated_at"]);
    assert!(
        bad.get("error")
            .is_some_and(|e| e.contains("asked to fail (permanent)")),
        "failed status must carry the error: {bad:?}"
    );
    let t = ttl(&mut conn, "job:j-bad:status");
    assert!(t > 0 && t <= 3600, "TTL of a failed status: {t}");
}

// ---------------------------------------------------------------------------
// Failures and dead letters
// ---------------------------------------------------------------------------

#[test]
fn permanent_failure_is_dead_lettered_with_all_fields() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-perm", &[]);
    let mut conn = redis.conn();

    // Odd spacing and non-ASCII text: the dead letter must keep the string as is.
    let payload = "{ \"fail\" : \"permanent\",  \"note\":\"h\u{e9}llo\" }";
    let enqueued_at = "2026-01-20T10:00:00.000Z";
    let entry_id = xadd_fields(
        &mut conn,
        QUEUE,
        &[
            ("jobId", "j-perm"),
            ("type", "echo"),
            ("payload", payload),
            ("enqueuedAt", enqueued_at),
            ("rayId", "ray-perm"),
        ],
    );
    let error = sub.wait_for("j-perm", "error", WAIT);
    let letters = wait_entries(&mut conn, DLQ, 1);
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);

    assert_eq!(letters.len(), 1, "exactly one dead letter: {letters:?}");
    dead_letters::assert_whole(
        &letters[0].1,
        &Expected {
            entry_id: &entry_id,
            queue: QUEUE,
            reason: "permanent error",
            error_has: "asked to fail (permanent)",
            deliveries: "1",
            worker: "node-perm",
            job: "j-perm",
            job_type: "echo",
            payload,
            enqueued_at,
            ray: "ray-perm",
        },
    );
    let raw = raw_field(&mut conn, DLQ, "payload");
    assert_eq!(
        raw[&letters[0].0],
        payload.as_bytes(),
        "payload not byte-identical"
    );

    assert_eq!(error["data"]["recoverable"], false, "{error}");
    assert!(
        error["data"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("asked to fail (permanent)")),
        "{error}"
    );
    assert_eq!(kinds_of(&sub, "j-perm"), ["claimed", "start", "error"]);
    let status = wait_status(&mut conn, "j-perm", "failed", WAIT);
    assert!(status["error"].contains("asked to fail (permanent)"));
}

#[test]
fn retryable_failure_is_retried_then_dead_lettered() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(
        &redis,
        "node-retry",
        &["--max-retries", "2", "--retry-base", "5ms"],
    );
    let mut conn = redis.conn();

    let entry_id = xadd_job(
        &mut conn,
        QUEUE,
        "j-retry",
        "echo",
        r#"{"fail":"retryable"}"#,
    );
    let error = sub.wait_for("j-retry", "error", WAIT);
    let letters = wait_entries(&mut conn, DLQ, 1);
    let dl = dead_letters::of_entry(&letters, &entry_id);
    assert_eq!(dl["reason"], "retries exhausted");
    assert!(
        dl["error"].contains("asked to fail (retryable)") && dl["error"].contains("3 attempts"),
        "the error must say what failed and how often: {dl:?}"
    );
    // Retries are in-process: one delivery, one start.
    assert_eq!(dl["deliveries"], "1");
    assert_eq!(error["data"]["recoverable"], false, "{error}");
    wait_status(&mut conn, "j-retry", "failed", WAIT);
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);

    echo_barrier(&mut conn, &sub, QUEUE, "j-barrier");
    assert_eq!(
        kinds_of(&sub, "j-retry"),
        ["claimed", "start", "error"],
        "exactly one terminal event"
    );
    assert_eq!(xlen(&mut conn, DLQ), 1);
}

#[test]
fn each_malformed_entry_is_dead_lettered_and_the_next_job_runs() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-malformed", &["--max-job-size", "2048"]);
    let mut conn = redis.conn();

    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(4096));
    // (job id if any, fields, what the error must say)
    type Case<'a> = (Option<&'a str>, Vec<(&'a [u8], &'a [u8])>, &'a str);
    let cases: Vec<Case> = vec![
        (
            None,
            vec![(b"type", b"echo"), (b"payload", b"{}")],
            "entry has no jobId field",
        ),
        (
            Some("m-nopayload"),
            vec![(b"jobId", b"m-nopayload"), (b"type", b"echo")],
            "entry has no payload field",
        ),
        (
            Some("m-notjson"),
            vec![
                (b"jobId", b"m-notjson"),
                (b"type", b"echo"),
                (b"payload", b"{nope"),
            ],
            "payload is not valid JSON",
        ),
        (
            Some("m-array"),
            vec![
                (b"jobId", b"m-array"),
                (b"type", b"echo"),
                (b"payload", b"[1,2]"),
            ],
            "payload is not a JSON object (it is an array)",
        ),
        (
            Some("m-number"),
            vec![
                (b"jobId", b"m-number"),
                (b"type", b"echo"),
                (b"payload", b"42"),
            ],
            "payload is not a JSON object (it is a number)",
        ),
        (
            Some("m-unknown"),
            vec![
                (b"jobId", b"m-unknown"),
                (b"type", b"teleport"),
                (b"payload", b"{}"),
            ],
            "no handler for job type 'teleport'",
        ),
        (
            Some("m-notype"),
            vec![(b"jobId", b"m-notype"), (b"payload", b"{\"a\":1}")],
            "entry has no type",
        ),
        (
            Some("m-big"),
            vec![
                (b"jobId", b"m-big"),
                (b"type", b"echo"),
                (b"payload", big.as_bytes()),
            ],
            "over the max-job-size",
        ),
        (
            Some("m-timeout"),
            vec![
                (b"jobId", b"m-timeout"),
                (b"type", b"echo"),
                (b"payload", b"{\"timeout_ms\":\"soon\"}"),
            ],
            "timeout_ms",
        ),
        (
            Some("m-binary"),
            vec![
                (b"jobId", b"m-binary"),
                (b"type", b"echo"),
                (b"payload", b"{\"a\":\"\xff\xfe\x00\xc3\"}"),
            ],
            "payload is not UTF-8",
        ),
        (
            None,
            vec![(b"\xff\xfe", b"\x00\x01\x02"), (b"\xc3\x28", b"\xa0\xa1")],
            "entry has no jobId field",
        ),
    ];

    let ids: Vec<String> = cases
        .iter()
        .map(|(_, fields, _)| xadd_bytes(&mut conn, QUEUE, fields))
        .collect();
    xadd_job(&mut conn, QUEUE, "j-good", "echo", r#"{"chunks":1}"#);

    let end = sub.wait_for("j-good", "end", WAIT);
    assert_eq!(end["data"]["result"], json!({"chunks": 1}));
    let letters = wait_entries(&mut conn, DLQ, cases.len());
    assert_eq!(letters.len(), cases.len(), "one dead letter per bad entry");
    let payloads = raw_field(&mut conn, DLQ, "payload");

    for ((job_id, fields, want), entry_id) in cases.iter().zip(&ids) {
        let dl = dead_letters::of_entry(&letters, entry_id);
        let what = format!("entry {entry_id} ({want})");
        assert_eq!(dl["reason"], "malformed job", "{what}: {dl:?}");
        assert!(dl["error"].contains(want), "{what}: {dl:?}");
        assert_eq!(dl["original_queue"], QUEUE, "{what}");
        assert_eq!(dl["deliveries"], "1", "{what}");
        assert_eq!(dl["worker_id"], "node-malformed", "{what}");
        assert_rfc3339_ms("moved_at", &dl["moved_at"]);
        // The payload is kept byte for byte (empty when there was none).
        let original = fields
            .iter()
            .find(|(k, _)| *k == b"payload")
            .map(|(_, v)| v.to_vec())
            .unwrap_or_default();
        let letter_id = letters
            .iter()
            .find(|(_, f)| f.get("original_message_id") == Some(entry_id))
            .map(|(id, _)| id.clone())
            .unwrap();
        assert_eq!(
            payloads.get(&letter_id).cloned().unwrap_or_default(),
            original,
            "{what}: payload changed"
        );
        match job_id {
            Some(job_id) => {
                assert_eq!(dl["jobId"], *job_id, "{what}");
                let error = sub.wait_for(job_id, "error", WAIT);
                assert_eq!(kinds_of(&sub, job_id), ["error"], "{what}");
                assert_eq!(error["data"]["recoverable"], false, "{what}: {error}");
                assert!(
                    error["data"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(want)),
                    "{what}: {error}"
                );
                let status = wait_status(&mut conn, job_id, "failed", WAIT);
                assert!(status["error"].contains(want), "{what}: {status:?}");
            }
            None => assert_eq!(dl.get("jobId").map(String::as_str).unwrap_or(""), ""),
        }
    }
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);
}

#[test]
fn deadline_exceeded_fails_the_job() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-deadline", &[]);
    let mut conn = redis.conn();

    let entry_id = xadd_job(
        &mut conn,
        QUEUE,
        "j-late",
        "echo",
        r#"{"timeout_ms":100,"sleep_ms":30000}"#,
    );
    // Timed from the start (not from the XADD: the worker may still be
    // starting up), against a 30 s sleep: only the deadline can end the job
    // this early, even on a loaded machine.
    sub.wait_for("j-late", "start", WAIT);
    let started = Instant::now();
    let error = sub.wait_for("j-late", "error", WAIT);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a 100 ms deadline took {took:?} to fail a job sleeping 30 s"
    );
    let letters = wait_entries(&mut conn, DLQ, 1);
    let dl = dead_letters::of_entry(&letters, &entry_id);
    assert_eq!(dl["reason"], "deadline exceeded");
    assert!(dl["error"].contains("100ms"), "{dl:?}");
    assert_eq!(error["data"]["recoverable"], false);
    assert_eq!(kinds_of(&sub, "j-late"), ["claimed", "start", "error"]);
    wait_status(&mut conn, "j-late", "failed", WAIT);
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

#[test]
fn job_cancelled_before_start_never_runs() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _w = worker(&redis, "node-precancel", &[]);
    let mut conn = redis.conn();

    redis::cmd("SET")
        .arg("job:cancelled:j-pre")
        .arg("1")
        .exec(&mut conn)
        .expect("SET cancel key");
    xadd_job(&mut conn, QUEUE, "j-pre", "echo", r#"{"chunks":2}"#);
    let cancelled = sub.wait_for("j-pre", "cancelled", WAIT);
    assert!(
        cancelled["data"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{cancelled}"
    );
    let status = wait_status(&mut conn, "j-pre", "cancelled", WAIT);
    assert!(!status.contains_key("error"), "{status:?}");
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);

    echo_barrier(&mut conn, &sub, QUEUE, "j-barrier");
    assert_eq!(kinds_of(&sub, "j-pre"), ["cancelled"], "it must not start");
    assert_eq!(
        xlen(&mut conn, DLQ),
        0,
        "a cancelled job is not dead-lettered"
    );
}

#[test]
fn running_job_is_cancelled_at_the_next_cancel_poll() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    // The slowest cancel poll allowed: the contract says "at least once a second".
    let _w = worker(&redis, "node-cancel", &["--cancel-poll", "1s"]);
    let mut conn = redis.conn();

    xadd_job(&mut conn, QUEUE, "j-long", "echo", r#"{"sleep_ms":30000}"#);
    sub.wait_for("j-long", "start", WAIT);
    let t0 = Instant::now();
    redis::cmd("SET")
        .arg("job:cancelled:j-long")
        .arg("1")
        .exec(&mut conn)
        .expect("SET cancel key");
    let cancelled = sub.wait_for("j-long", "cancelled", WAIT);
    let took = t0.elapsed();
    // One poll (at most 1 s) plus the time to settle and publish, with 3 s
    // of slack for a loaded 2-core machine: still far from the job's 30 s.
    assert!(
        took < Duration::from_secs(1 + 3),
        "cancel took {took:?} with a 1s cancel poll"
    );
    assert!(cancelled["data"]["reason"].is_string(), "{cancelled}");
    wait_status(&mut conn, "j-long", "cancelled", WAIT);
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);
    assert_eq!(kinds_of(&sub, "j-long"), ["claimed", "start", "cancelled"]);
    assert_eq!(
        xlen(&mut conn, DLQ),
        0,
        "a cancelled job is not dead-lettered"
    );
}

// ---------------------------------------------------------------------------
// The operator's commands
// ---------------------------------------------------------------------------

#[test]
fn submit_follow_prints_chunks_in_order_and_exits_with_the_outcome() {
    let redis = RedisServer::start();
    let _w = worker(&redis, "node-follow", &[]);

    let out = citadel(
        &redis,
        &[
            "submit",
            "--type",
            "echo",
            "--payload",
            r#"{"chunks":5}"#,
            "--follow",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n{\"chunks\":5}\n",
        "{out:?}"
    );

    let out = citadel(
        &redis,
        &[
            "submit",
            "--type",
            "echo",
            "--payload",
            r#"{"fail":"permanent"}"#,
            "--follow",
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("asked to fail (permanent)"), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");

    // A job the worker dead-letters as malformed ends the follow too.
    let out = citadel(&redis, &["submit", "--type", "teleport", "--follow"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("no handler for job type 'teleport'"),
        "{out:?}"
    );

    let mut conn = redis.conn();
    redis::cmd("SET")
        .arg("job:cancelled:j-follow-cancel")
        .arg("1")
        .exec(&mut conn)
        .expect("SET cancel key");
    let out = citadel(
        &redis,
        &[
            "submit",
            "--type",
            "echo",
            "--job-id",
            "j-follow-cancel",
            "--follow",
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cancelled"), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");

    let out = citadel(
        &redis,
        &["submit", "--type", "echo", "--payload", "[1]", "--follow"],
    );
    assert_eq!(out.code, Some(2), "a bad --payload is bad input: {out:?}");
    assert!(out.stderr.starts_with("citadel: "), "{out:?}");
}

#[test]
fn submit_without_follow_prints_the_job_id_and_enqueues_it() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();

    let out = citadel(
        &redis,
        &[
            "submit",
            "--type",
            "echo",
            "--payload",
            r#"{"chunks":2}"#,
            "--ray-id",
            "ray-s",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let job_id = out.stdout.trim();
    assert!(
        !job_id.is_empty() && out.stdout.lines().count() == 1,
        "{out:?}"
    );
    let entries = xrange_all(&mut conn, QUEUE);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let f = &entries[0].1;
    assert_eq!(f["jobId"], job_id);
    assert_eq!(f["type"], "echo");
    assert_eq!(f["payload"], r#"{"chunks":2}"#);
    assert_eq!(f["rayId"], "ray-s");
    assert_rfc3339_ms("enqueuedAt", &f["enqueuedAt"]);

    let out = citadel(&redis, &["submit", "--type", "echo", "--job-id", "my-job"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "my-job\n");
    let entries = xrange_all(&mut conn, QUEUE);
    assert_eq!(entries[1].1["jobId"], "my-job");
    assert_eq!(entries[1].1["payload"], "{}");
}

#[test]
fn submit_to_a_node_is_run_by_that_node() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let _other = worker(&redis, "node-other", &[]);

    let out = citadel(
        &redis,
        &[
            "submit", "--type", "echo", "--job-id", "j-node", "--node", "gpu-7",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let entries = xrange_all(&mut conn, "jobs:v1:node:gpu-7");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1["jobId"], "j-node");
    assert_eq!(xlen(&mut conn, QUEUE), 0, "not on the shared queue");

    let _w = worker(&redis, "gpu-7", &[]);
    let status = wait_status(&mut conn, "j-node", "completed", WAIT);
    assert_eq!(status["worker_id"], "gpu-7");
    wait_drained(&mut conn, "jobs:v1:node:gpu-7", GROUP, WAIT);
}

/// Dead letters made by a real worker: entries over its --max-job-size.
fn oversized_dead_letters(
    redis: &RedisServer,
    conn: &mut redis::Connection,
    jobs: &[&str],
) -> Vec<(String, HashMap<String, String>)> {
    let mut a = worker(redis, "node-small", &["--max-job-size", "300"]);
    let pad = "x".repeat(400);
    for job in jobs {
        xadd_fields(
            conn,
            QUEUE,
            &[
                ("jobId", job),
                ("type", "echo"),
                ("payload", &format!(r#"{{"chunks":1,"pad":"{pad}"}}"#)),
                ("enqueuedAt", "2026-01-20T10:00:00.000Z"),
                ("rayId", &format!("ray-{job}")),
            ],
        );
    }
    let letters = wait_entries(conn, DLQ, jobs.len());
    wait_drained(conn, QUEUE, GROUP, WAIT);
    a.sigterm();
    let status = a.wait_exit(WAIT).expect("worker A did not stop on SIGTERM");
    assert!(status.success(), "worker A exited with {status}");
    for (_, f) in &letters {
        assert_eq!(f["reason"], "malformed job", "{f:?}");
    }
    letters
}

#[test]
fn dlq_replay_runs_the_job_again() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let letters = oversized_dead_letters(&redis, &mut conn, &["j-r1", "j-r2", "j-r3"]);
    let entries_before = xrange_all(&mut conn, QUEUE);
    let letter = |job: &str| {
        letters
            .iter()
            .find(|(_, f)| f["jobId"] == job)
            .cloned()
            .unwrap_or_else(|| panic!("no dead letter of {job}: {letters:?}"))
    };
    let (id1, dl1) = letter("j-r1");

    let out = citadel(&redis, &["dlq", "list"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("dlq:v1:gpu-general: 3 dead letters"),
        "{out:?}"
    );
    for (id, _) in &letters {
        assert!(out.stdout.contains(id.as_str()), "{id} not listed: {out:?}");
    }
    assert!(out.stdout.contains("malformed job"), "{out:?}");

    let out = citadel(&redis, &["dlq", "show", &id1]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("reason: malformed job"), "{out:?}");
    assert!(out.stdout.contains("jobId: j-r1"), "{out:?}");
    assert!(out.stdout.contains("max-job-size"), "{out:?}");
    assert!(
        out.stdout.contains("\n  \"chunks\": 1,\n"),
        "the payload is pretty-printed: {out:?}"
    );

    let out = citadel(&redis, &["dlq", "replay", &id1]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&id1), "{out:?}");
    assert_eq!(xlen(&mut conn, DLQ), 2, "the dead letter is deleted");
    let entries = xrange_all(&mut conn, QUEUE);
    assert_eq!(entries.len(), entries_before.len() + 1);
    let replayed = &entries.last().unwrap().1;
    assert_eq!(
        replayed.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        set(&["jobId", "type", "payload", "enqueuedAt", "rayId"]),
        "{replayed:?}"
    );
    for k in ["jobId", "type", "payload", "enqueuedAt", "rayId"] {
        assert_eq!(replayed[k], dl1[k], "{k} changed on replay");
    }

    let sub = Subscriber::new(&redis, "stream:v1:*");
    let _b = worker(&redis, "node-big", &[]);
    let status = wait_status(&mut conn, "j-r1", "completed", WAIT);
    assert_eq!(status["worker_id"], "node-big");

    let out = citadel(&redis, &["dlq", "replay", "--all"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("replayed 2 dead letters"), "{out:?}");
    assert_eq!(xlen(&mut conn, DLQ), 0);
    for job in ["j-r2", "j-r3"] {
        let end = sub.wait_for(job, "end", WAIT);
        assert_eq!(end["rayId"], format!("ray-{job}"), "{end}");
        assert_eq!(end["data"]["result"]["chunks"], 1, "{end}");
    }
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);
}

/// `dlq replay --all` replays the dead letters there when it starts, each
/// once, even while a worker dead-letters the replayed jobs again (enough of
/// them that the replay takes several batches).
#[test]
fn dlq_replay_all_replays_only_the_dead_letters_present_at_start() {
    const N: usize = 250;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let names: Vec<String> = (0..N).map(|i| format!("j-p{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    oversized_dead_letters(&redis, &mut conn, &names);
    // A worker that dead-letters them again as soon as they are back.
    let _a = worker(&redis, "node-small-again", &["--max-job-size", "300"]);

    let out = citadel(&redis, &["dlq", "replay", "--all"]);
    assert_eq!(out.code, Some(0), "{:?}", out.stderr);
    assert_eq!(
        out.stdout.lines().last(),
        Some(format!("replayed {N} dead letters").as_str()),
        "each dead letter is replayed exactly once"
    );
    assert_eq!(out.stdout.lines().count(), N + 1);
    // Each comes back once more, as a new dead letter.
    let letters = wait_entries(&mut conn, DLQ, N);
    wait_drained(&mut conn, QUEUE, GROUP, WAIT);
    assert_eq!(letters.len(), N);
}

#[test]
fn dlq_purge_empties_the_dead_letters() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let _w = worker(&redis, "node-purge", &[]);
    for _ in 0..2 {
        xadd_fields(&mut conn, QUEUE, &[("type", "echo"), ("payload", "{}")]);
    }
    wait_entries(&mut conn, DLQ, 2);

    let out = citadel(&redis, &["dlq", "purge"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("purged 2 dead letters"), "{out:?}");
    assert_eq!(xlen(&mut conn, DLQ), 0);

    let out = citadel(&redis, &["dlq", "list"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("dlq:v1:gpu-general: 0 dead letters"),
        "{out:?}"
    );
}

#[test]
fn dlq_show_of_an_unknown_or_malformed_id_fails_clearly() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    // No dead-letter stream at all yet.
    let out = citadel(&redis, &["dlq", "show", "1-1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("no dead letter 1-1"), "{out:?}");
    let out = citadel(&redis, &["dlq", "show", "not-an-id"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("not-an-id"), "{out:?}");

    // With one.
    let _w = worker(&redis, "node-show", &[]);
    xadd_fields(&mut conn, QUEUE, &[("type", "echo"), ("payload", "{}")]);
    wait_entries(&mut conn, DLQ, 1);
    for (args, code, needle) in [
        (&["dlq", "show", "1-1"][..], 1, "no dead letter 1-1"),
        (&["dlq", "replay", "1-1"][..], 1, "no dead letter 1-1"),
        (
            &["dlq", "show", "not-an-id"][..],
            2,
            "'not-an-id' is not a stream entry ID",
        ),
        (
            &["dlq", "replay", "not-an-id"][..],
            2,
            "'not-an-id' is not a stream entry ID",
        ),
    ] {
        let out = citadel(&redis, args);
        assert_eq!(out.code, Some(code), "{args:?}: {out:?}");
        assert!(out.stderr.starts_with("citadel: "), "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:?}");
    }
    assert_eq!(xlen(&mut conn, DLQ), 1, "nothing was replayed or deleted");
}

// ---------------------------------------------------------------------------
// Usage errors, help, run-job
// ---------------------------------------------------------------------------

#[test]
fn bad_flags_and_bad_redis_url_exit_2_with_one_line() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        (&["work", "--bogus"], &[]),
        (&["work", "--concurrency", "zero"], &[]),
        (&["work", "--concurrency", "0"], &[]),
        (&["work", "--claim-idle", "5", "parsecs"], &[]),
        (&["work", "--claim-idle", "5 parsecs"], &[]),
        (&["work", "--redis-url", "notaurl"], &[]),
        (&["work"], &[("CITADEL_REDIS_URL", "notaurl")]),
        (&["work"], &[("CITADEL_CLAIM_IDLE", "soon")]),
        (&["frobnicate"], &[]),
        (&["dlq", "replay"], &[]),
        (&["dlq", "fly"], &[]),
        (&["submit", "--payload", "{}"], &[]),
    ];
    for (args, env) in cases {
        let mut cmd = citadel_cmd(args);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = run(cmd, None, WAIT);
        assert_eq!(out.code, Some(2), "{args:?} {env:?}: {out:?}");
        assert!(
            out.stderr.starts_with("citadel: ")
                && out.stderr.ends_with('\n')
                && out.stderr.lines().count() == 1,
            "{args:?} {env:?}: stderr must be one 'citadel: ' line: {:?}",
            out.stderr
        );
        assert_eq!(out.stdout, "", "{args:?} {env:?}");
    }

    let out = run(citadel_cmd(&["--help"]), None, WAIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    for cmd in ["work", "run-job", "submit", "dlq", "version"] {
        assert!(out.stdout.contains(cmd), "--help must list {cmd}: {out:?}");
    }

    let out = run(citadel_cmd(&["work", "--help"]), None, WAIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    for setting in [
        "redis-url",
        "queue",
        "group",
        "consumer",
        "node-name",
        "concurrency",
        "claim-idle",
        "max-deliveries",
        "max-retries",
        "retry-base",
        "retry-cap",
        "shutdown-grace",
        "block",
        "cancel-poll",
        "status-ttl",
        "dlq-maxlen",
        "max-job-size",
        "redis-timeout",
    ] {
        let env = format!("CITADEL_{}", setting.replace('-', "_").to_uppercase());
        assert!(
            out.stdout.contains(&format!("--{setting}")) && out.stdout.contains(&env),
            "work --help must name --{setting} and {env}"
        );
    }

    let out = run(citadel_cmd(&["version"]), None, WAIT);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout,
        format!("citadel {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_job_runs_a_job_without_redis() {
    // A Redis URL nobody listens on: run-job must not need it.
    let no_redis = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = citadel_cmd(args);
        cmd.env("CITADEL_REDIS_URL", "redis://127.0.0.1:1/");
        run(cmd, stdin, WAIT)
    };
    let job = r#"{"type":"echo","payload":{"chunks":2}}"#;
    let want = "chunk 0\nchunk 1\n{\"chunks\":2}\n";

    let out = no_redis(&["run-job", job], None);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, want);
    let out = no_redis(&["run-job"], Some(job));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, want);
    let out = no_redis(&["run-job", "-"], Some(job));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, want);

    for (bad, needle) in [
        ("{nope", "not valid JSON"),
        (
            r#"{"type":"teleport","payload":{}}"#,
            "no handler for job type 'teleport'",
        ),
        (r#"{"type":"echo","payload":[1]}"#, "must be a JSON object"),
        (r#"{"payload":{}}"#, "type"),
    ] {
        let out = no_redis(&["run-job", bad], None);
        assert_eq!(out.code, Some(2), "{bad}: {out:?}");
        assert!(
            out.stderr.starts_with("citadel: ") && out.stderr.contains(needle),
            "{bad}: {out:?}"
        );
    }

    let out = no_redis(
        &["run-job"],
        Some(r#"{"type":"echo","payload":{"fail":"permanent"}}"#),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("asked to fail (permanent)"), "{out:?}");
}
