//! `shell_command` (PROTOCOL.md §4): `/bin/sh -c <command>` on this node,
//! its output streamed as chunks, the result `{exit_code, output}`.
//!
//! Off unless the node says `--allow-shell`. The command runs as the agent's
//! user, in `--workspace-dir`, in a process group of its own, with a scrubbed
//! environment: a short allow-list of the agent's variables (never `CITADEL_*`
//! nor a name that looks like a secret) plus the payload's `env`. However the
//! job ends (exit, deadline, cancellation, the agent's shutdown) no process
//! of its group outlives it: what is left gets SIGTERM, then SIGKILL after
//! `--shell-kill-grace`, and the leader is reaped. An agent killed outright
//! (SIGKILL, OOM) takes the group with it (process.rs's reaper).
//!
//! This file owns the payload, the environment and the job's supervision
//! loop; output.rs cuts output into chunks and the capped result (pure);
//! process.rs signals, watches and reaps the process group.

mod output;
mod process;

use super::{Context, Handler};
use crate::config::Settings;
use crate::job::{json_kind, Job, JobError};
use crate::worker::cancel::CancelReason;
use crossbeam_channel::Sender;
use output::{Capture, LineBuffer};
use process::{Group, SIGKILL, SIGTERM};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DISABLED: &str = "shell_command is disabled on this node (enable with --allow-shell)";

/// The agent's variables a command may see (and every `LC_*`).
const INHERITED: &[&str] = &["PATH", "HOME", "LANG", "TZ", "TERM", "USER"];
/// A variable whose name holds one of these is never passed on.
const SECRET_WORDS: &[&str] = &["TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "CREDENTIAL"];
/// PATH for a command when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Linux refuses a single argument or variable this long (MAX_ARG_STRLEN).
const MAX_ARG_BYTES: usize = 128 * 1024;
/// Most bytes of the payload's `env`, all names and values.
const MAX_ENV_BYTES: usize = 256 * 1024;
/// How often the group is looked at once its leader has exited.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// How long output is still read once the whole group is gone (a process
/// that left the group may hold the pipes; it is not waited for).
const DRAIN: Duration = Duration::from_millis(500);
/// The kill grace when the agent is shutting down: the lifecycle gives
/// handlers `SETTLE_AFTER_GRACE / 2` to stop before the process exits.
const SHUTDOWN_KILL_GRACE: Duration =
    Duration::from_millis(crate::worker::lifecycle::SETTLE_AFTER_GRACE.as_millis() as u64 / 4);

pub struct Shell {
    allowed: bool,
    workspace: PathBuf,
    timeout: Duration,
    kill_grace: Duration,
    output_cap: usize,
}

impl Shell {
    pub fn new(settings: &Settings) -> Shell {
        Shell {
            allowed: settings.allow_shell,
            workspace: settings.workspace_dir(),
            timeout: settings.shell_timeout,
            kill_grace: settings.shell_kill_grace,
            output_cap: settings.shell_output_cap,
        }
    }
}

impl Handler for Shell {
    fn default_timeout(&self) -> Option<(Duration, &'static str)> {
        Some((self.timeout, "shell-timeout"))
    }

    fn run(&self, job: &Job, ctx: &mut Context<'_>) -> Result<Value, JobError> {
        if !self.allowed {
            return Err(JobError::Permanent(DISABLED.into()));
        }
        let params = Params::parse(&job.payload).map_err(JobError::Permanent)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.workspace)
            .map_err(|e| {
                JobError::Permanent(format!(
                    "shell_command: cannot create the workspace {}: {e}",
                    self.workspace.display()
                ))
            })?;
        if ctx.is_cancelled() {
            return Err(JobError::Cancelled(
                "cancelled before the command started".into(),
            ));
        }
        // Started first: a command is never without one.
        let reaper = process::Reaper::start().map_err(|e| {
            JobError::Retryable(format!(
                "shell_command: cannot start its reaper /bin/sh: {e}"
            ))
        })?;
        let mut child = process::die_with_agent(&mut Command::new("/bin/sh"))
            .arg("-c")
            .arg(&params.command)
            .current_dir(&self.workspace)
            .env_clear()
            .envs(child_env(std::env::vars_os(), &params.env))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                let msg = format!("shell_command: cannot start /bin/sh: {e}");
                match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                        JobError::Permanent(msg)
                    }
                    _ => JobError::Retryable(msg),
                }
            })?;
        let group = Group::of(&child, reaper).map_err(|e| {
            let _ = child.wait();
            JobError::Retryable(format!(
                "shell_command: cannot hand the command to its reaper: {e}"
            ))
        })?;
        log::debug!(
            "job {}: /bin/sh -c running in {} as process group {}",
            job.id,
            self.workspace.display(),
            group.id()
        );
        let supervisor = Supervisor {
            group,
            kill_grace: self.kill_grace,
            capture: Capture::new(self.output_cap),
        };
        supervisor.run(&job.id, &mut child, ctx)
    }
}

