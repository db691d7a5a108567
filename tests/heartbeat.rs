//! The node heartbeat (PROTOCOL.md §5) of the real binary against a real
//! redis-server: entries on `node:status:stream` and messages on
//! `node:status:{name}`, their fields, cadence, cap and counters, through a
//! Redis restart, and GPU facts from a fake `nvidia-smi` on PATH (one that
//! answers, one that hangs, none at all).

mod support;

use serde_json::Value as Json;
use std::path::PathBuf;
use std::time::Duration;
use support::fake_nexus::FakeNexus;
use support::jobs::{fake_tool, path_with, wait_for_pid_file, wait_pid_gone};
use support::observe::{assert_logged_once, assert_rfc3339_ms, log_lines_with, wait_status};
use support::{
    fresh_temp_dir, wait_until, worker_with_env, xadd_job, xlen, xrange_all, Citadel, RedisServer,
    Subscriber,
};

const STREAM: &str = "node:status:stream";
const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(20);

/// Recorded `nvidia-smi --query-gpu=… --format=csv,noheader,nounits` of two GPUs,
/// the second without power and utilization readings.
const TWO_GPUS: &str = "\
0, NVIDIA H200, GPU-3f1c2a9e-77aa-4b1e-9c55-0d1e2f3a4b5c, 1024, 143771, 37, 41, 118.52, 580.65.06
1, NVIDIA H200, GPU-9a8b7c6d-1111-2222-3333-444455556666, [N/A], 143771, [Not Supported], 39, [N/A], 580.65.06
";

/// `citadel work` as `node` (support's [`worker_with_env`] timings) with
/// `args`; PATH is `path` when given. GPUs come from nvidia-smi (the fake
/// one on PATH), even where NVML would load.
fn agent(redis: &RedisServer, node: &str, args: &[&str], path: Option<&str>) -> Citadel {
    let mut all = vec!["--gpu-telemetry", "nvidia-smi"];
    all.extend_from_slice(args);
    match path {
        Some(p) => worker_with_env(redis, node, &all, &[("PATH", p)]),
        None => worker_with_env(redis, node, &all, &[]),
    }
}

/// A directory holding an executable `nvidia-smi` with `body` as its script.
fn fake_nvidia_smi(body: &str) -> PathBuf {
    let dir = fresh_temp_dir("nvidia-smi");
    fake_tool(&dir, "nvidia-smi", body);
    dir
}

/// A script printing `text`.
fn printing(text: &str) -> String {
    format!("cat <<'EOF'\n{text}EOF")
}

/// Every heartbeat payload on the stream so far, oldest first.
fn payloads(conn: &mut redis::Connection) -> Vec<Json> {
    xrange_all(conn, STREAM)
        .into_iter()
        .map(|(id, f)| {
            let p = f
                .get("payload")
                .unwrap_or_else(|| panic!("{id} has no payload"));
            serde_json::from_str(p).unwrap_or_else(|e| panic!("{id}: payload not JSON: {e}"))
        })
        .collect()
}

/// Waits for the first heartbeat payload that satisfies `f`.
fn wait_payload(conn: &mut redis::Connection, what: &str, f: impl Fn(&Json) -> bool) -> Json {
    wait_until(what, WAIT, || payloads(conn).into_iter().find(|p| f(p)))
}

fn u64_at(v: &Json, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("{path} is not a whole number in {v}"))
}

