//! APPLY_DEVICE_CONFIG end to end, the real binary against a real
//! redis-server: the config is validated whole (a bad field changes
//! nothing), stored in `{state-dir}/device-config.json` (0600, survives a
//! restart) and used at once: the device name and tags in every event's
//! `data.meta` and in the heartbeat, tag streams `jobs:v1:tag:{tag}` read
//! without a restart (`citadel submit --tag`), the heartbeat paused while
//! `healthMonitoringEnabled` is false, `sshEnabled` through a fake
//! `systemctl` only where `allow-ssh-control` allows it. The services path
//! (the Docker driver) is not exercised here.

mod support;

use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::observe::{event_type, is_terminal, wait_status};
use support::{
    citadel_cmd, fresh_temp_dir, wait_until, xadd_job, xlen, xrange_all, Citadel, RedisServer,
    Subscriber,
};

const WAIT: Duration = Duration::from_secs(20);
const QUEUE: &str = "jobs:v1:gpu-general";
const GROUP: &str = "workers";

/// A worker `node` with its own state directory `state` (so that a second
/// run of it finds the stored config).
fn worker(redis: &RedisServer, node: &str, state: &Path, extra: &[&str]) -> Citadel {
    worker_env(redis, node, state, extra, &[])
}

fn worker_env(
    redis: &RedisServer,
    node: &str,
    state: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Citadel {
    let state = state.to_str().unwrap().to_owned();
    let mut args = vec!["--state-dir", state.as_str(), "--claim-idle", "5s"];
    args.extend_from_slice(extra);
    support::worker_with_env(redis, node, &args, env)
}

/// The terminal event of `job`, waited for.
fn terminal(sub: &Subscriber, job: &str) -> Json {
    wait_until(&format!("a terminal event of {job}"), WAIT, || {
        sub.events_for(job)
            .into_iter()
            .find(|e| is_terminal(event_type(e)))
    })
}

/// Enqueue an APPLY_DEVICE_CONFIG job with this payload on `stream`; its
/// terminal event.
fn send_config(
    conn: &mut redis::Connection,
    sub: &Subscriber,
    stream: &str,
    job: &str,
    payload: &Json,
) -> Json {
    xadd_job(
        conn,
        stream,
        job,
        "APPLY_DEVICE_CONFIG",
        &payload.to_string(),
    );
    terminal(sub, job)
}

/// Apply `config` through the queue; panics unless the job ended well;
/// returns its result.
fn apply(conn: &mut redis::Connection, sub: &Subscriber, job: &str, config: Json) -> Json {
    let ev = send_config(conn, sub, QUEUE, job, &json!({ "config": config }));
    assert_eq!(event_type(&ev), "end", "{job}: {ev}");
    ev["data"]["result"].clone()
}

/// Run an echo job on `stream` and return its events once it ended.
fn echo(conn: &mut redis::Connection, sub: &Subscriber, stream: &str, job: &str) -> Vec<Json> {
    xadd_job(conn, stream, job, "echo", "{}");
    let end = terminal(sub, job);
    assert_eq!(event_type(&end), "end", "{job}: {end}");
    sub.events_for(job)
}

fn config_file(state: &Path) -> PathBuf {
    state.join("device-config.json")
}

fn stored(state: &Path) -> Json {
    let text = std::fs::read_to_string(config_file(state)).expect("the stored device config");
    serde_json::from_str(&text).expect("the stored device config is JSON")
}

/// Entries of `stream` never delivered to the group, read as another
/// consumer (`probe`): what the worker did not read.
fn unread(conn: &mut redis::Connection, stream: &str) -> Vec<String> {
    let _ = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .exec(conn);
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("probe")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP as probe");
    // [[stream, [[id, [k, v, …]], …]]]: the value after each `jobId`.
    let mut texts = Vec::new();
    flatten(&reply, &mut texts);
    texts
        .windows(2)
        .filter(|w| w[0] == "jobId")
        .map(|w| w[1].clone())
        .collect()
}

fn flatten(v: &redis::Value, out: &mut Vec<String>) {
    match v {
        redis::Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        redis::Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
        _ => {}
    }
}

fn submit(redis: &RedisServer, args: &[&str]) -> std::process::Output {
    let mut cmd: Command = citadel_cmd(args);
    cmd.env("CITADEL_REDIS_URL", redis.url());
    cmd.output().expect("running citadel submit")
}

#[test]
fn a_valid_config_is_applied_and_stored_0600_and_the_same_again_is_no_changes() {
    use std::os::unix::fs::PermissionsExt;
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let _w = worker(&redis, "dc-apply", &state, &[]);
    let mut conn = redis.conn();
    let config = json!({
        "deviceName": "rack-3.gpu_01",
        "customTags": ["a100", "eu-west"],
        "sshEnabled": false,
        "healthMonitoringEnabled": true,
        "alertOnOffline": true,
        "alertOnHighTemp": false,
        "services": ["vllm"],
        "autoStartServices": false,
        "wizardStep": 4
    });
    let r = apply(&mut conn, &sub, "cfg-1", config.clone());
    let changed = &r["changed"];
    assert_eq!(
        changed["deviceName"],
        json!({"old": null, "new": "rack-3.gpu_01"}),
        "{r}"
    );
    assert_eq!(
        changed["customTags"],
        json!({"added": ["a100", "eu-west"], "removed": []})
    );
    assert_eq!(
        changed["alertOnOffline"],
        json!({"old": false, "new": true})
    );
    assert_eq!(changed["services"], json!({"old": [], "new": ["vllm"]}));
    assert_eq!(changed["sshEnabled"], json!({"old": null, "new": false}));
    assert!(
        changed.get("healthMonitoringEnabled").is_none(),
        "unchanged fields are not listed: {r}"
    );
    assert_eq!(r["unknown_fields"], json!(["wizardStep"]));
    assert!(r["services"].is_null(), "autoStartServices is off: {r}");
    assert_eq!(r["ssh"]["action"], "none", "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.starts_with("changed ") && message.contains("deviceName"),
        "{r}"
    );

    let file = config_file(&state);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    let on_disk = stored(&state);
    assert_eq!(on_disk["deviceName"], "rack-3.gpu_01");
    assert_eq!(on_disk["customTags"], json!(["a100", "eu-west"]));
    assert_eq!(on_disk["alertOnOffline"], true);
    assert_eq!(on_disk["services"], json!(["vllm"]));
    assert!(on_disk.get("wizardStep").is_none(), "{on_disk}");
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The same config again, as a JSON string this time.
    let again = send_config(
        &mut conn,
        &sub,
        QUEUE,
        "cfg-2",
        &json!({ "config": config.to_string() }),
    );
    assert_eq!(event_type(&again), "end", "{again}");
    let r = &again["data"]["result"];
    assert_eq!(r["message"], "no changes", "{r}");
    assert_eq!(r["changed"], json!({}));
    assert_eq!(stored(&state), on_disk);

    // A partial config changes only what it names.
    let r = apply(&mut conn, &sub, "cfg-3", json!({"alertOnHighTemp": true}));
    assert_eq!(r["message"], "changed alertOnHighTemp", "{r}");
    let after = stored(&state);
    assert_eq!(after["alertOnHighTemp"], true);
    assert_eq!(after["deviceName"], "rack-3.gpu_01");
    assert_eq!(after["customTags"], json!(["a100", "eu-west"]));
}

#[test]
fn events_carry_the_device_name_and_tags_also_after_a_restart() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let mut w = worker(&redis, "dc-meta", &state, &[]);
    let mut conn = redis.conn();

    let before = echo(&mut conn, &sub, QUEUE, "before");
    assert_eq!(
        before[0]["data"]["meta"],
        json!({"node_id": "dc-meta", "node_name": "dc-meta", "tags": []})
    );
    apply(
        &mut conn,
        &sub,
        "cfg",
        json!({"deviceName": "edge-7", "customTags": ["t1", "gpu:h200"]}),
    );
    let want = json!({"node_id": "dc-meta", "node_name": "edge-7", "tags": ["t1", "gpu:h200"]});
    let events = echo(&mut conn, &sub, QUEUE, "after");
    let kinds: Vec<&str> = events.iter().map(event_type).collect();
    assert_eq!(kinds, ["claimed", "start", "end"]);
    for ev in &events {
        assert_eq!(ev["data"]["meta"], want, "{ev}");
    }
    assert!(
        events[1]["data"]["message"]
            .as_str()
            .unwrap()
            .ends_with("on edge-7"),
        "{}",
        events[1]
    );

    w.sigterm();
    assert!(w.wait_exit(WAIT).is_some(), "the worker stops on SIGTERM");
    let w2 = worker(&redis, "dc-meta", &state, &[]);
    let events = echo(&mut conn, &sub, QUEUE, "restarted");
    for ev in &events {
        assert_eq!(ev["data"]["meta"], want, "{ev}");
    }
    assert!(
        w2.log().contains("device config:"),
        "the stored config is logged at start"
    );
}

