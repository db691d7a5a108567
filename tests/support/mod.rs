//! Shared integration-test harness: a real `redis-server` per test, the real
//! `citadel` binary as a child process (in a clean environment: no inherited
//! `CITADEL_*`, no `/etc/citadel/config.json`, a temp state directory), a
//! Pub/Sub listener and a few Redis helpers. Test files use it through
//! `mod support;`.
//!
//! Everything here waits by polling with a deadline (never a blind sleep), and
//! every test gets its own Redis server on its own port in its own temp dir,
//! so tests run in parallel.
#![allow(dead_code)]

pub mod cluster;
pub mod dead_letters;
pub mod docker;
pub mod fake_auth;
pub mod fake_engine;
pub mod fake_extraction;
pub mod fake_nexus;
pub mod file_server;
pub mod http;
pub mod jobs;
pub mod observe;
pub mod real_engine;
pub mod sentinel;
pub mod stall_proxy;
pub mod tls;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde_json::Value as Json;

/// How often every wait in this module polls.
pub const POLL: Duration = Duration::from_millis(10);

/// How long a Redis server may take to answer PING after a (re)start.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes of a log are printed when a test panics.
const LOG_TAIL_BYTES: usize = 4000;

/// Polls `f` every 10 ms until it returns `Some`, and returns that value.
///
/// Panics with "timed out after {timeout:?} waiting for {what}" otherwise.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// A fresh, empty directory under the system temp dir, unique per process,
/// per call and per time.
pub fn fresh_temp_dir(prefix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "citadel-test-{prefix}-{}-{n}-{nanos}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    drop(listener);
    port
}

