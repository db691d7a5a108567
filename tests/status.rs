//! `citadel status` against a real redis-server: `--json` fields with
//! entries pending for a consumer that read but did not acknowledge, a
//! dead letter left by a real worker, the node stream and a tag stream of
//! the stored device config; the text screen with the same facts; a
//! password in the Redis URL never shown.

mod support;

use serde_json::Value as Json;
use std::path::Path;
use std::time::Duration;
use support::observe::wait_status;
use support::{citadel_cmd, fresh_temp_dir, worker_with_env, xadd_job, RedisServer};

const QUEUE: &str = "jobs:v1:gpu-general";
const WAIT: Duration = Duration::from_secs(30);

fn status(redis_url: &str, state: &Path, extra: &[&str]) -> (i32, String) {
    let state = state.to_str().unwrap();
    let mut args = vec![
        "status",
        "--redis-url",
        redis_url,
        "--node-name",
        "st-node",
        "--state-dir",
        state,
        "--engine-connect-timeout",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let out = citadel_cmd(&args).output().expect("running citadel status");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

fn stream<'a>(v: &'a Json, name: &str) -> &'a Json {
    v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == name)
        .unwrap_or_else(|| panic!("no stream {name} in {v}"))
}

#[test]
fn status_json_reports_pending_entries_consumers_and_dead_letters() {
    let redis = RedisServer::start();
    let state = fresh_temp_dir("status-state");
    std::fs::write(
        state.join("device-config.json"),
        r#"{"deviceName": "rack-4", "customTags": ["a100"]}"#,
    )
    .unwrap();
    let mut conn = redis.conn();

    // A real worker (the same node name and state) dead-letters one job, then stops.
    let state_env = state.to_str().unwrap().to_owned();
    let mut w = worker_with_env(&redis, "st-node", &[], &[("CITADEL_STATE_DIR", &state_env)]);
    xadd_job(
        &mut conn,
        QUEUE,
        "dead-1",
        "echo",
        r#"{"fail": "permanent"}"#,
    );
    wait_status(&mut conn, "dead-1", "failed", WAIT);
    w.sigterm();
    assert!(w.wait_exit(WAIT).is_some(), "the worker did not stop");

    // A consumer that reads two entries and never acknowledges them; a
    // third entry is never delivered (the group's lag).
    xadd_job(&mut conn, QUEUE, "p-1", "echo", "{}");
    xadd_job(&mut conn, QUEUE, "p-2", "echo", "{}");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("stuck-consumer")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(QUEUE)
        .arg(">")
        .query(&mut conn)
        .unwrap();
    xadd_job(&mut conn, QUEUE, "p-3", "echo", "{}");

    let (code, text) = status(&redis.url(), &state, &["--json"]);
    assert_eq!(code, 0, "{text}");
    let v: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));

    assert_eq!(v["node"]["name"], "st-node");
    assert_eq!(v["node"]["device_name"], "rack-4");
    assert!(v["node"]["version"].is_string());
    assert_eq!(v["redis"]["reachable"], true, "{v}");
    assert_eq!(v["redis"]["error"], Json::Null);
    assert_eq!(v["redis"]["group"], "workers");
    assert_eq!(v["nexus"]["url"], Json::Null);

    let q = stream(&v, QUEUE);
    assert_eq!(q["role"], "queue");
    assert_eq!(q["length"], 4, "{q}");
    assert_eq!(q["group_exists"], true);
    assert_eq!(q["pending"], 2, "{q}");
    assert_eq!(q["lag"], 1, "{q}");
    let age = q["oldest_pending_age_seconds"].as_f64().expect("an age");
    assert!((0.0..60.0).contains(&age), "{q}");
    let consumers = q["consumers"].as_array().unwrap();
    let stuck = consumers
        .iter()
        .find(|c| c["name"] == "stuck-consumer")
        .unwrap_or_else(|| panic!("{q}"));
    assert_eq!(stuck["pending"], 2);
    assert!(stuck["idle_seconds"].as_f64().unwrap() >= 0.0);
    let worker = consumers
        .iter()
        .find(|c| c["name"] == "st-node")
        .unwrap_or_else(|| panic!("{q}"));
    assert_eq!(worker["pending"], 0, "it settled what it ran");

    let node = stream(&v, "jobs:v1:node:st-node");
    assert_eq!(
        (&node["role"], &node["length"]),
        (&"node".into(), &0.into())
    );
    let tag = stream(&v, "jobs:v1:tag:a100");
    assert_eq!(tag["role"], "tag");

    let dlq = v["dead_letters"].as_array().unwrap();
    let d = dlq
        .iter()
        .find(|d| d["stream"] == "dlq:v1:gpu-general")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (d["queue"].as_str(), d["length"].as_u64()),
        (Some(QUEUE), Some(1))
    );

    let engines: Vec<&str> = v["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(engines, ["vllm", "ollama", "llamacpp", "extraction"]);
    assert!(v["engines"][0]["state"] == "down", "{v}");
    assert!(v["gpus"].is_array() && v["services"] == Json::Array(vec![]));
    assert!(v["credentials"]["device_api_token"].is_null());

    // The text screen says the same.
    let (code, screen) = status(&redis.url(), &state, &[]);
    assert_eq!(code, 0);
    assert!(
        screen.contains(&format!(
            "redis: {} reachable; group 'workers'",
            redis.url()
        )),
        "{screen}"
    );
    assert!(
        screen.contains("node: st-node (device rack-4), citadel "),
        "{screen}"
    );
    assert!(
        screen.contains("  consumer stuck-consumer: 2 pending, idle "),
        "{screen}"
    );
    let row: Vec<&str> = screen
        .lines()
        .find(|l| l.starts_with(QUEUE))
        .unwrap_or_else(|| panic!("{screen}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[..5], [QUEUE, "queue", "4", "1", "2"], "{screen}");
    let dl: Vec<&str> = screen
        .lines()
        .find(|l| l.starts_with("dlq:v1:gpu-general"))
        .unwrap_or_else(|| panic!("{screen}"))
        .split_whitespace()
        .collect();
    assert_eq!(dl, ["dlq:v1:gpu-general", "1"]);
}

#[test]
fn status_never_shows_the_redis_password() {
    let redis = RedisServer::start();
    let state = fresh_temp_dir("status-secret");
    // This Redis has no password: AUTH fails, and the error must not echo it.
    let url = format!("redis://:s3cr3t-pw@127.0.0.1:{}", redis.port());
    for extra in [&["--json"][..], &[]] {
        let (code, out) = status(&url, &state, extra);
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("s3cr3t-pw"), "{out}");
        assert!(
            out.contains(&format!("redis://:***@127.0.0.1:{}", redis.port())),
            "{out}"
        );
    }
    let (_, out) = status(&url, &state, &["--json"]);
    let v: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(v["redis"]["reachable"], false);
    assert!(v["redis"]["error"].is_string(), "{v}");
    assert_eq!(v["streams"], Json::Array(vec![]));
}