/// SIGKILLs what is left of every command still running, for an agent about
/// to exit: its shutdown cancelled them, but a handler that did not finish
/// in time must not leave processes behind.
pub fn kill_running() {
    let n = process::kill_all();
    if n > 0 {
        log::warn!("killed {n} shell command process group(s) still running at exit");
    }
}

/// A parsed `shell_command` payload.
#[derive(Debug, PartialEq)]
struct Params {
    command: String,
    env: Vec<(String, String)>,
}

impl Params {
    fn parse(p: &Map<String, Value>) -> Result<Params, String> {
        let command = match p.get("command") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
            None | Some(Value::Null) => {
                return Err(
                    "shell_command: payload.command is required (the command line for /bin/sh -c)"
                        .into(),
                )
            }
            Some(Value::String(_)) => return Err("shell_command: payload.command is empty".into()),
            Some(v) => {
                return Err(format!(
                    "shell_command: payload.command must be a string, got {}",
                    json_kind(v)
                ))
            }
        };
        if command.contains('\0') {
            return Err("shell_command: payload.command contains a NUL byte".into());
        }
        if command.len() >= MAX_ARG_BYTES {
            return Err(format!(
                "shell_command: payload.command is {} bytes long (at most {})",
                command.len(),
                MAX_ARG_BYTES - 1
            ));
        }
        let env = match p.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => {
                let mut env = Vec::with_capacity(m.len());
                let mut total = 0;
                for (name, value) in m {
                    let Value::String(value) = value else {
                        return Err(format!(
                            "shell_command: payload.env.{name} must be a string, got {}",
                            json_kind(value)
                        ));
                    };
                    if name.is_empty() || name.contains(['=', '\0']) {
                        return Err(format!(
                            "shell_command: payload.env has a bad variable name {name:?} \
                             (it must be non-empty, without '=' or NUL)"
                        ));
                    }
                    if value.contains('\0') {
                        return Err(format!(
                            "shell_command: payload.env.{name} contains a NUL byte"
                        ));
                    }
                    let size = name.len() + value.len() + 2;
                    if size > MAX_ARG_BYTES {
                        return Err(format!(
                            "shell_command: payload.env.{name} is too large: {size} bytes \
                             (at most {MAX_ARG_BYTES})"
                        ));
                    }
                    total += size;
                    env.push((name.clone(), value.clone()));
                }
                if total > MAX_ENV_BYTES {
                    return Err(format!(
                        "shell_command: payload.env is too large: {total} bytes in {} variables \
                         (at most {MAX_ENV_BYTES})",
                        env.len()
                    ));
                }
                env
            }
            Some(v) => {
                return Err(format!(
                    "shell_command: payload.env must be an object of strings, got {}",
                    json_kind(v)
                ))
            }
        };
        Ok(Params { command, env })
    }
}

/// The command's environment: the allowed part of the agent's (`agent`),
/// a default PATH if it had none, then the payload's `env`.
fn child_env(
    agent: impl IntoIterator<Item = (OsString, OsString)>,
    job: &[(String, String)],
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = agent
        .into_iter()
        .filter(|(name, _)| name.to_str().is_some_and(inherited))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    for (name, value) in job {
        env.insert(name.into(), value.into());
    }
    env
}

