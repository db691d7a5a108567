//! Benchmarks of `citadel work` against a real redis-server. Not tests: each
//! is `#[ignore]`d and prints numbers; `scripts/bench.sh` runs them on a
//! release build. Targets (2 cores, Redis on the same machine, issue 14):
//! burn-down with the full contract ≥ 2× BullMQ (concurrency 50, same run)
//! at `--concurrency` 8 and 64, Redis ≤ 5 µs CPU per job; pickup p50
//! ≤ 0.3 ms and p99 ≤ 0.6 ms; idle < 0.5 % of a core, ~2 Redis commands/s,
//! RSS ≤ 8 MiB (≤ 32 MiB at 64 jobs in flight); llm_inference streaming:
//! paced, engine write → chunk event p99 ≤ 1 ms and ≤ 5 µs agent CPU per
//! token; unpaced ≥ 500 000 tokens/s.

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

/// Context switches (voluntary + involuntary) of every live thread of a
/// process so far: each is a thread that slept on a socket, a lock or a
/// channel and was woken, the agent's main cost per job on this machine.
fn context_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    tasks
        .map(|t| {
            let text = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
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
    // Idle cost over a window: the agent's CPU and the commands it sends.
    let secs: u64 = std::env::var("BENCH_IDLE_SECS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let ns_cpu = |pid| cpu_by_thread(pid).iter().map(|(_, s)| s).sum::<f64>();
    let (cpu0, before) = (ns_cpu(w.pid()), redis_usage(&mut c));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let calls = redis_usage(&mut c).calls;
    let window = t0.elapsed().as_secs_f64();
    let cpu = ns_cpu(w.pid()) - cpu0;
    let mut sent: Vec<(String, u64)> = calls
        .into_iter()
        .filter(|(name, _)| name != "info")
        .map(|(name, n)| {
            let was = before.calls.get(&name).copied().unwrap_or(0);
            (name, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    sent.sort_by_key(|s| std::cmp::Reverse(s.1));
    let total: u64 = sent.iter().map(|(_, n)| n).sum();
    println!(
        "idle CPU and Redis over {window:.0}s: agent {:.2} % of one core (target < 0.5 %), \
         {:.2} Redis commands/s (target ~2) [{}]",
        100.0 * cpu / window,
        total as f64 / window,
        sent.iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// What one burn-down cost: wall time, the consumer's CPU, and what its
/// own redis-server spent (INFO read before and after).
struct Burn {
    jobs_per_s: f64,
    redis: RedisCost,
    /// The consumer's own CPU per job in µs (citadel's agent, or BullMQ's
    /// node process): with Redis's, what a job costs the machine.
    worker_us_per_job: f64,
    /// The agent's peak RSS in MiB and its context switches per job
    /// (citadel's only).
    agent: Option<(f64, f64)>,
}

/// What Redis has used so far, from one `INFO`.
struct Usage {
    /// CPU seconds (user + system).
    cpu: f64,
    /// Calls per command (those run inside scripts included).
    calls: HashMap<String, u64>,
    /// `used_memory`, bytes.
    memory: f64,
}

fn redis_usage(c: &mut redis::Connection) -> Usage {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .arg("memory")
        .query(c)
        .unwrap();
    let mut cpu = 0.0;
    let mut calls = HashMap::new();
    let mut memory = None;
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            cpu += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("used_memory:") {
            memory = v.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("cmdstat_") {
            let (name, stats) = rest.split_once(':').unwrap_or((rest, ""));
            let n = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), n);
        }
    }
    let memory = memory.expect("INFO memory has used_memory");
    Usage { cpu, calls, memory }
}

/// What `total` jobs cost Redis since `before`, per job.
struct RedisCost {
    /// CPU, µs.
    us: f64,
    commands: f64,
    /// Commands by name, most first.
    by_command: Vec<(String, f64)>,
    /// What a finished job left in Redis's memory, bytes (`used_memory`):
    /// citadel's status hash and events stream, BullMQ's completed job.
    bytes: f64,
}

fn redis_cost(c: &mut redis::Connection, before: &Usage, total: usize) -> RedisCost {
    let now = redis_usage(c);
    let per_job = |x: f64| x / total as f64;
    let mut by: Vec<(String, f64)> = now
        .calls
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, n)| {
            let was = before.calls.get(name).copied().unwrap_or(0);
            (name.clone(), per_job((n - was) as f64))
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    RedisCost {
        us: per_job((now.cpu - before.cpu) * 1e6),
        commands: by.iter().map(|(_, n)| n).sum(),
        by_command: by,
        bytes: per_job(now.memory - before.memory),
    }
}

/// `total` echo jobs pre-enqueued, then burnt down by one `citadel work`
/// with the full contract (events, status hash, ack), and `extra` flags.
fn citadel_burn(total: usize, concurrency: &str, extra: &[&str]) -> Burn {
    let redis = fast_redis();
    let mut c = redis.conn();
    let stream = "jobs:v1:bench";
    fill(&mut c, stream, "b", total);
    let before = redis_usage(&mut c);
    let t0 = Instant::now();
    let mut args = vec![
        "--queue",
        stream,
        "--node-name",
        "bench",
        "--concurrency",
        concurrency,
    ];
    args.extend_from_slice(extra);
    let w = Citadel::work(&redis, &args, QUIET);
    wait_until("the burn-down", Duration::from_secs(600), || {
        group_done(&mut c, stream, total).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    let cost = redis_cost(&mut c, &before, total);
    let cpu = cpu_seconds(w.pid());
    let peak = proc_status(w.pid(), "VmHWM:");
    let switches = context_switches(w.pid());
    let step = (total / 100).max(1);
    let done = (0..total)
        .step_by(step)
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
        total.div_ceil(step),
        "sampled status hashes say completed"
    );
    Burn {
        jobs_per_s: total as f64 / secs,
        redis: cost,
        worker_us_per_job: cpu * 1e6 / total as f64,
        agent: Some((peak as f64 / 1024.0, switches as f64 / total as f64)),
    }
}

/// The same burn-down by BullMQ (bench/, pinned in its lock file;
/// scripts/bench.sh runs `npm ci` there), on its own redis-server.
fn bullmq_burn(total: usize, concurrency: &str) -> Burn {
    let redis = fast_redis();
    let mut c = redis.conn();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/bullmq_burn.js");
    let node = |args: &[&str]| {
        let out = std::process::Command::new("node")
            .arg(script)
            .args(args)
            .output()
            .expect("running node (BullMQ peer): is node installed?");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "BullMQ peer {args:?} failed (run `npm ci` in bench/): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let port = redis.port().to_string();
    let n = total.to_string();
    node(&["enqueue", &port, &n]);
    let before = redis_usage(&mut c);
    let out = node(&["work", &port, &n, concurrency]);
    let cost = redis_cost(&mut c, &before, total);
    // `bullmq: N jobs in S s, cpu C s`
    let words: Vec<&str> = out.split_whitespace().collect();
    let number = |after: &str| -> f64 {
        words
            .iter()
            .position(|w| *w == after)
            .and_then(|i| words.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected BullMQ peer output: {out}"))
    };
    let (secs, cpu) = (number("in"), number("cpu"));
    Burn {
        jobs_per_s: total as f64 / secs,
        redis: cost,
        worker_us_per_job: cpu * 1e6 / total as f64,
        agent: None,
    }
}

/// Median and min–max of one figure over the rounds.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Burn-down of `BENCH_JOBS` [100 000] pre-enqueued no-op echo jobs by
/// citadel at each of `BENCH_CONCURRENCY` [8,64], then at the last of them
/// without the replayable events stream (`--events-stream=false`: what
/// PROTOCOL §7 costs), and by BullMQ at `BENCH_BULLMQ_CONCURRENCY` [50]
/// (`BENCH_PEERS=0`: citadel only), each on its own redis-server,
/// `BENCH_ROUNDS` [3] interleaved rounds; prints medians with min–max, and
/// citadel's ratio to BullMQ.
#[test]
#[ignore]
fn bench_burn_down() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let total: usize = env("BENCH_JOBS", "100000").parse().unwrap();
    let rounds: usize = env("BENCH_ROUNDS", "3").parse().unwrap();
    let bull_conc = env("BENCH_BULLMQ_CONCURRENCY", "50");
    let mut systems: Vec<(String, Box<dyn Fn() -> Burn>)> = Vec::new();
    let concurrencies: Vec<String> = env("BENCH_CONCURRENCY", "8,64")
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    for conc in &concurrencies {
        let conc = conc.clone();
        systems.push((
            format!("citadel --concurrency {conc}"),
            Box::new(move || citadel_burn(total, &conc, &[])),
        ));
    }
    if let Some(conc) = concurrencies.last().cloned() {
        systems.push((
            format!("citadel --concurrency {conc} --events-stream=false"),
            Box::new(move || citadel_burn(total, &conc, &["--events-stream=false"])),
        ));
    }
    let peers = env("BENCH_PEERS", "1") != "0";
    if peers {
        let conc = bull_conc.clone();
        systems.push((
            format!("BullMQ 6.7 concurrency {bull_conc}"),
            Box::new(move || bullmq_burn(total, &conc)),
        ));
    }
    let mut runs: Vec<Vec<Burn>> = systems.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, run)) in systems.iter().enumerate() {
            let b = run();
            println!(
                "burn-down round {round}: {name}: {:.0} jobs/s, Redis {:.1} µs/job, {:.2} commands/job, \
                 {:.0} bytes/job left in Redis, worker {:.1} µs/job (with Redis's {:.1}){}",
                b.jobs_per_s,
                b.redis.us,
                b.redis.commands,
                b.redis.bytes,
                b.worker_us_per_job,
                b.worker_us_per_job + b.redis.us,
                b.agent.map_or(String::new(), |(mib, cs)| format!(
                    ", {cs:.2} context switches/job, peak RSS {mib:.1} MiB"
                ))
            );
            runs[i].push(b);
        }
    }
    // Medians of each system's rounds: jobs/s, Redis µs/job, and what a
    // job cost the machine (the consumer's CPU and Redis's).
    let medians = |rs: &[Burn]| {
        (
            spread(rs.iter().map(|b| b.jobs_per_s).collect()).0,
            spread(rs.iter().map(|b| b.redis.us).collect()).0,
            spread(
                rs.iter()
                    .map(|b| b.worker_us_per_job + b.redis.us)
                    .collect(),
            )
            .0,
        )
    };
    let bull = peers.then(|| medians(runs.last().unwrap()));
    for ((name, _), rs) in systems.iter().zip(&runs) {
        let (j, jlo, jhi) = spread(rs.iter().map(|b| b.jobs_per_s).collect());
        let (u, ulo, uhi) = spread(rs.iter().map(|b| b.redis.us).collect());
        let (w, wlo, whi) = spread(rs.iter().map(|b| b.worker_us_per_job).collect());
        let (m, _, _) = spread(rs.iter().map(|b| b.redis.bytes).collect());
        let (_, _, machine) = medians(rs);
        let last = rs.last().unwrap();
        let by: Vec<String> = last
            .redis
            .by_command
            .iter()
            .take(12)
            .map(|(c, n)| format!("{c} {n:.2}"))
            .collect();
        let vs = match (bull, name.starts_with("citadel")) {
            (Some((bj, bu, bm)), true) => format!(
                "; {:.2}× BullMQ's jobs/s (target ≥ 2×), {:.2}× its Redis µs/job, \
                 {:.2}× its CPU per job (worker + Redis)",
                j / bj,
                u / bu,
                machine / bm
            ),
            _ => String::new(),
        };
        println!(
            "burn-down {total} jobs, {name}: {j:.0} jobs/s ({jlo:.0}–{jhi:.0}), \
             Redis {u:.1} µs/job ({ulo:.1}–{uhi:.1}; target ≤ 5), worker {w:.1} µs/job \
             ({wlo:.1}–{whi:.1}), worker + Redis {machine:.1} µs/job, {m:.0} bytes/job left \
             in Redis, {:.2} commands/job [{}]{vs}",
            last.redis.commands,
            by.join(", ")
        );
    }
}

#[test]
#[ignore]
fn bench_pickup_latency() {
    let count = 2000;
    let redis = fast_redis();
    let w = Citadel::work(
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
    let before = cpu_by_thread(w.pid());
    let ours = pickup(&redis, "jobs:v1:lat", count);
    let after = cpu_by_thread(w.pid());
    // The agent's CPU per job, by thread (its own work on top of the floor).
    let per_job: Vec<String> = after
        .iter()
        .map(|(name, s)| {
            let was = before.iter().find(|(n, _)| n == name).map_or(0.0, |b| b.1);
            (name, (s - was) * 1e6 / count as f64)
        })
        .filter(|(_, us)| *us >= 0.5)
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    // The floor on this machine, in the same run: a consumer that does
    // nothing but a blocking read and one PUBLISH of `start` per job (no
    // cancel check, no status, no events stream, no ack), on its own
    // redis-server.
    let redis = fast_redis();
    let mut c = redis.conn();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("jobs:v1:floor")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .exec(&mut c)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let floor_consumer = {
        let (stop, url) = (stop.clone(), redis.url());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            while !stop.load(Ordering::SeqCst) {
                let reply: redis::Value = redis::cmd("XREADGROUP")
                    .arg(&["GROUP", "g", "floor", "COUNT", "1", "BLOCK", "200", "NOACK"])
                    .arg(&["STREAMS", "jobs:v1:floor", ">"])
                    .query(&mut conn)
                    .unwrap();
                if let Some(id) = field_after(&reply, b"jobId") {
                    let event = format!(r#"{{"type":"start","jobId":"{id}"}}"#);
                    redis::cmd("PUBLISH")
                        .arg(format!("stream:v1:{id}"))
                        .arg(event)
                        .exec(&mut conn)
                        .unwrap();
                }
            }
        })
    };
    let floor = pickup(&redis, "jobs:v1:floor", count);
    stop.store(true, Ordering::SeqCst);
    floor_consumer.join().unwrap();
    let line = |(p50, p99, max): (f64, f64, f64)| {
        format!("p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms")
    };
    println!(
        "pickup (XADD sent → start event received), {count} jobs at 500/s: citadel {} \
         (targets p50 ≤ 0.3 ms, p99 ≤ 0.6 ms); floor (blocking read + PUBLISH, same run): {}; \
         agent CPU µs per job by thread: {}",
        line(ours),
        line(floor),
        per_job.join(", ")
    );
}

/// In a stream read reply, the text of the value after the field `name`.
fn field_after(v: &redis::Value, name: &[u8]) -> Option<String> {
    let redis::Value::Array(items) = v else {
        return None;
    };
    items
        .windows(2)
        .find_map(|w| match w {
            [redis::Value::BulkString(k), redis::Value::BulkString(v)] if k == name => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        })
        .or_else(|| items.iter().find_map(|i| field_after(i, name)))
}

/// Enqueue `count` jobs on `queue` at 500/s and time each from its XADD to
/// its `start` event at a subscriber: (p50, p99, max) in ms.
fn pickup(redis: &RedisServer, queue: &str, count: usize) -> (f64, f64, f64) {
    let mut c = redis.conn();
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
        // Sleep most of the gap: a spinning enqueuer would take one of the
        // two cores from the agent and Redis and measure its own contention.
        let left = due.saturating_duration_since(Instant::now());
        if left > Duration::from_micros(300) {
            std::thread::sleep(left - Duration::from_micros(200));
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let id = format!("l-{i}");
        let at = Instant::now();
        redis::cmd("XADD")
            .arg(queue)
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
    (pct(0.50), pct(0.99), lat[lat.len() - 1])
}

/// CPU seconds of a process's live threads (`/proc/…/task/*/schedstat`, ns
/// precise), summed by name with digits dropped (`handler-12` → `handler-`),
/// most first.
fn cpu_by_thread(pid: u32) -> Vec<(String, f64)> {
    let mut by: HashMap<String, f64> = HashMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    for task in tasks {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_owned();
        let ns: f64 = std::fs::read_to_string(task.path().join("schedstat"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        *by.entry(name).or_default() += ns / 1e9;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Nanoseconds since the first call, on one process-wide monotonic clock: the
/// fake engine stamps each token with it, the subscriber reads it back.
fn mono_ns() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `llm_inference` streaming: a fake vLLM emits 1 000 tokens per request as
/// fast as it can (`BENCH_LLM_TOKEN_US` > 0 paces each stream instead), 256
/// jobs at once on `--concurrency 256`. Each token's text is the engine's
/// send time; the subscriber computes engine write → chunk event received.
#[test]
#[ignore]
fn bench_llm_stream() {
    use support::fake_engine::{FakeEngine, Reply};
    const TOKENS: usize = 1000;
    let jobs: usize = std::env::var("BENCH_LLM_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let pace = Duration::from_micros(
        std::env::var("BENCH_LLM_TOKEN_US")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    );
    mono_ns();
    let engine = FakeEngine::always(Reply::sse().generate(Arc::new(move |write| {
        for _ in 0..TOKENS {
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
            let event = format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{} \"}},\"finish_reason\":null}}]}}\n\n",
                mono_ns()
            );
            write(event.as_bytes())?;
        }
        write(b"data: [DONE]\n\n")
    })));
    let redis = fast_redis();
    let concurrency = jobs.to_string();
    let url = engine.url();
    let mut args = vec![
        "--queue",
        "jobs:v1:llm",
        "--node-name",
        "llm",
        "--concurrency",
        &concurrency,
        "--vllm-url",
        &url,
    ];
    // BENCH_LLM_COALESCE=<hold>: --coalesce-chunks with that --chunk-hold.
    let coalesce = std::env::var("BENCH_LLM_COALESCE").ok();
    if let Some(hold) = &coalesce {
        args.extend(["--coalesce-chunks", "--chunk-hold", hold]);
    }
    let w = Citadel::work(&redis, &args, QUIET);
    let mut c = redis.conn();
    wait_until("the worker's group", Duration::from_secs(10), || {
        group_exists(&mut c, "jobs:v1:llm")
    });

    // (latency of each token in µs, jobs ended, chunk events)
    let seen: Arc<Mutex<(Vec<u64>, usize, usize)>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = {
        let (seen, stop, url) = (seen.clone(), stop.clone(), redis.url());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ps = conn.as_pubsub();
            ps.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            ps.psubscribe("stream:v1:*").unwrap();
            ready_tx.send(()).unwrap();
            let mut local = Vec::with_capacity(jobs * TOKENS);
            let (mut ended, mut events) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                let Ok(msg) = ps.get_message() else { continue };
                let at = mono_ns();
                let text = msg.get_payload_bytes();
                let text = std::str::from_utf8(text).unwrap_or_default();
                if text.contains(r#""type":"chunk""#) {
                    // One token ("<send time> ") or, coalesced, several.
                    events += 1;
                    let start = text.find(r#""content":""#).unwrap() + 11;
                    let content = &text[start..start + text[start..].find('"').unwrap()];
                    for sent in content.split_whitespace() {
                        let sent: u64 = sent.parse().unwrap();
                        local.push((at - sent) / 1000);
                    }
                } else if text.contains(r#""type":"end""#) || text.contains(r#""type":"error""#) {
                    ended += 1;
                    if ended % 16 == 0 || ended == jobs {
                        let mut s = seen.lock().unwrap();
                        s.0.append(&mut local);
                        s.1 = ended;
                        s.2 = events;
                    }
                }
            }
            seen.lock().unwrap().0.append(&mut local);
        })
    };
    ready_rx.recv().unwrap();

    let cpu0 = cpu_seconds(w.pid());
    let threads0: HashMap<String, f64> = cpu_by_thread(w.pid()).into_iter().collect();
    let t0 = Instant::now();
    let mut pipe = redis::pipe();
    for i in 0..jobs {
        pipe.cmd("XADD")
            .arg("jobs:v1:llm")
            .arg("*")
            .arg("jobId")
            .arg(format!("llm-{i}"))
            .arg("type")
            .arg("llm_inference")
            .arg("payload")
            .arg(r#"{"model":"m","messages":[{"role":"user","content":"go"}]}"#)
            .ignore();
    }
    pipe.exec(&mut c).unwrap();
    wait_until("every job's end", Duration::from_secs(300), || {
        (seen.lock().unwrap().1 >= jobs).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(w.pid()) - cpu0;
    let threads: Vec<String> = cpu_by_thread(w.pid())
        .into_iter()
        .map(|(name, s)| (s - threads0.get(&name).copied().unwrap_or(0.0), name))
        .filter(|(s, _)| *s >= 0.005)
        .map(|(s, name)| format!("{name} {s:.2}s"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let mut lat = std::mem::take(&mut seen.lock().unwrap().0);
    let events = seen.lock().unwrap().2;
    assert_eq!(lat.len(), jobs * TOKENS, "every token arrived in a chunk");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    let failed = engine.requests().len().saturating_sub(jobs);
    println!(
        "llm stream: {jobs} jobs x {TOKENS} tokens ({}{}) in {secs:.2}s = {:.0} tokens/s \
         (target ≥ 500000 unpaced) in {events} chunk events ({:.2} tokens each); \
         engine write → chunk event received: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms \
         (target p99 ≤ 1 ms paced); agent CPU {cpu:.2}s = {:.0}% of one core, {:.2} µs/token \
         (target ≤ 5) (by thread: {}); {failed} extra requests",
        if pace.is_zero() {
            "as fast as the engine can".to_string()
        } else {
            format!("one every {}µs per stream", pace.as_micros())
        },
        coalesce.as_ref().map_or(String::new(), |hold| format!(
            ", coalesced, chunk-hold {hold}"
        )),
        (jobs * TOKENS) as f64 / secs,
        (jobs * TOKENS) as f64 / events.max(1) as f64,
        pct(0.50),
        pct(0.99),
        pct(1.0),
        100.0 * cpu / secs,
        cpu * 1e6 / (jobs * TOKENS) as f64,
        threads.join(", "),
    );
}

/// `model_download` of a 1 GiB file from a local server against `curl -o`
/// of the same file in the same run (three rounds each, alternating; the best
/// of each is compared). citadel also computes the SHA-256 (the payload
/// gives one to verify) and fsyncs before the rename; curl does neither.
/// Target: ≥ 90 % of curl's rate.
#[test]
#[ignore]
fn bench_model_download() {
    use support::file_server::{FileServer, Serve};
    let size: usize = std::env::var("BENCH_DOWNLOAD_MIB")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
        << 20;
    let body: Vec<u8> = (0..size as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t0 = Instant::now();
    let sha = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&body);
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    println!(
        "download: sha2 alone hashes {:.0} MiB/s here",
        size as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64
    );
    let server = FileServer::start();
    server.serve("/big.bin", Serve::file(body));
    let url = server.url("/big.bin");
    let dir = support::fresh_temp_dir("bench-download");
    let rate = |secs: f64| size as f64 / secs / (1 << 20) as f64;
    let mut best_curl = f64::MAX;
    let mut best_curl_synced = f64::MAX;
    let mut best_citadel = f64::MAX;
    for round in 0..3 {
        let out = dir.join("curl.bin");
        let t0 = Instant::now();
        let status = std::process::Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(&out)
            .arg(&url)
            .status()
            .expect("running curl");
        let curl = t0.elapsed().as_secs_f64();
        assert!(status.success(), "curl: {status}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size as u64);
        // What curl's file costs once it is on disk, as model_download's is.
        std::fs::File::open(&out).unwrap().sync_all().unwrap();
        let curl_synced = t0.elapsed().as_secs_f64();
        std::fs::remove_file(&out).unwrap();

        let models = dir.join(format!("models-{round}"));
        let job = serde_json::json!({"type": "model_download",
            "payload": {"url": url, "sha256": sha}})
        .to_string();
        let t0 = Instant::now();
        let output = support::citadel_cmd(&["run-job", &job, "--models-dir"])
            .arg(&models)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running citadel");
        let citadel = t0.elapsed().as_secs_f64();
        assert!(output.status.success(), "{output:?}");
        let _ = std::fs::remove_dir_all(&models);
        println!(
            "download round {round}: curl {:.0} MiB/s (then fsynced: {:.0} MiB/s), \
             model_download {:.0} MiB/s",
            rate(curl),
            rate(curl_synced),
            rate(citadel)
        );
        best_curl = best_curl.min(curl);
        best_curl_synced = best_curl_synced.min(curl_synced);
        best_citadel = best_citadel.min(citadel);
    }
    println!(
        "download {} MiB: curl -o {:.0} MiB/s, model_download (sha256 + fsync) {:.0} MiB/s, \
         ratio {:.0} % (target ≥ 90 %); against curl -o + fsync ({:.0} MiB/s): {:.0} %",
        size >> 20,
        rate(best_curl),
        rate(best_citadel),
        100.0 * best_curl / best_citadel,
        rate(best_curl_synced),
        100.0 * best_curl_synced / best_citadel
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `citadel gateway`: 64 concurrent streaming chat requests (raw HTTP, SSE)
/// through the gateway + one worker to a fake vLLM, against the same 64
/// requests sent straight to the fake engine in the same run. Each token's
/// text is the engine's send time; the client computes engine write → SSE
/// chunk received, per path. Prints time to first token and per-token
/// latency (p50/p99) of both, the difference (the gateway's added latency;
/// target p99 ≤ 2 ms per token) and gateway + worker CPU.
/// `BENCH_GW_STREAMS` (default 64) streams of
/// `BENCH_GW_TOKENS` (default 200) tokens, one every
/// `BENCH_GW_TOKEN_US` (default 10 000 µs: 100 tokens/s per stream).
#[test]
#[ignore]
fn bench_gateway_stream() {
    use std::io::{BufRead, BufReader, Write};
    use support::fake_engine::{FakeEngine, Reply};
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(d)
    };
    let streams = env("BENCH_GW_STREAMS", 64) as usize;
    let tokens = env("BENCH_GW_TOKENS", 200) as usize;
    let pace = Duration::from_micros(env("BENCH_GW_TOKEN_US", 10_000));
    mono_ns();
    let engine = FakeEngine::always(Reply::sse().generate(Arc::new(move |write| {
        for _ in 0..tokens {
            std::thread::sleep(pace);
            let event = format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{} \"}},\"finish_reason\":null}}]}}\n\n",
                mono_ns()
            );
            write(event.as_bytes())?;
        }
        write(b"data: [DONE]\n\n")
    })));
    let redis = fast_redis();
    let w = Citadel::work(
        &redis,
        &[
            "--node-name",
            "gw-bench",
            "--concurrency",
            "64",
            "--vllm-url",
            &engine.url(),
        ],
        QUIET,
    );
    let mut c = redis.conn();
    wait_until("the worker's group", Duration::from_secs(10), || {
        group_exists(&mut c, "jobs:v1:gpu-general")
    });
    let addr = format!("127.0.0.1:{}", support::free_port());
    let url = redis.url();
    let g = Citadel::spawn(
        &["gateway", "--listen", &addr],
        &[("CITADEL_REDIS_URL", &url), ("RUST_LOG", "info")],
    );
    g.wait_for_log("gateway: listening on", Duration::from_secs(10));
    let engine_addr = engine.url().trim_start_matches("http://").to_owned();

    /// (time to first token µs, per-token latencies µs) of one stream.
    fn one(addr: &str, path: &str) -> (u64, Vec<u64>) {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"go"}],"stream":true}"#;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let t0 = mono_ns();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let (mut ttft, mut lat) = (0, Vec::new());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let at = mono_ns();
            if let Some(i) = line.find(r#""content":""#) {
                let digits: String = line[i + 11..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(sent) = digits.parse::<u64>() {
                    if lat.is_empty() {
                        ttft = (at - t0) / 1000;
                    }
                    lat.push((at - sent) / 1000);
                }
            }
            if line.starts_with("data: [DONE]") {
                break;
            }
            line.clear();
        }
        (ttft, lat)
    }
    let run = |addr: &str, path: &str| -> (Vec<u64>, Vec<u64>, f64) {
        let t = Instant::now();
        let results: Vec<(u64, Vec<u64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..streams).map(|_| s.spawn(|| one(addr, path))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let secs = t.elapsed().as_secs_f64();
        let mut ttft: Vec<u64> = results.iter().map(|r| r.0).collect();
        let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.1).collect();
        assert_eq!(lat.len(), streams * tokens, "{path}: every token arrived");
        ttft.sort_unstable();
        lat.sort_unstable();
        (ttft, lat, secs)
    };
    let pct =
        |v: &[u64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
    let (d_ttft, d_lat, d_secs) = run(&engine_addr, "/v1/chat/completions");
    let (cpu_g0, cpu_w0) = (cpu_seconds(g.pid()), cpu_seconds(w.pid()));
    let (g_ttft, g_lat, g_secs) = run(&addr, "/v1/chat/completions");
    let (cpu_g, cpu_w) = (cpu_seconds(g.pid()) - cpu_g0, cpu_seconds(w.pid()) - cpu_w0);
    println!(
        "gateway stream: {streams} streams x {tokens} tokens, one every {}µs; direct to the engine: \
         TTFT p50 {:.2} ms p99 {:.2} ms, per token p50 {:.3} ms p99 {:.3} ms ({d_secs:.1}s)",
        pace.as_micros(),
        pct(&d_ttft, 0.5),
        pct(&d_ttft, 0.99),
        pct(&d_lat, 0.5),
        pct(&d_lat, 0.99),
    );
    println!(
        "gateway stream: through gateway + worker: TTFT p50 {:.2} ms p99 {:.2} ms, per token p50 {:.3} ms \
         p99 {:.3} ms ({g_secs:.1}s); added per token p50 {:.3} ms, p99 {:.3} ms (target p99 ≤ 2 ms); \
         CPU gateway {cpu_g:.2}s = {:.0}% of a core, worker {cpu_w:.2}s = {:.0}%",
        pct(&g_ttft, 0.5),
        pct(&g_ttft, 0.99),
        pct(&g_lat, 0.5),
        pct(&g_lat, 0.99),
        pct(&g_lat, 0.5) - pct(&d_lat, 0.5),
        pct(&g_lat, 0.99) - pct(&d_lat, 0.99),
        100.0 * cpu_g / g_secs,
        100.0 * cpu_w / g_secs,
    );
}

/// `n` no-op echo jobs `{prefix}-{i}` on `queue`, pipelined to `conn` (the
/// queue's master, or the one server) a thousand at a time.
fn fill(conn: &mut redis::Connection, queue: &str, prefix: &str, n: usize) {
    for batch in 0..n.div_ceil(1000) {
        let mut pipe = redis::pipe();
        for i in batch * 1000..((batch + 1) * 1000).min(n) {
            pipe.cmd("XADD")
                .arg(queue)
                .arg("*")
                .arg("jobId")
                .arg(format!("{prefix}-{i}"))
                .arg("type")
                .arg("echo")
                .arg("payload")
                .arg(r#"{"n":1}"#)
                .ignore();
        }
        pipe.exec(conn).unwrap();
    }
}

/// Three `citadel work` processes reading `queues` on `url`, until every
/// queue's group is done (`conn_of` opens a connection to a queue's
/// server); jobs/s and the workers' CPU µs per job.
fn three_workers_burn(
    url: &str,
    queues: &[String],
    per_queue: usize,
    concurrency: &str,
    conn_of: &dyn Fn(&str) -> redis::Connection,
) -> (f64, f64) {
    let t0 = Instant::now();
    let workers: Vec<Citadel> = (0..3)
        .map(|i| {
            let node = format!("bench-{i}");
            let mut args = vec!["work", "--node-name", &node, "--concurrency", concurrency];
            for q in queues {
                args.extend(["--queue", q.as_str()]);
            }
            let mut env = vec![("CITADEL_REDIS_URL", url)];
            env.extend_from_slice(QUIET);
            Citadel::spawn(&args, &env)
        })
        .collect();
    for q in queues {
        let mut c = conn_of(q);
        wait_until("the burn-down", Duration::from_secs(900), || {
            group_done(&mut c, q, per_queue).then_some(())
        });
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = (per_queue * queues.len()) as f64;
    let cpu: f64 = workers.iter().map(|w| cpu_seconds(w.pid())).sum();
    (total / secs, cpu * 1e6 / total)
}

/// Issue 16's cluster burn-down: a 3-master Redis Cluster, one queue per
/// master, three workers reading all three queues, against the same
/// three queues and workers on one redis-server, in the same run
/// (`BENCH_CLUSTER_JOBS` [60 000] in all, `BENCH_CLUSTER_CONCURRENCY`
/// [16], `BENCH_ROUNDS` [3] interleaved rounds; medians, min–max).
#[test]
#[ignore]
fn bench_cluster_burn_down() {
    use support::cluster::{ClusterOptions, RedisCluster};
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let total: usize = env("BENCH_CLUSTER_JOBS", "60000").parse().unwrap();
    let conc = env("BENCH_CLUSTER_CONCURRENCY", "16");
    let rounds: usize = env("BENCH_ROUNDS", "3").parse().unwrap();
    let per_queue = total / 3;
    let (mut single, mut cluster) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let redis = fast_redis();
        let queues: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|t| format!("jobs:v1:{{{t}}}"))
            .collect();
        for q in &queues {
            fill(&mut redis.conn(), q, q, per_queue);
        }
        let one = three_workers_burn(&redis.url(), &queues, per_queue, &conc, &|_| redis.conn());
        println!(
            "cluster burn-down round {round}: one redis-server: {:.0} jobs/s, workers {:.1} µs/job",
            one.0, one.1
        );
        single.push(one);
        drop(redis);

        let c = RedisCluster::start(ClusterOptions {
            extra_args: ["--appendonly", "no", "--appendfsync", "everysec"]
                .map(String::from)
                .to_vec(),
            ..ClusterOptions::default()
        });
        let masters = c.master_ports();
        let queues: Vec<String> = masters
            .iter()
            .map(|p| format!("jobs:v1:{{{}}}", c.hash_tag_served_by(*p)))
            .collect();
        let owner = |q: &str| c.owner_of_slot(RedisCluster::slot_of(q));
        for q in &queues {
            fill(&mut c.node_conn(owner(q)), q, q, per_queue);
        }
        let three = three_workers_burn(&c.url(), &queues, per_queue, &conc, &|q| {
            c.node_conn(owner(q))
        });
        println!(
            "cluster burn-down round {round}: 3-master cluster: {:.0} jobs/s, workers {:.1} µs/job",
            three.0, three.1
        );
        cluster.push(three);
    }
    let (sj, sjlo, sjhi) = spread(single.iter().map(|r| r.0).collect());
    let (cj, cjlo, cjhi) = spread(cluster.iter().map(|r| r.0).collect());
    let (su, ..) = spread(single.iter().map(|r| r.1).collect());
    let (cu, ..) = spread(cluster.iter().map(|r| r.1).collect());
    println!(
        "cluster burn-down {total} jobs, 3 queues, 3 workers --concurrency {conc}: \
         one redis-server {sj:.0} jobs/s ({sjlo:.0}–{sjhi:.0}), workers {su:.1} µs/job; \
         3-master cluster {cj:.0} jobs/s ({cjlo:.0}–{cjhi:.0}), workers {cu:.1} µs/job; \
         cluster/one {:.2}×",
        cj / sj
    );
}
