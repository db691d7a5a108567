//! Chaos: many `echo` jobs through three `citadel work` processes on one
//! redis-server (AOF, `appendfsync everysec`) while workers are SIGKILLed and
//! restarted, Redis is restarted gracefully and SIGKILLed (AOF replay), and
//! Redis refuses writes (`maxmemory`) for a few seconds. A ledger built from
//! outside the agent then proves that no job was lost:
//!
//! - every job has a `completed` status hash or a dead letter (`lost=0`);
//! - each run of a job is counted from the echo run log
//!   (`CITADEL_TEST_ECHO_RUNS`, one line per run: job, pid, ms); a second run
//!   is explained only when the run before it was in a worker that was then
//!   SIGKILLed (`dup_killed`), or began near the Redis SIGKILL, which may
//!   lose up to the last second or two of writes by design
//!   (`dup_redis_kill`). Anything else fails: `dup_stalled` when the worker
//!   of the run before said, in its own log, that its lease renewal came
//!   late and that it lost that job's lease (it or Redis stalled past
//!   claim-idle: the machine was overloaded), `dup_unexplained` otherwise,
//!   which prints every worker's log lines about the job;
//! - the group's pending list is empty within claim-idle + 5 s of the last
//!   job's outcome;
//! - no job's captured events (a Pub/Sub subscriber that resubscribes after
//!   each Redis restart) have anything after `end`, except around the Redis
//!   SIGKILL (counted apart).
//!
//! One line of figures starting with `CHAOS` is printed. `chaos_short` (2 000
//! jobs, about a minute) runs in the test suite; `chaos_full` (`#[ignore]`,
//! `CHAOS_JOBS`, default 10 000) is what scripts/chaos.sh runs.
//! `CHAOS_SEED` replays a schedule.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use support::observe::pending_rows;
use support::{wait_until, worker_with_env, xrange_all, Citadel, RedisServer, Subscriber, POLL};

const QUEUE: &str = "jobs:v1:gpu-general";
const DLQ: &str = "dlq:v1:gpu-general";
const GROUP: &str = "workers";
const CLAIM_IDLE: Duration = Duration::from_secs(3);
const WORKERS: usize = 3;

/// A small xorshift generator: the schedule is replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// One run of a job, from the echo run log.
struct Run {
    pid: u32,
    ms: u64,
}

fn read_runs(path: &Path) -> HashMap<String, Vec<Run>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(job), Some(pid), Some(ms)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("bad run-log line {line:?}");
        };
        runs.entry(job.to_string()).or_default().push(Run {
            pid: pid.parse().expect("pid"),
            ms: ms.parse().expect("ms"),
        });
    }
    for list in runs.values_mut() {
        list.sort_by_key(|r| r.ms);
    }
    runs
}

fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// The chaos figures; `lost` and `dup_unexplained` must be 0.
#[derive(Debug, Default)]
struct Figures {
    jobs: usize,
    completed: usize,
    dead_lettered: usize,
    lost: usize,
    runs: usize,
    duplicates: usize,
    dup_killed: usize,
    dup_redis_kill: usize,
    dup_stalled: usize,
    dup_unexplained: usize,
    worker_kills: usize,
    restarts_at_once: usize,
    restarts_after_claim_idle: usize,
    redis_restarts: usize,
    oom_ms: u64,
    after_end: usize,
    after_end_redis_kill: usize,
    /// The same, read from the jobs' replayable `events:v1:{jobId}` streams.
    stream_after_end: usize,
    stream_after_end_redis_kill: usize,
    /// Completed jobs whose events stream has no `end`.
    stream_no_end: usize,
    drain_ms: u64,
    seconds: u64,
    seed: u64,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "CHAOS jobs={} completed={} dead_lettered={} lost={} duplicates={} \
             dup_killed={} dup_redis_kill={} dup_stalled={} dup_unexplained={} runs={} worker_kills={} \
             restarts_at_once={} restarts_after_claim_idle={} redis_restarts={} oom_ms={} \
             events_after_end={} events_after_end_redis_kill={} stream_after_end={} \
             stream_after_end_redis_kill={} stream_no_end={} drain_ms={} seconds={} seed={}",
            self.jobs,
            self.completed,
            self.dead_lettered,
            self.lost,
            self.duplicates,
            self.dup_killed,
            self.dup_redis_kill,
            self.dup_stalled,
            self.dup_unexplained,
            self.runs,
            self.worker_kills,
            self.restarts_at_once,
            self.restarts_after_claim_idle,
            self.redis_restarts,
            self.oom_ms,
            self.after_end,
            self.after_end_redis_kill,
            self.stream_after_end,
            self.stream_after_end_redis_kill,
            self.stream_no_end,
            self.drain_ms,
            self.seconds,
            self.seed,
        )
    }
}