/// Whether the agent's variable `name` is passed on to commands.
fn inherited(name: &str) -> bool {
    let listed = INHERITED.contains(&name) || name.starts_with("LC_");
    let upper = name.to_ascii_uppercase();
    listed && !upper.starts_with("CITADEL_") && !SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// A piece of output from one of the command's pipes (0 stdout, 1 stderr).
enum Piece {
    Bytes(usize, Vec<u8>),
    Eof(usize),
}

/// What changes the supervision: the leader exited, the job was cancelled.
enum Control {
    Exited,
    Cancelled,
}

/// One running command until its group is gone.
struct Supervisor {
    group: Arc<Group>,
    kill_grace: Duration,
    capture: Capture,
}

impl Supervisor {
    fn run(
        mut self,
        job_id: &str,
        child: &mut Child,
        ctx: &mut Context<'_>,
    ) -> Result<Value, JobError> {
        let (piece_tx, mut pieces) = crossbeam_channel::bounded(16);
        let (control_tx, mut controls) = crossbeam_channel::unbounded();
        let stdout = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        let mut open = [false, false];
        for (i, pipe) in [stdout, stderr].into_iter().enumerate() {
            if let Some(pipe) = pipe {
                open[i] = spawn_reader(i, pipe, piece_tx.clone());
            }
        }
        drop(piece_tx);
        let pid = child.id();
        let exited_tx = control_tx.clone();
        let waiter = std::thread::Builder::new()
            .name("shell-wait".into())
            .spawn(move || {
                if let Err(e) = process::wait_exited(pid) {
                    log::warn!("waiting for shell process {pid}: {e}");
                }
                let _ = exited_tx.send(Control::Exited);
            });
        if let Err(e) = waiter {
            // Nothing would notice the exit: stop the command now.
            self.group.signal(SIGKILL);
            let _ = self.group.reap(child);
            return Err(JobError::Retryable(format!(
                "shell_command: cannot start a thread: {e}"
            )));
        }
        let group = self.group.clone();
        ctx.cancel_token().on_cancel(move || {
            group.signal(SIGTERM);
            let _ = control_tx.send(Control::Cancelled);
        });

        let mut lines = [LineBuffer::default(), LineBuffer::default()];
        let mut exited = false;
        let mut cancelled_while_running = false;
        let mut kill_at: Option<Instant> = None;
        let mut killed = false;
        let mut status: Option<ExitStatus> = None;
        let mut drain_until = None;
        loop {
            let now = Instant::now();
            for line in &mut lines {
                if line.due().is_some_and(|t| t <= now) {
                    if let Some(text) = line.flush(false, now) {
                        self.emit(ctx, &text);
                    }
                }
            }
            if !killed && kill_at.is_some_and(|t| t <= now) {
                log::debug!("job {job_id}: SIGKILL to process group {}", self.group.id());
                self.group.signal(SIGKILL);
                killed = true;
            }
            if exited && status.is_none() {
                let alive = self.group.alive().unwrap_or_else(|e| {
                    log::warn!("job {job_id}: cannot read /proc ({e}); killing its process group");
                    self.group.signal(SIGKILL);
                    killed = true;
                    false
                });
                if !alive {
                    let st = self.group.reap(child).map_err(|e| {
                        JobError::Permanent(format!("shell_command: cannot reap /bin/sh: {e}"))
                    })?;
                    log::debug!(
                        "job {job_id}: process group {} is gone ({st})",
                        self.group.id()
                    );
                    status = Some(st);
                    drain_until = Some(now + DRAIN);
                } else if kill_at.is_none() {
                    // The leader is done; what it left behind is stopped.
                    self.group.signal(SIGTERM);
                    kill_at = Some(now + self.grace(ctx));
                }
            }
            if status.is_some() && (open == [false, false] || drain_until.is_some_and(|t| t <= now))
            {
                if open != [false, false] {
                    log::warn!(
                        "job {job_id}: a process outside the command's group still holds its \
                         output; not waiting for it"
                    );
                }
                break;
            }
            let wake = [
                lines[0].due(),
                lines[1].due(),
                kill_at.filter(|_| !killed),
                drain_until,
                (exited && status.is_none()).then(|| now + GROUP_POLL),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(3600));
            crossbeam_channel::select! {
                recv(pieces) -> piece => match piece {
                    Ok(Piece::Bytes(i, bytes)) => {
                        if let Some(text) = lines[i].push(&bytes, Instant::now()) {
                            self.emit(ctx, &text);
                        }
                    }
                    Ok(Piece::Eof(i)) => {
                        open[i] = false;
                        if let Some(text) = lines[i].flush(true, Instant::now()) {
                            self.emit(ctx, &text);
                        }
                    }
                    Err(_) => pieces = crossbeam_channel::never(),
                },
                recv(controls) -> control => match control {
                    Ok(Control::Exited) => {
                        exited = true;
                        // The token is marked before its hook's SIGTERM is sent.
                        cancelled_while_running = ctx.is_cancelled();
                    }
                    Ok(Control::Cancelled) => {
                        log::debug!(
                            "job {job_id}: cancelled; SIGTERM sent to process group {}",
                            self.group.id()
                        );
                        let at = Instant::now() + self.grace(ctx);
                        kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                    }
                    Err(_) => controls = crossbeam_channel::never(),
                },
                default(wake) => {}
            }
        }
        let status = status.expect("the loop ends once the leader is reaped");
        if cancelled_while_running {
            return Err(JobError::Cancelled(format!(
                "the command was stopped ({})",
                describe(status)
            )));
        }
        let tail = match self.capture.tail() {
            "" => String::new(),
            t => format!("; its output ends with:\n{t}"),
        };
        match status.code() {
            Some(0) => Ok(json!({"exit_code": 0, "output": self.capture.finish()})),
            Some(_) | None => Err(JobError::Permanent(format!(
                "shell_command: the command {}{tail}",
                describe(status)
            ))),
        }
    }

    /// How long the group has between SIGTERM and SIGKILL: the kill grace,
    /// shorter when the agent is stopping (or the job is someone else's now).
    fn grace(&self, ctx: &Context<'_>) -> Duration {
        match ctx.cancel_token().reason() {
            Some(CancelReason::Shutdown | CancelReason::LeaseLost) => {
                self.kill_grace.min(SHUTDOWN_KILL_GRACE)
            }
            _ => self.kill_grace,
        }
    }

    fn emit(&mut self, ctx: &mut Context<'_>, text: &str) {
        self.capture.push(text);
        ctx.chunk(text);
    }
}

/// "exited with code 3", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by {}", process::signal_name(sig)),
        (None, None) => format!("ended with status {status}"),
    }
}