#[test]
fn a_corrupt_config_file_is_logged_and_the_agent_runs_with_its_settings() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    std::fs::write(config_file(&state), "{\"deviceName\": ").unwrap();
    let w = worker(&redis, "dc-corrupt", &state, &[]);
    let mut conn = redis.conn();
    let events = echo(&mut conn, &sub, QUEUE, "j");
    assert_eq!(events[0]["data"]["meta"]["node_name"], "dc-corrupt");
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("device-config.json"))
        .unwrap_or_else(|| panic!("no warning naming the file:\n{log}"));
    assert!(line.contains("not usable"), "{line}");
    // A config job replaces it.
    apply(&mut conn, &sub, "cfg", json!({"deviceName": "fixed"}));
    assert_eq!(stored(&state)["deviceName"], "fixed");
}

#[test]
fn a_tag_routes_jobs_without_a_restart_and_a_removed_tag_is_no_longer_read() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let w = worker(&redis, "dc-tags", &state, &[]);
    let mut conn = redis.conn();

    apply(&mut conn, &sub, "cfg-t1", json!({"customTags": ["t1"]}));
    let out = submit(
        &redis,
        &[
            "submit", "--type", "echo", "--tag", "t1", "--job-id", "via-t1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-t1");
    assert_eq!(event_type(&terminal(&sub, "via-t1")), "end");
    assert_eq!(xlen(&mut conn, "jobs:v1:tag:t1"), 1);

    // A failure on a tag stream is dead-lettered where the naming puts it.
    xadd_job(
        &mut conn,
        "jobs:v1:tag:t1",
        "bad-t1",
        "echo",
        r#"{"fail":"permanent"}"#,
    );
    assert_eq!(event_type(&terminal(&sub, "bad-t1")), "error");
    let dl = xrange_all(&mut conn, "dlq:v1:tag:t1");
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0].1["original_queue"], "jobs:v1:tag:t1");
    let state_arg = state.to_str().unwrap();
    let out = submit(&redis, &["dlq", "list", "--state-dir", state_arg]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("dlq:v1:tag:t1: 1 dead letter") && listed.contains("bad-t1"),
        "citadel dlq covers the stored tags' streams: {listed}"
    );

    apply(&mut conn, &sub, "cfg-t2", json!({"customTags": ["t2"]}));
    // Read on t2 proves the reader took the new list (which has no t1).
    xadd_job(&mut conn, "jobs:v1:tag:t2", "via-t2", "echo", "{}");
    assert_eq!(event_type(&terminal(&sub, "via-t2")), "end");
    xadd_job(&mut conn, "jobs:v1:tag:t1", "left-on-t1", "echo", "{}");
    echo(&mut conn, &sub, "jobs:v1:tag:t2", "barrier-1");
    echo(&mut conn, &sub, QUEUE, "barrier-2");
    assert!(sub.events_for("left-on-t1").is_empty());
    let unread = unread(&mut conn, "jobs:v1:tag:t1");
    assert_eq!(unread, ["left-on-t1"], "the t1 entry was never delivered");
    assert!(
        w.log().contains("the device config's tags changed"),
        "the new list is logged"
    );
}