#[test]
fn heartbeat_entries_and_messages_carry_typed_node_facts() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "node:status:*");
    let fake = fake_nvidia_smi(&printing(TWO_GPUS));
    let _w = agent(
        &redis,
        "hb-facts",
        &["--heartbeat-interval", "1h"],
        Some(&path_with(&fake)),
    );
    let mut conn = redis.conn();

    let (_, fields) = wait_until("a heartbeat entry", WAIT, || {
        xrange_all(&mut conn, STREAM).into_iter().next()
    });
    assert_eq!(fields["nodeId"], "hb-facts");
    assert_rfc3339_ms("entry timestamp", &fields["timestamp"]);
    let p: Json = serde_json::from_str(&fields["payload"]).unwrap();
    assert_eq!(p["timestamp"], fields["timestamp"].as_str());

    let (channel, message) = wait_until("a heartbeat message", WAIT, || {
        sub.messages().into_iter().next()
    });
    assert_eq!(channel, "node:status:hb-facts");
    assert_eq!(message, p, "the message is the entry's payload");

    assert_eq!(p["version"], "1.0");
    assert!(p["agent_version"].is_string());
    assert_eq!(p["nodeId"], "hb-facts");
    assert_eq!(p["nodeName"], "hb-facts");
    assert!(p["hostname"].is_string());
    assert_eq!(p["mode"], "redis");
    u64_at(&p, "/uptime_seconds");
    assert!(u64_at(&p, "/cpu/cores") >= 1);
    assert!(p["cpu"]["load_1m"].is_number(), "{p}");
    assert!(p["cpu"].get("usage_percent").is_some(), "{p}");
    assert!(u64_at(&p, "/memory/total_mb") > 0);
    u64_at(&p, "/memory/available_mb");
    assert!(u64_at(&p, "/disk/total_mb") > 0);
    assert!(p["disk"]["path"].is_string());
    let w = &p["worker"];
    for counter in [
        "in_flight",
        "processed",
        "failed",
        "dead_lettered",
        "reclaimed",
    ] {
        assert_eq!(w[counter], 0, "{counter} of a fresh worker: {w}");
    }
    assert_eq!(w["mode"], "redis");

    let gpus = p["gpus"].as_array().expect("gpus is a list");
    assert_eq!(gpus.len(), 2, "{p}");
    let g0 = &gpus[0];
    assert_eq!(g0["index"], 0);
    assert_eq!(g0["name"], "NVIDIA H200");
    assert_eq!(g0["uuid"], "GPU-3f1c2a9e-77aa-4b1e-9c55-0d1e2f3a4b5c");
    assert_eq!(g0["memory_used_mb"], 1024);
    assert_eq!(g0["memory_total_mb"], 143771);
    assert_eq!(g0["utilization_percent"], 37.0);
    assert_eq!(g0["temperature_celsius"], 41.0);
    assert_eq!(g0["power_watts"], 118.52);
    assert_eq!(g0["driver"], "580.65.06");
    let g1 = &gpus[1];
    assert_eq!(g1["index"], 1);
    for unknown in ["memory_used_mb", "utilization_percent", "power_watts"] {
        assert!(g1[unknown].is_null(), "{unknown}: {g1}");
    }
    assert_eq!(g1["temperature_celsius"], 39.0);
}

#[test]
fn heartbeats_come_every_interval() {
    let redis = RedisServer::start();
    let _w = agent(
        &redis,
        "hb-cadence",
        &["--heartbeat-interval", "100ms"],
        None,
    );
    let mut conn = redis.conn();
    // At 100ms, 5 beats take half a second; a loaded machine gets 20 s.
    wait_until("5 heartbeats", WAIT, || {
        (xlen(&mut conn, STREAM) >= 5).then_some(())
    });
    let p = payloads(&mut conn);
    assert!(p
        .windows(2)
        .all(|w| w[0]["timestamp"].as_str() <= w[1]["timestamp"].as_str()));
}

#[test]
fn heartbeat_interval_zero_turns_it_off() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let w = agent(&redis, "hb-off", &["--heartbeat-interval", "0"], None);
    w.wait_for_log("heartbeat: off", WAIT);
    let mut conn = redis.conn();
    xadd_job(&mut conn, QUEUE, "hb-off-1", "echo", "{}");
    sub.wait_for("hb-off-1", "end", WAIT);
    assert_eq!(xlen(&mut conn, STREAM), 0);
}

#[test]
fn the_status_stream_is_capped_with_maxlen() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for i in 0..12_000 {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("old")
            .arg(i)
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let _w = agent(&redis, "hb-cap", &["--heartbeat-interval", "1h"], None);
    wait_until("the heartbeat's entry, the stream trimmed", WAIT, || {
        let len = xlen(&mut conn, STREAM);
        // MAXLEN ~ trims whole nodes: about 10000 are kept, never fewer.
        (len < 12_000).then_some(len)
    });
    let len = xlen(&mut conn, STREAM);
    assert!((10_000..11_000).contains(&len), "{len} entries");
}