struct Slot {
    name: String,
    proc: Option<Citadel>,
    restart_at: Option<Instant>,
}

struct Chaos {
    jobs: usize,
    concurrency: usize,
}

/// A connection, retried until the deadline (Redis may be restarting).
fn conn_retry(redis: &RedisServer) -> redis::Connection {
    wait_until("a Redis connection", Duration::from_secs(30), || {
        let client = redis::Client::open(redis.url()).ok()?;
        let c = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        Some(c)
    })
}

fn config_set(redis: &RedisServer, key: &str, value: &str) {
    let mut c = conn_retry(redis);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(&mut c)
        .unwrap_or_else(|e| panic!("CONFIG SET {key} {value}: {e}"));
}

/// Job ids whose status hash says `completed`.
fn completed_set(c: &mut redis::Connection, ids: &[String]) -> redis::RedisResult<HashSet<String>> {
    let mut done = HashSet::new();
    for chunk in ids.chunks(2000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HGET")
                .arg(format!("job:{id}:status"))
                .arg("status");
        }
        let replies: Vec<Option<String>> = pipe.query(c)?;
        for (id, s) in chunk.iter().zip(replies) {
            if s.as_deref() == Some("completed") {
                done.insert(id.clone());
            }
        }
    }
    Ok(done)
}

fn dead_lettered_set(c: &mut redis::Connection) -> HashSet<String> {
    xrange_all(c, DLQ)
        .into_iter()
        .filter_map(|(_, f)| f.get("jobId").cloned())
        .collect()
}

impl Chaos {
    fn run(&self) -> Figures {
        let t0 = Instant::now();
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| (now_ms() ^ (u64::from(std::process::id()) << 40)) | 1);
        let mut rng = Rng(seed);
        let mut fig = Figures {
            jobs: self.jobs,
            seed,
            ..Figures::default()
        };

