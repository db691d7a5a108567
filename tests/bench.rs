//! Benchmarks of `citadel work` against a real redis-server. Not tests: each
//! is `#[ignore]`d and prints numbers; `scripts/bench.sh` runs them on a
//! release build. Targets (2 cores, Redis on the same machine): burn-down
//! ≥ 40 000 jobs/s with the full contract, pickup p50 ≤ 0.3 ms and
//! p99 ≤ 2 ms, idle RSS ≤ 8 MiB.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{wait_until, Citadel, RedisServer};

const QUIET: &[(&str, &str)] = &[("RUST_LOG", "warn")];

/// The harness's Redis fsyncs every write (for the crash tests); a benchmark
/// measures the agent, not the disk.
fn fast_redis() -> RedisServer {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .exec(&mut c)
        .unwrap();
    redis
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn group_done(c: &mut redis::Connection, stream: &str, total: usize) -> bool {
    let info: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(c)
        .unwrap_or_default();
    info.first().is_some_and(|g| {
        let int = |k: &str| match g.get(k) {
            Some(redis::Value::Int(n)) => *n as usize,
            _ => usize::MAX,
        };
        int("pending") == 0 && int("entries-read") == total
    })
}

fn group_exists(c: &mut redis::Connection, stream: &str) -> Option<()> {
    let info: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(c)
        .unwrap_or_default();
    (!info.is_empty()).then_some(())
}

#[test]
#[ignore]
fn bench_idle_rss() {
    let redis = fast_redis();
    let w = Citadel::work(
        &redis,
        &["--node-name", "idle", "--concurrency", "16"],
        QUIET,
    );
    let mut c = redis.conn();
    wait_until("the worker's group", Duration::from_secs(10), || {
        group_exists(&mut c, "jobs:v1:node:idle")
    });
    std::thread::sleep(Duration::from_secs(1)); // let it settle into its idle loop
    let rss = proc_status(w.pid(), "VmRSS:");
    println!("idle RSS: {:.1} MiB (target ≤ 8 MiB)", rss as f64 / 1024.0);
}

#[test]
#[ignore]
fn bench_burn_down() {
    let total: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let concurrency = std::env::var("BENCH_CONCURRENCY").unwrap_or_else(|_| "64".into());
    let redis = fast_redis();
    let mut c = redis.conn();
    let stream = "jobs:v1:bench";
    let t = Instant::now();
    for batch in 0..total.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for i in batch * 1000..((batch + 1) * 1000).min(total) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("jobId")
                .arg(format!("b-{i}"))
                .arg("type")
                .arg("echo")
                .arg("payload")
                .arg(r#"{"n":1}"#)
                .ignore();
        }
        pipe.exec(&mut c).unwrap();
    }
    println!(
        "enqueued {total} echo jobs in {:.2}s",
        t.elapsed().as_secs_f64()
    );

    let t0 = Instant::now();
    let w = Citadel::work(
        &redis,
        &[
            "--queue",
            stream,
            "--node-name",
            "bench",
            "--concurrency",
            &concurrency,
        ],
        QUIET,
    );
    wait_until("the burn-down", Duration::from_secs(600), || {
        group_done(&mut c, stream, total).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(w.pid());
    let peak = proc_status(w.pid(), "VmHWM:");
    let done: usize = (0..total)
        .step_by((total / 100).max(1))
        .filter(|i| {
            let s: Option<String> = redis::cmd("HGET")
                .arg(format!("job:b-{i}:status"))
                .arg("status")
                .query(&mut c)
                .unwrap();
            s.as_deref() == Some("completed")
        })
        .count();
    assert_eq!(
        done,
        total.div_ceil((total / 100).max(1)),
        "sampled status hashes say completed"
    );
    println!(
        "burn-down: {total} jobs in {secs:.2}s = {:.0} jobs/s (concurrency {concurrency}; target ≥ 40000); \
         agent CPU {cpu:.2}s ({:.0}% of one core); peak RSS {:.1} MiB",
        total as f64 / secs,
        100.0 * cpu / secs,
        peak as f64 / 1024.0
    );
}

#[test]
#[ignore]
fn bench_pickup_latency() {
    let count = 2000;
    let redis = fast_redis();
    let _w = Citadel::work(
        &redis,
        &[
            "--queue",
            "jobs:v1:lat",
            "--node-name",
            "lat",
            "--concurrency",
            "8",
        ],
        QUIET,
    );
    let mut c = redis.conn();
    wait_until("the worker's group", Duration::from_secs(10), || {
        group_exists(&mut c, "jobs:v1:lat")
    });

    // Receipt time of each job's `start` event.
    let starts: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = {
        let (starts, stop, url) = (starts.clone(), stop.clone(), redis.url());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ps = conn.as_pubsub();
            ps.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            ps.psubscribe("stream:v1:*").unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let Ok(msg) = ps.get_message() else { continue };
                let at = Instant::now();
                let text: String = msg.get_payload().unwrap_or_default();
                if text.contains(r#""type":"start""#) {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    starts
                        .lock()
                        .unwrap()
                        .insert(v["jobId"].as_str().unwrap().to_owned(), at);
                }
            }
        })
    };
    ready_rx.recv().unwrap();

    let mut enqueued = Vec::with_capacity(count);
    let every = Duration::from_micros(2000); // 500 jobs/s
    let t0 = Instant::now();
    for i in 0..count {
        let due = t0 + every * i as u32;
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let id = format!("l-{i}");
        let at = Instant::now();
        redis::cmd("XADD")
            .arg("jobs:v1:lat")
            .arg("*")
            .arg("jobId")
            .arg(&id)
            .arg("type")
            .arg("echo")
            .arg("payload")
            .arg("{}")
            .exec(&mut c)
            .unwrap();
        enqueued.push((id, at));
    }
    wait_until("every start event", Duration::from_secs(60), || {
        (starts.lock().unwrap().len() >= count).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let starts = starts.lock().unwrap();
    let mut lat: Vec<f64> = enqueued
        .iter()
        .map(|(id, at)| starts[id].duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "pickup (XADD sent → start event received), {count} jobs at 500/s: p50 {:.3} ms, p99 {:.3} ms, \
         max {:.3} ms (targets p50 ≤ 0.3 ms, p99 ≤ 2 ms)",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