#[test]
fn tag_streams_false_reads_no_tag_stream() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let w = worker(&redis, "dc-notags", &state, &["--tag-streams=false"]);
    let mut conn = redis.conn();
    let r = apply(&mut conn, &sub, "cfg", json!({"customTags": ["t1"]}));
    assert!(r["changed"]["customTags"].is_object(), "{r}");
    xadd_job(&mut conn, "jobs:v1:tag:t1", "on-t1", "echo", "{}");
    echo(&mut conn, &sub, QUEUE, "barrier-1");
    echo(&mut conn, &sub, QUEUE, "barrier-2");
    // The tags are still the node's tags, in events.
    let ev = &sub.events_for("barrier-2")[0];
    assert_eq!(ev["data"]["meta"]["tags"], json!(["t1"]));
    assert!(sub.events_for("on-t1").is_empty());
    assert_eq!(unread(&mut conn, "jobs:v1:tag:t1"), ["on-t1"]);
    assert!(w.log().contains("tag streams: off (--tag-streams=false)"));
}

/// A directory with a fake `systemctl` that appends its arguments to
/// `calls` and fails (exit 5, a message on stderr) while `fail` exists.
fn fake_systemctl() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = fresh_temp_dir("systemctl");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> '{d}/calls'\nif [ -e '{d}/fail' ]; then echo 'Unit sshd.service not found.' >&2; exit 5; fi\n",
        d = dir.display()
    );
    let path = dir.join("systemctl");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn ssh_enabled_runs_systemctl_only_where_allowed() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let fake = fake_systemctl();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let env = [("PATH", path.as_str())];
    let _allowed = worker_env(
        &redis,
        "dc-ssh-on",
        &fresh_temp_dir("devcfg-state"),
        &["--allow-ssh-control", "--ssh-unit", "sshd"],
        &env,
    );
    let _refused = worker_env(
        &redis,
        "dc-ssh-off",
        &fresh_temp_dir("devcfg-state"),
        &[],
        &env,
    );
    let mut conn = redis.conn();
    let on = "jobs:v1:node:dc-ssh-on";
    let off = "jobs:v1:node:dc-ssh-off";
    let ssh = |conn: &mut redis::Connection, stream: &str, job: &str, enabled: bool| {
        let ev = send_config(
            conn,
            &sub,
            stream,
            job,
            &json!({"config": {"sshEnabled": enabled}}),
        );
        assert_eq!(event_type(&ev), "end", "{ev}");
        ev["data"]["result"]["ssh"].clone()
    };

    let r = ssh(&mut conn, off, "off-1", true);
    assert_eq!(r["action"], "none", "{r}");
    assert!(r["note"].as_str().unwrap().contains("allow-ssh-control"));
    assert!(calls(&fake).is_empty(), "{:?}", calls(&fake));

    let r = ssh(&mut conn, on, "on-1", true);
    assert_eq!(
        r,
        json!({"enabled": true, "action": "systemctl start sshd", "ok": true})
    );
    assert_eq!(calls(&fake), ["start sshd"]);
    let r = ssh(&mut conn, on, "on-2", false);
    assert_eq!(r["action"], "systemctl stop sshd");
    assert_eq!(calls(&fake), ["start sshd", "stop sshd"]);

    std::fs::write(fake.join("fail"), "").unwrap();
    let r = ssh(&mut conn, on, "on-3", true);
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("Unit sshd.service not found") && err.contains("5"),
        "{err}"
    );
    // The other worker still ran nothing.
    assert_eq!(calls(&fake).len(), 3);
}