        let mut redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let runs_path = redis.dir().join("echo-runs.log");
        let logs = std::env::var_os("CHAOS_KEEP_LOGS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| redis.dir().join("worker-logs"));
        let _ = std::fs::create_dir_all(&logs);
        let runs_env = runs_path.to_string_lossy().into_owned();
        let sub = Subscriber::new(&redis, "stream:v1:*");

        // Every job is enqueued (and fsynced, below) before any disruption.
        let ids: Vec<String> = (0..self.jobs).map(|i| format!("chaos-{i}")).collect();
        {
            let mut c = redis.conn();
            for chunk in ids.chunks(1000) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    let sleep = rng.range(0, 200);
                    let payload = if rng.range(0, 4) == 0 {
                        format!(r#"{{"sleep_ms":{sleep},"chunks":{}}}"#, rng.range(1, 5))
                    } else {
                        format!(r#"{{"sleep_ms":{sleep}}}"#)
                    };
                    pipe.cmd("XADD")
                        .arg(QUEUE)
                        .arg("*")
                        .arg("jobId")
                        .arg(id)
                        .arg("type")
                        .arg("echo")
                        .arg("payload")
                        .arg(payload)
                        .ignore();
                }
                let _: () = pipe.query(&mut c).expect("XADD the jobs");
            }
            // The AOF is fsynced once a second: a BGREWRITEAOF makes the
            // enqueued jobs durable before Redis is SIGKILLed later.
            let _: () = redis::cmd("BGREWRITEAOF")
                .query(&mut c)
                .expect("BGREWRITEAOF");
        }

        let concurrency = self.concurrency.to_string();
        let claim_idle = format!("{}s", CLAIM_IDLE.as_secs());
        let spawn = |redis: &RedisServer, name: &str| -> Citadel {
            let w = worker_with_env(
                redis,
                name,
                &[
                    "--concurrency",
                    &concurrency,
                    "--claim-idle",
                    &claim_idle,
                    "--shutdown-grace",
                    "2s",
                    "--redis-timeout",
                    "2s",
                    "--heartbeat-interval",
                    "0",
                ],
                &[("RUST_LOG", "debug"), ("CITADEL_TEST_ECHO_RUNS", &runs_env)],
            );
            w.wait_for_log("working: streams", Duration::from_secs(30));
            w
        };
        let mut slots: Vec<Slot> = (0..WORKERS)
            .map(|i| {
                let name = format!("chaos-w{i}");
                Slot {
                    proc: Some(spawn(&redis, &name)),
                    name,
                    restart_at: None,
                }
            })
            .collect();

        let mut killed: HashMap<u32, u64> = HashMap::new();
        let mut next_kill = Instant::now() + Duration::from_millis(rng.range(2000, 5000));
        let mut graceful_done = false;
        let mut oom_until: Option<Instant> = None;
        let mut oom_done = false;
        let mut redis_kill: Option<(u64, u64)> = None;
        // (unix ms, what happened): printed with an unexplained duplicate.
        let mut timeline: Vec<(u64, String)> = Vec::new();
        let n = self.jobs;
        let chaos_deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 10);
        // Disruptions stop when 90% of the jobs have started a run.
        loop {
            assert!(
                Instant::now() < chaos_deadline,
                "the chaos phase did not reach 90% of the jobs in time: {} runs so far; {}",
                count_lines(&runs_path),
                fig.line()
            );
            let started = count_lines(&runs_path);
            let chaos_on = started < n * 9 / 10;
            let now = Instant::now();
            for slot in slots.iter_mut() {
                if slot.restart_at.is_some_and(|t| t <= now) {
                    slot.restart_at = None;
                    slot.proc = Some(spawn(&redis, &slot.name));
                    timeline.push((
                        now_ms(),
                        format!("restarted {} after claim-idle", slot.name),
                    ));
                }
            }
            if !chaos_on && slots.iter().all(|s| s.proc.is_some()) && oom_until.is_none() {
                break;
            }
            if chaos_on && now >= next_kill {
                let alive: Vec<usize> = (0..WORKERS).filter(|&i| slots[i].proc.is_some()).collect();
                if alive.len() > 1 {
                    let i = alive[rng.range(0, alive.len() as u64 - 1) as usize];
                    let mut w = slots[i].proc.take().expect("alive");
                    killed.insert(w.pid(), now_ms());
                    timeline.push((
                        now_ms(),
                        format!("SIGKILL worker {} pid {}", slots[i].name, w.pid()),
                    ));
                    w.kill9();
                    keep_log(&logs, &w, &slots[i].name);
                    fig.worker_kills += 1;
                    if rng.range(0, 1) == 0 {
                        fig.restarts_at_once += 1;
                        slots[i].proc = Some(spawn(&redis, &slots[i].name));
                        timeline.push((now_ms(), format!("restarted {} at once", slots[i].name)));
                    } else {
                        fig.restarts_after_claim_idle += 1;
                        slots[i].restart_at =
                            Some(Instant::now() + CLAIM_IDLE + Duration::from_secs(1));
                    }
                }
                next_kill = Instant::now() + Duration::from_millis(rng.range(2000, 5000));
            }
            if chaos_on && !graceful_done && started >= n / 5 {
                graceful_done = true;
                timeline.push((now_ms(), "redis graceful restart begins".into()));
                redis.restart_graceful();
                timeline.push((now_ms(), "redis back".into()));
                fig.redis_restarts += 1;
            }
            if chaos_on && !oom_done && started >= n * 2 / 5 {
                oom_done = true;
                config_set(&redis, "maxmemory-policy", "noeviction");
                config_set(&redis, "maxmemory", "1");
                timeline.push((now_ms(), "redis full (maxmemory 1)".into()));
                oom_until = Some(Instant::now() + Duration::from_secs(3));
                fig.oom_ms = 3000;
            }
            if oom_until.is_some_and(|t| Instant::now() >= t) {
                oom_until = None;
                config_set(&redis, "maxmemory", "0");
                timeline.push((now_ms(), "redis has room again".into()));
            }
            if chaos_on && redis_kill.is_none() && started >= n * 3 / 5 && oom_until.is_none() {
                let at = now_ms();
                redis.restart();
                redis_kill = Some((at, now_ms()));
                timeline.push((at, "redis SIGKILL".into()));
                timeline.push((now_ms(), "redis back (AOF replayed)".into()));
                fig.redis_restarts += 1;
            }
            thread::sleep(Duration::from_millis(50));
        }

