//! What a test looks at to judge a worker: its jobs' events, status hashes,
//! timestamps, the consumer group's pending list, Redis's own command counts,
//! its log lines. Read-only helpers over a connection, a [`Subscriber`] or a
//! log (except the barriers, which publish or enqueue to know where they
//! are); every wait has a deadline.

use super::{
    hgetall, pending_count, value_to_string, wait_until, xadd_job, Citadel, RedisServer,
    Subscriber, POLL,
};
use redis::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

pub fn event_type(ev: &Json) -> &str {
    ev.get("type").and_then(Json::as_str).unwrap_or_default()
}

/// The types of these events, in order.
pub fn kinds(events: &[Json]) -> Vec<&str> {
    events.iter().map(event_type).collect()
}

/// The types of a job's events, in the order they came.
pub fn kinds_of(sub: &Subscriber, job: &str) -> Vec<String> {
    sub.events_for(job)
        .iter()
        .map(|e| event_type(e).to_owned())
        .collect()
}

/// The job's events of one type, in order.
pub fn events_of(sub: &Subscriber, job: &str, kind: &str) -> Vec<Json> {
    sub.events_for(job)
        .into_iter()
        .filter(|ev| event_type(ev) == kind)
        .collect()
}

pub fn is_terminal(kind: &str) -> bool {
    matches!(kind, "end" | "error" | "cancelled")
}

/// Whether one of these events ends its job.
pub fn has_ended(events: &[Json]) -> bool {
    events.iter().any(|e| is_terminal(event_type(e)))
}

/// `2026-01-20T10:00:01.123Z`: RFC 3339, UTC, milliseconds (every timestamp
/// the agent writes: events, status hashes, dead letters, submitted entries).
#[track_caller]
pub fn assert_rfc3339_ms(what: &str, ts: &str) {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let ok = b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z';
    assert!(ok, "{what} is not RFC 3339 UTC with ms: {ts:?}");
}

/// Returns once every message published before this call has reached `sub`:
/// publishes a marker and waits for it (Redis delivers to one subscriber in
/// the order it ran the PUBLISHes). Lets a test assert that an event did NOT
/// come, without sleeping.
pub fn sync_subscriber(redis: &RedisServer, sub: &Subscriber) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let marker = format!(
        "marker-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let msg = serde_json::json!({"type": "marker", "jobId": marker}).to_string();
    redis::cmd("PUBLISH")
        .arg(format!("stream:v1:{marker}"))
        .arg(msg)
        .query::<i64>(&mut redis.conn())
        .expect("PUBLISH marker");
    sub.wait_for(&marker, "marker", Duration::from_secs(10));
}

/// Runs a trivial echo job `job` on `queue` and waits for its `end`: since
/// one settle thread publishes every event in order, anything the worker
/// published for jobs it took before has been published (and, Pub/Sub being
/// ordered per connection, received) by then. Stronger than
/// [`sync_subscriber`], which only knows what was published before the call.
pub fn echo_barrier(conn: &mut redis::Connection, sub: &Subscriber, queue: &str, job: &str) {
    xadd_job(conn, queue, job, "echo", "{}");
    sub.wait_for(job, "end", Duration::from_secs(10));
}

pub fn status(conn: &mut redis::Connection, job: &str) -> HashMap<String, String> {
    hgetall(conn, &format!("job:{job}:status"))
}

/// Waits until `job:{job}:status` has `status == want`; returns the hash.
pub fn wait_status(
    conn: &mut redis::Connection,
    job: &str,
    want: &str,
    timeout: Duration,
) -> HashMap<String, String> {
    wait_until(&format!("job {job} status {want}"), timeout, || {
        let h = status(conn, job);
        (h.get("status").map(String::as_str) == Some(want)).then_some(h)
    })
}

pub fn wait_drained(conn: &mut redis::Connection, stream: &str, group: &str, timeout: Duration) {
    wait_until(&format!("no entry pending on {stream}"), timeout, || {
        (pending_count(conn, stream, group) == 0).then_some(())
    });
}

/// One row of `XPENDING stream group - + n`.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: String,
    pub consumer: String,
    pub deliveries: i64,
}

pub fn pending_rows(conn: &mut redis::Connection, stream: &str, group: &str) -> Vec<Pending> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query(conn)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group}: {e}"));
    let Value::Array(rows) = reply else {
        return Vec::new();
    };
    rows.into_iter()
        .map(|row| match &row {
            Value::Array(cols) if cols.len() == 4 => Pending {
                id: value_to_string(&cols[0]),
                consumer: value_to_string(&cols[1]),
                deliveries: match cols[3] {
                    Value::Int(n) => n,
                    _ => panic!("unexpected XPENDING {stream} {group} row: {row:?}"),
                },
            },
            _ => panic!("unexpected XPENDING {stream} {group} row: {row:?}"),
        })
        .collect()
}

/// The lines of a citadel log that contain `needle`, at any level.
pub fn log_lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// Whether a citadel log line is at INFO or above: DEBUG and TRACE lines
/// (the per-request detail of `RUST_LOG=debug`) are not.
pub fn is_info_or_above(line: &str) -> bool {
    !line.contains(" DEBUG ") && !line.contains(" TRACE ")
}

/// The lines of a citadel log at INFO or above that contain `needle` (so
/// that a debug line saying the same never counts).
pub fn info_lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| is_info_or_above(l) && l.contains(needle))
        .collect()
}

/// Waits until at least `n` lines of `c`'s log at INFO or above contain
/// `needle`; panics with the log after `timeout`.
pub fn wait_info_lines(c: &Citadel, needle: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while info_lines_with(&c.log(), needle).len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {n} log lines with {needle:?}; log:\n{}",
            c.log()
        );
        thread::sleep(POLL);
    }
}

/// Asserts that exactly one line of `log` contains `needle`: a once-only
/// event logged once, not zero times nor once per retry (which `contains`
/// cannot tell apart).
#[track_caller]
pub fn assert_logged_once(log: &str, needle: &str) {
    let lines = log_lines_with(log, needle);
    assert_eq!(
        lines.len(),
        1,
        "{needle:?} must be logged exactly once; lines: {lines:#?}\n--- log ---\n{log}"
    );
}

/// `CONFIG RESETSTAT`: [`command_calls`] counts from now.
pub fn reset_command_calls(conn: &mut redis::Connection) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(conn)
        .expect("CONFIG RESETSTAT");
}

/// Calls per command since the last `CONFIG RESETSTAT`, from `INFO
/// commandstats` (`cmdstat_xreadgroup:calls=3,…` → "xreadgroup" → 3).
pub fn command_calls(conn: &mut redis::Connection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// A field of `INFO <section>`, e.g. `info_field(c, "replication", "role")`.
pub fn info_field(conn: &mut redis::Connection, section: &str, field: &str) -> Option<String> {
    let info: String = redis::cmd("INFO").arg(section).query(conn).ok()?;
    info.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// Wait until some client of `conn`'s server is blocked in a command (a
/// worker's reader in its `XREADGROUP … BLOCK`, when it is the only one):
/// what is enqueued next comes to it alone.
pub fn wait_blocked_reader(conn: &mut redis::Connection, timeout: Duration) {
    wait_until("a reader blocked in XREADGROUP", timeout, || {
        let n: u64 = info_field(conn, "clients", "blocked_clients")?
            .parse()
            .ok()?;
        (n >= 1).then_some(())
    });
}