#[test]
fn invalid_configs_fail_permanently_name_the_field_and_change_nothing() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let _w = worker(&redis, "dc-bad", &state, &["--concurrency", "2"]);
    let mut conn = redis.conn();
    apply(
        &mut conn,
        &sub,
        "good",
        json!({"deviceName": "good-name", "customTags": ["t1"]}),
    );
    let before = std::fs::read(config_file(&state)).unwrap();

    let many: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
    let cases: Vec<(&str, Json, &str)> = vec![
        (
            "empty-name",
            json!({"config": {"deviceName": ""}}),
            "config.deviceName: must be 1 to 64",
        ),
        (
            "long-name",
            json!({"config": {"deviceName": "n".repeat(65)}}),
            "config.deviceName: must be 1 to 64",
        ),
        (
            "space-name",
            json!({"config": {"deviceName": "a b"}}),
            "config.deviceName: ' '",
        ),
        (
            "path-name",
            json!({"config": {"deviceName": "../x"}}),
            "config.deviceName: '/'",
        ),
        (
            "unknown-service",
            json!({"config": {"services": ["vllm", "tgi"], "deviceName": "other"}}),
            "config.services[1]: 'tgi' is not a service",
        ),
        (
            "string-bool",
            json!({"config": {"autoStartServices": "yes"}}),
            "config.autoStartServices: must be true or false",
        ),
        (
            "tags-not-array",
            json!({"config": {"customTags": "t1"}}),
            "config.customTags: must be an array",
        ),
        (
            "tag-not-string",
            json!({"config": {"customTags": ["a", "b", "c", 4]}}),
            "config.customTags[3]: must be a string",
        ),
        (
            "too-many-tags",
            json!({"config": {"customTags": many}}),
            "config.customTags: 10000 tags, at most 100",
        ),
        (
            "tag-too-long",
            json!({"config": {"customTags": ["x".repeat(65)]}}),
            "config.customTags[0]: must be 1 to 64",
        ),
        ("no-config", json!({"deviceName": "x"}), "config: missing"),
        (
            "not-json",
            json!({"config": "{\"deviceName\": "}),
            "config: a string that is not JSON",
        ),
        (
            "json-not-object",
            json!({"config": "[\"deviceName\"]"}),
            "config: the JSON string holds an array, not an object",
        ),
        (
            "number",
            json!({"config": 42}),
            "config: must be an object or a JSON string of one, not a number",
        ),
    ];
    for (job, payload, _) in &cases {
        xadd_job(
            &mut conn,
            QUEUE,
            job,
            "APPLY_DEVICE_CONFIG",
            &payload.to_string(),
        );
    }
    for (job, _, want) in &cases {
        let ev = terminal(&sub, job);
        assert_eq!(event_type(&ev), "error", "{job}: {ev}");
        let err = ev["data"]["error"].as_str().unwrap();
        assert!(err.contains(want), "{job}: {err:?} should contain {want:?}");
        assert_eq!(ev["data"]["recoverable"], false, "{job}");
        let status = wait_status(&mut conn, job, "failed", WAIT);
        assert!(status["error"].contains(want), "{job}: {status:?}");
    }
    let dl = xrange_all(&mut conn, "dlq:v1:gpu-general");
    assert_eq!(dl.len(), cases.len(), "each one dead-lettered once");
    assert!(
        dl.iter().all(|(_, f)| f["reason"] == "permanent error"),
        "{dl:?}"
    );
    assert_eq!(std::fs::read(config_file(&state)).unwrap(), before);
    let events = echo(&mut conn, &sub, QUEUE, "after");
    assert_eq!(
        events[0]["data"]["meta"],
        json!({"node_id": "dc-bad", "node_name": "good-name", "tags": ["t1"]})
    );
}

