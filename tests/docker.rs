//! Node services through the Docker driver, against a REAL private Docker
//! daemon per test (tests/support/docker.rs): `citadel services …` and
//! `citadel up` start, keep, recreate, restart and remove containers made
//! from locally imported test images (nothing is pulled; `--network host`;
//! every port on 127.0.0.1, free ports so tests run in parallel). A fake
//! `docker` (a script recording its arguments) only for what this daemon
//! cannot show: `--gpus all`, a failing pull. A fake `nvidia-smi` first on
//! PATH decides whether the node "has GPUs" in every test.
//!
//! End to end: an image made from the cached real `llama-server` (binary
//! plus the libraries `ldd` lists), the real model mounted, `citadel up`
//! starting it, and an `llm_inference` job streaming tokens from it.

mod support;

use serde_json::{json, Value as Json};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::docker::{docker_cli, http_get, write_script, DockerDaemon};
use support::{
    citadel_cmd, free_port, fresh_temp_dir, skip_unless_ci, wait_until, xadd_job, Citadel,
    RedisServer, Subscriber,
};

const WAIT: Duration = Duration::from_secs(60);
const ENGINE: &str = "citadel-test/engine:1";
const MUTATING: &[&str] = &[
    "run", "start", "stop", "restart", "rm", "create", "pull", "kill", "rename", "update",
];

/// A private daemon with the test engine image, a models dir holding
/// `marker`, a fake `nvidia-smi` (no GPU) first on PATH and free ports for
/// the engines.
struct Node {
    daemon: DockerDaemon,
    dir: PathBuf,
    models: PathBuf,
    path: String,
    llamacpp: u16,
    ollama: u16,
}

fn node(test: &str) -> Option<Node> {
    let daemon = DockerDaemon::start(test)?;
    daemon.engine_image(ENGINE);
    let dir = fresh_temp_dir("docker-node");
    let models = dir.join("models");
    fs::create_dir_all(&models).unwrap();
    fs::write(models.join("marker"), "models-dir-is-mounted\n").unwrap();
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    write_script(&bin.join("nvidia-smi"), "#!/bin/sh\nexit 0\n");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Some(Node {
        daemon,
        dir,
        models,
        path,
        llamacpp: free_port(),
        ollama: free_port(),
    })
}