#[test]
fn counters_match_the_jobs_run() {
    let redis = RedisServer::start();
    let _w = agent(&redis, "hb-count", &["--heartbeat-interval", "100ms"], None);
    let mut conn = redis.conn();
    for i in 0..3 {
        xadd_job(&mut conn, QUEUE, &format!("hb-ok-{i}"), "echo", "{}");
    }
    xadd_job(
        &mut conn,
        QUEUE,
        "hb-bad",
        "echo",
        r#"{"fail":"permanent"}"#,
    );
    for i in 0..3 {
        wait_status(&mut conn, &format!("hb-ok-{i}"), "completed", WAIT);
    }
    wait_status(&mut conn, "hb-bad", "failed", WAIT);
    let p = wait_payload(&mut conn, "a heartbeat counting 4 jobs", |p| {
        p["worker"]["processed"] == 4
    });
    let w = &p["worker"];
    assert_eq!(w["failed"], 1, "{w}");
    assert_eq!(w["in_flight"], 0, "{w}");
    assert_eq!(w["reclaimed"], 0, "{w}");
    // The dead letter is counted once Redis took it, which may be a beat later.
    wait_payload(&mut conn, "a heartbeat counting the dead letter", |p| {
        p["worker"]["dead_lettered"] == 1
    });
}

#[test]
fn heartbeats_go_on_after_a_redis_restart_and_the_outage_is_logged_once() {
    let mut redis = RedisServer::start();
    let w = agent(
        &redis,
        "hb-restart",
        &["--heartbeat-interval", "100ms"],
        None,
    );
    let mut conn = redis.conn();
    wait_until("a first heartbeat", WAIT, || {
        (xlen(&mut conn, STREAM) >= 1).then_some(())
    });
    redis.kill();
    wait_until("three failed beats", WAIT, || {
        (log_lines_with(&w.log(), "heartbeat: Redis still").len() >= 3).then_some(())
    });
    assert_logged_once(&w.log(), "heartbeat: Redis unreachable");
    redis.restart();
    let mut conn = redis.conn();
    let before = xlen(&mut conn, STREAM);
    wait_until("heartbeats after the restart", WAIT, || {
        (xlen(&mut conn, STREAM) >= before + 2).then_some(())
    });
    w.wait_for_log("heartbeat: Redis connection restored", WAIT);
}

#[test]
fn no_nvidia_smi_means_no_gpus() {
    let redis = RedisServer::start();
    let empty = fresh_temp_dir("no-nvidia-smi");
    let w = agent(
        &redis,
        "hb-nogpu",
        &["--heartbeat-interval", "1h"],
        Some(empty.to_str().unwrap()),
    );
    let mut conn = redis.conn();
    let p = wait_payload(&mut conn, "a heartbeat", |_| true);
    assert_eq!(p["gpus"], serde_json::json!([]));
    assert!(w.log().contains("GPU telemetry: none"), "{}", w.log());
    assert_eq!(p["worker"]["mode"], "redis", "known from the first beat");
}

#[test]
fn a_hanging_nvidia_smi_is_killed_and_the_last_known_gpus_are_reported() {
    let redis = RedisServer::start();
    let marker = fresh_temp_dir("nvidia-smi-marker").join("answered");
    let script = format!(
        "if [ -e '{m}' ]; then exec sleep 600; fi\ntouch '{m}'\n{}",
        printing(TWO_GPUS),
        m = marker.display()
    );
    let fake = fake_nvidia_smi(&script);
    let w = agent(
        &redis,
        "hb-hang",
        &[
            "--heartbeat-interval",
            "100ms",
            "--gpu-query-timeout",
            "300ms",
        ],
        Some(&path_with(&fake)),
    );
    let mut conn = redis.conn();
    wait_until("two more hung nvidia-smi runs", WAIT, || {
        (log_lines_with(&w.log(), "GPU telemetry: still failing").len() >= 2).then_some(())
    });
    let n = xlen(&mut conn, STREAM);
    wait_until("heartbeats while nvidia-smi hangs", WAIT, || {
        (xlen(&mut conn, STREAM) >= n + 2).then_some(())
    });
    let all = payloads(&mut conn);
    assert!(all.len() >= 4, "{} heartbeats", all.len());
    for p in &all {
        assert_eq!(
            p["gpus"].as_array().map(Vec::len),
            Some(2),
            "last known GPUs: {p}"
        );
    }
    assert_logged_once(&w.log(), "reporting the last known GPUs until it answers");
    assert!(w
        .log()
        .contains("nvidia-smi did not answer within 300ms and was killed"));
}

#[test]
fn a_heartbeat_arrives_without_gpus_when_nvidia_smi_hangs_from_the_start() {
    let redis = RedisServer::start();
    let fake = fake_nvidia_smi("exec sleep 600");
    let w = agent(
        &redis,
        "hb-hang0",
        &["--heartbeat-interval", "1h", "--gpu-query-timeout", "300ms"],
        Some(&path_with(&fake)),
    );
    let mut conn = redis.conn();
    let p = wait_payload(&mut conn, "a heartbeat", |_| true);
    assert_eq!(p["gpus"], serde_json::json!([]));
    assert_logged_once(&w.log(), "reporting the last known GPUs until it answers");
}

