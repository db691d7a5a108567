//! Soak: many jobs through one `citadel work`, its RSS and open file
//! descriptors sampled from /proc every 500 ms; they must stay flat. Not in the
//! suite: both tests are `#[ignore]`d and scripts/soak.sh runs them.
//!
//! - `soak_echo`: `SOAK_JOBS` (default 1 000 000) `echo` jobs, fed in
//!   batches so the backlog stays under 20 000, the stream trimmed behind the
//!   readers, status hashes kept 30 s (`--status-ttl`) so Redis stays small.
//! - `soak_llm`: `SOAK_LLM_JOBS` (default 10 000) `llm_inference` jobs
//!   against the fake vLLM (tests/support/fake_engine.rs), `SOAK_LLM_TOKENS`
//!   (200) tokens each.
//!
//! Each prints one line `SOAK <name> jobs=… seconds=… rate=… window_s=…
//! rss_kb first=… last=… max=… fds first=… last=… max=…`: the largest sample
//! of the first window after the warm-up (from when a tenth of the jobs
//! was fed) and of the last window (each a minute, or a third of a run
//! shorter than three minutes), and of the whole run. It fails when the last
//! window's RSS exceeds the first's by more than 50 % + 8 MiB, or it holds
//! 16 more fds.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{wait_until, Citadel, RedisServer};

const QUIET: &[(&str, &str)] = &[("RUST_LOG", "warn")];
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