/// The file's content, or a note saying why it could not be read.
fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// The last `LOG_TAIL_BYTES` bytes (or so) of a log.
fn tail(text: &str) -> &str {
    if text.len() <= LOG_TAIL_BYTES {
        return text;
    }
    let mut start = text.len() - LOG_TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening log {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Redis server
// ---------------------------------------------------------------------------

/// A real `redis-server` (from PATH) on its own port and in its own temp dir,
/// with an fsync-always AOF so that data survives `kill()` + `restart()`.
///
/// Dropping it kills the server and removes the temp dir.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Appended to the command line at every (re)start: later options win.
    extra_args: Vec<String>,
}

/// Why one spawn attempt did not give a server that answers PING.
enum StartError {
    /// The process exited (e.g. the port was taken).
    Exited(ExitStatus),
    /// It was still running at the deadline, not answering PING.
    TimedOut,
}

impl RedisServer {
    /// Starts a server on a free port and waits (up to 10 s) until it answers
    /// PING. Panics with the server's log if it does not.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// [`RedisServer::start`] with `args` appended to redis-server's command
    /// line at every (re)start (e.g. `["--appendfsync", "everysec"]`: a later
    /// option replaces the default one).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let dir = fresh_temp_dir("redis");
        let log = dir.join("redis.log");
        let mut server = RedisServer {
            port: 0,
            dir,
            log,
            child: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
        };
        // The free port can be taken by someone else between our probe and
        // redis binding it: try a few ports before giving up.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait(REDIS_START_TIMEOUT) {
                Ok(()) => return server,
                Err(StartError::Exited(status)) => {
                    last = format!("redis-server exited with {status}");
                    if !server.log_text().contains("Address already in use") {
                        break;
                    }
                }
                Err(StartError::TimedOut) => {
                    last =
                        format!("redis-server did not answer PING within {REDIS_START_TIMEOUT:?}");
                    break;
                }
            }
        }
        panic!(
            "could not start redis-server on port {}: {last}\n--- {} ---\n{}",
            server.port,
            server.log.display(),
            server.log_text()
        );
    }

    /// Starts a server on the given `port` (e.g. one a worker was already
    /// told to use) and waits (up to 10 s) until it answers PING. Panics with
    /// the server's log if it does not (e.g. the port is taken).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = fresh_temp_dir("redis");
        let log = dir.join("redis.log");
        let mut server = RedisServer {
            port,
            dir,
            log,
            child: None,
            extra_args: Vec::new(),
        };
        let err = match server.spawn_and_wait(REDIS_START_TIMEOUT) {
            Ok(()) => return server,
            Err(StartError::Exited(status)) => format!("redis-server exited with {status}"),
            Err(StartError::TimedOut) => {
                format!("redis-server did not answer PING within {REDIS_START_TIMEOUT:?}")
            }
        };
        panic!(
            "could not start redis-server on port {port}: {err}\n--- {} ---\n{}",
            server.log.display(),
            server.log_text()
        );
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's data directory (also holds its log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log (all starts appended).
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// A new connection with 5 s connect/read/write timeouts.
    pub fn conn(&self) -> redis::Connection {
        let timeout = Duration::from_secs(5);
        let client = redis::Client::open(self.url()).expect("redis::Client::open");
        let conn = client
            .get_connection_with_timeout(timeout)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()));
        conn.set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
        conn.set_write_timeout(Some(timeout))
            .expect("set_write_timeout");
        conn
    }

    /// SIGKILLs the server and waits for it. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM: it flushes its AOF and exits) and
    /// waits up to 10 s for it, then SIGKILLs it. No-op if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// [`RedisServer::restart`] after a graceful [`RedisServer::stop`].
    pub fn restart_graceful(&mut self) {
        self.stop();
        self.restart();
    }

    /// Starts the server again on the same port and dir (so the AOF data comes
    /// back) and waits until it answers PING; kills it first if it is still
    /// running. Retries the spawn for up to 10 s if the port is briefly busy.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match self.spawn_and_wait(left.max(Duration::from_millis(100))) {
                Ok(()) => return,
                Err(StartError::Exited(status)) => format!("redis-server exited with {status}"),
                Err(StartError::TimedOut) => "redis-server did not answer PING".to_string(),
            };
            if Instant::now() >= deadline {
                panic!(
                    "could not restart redis-server on port {} within {REDIS_START_TIMEOUT:?}: \
                     {err}\n--- {} ---\n{}",
                    self.port,
                    self.log.display(),
                    self.log_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Whether the server process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING.
    /// On failure the process is reaped and `self.child` is `None`.
    fn spawn_and_wait(&mut self, timeout: Duration) -> Result<(), StartError> {
        let log = open_log(&self.log);
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawning redis-server (is it installed and on PATH?): {e}")
            });
        self.child = Some(child);

        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(StartError::Exited(status));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(StartError::TimedOut);
            }
            thread::sleep(POLL);
        }
    }

    /// Whether PING gets PONG right now (not while loading the AOF).
    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        matches!(
            redis::cmd("PING").query::<String>(&mut conn).as_deref(),
            Ok("PONG")
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let log = self.log_text();
            eprintln!(
                "--- redis-server log ({}, tail) ---\n{}\n--- end of redis-server log ---",
                self.log.display(),
                tail(&log)
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// The citadel binary
// ---------------------------------------------------------------------------

/// Path of the `citadel` binary cargo built for these tests.
pub fn citadel_bin() -> &'static str {
    match option_env!("CARGO_BIN_EXE_citadel") {
        Some(path) => path,
        None => panic!(
            "CARGO_BIN_EXE_citadel is not set: the harness must be compiled as an integration \
             test of the `citadel` crate (tests/*.rs), which builds the binary"
        ),
    }
}

/// A `Command` for the citadel binary with `args`, `RUST_LOG` unset and a
/// clean environment (see [`clean_env`]; its state directory is a fresh path
/// under cargo's target tmp dir, created only if the command writes state),
/// for one-shot commands (`citadel submit …`) whose output the test captures.
pub fn citadel_cmd(args: &[&str]) -> Command {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::SeqCst);
    let scratch = target_tmp_dir().join(format!("cmd-{}-{n}", std::process::id()));
    let mut cmd = Command::new(citadel_bin());
    cmd.args(args).env_remove("RUST_LOG");
    clean_env(&mut cmd, &scratch);
    cmd
}

