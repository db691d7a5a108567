//! What the suites of single jobs and one-shot commands share (shell,
//! download, init, heartbeat, install): a command run to its end with a
//! deadline and its output captured, a temp dir removed when the test
//! passes, fake tools on PATH, a job's terminal event, and processes
//! watched in /proc (a pid a command wrote, awaited until it is gone), and
//! what the failover chaos runs share (the echo run ledger, their sizes
//! from the environment).

use super::observe::{event_type, is_terminal};
use super::{wait_until, Subscriber, POLL};
use serde_json::Value as Json;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a command run to its end gave.
#[derive(Debug)]
pub struct Finished {
    /// `None`: ended by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Finished {
    /// stdout, then stderr.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` (stdin from /dev/null) to its end, reading both pipes on
/// threads; past `limit` it is killed and the test fails with its output.
pub fn run_to_end(cmd: &mut Command, limit: Duration) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let err = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the command") {
            break Some(s);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(POLL);
    };
    let finished = Finished {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        took: t0.elapsed(),
    };
    assert!(
        status.is_some(),
        "{cmd:?} still running after {limit:?}\nstdout:\n{}\nstderr:\n{}",
        finished.stdout,
        finished.stderr
    );
    finished
}

/// A fresh directory, removed when the test passes (kept for a look when
/// it fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        TempDir(super::fresh_temp_dir(prefix))
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes an executable `dir/name` running `script` with /bin/sh; returns
/// its path.
pub fn fake_tool(dir: &Path, name: &str, script: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{script}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// PATH with `dir` first, then this test's own PATH (for `cat`, `sleep`).
pub fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The job's terminal event (end, error, cancelled, …); waits for it.
pub fn terminal_event(sub: &Subscriber, job: &str, timeout: Duration) -> Json {
    wait_until(&format!("a terminal event of {job}"), timeout, || {
        sub.events_for(job)
            .into_iter()
            .find(|e| is_terminal(event_type(e)))
    })
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is not).
pub fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// The pid a process wrote to `path` (its first line), once it is there.
pub fn wait_for_pid_file(path: &Path, timeout: Duration) -> u32 {
    wait_until(&format!("a pid in {}", path.display()), timeout, || {
        fs::read_to_string(path)
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok())
    })
}

/// Waits until process `pid` is gone (or a zombie); panics naming `what`.
pub fn wait_pid_gone(what: &str, pid: u32, timeout: Duration) {
    wait_until(&format!("{what} (pid {pid}) to be gone"), timeout, || {
        (!pid_alive(pid)).then_some(())
    });
}

/// How often each job ran, from the echo run log
/// (`CITADEL_TEST_ECHO_RUNS`: one `{jobId} {pid} {ms}` line per run).
pub fn runs_of(path: &Path) -> std::collections::HashMap<String, usize> {
    let mut runs = std::collections::HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let job = line.split(' ').next().unwrap_or_default().to_string();
        *runs.entry(job).or_insert(0) += 1;
    }
    runs
}

/// The number in the environment variable `name`, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The flags of the workers of the failover runs (Sentinel, Cluster):
/// short blocks, claim-idle and timeouts, so a failover is over in seconds.
pub const FAILOVER_WORKER_FLAGS: &[&str] = &[
    "--concurrency",
    "4",
    "--block",
    "1s",
    "--cancel-poll",
    "100ms",
    "--claim-idle",
    "3s",
    "--redis-timeout",
    "1s",
    "--heartbeat-interval",
    "1s",
];

/// `citadel submit --follow` of an echo job on `url` (to `queue`, else the
/// default queue), after a failover: it must succeed and print the job's
/// result. Returns its stderr.
pub fn submit_follows_after_failover(url: &str, queue: Option<&str>) -> String {
    let mut args = vec!["submit"];
    if let Some(q) = queue {
        args.extend(["--queue", q]);
    }
    args.extend([
        "--type",
        "echo",
        "--payload",
        r#"{"hello":"after failover"}"#,
        "--follow",
    ]);
    let out = super::citadel_cmd(&args)
        .env("CITADEL_REDIS_URL", url)
        .output()
        .expect("citadel submit");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "submit --follow: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("after failover"));
    stderr
}