/// An agent whose nvidia-smi hangs (the query timeout is 10m) and that
/// nvidia-smi's pid, once it runs.
fn agent_with_a_hung_nvidia_smi(redis: &RedisServer, node: &str) -> (Citadel, u32) {
    let pid_file = fresh_temp_dir("nvidia-smi-pid").join("pid");
    let fake = fake_nvidia_smi(&format!(
        "echo $$ > '{}'\nexec sleep 600",
        pid_file.display()
    ));
    let w = agent(
        redis,
        node,
        &["--heartbeat-interval", "1h", "--gpu-query-timeout", "10m"],
        Some(&path_with(&fake)),
    );
    (w, wait_for_pid_file(&pid_file, WAIT))
}

#[test]
fn sigterm_stops_the_heartbeat_at_once_and_kills_a_hung_nvidia_smi() {
    let redis = RedisServer::start();
    let (mut w, pid) = agent_with_a_hung_nvidia_smi(&redis, "hb-stop");
    w.wait_working();
    w.sigterm();
    let status = w.wait_exit(WAIT).expect("citadel exits after SIGTERM");
    assert!(status.success(), "{status}");
    // The stop itself ended the run (not the agent's exit, below).
    assert!(!w.log().contains("a beat is still waiting"), "{}", w.log());
    wait_pid_gone("the hung nvidia-smi", pid, WAIT);
}

#[test]
fn a_hung_nvidia_smi_dies_with_a_killed_agent() {
    let redis = RedisServer::start();
    let (mut w, pid) = agent_with_a_hung_nvidia_smi(&redis, "hb-kill9");
    w.kill9();
    wait_pid_gone("the hung nvidia-smi", pid, WAIT);
}

#[test]
fn entries_reclaimed_from_a_dead_consumer_are_counted() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    redis::cmd("XGROUP")
        .arg(&["CREATE", QUEUE, "workers", "0", "MKSTREAM"])
        .query::<()>(&mut conn)
        .unwrap();
    xadd_job(&mut conn, QUEUE, "hb-orphan", "echo", "{}");
    // A consumer that takes the entry and dies.
    redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP", "workers", "ghost", "COUNT", "1", "STREAMS", QUEUE, ">",
        ])
        .query::<redis::Value>(&mut conn)
        .unwrap();
    let _w = agent(
        &redis,
        "hb-reclaim",
        &["--heartbeat-interval", "100ms", "--claim-idle", "300ms"],
        None,
    );
    wait_status(&mut conn, "hb-orphan", "completed", WAIT);
    let p = wait_payload(&mut conn, "a heartbeat after the reclaimed job", |p| {
        p["worker"]["processed"] == 1
    });
    assert_eq!(p["worker"]["reclaimed"], 1, "{p}");
}

#[test]
fn nexus_polling_with_a_redis_url_beats_and_counts_its_jobs() {
    let redis = RedisServer::start();
    let nexus = FakeNexus::start();
    nexus.push_job("hb-nx-1", "echo", serde_json::json!({}));
    let url = nexus.url();
    let redis_url = redis.url();
    let _w = Citadel::spawn(
        &[
            "work",
            "--mode",
            "nexus",
            "--nexus-url",
            &url,
            "--node-name",
            "hb-nx",
        ],
        &[
            ("CITADEL_REDIS_URL", &redis_url),
            ("CITADEL_HEARTBEAT_INTERVAL", "100ms"),
            ("RUST_LOG", "debug"),
        ],
    );
    nexus.wait_for_report("hb-nx-1", WAIT);
    let mut conn = redis.conn();
    let p = wait_payload(&mut conn, "a heartbeat counting the Nexus job", |p| {
        p["worker"]["processed"] == 1
    });
    assert_eq!(p["mode"], "nexus");
    assert_eq!(p["worker"]["mode"], "nexus");
    assert_eq!(p["nodeId"], "hb-nx");
}

#[test]
fn nexus_polling_without_a_redis_url_sends_no_heartbeat() {
    let nexus = FakeNexus::start();
    let url = nexus.url();
    let w = Citadel::spawn(
        &["work", "--mode", "nexus", "--nexus-url", &url],
        &[("RUST_LOG", "debug")],
    );
    w.wait_for_log(
        "heartbeat: none (Nexus polling without a configured Redis URL)",
        WAIT,
    );
}