/// Makes `cmd` see none of the machine's citadel setup: no inherited
/// `CITADEL_*` variable, `CITADEL_CONFIG` naming an empty JSON object file
/// (so `/etc/citadel/config.json` is never read), and the state directory
/// (`CITADEL_STATE_DIR`, and `XDG_STATE_HOME` for its default) under
/// `scratch`, no metrics listener (`CITADEL_METRICS_ADDR` empty). Variables
/// a test sets on `cmd` afterwards win.
pub fn clean_env(cmd: &mut Command, scratch: &Path) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CITADEL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CITADEL_CONFIG", empty_config_file())
        // Many agents run at once in tests: none listens unless a test asks.
        .env("CITADEL_METRICS_ADDR", "")
        .env("CITADEL_STATE_DIR", scratch.join("state"))
        .env("XDG_STATE_HOME", scratch.join("xdg-state"));
}

/// Cargo's scratch directory for integration tests (inside `target/`).
fn target_tmp_dir() -> PathBuf {
    option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A config file holding `{}`, shared by every test: written once per test
/// process, atomically (a reader never sees half of it).
fn empty_config_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = target_tmp_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join("citadel-empty-config.json");
        let tmp = dir.join(format!("citadel-empty-config.json.{}", std::process::id()));
        fs::write(&tmp, "{}").unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
        path
    })
}

/// The real `citadel` binary running as a child process, its stdout and
/// stderr going to a log file. Dropping it SIGKILLs the process if it is
/// still running.
pub struct Citadel {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Citadel {
    /// Runs `citadel work <extra_args>` against `redis`, with
    /// `CITADEL_REDIS_URL`, `RUST_LOG=debug` and `extra_env`.
    pub fn work(redis: &RedisServer, extra_args: &[&str], extra_env: &[(&str, &str)]) -> Citadel {
        let url = redis.url();
        let mut env: Vec<(&str, &str)> = vec![("CITADEL_REDIS_URL", &url), ("RUST_LOG", "debug")];
        env.extend_from_slice(extra_env);
        let mut args = vec!["work"];
        args.extend_from_slice(extra_args);
        Citadel::spawn(&args, &env)
    }