/// Reads `pipe` on its own thread into `tx` until EOF; false if the thread
/// could not start (the pipe is then dropped, and the command sees EPIPE).
fn spawn_reader(i: usize, mut pipe: Box<dyn Read + Send>, tx: Sender<Piece>) -> bool {
    std::thread::Builder::new()
        .name(
            if i == 0 {
                "shell-stdout"
            } else {
                "shell-stderr"
            }
            .into(),
        )
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(Piece::Bytes(i, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(Piece::Eof(i));
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Params, String> {
        Params::parse(v.as_object().unwrap())
    }

    #[test]
    fn payload_errors_name_what_is_wrong() {
        let ok = parse(json!({"command": "echo hi", "env": {"A": "1"}})).unwrap();
        assert_eq!(ok.command, "echo hi");
        assert_eq!(ok.env, [("A".to_string(), "1".to_string())]);
        for (payload, want) in [
            (json!({}), "payload.command is required"),
            (
                json!({"command": 7}),
                "payload.command must be a string, got a number",
            ),
            (json!({"command": " "}), "payload.command is empty"),
            (
                json!({"command": "x", "env": {"N": 1}}),
                "payload.env.N must be a string",
            ),
            (
                json!({"command": "x", "env": ["A=1"]}),
                "payload.env must be an object",
            ),
            (
                json!({"command": "x", "env": {"A=B": "1"}}),
                "bad variable name",
            ),
            (
                json!({"command": "x", "env": {"BIG": "x".repeat(MAX_ARG_BYTES)}}),
                "payload.env.BIG is too large",
            ),
            (json!({"command": "x".repeat(MAX_ARG_BYTES)}), "bytes long"),
        ] {
            let err = parse(payload.clone()).unwrap_err();
            assert!(err.contains(want), "{payload}: {err}");
        }
        let many: Map<String, Value> = (0..100)
            .map(|i| (format!("V{i}"), json!("x".repeat(4000))))
            .collect();
        let err = parse(json!({"command": "x", "env": many})).unwrap_err();
        assert!(err.contains("payload.env is too large"), "{err}");
    }

    #[test]
    fn only_allowed_variables_are_inherited_and_the_job_env_wins() {
        let agent = [
            ("PATH", "/bin"),
            ("HOME", "/h"),
            ("LC_ALL", "C"),
            ("LC_API_KEY", "k"),
            ("CITADEL_NEXUS_TOKEN", "t"),
            ("MY_SECRET", "s"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("EDITOR", "vi"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(agent, &[("HOME".into(), "/job".into())]);
        let names: Vec<_> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(names, ["HOME", "LC_ALL", "PATH"]);
        assert_eq!(env[&OsString::from("HOME")], "/job");
        let env = child_env([], &[]);
        assert_eq!(env[&OsString::from("PATH")], DEFAULT_PATH);
    }
}