impl Node {
    /// The settings every call shares: both engines from the test image.
    fn args(&self, services: &str) -> Vec<String> {
        [
            "--services",
            services,
            "--llamacpp-model",
            "m.gguf",
            "--service-image",
            &format!("llamacpp={ENGINE}"),
            "--service-image",
            &format!("ollama={ENGINE}"),
            "--llamacpp-url",
            &format!("http://127.0.0.1:{}", self.llamacpp),
            "--ollama-url",
            &format!("http://127.0.0.1:{}", self.ollama),
            "--models-dir",
            self.models.to_str().unwrap(),
            "--service-ready-timeout",
            "60s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `citadel ARGS` against the daemon (and `extra` settings).
    fn citadel(&self, args: &[&str], extra: &[String]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(extra.iter().map(String::as_str));
        citadel_cmd(&all)
            .env("DOCKER_HOST", self.daemon.host())
            .env("PATH", &self.path)
            .output()
            .unwrap_or_else(|e| panic!("running citadel {all:?}: {e}"))
    }

    /// `citadel services SUB --json` + `extra`: (exit code, JSON, stderr).
    fn services(&self, sub: &[&str], extra: &[String]) -> (i32, Json, String) {
        let mut args = vec!["services"];
        args.extend_from_slice(sub);
        args.push("--json");
        let out = self.citadel(&args, extra);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("citadel {args:?}: {e}: {stdout}\n{stderr}"));
        (out.status.code().unwrap_or(-1), json, stderr)
    }

    /// `citadel up` + `extra` with a real Redis: the reconcile report it
    /// logged before starting the agent (which is then killed).
    fn up(&self, extra: &[String]) -> Json {
        let redis = RedisServer::start();
        let mut args = vec!["up", "--redis-url"];
        let url = redis.url();
        args.push(&url);
        args.extend(extra.iter().map(String::as_str));
        let c = Citadel::spawn(
            &args,
            &[("DOCKER_HOST", self.daemon.host()), ("PATH", &self.path)],
        );
        c.wait_for_log("starting the agent", WAIT * 2);
        report_in(&c.log())
    }

    fn id(&self, container: &str) -> String {
        self.daemon.inspect(container, "{{.Id}}")
    }

    /// What the test engine in `container`, on `port`, says of itself.
    fn seen(&self, port: u16, what: &str) -> String {
        http_get(&format!("http://127.0.0.1:{port}/{what}"), WAIT)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The JSON of `citadel up: services {…}` in a log.
fn report_in(log: &str) -> Json {
    let line = log
        .lines()
        .find(|l| l.contains("citadel up: services {"))
        .unwrap_or_else(|| panic!("no reconcile report in the log:\n{log}"));
    let start = line.find('{').unwrap();
    let end = line.rfind('}').unwrap();
    serde_json::from_str(&line[start..=end]).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn names(v: &Json) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

fn failures(report: &Json, key: &str) -> Vec<(String, String)> {
    report[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["service"].as_str().unwrap().to_owned(),
                f["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A wrapper around the real docker CLI that logs each call's arguments.
fn logging_docker(dir: &Path) -> (PathBuf, PathBuf) {
    let real = docker_cli().expect("docker on PATH");
    let log = dir.join("docker-calls.log");
    let wrapper = dir.join("docker-logged");
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            real.display()
        ),
    );
    (wrapper, log)
}

#[test]
fn first_start_runs_the_engines_as_specified_and_a_second_changes_nothing() {
    let Some(n) = node("first_start_runs_the_engines_as_specified_and_a_second_changes_nothing")
    else {
        return;
    };
    let mut args = n.args("llamacpp,ollama");
    args.extend([
        "--service-args".into(),
        "llamacpp=-c 256 --alias 'two words'".into(),
    ]);
    let (code, report, stderr) = n.services(&["start"], &args);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(
        names(&report["started"]),
        ["llamacpp", "ollama"],
        "{report}"
    );
    assert_eq!(names(&report["ready"]), ["llamacpp", "ollama"], "{report}");
    assert_eq!(
        stderr.matches("started container citadel-llamacpp").count(),
        1,
        "{stderr}"
    );

    // The arguments the engine got: the model in the mount, host, port, extras.
    let port = n.llamacpp.to_string();
    assert_eq!(
        n.seen(n.llamacpp, "args").lines().collect::<Vec<_>>(),
        [
            "-m",
            "/models/m.gguf",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "-c",
            "256",
            "--alias",
            "two words"
        ]
    );
    assert_eq!(n.seen(n.llamacpp, "marker").trim(), "models-dir-is-mounted");
    // Ollama: `serve`, the address and model store in its environment.
    assert_eq!(n.seen(n.ollama, "args").trim(), "serve");
    let env = n.seen(n.ollama, "env");
    assert!(
        env.contains(&format!("OLLAMA_HOST=127.0.0.1:{}", n.ollama)),
        "{env}"
    );
    assert!(env.contains("OLLAMA_MODELS=/models/ollama"), "{env}");

    let d = &n.daemon;
    let labels: Json =
        serde_json::from_str(&d.inspect("citadel-llamacpp", "{{json .Config.Labels}}")).unwrap();
    assert_eq!(labels["citadel.service"], "llamacpp", "{labels}");
    let spec = labels["citadel.spec"].as_str().unwrap();
    assert!(
        spec.len() == 64 && spec.chars().all(|c| c.is_ascii_hexdigit()),
        "{spec}"
    );
    assert_eq!(
        d.inspect("citadel-llamacpp", "{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );
    assert_eq!(
        d.inspect("citadel-llamacpp", "{{.HostConfig.NetworkMode}}"),
        "host"
    );
    let mounts: Json =
        serde_json::from_str(&d.inspect("citadel-llamacpp", "{{json .Mounts}}")).unwrap();
    assert_eq!(mounts.as_array().unwrap().len(), 1, "{mounts}");
    assert_eq!(mounts[0]["Destination"], "/models", "{mounts}");
    assert_eq!(mounts[0]["Source"], n.models.to_str().unwrap(), "{mounts}");
    let ids = (n.id("citadel-llamacpp"), n.id("citadel-ollama"));

    // Again, through a docker that logs its calls: nothing mutating ran.
    let (wrapper, calls) = logging_docker(&n.dir);
    args.extend(["--docker".into(), wrapper.to_str().unwrap().into()]);
    let report = n.up(&args);
    assert_eq!(names(&report["kept"]), ["llamacpp", "ollama"], "{report}");
    for key in ["started", "recreated", "restarted", "stopped"] {
        assert!(names(&report[key]).is_empty(), "{key}: {report}");
    }
    assert_eq!(names(&report["ready"]), ["llamacpp", "ollama"], "{report}");
    let log = fs::read_to_string(&calls).unwrap();
    assert!(log.lines().any(|l| l.starts_with("ps ")), "{log}");
    for line in log.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        assert!(
            !MUTATING.contains(&first),
            "a mutating docker call: {line}\n{log}"
        );
    }
    assert_eq!((n.id("citadel-llamacpp"), n.id("citadel-ollama")), ids);
}

/// The docker calls logged since the last look, and the log emptied.
fn take_calls(calls: &Path) -> Vec<String> {
    let text = fs::read_to_string(calls).unwrap_or_default();
    fs::write(calls, "").unwrap();
    text.lines().map(str::to_owned).collect()
}

fn mutating(calls: &[String]) -> Vec<&String> {
    calls
        .iter()
        .filter(|l| MUTATING.contains(&l.split_whitespace().next().unwrap_or("")))
        .collect()
}

/// Enqueue an APPLY_DEVICE_CONFIG job; its terminal event.
fn config_job(conn: &mut redis::Connection, sub: &Subscriber, job: &str, config: &Json) -> Json {
    xadd_job(
        conn,
        "jobs:v1:gpu-general",
        job,
        "APPLY_DEVICE_CONFIG",
        &json!({ "config": config }).to_string(),
    );
    wait_until(&format!("the terminal event of {job}"), WAIT * 2, || {
        sub.events_for(job)
            .into_iter()
            .find(|e| matches!(e["type"].as_str(), Some("end" | "error" | "cancelled")))
    })
}

#[test]
fn a_config_job_reconciles_the_services_and_the_same_config_again_runs_no_mutating_command() {
    let Some(n) = node(
        "a_config_job_reconciles_the_services_and_the_same_config_again_runs_no_mutating_command",
    ) else {
        return;
    };
    let (wrapper, calls) = logging_docker(&n.dir);
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let mut args = n.args("");
    args.extend([
        "--docker".into(),
        wrapper.to_str().unwrap().into(),
        "--redis-url".into(),
        redis.url(),
    ]);
    let mut all = vec!["work"];
    all.extend(args.iter().map(String::as_str));
    let mut c = Citadel::spawn(&all, &[("DOCKER_HOST", n.daemon.host()), ("PATH", &n.path)]);
    c.wait_working();
    let mut conn = redis.conn();

    // The wizard's config: both engines, started automatically.
    let config = json!({"deviceName": "edge-7", "services": ["llamacpp", "ollama"],
                        "autoStartServices": true, "customTags": ["lab"]});
    let end = config_job(&mut conn, &sub, "cfg-1", &config);
    assert_eq!(end["type"], "end", "{end}\n{}", c.log());
    let services = &end["data"]["result"]["services"];
    assert_eq!(names(&services["started"]), ["llamacpp", "ollama"], "{end}");
    assert_eq!(names(&services["ready"]), ["llamacpp", "ollama"], "{end}");
    assert_eq!(end["data"]["meta"]["node_name"], "edge-7", "{end}");
    assert!(!mutating(&take_calls(&calls)).is_empty());
    let port = n.llamacpp.to_string();
    assert!(
        n.seen(n.llamacpp, "args").lines().any(|l| l == port),
        "the engine serves where --llamacpp-url points"
    );
    let ids = (n.id("citadel-llamacpp"), n.id("citadel-ollama"));

    // The same config again: no changes, and no mutating docker command.
    let end = config_job(&mut conn, &sub, "cfg-2", &config);
    assert_eq!(end["type"], "end", "{end}");
    let result = &end["data"]["result"];
    assert_eq!(result["message"], "no changes", "{result}");
    assert_eq!(names(&result["services"]["kept"]), ["llamacpp", "ollama"]);
    let seen = take_calls(&calls);
    assert!(seen.iter().any(|l| l.starts_with("ps ")), "{seen:?}");
    assert!(mutating(&seen).is_empty(), "{seen:?}");
    assert_eq!((n.id("citadel-llamacpp"), n.id("citadel-ollama")), ids);

    // An invalid config changes nothing, in Redis's view or Docker's.
    let bad = json!({"services": ["llamacpp", "tgi"], "autoStartServices": true});
    let end = config_job(&mut conn, &sub, "cfg-bad", &bad);
    assert_eq!(end["type"], "error", "{end}");
    let error = end["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("config.services[1]") && error.contains("tgi"),
        "{error}"
    );
    assert!(take_calls(&calls).is_empty(), "no docker call at all");

    // Ollama no longer wanted: stopped and removed; llama.cpp kept.
    let end = config_job(
        &mut conn,
        &sub,
        "cfg-3",
        &json!({"services": ["llamacpp"], "autoStartServices": true}),
    );
    assert_eq!(end["type"], "end", "{end}");
    let services = &end["data"]["result"]["services"];
    assert_eq!(names(&services["stopped"]), ["ollama"], "{end}");
    assert_eq!(names(&services["kept"]), ["llamacpp"], "{end}");
    assert!(n
        .daemon
        .ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .all(|l| l != "citadel-ollama"));
    assert_eq!(n.id("citadel-llamacpp"), ids.0);
    c.sigterm();
    assert!(
        c.wait_exit(WAIT).is_some_and(|s| s.success()),
        "{}",
        c.log()
    );
}

#[test]
fn a_service_no_longer_wanted_is_stopped_and_removed() {
    let Some(n) = node("a_service_no_longer_wanted_is_stopped_and_removed") else {
        return;
    };
    let report = n.up(&n.args("llamacpp,ollama"));
    assert_eq!(
        names(&report["started"]),
        ["llamacpp", "ollama"],
        "{report}"
    );
    let report = n.up(&n.args("ollama"));
    assert_eq!(names(&report["stopped"]), ["llamacpp"], "{report}");
    assert_eq!(names(&report["kept"]), ["ollama"], "{report}");
    let left = n.daemon.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(left, "citadel-ollama");
    // `services start NAME` leaves the others alone.
    let (code, report, _) = n.services(&["start", "llamacpp"], &n.args("ollama"));
    assert_eq!(code, 0, "{report}");
    assert_eq!(names(&report["started"]), ["llamacpp"], "{report}");
    assert!(names(&report["stopped"]).is_empty(), "{report}");
    assert_eq!(n.daemon.all_ids().len(), 2);
}

#[test]
fn a_changed_image_or_argument_recreates_the_container() {
    let Some(n) = node("a_changed_image_or_argument_recreates_the_container") else {
        return;
    };
    let (code, report, _) = n.services(&["start"], &n.args("llamacpp"));
    assert_eq!(code, 0, "{report}");
    let first = n.id("citadel-llamacpp");

    let mut args = n.args("llamacpp");
    args.extend(["--service-args".into(), "llamacpp=--threads 1".into()]);
    let (code, report, _) = n.services(&["start"], &args);
    assert_eq!(code, 0, "{report}");
    assert_eq!(names(&report["recreated"]), ["llamacpp"], "{report}");
    let second = n.id("citadel-llamacpp");
    assert_ne!(first, second);
    let seen = n.seen(n.llamacpp, "args");
    assert!(seen.ends_with("--threads\n1\n"), "{seen}");

    n.daemon.engine_image("citadel-test/engine:2");
    args.extend([
        "--service-image".into(),
        "llamacpp=citadel-test/engine:2".into(),
    ]);
    let (code, report, _) = n.services(&["start"], &args);
    assert_eq!(code, 0, "{report}");
    assert_eq!(names(&report["recreated"]), ["llamacpp"], "{report}");
    assert_ne!(n.id("citadel-llamacpp"), second);
    assert_eq!(
        n.daemon.inspect("citadel-llamacpp", "{{.Config.Image}}"),
        "citadel-test/engine:2"
    );
    assert_eq!(n.daemon.all_ids().len(), 1, "the old containers are gone");
}

#[test]
fn a_container_stopped_by_hand_is_started_again() {
    let Some(n) = node("a_container_stopped_by_hand_is_started_again") else {
        return;
    };
    let (code, report, _) = n.services(&["start"], &n.args("llamacpp"));
    assert_eq!(code, 0, "{report}");
    let id = n.id("citadel-llamacpp");
    n.daemon.ok(&["stop", "-t", "1", "citadel-llamacpp"]);
    assert_eq!(
        n.daemon.inspect("citadel-llamacpp", "{{.State.Status}}"),
        "exited"
    );
    let report = n.up(&n.args("llamacpp"));
    assert_eq!(names(&report["restarted"]), ["llamacpp"], "{report}");
    assert_eq!(names(&report["ready"]), ["llamacpp"], "{report}");
    assert_eq!(n.id("citadel-llamacpp"), id, "the same container, started");
    assert_eq!(
        n.daemon.inspect("citadel-llamacpp", "{{.State.Status}}"),
        "running"
    );
}

#[test]
fn a_container_citadel_did_not_make_is_left_alone() {
    let Some(n) = node("a_container_citadel_did_not_make_is_left_alone") else {
        return;
    };
    let d = &n.daemon;
    let own_port = free_port().to_string();
    let squatter = d.ok(&[
        "run",
        "-d",
        "--name",
        "citadel-llamacpp",
        "--network",
        "host",
        ENGINE,
        "--port",
        &own_port,
        "--host",
        "127.0.0.1",
    ]);
    let bystander_port = free_port().to_string();
    let bystander = d.ok(&[
        "run",
        "-d",
        "--name",
        "bystander",
        "--network",
        "host",
        ENGINE,
        "--port",
        &bystander_port,
        "--host",
        "127.0.0.1",
    ]);
    let report = n.up(&n.args("llamacpp,ollama"));
    let failed = failures(&report, "failed");
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!(failed[0].0, "llamacpp");
    assert!(
        failed[0]
            .1
            .contains("citadel-llamacpp is taken by a container citadel did not make"),
        "{report}"
    );
    assert_eq!(names(&report["started"]), ["ollama"], "{report}");
    // Nothing of theirs changed, also when nothing is wanted any more.
    let report = n.up(&{
        let mut a = n.args("ollama");
        a.extend(["--services".into(), "".into()]);
        a
    });
    assert_eq!(names(&report["stopped"]), ["ollama"], "{report}");
    for (name, id) in [("citadel-llamacpp", &squatter), ("bystander", &bystander)] {
        assert_eq!(&n.id(name), id);
        assert_eq!(d.inspect(name, "{{.State.Status}}"), "running", "{name}");
    }
}

#[test]
fn the_health_wait_reports_an_engine_that_exits_as_not_ready() {
    let Some(n) = node("the_health_wait_reports_an_engine_that_exits_as_not_ready") else {
        return;
    };
    n.daemon
        .exiting_image("citadel-test/broken:1", "cannot load model m.gguf", 3);
    let mut args = n.args("llamacpp,ollama");
    args.extend([
        "--service-image".into(),
        "llamacpp=citadel-test/broken:1".into(),
    ]);
    let (code, report, _) = n.services(&["start"], &args);
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        names(&report["started"]),
        ["llamacpp", "ollama"],
        "{report}"
    );
    assert_eq!(names(&report["ready"]), ["ollama"], "{report}");
    let not_ready = failures(&report, "not_ready");
    assert_eq!(not_ready.len(), 1, "{report}");
    assert_eq!(not_ready[0].0, "llamacpp");
    assert!(not_ready[0].1.contains("exited with code 3"), "{report}");
    assert!(
        not_ready[0].1.contains("cannot load model m.gguf"),
        "{report}"
    );

    // `citadel up` logs it and runs the agent anyway.
    let report = n.up(&args);
    assert_eq!(failures(&report, "not_ready")[0].0, "llamacpp", "{report}");
}

#[test]
fn an_engine_that_never_answers_is_not_ready_at_the_timeout() {
    let Some(n) = node("an_engine_that_never_answers_is_not_ready_at_the_timeout") else {
        return;
    };
    // Listening elsewhere than the URL says: the container runs, the URL is silent.
    let mut args = n.args("llamacpp");
    let elsewhere = free_port();
    args.extend([
        "--service-args".into(),
        format!("llamacpp=--port {elsewhere}"),
        "--service-ready-timeout".into(),
        "2s".into(),
    ]);
    let (code, report, _) = n.services(&["start"], &args);
    assert_eq!(code, 1, "{report}");
    let not_ready = failures(&report, "not_ready");
    assert!(
        not_ready[0].1.contains("did not answer") && not_ready[0].1.contains("within 2s"),
        "{report}"
    );
}

#[test]
fn a_taken_port_fails_that_service_and_the_others_still_start() {
    let Some(n) = node("a_taken_port_fails_that_service_and_the_others_still_start") else {
        return;
    };
    let _taken = TcpListener::bind(("127.0.0.1", n.llamacpp)).unwrap();
    let (code, report, _) = n.services(&["start"], &n.args("llamacpp,ollama"));
    assert_eq!(code, 1, "{report}");
    let failed = failures(&report, "failed");
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!(failed[0].0, "llamacpp");
    assert!(
        failed[0].1.contains(&format!(
            "port {} (from --llamacpp-url) is taken by another process",
            n.llamacpp
        )),
        "{report}"
    );
    assert_eq!(names(&report["started"]), ["ollama"], "{report}");
    assert_eq!(names(&report["ready"]), ["ollama"], "{report}");
    let all = n.daemon.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(all, "citadel-ollama");
}

#[test]
fn a_user_the_docker_socket_refuses_is_told_to_join_the_docker_group() {
    let test = "a_user_the_docker_socket_refuses_is_told_to_join_the_docker_group";
    let Some(n) = node(test) else {
        return;
    };
    // A copy of citadel that uid 65534 can run (the checkout may be closed to it).
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = n.dir.join("nobody-bin");
    fs::create_dir_all(&bin_dir).unwrap();
    for d in [&n.dir, &bin_dir] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = bin_dir.join("citadel");
    fs::copy(support::citadel_bin(), &bin).unwrap();
    let state = n.dir.join("nobody-state");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["services", "start", "--json", "--state-dir"])
        .arg(&state)
        .args(n.args("ollama"))
        .env_clear()
        .env("PATH", &n.path)
        .env("DOCKER_HOST", n.daemon.host())
        .env("HOME", &state);
    let out = match cmd.output() {
        Ok(out) if !String::from_utf8_lossy(&out.stderr).contains("setpriv:") => out,
        _ => {
            skip_unless_ci(test, "setpriv cannot switch to uid 65534 here");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let report: Json = serde_json::from_str(stdout.trim()).unwrap();
    let failed = failures(&report, "failed");
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0].1.contains("may not use the Docker daemon")
            && failed[0].1.contains("'docker' group"),
        "{report}"
    );
    assert!(n.daemon.all_ids().is_empty(), "nothing was made");
}

#[test]
fn services_list_stop_and_restart() {
    let Some(n) = node("services_list_stop_and_restart") else {
        return;
    };
    let args = n.args("llamacpp");
    let (code, rows, _) = n.services(&["list"], &args);
    assert_eq!(code, 0, "{rows}");
    let rows = rows.as_array().unwrap().clone();
    let services: Vec<&str> = rows
        .iter()
        .map(|r| r["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["vllm", "ollama", "llamacpp", "extraction"]);
    let row = |rows: &[Json], s: &str| rows.iter().find(|r| r["service"] == s).unwrap().clone();
    let l = row(&rows, "llamacpp");
    assert_eq!(
        (l["configured"].clone(), l["state"].clone()),
        (json!(true), json!("none")),
        "{l}"
    );
    assert_eq!(l["healthy"], false, "{l}");
    assert_eq!(l["image"], ENGINE, "{l}");
    assert!(l["container"].is_null(), "{l}");

    let (code, _, _) = n.services(&["start"], &args);
    assert_eq!(code, 0);
    let (_, rows, _) = n.services(&[], &args);
    let rows = rows.as_array().unwrap().clone();
    let l = row(&rows, "llamacpp");
    assert_eq!(l["state"], "running", "{l}");
    assert_eq!(l["healthy"], true, "{l}");
    assert_eq!(l["container"], "citadel-llamacpp", "{l}");
    assert_eq!(l["up_to_date"], true, "{l}");
    assert_eq!(l["url"], format!("http://127.0.0.1:{}", n.llamacpp), "{l}");
    assert_eq!(
        l["health_url"],
        format!("http://127.0.0.1:{}/health", n.llamacpp),
        "{l}"
    );
    let v = row(&rows, "vllm");
    assert_eq!(
        (v["configured"].clone(), v["state"].clone()),
        (json!(false), json!("none")),
        "{v}"
    );
    assert_eq!(v["image"], "vllm/vllm-openai:latest", "{v}");

    let (code, report, _) = n.services(&["stop", "llamacpp"], &args);
    assert_eq!(code, 0, "{report}");
    assert_eq!(names(&report["stopped"]), ["llamacpp"], "{report}");
    let (_, rows, _) = n.services(&["list", "llamacpp"], &args);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["state"], "exited", "{rows}");
    assert_eq!(rows[0]["healthy"], false, "{rows}");

    let id = n.id("citadel-llamacpp");
    let (code, report, _) = n.services(&["restart", "llamacpp"], &args);
    assert_eq!(code, 0, "{report}");
    assert_eq!(names(&report["restarted"]), ["llamacpp"], "{report}");
    assert_eq!(names(&report["ready"]), ["llamacpp"], "{report}");
    assert_eq!(n.id("citadel-llamacpp"), id);

    // The human listing says the same.
    let out = n.citadel(&["services"], &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("llamacpp")).unwrap();
    assert!(
        line.contains("yes") && line.contains("running") && line.contains(ENGINE),
        "{text}"
    );
}

#[test]
fn a_daemon_that_is_down_or_a_missing_cli_is_named() {
    if docker_cli().is_none() {
        skip_unless_ci(
            "a_daemon_that_is_down_or_a_missing_cli_is_named",
            "the docker CLI is not on PATH (Debian: docker.io)",
        );
        return;
    }
    let dir = fresh_temp_dir("docker-down");
    let sock = format!("unix://{}/none.sock", dir.display());
    let out = citadel_cmd(&["services", "start", "--services", "ollama", "--json"])
        .env("DOCKER_HOST", &sock)
        .output()
        .unwrap();
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{report}");
    let failed = failures(&report, "failed");
    assert_eq!(failed[0].0, "ollama", "{report}");
    assert!(
        failed[0].1.contains("Docker daemon") && failed[0].1.contains(&sock),
        "{report}"
    );
    let out = citadel_cmd(&["services", "list"])
        .env("DOCKER_HOST", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("DOCKER_HOST={sock}")), "{err}");

    let out = citadel_cmd(&[
        "services",
        "start",
        "--services",
        "ollama",
        "--docker",
        "/nonexistent/docker",
        "--json",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    let failed = failures(&report, "failed");
    assert!(
        failed[0].1.contains("/nonexistent/docker")
            && failed[0].1.contains("docker.io")
            && failed[0].1.contains("--docker"),
        "{report}"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A fake `docker` that records its calls: `ps` lists nothing, no container
/// and no image exist, `pull` fails with `pull_error` (or succeeds when
/// empty), `run` prints an id, the container then reads as exited.
fn fake_docker(dir: &Path, pull_error: &str) -> (PathBuf, PathBuf) {
    let calls = dir.join("fake-docker-calls.log");
    let script = dir.join("docker");
    let pull = if pull_error.is_empty() {
        "exit 0".to_owned()
    } else {
        format!("echo '{pull_error}' >&2; exit 1")
    };
    write_script(
        &script,
        &format!(
            r#"#!/bin/sh
echo "$*" >> '{calls}'
case "$1 $2" in
"ps "*) exit 0 ;;
"container inspect")
    case "$*" in *".State"*) echo '{{"Status":"exited","ExitCode":0}}'; exit 0 ;; esac
    echo "Error: No such container: x" >&2; exit 1 ;;
"image inspect") echo "Error: No such image: x" >&2; exit 1 ;;
"pull "*) {pull} ;;
"run "*) echo 0123456789abcdef; exit 0 ;;
*) exit 0 ;;
esac
"#,
            calls = calls.display()
        ),
    );
    (script, calls)
}

fn fake_run(gpus: bool, pull_error: &str) -> (Output, String) {
    let dir = fresh_temp_dir("fake-docker");
    let (docker, calls) = fake_docker(&dir, pull_error);
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let smi = if gpus {
        "#!/bin/sh\necho '0, NVIDIA H200, GPU-1, 1, 143771, 0, 30, 70.0, 580.65.06'\n"
    } else {
        "#!/bin/sh\nexit 0\n"
    };
    write_script(&bin.join("nvidia-smi"), smi);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port().to_string();
    let models = dir.join("models");
    let out = citadel_cmd(&[
        "services",
        "start",
        "--json",
        "--services",
        "llamacpp",
        "--llamacpp-model",
        "m.gguf",
        "--llamacpp-url",
        &format!("http://127.0.0.1:{port}"),
        "--models-dir",
        models.to_str().unwrap(),
        "--docker",
        docker.to_str().unwrap(),
        "--service-ready-timeout",
        "1s",
    ])
    .env("PATH", path)
    .output()
    .unwrap();
    let calls = fs::read_to_string(&calls).unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    (out, calls)
}

#[test]
fn gpus_are_given_to_the_container_only_when_nvidia_smi_lists_one() {
    let (_, calls) = fake_run(true, "");
    let run = calls
        .lines()
        .find(|l| l.starts_with("run "))
        .unwrap_or_else(|| panic!("{calls}"));
    assert!(run.contains(" --gpus all "), "{run}");
    assert!(
        run.contains("ghcr.io/ggml-org/llama.cpp:server-cuda -m /models/m.gguf"),
        "{run}"
    );
    assert!(
        calls.contains("pull --quiet ghcr.io/ggml-org/llama.cpp:server-cuda"),
        "{calls}"
    );

    let (_, calls) = fake_run(false, "");
    let run = calls
        .lines()
        .find(|l| l.starts_with("run "))
        .unwrap_or_else(|| panic!("{calls}"));
    assert!(!run.contains("--gpus"), "{run}");
    assert!(
        run.contains("ghcr.io/ggml-org/llama.cpp:server -m"),
        "{run}"
    );
}

#[test]
fn a_failed_pull_names_the_service_and_the_image() {
    let (out, calls) = fake_run(
        false,
        "Error response from daemon: pull access denied for ghcr.io/ggml-org/llama.cpp",
    );
    assert_eq!(out.status.code(), Some(1));
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    let failed = failures(&report, "failed");
    assert_eq!(failed[0].0, "llamacpp", "{report}");
    assert!(
        failed[0]
            .1
            .contains("image ghcr.io/ggml-org/llama.cpp:server is not on this node")
            && failed[0].1.contains("pull access denied"),
        "{report}"
    );
    assert!(!calls.lines().any(|l| l.starts_with("run ")), "{calls}");
}

#[test]
fn bad_service_settings_are_bad_input() {
    for (args, want) in [
        (vec!["services", "start", "tgi"], "'tgi' is not a service"),
        (
            vec!["services", "launch"],
            "not list, start, stop or restart",
        ),
        (
            vec!["services", "--service-image", "vllm"],
            "--service-image: 'vllm' is not NAME=VALUE",
        ),
        (
            vec!["up", "--service-args", "llamacpp=-x 'open"],
            "--service-args: llamacpp: unclosed '",
        ),
        (
            vec!["services", "--services", "vllm,nope"],
            "--services: 'nope' is not a service",
        ),
        (
            vec!["services", "--service-bind", "everywhere"],
            "--service-bind: 'everywhere' is not an IP address",
        ),
    ] {
        let out = citadel_cmd(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // The config file's object form, and its errors naming the key.
    let dir = fresh_temp_dir("svc-config");
    let file = dir.join("config.json");
    fs::write(&file, r#"{"service_images": {"vllm": 7}}"#).unwrap();
    let out = citadel_cmd(&["services", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service_images: vllm: 7 is not a string"),
        "{err}"
    );
    let _ = fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// End to end: the real llama-server in a container
// ---------------------------------------------------------------------------

/// A root fs holding `binary` at /app/llama-server and every library `ldd`
/// lists, at the same paths.
fn llama_rootfs(binary: &Path, root: &Path) {
    let copy = |from: &Path, to: &Path| {
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
    };
    copy(binary, &root.join("app/llama-server"));
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("running ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let real = fs::canonicalize(p).unwrap();
            copy(&real, &root.join(p.trim_start_matches('/')));
        }
    }
    fs::create_dir_all(root.join("tmp")).unwrap();
}

#[test]
fn a_config_job_starts_a_real_llama_server_container_that_serves_llm_inference_and_up_brings_it_back(
) {
    let test = "a_config_job_starts_a_real_llama_server_container_that_serves_llm_inference_and_up_brings_it_back";
    if std::env::var("CITADEL_SKIP_REAL_ENGINE").is_ok_and(|v| v == "1" || v == "true") {
        support::report_skip(test, "CITADEL_SKIP_REAL_ENGINE=1");
        return;
    }
    let Some((server, model)) = support::cached_engine() else {
        skip_unless_ci(
            test,
            "the real llama-server is not cached; run scripts/real-engine.sh",
        );
        return;
    };
    let Some(n) = node(test) else {
        return;
    };
    let root = n.dir.join("llama-root");
    llama_rootfs(&server, &root);
    n.daemon.import(
        &root,
        "citadel-test/llama:1",
        &[r#"ENTRYPOINT ["/app/llama-server"]"#],
    );
    // The model inside the models dir (a symlink would not resolve in the container).
    let real_model = fs::canonicalize(&model).unwrap();
    let inside = n.models.join("model.gguf");
    if fs::hard_link(&real_model, &inside).is_err() {
        fs::copy(&real_model, &inside).unwrap();
    }
    let redis = RedisServer::start();
    let sub = Subscriber::new(&redis, "stream:v1:*");
    let url = format!("http://127.0.0.1:{}", n.llamacpp);
    let state = n.dir.join("state");
    let settings: Vec<String> = [
        "--redis-url",
        &redis.url(),
        "--node-name",
        &format!("docker-e2e-{}", n.llamacpp),
        "--state-dir",
        state.to_str().unwrap(),
        "--llamacpp-model",
        "model.gguf",
        "--service-image",
        "llamacpp=citadel-test/llama:1",
        "--llamacpp-url",
        &url,
        "--service-args",
        "llamacpp=-c 512 -np 1 -t 1 --no-webui",
        "--models-dir",
        n.models.to_str().unwrap(),
        "--engine-first-token-timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let up = || {
        let mut args = vec!["up"];
        args.extend(settings.iter().map(String::as_str));
        let c = Citadel::spawn(
            &args,
            &[("DOCKER_HOST", n.daemon.host()), ("PATH", &n.path)],
        );
        c.wait_for_log("starting the agent", WAIT * 2);
        c.wait_working();
        c
    };
    let mut conn = redis.conn();
    let inference = |conn: &mut redis::Connection, job: &str| {
        let payload = json!({"backend": "llamacpp", "model": "llamacpp/smollm2",
                             "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
        xadd_job(
            conn,
            "jobs:v1:gpu-general",
            job,
            "llm_inference",
            &payload.to_string(),
        );
        let events = wait_until("the job's terminal event", WAIT * 2, || {
            let events = sub.events_for(job);
            events
                .iter()
                .any(|e| matches!(e["type"].as_str(), Some("end" | "error" | "cancelled")))
                .then_some(events)
        });
        let last = events.last().unwrap();
        assert_eq!(last["type"], "end", "{events:?}");
        let chunks: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "chunk")
            .map(|e| e["data"]["content"].as_str().unwrap())
            .collect();
        assert!(
            chunks.len() > 1,
            "tokens streamed in several chunks: {events:?}"
        );
        assert_eq!(last["data"]["result"]["content"], chunks.concat(), "{last}");
        let completion = last["data"]["result"]["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!((1..=8).contains(&completion), "{last}");
    };

    // A bare node: nothing configured, `citadel up` just runs the agent.
    let mut c = up();
    assert!(
        c.log().contains("citadel up: no services are configured"),
        "{}",
        c.log()
    );
    // The wizard's config arrives as a job and starts the engine.
    let end = config_job(
        &mut conn,
        &sub,
        "docker-e2e-config",
        &json!({"deviceName": "gpu-box", "services": ["llamacpp"], "autoStartServices": true}),
    );
    assert_eq!(end["type"], "end", "{end}\n{}", c.log());
    let services = &end["data"]["result"]["services"];
    assert_eq!(names(&services["started"]), ["llamacpp"], "{end}");
    assert_eq!(
        names(&services["ready"]),
        ["llamacpp"],
        "{end}\n{}",
        c.log()
    );
    inference(&mut conn, "docker-e2e-1");
    assert_eq!(
        n.daemon.inspect("citadel-llamacpp", "{{.State.Status}}"),
        "running"
    );

    // The agent stops and the engine is stopped by hand: `citadel up` on
    // this configured node brings it back (from the stored config) and serves.
    c.sigterm();
    assert!(
        c.wait_exit(WAIT).is_some_and(|s| s.success()),
        "{}",
        c.log()
    );
    n.daemon.ok(&["stop", "citadel-llamacpp"]);
    let c = up();
    let report = report_in(&c.log());
    assert_eq!(names(&report["restarted"]), ["llamacpp"], "{report}");
    assert_eq!(
        names(&report["ready"]),
        ["llamacpp"],
        "{report}\n{}",
        c.log()
    );
    inference(&mut conn, "docker-e2e-2");
    let meta = &sub.events_for("docker-e2e-2")[0]["data"]["meta"];
    assert_eq!(meta["node_name"], "gpu-box", "{meta}");
}