    /// Runs `citadel <args>` in a clean environment (see [`clean_env`]; its
    /// state directory inside this child's own temp dir) with `env` added.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Citadel {
        let dir = fresh_temp_dir("citadel");
        let log = dir.join("citadel.log");
        let file = open_log(&log);
        let mut cmd = Command::new(citadel_bin());
        clean_env(&mut cmd, &dir);
        let child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cloning log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} {args:?}: {e}", citadel_bin()));
        Citadel { child, dir, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the log file (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far (stdout + stderr).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits until the log contains `needle`; panics with the log otherwise.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?} in the citadel log:\n{}",
                    tail(&self.log())
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until a Redis Streams worker has logged its start-up line
    /// (`working: streams …`): its threads run.
    pub fn wait_working(&self) {
        self.wait_for_log("working: streams", Duration::from_secs(10));
    }

    /// SIGKILLs the process and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (through the `kill` command). No-op if it has exited.
    pub fn sigterm(&mut self) {
        self.signal("-TERM");
    }

    /// Sends SIGINT (through the `kill` command). No-op if it has exited.
    pub fn sigint(&mut self) {
        self.signal("-INT");
    }

    fn signal(&mut self, sig: &str) {
        // Once reaped, the pid may belong to someone else: never signal it.
        if !self.is_running() {
            return;
        }
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap_or_else(|e| panic!("running `kill {sig} {pid}`: {e}"));
        assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
    }

    /// Polls every 10 ms until the process exits; `None` if it is still
    /// running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(e) => panic!("waiting for citadel (pid {}): {e}", self.pid()),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `citadel work` as `node` (its node and consumer name) against `redis`,
/// with the short timings the tests share: `--block 1s`, `--cancel-poll
/// 100ms`. `extra` comes last: a flag there wins over these.
pub fn worker(redis: &RedisServer, node: &str, extra: &[&str]) -> Citadel {
    worker_with_env(redis, node, extra, &[])
}

/// [`worker`] with `env` added to its environment.
pub fn worker_with_env(
    redis: &RedisServer,
    node: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Citadel {
    let mut args = vec![
        "--node-name",
        node,
        "--block",
        "1s",
        "--cancel-poll",
        "100ms",
    ];
    args.extend_from_slice(extra);
    Citadel::work(redis, &args, env)
}

impl Drop for Citadel {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
        if thread::panicking() {
            // Keep the log for a post-mortem, and show its end in the test output.
            eprintln!(
                "--- citadel log ({}, tail) ---\n{}\n--- end of citadel log ---",
                self.log.display(),
                tail(&self.log())
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Redis helpers
// ---------------------------------------------------------------------------

/// `XADD stream * jobId <job_id> type <job_type> payload <payload_json>`;
/// returns the entry id.
pub fn xadd_job(
    conn: &mut redis::Connection,
    stream: &str,
    job_id: &str,
    job_type: &str,
    payload_json: &str,
) -> String {
    xadd_fields(
        conn,
        stream,
        &[
            ("jobId", job_id),
            ("type", job_type),
            ("payload", payload_json),
        ],
    )
}

/// `XADD stream * f1 v1 f2 v2 …`; returns the entry id.
pub fn xadd_fields(conn: &mut redis::Connection, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query::<String>(conn)
        .unwrap_or_else(|e| panic!("XADD {stream} {fields:?}: {e}"))
}

/// `XLEN stream` (0 if the stream does not exist).
pub fn xlen(conn: &mut redis::Connection, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query::<usize>(conn)
        .unwrap_or_else(|e| panic!("XLEN {stream}: {e}"))
}

/// Number of entries pending in `group` (`XPENDING stream group`, first
/// element). 0 if the stream or the group does not exist yet (NOGROUP), so it
/// can be polled before the agent has created its group.
pub fn pending_count(conn: &mut redis::Connection, stream: &str, group: &str) -> usize {
    let reply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query::<Value>(conn);
    let value = match reply {
        Ok(v) => v,
        Err(e) if is_nogroup(&e) => return 0,
        Err(e) => panic!("XPENDING {stream} {group}: {e}"),
    };
    match &value {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => usize::try_from(*n).expect("negative pending count"),
            _ => panic!("unexpected XPENDING {stream} {group} reply: {value:?}"),
        },
        _ => panic!("unexpected XPENDING {stream} {group} reply: {value:?}"),
    }
}

/// Number of entries pending for `consumer` in `group`
/// (`XPENDING stream group - + 10000 consumer`). 0 on NOGROUP.
pub fn pending_for_consumer(
    conn: &mut redis::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
) -> usize {
    let reply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10000)
        .arg(consumer)
        .query::<Value>(conn);
    match reply {
        Ok(Value::Array(items)) => items.len(),
        Ok(Value::Nil) => 0,
        Ok(other) => panic!("unexpected XPENDING {stream} {group} … {consumer} reply: {other:?}"),
        Err(e) if is_nogroup(&e) => 0,
        Err(e) => panic!("XPENDING {stream} {group} - + 10000 {consumer}: {e}"),
    }
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// `HGETALL key` (empty if the key does not exist).
pub fn hgetall(conn: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query::<HashMap<String, String>>(conn)
        .unwrap_or_else(|e| panic!("HGETALL {key}: {e}"))
}

/// `XRANGE stream - +`: every entry as (id, fields).
pub fn xrange_all(
    conn: &mut redis::Connection,
    stream: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query::<Value>(conn)
        .unwrap_or_else(|e| panic!("XRANGE {stream} - +: {e}"));
    let entries = match value {
        Value::Array(entries) => entries,
        Value::Nil => return Vec::new(),
        other => panic!("unexpected XRANGE {stream} reply: {other:?}"),
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                panic!("unexpected XRANGE {stream} entry: {entry:?}");
            };
            let [id, fields] = <[Value; 2]>::try_from(parts).unwrap_or_else(|parts| {
                panic!("XRANGE {stream} entry is not [id, fields]: {parts:?}")
            });
            let id = value_to_string(&id);
            let mut map = HashMap::new();
            match fields {
                // RESP2: a flat array of alternating field and value.
                Value::Array(flat) => {
                    assert!(
                        flat.len() % 2 == 0,
                        "XRANGE {stream} entry {id} has an odd number of field items: {flat:?}"
                    );
                    for pair in flat.chunks(2) {
                        map.insert(value_to_string(&pair[0]), value_to_string(&pair[1]));
                    }
                }
                // RESP3 may send a map.
                Value::Map(pairs) => {
                    for (k, v) in &pairs {
                        map.insert(value_to_string(k), value_to_string(v));
                    }
                }
                Value::Nil => {}
                other => panic!("unexpected XRANGE {stream} fields for {id}: {other:?}"),
            }
            (id, map)
        })
        .collect()
}

/// A scalar reply as a string; panics on anything else.
pub fn value_to_string(v: &Value) -> String {
    match v {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        Value::Okay => "OK".to_string(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => panic!("expected a string reply, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Pub/Sub
// ---------------------------------------------------------------------------

/// A PSUBSCRIBE listener on its own thread, collecting every message as
/// (channel, payload parsed as JSON; a non-JSON payload becomes a JSON
/// string). Reconnects and resubscribes if the server restarts (messages
/// published meanwhile are lost, as with any Pub/Sub client).
pub struct Subscriber {
    messages: Arc<Mutex<Vec<(String, Json)>>>,
    subscriptions: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Subscribes to `pattern_or_channel` (PSUBSCRIBE, so a plain channel
    /// name works too) and returns only once the server has confirmed the
    /// subscription: anything published after this returns is received.
    pub fn new(redis: &RedisServer, pattern_or_channel: &str) -> Subscriber {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subscriptions = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let url = redis.url();
            let pattern = pattern_or_channel.to_string();
            let messages = Arc::clone(&messages);
            let subscriptions = Arc::clone(&subscriptions);
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("subscriber {pattern_or_channel}"))
                .spawn(move || listen(&url, &pattern, &messages, &subscriptions, &stop, ready_tx))
                .expect("spawning the subscriber thread")
        };
        let mut subscriber = Subscriber {
            messages,
            subscriptions,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(REDIS_START_TIMEOUT) {
            Ok(Ok(())) => subscriber,
            Ok(Err(e)) => panic!("PSUBSCRIBE {pattern_or_channel}: {e}"),
            Err(_) => {
                subscriber.stop_thread();
                panic!(
                    "PSUBSCRIBE {pattern_or_channel} not confirmed within {REDIS_START_TIMEOUT:?}"
                )
            }
        }
    }

    /// Every message received so far, in order, as (channel, payload).
    pub fn messages(&self) -> Vec<(String, Json)> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Payloads whose `jobId` field equals `job_id`, in order.
    pub fn events_for(&self, job_id: &str) -> Vec<Json> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, v)| v.get("jobId").and_then(Json::as_str) == Some(job_id))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The first event with `type == event_type` for `job_id`; waits for it
    /// (polling every 10 ms) and panics with what was seen on timeout.
    pub fn wait_for(&self, job_id: &str, event_type: &str, timeout: Duration) -> Json {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .events_for(job_id)
                .into_iter()
                .find(|v| v.get("type").and_then(Json::as_str) == Some(event_type));
            if let Some(v) = found {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for a {event_type:?} event of job \
                     {job_id:?}; its events: {:?}; all {} messages: {:?}",
                    self.events_for(job_id),
                    self.messages().len(),
                    self.messages()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// How many times the subscription has been confirmed (1 after `new`;
    /// +1 per resubscription after a server restart).
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::SeqCst)
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The subscriber thread: (re)connect, PSUBSCRIBE, collect until stopped.
fn listen(
    url: &str,
    pattern: &str,
    messages: &Mutex<Vec<(String, Json)>>,
    subscriptions: &AtomicUsize,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    while !stop.load(Ordering::SeqCst) {
        let subscribed = redis::Client::open(url).and_then(|client| {
            let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
            conn.set_write_timeout(Some(Duration::from_secs(5)))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(conn)
        });
        let mut conn = match subscribed {
            Ok(conn) => conn,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(format!("connecting to {url}: {e}")));
                    return;
                }
                // The server is down (being restarted): try again shortly.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut pubsub = conn.as_pubsub();
        // psubscribe returns once the server's confirmation has been read.
        if let Err(e) = pubsub.psubscribe(pattern) {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        subscriptions.fetch_add(1, Ordering::SeqCst);
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        // A short read timeout so that the stop flag is seen promptly.
        if pubsub
            .set_read_timeout(Some(Duration::from_millis(50)))
            .is_err()
        {
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            match pubsub.get_message() {
                Ok(msg) => {
                    let raw = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                    let payload = serde_json::from_str(&raw).unwrap_or(Json::String(raw));
                    messages
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((msg.get_channel_name().to_string(), payload));
                }
                Err(e) if e.is_timeout() => {}
                // Connection lost: reconnect and resubscribe.
                Err(_) => break,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Skipping
// ---------------------------------------------------------------------------

/// `CI=true` (or `1`): what a test would skip for a missing tool is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Says that `test` did not run, in one `SKIPPED: {test}: {why}` line written
/// straight to the process's stderr (the harness captures `eprintln!` of
/// passing tests, and this line must be seen; scripts/test.sh counts them).
/// For skips asked for explicitly: see `skip_unless_ci` for missing tools.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let why: Vec<&str> = why
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let why = why.join(" | ");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
}

/// `report_skip` outside CI; under `CI=true` a panic saying what is missing.
#[track_caller]
pub fn skip_unless_ci(test: &str, why: &str) {
    if in_ci() {
        panic!("{test} cannot run: {why}; with CI=true that is a failure, not a skip");
    }
    report_skip(test, why);
}

/// The real `llama-server` and model (scripts/real-engine.sh's cache, or
/// CITADEL_LLAMA_SERVER / CITADEL_LLAMA_MODEL), if complete. Never builds
/// anything.
pub fn cached_engine() -> Option<(PathBuf, PathBuf)> {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let (Some(server), Some(model)) = (
        from_env("CITADEL_LLAMA_SERVER"),
        from_env("CITADEL_LLAMA_MODEL"),
    ) {
        // Named explicitly: a wrong name is a mistake to report, not a skip.
        for path in [&server, &model] {
            assert!(
                path.is_file(),
                "CITADEL_LLAMA_SERVER / CITADEL_LLAMA_MODEL: {} is not a file",
                path.display()
            );
        }
        return Some((server, model));
    }
    let cache = from_env("CITADEL_ENGINE_CACHE")
        .or_else(|| from_env("HOME").map(|h| h.join(".cache/citadel/real-engine")))?;
    // VERSION is written last, once the engine passed its smoke test.
    let (server, model) = (
        cache.join("bin/llama-server"),
        cache.join("models/model.gguf"),
    );
    (cache.join("VERSION").is_file() && server.is_file() && model.is_file())
        .then_some((server, model))
}