fn rss_kb(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// RSS and fd samples with the time each was taken.
#[derive(Default)]
struct Samples {
    /// When a tenth of the jobs had been fed: the first window starts here,
    /// after the warm-up (threads started, engine connections opened).
    warm: Duration,
    at: Vec<Duration>,
    rss: Vec<u64>,
    fds: Vec<u64>,
}

impl Samples {
    fn take(&mut self, pid: u32, t0: Instant) {
        self.at.push(t0.elapsed());
        self.rss.push(rss_kb(pid));
        self.fds.push(open_fds(pid));
    }

    /// The window compared at each end: a minute, or a third of a run
    /// (after the warm-up) shorter than three minutes.
    fn window(&self) -> Duration {
        let end = *self.at.last().expect("samples");
        Duration::from_secs(60).min(end.saturating_sub(self.warm) / 3)
    }

    /// Largest of `v` over the first window after the warm-up and over the
    /// last window, and overall.
    fn windows(&self, v: &[u64]) -> (u64, u64, u64) {
        let end = *self.at.last().expect("samples");
        let w = self.window();
        let mut first = 0;
        let mut last = 0;
        for (t, x) in self.at.iter().zip(v) {
            if *t >= self.warm && *t <= self.warm + w {
                first = first.max(*x);
            }
            if *t + w >= end {
                last = last.max(*x);
            }
        }
        (first, last, v.iter().copied().max().unwrap_or(0))
    }

    fn report(&self, name: &str, jobs: usize, secs: f64) {
        let (r1, r2, rmax) = self.windows(&self.rss);
        let (f1, f2, fmax) = self.windows(&self.fds);
        let line = format!(
            "SOAK {name} jobs={jobs} seconds={secs:.0} rate={:.0}/s samples={} window_s={} \
             rss_kb first={r1} last={r2} max={rmax} fds first={f1} last={f2} max={fmax}",
            jobs as f64 / secs,
            self.at.len(),
            self.window().as_secs()
        );
        {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        assert!(r2 <= r1 + r1 / 2 + 8 * 1024, "RSS grew: {line}");
        assert!(f2 <= f1 + 16, "fds grew: {line}");
    }
}

fn redis_for_soak() -> RedisServer {
    // A soak measures the agent, not the disk: no AOF.
    RedisServer::start_with(&["--appendonly", "no"])
}

/// Where the group stands on `stream`.
struct Progress {
    /// Every entry added so far was delivered (last-delivered-id is the
    /// stream's last-generated-id).
    drained: bool,
    pending: u64,
    /// `entries-read` (Redis's estimate: only paces the feeding).
    read: u64,
    /// Entries below this id are delivered and acked: safe to trim.
    trim_below: String,
}

fn info_map(v: redis::Value) -> HashMap<String, redis::Value> {
    match v {
        redis::Value::Map(kv) => kv
            .into_iter()
            .map(|(k, v)| (support::value_to_string(&k), v))
            .collect(),
        redis::Value::Array(flat) => flat
            .chunks(2)
            .map(|p| (support::value_to_string(&p[0]), p[1].clone()))
            .collect(),
        _ => HashMap::new(),
    }
}

fn progress(c: &mut redis::Connection, stream: &str) -> Option<Progress> {
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(c)
        .ok()?;
    let g = info_map(groups.into_iter().next()?);
    let s = info_map(
        redis::cmd("XINFO")
            .arg("STREAM")
            .arg(stream)
            .query(c)
            .ok()?,
    );
    let text = |m: &HashMap<String, redis::Value>, k: &str| m.get(k).map(support::value_to_string);
    let int = |k: &str| match g.get(k) {
        Some(redis::Value::Int(n)) => *n as u64,
        _ => 0,
    };
    let delivered = text(&g, "last-delivered-id")?;
    let pending = int("pending");
    // XPENDING's summary: [count, smallest id, largest id, consumers].
    let summary: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("workers")
        .query(c)
        .ok()?;
    let trim_below = match summary.get(1) {
        Some(v @ redis::Value::BulkString(_)) => support::value_to_string(v),
        _ => delivered.clone(),
    };
    Some(Progress {
        drained: text(&s, "last-generated-id")? == delivered,
        pending,
        read: int("entries-read"),
        trim_below,
    })
}

/// Feeds `jobs` entries (made by `entry`) to `stream` in batches while the
/// backlog is under `backlog`, sampling `pid` every 500 ms, until every entry
/// is read and acked. Returns the samples and the seconds taken.
fn burn(
    redis: &RedisServer,
    pid: u32,
    stream: &str,
    jobs: usize,
    backlog: usize,
    entry: impl Fn(usize) -> (String, &'static str, String),
) -> (Samples, f64) {
    let mut c = redis.conn();
    wait_until("the worker's group", Duration::from_secs(10), || {
        progress(&mut c, stream)
    });
    let t0 = Instant::now();
    let mut samples = Samples::default();
    samples.take(pid, t0);
    let mut next_sample = t0 + SAMPLE_EVERY;
    let mut sent = 0usize;
    loop {
        let p = progress(&mut c, stream).expect("XINFO GROUPS");
        if sent == jobs && p.drained && p.pending == 0 {
            break;
        }
        let read = p.read as usize;
        if sent < jobs && (p.drained || sent - read.min(sent) < backlog) {
            let n = (jobs - sent).min(5000);
            let mut pipe = redis::pipe();
            for i in sent..sent + n {
                let (id, kind, payload) = entry(i);
                pipe.cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("jobId")
                    .arg(id)
                    .arg("type")
                    .arg(kind)
                    .arg("payload")
                    .arg(payload)
                    .ignore();
            }
            // Keep the stream short: what is below the oldest pending entry
            // (or the last delivered one) is read and acked.
            pipe.cmd("XTRIM")
                .arg(stream)
                .arg("MINID")
                .arg("~")
                .arg(&p.trim_below)
                .ignore();
            pipe.exec(&mut c).expect("XADD a batch");
            sent += n;
            if sent >= jobs / 10 && samples.warm.is_zero() {
                samples.warm = t0.elapsed();
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        if Instant::now() >= next_sample {
            samples.take(pid, t0);
            next_sample += SAMPLE_EVERY;
        }
    }
    samples.take(pid, t0);
    (samples, t0.elapsed().as_secs_f64())
}

#[test]
#[ignore = "scripts/soak.sh runs it (SOAK_JOBS, default 1 000 000)"]
fn soak_echo() {
    let jobs = env_count("SOAK_JOBS", 1_000_000);
    let redis = redis_for_soak();
    let w = Citadel::work(
        &redis,
        &[
            "--node-name",
            "soak",
            "--concurrency",
            "16",
            "--status-ttl",
            "30s",
            "--heartbeat-interval",
            "0",
        ],
        QUIET,
    );
    let (samples, secs) = burn(&redis, w.pid(), "jobs:v1:gpu-general", jobs, 20_000, |i| {
        (format!("soak-{i}"), "echo", r#"{"chunks":1}"#.to_owned())
    });
    samples.report("echo", jobs, secs);
}

#[test]
#[ignore = "scripts/soak.sh runs it (SOAK_LLM_JOBS, default 10 000)"]
fn soak_llm() {
    use support::fake_engine::{FakeEngine, Reply};
    let jobs = env_count("SOAK_LLM_JOBS", 10_000);
    let tokens = env_count("SOAK_LLM_TOKENS", 200);
    let engine = FakeEngine::always(Reply::sse().generate(Arc::new(move |write| {
        for i in 0..tokens {
            let event = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}},\"finish_reason\":null}}]}}\n\n"
            );
            write(event.as_bytes())?;
        }
        write(b"data: [DONE]\n\n")
    })));
    let redis = redis_for_soak();
    let w = Citadel::work(
        &redis,
        &[
            "--node-name",
            "soak-llm",
            "--queue",
            "jobs:v1:llm",
            "--concurrency",
            "16",
            "--status-ttl",
            "30s",
            "--heartbeat-interval",
            "0",
            "--vllm-url",
            &engine.url(),
        ],
        QUIET,
    );
    let payload = r#"{"model":"m","messages":[{"role":"user","content":"go"}]}"#;
    let (samples, secs) = burn(&redis, w.pid(), "jobs:v1:llm", jobs, 2_000, |i| {
        (format!("soak-llm-{i}"), "llm_inference", payload.to_owned())
    });
    samples.report("llm", jobs, secs);
    // Each request was answered: the engine saw every job.
    assert!(
        engine.requests().len() >= jobs,
        "{} requests",
        engine.requests().len()
    );
}