/// Two GPUs, the second one hot (91 °C).
const HOT_GPU: &str = "\
0, NVIDIA H200, GPU-cool, 1024, 143771, 37, 41, 118.52, 580.65.06
1, NVIDIA H200, GPU-hot, 2048, 143771, 99, 91, 650.5, 580.65.06
";

#[test]
fn a_hot_gpu_raises_an_alert_once_the_device_config_asks_for_high_temp_alerts() {
    let redis = RedisServer::start();
    let fake = fake_nvidia_smi(&printing(HOT_GPU));
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let _w = agent(
        &redis,
        "hb-hot",
        &[
            "--heartbeat-interval",
            "200ms",
            "--gpu-high-temp",
            "90",
            "--metrics-addr",
            &metrics,
        ],
        Some(&path_with(&fake)),
    );
    let mut conn = redis.conn();
    // alertOnHighTemp is off by default: no alert, whatever the heat.
    let before = wait_payload(&mut conn, "a heartbeat with two GPUs", |p| {
        p["gpus"].as_array().is_some_and(|g| g.len() == 2)
    });
    assert_eq!(before["monitoring"]["alertOnHighTemp"], false);
    assert_eq!(before["alerts"], serde_json::json!([]));

    xadd_job(
        &mut conn,
        QUEUE,
        "hot-cfg",
        "APPLY_DEVICE_CONFIG",
        r#"{"config": {"alertOnHighTemp": true}}"#,
    );
    wait_status(&mut conn, "hot-cfg", "completed", WAIT);
    let p = wait_payload(&mut conn, "a heartbeat with high-temp alerts on", |p| {
        p["monitoring"]["alertOnHighTemp"] == true
    });
    assert_eq!(
        p["alerts"],
        serde_json::json!([{
            "type": "gpu_high_temperature",
            "gpu": 1,
            "uuid": "GPU-hot",
            "name": "NVIDIA H200",
            "temperature_celsius": 91.0,
            "threshold_celsius": 90.0,
        }]),
        "only the GPU at or above --gpu-high-temp: {p}"
    );

    // The same sample feeds the GPU gauges of /metrics.
    let body = wait_until("GPU gauges on /metrics", WAIT, || {
        let mut c = std::net::TcpStream::connect(&metrics).ok()?;
        use std::io::{Read, Write};
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        text.contains("citadel_gpu_temperature_celsius{")
            .then_some(text)
    });
    for line in [
        "citadel_gpu_temperature_celsius{gpu=\"1\",name=\"NVIDIA H200\"} 91",
        "citadel_gpu_utilization_percent{gpu=\"0\",name=\"NVIDIA H200\"} 37",
        "citadel_gpu_power_watts{gpu=\"1\",name=\"NVIDIA H200\"} 650.5",
        "citadel_gpu_memory_used_bytes{gpu=\"1\",name=\"NVIDIA H200\"} 2147483648",
    ] {
        assert!(body.lines().any(|l| l == line), "no `{line}` in\n{body}");
    }
}

#[test]
fn without_the_nvml_library_auto_telemetry_falls_back_to_nvidia_smi() {
    let redis = RedisServer::start();
    let fake = fake_nvidia_smi(&printing(TWO_GPUS));
    let w = agent(
        &redis,
        "hb-auto",
        &["--heartbeat-interval", "1h", "--gpu-telemetry", "auto"],
        Some(&path_with(&fake)),
    );
    let mut conn = redis.conn();
    let p = wait_payload(&mut conn, "a heartbeat", |_| true);
    let log = w.log();
    if log.contains("GPU telemetry: NVML (") {
        support::report_skip(
            "without_the_nvml_library_auto_telemetry_falls_back_to_nvidia_smi",
            "libnvidia-ml loads on this machine",
        );
        return;
    }
    let line = log_lines_with(&log, "GPU telemetry: ");
    assert_eq!(line.len(), 1, "the choice is logged once: {log}");
    let expected = format!(
        "GPU telemetry: {}/nvidia-smi (nvidia-smi; NVML ",
        fake.display()
    );
    assert!(line[0].contains(&expected), "{}", line[0]);
    if cfg!(feature = "nvml") {
        assert!(line[0].contains("NVML did not load: "), "{}", line[0]);
    }
    assert_eq!(p["gpus"].as_array().map(Vec::len), Some(2), "{p}");
    assert_eq!(
        p["gpus"][0]["uuid"],
        "GPU-3f1c2a9e-77aa-4b1e-9c55-0d1e2f3a4b5c"
    );
}