        // The ledger: every job completed or dead-lettered.
        let deadline = Duration::from_secs(120 + (n as u64) / 20);
        let mut c = conn_retry(&redis);
        let (done, dead) = wait_until("every job's outcome", deadline, || {
            let done = completed_set(&mut c, &ids).ok()?;
            let dead = dead_lettered_set(&mut c);
            (ids.iter().all(|id| done.contains(id) || dead.contains(id))).then_some((done, dead))
        });
        let all_settled = Instant::now();
        let drain_deadline = CLAIM_IDLE + Duration::from_secs(5);
        let drained = loop {
            if pending_rows(&mut c, QUEUE, GROUP).is_empty() {
                break true;
            }
            if all_settled.elapsed() > drain_deadline {
                break false;
            }
            thread::sleep(POLL);
        };
        fig.drain_ms = all_settled.elapsed().as_millis() as u64;
        fig.completed = done.len();
        fig.dead_lettered = dead.iter().filter(|id| !done.contains(*id)).count();
        fig.lost = ids
            .iter()
            .filter(|id| !done.contains(*id) && !dead.contains(*id))
            .count();

        // Duplicates, each explained by what happened to the run before it.
        for slot in &slots {
            if let Some(w) = &slot.proc {
                keep_log(&logs, w, &slot.name);
            }
        }
        let runs = read_runs(&runs_path);
        let near_redis_kill =
            |ms: u64| redis_kill.is_some_and(|(at, back)| ms + 3000 >= at && ms <= back + 1000);
        let mut redis_kill_jobs = HashSet::new();
        for (job, list) in &runs {
            fig.runs += list.len();
            for pair in list.windows(2) {
                let prev = &pair[0];
                fig.duplicates += 1;
                if killed.get(&prev.pid).is_some_and(|&k| k >= prev.ms) {
                    fig.dup_killed += 1;
                } else if near_redis_kill(prev.ms) {
                    fig.dup_redis_kill += 1;
                    redis_kill_jobs.insert(job.clone());
                } else if said_it_stalled(&logs, prev.pid, job) {
                    fig.dup_stalled += 1;
                } else {
                    fig.dup_unexplained += 1;
                    let (from, to) = (prev.ms.saturating_sub(10_000), pair[1].ms + 1000);
                    eprintln!(
                        "chaos: unexplained second run of {job}: runs (pid, ms) {:?}; around them: {:?}",
                        list.iter().map(|r| (r.pid, r.ms)).collect::<Vec<_>>(),
                        timeline
                            .iter()
                            .filter(|(t, _)| (from..=to).contains(t))
                            .collect::<Vec<_>>()
                    );
                    eprintln!("chaos: the workers' log lines about {job}:");
                    for line in log_lines_about(&logs, job) {
                        eprintln!("  {line}");
                    }
                }
            }
        }