const HB: &str = "node:status:stream";

fn beats(conn: &mut redis::Connection) -> Vec<Json> {
    xrange_all(conn, HB)
        .into_iter()
        .map(|(_, f)| serde_json::from_str(&f["payload"]).unwrap())
        .collect()
}

#[test]
fn heartbeat_carries_the_device_name_and_tags_and_pauses_while_monitoring_is_off() {
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let state = fresh_temp_dir("devcfg-state");
    let w = worker(&redis, "dc-hb", &state, &["--heartbeat-interval", "100ms"]);
    let mut conn = redis.conn();
    apply(
        &mut conn,
        &sub,
        "cfg-1",
        json!({"deviceName": "hb-dev", "customTags": ["x1"], "alertOnOffline": true}),
    );
    let beat = wait_until("a beat with the device name", WAIT, || {
        beats(&mut conn)
            .into_iter()
            .find(|b| b["nodeName"] == "hb-dev")
    });
    assert_eq!(beat["nodeId"], "dc-hb");
    assert_eq!(beat["tags"], json!(["x1"]));
    assert_eq!(
        beat["monitoring"],
        json!({"healthMonitoringEnabled": true, "alertOnOffline": true, "alertOnHighTemp": false})
    );
    let (_, fields) = xrange_all(&mut conn, HB).pop().unwrap();
    assert_eq!(
        fields["nodeId"], "dc-hb",
        "the stream's nodeId stays the node name"
    );

    apply(
        &mut conn,
        &sub,
        "cfg-2",
        json!({"healthMonitoringEnabled": false}),
    );
    w.wait_for_log("heartbeat: paused", WAIT);
    let skipped = |w: &Citadel| w.log().matches("beat skipped").count();
    let n = skipped(&w);
    let len = xlen(&mut conn, HB);
    wait_until("three more skipped beats", WAIT, || {
        (skipped(&w) >= n + 3).then_some(())
    });
    assert_eq!(xlen(&mut conn, HB), len, "no beat while monitoring is off");

    apply(
        &mut conn,
        &sub,
        "cfg-3",
        json!({"healthMonitoringEnabled": true}),
    );
    wait_until("beats again", WAIT, || {
        (xlen(&mut conn, HB) > len).then_some(())
    });
    let last = beats(&mut conn).pop().unwrap();
    assert_eq!(last["monitoring"]["healthMonitoringEnabled"], true);
    assert_eq!(last["nodeName"], "hb-dev");
}
