//! Settings through the real binary: the layers (defaults < config file <
//! `CITADEL_*` environment < flags, the file named by `--config` or
//! `CITADEL_CONFIG`), seen in the startup line of `citadel work` and in the
//! consumer that then runs a job; and a bad Redis URL, which every command
//! reports with the same plain one-line message and exit code 2.

mod support;

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;
use support::{citadel_cmd, fresh_temp_dir, hgetall, wait_until, xadd_job, Citadel, RedisServer};

const WAIT: Duration = Duration::from_secs(30);

/// A temp dir for config files, removed when the test passes.
struct Files(PathBuf);

impl Files {
    fn new() -> Files {
        Files(fresh_temp_dir("settings"))
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Starts `citadel work` with `args` and `env` against `redis`; returns it
/// and its startup line (`working: streams [...], group '…', consumer '…',
/// claim-idle …`).
fn start_worker(redis: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> (Citadel, String) {
    let url = redis.url();
    let mut all_env = vec![("CITADEL_REDIS_URL", url.as_str()), ("RUST_LOG", "info")];
    all_env.extend_from_slice(env);
    let mut all_args = vec!["work"];
    all_args.extend_from_slice(args);
    let w = Citadel::spawn(&all_args, &all_env);
    w.wait_for_log("working: streams", WAIT);
    let log = w.log();
    let line = log
        .lines()
        .find_map(|l| l.find("working: streams").map(|at| l[at..].to_string()))
        .unwrap_or_default();
    (w, line)
}

/// Enqueues an echo job on `queue`, waits until it completed, stops the
/// worker (SIGTERM, exit 0) and returns the `worker_id` of the job's status.
fn run_one_job(redis: &RedisServer, mut w: Citadel, queue: &str) -> String {
    let mut conn = redis.conn();
    xadd_job(&mut conn, queue, "j-settings", "echo", "{}");
    let status = wait_until("the job to complete", WAIT, || {
        let h = hgetall(&mut conn, "job:j-settings:status");
        (h.get("status").map(String::as_str) == Some("completed")).then_some(h)
    });
    w.sigterm();
    let exit = w.wait_exit(WAIT);
    assert!(
        exit.is_some_and(|s| s.success()),
        "worker did not stop cleanly: {exit:?}\n{}",
        w.log()
    );
    status["worker_id"].clone()
}

#[test]
fn settings_layer_defaults_then_config_file_then_environment_then_flags() {
    let redis = RedisServer::start();
    let files = Files::new();
    let config = files.write(
        "config.json",
        r#"{"node_name": "n-file", "consumer": "c-file", "queue": ["jobs:v1:q-file"],
            "claim_idle": "7s"}"#,
    );
    // Named by CITADEL_CONFIG, but --config wins: none of this may show.
    let decoy = files.write(
        "decoy.json",
        r#"{"group": "g-decoy", "node_name": "n-decoy", "consumer": "c-decoy"}"#,
    );
    let (w, line) = start_worker(
        &redis,
        &[
            "--config",
            &config,
            "--queue",
            "jobs:v1:q-flag",
            "--claim-idle",
            "9s",
        ],
        &[
            ("CITADEL_CONFIG", &decoy),
            ("CITADEL_CONSUMER", "c-env"),
            ("CITADEL_QUEUE", "jobs:v1:q-env"),
            ("CITADEL_CLAIM_IDLE", "8s"),
        ],
    );
    // group: default only; node name: file over default; consumer: environment
    // over file; queue and claim-idle: flag over environment over file.
    assert_eq!(
        line,
        r#"working: streams ["jobs:v1:q-flag", "jobs:v1:node:n-file"], group 'workers', consumer 'c-env', claim-idle 9s"#
    );
    assert_eq!(run_one_job(&redis, w, "jobs:v1:q-flag"), "c-env");
}

#[test]
fn citadel_config_names_the_config_file() {
    let redis = RedisServer::start();
    let files = Files::new();
    let config = files.write(
        "config.json",
        r#"{"group": "g-file", "node-name": "n-file", "queue": "jobs:v1:q-file",
            "claim-idle": "7s", "device_api_token": "ignored"}"#,
    );
    let (w, line) = start_worker(&redis, &[], &[("CITADEL_CONFIG", &config)]);
    assert_eq!(
        line,
        r#"working: streams ["jobs:v1:q-file", "jobs:v1:node:n-file"], group 'g-file', consumer 'n-file', claim-idle 7s"#
    );
    assert_eq!(run_one_job(&redis, w, "jobs:v1:q-file"), "n-file");

    // A config file that is named but missing is an error, not "no file".
    let out = run(citadel_cmd(&[
        "status",
        "--config",
        "/nonexistent/citadel.json",
    ]));
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .starts_with("citadel: cannot read config file /nonexistent/citadel.json"),
        "{out:?}"
    );
}

#[test]
fn bad_redis_url_gets_the_same_plain_message_and_exit_2_from_every_command() {
    let files = Files::new();
    // (URL, what the message must say). None of these reaches the network
    // even if it were wrongly accepted.
    let cases = [
        ("nonsense", "it does not start with redis://"),
        ("http://127.0.0.1:1", "http:// is not a Redis scheme"),
        ("redis://:99999", "it names no host"),
        (
            "redis://127.0.0.1:99999",
            "the port must be a number from 1 to 65535, not '99999'",
        ),
        (
            "redis://127.0.0.1:1/x",
            "the database after the host must be a number (/0, /1, …), not 'x'",
        ),
    ];
    let commands: &[&[&str]] = &[
        &["work"],
        &["agent"],
        &["up"],
        &["submit", "--type", "echo"],
        &["dlq", "list"],
        &["status"],
        &["run-job", r#"{"type":"echo","payload":{}}"#],
    ];
    for (i, (url, says)) in cases.iter().enumerate() {
        let config = files.write(
            &format!("config-{i}.json"),
            &format!(r#"{{"redis_url":"{url}"}}"#),
        );
        // The same URL from each layer; the message names the layer.
        for layer in ["flag", "environment", "config file"] {
            let prefix = match layer {
                "flag" => "--redis-url: ".to_string(),
                "environment" => "CITADEL_REDIS_URL: ".to_string(),
                _ => format!("{config}: redis_url: "),
            };
            let want = format!("citadel: {prefix}'{url}' is not a Redis URL: {says} (write redis://HOST[:PORT][/DB], rediss://… for TLS, or unix:///PATH/TO/SOCKET)\n");
            for args in commands {
                let mut cmd = citadel_cmd(args);
                match layer {
                    "flag" => cmd.args(["--redis-url", url]),
                    "environment" => cmd.env("CITADEL_REDIS_URL", url),
                    _ => cmd.args(["--config", &config]),
                };
                let out = run(cmd);
                assert_eq!(out.code, Some(2), "{args:?} with {prefix}{url}: {out:?}");
                assert_eq!(out.stderr, want, "{args:?} with {prefix}{url}");
                assert_eq!(out.stdout, "", "{args:?} with {prefix}{url}");
            }
        }
    }
}

/// What a one-shot command did.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end (no stdin) and captures its output; kills it and
/// panics if it is still running after `WAIT`.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut child = KillOnDrop(child);
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.0.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.0.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_until(&format!("{cmd:?} to exit"), WAIT, || {
        child.0.try_wait().expect("try_wait")
    });
    Output {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A child process that is killed if the test gives up on it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