        // Events: nothing after `end` on any job's channel.
        let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
        for (_, ev) in sub.messages() {
            let (Some(job), Some(kind)) = (
                ev.get("jobId").and_then(Json::as_str),
                ev.get("type").and_then(Json::as_str),
            ) else {
                continue;
            };
            by_job
                .entry(job.to_string())
                .or_default()
                .push(kind.to_string());
        }
        for (job, kinds) in &by_job {
            if let Some(pos) = kinds.iter().position(|k| k == "end") {
                if pos + 1 < kinds.len() {
                    if redis_kill_jobs.contains(job) {
                        fig.after_end_redis_kill += 1;
                    } else {
                        fig.after_end += 1;
                        eprintln!("chaos: events of {job} after end: {kinds:?}");
                    }
                }
            }
        }
        // The same from the durable copy, which no restart loses: each
        // completed job's events stream has an `end` and nothing after it.
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("XRANGE")
                    .arg(format!("events:v1:{id}"))
                    .arg("-")
                    .arg("+");
            }
            let streams: Vec<Vec<(String, HashMap<String, String>)>> =
                pipe.query(&mut c).expect("XRANGE the events streams");
            for (id, entries) in chunk.iter().zip(streams) {
                let kinds: Vec<String> = entries
                    .iter()
                    .filter_map(|(_, f)| serde_json::from_str::<Json>(f.get("event")?).ok())
                    .filter_map(|ev| Some(ev.get("type")?.as_str()?.to_owned()))
                    .collect();
                match kinds.iter().position(|k| k == "end") {
                    Some(pos) if pos + 1 < kinds.len() => {
                        if redis_kill_jobs.contains(id) {
                            fig.stream_after_end_redis_kill += 1;
                        } else {
                            fig.stream_after_end += 1;
                            eprintln!("chaos: events:v1:{id} after end: {kinds:?}");
                        }
                    }
                    None if done.contains(id) => {
                        fig.stream_no_end += 1;
                        eprintln!("chaos: events:v1:{id} of a completed job has no end: {kinds:?}");
                    }
                    _ => {}
                }
            }
        }
        fig.seconds = t0.elapsed().as_secs();
        let line = fig.line();
        {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        assert!(
            drained,
            "pending list not empty {drain_deadline:?} after the last outcome: {line}"
        );
        drop(slots);
        fig
    }
}

/// Each worker's log is copied to `dir` as `{name}-{pid}.log` when it is
/// killed and before the ledger is read: `CHAOS_KEEP_LOGS=DIR`, else the
/// run's temporary directory (for the duplicate check and its post-mortem).
fn keep_log(dir: &Path, w: &Citadel, name: &str) {
    let _ = std::fs::copy(w.log_path(), dir.join(format!("{name}-{}.log", w.pid())));
}

/// Whether the worker `pid` logged that its lease renewal came late and
/// that it lost the lease of `job` (so its run was stopped unsettled and
/// another worker ran the job again).
fn said_it_stalled(dir: &Path, pid: u32, job: &str) -> bool {
    let suffix = format!("-{pid}.log");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let lost = format!("(job {job})");
    entries.flatten().any(|f| {
        if !f.file_name().to_string_lossy().ends_with(&suffix) {
            return false;
        }
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        text.contains("after the last renewal")
            && text
                .lines()
                .any(|l| l.contains("lost the lease of entry") && l.contains(&lost))
    })
}

/// Whether `line` names `job` itself (`chaos-1`, not `chaos-12`).
fn names_job(line: &str, job: &str) -> bool {
    line.match_indices(job).any(|(at, _)| {
        !line[at + job.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Every line of every kept log that names `job` or a late renewal,
/// prefixed with the log's name.
fn log_lines_about(dir: &Path, job: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in entries.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        for line in text.lines() {
            if names_job(line, job) || line.contains("after the last renewal") {
                out.push(format!("{name}: {line}"));
            }
        }
    }
    out
}

#[track_caller]
fn assert_sound(fig: &Figures) {
    let line = fig.line();
    assert_eq!(fig.lost, 0, "jobs lost: {line}");
    assert_eq!(fig.dup_unexplained, 0, "unexplained duplicate runs: {line}");
    assert_eq!(
        fig.dup_stalled, 0,
        "duplicate runs of jobs whose worker stalled past claim-idle: {line}"
    );
    assert_eq!(fig.after_end, 0, "events after end: {line}");
    assert_eq!(
        fig.stream_after_end, 0,
        "events-stream entries after end: {line}"
    );
    assert_eq!(
        fig.stream_no_end, 0,
        "completed jobs without end in their stream: {line}"
    );
    assert_eq!(fig.redis_restarts, 2, "{line}");
    assert!(fig.worker_kills > 0, "{line}");
}

#[test]
fn chaos_short() {
    let fig = Chaos {
        jobs: 2000,
        concurrency: 2,
    }
    .run();
    assert_sound(&fig);
}

#[test]
#[ignore = "scripts/chaos.sh runs it (10 000 jobs by default, CHAOS_JOBS)"]
fn chaos_full() {
    let jobs = std::env::var("CHAOS_JOBS")
        .ok()
        .map(|s| s.parse().expect("CHAOS_JOBS must be a number"))
        .unwrap_or(10_000);
    let fig = Chaos {
        jobs,
        concurrency: 4,
    }
    .run();
    assert_sound(&fig);
}
